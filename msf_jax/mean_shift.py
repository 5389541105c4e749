"""The memory bank and the mean-shift loss of MSF, as pure functions.

The official code builds two B x K distance matrices (target and online against the whole
bank) and gathers the online one at the target's top-k. Only the k chosen rows matter for the
online term, so here the search runs on the target similarities alone and the online term is
computed on the gathered B x k x D neighbours: one B x K product instead of three (forward,
online forward, online backward), and no B x K array in the backward pass.

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


def init_bank(rng: jax.Array, size: int, dim: int, dtype=jnp.float32) -> MemoryBank:
  """N(0, 1) rows, L2-normalised, labelled -1, as in the official code."""
  embeddings = l2_normalize(jax.random.normal(rng, (size, dim), dtype))
  return MemoryBank(embeddings, jnp.full((size,), -1, jnp.int32), jnp.zeros((), jnp.int32))


def enqueue(bank: MemoryBank, embeddings: jax.Array, labels: jax.Array) -> MemoryBank:
  """Writes a batch at the pointer and advances it; the bank size is a multiple of the batch."""
  size, batch = bank.embeddings.shape[0], embeddings.shape[0]
  if size % batch:
    raise ValueError(f'The bank size ({size}) must be a multiple of the global batch ({batch}).')
  start = (bank.ptr, jnp.zeros_like(bank.ptr))  # one index dtype, also under jax x64
  rows = jax.lax.dynamic_update_slice(
      bank.embeddings, embeddings.astype(bank.embeddings.dtype), start)
  row_labels = jax.lax.dynamic_update_slice(bank.labels, labels.astype(jnp.int32), (bank.ptr,))
  return MemoryBank(rows, row_labels, (bank.ptr + batch) % size)


def _merge_top_k(best: tuple[jax.Array, jax.Array], candidates: tuple[jax.Array, jax.Array],
                 k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest of two (similarity, index) sets. `best` comes first, so that among equal
  similarities the earlier row wins, as in a stable sort of all rows."""
  similarity = jnp.concatenate([best[0], candidates[0]], axis=1)
  index = jnp.concatenate([best[1], candidates[1]], axis=1)
  similarity, position = jax.lax.top_k(similarity, k)
  return similarity, jnp.take_along_axis(index, position, axis=1)


def inner_products(queries: jax.Array, rows: jax.Array, dtype: DTypeLike | None) -> jax.Array:
  """queries @ rows.T. With `dtype`, both operands are cast to it and summed in float32;
  without, the product is exact in the inputs' dtype on every backend (by default TPUs
  multiply float32 in one bfloat16 pass, and recent GPUs in TF32)."""
  if dtype is None:
    return jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.matmul(queries.astype(dtype), rows.astype(dtype).T,
                    preferred_element_type=jnp.float32)


