"""Does the bfloat16 recipe learn as float32 does? The offline demo trained both ways.

  .venv/bin/python benchmarks/bf16_demo.py --epochs 20              # run what is missing, report
  .venv/bin/python benchmarks/bf16_demo.py --epochs 20 --seeds 6    # seeds 0-5
  .venv/bin/python benchmarks/bf16_demo.py --epochs 20 --seeds 2:3 --variant heads_f32
  .venv/bin/python benchmarks/bf16_demo.py --epochs 20 --report     # the table only

Every TPU and GPU run computes in bfloat16 (`model.dtype = 'auto'`), which the CPU only
emulates. This trains the demo's recipe (configs/demo.py: digits, ResNet-18 of width 8, 24 px,
batch 32, k = 10, lr 0.3 x batch/256, a bank of one train set) with `model.dtype` 'float32'
and 'bfloat16' for seeds 0, 1 and 2 by default (`--seeds`): same seeds, so the same initial
weights, bank and augmentations, and only the compute dtype differs. Each run logs its mean
loss every epoch and the kNN monitor (1-NN and 20-NN on the whole test split) every
`--monitor-every` epochs.

`--seeds` is a count N (seeds 0 to N - 1) or a range A:B (seeds A to B - 1). A `--variant`
trains the bfloat16 runs of those seeds once more with one part of the network (or the
monitor) in float32 (VARIANTS), to find what made a bfloat16 run fall behind its float32
twin; it is patched into the worker process (benchmark-only: the library's bfloat16 is
unchanged), and recorded as the kind 'bfloat16+<variant>' beside the others.

Resumable as benchmarks/small_data_study.py is (whose run settings and helpers this reuses):
each run writes OUT/runs/<kind>/seed<S>.json when done and is skipped when it exists; runs go
two at a time, each pinned to its own core. The report (of every kind and seed recorded under
OUT, whatever `--seeds`) prints a markdown table and writes it to OUT/bf16_demo.md.
"""

import functools
import glob
import json
import os
import queue
import re
import sys
import time

import numpy as np
import small_data_study as study

DTYPES = ('float32', 'bfloat16')
DEMO = study.Setting(topk=10)  # the demo's k; lr 0.3 and the one-train-set bank are the base's
DATASET = 'digits'
# One part in float32 in a bfloat16 run (--variant): what the library's bfloat16 computes in
# bfloat16 is the ResNet (its input included) and the heads' hidden layers; the bank search,
# the normalisation of embeddings and predictions, the loss and the heads' last layers are
# float32 in both dtypes already.
VARIANTS = {
  'backbone_f32': 'the ResNet in float32, the projector and predictor in bfloat16',
  'heads_f32': 'the projector and predictor in float32, the ResNet in bfloat16',
  'monitor_f32': "training all bfloat16, the kNN monitor's features in float32",
}


def record_path(out: str, kind: str, seed: int) -> str:
  return os.path.join(out, 'runs', kind, f'seed{seed}.json')


def parse_seeds(text: str) -> range:
  """--seeds: 'N' is seeds 0 to N - 1, 'A:B' seeds A to B - 1."""
  start, _, stop = text.rpartition(':')
  return range(int(start or 0), int(stop))


def apply_variant(variant: str) -> None:
  """Patches one VARIANTS part to float32 into this process's training program and feature
  extraction (the model's 'bfloat16' stays what the library makes of the rest)."""
  import jax.numpy as jnp

  from msf_jax import train
  from msf_jax.evaluate import features
  from msf_jax.models import msf
  from msf_jax.models.heads import MLPHead
  from msf_jax.models.resnet import ResNet, feature_dim

  build = msf.build_networks
  if variant == 'monitor_f32':

    def float32_networks(model_config, groups=msf.WHOLE_BATCH):
      model_config = model_config.copy_and_resolve_references()
      model_config.dtype = 'float32'
      return build(model_config, groups)

    features.build_networks = float32_networks
    return
  backbone_dtype, head_dtype = {
    'backbone_f32': (None, jnp.bfloat16),
    'heads_f32': (jnp.bfloat16, None),
  }[variant]

  class SplitEncoder(msf.Encoder):
    def setup(self):
      dim = feature_dim(self.depth, self.width)
      self.backbone = ResNet(
        self.depth, self.small_stem, self.width, backbone_dtype, self.param_dtype, self.groups
      )
      self.projector = MLPHead(2 * dim, dim // 4, head_dtype, self.param_dtype, self.groups)

  def split_networks(model_config, groups=msf.WHOLE_BATCH):
    encoder, predictor = build(model_config, groups)
    return (
      SplitEncoder(
        encoder.depth, encoder.small_stem, encoder.width, encoder.dtype, encoder.param_dtype, groups
      ),
      MLPHead(predictor.hidden_dim, predictor.out_dim, head_dtype, predictor.param_dtype, groups),
    )

  train.build_networks = features.build_networks = split_networks


def run_one(kind: str, seed: int, out: str, epochs: int, monitor_every: int) -> None:
  """Trains one (kind, seed) with the training program (kind: a dtype, or
  'bfloat16+<variant>'); writes its JSON record last. A run already recorded is not rerun
  (its record keeps the time it took)."""
  from msf_jax import train_loop

  if os.path.exists(record_path(out, kind, seed)):
    print(f'{kind} seed {seed}: already recorded.')
    return
  dtype, _, variant = kind.partition('+')
  if variant:
    apply_variant(variant)
  config = study.run_config(DATASET, DEMO, seed, out, epochs)
  config.model.dtype = dtype
  config.monitor.knn_every_epochs = monitor_every
  workdir = os.path.join(out, 'work', kind, f'seed{seed}')
  start = time.time()
  state = train_loop.train(config, workdir)
  steps_per_epoch = study.train_size(DATASET) // study.BATCH_SIZE
  if int(state.step) < epochs * steps_per_epoch:
    sys.exit(f'Stopped at step {int(state.step)} (SIGTERM?): no record; a rerun resumes it.')
  record = {
    'dtype': dtype,
    'variant': variant,
    'seed': seed,
    'epochs': epochs,
    'steps_per_epoch': steps_per_epoch,
    'curves': study.read_curves(workdir),
    'seconds': time.time() - start,
  }
  path = record_path(out, kind, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def run_all(
  out: str, epochs: int, monitor_every: int, workers: int, seeds: range, variant: str = ''
) -> None:
  """Every missing (dtype, seed) of `seeds` (with `variant`: its bfloat16 runs alone),
  `workers` at a time, each worker on its own core; the slower bfloat16 runs first, so that
  the two cores finish together."""
  kinds = [f'bfloat16+{variant}'] if variant else list(reversed(DTYPES))
  jobs: queue.Queue = queue.Queue()
  for seed in seeds:
    for kind in kinds:
      if not os.path.exists(record_path(out, kind, seed)):
        jobs.put((kind, seed))

  def worker(core: int) -> None:
    while True:
      try:
        kind, seed = jobs.get_nowait()
      except queue.Empty:
        return
      log = os.path.join(out, 'logs', f'{kind}_seed{seed}.log')
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
          json.dumps([kind, seed]),
        ],
        log,
        core,
      )
      print(
        f'{"done" if code == 0 else f"FAILED ({code}), see " + log}: {kind} seed {seed}',
        flush=True,
      )

  study.on_cores(worker, workers)


