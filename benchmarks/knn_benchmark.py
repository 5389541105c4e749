"""kNN (k = 20, majority vote) of msf_jax against a numpy brute-force baseline, same data.

numpy: normalize both sets, then per chunk of 1,024 queries the full chunk x N similarity,
argpartition for the top k, a vote with random tie-break. msf_jax: `knn_predict`, which also
chunks the train set (running top-k), so its memory does not grow with N.
The data are Gaussian clusters (one centre per class, features = centre + noise), so that
neighbours and votes mean something. Each variant runs in its own process so that its peak
RSS is its own; both write their neighbours and predictions for the comparison.

  python benchmarks/knn_benchmark.py --train 100000 --queries 10000 --dim 2048 --runs 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
from loss_benchmark import PeakRss, resident_bytes

VARIANTS = ('numpy', 'msf_jax')


def make_labels(num: int, num_classes: int) -> np.ndarray:
  return (np.arange(num) % num_classes).astype(np.int32)


def make_features(args) -> tuple[np.ndarray, np.ndarray]:
  """(train [N, D], queries [Q, D]) float32 around the class centres."""
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)

  def around(labels):
    noise = rng.standard_normal((len(labels), args.dim), dtype=np.float32)
    return centres[labels] + np.float32(args.noise) * noise

  return (
    around(make_labels(args.train, args.classes)),
    around(make_labels(args.queries, args.classes)),
  )


def numpy_knn(train, train_labels, queries, k, num_classes, chunk_size, seed=0):
  """Brute force: (predictions [Q], unsorted neighbour indices [Q, k])."""
  rng = np.random.default_rng(seed)
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  predictions, neighbours = [], []
  for start in range(0, len(queries), chunk_size):
    chunk = queries[start : start + chunk_size]
    similarity = (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)) @ train.T
    # The k largest, copied out so that the [chunk, N] index array is freed.
    index = np.argpartition(similarity, -k, axis=1)[:, -k:].copy()
    votes = np.zeros((len(chunk), num_classes))
    np.add.at(votes, (np.arange(len(chunk))[:, None], train_labels[index]), 1.0)
    votes += 0.5 * rng.random(votes.shape)  # random tie-break, less than one vote
    predictions.append(votes.argmax(axis=1))
    neighbours.append(index)
  return np.concatenate(predictions), np.concatenate(neighbours)


def xla_bytes(train, train_labels, queries, k, num_classes, chunk_size, train_chunk_size):
  """(temp bytes, argument bytes) of msf_jax's two compiled programs for one query chunk."""
  import jax
  import jax.numpy as jnp

  from msf_jax.evaluate import knn

  chunk = jax.ShapeDtypeStruct((chunk_size, queries.shape[1]), jnp.float32)
  search = (
    knn._chunk_neighbours.lower(
      chunk, jax.ShapeDtypeStruct(train.shape, jnp.float32), k, train_chunk_size
    )
    .compile()
    .memory_analysis()
  )
  vote = (
    knn._vote.lower(
      jax.ShapeDtypeStruct((chunk_size, k), jnp.float32),
      jax.ShapeDtypeStruct((chunk_size, k), jnp.int32),
      jax.random.key(0),
      num_classes,
      'majority',
      knn.DEFAULT_TEMPERATURE,
    )
    .compile()
    .memory_analysis()
  )
  return (
    max(search.temp_size_in_bytes, vote.temp_size_in_bytes),
    search.argument_size_in_bytes + vote.argument_size_in_bytes,
  )


def run_variant(args, out_dir: str) -> dict:
  train, queries = make_features(args)
  train_labels = make_labels(args.train, args.classes)
  if args.variant == 'numpy':
    run = lambda q: numpy_knn(train, train_labels, q, args.k, args.classes, args.chunk)
  else:
    from msf_jax.evaluate import knn

    def run(q):  # knn_predict's two stages, to keep the neighbours for the comparison
      similarity, index = knn.nearest_neighbours(
        train, q, args.k, chunk_size=args.chunk, train_chunk_size=args.train_chunk
      )
      return knn._votes(
        similarity,
        train_labels[index],
        args.classes,
        'majority',
        knn.DEFAULT_TEMPERATURE,
        0,
        args.chunk,
      ), index

  run(queries[: args.chunk])  # warm-up (compiles msf_jax's programs for these shapes)
  rss_before = resident_bytes()  # data and compiled programs in place
  times = []
  tracemalloc.start()  # sees numpy's buffers, not XLA's; numpy allocates few, large ones
  with PeakRss() as rss:
    for _ in range(args.runs):
      start = time.perf_counter()
      predictions, neighbours = run(queries)
      times.append(time.perf_counter() - start)
  row = {
    'variant': args.variant,
    'median_s': statistics.median(times),
    'times_s': times,
    'peak_rss_over_inputs_gib': (rss.peak - rss_before) / 2**30,
    'traced_peak_gib': tracemalloc.get_traced_memory()[1] / 2**30,
    'load_average': os.getloadavg(),
  }
  tracemalloc.stop()
  if args.variant == 'msf_jax':
    temp, arguments = xla_bytes(
      train, train_labels, queries, args.k, args.classes, args.chunk, args.train_chunk
    )
    row['xla_temp_gib'], row['xla_arguments_gib'] = temp / 2**30, arguments / 2**30
  np.save(os.path.join(out_dir, f'{args.variant}_predictions.npy'), predictions)
  np.save(os.path.join(out_dir, f'{args.variant}_neighbours.npy'), neighbours)
  return row


