"""The mean-shift loss (forward + backward) of msf_jax against the official formulation.

Official: d_t = 2 - 2 u B^T and d_q = 2 - 2 v B^T (two B x K matrices), top-k of d_t, gather
d_q; its backward builds a third B x K product. msf_jax: one B x K product for the search
(optionally chunked), then the online term on the B x k gathered rows.
Each variant runs in its own process so that its peak RSS is its own.

  python benchmarks/loss_benchmark.py --sizes 128000 1024000 --runs 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

VARIANTS = ('official', 'msf_jax', 'msf_jax_chunked')


def resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRss:
  """Samples this process's resident memory every millisecond; `peak` is the largest seen."""

  def __enter__(self):
    self.peak, self._running = resident_bytes(), True
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while self._running:
      self.peak = max(self.peak, resident_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._running = False
    self._thread.join()


def run_variant(
  variant: str, batch: int, dim: int, size: int, k: int, chunk: int, runs: int
) -> dict:
  import jax
  import jax.numpy as jnp

  from msf_jax import mean_shift

  keys = jax.random.split(jax.random.key(0), 3)
  unit = lambda key, n: mean_shift.l2_normalize(jax.random.normal(key, (n, dim)))
  targets, predictions, bank = unit(keys[0], batch), unit(keys[1], batch), unit(keys[2], size)

  def official(v, u, bank):
    d_t = 2 - 2 * u @ bank.T
    d_q = 2 - 2 * v @ bank.T
    _, idx = jax.lax.top_k(-d_t, k)
    return jnp.mean(jnp.take_along_axis(d_q, idx, axis=1))

  def ours(v, u, bank, chunk_size=None):
    idx = mean_shift.nearest_neighbors(u, bank, k, chunk_size)
    return mean_shift.mean_shift_loss(v, bank[idx])

  fn = {
    'official': official,
    'msf_jax': ours,
    'msf_jax_chunked': lambda v, u, b: ours(v, u, b, chunk),
  }[variant]
  step = jax.jit(jax.value_and_grad(fn))
  compiled = step.lower(predictions, targets, bank).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready((targets, predictions, bank))
  rss_before = resident_bytes()  # inputs and compiled program in place
  times = []
  with PeakRss() as rss:
    jax.block_until_ready(compiled(predictions, targets, bank))  # warm-up
    for _ in range(runs):
      start = time.perf_counter()
      loss, _ = jax.block_until_ready(compiled(predictions, targets, bank))
      times.append(time.perf_counter() - start)
  return {
    'variant': variant,
    'bank': size,
    'median_s': statistics.median(times),
    'times_s': times,
    'xla_temp_gib': temp_bytes / 2**30,
    'peak_rss_over_inputs_gib': (rss.peak - rss_before) / 2**30,
    'loss': float(loss),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--sizes', type=int, nargs='+', default=[128_000, 1_024_000])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--k', type=int, default=5)
  parser.add_argument('--chunk', type=int, default=128_000)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--variant', choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.variant:  # Child process: one variant, one size.
    print(
      json.dumps(
        run_variant(
          args.variant,
          args.batch,
          args.dim,
          args.size,
          args.k,
          min(args.chunk, args.size),
          args.runs,
        )
      )
    )
    return
  rows = []
  for size in args.sizes:
    for variant in VARIANTS:
      out = subprocess.run(
        [
          sys.executable,
          __file__,
          '--variant',
          variant,
          '--size',
          str(size),
          '--batch',
          str(args.batch),
          '--dim',
          str(args.dim),
          '--k',
          str(args.k),
          '--chunk',
          str(args.chunk),
          '--runs',
          str(args.runs),
        ],
        capture_output=True,
        text=True,
        check=True,
      )
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]), flush=True)
  print(
    '\n| bank K | variant | median s | speed-up | peak temp memory GiB (XLA) | memory ratio | RSS growth GiB | loss |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for row in rows:
    base = next(r for r in rows if r['bank'] == row['bank'] and r['variant'] == 'official')
    print(
      f'| {row["bank"]:,} | {row["variant"]} | {row["median_s"]:.2f} | '
      f'{base["median_s"] / row["median_s"]:.2f}x | {row["xla_temp_gib"]:.2f} | '
      f'{row["xla_temp_gib"] / base["xla_temp_gib"]:.2f} | '
      f'{row["peak_rss_over_inputs_gib"]:.2f} | '
      f'{row["loss"]:.6f} |'
    )


if __name__ == '__main__':
  main()