# --- Report ------------------------------------------------------------------------------


def kind_order(kind: str) -> tuple:
  """float32, bfloat16, then the variants by name."""
  return (DTYPES.index(kind) if kind in DTYPES else len(DTYPES), kind)


def load_records(out: str) -> dict[tuple[str, int], dict]:
  """{(kind, seed): record} of every finished run under out, kind by kind, seed by seed."""
  found = []
  for path in glob.glob(record_path(out, '*', '*')):
    if match := re.fullmatch(r'seed(\d+)\.json', os.path.basename(path)):
      found.append((os.path.basename(os.path.dirname(path)), int(match[1]), path))
  records = {}
  for kind, seed, path in sorted(found, key=lambda f: (kind_order(f[0]), f[1])):
    with open(path) as f:
      records[kind, seed] = json.load(f)
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
  """Markdown: per kind and seed, the loss and 20-NN curves at the first, every tenth and
  last monitored epoch, the final 1-NN, purity_others and wall time; then bfloat16 (and each
  variant) minus float32 seed by seed."""
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
  for kind, seed in records:
    if kind != 'float32' and ('float32', seed) in records:
      bf16, f32 = records[kind, seed], records['float32', seed]
      diff = functools.partial(_difference, bf16, f32)
      label = 'bf16' if kind == 'bfloat16' else kind.replace('bfloat16', 'bf16')
      lines.append(
        _row(
          [f'{label} - f32', seed]
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
  """Mean, standard deviation (over seeds, n - 1) and range of the final loss and kNN
  accuracies, per kind."""
  lines = []
  for kind in sorted({k for k, _ in records}, key=kind_order):
    runs = [r for (k, _), r in records.items() if k == kind]
    last = lambda r, tag: at_epochs(r, tag)[r['epochs']]
    parts = []
    for name, tag, scale, digits in (
      ('final loss', 'loss', 1, 4),
      ('1-NN', 'monitor/knn_k1', 100, 1),
      ('20-NN', 'monitor/knn_k20', 100, 1),
    ):
      values = scale * np.array([last(r, tag) for r in runs])
      spread = f'sd {values.std(ddof=1):.{digits}f}, ' if len(values) > 1 else ''
      parts.append(
        f'{name} {values.mean():.{digits}f} ({spread}range {values.min():.{digits}f}-'
        f'{values.max():.{digits}f})'
      )
    lines.append(f'- {kind} ({len(runs)} seeds): ' + '; '.join(parts) + '.')
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
  parser.add_argument(
    '--seeds',
    type=parse_seeds,
    default=range(len(study.SEEDS)),
    help='N: seeds 0 to N - 1 (default 3); A:B: seeds A to B - 1',
  )
  parser.add_argument(
    '--variant',
    choices=sorted(VARIANTS),
    default='',
    help='only bfloat16 runs, with this part in float32: '
    + '; '.join(f'{name}: {what}' for name, what in VARIANTS.items()),
  )
  args = parser.parse_args()
  if args.run:
    kind, seed = study.worker_job(args.run)
    run_one(kind, seed, args.out, args.epochs, args.monitor_every)
    return
  if not args.report:
    run_all(args.out, args.epochs, args.monitor_every, args.workers, args.seeds, args.variant)
  report(args.out)


if __name__ == '__main__':
  main()
