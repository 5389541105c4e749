"""k-nearest-neighbour classification of L2-normalized features (cosine similarity).

`majority`: the official protocol, the most frequent label among the k neighbours, ties
broken at random. `weighted`: each neighbour votes exp(similarity / T) (T = 0.07), as most
SSL papers report. Queries are processed in chunks, so memory is bounded by
chunk x train size, not by the number of queries.
"""

import jax
import jax.numpy as jnp
import numpy as np

VOTES = ('majority', 'weighted')


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                query_features: np.ndarray, k: int, num_classes: int, vote: str = 'majority',
                temperature: float = 0.07, seed: int = 0, chunk_size: int = 1024) -> np.ndarray:
  """Predicted labels [Q] of the queries."""
  if vote not in VOTES:
    raise ValueError(f'vote must be one of {VOTES}, got {vote!r}.')
  train = _normalize(jnp.asarray(train_features, jnp.float32))
  labels = jnp.asarray(train_labels, jnp.int32)

  @jax.jit
  def predict(queries, key):
    similarity, index = jax.lax.top_k(_normalize(queries) @ train.T, k)
    weights = jnp.exp(similarity / temperature) if vote == 'weighted' else jnp.ones_like(similarity)
    scores = jnp.sum(jax.nn.one_hot(labels[index], num_classes) * weights[..., None], axis=1)
    if vote == 'majority':  # random tie-break: a uniform jitter smaller than one vote
      scores += 0.5 * jax.random.uniform(key, scores.shape)
    return jnp.argmax(scores, axis=-1)

  key = jax.random.key(seed)
  out = []
  for start in range(0, len(query_features), chunk_size):
    key, chunk_key = jax.random.split(key)
    out.append(np.asarray(predict(jnp.asarray(query_features[start:start + chunk_size],
                                              jnp.float32), chunk_key)))
  return np.concatenate(out)


def knn_accuracy(train_features, train_labels, query_features, query_labels, k: int,
                 num_classes: int, vote: str = 'majority') -> float:
  predictions = knn_predict(train_features, train_labels, query_features, k, num_classes, vote)
  return float(np.mean(predictions == np.asarray(query_labels)))
