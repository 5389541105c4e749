"""k-nearest-neighbour classification of L2-normalized features (cosine similarity).

`majority`: the official protocol, the most frequent label among the k neighbours, ties
broken at random. `weighted`: each neighbour votes exp(similarity / T) (T = 0.07), as most
SSL papers report.

Memory is bounded by the chunk sizes, not by the data: queries are taken `chunk_size` at a
time, and each query chunk scans the train set `train_chunk_size` rows at a time, keeping a
running top-k (`mean_shift.top_k_similar`, the training step's bank search). ImageNet's 1.28M train
features against 50,000 queries then need one chunk x train-chunk similarity block at a time.

Given a mesh of several devices, the train features are split by rows over it as a sharded
memory bank is (padded to a multiple of the devices), and searched by the same shared sharded
top-k: each device holds and scans 1/devices of them, with the same neighbours, so a train set
larger than one device's memory is no limit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from msf_jax.mean_shift import l2_normalize, top_k_similar
from msf_jax.sharding import DATA_AXIS, row_spec, rows_sharded

VOTES = ('majority', 'weighted')
DEFAULT_TEMPERATURE = 0.07
DEFAULT_KS = (1, 20)  # the k of the tables in most SSL papers; one search serves both
QUERY_CHUNK_SIZE = 1024
TRAIN_CHUNK_SIZE = 16384


def _chunk_neighbours(
  queries: jax.Array,
  train: jax.Array,
  k: int,
  train_chunk_size: int,
  num_train: int | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(cosine similarities, train indices) [Q, k] of one query chunk: the shared chunked search,
  with the train rows normalised chunk by chunk (the raw train set is the only full copy);
  with `axis_name`, `train` is this device's shard of rows and rows from `num_train` padding."""
  return top_k_similar(
    l2_normalize(queries),
    train,
    k,
    train_chunk_size,
    normalize_rows=True,
    num_rows=num_train,
    axis_name=axis_name,
  )


def search_mesh(mesh: Mesh | None) -> Mesh | None:
  """The mesh the train features are split over: none on one device."""
  return mesh if mesh is not None and mesh.devices.size > 1 else None