def top_k_similar(queries: jax.Array, rows: jax.Array, k: int, chunk_size: int | None = None,
                  normalize_rows: bool = False, dtype: DTypeLike | None = None
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
  low-precision copy of all rows is made; the similarities are then float32.
  """
  prepare = l2_normalize if normalize_rows else lambda x: x
  num_rows = rows.shape[0]
  if not chunk_size or chunk_size >= num_rows:
    return jax.lax.top_k(inner_products(queries, prepare(rows), dtype), k)

  def scan_chunk(best, chunk_index):
    first = chunk_index * chunk_size
    start = jnp.minimum(first, num_rows - chunk_size)
    chunk = prepare(jax.lax.dynamic_slice_in_dim(rows, start, chunk_size))
    index = start + jnp.arange(chunk_size, dtype=jnp.int32)
    similarity = jnp.where(index >= first, inner_products(queries, chunk, dtype), -jnp.inf)
    chunk_best, position = jax.lax.top_k(similarity, min(k, chunk_size))
    return _merge_top_k(best, (chunk_best, index[position]), k), None

  similarity_dtype = jnp.result_type(queries, rows) if dtype is None else jnp.float32
  init = (jnp.full((queries.shape[0], k), -jnp.inf, similarity_dtype),
          jnp.zeros((queries.shape[0], k), jnp.int32))
  num_chunks = -(-num_rows // chunk_size)
  best, _ = jax.lax.scan(scan_chunk, init, jnp.arange(num_chunks, dtype=jnp.int32))
  return best


def top_k_similar_rescored(queries: jax.Array, rows: jax.Array, k: int, candidates: int,
                           chunk_size: int | None = None, dtype: DTypeLike = jnp.bfloat16
                           ) -> tuple[jax.Array, jax.Array]:
  """`top_k_similar` at the speed of a `dtype` product: its best `candidates` rows per query
  are re-scored exactly in float32 and the k best of them kept, ties to the lower row. The
  rows are the float32 search's whenever its k rows are among the candidates.

  The re-scoring multiplies and sums rather than calling a product (einsum), which on the CPU
  rounds equal rows differently by their position, and which TPUs run in bfloat16 by default.
  """
  _, candidate_index = top_k_similar(queries, rows, candidates, chunk_size, dtype=dtype)
  candidate_index = jnp.sort(candidate_index, axis=1)  # lax.top_k prefers the lower position
  exact = jnp.sum(queries[:, None, :] * rows[candidate_index], axis=-1)
  similarity, position = jax.lax.top_k(exact, k)
  return similarity, jnp.take_along_axis(candidate_index, position, axis=1)


def nearest_neighbors(queries: jax.Array, bank: jax.Array, k: int,
                      chunk_size: int | None = None, search_dtype: str = 'float32',
                      candidates: int | None = None) -> jax.Array:
  """Indices [B, k] of the bank rows nearest to each unit query: the rows of largest cosine
  similarity, i.e. the k smallest distances 2 - 2 q.r of the official code. search_dtype
  'float32' searches in the bank's own dtype; 'bfloat16' proposes `candidates` rows with a
  bfloat16 product and re-scores them in float32 (`top_k_similar_rescored`)."""
  if search_dtype == 'float32':
    return top_k_similar(queries, bank, k, chunk_size)[1]
  return top_k_similar_rescored(queries, bank, k, candidates, chunk_size, search_dtype)[1]


def ramped_topk(step: jax.Array, topk: int, ramp_epochs: int, steps_per_epoch: int
                ) -> jax.Array:
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


def mean_shift_loss(predictions: jax.Array, neighbors: jax.Array,
                    active: jax.Array | None = None) -> jax.Array:
  """Mean over the batch and the k neighbours of the squared distance 2 - 2 v.z.

  predictions: [B, D] unit online predictions v; neighbors: [B, k, D] unit bank rows;
  active: optional [k] mask of the neighbours that count (a k schedule), nearest first.
  """
  similarity = jnp.einsum('bd,bkd->bk', predictions, neighbors,
                          precision=jax.lax.Precision.HIGHEST)
  return _mean_over_active(2.0 - 2.0 * similarity, active)


def purity(query_labels: jax.Array, neighbor_labels: jax.Array,
           active: jax.Array | None = None) -> jax.Array:
  """Mean fraction of the (active) neighbours whose stored label equals the query's label."""
  return _mean_over_active(
      (neighbor_labels == query_labels[:, None]).astype(jnp.float32), active)


def drop_own_rows(neighbor_idx: jax.Array, own_rows: jax.Array) -> jax.Array:
  """[B, n - 1] neighbour indices without each query's own bank row, order kept.

  The official search runs after the enqueue, so each query's nearest row is normally its
  own embedding, which makes the official purity 1.0 at k = 1 and inflates it at every k.
  Where the own row is missing (a tie), the farthest of the n is dropped instead.
  """
  is_own = neighbor_idx == own_rows[:, None]
  order = jnp.argsort(is_own, axis=1, stable=True)  # others first, own row last
  return jnp.take_along_axis(neighbor_idx, order, axis=1)[:, :-1]
