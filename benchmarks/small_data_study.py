"""Does MSF's mean shift (k > 1) learn on small data, and with which settings?

  .venv/bin/python benchmarks/small_data_study.py            # run what is missing, report
  .venv/bin/python benchmarks/small_data_study.py --report   # tables and plots only

Two real-image data sets that need no download: scikit-learn's digits (1,437 train, 360 test)
and `textures`, 48 px grey patches of ten photographs that scikit-image ships, written as an
image folder (150 train and 40 test patches a photograph; train patches come from the top
three quarters of each photograph and test patches from the bottom quarter, so no test pixel
was ever seen in training). Every run is the demo's recipe (configs/demo.py: ResNet-18 of
width 8, 24 px, batch 32, 40 epochs) with one factor changed from the base setting (k = 5,
lr 0.3 x batch/256, a bank of about one train set, target momentum 0.99, no k ramp), over
three seeds (two for the variations on textures); then the best level of each factor
combined (best: the highest 20-NN accuracy of the worst seed), three seeds. Each run trains with the training
program itself (`msf_jax.train_loop`, kNN monitor every 5 epochs), then evaluates the online
backbone with the evaluation program (kNN and the linear probe on cached features).

Resumable: each run writes OUT/runs/<dataset>/<setting>/seed<S>.json when it is done and is
skipped when that file exists; an interrupted run resumes from its last checkpoint. Runs go
two at a time, each process pinned to its own core (1.8x the throughput of one process on
two cores, measured). The report writes OUT/study.md (tables) and the learning curves as
benchmarks/small_data_study_<dataset>.png.
"""

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
# Seeds of the one-factor variations: all three on digits (the demo's data); two on textures
# to fit the study in about two hours (its base and its combination still get three).
VARIATION_SEEDS = {'digits': SEEDS, 'textures': SEEDS[:2]}
MONITOR_EVERY_EPOCHS = 5
BATCH_SIZE = 32  # the demo's

# scikit-image's bundled photographs: one class each, converted to grey so that colour alone
# does not name the class.
TEXTURE_PHOTOS = (
  'astronaut',
  'brick',
  'camera',
  'chelsea',
  'coffee',
  'coins',
  'grass',
  'gravel',
  'moon',
  'rocket',
)
PATCH_SIZE = 48
TRAIN_PATCHES, TEST_PATCHES = 150, 40
TRAIN_FRACTION = 0.75  # rows of each photograph that train patches may come from


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of the study: MSF's four knobs and the k ramp; bank_size is relative to the
  train set (rounded to whole batches)."""

  topk: int = 5
  base_lr: float = 0.3
  bank_size: float = 1.0
  ema_momentum: float = 0.99
  topk_ramp_epochs: int = 0

  @property
  def name(self) -> str:
    return (
      f'k{self.topk}_lr{self.base_lr:g}_bank{self.bank_size:g}x_m{self.ema_momentum:g}'
      f'_ramp{self.topk_ramp_epochs}'
    )


BASE = Setting()
FACTORS = {  # the levels tried for each knob; the base's level is among them
  'topk': (1, 2, 5, 10),
  'base_lr': (0.1, 0.3, 1.0),
  'bank_size': (0.33, 1.0, 2.0),
  'ema_momentum': (0.99, 0.996),
  'topk_ramp_epochs': (0, 10),
}


# The factors varied on each data set: all on digits; on textures the two with the clearest
# effect on digits (bank size, target momentum and the k ramp stay at the base's levels).
VARIED = {'digits': tuple(FACTORS), 'textures': ('topk', 'base_lr')}


def one_factor_settings(factors=tuple(FACTORS)) -> list[Setting]:
  """The base, then every other level of one factor at a time."""
  settings = [BASE]
  for factor in factors:
    settings += [
      dataclasses.replace(BASE, **{factor: level})
      for level in FACTORS[factor]
      if level != getattr(BASE, factor)
    ]
  return settings


# --- Data --------------------------------------------------------------------------------


def texture_patches(
  photo: np.ndarray, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Random PATCH_SIZE squares of a grey photograph: train ones wholly inside its top
  TRAIN_FRACTION of rows, test ones wholly below, so that the two never share a pixel."""
  height, width = photo.shape
  boundary = int(height * TRAIN_FRACTION)

  def patches(top_min, top_max, count):
    tops = rng.integers(top_min, top_max + 1, count)
    lefts = rng.integers(0, width - PATCH_SIZE + 1, count)
    return [
      photo[top : top + PATCH_SIZE, left : left + PATCH_SIZE]
      for top, left in zip(tops, lefts, strict=True)
    ]

  return (
    patches(0, boundary - PATCH_SIZE, TRAIN_PATCHES),
    patches(boundary, height - PATCH_SIZE, TEST_PATCHES),
  )


