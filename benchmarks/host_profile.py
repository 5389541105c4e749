"""Where one host core's time goes in the two-view stage, and its rate before and after a
change, side by side in one command.

The profile builds `augment.two_views` up one part at a time, each a tf.data map on one
thread over the same ImageNet-sized JPEGs (`input_benchmark.make_photos`: about 500x375,
quality 90, from scikit-learn's photos): decoding, then the two crop windows' scalar ops,
the two antialiased resizes (crop, resize, round to uint8), the flips, the colour
parameters, then batching (64). Each part's share is the time it adds. All parts are timed
in turns in one process pinned to one core, several rounds, medians.

With `--repo`, `augment.two_views` of each checkout (this one first) is timed in turns, each
run a fresh process pinned to the same core, and the rates' medians and paired ratios are
printed:

  python benchmarks/host_profile.py --samples 300 --runs 5
  python benchmarks/host_profile.py --repo /path/to/old/checkout --samples 300 --runs 9

`--crops pil tensorflow` times this checkout's two_views with each of its crops in turns, as
`--repo` times checkouts. `--profile` with `--repo` profiles each checkout's `augment.two_views` with this script, the
rounds in turns. `--cores 0,1` pins each process to those cores and runs the map on as many
threads (`num_parallel_calls`), for how the stage scales over cores. `--clock cpu` times by the pinned process's CPU time instead of the wall
clock: on a machine shared with other work, the time the stage took on its core rather than
the time it also waited for the core.
"""

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64


def _stages(size: int) -> dict:
  """Cumulative map functions (encoded, seed) -> tensors: each adds one part of two_views
  to the one before, drawing its seeds as two_views does. Every stage returns what it made,
  so that none of it is pruned. Where the views' windows are drawn and their crops made in
  one Python call (`augment.random_views`), that call is one part."""
  import tensorflow as tf

  from msf_jax.data import augment

  def split(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))

  def view_seeds(seed):
    """(crop seed, flip seed) of each view, as the w/s views split theirs."""
    target_seed, online_seed = split(seed, 2)
    online_crop_seed, _ = split(online_seed, 2)
    return [split(target_seed, 2), split(online_crop_seed, 2)]

  def windows(encoded, seed):
    image = augment.decode(encoded)
    shape = tf.shape(image)
    return image, [augment.crop_window(crop, shape[0], shape[1]) for crop, _ in view_seeds(seed)]

  def resized(encoded, seed):
    image, boxes = windows(encoded, seed)
    return [
      augment.resize(image[top : top + h, left : left + w], [size, size])
      for top, left, h, w in map(tf.unstack, boxes)
    ]

  def flipped(encoded, seed):
    return [
      augment.flip(view, flip)
      for view, (_, flip) in zip(resized(encoded, seed), view_seeds(seed), strict=True)
    ]

  def params(encoded, seed):
    _, online_seed = split(seed, 2)
    return flipped(encoded, seed), augment.strong_color_params(split(online_seed, 2)[1])

  def two_views(encoded, seed):
    return augment.two_views(encoded, seed, size)

  def pil_views(encoded, seed):
    crop_seed, _, online_seed = split(seed, 3)
    return augment.random_views(augment.decode(encoded), crop_seed, size), online_seed

  def pil_params(encoded, seed):
    views, online_seed = pil_views(encoded, seed)
    return views, augment.strong_color_params(online_seed)

  if hasattr(augment, 'random_views'):  # the windows, flips and PIL's crops in one call
    return {
      'tf.data, reading the cached bytes': lambda encoded, seed: (encoded, seed),
      'decoding (full decode_jpeg)': lambda encoded, seed: augment.decode(encoded),
      "uniforms drawn; windows, flips, PIL's crops, resizes, flips (2, one Python call)": (
        pil_views
      ),
      'colour parameters': pil_params,
      'augment.two_views itself': two_views,
      f'batching ({BATCH})': two_views,
    }
  return {
    'tf.data, reading the cached bytes': lambda encoded, seed: (encoded, seed),
    'decoding (full decode_jpeg)': lambda encoded, seed: augment.decode(encoded),
    'crop windows (2, scalar ops)': windows,
    'crop + antialiased resize to uint8 (2)': resized,
    'flips (2)': flipped,
    'colour parameters': params,
    'augment.two_views itself': two_views,
    f'batching ({BATCH})': two_views,
  }


def _dataset(encoded: list[bytes], fn, batch: int):
  import tensorflow as tf

  files = tf.data.Dataset.from_tensor_slices(encoded).repeat()
  seeds = tf.data.Dataset.range(10**9).map(lambda i: tf.stack([i, 0]))
  threads = int(os.environ.get('HOST_PROFILE_THREADS', '1'))
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_fusion = False  # nothing of fn may be pruned
  dataset = tf.data.Dataset.zip(files, seeds).map(
    fn, num_parallel_calls=threads if threads > 1 else None
  )
  return (dataset.batch(batch) if batch > 1 else dataset).with_options(options)


CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


def _rate(dataset, samples: int, batch: int) -> float:
  """Samples a second through `dataset`, consumed inside TensorFlow (no Python step per
  sample); the second of two calls, the first one traced. Seconds of the clock that
  HOST_PROFILE_CLOCK names: 'wall' (the default) or 'cpu', the CPU time of this process (all
  its threads, on its one core): on a loaded machine, the time the work took on the core
  rather than the time it waited for it."""
  clock = CLOCKS[os.environ.get('HOST_PROFILE_CLOCK', 'wall')]
  import tensorflow as tf

  steps = max(1, samples // batch)
  sink = dataset.map(lambda *x: tf.size(tf.nest.flatten(x)[0]))
  count = tf.function(lambda: sink.take(steps).reduce(0, lambda n, size: n + 1))
  count()
  start = clock()
  count()
  return steps * batch / (clock() - start)


def _read(folder: str) -> list[bytes]:
  return [open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))]


