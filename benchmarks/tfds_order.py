"""How the TFDS source orders a training epoch, and what a resume costs, in each file format:
the order of two consecutive epochs against a fresh permutation's, and the time to the first
batch of a run resumed at 90% of an epoch.

The data set is built here (msf_jax.testing.tfds_data: small random JPEGs, the label of
example i is i, so that batches tell which examples they hold). Run it on another checkout
with `--repo` to compare before and after a change, side by side in one command:

  python benchmarks/tfds_order.py --examples 20000 --files 32 --batch 32 \
      --repo /path/to/old/checkout --shuffle_buffers 10000 156
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(name: str, data_dir: str, batch: int, shuffle_buffer: int) -> dict:
  """Runs in the checkout on sys.path: two epochs of its training stream (their batches'
  example indices), then the time to the first batch from the start and from 90% of an
  epoch (medians of 3)."""
  from msf_jax.data import pipeline, sources

  kwargs = {} if shuffle_buffer <= 0 else {'shuffle_buffer': shuffle_buffer}
  split = sources.tfds_split(name, 'train', data_dir=data_dir, **kwargs)
  steps = split.num_examples // batch

  def stream(start_step=0):
    return pipeline.train_stream(
      split,
      global_batch=batch,
      image_size=8,
      seed=0,
      start_step=start_step,
      process_index=0,
      process_count=1,
    )

  def seconds_to_first_batch(start_step):
    times = []
    for _ in range(3):
      start = time.perf_counter()
      next(stream(start_step))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  epochs = stream()
  labels = [next(epochs)['label'].tolist() for _ in range(2 * steps)]
  return {
    'labels': labels,
    'first_batch_s': seconds_to_first_batch(0),
    'resume_at_90_s': seconds_to_first_batch(int(0.9 * steps)),
  }


def permutation_statistics(num_examples: int, batch: int) -> dict[str, float]:
  from msf_jax.testing.tfds_data import order_statistics

  rng = np.random.default_rng(0)
  steps = num_examples // batch
  epochs = [rng.permutation(num_examples)[: steps * batch].reshape(steps, batch) for _ in range(2)]
  return order_statistics(*epochs)


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--examples', type=int, default=20_000)
  parser.add_argument('--files', type=int, default=32)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--formats', nargs='+', default=['tfrecord', 'array_record'])
  parser.add_argument(
    '--shuffle_buffers',
    type=int,
    nargs='+',
    default=[0],
    help="TFRecord shuffle buffers to try (0: the source's default)",
  )
  parser.add_argument(
    '--repo',
    nargs='*',
    default=[],
    help='other checkouts to measure beside this one (e.g. before a change)',
  )
  parser.add_argument(
    '--run', nargs=4, metavar=('NAME', 'DATA_DIR', 'BATCH', 'BUFFER'), help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.run:
    name, data_dir, batch, buffer = args.run
    print(json.dumps(measure(name, data_dir, int(batch), int(buffer))))
    return
  from msf_jax.testing import tfds_data

  rows = [('fresh permutation', '-', '-', permutation_statistics(args.examples, args.batch))]
  with tempfile.TemporaryDirectory() as data_dir:
    for file_format in args.formats:
      name = tfds_data.build(data_dir, args.examples, args.files, file_format)
      buffers = args.shuffle_buffers if file_format == 'tfrecord' else [0]
      for checkout in [REPO, *args.repo]:
        for buffer in buffers:
          env = {**os.environ, 'PYTHONPATH': checkout, 'TF_CPP_MIN_LOG_LEVEL': '3'}
          done = subprocess.run(
            [
              sys.executable,
              os.path.abspath(__file__),
              '--run',
              name,
              data_dir,
              str(args.batch),
              str(buffer),
            ],
            env=env,
            capture_output=True,
            text=True,
          )
          if done.returncode:
            result = {'error': done.stderr.strip().splitlines()[-1]}
          else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            labels = np.asarray(result.pop('labels'))
            steps = len(labels) // 2
            result.update(tfds_data.order_statistics(labels[:steps], labels[steps:]))
          rows.append(
            (os.path.basename(os.path.abspath(checkout)), file_format, buffer or 'default', result)
          )
  print(f'{args.examples} examples in {args.files} files, batch {args.batch}, two epochs:')
  print(
    '| checkout | format | shuffle buffer | met again | moved: mean | median | p10 '
    '| first batch (s) | resumed at 90% (s) |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for checkout, file_format, buffer, r in rows:
    if 'error' in r:
      print(f'| {checkout} | {file_format} | {buffer} | {r["error"]} |')
      continue
    times = (
      f'{r["first_batch_s"]:.2f} | {r["resume_at_90_s"]:.2f}' if 'first_batch_s' in r else '- | -'
    )
    print(
      f'| {checkout} | {file_format} | {buffer} | {100 * r["met_again"]:.1f}% | '
      f'{r["moved_mean"]:.3f} | {r["moved_median"]:.3f} | {r["moved_p10"]:.3f} | {times} |'
    )


if __name__ == '__main__':
  main()