def write_textures(root: str) -> str:
  """The textures image folder at root/{train,test}/<photo>/<i>.png (once; seed 0)."""
  import skimage.color
  import skimage.data
  from PIL import Image

  if os.path.isdir(os.path.join(root, 'test')):
    return root
  rng = np.random.default_rng(0)
  partial = root + '.partial'
  for name in TEXTURE_PHOTOS:
    photo = getattr(skimage.data, name)()
    if photo.ndim == 3:
      photo = skimage.color.rgb2gray(photo[..., :3])
    photo = np.asarray(photo, np.float64)
    photo = np.round(255 * photo / photo.max()).astype(np.uint8) if photo.max() <= 1 else photo
    patches = texture_patches(photo.astype(np.uint8), rng)
    for split, split_patches in zip(('train', 'test'), patches, strict=True):
      os.makedirs(os.path.join(partial, split, name), exist_ok=True)
      for i, patch in enumerate(split_patches):
        Image.fromarray(patch).convert('RGB').save(
          os.path.join(partial, split, name, f'{i:04d}.png')
        )
  os.rename(partial, root)
  return root


def data_config(config, dataset: str, out: str) -> None:
  """Points a demo config (training or evaluation) at a study data set."""
  if dataset == 'textures':
    config.data.source = 'folder'
    config.data.root = write_textures(os.path.join(out, 'textures'))


def train_size(dataset: str) -> int:
  from msf_jax.data.sources import DIGITS_TRAIN_EXAMPLES

  return {'digits': DIGITS_TRAIN_EXAMPLES, 'textures': TRAIN_PATCHES * len(TEXTURE_PHOTOS)}[dataset]


# --- One run (in its own process) ----------------------------------------------------------


