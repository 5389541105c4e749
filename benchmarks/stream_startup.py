"""How long a fresh process takes to build the training stream and draw its first batch, with
the view functions traced as written (msf_jax.data.pipeline's `_as_written`) against the same
functions rewritten by AutoGraph (tf.data's default), in turns, each run a fresh process.

Every start of training, of an evaluation and of a test process pays this once: tf.data
traces the view functions when the stream is built, and AutoGraph, by default, first rewrites
every Python function they call.

  python benchmarks/stream_startup.py --runs 7

The stream is the digits config's (`sources.digits`, 32 px, batch 64, two w/s views); the
numbers are the build (`pipeline.train_stream`) and the first batch, medians over the runs,
and their ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ('as_written', 'autograph')


def measure(mode: str) -> dict:
  """One run in this process: seconds to build the stream and to draw its first batch."""
  from msf_jax.data import pipeline, sources

  if mode == 'autograph':  # tf.data's default: AutoGraph converts what the views call
    pipeline._as_written = lambda views: views
  split = sources.digits('train', 32)
  start = time.perf_counter()
  stream = pipeline.train_stream(split, global_batch=64, image_size=32, seed=0)
  built = time.perf_counter()
  next(stream)
  return {'build_s': built - start, 'first_batch_s': time.perf_counter() - built}


def fresh_process(mode: str) -> dict:
  command = [sys.executable, __file__, '--child', mode]
  out = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--runs', type=int, default=7, help='fresh processes of each mode')
  parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child)))
    return
  runs = {mode: [] for mode in MODES}
  for _ in range(args.runs):  # in turns: a drift in the machine's load reaches both alike
    for mode in MODES:
      runs[mode].append(fresh_process(mode))
  median = {
    mode: {key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]}
    for mode in MODES
  }
  print(f'{args.runs} fresh processes of each, medians (seconds):')
  print('| traced | build the stream | first batch |')
  print('|---|---:|---:|')
  for mode in MODES:
    print(f'| {mode} | {median[mode]["build_s"]:.3f} | {median[mode]["first_batch_s"]:.3f} |')
  ratio = median['autograph']['build_s'] / median['as_written']['build_s']
  print(f'AutoGraph / as written, build: {ratio:.2f}x')


if __name__ == '__main__':
  main()