def compare(out_dir: str, args) -> dict:
  """Agreement of the two variants' neighbour sets and predictions. Where the vote is tied,
  each breaks the tie with its own random numbers: msf_jax's prediction must then be one of
  the labels with the most votes among numpy's neighbours."""
  load = lambda name: np.load(os.path.join(out_dir, name))
  labels = make_labels(args.train, args.classes)
  numpy_neighbours = np.sort(load('numpy_neighbours.npy'), axis=1)
  jax_neighbours = np.sort(load('msf_jax_neighbours.npy'), axis=1)
  votes = np.zeros((args.queries, args.classes))
  np.add.at(votes, (np.arange(args.queries)[:, None], labels[numpy_neighbours]), 1.0)
  jax_predictions, numpy_predictions = (
    load('msf_jax_predictions.npy'),
    load('numpy_predictions.npy'),
  )
  query_labels = make_labels(args.queries, args.classes)
  return {
    'same_neighbour_sets': float(np.mean((numpy_neighbours == jax_neighbours).all(axis=1))),
    'same_predictions': float(np.mean(jax_predictions == numpy_predictions)),
    'msf_jax_prediction_has_most_numpy_votes': float(
      np.mean(votes[np.arange(args.queries), jax_predictions] == votes.max(axis=1))
    ),
    'accuracy_numpy': float(np.mean(numpy_predictions == query_labels)),
    'accuracy_msf_jax': float(np.mean(jax_predictions == query_labels)),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--train', type=int, default=100_000)
  parser.add_argument('--queries', type=int, default=10_000)
  parser.add_argument('--dim', type=int, default=2048)
  parser.add_argument('--classes', type=int, default=1000)
  parser.add_argument(
    '--noise', type=float, default=6.0, help='noise std against centres ~ N(0, 1)'
  )
  parser.add_argument('--k', type=int, default=20)
  parser.add_argument('--chunk', type=int, default=1024, help='queries per chunk (both variants)')
  parser.add_argument('--train-chunk', type=int, default=16384, help='msf_jax train rows per chunk')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--variant', choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument('--out-dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.variant:  # Child process: one variant.
    print(json.dumps(run_variant(args, args.out_dir)))
    return
  with tempfile.TemporaryDirectory() as out_dir:
    rows = {}
    for variant in VARIANTS:  # one after the other, never at the same time
      out = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], '--variant', variant, '--out-dir', out_dir],
        capture_output=True,
        text=True,
      )
      if out.returncode:
        sys.exit(f'{variant} failed:\n{out.stderr[-3000:]}')
      rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
      print(json.dumps(rows[variant]), flush=True)
    agreement = compare(out_dir, args)
  print(json.dumps(agreement))
  base, ours = rows['numpy'], rows['msf_jax']
  print(
    f'\nN = {args.train:,} x {args.dim}, Q = {args.queries:,}, k = {args.k}, {args.runs} runs\n'
  )
  print('| variant | median s | speed-up | peak memory GiB | peak RSS growth GiB |')
  print('|---|---|---|---|---|')
  print(
    f'| numpy brute force | {base["median_s"]:.1f} | 1.00x | '
    f'{base["traced_peak_gib"]:.2f} (tracemalloc) | {base["peak_rss_over_inputs_gib"]:.2f} |'
  )
  print(
    f'| msf_jax knn_predict | {ours["median_s"]:.1f} | '
    f'{base["median_s"] / ours["median_s"]:.2f}x | {ours["xla_temp_gib"]:.3f} temp + '
    f'{ours["xla_arguments_gib"]:.2f} inputs (XLA) | {ours["peak_rss_over_inputs_gib"]:.2f} |'
  )


if __name__ == '__main__':
  main()