def run_config(dataset: str, setting: Setting, seed: int, out: str, epochs: int):
  from msf_jax.config_utils import load_config

  config = load_config(os.path.join(REPO, 'configs', 'demo.py'))
  config.mode = 'train'
  config.num_epochs = epochs
  config.seed = seed
  data_config(config, dataset, out)
  config.msf.topk = setting.topk
  config.optim.base_lr = setting.base_lr
  batches = max(round(setting.bank_size * train_size(dataset) / BATCH_SIZE), 1)
  config.msf.bank_size = batches * BATCH_SIZE
  config.msf.ema_momentum = setting.ema_momentum
  config.msf.topk_ramp_epochs = setting.topk_ramp_epochs
  config.monitor.knn_every_epochs = MONITOR_EVERY_EPOCHS
  config.monitor.ks = (1, 20)
  config.monitor.num_train = train_size(dataset)
  config.monitor.num_queries = 10_000  # the whole test split
  config.checkpoint.keep = 1
  return config


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar the training program wrote to TensorBoard in `workdir`, as (step, value);
  its text (the config) and images are left out."""
  import tensorflow as tf

  curves: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor) if value.HasField('tensor') else None
        if array is not None and array.size == 1 and array.dtype.kind in 'fiu':
          curves.setdefault(value.tag, []).append((int(event.step), float(array)))
  return {tag: sorted(dict(points).items()) for tag, points in curves.items()}


def run_one(dataset: str, setting: Setting, seed: int, out: str, epochs: int) -> None:
  """Trains and evaluates one (dataset, setting, seed); writes its JSON record last."""
  from msf_jax import train_loop
  from msf_jax.evaluate import run as evaluation

  record_path = os.path.join(out, 'runs', dataset, setting.name, f'seed{seed}.json')
  workdir = os.path.join(out, 'work', dataset, setting.name, f'seed{seed}')
  config = run_config(dataset, setting, seed, out, epochs)
  start = time.time()
  state = train_loop.train(config, workdir)
  if int(state.step) < config.num_epochs * (train_size(dataset) // BATCH_SIZE):
    sys.exit(f'Stopped at step {int(state.step)} (SIGTERM?): no record; a rerun resumes it.')
  eval_config = config.evaluation.copy_and_resolve_references()
  data_config(eval_config, dataset, out)
  eval_config.checkpoint = workdir
  results = evaluation.evaluate(eval_config, os.path.join(workdir, 'eval'))
  record = {
    'dataset': dataset,
    'setting': dataclasses.asdict(setting),
    'seed': seed,
    'bank_rows': config.msf.bank_size,
    'results': results,
    'curves': read_curves(workdir),
    'steps_per_epoch': train_size(dataset) // BATCH_SIZE,
    'seconds': time.time() - start,
  }
  os.makedirs(os.path.dirname(record_path), exist_ok=True)
  with open(record_path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(record_path + '.tmp', record_path)


def baselines(dataset: str, out: str) -> dict[str, dict[str, float]]:
  """The random encoder (seeds 0-2, the evaluation program on a random init) and raw pixels
  (the centre-crop views themselves as features), evaluated like every trained encoder."""
  from msf_jax.config_utils import load_config
  from msf_jax.data import color, pipeline, sources
  from msf_jax.evaluate import run as evaluation
  from msf_jax.evaluate.knn import knn_accuracies
  from msf_jax.evaluate.linear_probe import linear_probe_on_features

  path = os.path.join(out, 'runs', dataset, 'baselines.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = load_config(os.path.join(REPO, 'configs', 'demo.py')).evaluation
  data_config(config, dataset, out)
  found = {}
  for seed in SEEDS:
    config.checkpoint, config.checkpoint_format, config.seed = '', 'random', seed
    found[f'random/seed{seed}'] = evaluation.evaluate(
      config, os.path.join(out, 'work', dataset, f'random_seed{seed}')
    )

  def pixels(split_name):
    split = sources.build_split(config.data, split_name, config.image_size)
    dataset_, _ = pipeline.eval_batches(
      split, global_batch=256, image_size=config.image_size, process_index=0, process_count=1
    )
    batches = list(dataset_.as_numpy_iterator())
    mask = np.concatenate([b['mask'] for b in batches])
    # The normalized pixels the encoder sees (the views cross as uint8).
    images = np.concatenate(
      [np.asarray(color.normalize(b['image'])).reshape(len(b['image']), -1) for b in batches]
    )
    return images[mask], np.concatenate([b['label'] for b in batches])[mask], split.num_classes

  train_x, train_y, num_classes = pixels('train')
  test_x, test_y, _ = pixels('test')
  raw = knn_accuracies(train_x, train_y, test_x, test_y, num_classes, ks=(1, 20))
  probe = linear_probe_on_features(train_x, train_y, test_x, test_y, num_classes)
  raw.update({f'linear_fast/{k}': v for k, v in probe.items()})
  found['raw_pixels'] = raw
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(found, f)
  return found


# --- Orchestration ---------------------------------------------------------------------


def load_records(out: str, dataset: str) -> dict[str, list[dict]]:
  """{setting name: [run records]} of a data set."""
  records: dict[str, list[dict]] = {}
  for path in sorted(glob.glob(os.path.join(out, 'runs', dataset, '*', 'seed*.json'))):
    with open(path) as f:
      record = json.load(f)
    records.setdefault(Setting(**record['setting']).name, []).append(record)
  return records


def score(records: list[dict]) -> float:
  """What 'best' means: the worst seed's 20-NN accuracy (majority vote); robust first."""
  return min(r['results']['knn/majority/k=20'] for r in records)


def combined_setting(out: str, dataset: str) -> Setting:
  """Every factor at its best-scoring level (a tie keeps the base's level)."""
  records = load_records(out, dataset)
  best = {}
  for factor in VARIED[dataset]:
    levels = FACTORS[factor]
    names = {level: dataclasses.replace(BASE, **{factor: level}).name for level in levels}
    scored = [
      (score(records[names[level]]), level == getattr(BASE, factor), level)
      for level in levels
      if names[level] in records
    ]  # a failed run is left out
    best[factor] = max(scored)[2]  # a tie goes to the base's level
  return Setting(**best)


def _has_record(out: str, job: tuple[str, Setting, int]) -> bool:
  dataset, setting, seed = job
  return os.path.exists(os.path.join(out, 'runs', dataset, setting.name, f'seed{seed}.json'))


