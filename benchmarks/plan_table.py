"""The ImageNet recipe planned for Cloud TPU slices by `python -m msf_jax.plan`, one plan a
(slice, global batch), two compiles at a time, then one Markdown table for RESULTS.md.

  python benchmarks/plan_table.py --out runs/plan_table
  python benchmarks/plan_table.py --out runs/bank_plans --slices v5e-8 v5e-64 --batches 256 \
      --banks 1024000 4096000 16384000 --layouts replicated sharded

With --banks and --layouts, one plan a (slice, batch, bank rows, layout), and the table shows
the train step's memory by kind and its collectives: the bank layouts side by side.

Each plan is a separate `msf_jax.plan` process (its JSON in --out, its console output beside
it); a plan whose JSON is already in --out is read, not made again. Needs libtpu
(`pip install "jax[tpu]==0.10.2"`), no TPU.
"""

import argparse
import concurrent.futures
import dataclasses
import gzip
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = ('v4-8', 'v4-32', 'v5e-8', 'v5e-64', 'v5p-8', 'v6e-8')
BATCHES = (256, 4096)  # the paper's; a large-batch variant (lr scales with batch / 256)


@dataclasses.dataclass(frozen=True)
class Job:
  """One plan: a slice and global batch, and optionally a bank size and layout."""

  slice_name: str
  batch: int
  bank: int | None = None
  layout: str | None = None
  bn_group_size: int | None = None

  @property
  def stem(self) -> str:
    bank = f'_bank{self.bank}' if self.bank else ''
    layout = f'_{self.layout}' if self.layout else ''
    groups = '' if self.bn_group_size is None else f'_bn{self.bn_group_size}'
    return f'{self.slice_name}_b{self.batch}{bank}{layout}{groups}'

  @property
  def flags(self) -> list[str]:
    bank = [f'--config.msf.bank_size={self.bank}'] if self.bank else []
    layout = [f'--config.msf.bank_layout={self.layout}'] if self.layout else []
    groups = (
      [] if self.bn_group_size is None else [f'--config.model.bn_group_size={self.bn_group_size}']
    )
    return bank + layout + groups


def plan(job: Job, out: str, config: str, extra: list[str], report: bool = False) -> dict:
  """Runs the planner for one job; returns its JSON (with the exit status). With `report`,
  only reads what an earlier call made."""
  stem = os.path.join(out, job.stem)
  if os.path.exists(f'{stem}.json'):  # made by an earlier call: --out is the record
    with open(f'{stem}.json') as f:
      return json.load(f)
  if report:
    return {'error': 'not planned yet'}
  command = [
    sys.executable,
    '-m',
    'msf_jax.plan',
    f'--config={config}',
    f'--topology={job.slice_name}',
    f'--config.batch_size={job.batch}',
    '--programs=train',
    f'--json={stem}.json',
    f'--hlo_dir={stem}_hlo',
    *job.flags,
    *extra,
  ]
  with open(f'{stem}.txt', 'w') as log:
    status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  if not os.path.exists(f'{stem}.json'):
    return {'error': f'no plan (exit {status}): see {stem}.txt'}
  with open(f'{stem}.json') as f:
    return {**json.load(f), 'exit': status}


def train_step_time(result: dict) -> dict:
  """The train step's `roofline.step_time` by today's code: from its kept HLO where the plan
  kept it (a plan made by an older planner gets today's estimate without a new compile),
  else the one in the plan."""
  from msf_jax.plan import planner, slices

  train = result['programs']['train step']
  if not train.get('hlo_file') or not os.path.exists(train['hlo_file']):
    return train['step_time']
  with gzip.open(train['hlo_file'], 'rt') as f:
    hlo = f.read()
  generation = slices.parse_slice(result['slice']['name']).tpu_generation
  return planner.step_time_of(
    hlo, train['devices'], train['memory'], generation.chip, generation.torus_dims
  )


def run_figures(result: dict) -> dict:
  """The run's figures by the planner's own `run_estimate`, from today's step time."""
  from msf_jax.plan import planner, slices

  fields = {f.name for f in dataclasses.fields(planner.ProgramPlan)}
  train = result['programs']['train step']
  program = planner.ProgramPlan(
    **{k: v for k, v in train.items() if k in fields} | {'step_time': train_step_time(result)}
  )
  config = result['config']
  return planner.run_estimate(
    program,
    slices.parse_slice(result['slice']['name']),
    config['num_epochs'] * config['steps_per_epoch'],
    planner.INPUT_SAMPLES_PER_CORE,
  )


def _all_reduces(train: dict) -> str:
  counts = train.get('collective_counts', {}).get('all-reduce')
  if not counts:
    return '0'
  dtypes = ', '.join(f'{d} {b / 1e6:,.1f}' for d, b in sorted(counts.items()) if d != 'count')
  return f'{counts["count"]} ({dtypes} MB)'


