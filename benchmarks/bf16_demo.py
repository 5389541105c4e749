"""Does the bfloat16 recipe learn as float32 does? The offline demo trained both ways.

  .venv/bin/python benchmarks/bf16_demo.py --epochs 20            # run what is missing, report
  .venv/bin/python benchmarks/bf16_demo.py --epochs 20 --report   # the table only

Every TPU and GPU run computes in bfloat16 (`model.dtype = 'auto'`), which the CPU only
emulates. This trains the demo's recipe (configs/demo.py: digits, ResNet-18 of width 8, 24 px,
batch 32, k = 10, lr 0.3 x batch/256, a bank of one train set) with `model.dtype` 'float32'
and 'bfloat16' for seeds 0, 1 and 2: same seeds, so the same initial weights, bank and
augmentations, and only the compute dtype differs. Each run logs its mean loss every epoch and
the kNN monitor (1-NN and 20-NN on the whole test split) every `--monitor-every` epochs.

Resumable as benchmarks/small_data_study.py is (whose run settings and helpers this reuses):
each run writes OUT/runs/<dtype>/seed<S>.json when done and is skipped when it exists; runs go
two at a time, each pinned to its own core. The report prints a markdown table and writes it to
OUT/bf16_demo.md.
"""

import functools
import json
import os
import queue
import sys
import time

import numpy as np
import small_data_study as study

DTYPES = ('float32', 'bfloat16')
DEMO = study.Setting(topk=10)  # the demo's k; lr 0.3 and the one-train-set bank are the base's
DATASET = 'digits'


def record_path(out: str, dtype: str, seed: int) -> str:
  return os.path.join(out, 'runs', dtype, f'seed{seed}.json')