def run_pinned(script: str, arguments: list[str], log: str, core: int) -> int:
  """`python script arguments` in its own process pinned to `core` (one run a core is
  faster than two sharing both), its output in `log`; returns its exit code."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  command = ['taskset', '-c', str(core), sys.executable, script, *arguments]
  with open(log, 'w') as f:
    return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode


def _run_job(job: tuple[str, Setting, int], out: str, epochs: int, core: int) -> None:
  """One job in its own process pinned to `core`, its output in OUT/logs."""
  dataset, setting, seed = job
  log = os.path.join(out, 'logs', dataset, f'{setting.name}_seed{seed}.log')
  code = run_pinned(
    __file__,
    [
      '--out',
      out,
      '--epochs',
      str(epochs),
      '--run',
      json.dumps([dataset, dataclasses.asdict(setting), seed]),
    ],
    log,
    core,
  )
  print(
    f'{"done" if code == 0 else f"FAILED ({code}), see " + log}: {dataset} '
    f'{setting.name} seed {seed}',
    flush=True,
  )


def run_study(datasets: list[str], out: str, workers: int, epochs: int) -> None:
  """Every one-factor run, then each data set's combination of the best levels as soon as
  that data set's one-factor runs are done (before other data sets' remaining runs), with
  `workers` processes at a time, each pinned to one core."""
  pending = [
    (d, s, seed)
    for d in datasets
    for s in one_factor_settings(VARIED[d])
    for seed in (SEEDS if s == BASE else VARIATION_SEEDS[d])
  ]
  combined: set[str] = set()
  running: set[tuple[str, Setting, int]] = set()
  lock = threading.Lock()

  def next_job():
    with lock:
      pending[:] = [job for job in pending if not _has_record(out, job)]
      for dataset in datasets:
        if dataset not in combined and not any(
          job[0] == dataset for job in pending + list(running)
        ):
          combined.add(dataset)
          best = combined_setting(out, dataset)
          pending[:0] = [
            job for job in ((dataset, best, seed) for seed in SEEDS) if not _has_record(out, job)
          ]
      if not pending:
        return None if not running else 'wait'
      job = pending.pop(0)
      running.add(job)
      return job

  def worker(core: int) -> None:
    while (job := next_job()) is not None:
      if job == 'wait':  # a combination waits for its data set's last runs
        time.sleep(0.5)
        continue
      try:
        _run_job(job, out, epochs, core)
      finally:
        with lock:
          running.discard(job)

  on_cores(worker, workers)


def on_cores(worker: Callable[[int], None], workers: int) -> None:
  """`workers` threads running `worker(core)`, core by core, until all return."""
  threads = [
    threading.Thread(target=worker, args=(i % (os.cpu_count() or 1),)) for i in range(workers)
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()


def study_parser(doc: str, name: str, epochs: int, epochs_help: str) -> argparse.ArgumentParser:
  """The options a resumable study takes: where its records go (runs/`name` by default), how
  many runs at a time, the epochs, --report (no runs) and --run (one job, in a worker
  process)."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument(
    '--out',
    default=os.path.join(REPO, 'runs', name),
    help='records, logs, run directories and the report',
  )
  parser.add_argument('--workers', type=int, default=2, help='runs at a time, one core each')
  parser.add_argument('--epochs', type=int, default=epochs, help=epochs_help)
  parser.add_argument('--report', action='store_true', help='only the report')
  parser.add_argument('--run', help=argparse.SUPPRESS)
  return parser


def worker_job(run: str) -> list:
  """The job a worker process was given (--run); absl logs at INFO from then on, so that the
  training's progress goes into the worker's log."""
  from absl import logging

  logging.set_verbosity(logging.INFO)
  return json.loads(run)


# --- Report ------------------------------------------------------------------------------

METRICS = (
  ('1-NN', 'knn/majority/k=1'),
  ('20-NN', 'knn/majority/k=20'),
  ('linear', 'linear_fast/top1'),
)


def _mean_std_min(values: list[float]) -> str:
  values = 100 * np.asarray(values)
  return f'{values.mean():.1f} ± {values.std():.1f} ({values.min():.1f})'


def _label(setting: Setting) -> str:
  changed = [
    f'{f}={getattr(setting, f):g}' for f in FACTORS if getattr(setting, f) != getattr(BASE, f)
  ]
  prefix = 'combination: ' if len(changed) > 1 else ''
  return prefix + ', '.join(changed) if changed else 'base (k=5, lr 0.3, bank 1x, m 0.99)'


