"""The ImageNet recipe planned for Cloud TPU slices by `python -m msf_jax.plan`, one plan a
(slice, global batch), two compiles at a time, then one Markdown table for RESULTS.md.

  python benchmarks/plan_table.py --out runs/plan_table

Each plan is a separate `msf_jax.plan` process (its JSON in --out, its console output beside
it); a plan whose JSON is already in --out is read, not made again. Needs libtpu
(`pip install "jax[tpu]==0.10.2"`), no TPU.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = ('v4-8', 'v4-32', 'v5e-8', 'v5e-64', 'v5p-8', 'v6e-8')
BATCHES = (256, 4096)  # the paper's; a large-batch variant (lr scales with batch / 256)


def plan(slice_name: str, batch: int, out: str, config: str, extra: list[str]) -> dict:
  """Runs the planner for one (slice, batch); returns its JSON (with the exit status)."""
  stem = os.path.join(out, f'{slice_name}_b{batch}')
  if os.path.exists(f'{stem}.json'):  # made by an earlier call: --out is the record
    with open(f'{stem}.json') as f:
      return json.load(f)
  command = [sys.executable, '-m', 'msf_jax.plan', f'--config={config}',
             f'--topology={slice_name}', f'--config.batch_size={batch}', '--programs=train',
             f'--json={stem}.json', *extra]
  with open(f'{stem}.txt', 'w') as log:
    status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  if not os.path.exists(f'{stem}.json'):
    return {'error': f'no plan (exit {status}): see {stem}.txt'}
  with open(f'{stem}.json') as f:
    return {**json.load(f), 'exit': status}


def run_figures(result: dict) -> dict:
  """The run's figures from a plan's JSON by the planner's own `run_estimate` (a plan made by
  an older planner gets today's figures)."""
  from msf_jax.plan import planner, slices
  fields = {f.name for f in dataclasses.fields(planner.ProgramPlan)}
  train = planner.ProgramPlan(**{k: v for k, v in result['programs']['train step'].items()
                                 if k in fields})
  config = result['config']
  return planner.run_estimate(train, slices.parse_slice(result['slice']['name']),
                              config['num_epochs'] * config['steps_per_epoch'],
                              planner.INPUT_SAMPLES_PER_CORE)


def row(slice_name: str, batch: int, result: dict) -> str:
  if 'error' in result:
    return f'| {slice_name} | {batch} | {result["error"]} |' + ' |' * 6
  train = result['programs']['train step']
  fits = 'yes' if result['fits'] else 'no'
  xla, ours = train['flops_per_image'] / 1e9, train['architecture_flops_per_image'] / 1e9
  flops = f'{xla:.1f} ({ours:.1f})'
  cells = [slice_name, f'{batch:,}', fits, f"{train['memory']['total'] / 2**30:.2f}", flops,
           f"{sum(train['collectives'].values()) / 1e6:,.0f}"]
  if result['fits']:
    run = run_figures(result)
    cells += [f"{run['step_seconds'] * 1e3:.1f}-{run['pessimistic_step_seconds'] * 1e3:.1f} "
              f"({run['images_per_second']:,.0f}-{run['pessimistic_images_per_second']:,.0f})",
              f"{run['images_per_second_per_host']:,.0f} = {run['host_cores_needed']:.1f} of "
              f"{result['slice']['host_vcpus']} vCPUs",
              f"{run['chip_hours']:,.0f}-"
              f"{run['pessimistic_hours'] * result['slice']['chips']:,.0f}"]
  else:
    cells += ['—', '—', '—']
  return '| ' + ' | '.join(cells) + ' |'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(REPO, 'runs', 'plan_table'))
  parser.add_argument('--config', default='configs/imagenet_msf.py')
  parser.add_argument('--slices', nargs='+', default=SLICES)
  parser.add_argument('--batches', nargs='+', type=int, default=BATCHES)
  parser.add_argument('--parallel', type=int, default=2)
  args, extra = parser.parse_known_args()
  os.makedirs(args.out, exist_ok=True)
  jobs = [(s, b) for b in args.batches for s in args.slices]
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    results = list(pool.map(lambda job: plan(*job, args.out, args.config, extra), jobs))
  print('| slice | global batch | fits | GiB a chip | GFLOP an image, XLA (architecture) | '
        'collective MB a step | step ms, bound-estimate (images/s) | feed a host at the bound, '
        'images/s = cores | chip-hours for 200 epochs, bound-estimate |')
  print('|---|---|---|---|---|---|---|---|---|')
  for (slice_name, batch), result in zip(jobs, results):
    print(row(slice_name, batch, result))
  for (slice_name, batch), result in zip(jobs, results):
    for sentence in result.get('does_not_fit', []):
      print(f'\n{slice_name}, batch {batch}: {sentence}')


if __name__ == '__main__':
  main()
