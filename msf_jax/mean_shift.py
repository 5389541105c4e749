"""The memory bank and the mean-shift loss of MSF, as pure functions.

The official code builds two B x K distance matrices (target and online against the whole
bank) and gathers the online one at the target's top-k. Only the k chosen rows matter for the
online term, so here the search runs on the target similarities alone and the online term is
computed on the gathered B x k x D neighbours: one B x K product instead of three (forward,
online forward, online backward), and no B x K array in the backward pass.

Every bank function also runs inside `jax.shard_map` on a bank split by rows over a mesh
axis (`axis_name`): each device holds `bank_size / devices` consecutive rows, searches them for
all queries of the global batch, and only [devices, B, k] candidates, B x k gathered rows and
the batch itself cross devices, never the bank. The neighbours are the whole bank's (a
product of another shape may round a similarity's last bit otherwise, as chunks do), and the
rows and labels gathered are its rows exactly.

The search may run in bfloat16, whose product is faster than float32's on GPUs and TPUs: it
only proposes candidates, which are re-scored exactly in float32, so the neighbours are the
float32 search's whenever its k rows are among the candidates.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# The bank search's precision: float32 (the official) or a bfloat16 product re-scored in float32.
SEARCH_DTYPES = ('float32', 'bfloat16')


class MemoryBank(NamedTuple):
  """A ring buffer of L2-normalised target embeddings and the labels of their images."""

  embeddings: jax.Array  # [K, D]
  labels: jax.Array  # [K] int32, -1 for the random initial rows
  ptr: jax.Array  # int32 scalar: the row the next batch is written to


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps) along the last axis."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def init_bank(
  rng: jax.Array,
  size: int,
  dim: int,
  dtype=jnp.float32,
  sharding: jax.sharding.Sharding | None = None,
) -> MemoryBank:
  """N(0, 1) rows, L2-normalised, labelled -1, as in the official code. With `sharding`, the
  rows are drawn in place, so no device holds them all: the same draw (JAX's random bits do not
  depend on the sharding), though the compiled normalisation may round a last bit otherwise."""
  draw = lambda key: l2_normalize(jax.random.normal(key, (size, dim), dtype))
  embeddings = draw(rng) if sharding is None else jax.jit(draw, out_shardings=sharding)(rng)
  return MemoryBank(embeddings, jnp.full((size,), -1, jnp.int32), jnp.zeros((), jnp.int32))


def _shard_start(shard_rows: int, axis_name: str | None) -> jax.Array | int:
  """The global index of this device's first row (0 when the rows are whole)."""
  return 0 if axis_name is None else jax.lax.axis_index(axis_name) * shard_rows