@functools.lru_cache(maxsize=16)
def chunk_search(k: int, train_chunk_size: int, mesh: Mesh | None, num_train: int | None):
  """The jitted search of one query chunk against the train features: on one device, or split
  by train rows over `mesh` (queries replicated; `num_train` rows before the padding)."""
  if mesh is None:
    return jax.jit(functools.partial(_chunk_neighbours, k=k, train_chunk_size=train_chunk_size))
  search = functools.partial(
    _chunk_neighbours,
    k=k,
    train_chunk_size=train_chunk_size,
    num_train=num_train,
    axis_name=DATA_AXIS,
  )
  return jax.jit(
    jax.shard_map(
      search,
      mesh=mesh,
      in_specs=(P(), row_spec(2, 'sharded')),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )


def place_train_features(train: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """The train features on one device (no mesh, or a mesh of one), else split by rows over
  the mesh, padded with zero rows to a multiple of its devices."""
  mesh = search_mesh(mesh)
  if mesh is None:
    return jax.device_put(train)
  padding = -len(train) % mesh.devices.size
  return jax.device_put(np.pad(train, ((0, padding), (0, 0))), rows_sharded(mesh))


def train_features_spec(num_train: int, num_features: int, mesh: Mesh) -> jax.ShapeDtypeStruct:
  """The shape, type and placement `place_train_features` gives a train set on `mesh`'s
  devices: what a plan compiles the search for without the features."""
  rows = num_train + -num_train % mesh.devices.size
  return jax.ShapeDtypeStruct((rows, num_features), np.float32, sharding=rows_sharded(mesh))


def _check_votes(votes: tuple[str, ...]) -> None:
  """Names a bad vote before the search, not after it."""
  for vote in votes:
    if vote not in VOTES:
      raise ValueError(f'vote must be one of {VOTES}, got {vote!r}.')


def _check_positive(**sizes: int) -> None:
  for name, value in sizes.items():
    if value < 1:
      raise ValueError(f'{name} must be at least 1, got {value}.')


def nearest_neighbours(
  train_features,
  query_features,
  k: int,
  *,
  chunk_size: int = QUERY_CHUNK_SIZE,
  train_chunk_size: int = TRAIN_CHUNK_SIZE,
  mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(cosine similarities [Q, k], train indices [Q, k]) of each query's k nearest train
  features, most similar first (ties: the lower train index first). With a `mesh` of several
  devices, the train features are split by rows over it (`place_train_features`)."""
  train = np.asarray(train_features, np.float32)
  queries = np.asarray(query_features, np.float32)
  if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
    raise ValueError(
      f'Features must be [N, F] and [Q, F] with the same F; got train '
      f'{train.shape} and queries {queries.shape}.'
    )
  if not 1 <= k <= train.shape[0]:
    raise ValueError(
      f'k must be between 1 and the number of train features ({train.shape[0]}), got {k}.'
    )
  _check_positive(chunk_size=chunk_size, train_chunk_size=train_chunk_size)
  chunk_size = min(chunk_size, max(len(queries), 1))
  mesh = search_mesh(mesh)
  search = chunk_search(k, train_chunk_size, mesh, len(train) if mesh else None)
  placed = place_train_features(train, mesh)
  out = []
  for start in range(0, len(queries), chunk_size):
    chunk = queries[start : start + chunk_size]
    padded = np.pad(chunk, ((0, chunk_size - len(chunk)), (0, 0)))  # one compiled shape
    out.append(search(padded, placed))  # async dispatch
  if not out:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  num_queries = len(queries)
  return (
    np.concatenate([np.asarray(s) for s, _ in out])[:num_queries],
    np.concatenate([np.asarray(i) for _, i in out])[:num_queries],
  )


@functools.partial(jax.jit, static_argnames=('num_classes', 'vote'))
def _vote(
  similarity: jax.Array,
  neighbour_labels: jax.Array,
  key: jax.Array,
  num_classes: int,
  vote: str,
  temperature: float,
) -> jax.Array:
  """The predicted label of each row of neighbours [Q, k]."""
  if vote == 'weighted':
    weights = jnp.exp(similarity / temperature)
  else:
    weights = jnp.ones_like(similarity)
  rows = jnp.arange(similarity.shape[0])[:, None]
  scores = jnp.zeros((similarity.shape[0], num_classes)).at[rows, neighbour_labels].add(weights)
  if vote == 'majority':  # random tie-break: a uniform jitter smaller than one vote
    scores += 0.5 * jax.random.uniform(key, scores.shape)
  return jnp.argmax(scores, axis=-1)


def _votes(
  similarity: np.ndarray,
  neighbour_labels: np.ndarray,
  num_classes: int,
  vote: str,
  temperature: float,
  seed: int,
  chunk_size: int,
) -> np.ndarray:
  """Predictions [Q] from sorted neighbours, `chunk_size` queries at a time (the scores are
  chunk x num_classes). Query chunk c breaks ties with fold_in(key(seed), c)."""
  key = jax.random.key(seed)
  chunk_size = min(chunk_size, max(len(similarity), 1))
  pad = lambda x: np.pad(x, ((0, chunk_size - len(x)), (0, 0)))  # one compiled shape
  out = [
    _vote(
      pad(similarity[start : start + chunk_size]),
      pad(neighbour_labels[start : start + chunk_size]),
      jax.random.fold_in(key, start // chunk_size),
      num_classes,
      vote,
      temperature,
    )
    for start in range(0, len(similarity), chunk_size)
  ]
  if not out:
    return np.zeros((0,), np.int32)
  return np.concatenate([np.asarray(p) for p in out])[: len(similarity)]


def _checked_labels(train_labels, num_train: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(train_labels, np.int32)
  if labels.shape != (num_train,):
    raise ValueError(f'train_labels must be [{num_train}], got {labels.shape}.')
  if num_train and not (labels.min() >= 0 and labels.max() < num_classes):
    raise ValueError(
      f'train labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].'
    )
  return labels


def knn_predict(
  train_features,
  train_labels,
  query_features,
  k: int,
  num_classes: int,
  vote: str = 'majority',
  temperature: float = DEFAULT_TEMPERATURE,
  seed: int = 0,
  chunk_size: int = QUERY_CHUNK_SIZE,
  train_chunk_size: int = TRAIN_CHUNK_SIZE,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """Predicted labels [Q] of the queries (`mesh`: see `nearest_neighbours`)."""
  _check_votes((vote,))
  labels = _checked_labels(train_labels, len(train_features), num_classes)
  similarity, index = nearest_neighbours(
    train_features,
    query_features,
    k,
    chunk_size=chunk_size,
    train_chunk_size=train_chunk_size,
    mesh=mesh,
  )
  return _votes(similarity, labels[index], num_classes, vote, temperature, seed, chunk_size)


def knn_accuracy(
  train_features,
  train_labels,
  query_features,
  query_labels,
  k: int,
  num_classes: int,
  vote: str = 'majority',
  **options,
) -> float:
  """Top-1 accuracy of `knn_predict` (`options`: its keyword arguments)."""
  predictions = knn_predict(
    train_features, train_labels, query_features, k, num_classes, vote, **options
  )
  return float(np.mean(predictions == np.asarray(query_labels)))


def knn_accuracies(
  train_features,
  train_labels,
  query_features,
  query_labels,
  num_classes: int,
  ks: tuple[int, ...] = DEFAULT_KS,
  votes: tuple[str, ...] = VOTES,
  temperature: float = DEFAULT_TEMPERATURE,
  seed: int = 0,
  chunk_size: int = QUERY_CHUNK_SIZE,
  train_chunk_size: int = TRAIN_CHUNK_SIZE,
  mesh: Mesh | None = None,
) -> dict[str, float]:
  """{'knn/<vote>/k=<k>': top-1 accuracy} for every k and vote, from one search for max(ks):
  the k nearest are the first k of the max(ks) nearest. Each entry equals `knn_accuracy` with
  the same arguments (`mesh`: see `nearest_neighbours`)."""
  _check_votes(votes)
  if not ks:
    raise ValueError('ks must name at least one k.')
  labels = _checked_labels(train_labels, len(train_features), num_classes)
  query_labels = np.asarray(query_labels)
  similarity, index = nearest_neighbours(
    train_features,
    query_features,
    max(ks),
    chunk_size=chunk_size,
    train_chunk_size=train_chunk_size,
    mesh=mesh,
  )
  neighbour_labels = labels[index]
  return {
    f'knn/{vote}/k={k}': float(
      np.mean(
        _votes(
          similarity[:, :k],
          neighbour_labels[:, :k],
          num_classes,
          vote,
          temperature,
          seed,
          chunk_size,
        )
        == query_labels
      )
    )
    for vote in votes
    for k in ks
  }