def run_one(dtype: str, seed: int, out: str, epochs: int, monitor_every: int) -> None:
  """Trains one (dtype, seed) with the training program; writes its JSON record last. A run
  already recorded is not rerun (its record keeps the time it took)."""
  from msf_jax import train_loop

  if os.path.exists(record_path(out, dtype, seed)):
    print(f'{dtype} seed {seed}: already recorded.')
    return
  config = study.run_config(DATASET, DEMO, seed, out, epochs)
  config.model.dtype = dtype
  config.monitor.knn_every_epochs = monitor_every
  workdir = os.path.join(out, 'work', dtype, f'seed{seed}')
  start = time.time()
  state = train_loop.train(config, workdir)
  steps_per_epoch = study.train_size(DATASET) // study.BATCH_SIZE
  if int(state.step) < epochs * steps_per_epoch:
    sys.exit(f'Stopped at step {int(state.step)} (SIGTERM?): no record; a rerun resumes it.')
  record = {
    'dtype': dtype,
    'seed': seed,
    'epochs': epochs,
    'steps_per_epoch': steps_per_epoch,
    'curves': study.read_curves(workdir),
    'seconds': time.time() - start,
  }
  path = record_path(out, dtype, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def run_all(out: str, epochs: int, monitor_every: int, workers: int) -> None:
  """Every missing (dtype, seed), `workers` at a time, each worker on its own core; the
  slower bfloat16 runs first, so that the two cores finish together."""
  jobs: queue.Queue = queue.Queue()
  for seed in study.SEEDS:
    for dtype in reversed(DTYPES):
      if not os.path.exists(record_path(out, dtype, seed)):
        jobs.put((dtype, seed))

  def worker(core: int) -> None:
    while True:
      try:
        dtype, seed = jobs.get_nowait()
      except queue.Empty:
        return
      log = os.path.join(out, 'logs', f'{dtype}_seed{seed}.log')
      code = study.run_pinned(
        __file__,
        [
          '--out',
          out,
          '--epochs',
          str(epochs),
          '--monitor-every',
          str(monitor_every),
          '--run',
          json.dumps([dtype, seed]),
        ],
        log,
        core,
      )
      print(
        f'{"done" if code == 0 else f"FAILED ({code}), see " + log}: {dtype} seed {seed}',
        flush=True,
      )

  study.on_cores(worker, workers)


# --- Report ------------------------------------------------------------------------------


def load_records(out: str) -> dict[tuple[str, int], dict]:
  """{(dtype, seed): record} of the finished runs."""
  records = {}
  for dtype in DTYPES:
    for seed in study.SEEDS:
      if os.path.exists(path := record_path(out, dtype, seed)):
        with open(path) as f:
          records[dtype, seed] = json.load(f)
  return records


def at_epochs(record: dict, tag: str) -> dict[int, float]:
  """{epoch: value} of one logged curve, at whole epochs."""
  per_epoch = record['steps_per_epoch']
  return {
    step // per_epoch: value for step, value in record['curves'][tag] if step % per_epoch == 0
  }


def _difference(record: dict, reference: dict, tag: str, epoch: int) -> float:
  """record's value of tag at epoch minus reference's."""
  return at_epochs(record, tag)[epoch] - at_epochs(reference, tag)[epoch]


def _row(cells: list) -> str:
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def table(records: dict[tuple[str, int], dict]) -> str:
  """Markdown: per dtype and seed, the loss and 20-NN curves at the first, every tenth and
  last monitored epoch, the final 1-NN, purity_others and wall time; then bfloat16 minus
  float32 seed by seed."""
  monitored = sorted(at_epochs(next(iter(records.values())), 'monitor/knn_k20'))
  epochs = [e for e in monitored if e in (monitored[0], monitored[-1]) or e % 10 == 0]
  header = (
    ['dtype', 'seed']
    + [f'loss e{e}' for e in epochs]
    + [f'20-NN e{e}' for e in epochs]
    + ['final 1-NN', 'final purity_others', 'minutes']
  )
  lines = [_row(header), _row(['---'] * len(header))]
  percent = lambda value: f'{100 * value:.1f}'
  for (dtype, seed), record in records.items():
    loss, knn = at_epochs(record, 'loss'), at_epochs(record, 'monitor/knn_k20')
    lines.append(
      _row(
        [dtype, seed]
        + [f'{loss[e]:.4f}' for e in epochs]
        + [percent(knn[e]) for e in epochs]
        + [
          percent(at_epochs(record, 'monitor/knn_k1')[epochs[-1]]),
          f'{at_epochs(record, "purity_others")[epochs[-1]]:.3f}',
          f'{record["seconds"] / 60:.1f}',
        ]
      )
    )
  for seed in study.SEEDS:
    if ('float32', seed) in records and ('bfloat16', seed) in records:
      bf16, f32 = records['bfloat16', seed], records['float32', seed]
      diff = functools.partial(_difference, bf16, f32)
      lines.append(
        _row(
          ['bf16 - f32', seed]
          + [f'{diff("loss", e):+.4f}' for e in epochs]
          + [f'{100 * diff("monitor/knn_k20", e):+.1f}' for e in epochs]
          + [
            f'{100 * diff("monitor/knn_k1", epochs[-1]):+.1f}',
            f'{diff("purity_others", epochs[-1]):+.3f}',
            f'{(bf16["seconds"] / f32["seconds"]):.2f}x',
          ]
        )
      )
  return '\n'.join(lines)


def summary(records: dict[tuple[str, int], dict]) -> str:
  """Mean and spread over seeds of the final loss and kNN accuracies, per dtype."""
  lines = []
  for dtype in DTYPES:
    runs = [r for (d, _), r in records.items() if d == dtype]
    if not runs:
      continue
    last = lambda r, tag: at_epochs(r, tag)[r['epochs']]
    values = {
      tag: np.array([last(r, tag) for r in runs])
      for tag in ('loss', 'monitor/knn_k1', 'monitor/knn_k20')
    }
    lines.append(
      f'- {dtype} ({len(runs)} seeds): final loss {values["loss"].mean():.4f} '
      f'(range {values["loss"].min():.4f}-{values["loss"].max():.4f}); 1-NN '
      f'{100 * values["monitor/knn_k1"].mean():.1f}% '
      f'({100 * values["monitor/knn_k1"].min():.1f}-'
      f'{100 * values["monitor/knn_k1"].max():.1f}); 20-NN '
      f'{100 * values["monitor/knn_k20"].mean():.1f}% '
      f'({100 * values["monitor/knn_k20"].min():.1f}-'
      f'{100 * values["monitor/knn_k20"].max():.1f}).'
    )
  return '\n'.join(lines)


def report(out: str) -> None:
  records = load_records(out)
  if not records:
    sys.exit(f'No finished runs under {out}.')
  text = f'{table(records)}\n\n{summary(records)}\n'
  with open(os.path.join(out, 'bf16_demo.md'), 'w') as f:
    f.write(text)
  print(text)


def main() -> None:
  parser = study.study_parser(__doc__, 'bf16_demo', 60, "the demo's 60; fewer on a busy CPU")
  parser.add_argument('--monitor-every', type=int, default=5, help='epochs between kNN monitors')
  args = parser.parse_args()
  if args.run:
    dtype, seed = study.worker_job(args.run)
    run_one(dtype, seed, args.out, args.epochs, args.monitor_every)
    return
  if not args.report:
    run_all(args.out, args.epochs, args.monitor_every, args.workers)
  report(args.out)


if __name__ == '__main__':
  main()