def _num_shards(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _local_rows(
  index: jax.Array, shard_rows: int, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  """(index into this device's rows, whether it holds them) of global row indices."""
  local = index - _shard_start(shard_rows, axis_name)
  return local, (local >= 0) & (local < shard_rows)


def enqueue(
  bank: MemoryBank, embeddings: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> MemoryBank:
  """Writes a batch at the pointer and advances it; the bank size is a multiple of the batch.

  With `axis_name`, each device writes the batch rows that fall in its shard and drops the
  others, so a batch may straddle shards; rows past the bank's end wrap to its start."""
  shard_rows, batch = bank.embeddings.shape[0], embeddings.shape[0]
  size = shard_rows * _num_shards(axis_name)
  if size % batch:
    raise ValueError(f'The bank size ({size}) must be a multiple of the global batch ({batch}).')
  rows = (bank.ptr + jnp.arange(batch, dtype=bank.ptr.dtype)) % size
  local, owned = _local_rows(rows, shard_rows, axis_name)
  local = jnp.where(owned, local, shard_rows)  # out of range: dropped by the scatter
  return MemoryBank(
    bank.embeddings.at[local].set(embeddings.astype(bank.embeddings.dtype), mode='drop'),
    bank.labels.at[local].set(labels.astype(jnp.int32), mode='drop'),
    (bank.ptr + batch) % size,
  )


def _held_rows(rows: jax.Array, index: jax.Array, axis_name: str | None) -> jax.Array:
  """rows[index] for the global indices this device holds, zeros for the others."""
  if axis_name is None:
    return rows[index]
  local, owned = _local_rows(index, rows.shape[0], axis_name)
  values = rows[jnp.where(owned, local, 0)]
  owned = owned.reshape(owned.shape + (1,) * (values.ndim - owned.ndim))
  return jnp.where(owned, values, jnp.zeros((), values.dtype))


def _sum_over_shards(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def gather_rows(rows: jax.Array, index: jax.Array, axis_name: str | None = None) -> jax.Array:
  """rows[index] of global row indices. With `axis_name`, each device takes the rows it holds
  (zeros for the others) and one psum completes them: x + 0 is exact, so the result is the
  whole bank's, and only index-sized data crosses devices."""
  return _sum_over_shards(_held_rows(rows, index, axis_name), axis_name)


def _select_top_k(similarity: jax.Array, index: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest (similarity, index) pairs of each row; lax.top_k keeps the earlier position
  first among equal similarities, so candidates laid out in row order keep a stable sort's."""
  similarity, position = jax.lax.top_k(similarity, k)
  return similarity, jnp.take_along_axis(index, position, axis=1)


def _merge_top_k(
  best: tuple[jax.Array, jax.Array], candidates: tuple[jax.Array, jax.Array], k: int
) -> tuple[jax.Array, jax.Array]:
  """The k largest of two (similarity, index) sets. `best` comes first, so that among equal
  similarities the earlier row wins, as in a stable sort of all rows."""
  return _select_top_k(
    jnp.concatenate([best[0], candidates[0]], axis=1),
    jnp.concatenate([best[1], candidates[1]], axis=1),
    k,
  )


def inner_products(queries: jax.Array, rows: jax.Array, dtype: DTypeLike | None) -> jax.Array:
  """queries @ rows.T. With `dtype`, both operands are cast to it and summed in float32;
  without, the product is exact in the inputs' dtype on every backend (by default TPUs
  multiply float32 in one bfloat16 pass, and recent GPUs in TF32)."""
  if dtype is None:
    return jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.matmul(queries.astype(dtype), rows.astype(dtype).T, preferred_element_type=jnp.float32)


def top_k_similar(
  queries: jax.Array,
  rows: jax.Array,
  k: int,
  chunk_size: int | None = None,
  normalize_rows: bool = False,
  dtype: DTypeLike | None = None,
  num_rows: int | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(similarities [Q, k], row indices [Q, k]) of the k rows with the largest inner product
  with each query, most similar first; ties go to the lower row, as in a stable sort.

  With `chunk_size` (0 or None: one product), the rows are scanned in chunks and a running
  top-k is kept, so memory is O(Q * chunk_size) instead of O(Q * N), with the same neighbours
  (a chunk's product may round a similarity's last bit differently from the whole product).
  The last chunk is shifted back to end at the last row (no padding or copy of the rows), and
  the rows it shares with the previous chunk are masked with -inf. `normalize_rows`
  L2-normalises each chunk inside the scan, so no normalised copy of all rows is made.
  `dtype` (None: the inputs') is the product's operand dtype, cast chunk by chunk so that no
  low-precision copy of all rows is made; the similarities are then float32. Rows from
  `num_rows` on (padding) never count.

  With `axis_name` (inside `jax.shard_map`), `rows` is this device's shard of consecutive rows
  along that mesh axis and the indices are global: each device keeps its own top k and the
  devices merge their [devices, Q, k] candidates in shard order, so ties still go to the lower
  global row, and every device returns the whole rows' answer.
  """
  shard_rows = rows.shape[0]
  start = _shard_start(shard_rows, axis_name)
  valid = None if num_rows is None else num_rows - start
  local_k = k if axis_name is None else min(k, shard_rows)
  similarity, index = _local_top_k(queries, rows, local_k, chunk_size, normalize_rows, dtype, valid)
  if axis_name is None:
    return similarity, index
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  return _select_top_k(gather(similarity), gather(index + start), k)


def _local_top_k(
  queries: jax.Array,
  rows: jax.Array,
  k: int,
  chunk_size: int | None,
  normalize_rows: bool,
  dtype: DTypeLike | None,
  valid: jax.Array | int | None,
) -> tuple[jax.Array, jax.Array]:
  """`top_k_similar` of rows held whole, rows from `valid` on masked."""
  prepare = l2_normalize if normalize_rows else lambda x: x
  num_rows = rows.shape[0]
  mask = lambda similarity, index: (
    similarity if valid is None else jnp.where(index < valid, similarity, -jnp.inf)
  )
  if not chunk_size or chunk_size >= num_rows:
    index = jnp.arange(num_rows, dtype=jnp.int32)
    return jax.lax.top_k(mask(inner_products(queries, prepare(rows), dtype), index), k)

  def scan_chunk(best, chunk_index):
    first = chunk_index * chunk_size
    start = jnp.minimum(first, num_rows - chunk_size)
    chunk = prepare(jax.lax.dynamic_slice_in_dim(rows, start, chunk_size))
    index = start + jnp.arange(chunk_size, dtype=jnp.int32)
    similarity = jnp.where(index >= first, inner_products(queries, chunk, dtype), -jnp.inf)
    chunk_best, position = jax.lax.top_k(mask(similarity, index), min(k, chunk_size))
    return _merge_top_k(best, (chunk_best, index[position]), k), None

  similarity_dtype = jnp.result_type(queries, rows) if dtype is None else jnp.float32
  init = (
    jnp.full((queries.shape[0], k), -jnp.inf, similarity_dtype),
    jnp.zeros((queries.shape[0], k), jnp.int32),
  )
  num_chunks = -(-num_rows // chunk_size)
  best, _ = jax.lax.scan(scan_chunk, init, jnp.arange(num_chunks, dtype=jnp.int32))
  return best


def top_k_similar_rescored(
  queries: jax.Array,
  rows: jax.Array,
  k: int,
  candidates: int,
  chunk_size: int | None = None,
  dtype: DTypeLike = jnp.bfloat16,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`top_k_similar` at the speed of a `dtype` product: its best `candidates` rows per query
  are re-scored exactly in float32 and the k best of them kept, ties to the lower row. The
  rows are the float32 search's whenever its k rows are among the candidates.

  The re-scoring multiplies and sums rather than calling a product (einsum), which on the CPU
  rounds equal rows differently by their position, and which TPUs run in bfloat16 by default.
  With `axis_name` (see `top_k_similar`), the candidates are the whole bank's, each device
  re-scores those it holds (0 for the others) and one psum of the [Q, candidates] scores
  completes them exactly.
  """
  _, candidate_index = top_k_similar(
    queries, rows, candidates, chunk_size, dtype=dtype, axis_name=axis_name
  )
  candidate_index = jnp.sort(candidate_index, axis=1)  # lax.top_k prefers the lower position
  held = _held_rows(rows, candidate_index, axis_name)
  exact = _sum_over_shards(jnp.sum(queries[:, None, :] * held, axis=-1), axis_name)
  return _select_top_k(exact, candidate_index, k)


def nearest_neighbors(
  queries: jax.Array,
  bank: jax.Array,
  k: int,
  chunk_size: int | None = None,
  search_dtype: str = 'float32',
  candidates: int | None = None,
  axis_name: str | None = None,
) -> jax.Array:
  """Indices [B, k] of the bank rows nearest to each unit query: the rows of largest cosine
  similarity, i.e. the k smallest distances 2 - 2 q.r of the official code. search_dtype
  'float32' searches in the bank's own dtype; 'bfloat16' proposes `candidates` rows with a
  bfloat16 product and re-scores them in float32 (`top_k_similar_rescored`). `axis_name`:
  the bank is split by rows over that mesh axis (inside `jax.shard_map`)."""
  if search_dtype == 'float32':
    return top_k_similar(queries, bank, k, chunk_size, axis_name=axis_name)[1]
  if candidates is None:
    raise ValueError(f'search_dtype={search_dtype!r} needs `candidates`, the rows to re-score.')
  return top_k_similar_rescored(queries, bank, k, candidates, chunk_size, search_dtype, axis_name)[
    1
  ]


def ramped_topk(step: jax.Array, topk: int, ramp_epochs: int, steps_per_epoch: int) -> jax.Array:
  """The k of a step under a linear ramp: 1 in the first epoch, growing by epoch to `topk`
  after `ramp_epochs` epochs (BYOL's loss first, mean shift once the bank has structure)."""
  epoch = step // steps_per_epoch
  return jnp.minimum(1 + (topk - 1) * epoch // ramp_epochs, topk).astype(jnp.int32)


def active_neighbors(count: jax.Array, k: int) -> jax.Array:
  """[k] bool: the first `count` of k neighbours (sorted nearest first) take part."""
  return jnp.arange(k) < count


def _mean_over_active(values: jax.Array, active: jax.Array | None) -> jax.Array:
  """Mean over the batch of the per-row mean over the active neighbours (all when None)."""
  if active is None:
    return jnp.mean(values)
  weights = active.astype(values.dtype)
  return jnp.mean(jnp.sum(values * weights, axis=1) / jnp.sum(weights))


def mean_shift_loss(
  predictions: jax.Array, neighbors: jax.Array, active: jax.Array | None = None
) -> jax.Array:
  """Mean over the batch and the k neighbours of the squared distance 2 - 2 v.z.

  predictions: [B, D] unit online predictions v; neighbors: [B, k, D] unit bank rows;
  active: optional [k] mask of the neighbours that count (a k schedule), nearest first.
  """
  similarity = jnp.einsum('bd,bkd->bk', predictions, neighbors, precision=jax.lax.Precision.HIGHEST)
  return _mean_over_active(2.0 - 2.0 * similarity, active)


def purity(
  query_labels: jax.Array, neighbor_labels: jax.Array, active: jax.Array | None = None
) -> jax.Array:
  """Mean fraction of the (active) neighbours whose stored label equals the query's label."""
  return _mean_over_active((neighbor_labels == query_labels[:, None]).astype(jnp.float32), active)


def others_positions(neighbor_idx: jax.Array, own_rows: jax.Array) -> jax.Array:
  """[B, n - 1] positions in `neighbor_idx` of the neighbours other than each query's own bank
  row, order kept.

  The official search runs after the enqueue, so each query's nearest row is normally its
  own embedding, which makes the official purity 1.0 at k = 1 and inflates it at every k.
  Where the own row is missing (a tie), the farthest of the n is dropped instead.
  """
  is_own = neighbor_idx == own_rows[:, None]
  return jnp.argsort(is_own, axis=1, stable=True)[:, :-1]  # others first, own row last


def drop_own_rows(neighbor_idx: jax.Array, own_rows: jax.Array) -> jax.Array:
  """[B, n - 1] neighbour indices without each query's own bank row (`others_positions`)."""
  return jnp.take_along_axis(neighbor_idx, others_positions(neighbor_idx, own_rows), axis=1)


def enqueue_and_search(
  bank: MemoryBank,
  targets: jax.Array,
  labels: jax.Array,
  k: int,
  search_k: int,
  chunk_size: int | None = None,
  search_dtype: str = 'float32',
  candidates: int | None = None,
  axis_name: str | None = None,
) -> tuple[MemoryBank, jax.Array, jax.Array, jax.Array]:
  """The bank's part of a training step, in the official order (enqueue, then search):
  (the new bank, the `search_k` nearest rows [B, search_k], the first k of them [B, k, D],
  the labels of all `search_k` [B, search_k]). Under `jax.shard_map` with `axis_name`, the bank
  is this device's shard and the rest is the whole bank's answer."""
  bank = enqueue(bank, targets, labels, axis_name)
  found = nearest_neighbors(
    targets, bank.embeddings, search_k, chunk_size, search_dtype, candidates, axis_name
  )
  return (
    bank,
    found,
    gather_rows(bank.embeddings, found[:, :k], axis_name),
    gather_rows(bank.labels, found, axis_name),
  )
