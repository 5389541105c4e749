"""The bfloat16 bank search with float32 re-scoring (msf.bank_search_dtype='bfloat16') against
the float32 search: does it find the same neighbours, and the same loss?

Real features: the memory banks of trained checkpoints (the demo and the small-data study
under runs/). Every bank row is the target network's embedding of a training image, written
during training, one batch per block of `--batch_size` rows. Each row is searched as a query
in the bank that holds it, as the train step searches its batch after the enqueue (the block
just before bank.ptr is the last step's queries exactly; the others are earlier steps' targets
in the final bank). The loss is `mean_shift_loss` of each block, with the queries as their own
predictions.

Synthetic (random unit vectors, NOT trained features): a bank of ImageNet's size, 1,024,000 x
512 (`init_bank`), searched for its last 256 rows (one batch) in chunks of 128,000, as
configs/imagenet_msf.py does.

Each cell: the queries whose k neighbours are identical to the float32 search's (same rows,
same order) / the largest |loss difference| of a batch. "float32, other chunks" is the float32
search itself in chunks of a third of the bank: its own last-bit noise, the floor of any
comparison. "bf16 alone" is a bfloat16 search without re-scoring; "c = n" re-scores n
bfloat16 candidates in float32. "c needed": the fewest candidates that hold every query's
float32 top-k, i.e. the largest position of a float32 neighbour in the bfloat16 order (ties
to the lower row), plus one.

  .venv/bin/python benchmarks/bank_search_precision.py [WORKDIR ...] [--synthetic_rows N]
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from msf_jax import checkpoint, mean_shift

WORKDIRS = (
  'runs/demo',
  'runs/demo60_s0',
  'runs/small_data_study/work/digits/k5_lr0.3_bank1x_m0.99_ramp0/seed0',
  'runs/small_data_study/work/digits/k10_lr0.1_bank2x_m0.99_ramp0/seed0',
  'runs/small_data_study/work/textures/k5_lr0.3_bank1x_m0.99_ramp0/seed0',
  'runs/small_data_study/work/textures/k2_lr0.3_bank1x_m0.99_ramp0/seed1',
  'runs/small_data_study/work/textures/k5_lr1_bank1x_m0.99_ramp0/seed1',
)
# Where the bank rows sit in a checkpoint: MSFState's MemoryBank, and the flat state of the
# earlier msf_jax that wrote the small-data study.
BANK_PATHS = (('bank', 'embeddings'), ('bank',))
KS = (5, 10)
CANDIDATES = (16, 32, 64, 128, 256, 512)
SYNTHETIC_DIM, SYNTHETIC_QUERIES, SYNTHETIC_CHUNK = 512, 256, 128_000


def restore_bank(workdir: str) -> np.ndarray:
  """The bank rows [K, D] of the latest checkpoint in `workdir`."""
  directory = checkpoint.find_checkpoint_directory(workdir)
  step = checkpoint.resolve_step(directory)
  checkpointer = checkpoint.Checkpointer(directory)
  try:
    for path in BANK_PATHS:
      try:
        return checkpointer.restore_subtrees(step, [path])[0]
      except checkpoint.CheckpointError:
        continue
    raise checkpoint.CheckpointError(f'No memory bank in {directory} at step {step}.')
  finally:
    checkpointer.close()


search = jax.jit(
  mean_shift.nearest_neighbors, static_argnames=('k', 'chunk_size', 'search_dtype', 'candidates')
)


@functools.partial(jax.jit, static_argnames=('k', 'chunk_size'))
def bf16_alone(queries: jax.Array, bank: jax.Array, k: int, chunk_size: int | None) -> jax.Array:
  """A bfloat16 search without re-scoring, to show what the re-scoring buys."""
  return mean_shift.top_k_similar(queries, bank, k, chunk_size, dtype=jnp.bfloat16)[1]


@functools.partial(jax.jit, static_argnames=('batch_size',))
def batch_losses(queries: jax.Array, neighbors: jax.Array, batch_size: int) -> jax.Array:
  """The loss of each block of `batch_size` queries, the queries as their own predictions."""
  blocks = lambda x: x.reshape(-1, batch_size, *x.shape[1:])
  return jax.vmap(mean_shift.mean_shift_loss)(blocks(queries), blocks(neighbors))


@functools.partial(jax.jit, static_argnames=('k',))
def candidates_needed(queries: jax.Array, bank: jax.Array, k: int) -> jax.Array:
  """The fewest bfloat16 candidates that hold every query's float32 top-k rows."""
  expected = mean_shift.nearest_neighbors(queries, bank, k)
  similarity = mean_shift.inner_products(queries, bank, jnp.bfloat16)
  rows = jnp.arange(bank.shape[0])

  def position(row):  # [Q]: the place of `row` in each query's bfloat16 order
    own = jnp.take_along_axis(similarity, row[:, None], axis=1)
    ahead = (similarity > own) | ((similarity == own) & (rows < row[:, None]))
    return jnp.sum(ahead, axis=1)

  return jnp.max(jax.lax.map(position, expected.T)) + 1