def profile_child(encoded: list[bytes], samples: int, size: int) -> None:
  """One round: every stage's rate in this process, printed as name<TAB>rate."""
  import tensorflow as tf

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  for name, fn in _stages(size).items():
    batch = BATCH if name.startswith('batching') else 1
    print(f'{name}\t{_rate(_dataset(encoded, fn, batch), samples, batch)}')


def rate_child(encoded: list[bytes], samples: int, size: int) -> None:
  import tensorflow as tf

  from msf_jax.data import augment

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  crops = os.environ.get('HOST_PROFILE_CROPS')  # unset: the checkout's own default
  options = {'crops': crops} if crops else {}
  fn = lambda encoded, seed: augment.two_views(encoded, seed, size, **options)
  print(_rate(_dataset(encoded, fn, 1), samples, 1))


def _child(which: str, folder: str, repo: str, args, crops: str = '') -> list[str]:
  from input_benchmark import run_pinned_child

  return run_pinned_child(
    __file__,
    which,
    folder,
    args.samples,
    args.size,
    args.cores or args.core,
    {
      'PYTHONPATH': repo,
      'TF_CPP_MIN_LOG_LEVEL': '2',
      'HOST_PROFILE_CLOCK': args.clock,
      'HOST_PROFILE_THREADS': str(len(args.cores.split(',')) if args.cores else 1),
      'HOST_PROFILE_CROPS': crops,
    },
  )


def print_profile(rounds: list[list[str]]) -> None:
  """Each part's added time is taken within a round (this VM's speed drifts between
  rounds), then the median over rounds."""
  timings = [
    {name: 1e6 / float(rate) for name, rate in (line.split('\t') for line in lines)}
    for lines in rounds
  ]
  names = list(timings[0])
  steps = [(names[0], None)] + [
    (name, before) for before, name in itertools.pairwise(names) if not name.startswith('augment')
  ]
  whole = 'augment.two_views itself'
  total = statistics.median(t[whole] for t in timings)
  print('| part | µs a sample (added; median of rounds) | share of the two-view sample |')
  print('|---|---|---|')
  for name, before in steps:
    added = statistics.median(t[name] - (t[before] if before else 0.0) for t in timings)
    print(f'| {name} | {added:.0f} | {100 * added / total:.1f}% |')
  print(f'| augment.two_views, one sample ({1e6 / total:.1f}/s) | {total:.0f} | 100% |')
  built = statistics.median(t[names[-3]] / t[whole] for t in timings)
  print(f"| the parts built up, as a share of two_views' own time | | {100 * built:.1f}% |")


def print_rates(rates: dict[str, list[float]]) -> None:
  first, *others = rates
  print(f'runs: {rates}')
  print(
    '| stage | two-view samples/s on one core (median) | '
    "the first stage's rate over this one's, paired: median (min-max) |"
  )
  print('|---|---|---|')
  for repo in [first, *others]:
    ratios = [a / b for a, b in zip(rates[first], rates[repo], strict=True)]
    print(
      f'| {repo} | {statistics.median(rates[repo]):.1f} | '
      f'{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |'
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--samples', type=int, default=300)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--core', type=int, default=0)
  parser.add_argument(
    '--cores',
    help='several cores, as 0,1: each process pinned to them, the map on as many threads',
  )
  parser.add_argument(
    '--clock',
    choices=sorted(CLOCKS),
    default='wall',
    help="time by the wall clock or by the pinned process's CPU time (a loaded machine)",
  )
  parser.add_argument(
    '--repo',
    nargs='*',
    default=None,
    help='other checkouts: time two_views of each against this one',
  )
  parser.add_argument(
    '--profile',
    action='store_true',
    help="with --repo: profile each checkout's two_views (rounds in turns) instead of its rate",
  )
  parser.add_argument(
    '--crops',
    nargs='+',
    help="this checkout's two_views with each of these crops (augment.CROPS), timed in turns",
  )
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    which, folder = args.child
    {'profile': profile_child, 'rate': rate_child}[which](_read(folder), args.samples, args.size)
    return
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from input_benchmark import make_photos

  folder = tempfile.mkdtemp()
  make_photos(folder, args.images)
  if args.crops:
    rates = {f'crops={crops}': [] for crops in args.crops}
    for _ in range(args.runs):
      for crops in args.crops:
        rates[f'crops={crops}'].append(float(_child('rate', folder, REPO, args, crops)[-1]))
    print_rates(rates)
    return
  if args.repo is None:
    print_profile([_child('profile', folder, REPO, args) for _ in range(args.runs)])
    return
  if args.profile:
    rounds = {repo: [] for repo in [REPO, *args.repo]}
    for _ in range(args.runs):
      for repo, runs in rounds.items():
        runs.append(_child('profile', folder, repo, args))
    for repo, runs in rounds.items():
      print(f'\n{repo}:')
      print_profile(runs)
    return
  rates = {repo: [] for repo in [REPO, *args.repo]}
  for _ in range(args.runs):
    for repo, runs in rates.items():
      runs.append(float(_child('rate', folder, repo, args)[-1]))
  print_rates(rates)


if __name__ == '__main__':
  main()
