"""How the TFDS source orders a training epoch, and what a resume costs, in each file format:
the order of two consecutive epochs against a fresh permutation's, the time to the first
batch of a run resumed at 90% of an epoch and, for TFRecord, how many records trained on
before that point the resume reads again.

The data set is built here (msf_jax.testing.tfds_data: small random JPEGs, the label of
example i is i, so that batches tell which examples they hold). Run it on another checkout
with `--repo` to compare before and after a change, side by side in one command:

  python benchmarks/tfds_order.py --examples 20000 --files 32 --batch 32 \
      --repo /path/to/old/checkout --windows 10000 156

`--imagenet` orders ImageNet's training split (1,281,167 records in 1,024 TFRecord files) as
record numbers, without images, on one host and on each of 4 and of 16 (`--hosts`): this
checkout's TFRecord order (with each of `--lanes` at most) against the shuffle buffer it
replaced and a fresh permutation.
"""

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _counting_tfrecord_reads(read: list[int]) -> None:
  """Makes every TFRecordDataset append the label of each record it reads to `read`: what a
  resume reads, whether it is trained on or dropped."""
  import tensorflow as tf

  original = tf.data.TFRecordDataset
  label = {'label': tf.io.FixedLenFeature([], tf.int64)}

  def note(record):
    value = tf.io.parse_single_example(record, label)['label']
    return tf.py_function(lambda v: read.append(int(v)) or v, [value], tf.int64), record

  tf.data.TFRecordDataset = lambda *args, **kwargs: (
    original(*args, **kwargs).map(note).map(lambda _, record: record)
  )


def measure(name: str, data_dir: str, batch: int, shuffle_window: int) -> dict:
  """Runs in the checkout on sys.path: two epochs of its training stream (their batches'
  example indices), the time to the first batch from the start and from 90% of an epoch
  (medians of 3), and the records trained on before 90% that the resume reads again."""
  from msf_jax.data import pipeline, sources

  window_arg = next(  # the checkouts before the lanes called their window a shuffle buffer
    (
      a
      for a in ('shuffle_window', 'shuffle_buffer')
      if a in inspect.signature(sources.tfds_split).parameters
    ),
    None,
  )
  kwargs = {} if shuffle_window <= 0 or window_arg is None else {window_arg: shuffle_window}
  split = sources.tfds_split(name, 'train', data_dir=data_dir, **kwargs)
  steps = split.num_examples // batch
  resume_step = int(0.9 * steps)

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
  result = {
    'labels': labels,
    'first_batch_s': seconds_to_first_batch(0),
    'resume_at_90_s': seconds_to_first_batch(resume_step),
  }
  if name.endswith('tfrecord'):
    read = []
    _counting_tfrecord_reads(read)
    next(stream(resume_step))
    trained = {x for batch_labels in labels[:resume_step] for x in batch_labels}
    result['read_again'] = len(trained & set(read))
  return result


def permutation_statistics(num_examples: int, batch: int) -> dict[str, float]:
  from msf_jax.testing.tfds_data import order_statistics

  rng = np.random.default_rng(0)
  steps = num_examples // batch
  epochs = [rng.permutation(num_examples)[: steps * batch].reshape(steps, batch) for _ in range(2)]
  return order_statistics(*epochs)


IMAGENET_TRAIN_RECORDS, IMAGENET_TRAIN_FILES, IMAGENET_BATCH = 1_281_167, 1024, 256


def _buffer_epoch(lengths: list[int], seed, buffer: int = 10_000, cycle: int = 16):
  """The TFRecord order the lanes replaced: the files in a seeded order, 16 of them read one
  record each in turn, through a seeded shuffle buffer of 10,000 records."""
  import tensorflow as tf

  first_record = np.concatenate([[0], np.cumsum(lengths)])
  files = tf.random.experimental.stateless_shuffle(tf.range(len(lengths), dtype=tf.int64), seed)
  buffer_seed = tf.random.stateless_uniform([], seed, 0, 2**31 - 1, dtype=tf.int64)
  return (
    tf.data.Dataset.from_tensor_slices(
      (tf.gather(first_record[:-1], files), tf.gather(np.asarray(lengths, np.int64), files))
    )
    .interleave(lambda first, n: tf.data.Dataset.range(first, first + n), cycle_length=cycle)
    .shuffle(buffer, seed=buffer_seed)
  )