def table(out: str, dataset: str) -> str:
  """Markdown: baselines, then every setting's mean ± std (worst seed) over its seeds."""
  base = baselines(dataset, out)
  randoms = [base[f'random/seed{s}'] for s in SEEDS]
  random_mean = {key: np.mean([r[key] for r in randoms]) for _, key in METRICS}
  lines = [
    '| setting | seeds | 1-NN | 20-NN | linear | worst seed minus random, 1-NN / 20-NN | '
    'final purity_others |',
    '|---|---|---|---|---|---|---|',
  ]
  lines.append(
    '| random encoder | 3 | '
    + ' | '.join(_mean_std_min([r[key] for r in randoms]) for _, key in METRICS)
    + ' | | |'
  )
  lines.append(
    '| raw pixels | - | '
    + ' | '.join(f'{100 * base["raw_pixels"][key]:.1f}' for _, key in METRICS)
    + ' | | |'
  )
  records_by_name = load_records(out, dataset)
  order = {s.name: i for i, s in enumerate(one_factor_settings(VARIED[dataset]))}
  for name in sorted(records_by_name, key=lambda name: order.get(name, len(order))):
    records = records_by_name[name]
    setting = Setting(**records[0]['setting'])
    margins = [
      min(100 * (r['results'][key] - random_mean[key]) for r in records)
      for key in ('knn/majority/k=1', 'knn/majority/k=20')
    ]
    purity = np.mean([r['curves']['purity_others'][-1][1] for r in records])
    lines.append(
      f'| {_label(setting)} | {len(records)} | '
      + ' | '.join(_mean_std_min([r['results'][key] for r in records]) for _, key in METRICS)
      + f' | {margins[0]:+.1f} / {margins[1]:+.1f} | {purity:.2f} |'
    )
  return '\n'.join(lines)


def plot(out: str, dataset: str, figures: str) -> str:
  """One row per factor: the 20-NN monitor and purity_others over epochs, mean over seeds
  (lines) and the seeds' range (band), the base in black."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  records = load_records(out, dataset)
  random_k20 = np.mean(
    [baselines(dataset, out)[f'random/seed{s}']['knn/majority/k=20'] for s in SEEDS]
  )
  panels = (
    ('monitor/knn_k20', '20-NN accuracy (test, kNN monitor)'),
    ('purity_others', 'purity of the other neighbours'),
  )
  factors = VARIED[dataset]
  figure, axes = plt.subplots(len(factors), 2, figsize=(11, 3.1 * len(factors)), squeeze=False)
  for row, factor in enumerate(factors):
    levels = FACTORS[factor]
    for column, (tag, title) in enumerate(panels):
      axis = axes[row, column]
      for level in levels:
        runs = records.get(dataclasses.replace(BASE, **{factor: level}).name, [])
        if not runs:
          continue
        per_epoch = runs[0]['steps_per_epoch']
        # Steps every run logged (a resumed run also logged the step it was stopped at).
        curves = [dict(r['curves'][tag]) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[step] for step in steps] for c in curves])
        epochs = np.asarray(steps) / per_epoch
        is_base = level == getattr(BASE, factor)
        (line,) = axis.plot(
          epochs,
          values.mean(0),
          color='black' if is_base else None,
          label=f'{factor}={level:g}' + (' (base)' if is_base else ''),
        )
        axis.fill_between(epochs, values.min(0), values.max(0), alpha=0.15, color=line.get_color())
      if tag == 'monitor/knn_k20':
        axis.axhline(random_k20, color='grey', linestyle='--', label='random encoder')
      axis.set_title(f'{dataset}: {title}', fontsize=9)
      axis.set_xlabel('epoch', fontsize=8)
      axis.legend(fontsize=7)
  figure.tight_layout()
  path = os.path.join(figures, f'small_data_study_{dataset}.png')
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return path


def report(out: str, datasets: list[str], figures: str) -> None:
  sections = []
  for dataset in datasets:
    sections.append(
      f'### {dataset}\n\n{table(out, dataset)}\n\n'
      f'![{dataset}]({os.path.basename(plot(out, dataset, figures))})\n'
    )
  with open(os.path.join(out, 'study.md'), 'w') as f:
    f.write('\n'.join(sections))
  print('\n'.join(sections))


def main() -> None:
  parser = study_parser(__doc__, 'small_data_study', 40, "the demo's 40; fewer for a quick look")
  parser.add_argument('--datasets', nargs='+', default=['digits', 'textures'])
  parser.add_argument(
    '--figures',
    default=os.path.dirname(os.path.abspath(__file__)),
    help='where the learning-curve PNGs go (next to RESULTS.md)',
  )
  args = parser.parse_args()
  if args.run:
    dataset, setting, seed = worker_job(args.run)
    run_one(dataset, Setting(**setting), seed, args.out, args.epochs)
    return
  if not args.report:
    for dataset in args.datasets:
      if dataset == 'textures':
        write_textures(os.path.join(args.out, 'textures'))
    run_study(args.datasets, args.out, args.workers, args.epochs)
    for dataset in args.datasets:
      baselines(dataset, args.out)
  report(args.out, args.datasets, args.figures)


if __name__ == '__main__':
  main()