def compare_row(
  queries: jax.Array, bank: jax.Array, k: int, chunk_size: int | None, batch_size: int
) -> list[str]:
  """The cells of one table row against the float32 search: its own rounding noise (the
  same search in chunks of another size), bf16 alone, each candidate count, and the count
  needed."""
  expected = search(queries, bank, k=k, chunk_size=chunk_size)
  expected_loss = batch_losses(queries, bank[expected], batch_size)
  variants = [
    functools.partial(search, chunk_size=bank.shape[0] // 3 + 1),
    functools.partial(bf16_alone, chunk_size=chunk_size),
  ] + [
    functools.partial(search, chunk_size=chunk_size, search_dtype='bfloat16', candidates=count)
    for count in CANDIDATES
    if count <= bank.shape[0]
  ]
  cells = []
  for variant in variants:
    found = variant(queries, bank, k=k)
    identical = float(jnp.mean(jnp.all(found == expected, axis=1)))
    loss_gap = jnp.max(jnp.abs(batch_losses(queries, bank[found], batch_size) - expected_loss))
    cells.append(f'{100 * identical:.2f}% / {float(loss_gap):.0e}')
  cells += ['-'] * (2 + len(CANDIDATES) - len(cells))  # more candidates than rows
  return cells + [str(int(candidates_needed(queries, bank, k)))]


def table(rows: list[list[str]]) -> str:
  header = (
    ['bank', 'rows x dim', 'queries', 'k', 'float32, other chunks', 'bf16 alone']
    + [f'c = {count}' for count in CANDIDATES]
    + ['c needed']
  )
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def real_rows(workdirs: list[str], batch_size: int) -> list[list[str]]:
  rows = []
  for workdir in workdirs:
    bank = jnp.asarray(restore_bank(workdir))
    size = f'{bank.shape[0]} x {bank.shape[1]}'
    for k in KS:
      rows.append(
        [workdir.removeprefix('runs/'), size, f'{bank.shape[0]} (all rows)', str(k)]
        + compare_row(bank, bank, k, None, batch_size)
      )
  return rows


def synthetic_rows(num_rows: int) -> list[list[str]]:
  bank = mean_shift.init_bank(jax.random.key(0), num_rows, SYNTHETIC_DIM).embeddings
  queries = bank[-SYNTHETIC_QUERIES:]
  return [
    [
      f'synthetic (random, chunks of {SYNTHETIC_CHUNK:,})',
      f'{num_rows} x {SYNTHETIC_DIM}',
      f'{SYNTHETIC_QUERIES} (last rows)',
      str(k),
    ]
    + compare_row(queries, bank, k, SYNTHETIC_CHUNK, SYNTHETIC_QUERIES)
    for k in KS
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='*', default=list(WORKDIRS))
  parser.add_argument(
    '--batch_size',
    type=int,
    default=32,
    help="the runs' batch: the bank was written in blocks of this many rows",
  )
  parser.add_argument('--synthetic_rows', type=int, default=1_024_000, help='0: none')
  args = parser.parse_args()
  print(f'Command: {" ".join([os.path.relpath(sys.executable), *sys.argv])}\n')
  start = time.perf_counter()
  print(
    'Real trained features (each cell: identical neighbours / max |loss difference| of a batch):\n'
  )
  print(table(real_rows(args.workdirs, args.batch_size)))
  print(f'\n({time.perf_counter() - start:.0f} s)')
  if args.synthetic_rows:
    start = time.perf_counter()
    print('\nSynthetic random unit vectors, NOT trained features:\n')
    print(table(synthetic_rows(args.synthetic_rows)))
    print(f'\n({time.perf_counter() - start:.0f} s on {jax.devices()[0].platform})')


if __name__ == '__main__':
  main()