def imagenet_rows(hosts: int, lanes: list[int]) -> list[tuple]:
  """Two epochs of one host's share of ImageNet's TFRecord files, in record numbers, in each
  order (this checkout's with each of `lanes` at most): statistics of the second against the
  first (host batch 256 / hosts), and the records read again to resume at 90% of the epoch."""
  import tensorflow as tf

  from msf_jax.data import sources
  from msf_jax.testing.tfds_data import order_statistics, record_number_files

  per_file = np.diff(np.linspace(0, IMAGENET_TRAIN_RECORDS, IMAGENET_TRAIN_FILES + 1).round())
  lengths = [int(n) for n in per_file[: IMAGENET_TRAIN_FILES // hosts]]
  uncounted = record_number_files(lengths)
  batch, total = IMAGENET_BATCH // hosts, sum(lengths)
  steps = total // batch

  def batches(records):
    order = np.concatenate(list(records.batch(1 << 16).as_numpy_iterator()))
    return order[: steps * batch].reshape(steps, batch)

  def two_epochs(order_of):
    return order_statistics(*(batches(order_of(tf.constant([0, e], tf.int64))) for e in range(2)))

  start, seed = int(0.9 * steps) * batch, tf.constant([0, 0], tf.int64)

  def read_again(most):
    read: list[int] = []
    epoch = lambda start, reader: sources.tfrecord_epoch(lengths, seed, start, reader, most)
    trained = set(batches(epoch(0, uncounted)).ravel()[:start])
    list(epoch(start, record_number_files(lengths, read)).as_numpy_iterator())
    return len(trained & set(read))

  where = f'ImageNet, {hosts} host{"s" * (hosts > 1)}: {total:,} records, batch {batch}'
  rows = [
    (where, 'fresh permutation', permutation_statistics(total, batch), '-'),
    (
      where,
      'shuffle buffer 10,000 (before)',
      two_epochs(lambda s: _buffer_epoch(lengths, s)),
      f'{start:,}',
    ),
  ]
  for most in lanes:
    used = sources.tfrecord_lanes(len(lengths), most)
    order = f'{used} lanes, window {sources.TFRECORD_WINDOW:,} (after)'
    after = two_epochs(lambda s, most=most: sources.tfrecord_epoch(lengths, s, 0, uncounted, most))
    rows.append((where, order, after, f'{read_again(most):,}'))
  return rows


def _statistics_cells(r: dict) -> str:
  return (
    f'{100 * r["met_again"]:.1f}% | {r["moved_mean"]:.3f} | {r["moved_median"]:.3f} | '
    f'{r["moved_p10"]:.3f}'
  )


def print_imagenet_table(hosts: list[int], lanes: list[int]) -> None:
  print(
    '| records | order | met again | moved: mean | median | p10 | read again to resume at 90% |'
  )
  print('|---|---|---|---|---|---|---|')
  for count in hosts:
    for where, order, r, read_again in imagenet_rows(count, lanes):
      print(f'| {where} | {order} | {_statistics_cells(r)} | {read_again} |')


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--examples', type=int, default=20_000)
  parser.add_argument('--files', type=int, default=32)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument(
    '--image_size', type=int, default=8, help='px of the random JPEGs (64: about 10 KB a record)'
  )
  parser.add_argument('--formats', nargs='+', default=['tfrecord', 'array_record'])
  parser.add_argument(
    '--windows',
    type=int,
    nargs='+',
    default=[0],
    help='TFRecord shuffle windows (shuffle buffers before the lanes) to try (0: the default)',
  )
  parser.add_argument(
    '--repo',
    nargs='*',
    default=[],
    help='other checkouts to measure beside this one (e.g. before a change)',
  )
  parser.add_argument('--imagenet', action='store_true', help="ImageNet's order, simulated")
  parser.add_argument('--hosts', type=int, nargs='+', default=[1, 4, 16], help='with --imagenet')
  parser.add_argument(
    '--lanes',
    type=int,
    nargs='+',
    default=[0],
    help="with --imagenet: the most lanes to try (0: the source's TFRECORD_LANES)",
  )
  parser.add_argument(
    '--run', nargs=4, metavar=('NAME', 'DATA_DIR', 'BATCH', 'WINDOW'), help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.run:
    name, data_dir, batch, window = args.run
    print(json.dumps(measure(name, data_dir, int(batch), int(window))))
    return
  if args.imagenet:
    from msf_jax.data import sources

    print_imagenet_table(args.hosts, [most or sources.TFRECORD_LANES for most in args.lanes])
    return
  from msf_jax.testing import tfds_data

  rows = [('fresh permutation', '-', '-', permutation_statistics(args.examples, args.batch))]
  with tempfile.TemporaryDirectory() as data_dir:
    for file_format in args.formats:
      name = tfds_data.build(
        data_dir, args.examples, args.files, file_format, image_size=args.image_size
      )
      windows = args.windows if file_format == 'tfrecord' else [0]
      for checkout in [REPO, *args.repo]:
        for window in windows:
          env = {**os.environ, 'PYTHONPATH': checkout, 'TF_CPP_MIN_LOG_LEVEL': '3'}
          done = subprocess.run(
            [
              sys.executable,
              os.path.abspath(__file__),
              '--run',
              name,
              data_dir,
              str(args.batch),
              str(window),
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
            (os.path.basename(os.path.abspath(checkout)), file_format, window or 'default', result)
          )
  print(
    f'{args.examples} examples of {args.image_size} px in {args.files} files, batch {args.batch}, '
    'two epochs:'
  )
  print(
    '| checkout | format | window | met again | moved: mean | median | p10 '
    '| first batch (s) | resumed at 90% (s) | read again |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for checkout, file_format, window, r in rows:
    if 'error' in r:
      print(f'| {checkout} | {file_format} | {window} | {r["error"]} |')
      continue
    times = (
      f'{r["first_batch_s"]:.2f} | {r["resume_at_90_s"]:.2f}' if 'first_batch_s' in r else '- | -'
    )
    read_again = f'{r["read_again"]:,}' if 'read_again' in r else '-'
    print(
      f'| {checkout} | {file_format} | {window} | {_statistics_cells(r)} | {times} | {read_again} |'
    )


if __name__ == '__main__':
  main()