def row(job: Job, result: dict) -> str:
  groups = '' if job.bn_group_size is None else f' | {job.bn_group_size}'
  if 'error' in result:
    return f'| {job.slice_name} | {job.batch}{groups} | {result["error"]} |' + ' |' * 7
  train = result['programs']['train step']
  fits = 'yes' if result['fits'] else 'no'
  cells = [job.slice_name, f'{job.batch:,}']
  cells += [] if job.bn_group_size is None else [str(job.bn_group_size)]
  cells += [fits, f'{train["memory"]["total"] / 2**30:.2f}']
  if not result['fits']:
    return '| ' + ' | '.join(cells + ['—'] * 6) + ' |'
  step, run = train_step_time(result), run_figures(result)
  ms = lambda seconds: f'{seconds * 1e3:.1f}'
  cells += [
    f'{step["flops"] * train["devices"] / train["global_batch"] / 1e9:.1f} '
    f'({train["architecture_flops_per_image"] / 1e9:.1f})',
    _all_reduces(train),
    f'{ms(step["bound_seconds"])}-{ms(step["estimate_seconds"])} '
    f'({run["bound_images_per_second"]:,.0f}-{run["estimate_images_per_second"]:,.0f})',
    f'{ms(step["operations_seconds"])} + {ms(step["collective_seconds"])} ({step["collectives"]})',
    f'{run["estimate_images_per_second_per_host"]:,.0f} = '
    f'{run["estimate_host_cores_needed"]:.1f} of {result["slice"]["host_vcpus"]} vCPUs',
    f'{run["bound_chip_hours"]:,.0f}-{run["estimate_chip_hours"]:,.0f}',
  ]
  return '| ' + ' | '.join(cells) + ' |'


def bank_row(job: Job, result: dict) -> str:
  """A bank layout's row: the train step's memory by kind a chip and its collectives."""
  head = f'| {job.slice_name} | {job.bank:,} | {job.layout} |'
  if 'error' in result:
    return f'{head} {result["error"]} |' + ' |' * 4
  train = result['programs']['train step']
  memory = {kind: f'{size / 2**30:.2f}' for kind, size in train['memory'].items()}
  compiled = train['compile_seconds'] > 0
  fits = 'yes' if result['fits'] else ('no' if compiled else 'no: refused before compiling')
  collectives = (
    ', '.join(f'{kind} {size / 1e6:,.1f} MB' for kind, size in train['collectives'].items()) or '—'
  )
  temporaries = memory['temporaries'] if compiled else '—'
  return f'{head} {memory["state"]} | {temporaries} | {memory["total"]} | {fits} | {collectives} |'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(REPO, 'runs', 'plan_table'))
  parser.add_argument('--config', default='configs/imagenet_msf.py')
  parser.add_argument('--slices', nargs='+', default=SLICES)
  parser.add_argument('--batches', nargs='+', type=int, default=BATCHES)
  parser.add_argument(
    '--banks', nargs='+', type=int, default=[None], help="Bank rows (default: the config's)."
  )
  parser.add_argument(
    '--layouts',
    nargs='+',
    default=[None],
    choices=('replicated', 'sharded'),
    help="msf.bank_layout (default: the config's).",
  )
  parser.add_argument(
    '--bn_group_sizes',
    nargs='+',
    type=int,
    default=[None],
    help="model.bn_group_size (default: the config's; 0 normalizes over the global batch).",
  )
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--report', action='store_true', help='Plan nothing: the table of --out.')
  args, extra = parser.parse_known_args()
  os.makedirs(args.out, exist_ok=True)
  jobs = [
    Job(s, b, bank, layout, groups)
    for b in args.batches
    for s in args.slices
    for bank in args.banks
    for layout in args.layouts
    for groups in args.bn_group_sizes
  ]
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    results = list(pool.map(lambda job: plan(job, args.out, args.config, extra, args.report), jobs))
  if args.banks != [None] and args.layouts != [None]:
    print(
      '| slice | bank rows | layout | state GiB | temporaries GiB | total GiB a chip | fits '
      '| collectives a step |'
    )
    print('|---|---|---|---|---|---|---|---|')
    print('\n'.join(bank_row(job, result) for job, result in zip(jobs, results, strict=True)))
  else:
    groups = ' BatchNorm group |' if args.bn_group_sizes != [None] else ''
    print(
      f'| slice | global batch |{groups} fits | GiB a chip | GFLOP an image, counted '
      '(traced) | all-reduces a step (MB by dtype) | step ms, bound-estimate (images/s) | '
      'estimate: operations + collectives ms (count) | feed a host at the estimate, '
      'images/s = cores | chip-hours for 200 epochs, bound-estimate |'
    )
    print('|---' * (10 + bool(groups)) + '|')
    print('\n'.join(row(job, result) for job, result in zip(jobs, results, strict=True)))
  for job, result in zip(jobs, results, strict=True):
    for sentence in result.get('does_not_fit', []):
      print(f'\n{job.stem}: {sentence}')


if __name__ == '__main__':
  main()
