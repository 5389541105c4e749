"""The memory bank and the mean-shift loss of MSF, as pure functions.

The official code builds two B x K distance matrices (target and online against the whole
bank) and gathers the online one at the target's top-k. Only the k chosen rows matter for the
online term, so here the search runs on the target similarities alone and the online term is
computed on the gathered B x k x D neighbours: one B x K product instead of three (forward,
online forward, online backward), and no B x K array in the backward pass.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


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


def _merge_top_k(values_a, indices_a, values_b, indices_b, k):
  values = jnp.concatenate([values_a, values_b], axis=1)
  indices = jnp.concatenate([indices_a, indices_b], axis=1)
  top_values, positions = jax.lax.top_k(values, k)
  return top_values, jnp.take_along_axis(indices, positions, axis=1)


def nearest_neighbors(queries: jax.Array, bank: jax.Array, k: int,
                      chunk_size: int | None = None) -> jax.Array:
  """Indices [B, k] of the bank rows with the largest cosine similarity to each query.

  Queries and rows are unit vectors, so this is the k smallest of 2 - 2 q.r. With
  `chunk_size`, the bank is scanned in chunks and a running top-k is kept, so memory is
  O(B * chunk_size) instead of O(B * K); the result is the same (ties go to the lower index).
  """
  size = bank.shape[0]
  if not chunk_size or chunk_size >= size:
    return jax.lax.top_k(queries @ bank.T, k)[1]
  if size % chunk_size:
    raise ValueError(f'bank_chunk_size ({chunk_size}) must divide the bank size ({size}).')
  chunks = bank.reshape(size // chunk_size, chunk_size, bank.shape[1])

  def scan_chunk(best, chunk_and_offset):
    chunk, offset = chunk_and_offset
    values, indices = jax.lax.top_k(queries @ chunk.T, k)
    return _merge_top_k(*best, values, indices + offset, k), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf, queries.dtype),
          jnp.zeros((queries.shape[0], k), jnp.int32))
  offsets = jnp.arange(0, size, chunk_size, dtype=jnp.int32)
  (_, indices), _ = jax.lax.scan(scan_chunk, init, (chunks, offsets))
  return indices


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
