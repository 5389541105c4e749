"""kNN with the train set scanned in chunks: the same neighbours and votes as brute force,
whatever the chunking; several k and votes from one search."""

import jax
import numpy as np
import pytest

from msf_jax import make_mesh
from msf_jax.evaluate.knn import (
  knn_accuracies,
  knn_accuracy,
  knn_predict,
  nearest_neighbours,
  place_train_features,
  train_features_spec,
)

from helpers import brute_force_votes


def clustered(rng, num_classes, per_class, dim, noise):
  """Features around one random centre per class, and their labels."""
  centres = rng.standard_normal((num_classes, dim))
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + noise * rng.standard_normal((len(labels), dim)), labels


@pytest.mark.parametrize('train_chunk_size', [7, 64, 1000])
def test_chunked_search_equals_a_stable_sort_of_all_similarities(train_chunk_size):
  rng = np.random.default_rng(2)
  train, queries = rng.standard_normal((203, 12)), rng.standard_normal((50, 12))
  train[150] = train[3]  # an exact tie across chunks: the lower index must come first
  queries[0] = train[3]
  similarity, index = nearest_neighbours(
    train, queries, 20, chunk_size=16, train_chunk_size=train_chunk_size
  )
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  exact = unit(queries) @ unit(train).T
  expected = np.argsort(-exact, axis=1, kind='stable')[:, :20]
  np.testing.assert_array_equal(index, expected)
  np.testing.assert_allclose(similarity, np.take_along_axis(exact, expected, 1), atol=1e-5)
  assert list(index[0, :2]) == [3, 150]


@pytest.mark.parametrize('k, train_chunk_size', [(20, 7), (30, 16384), (5, 64)])
def test_train_features_sharded_over_eight_devices_give_the_same_neighbours(k, train_chunk_size):
  """203 rows: 26 a device, the last device 21 and 5 rows of padding that never count; k = 30
  is more than one device holds; row 150 (device 5) ties row 3 (device 0)."""
  rng = np.random.default_rng(4)
  train, queries = rng.standard_normal((203, 12)), rng.standard_normal((50, 12))
  train[150] = train[3]
  queries[0] = train[3]
  options = dict(chunk_size=16, train_chunk_size=train_chunk_size)
  expected = nearest_neighbours(train, queries, k, **options)
  found = nearest_neighbours(train, queries, k, **options, mesh=make_mesh(jax.devices()[:8]))
  np.testing.assert_array_equal(found[1], expected[1])
  # A product of another shape may round a similarity's last bit otherwise (as chunks do).
  np.testing.assert_allclose(found[0], expected[0], rtol=0, atol=2.5e-7)
  assert list(found[1][0, :2]) == [3, 150] and found[1].max() < 203
  labels = rng.integers(0, 5, 203)
  query_labels = rng.integers(0, 5, 50)
  assert knn_accuracies(
    train, labels, queries, query_labels, 5, ks=(1, 20), mesh=make_mesh(jax.devices()[:8])
  ) == knn_accuracies(train, labels, queries, query_labels, 5, ks=(1, 20))


@pytest.mark.parametrize('devices', [1, 8])
def test_the_planned_train_features_are_those_the_search_holds(devices):
  """msf_jax.plan compiles the kNN search for `train_features_spec`: the padded shape, type and
  placement `place_train_features` gives the real features."""
  mesh = make_mesh(jax.devices()[:devices])
  placed = place_train_features(np.ones((203, 12), np.float32), mesh)
  spec = train_features_spec(203, 12, mesh)
  assert (spec.shape, spec.dtype) == (placed.shape, placed.dtype)
  assert spec.sharding.is_equivalent_to(placed.sharding, 2)


def test_train_chunks_smaller_than_k_and_not_dividing_the_train_set_vote_as_brute_force():
  rng = np.random.default_rng(3)
  train, queries = rng.standard_normal((301, 16)), rng.standard_normal((90, 16))
  labels = rng.integers(0, 5, 301)
  # 301 = 23 x 13 + 2: the neighbours of each query come from many chunks, the last partial.
  scores = brute_force_votes(train, labels, queries, 20, 5, weighted=True)
  weighted = knn_predict(
    train, labels, queries, 20, 5, vote='weighted', chunk_size=32, train_chunk_size=13
  )
  np.testing.assert_array_equal(weighted, scores.argmax(axis=1))
  votes = brute_force_votes(train, labels, queries, 20, 5, weighted=False)
  majority = knn_predict(train, labels, queries, 20, 5, chunk_size=32, train_chunk_size=13)
  assert (votes[np.arange(90), majority] == votes.max(axis=1)).all()
  unchunked = knn_predict(train, labels, queries, 20, 5, chunk_size=32, train_chunk_size=301)
  np.testing.assert_array_equal(majority, unchunked)  # same neighbours, same tie-break


def test_accuracies_of_several_k_and_votes_equal_separate_searches():
  rng = np.random.default_rng(4)
  features, labels = clustered(rng, 6, 55, 24, noise=3.0)
  order = rng.permutation(len(labels))
  train, train_labels = features[order[:240]], labels[order[:240]]
  queries, query_labels = features[order[240:]], labels[order[240:]]
  options = dict(chunk_size=32, train_chunk_size=50)
  accuracies = knn_accuracies(train, train_labels, queries, query_labels, 6, ks=(1, 20), **options)
  assert sorted(accuracies) == sorted(
    f'knn/{v}/k={k}' for v in ('majority', 'weighted') for k in (1, 20)
  )
  for name, accuracy in accuracies.items():
    _, vote, k = name.split('/')
    assert accuracy == knn_accuracy(
      train, train_labels, queries, query_labels, int(k[2:]), 6, vote, **options
    ), name
  assert 1 / 6 + 0.2 < accuracies['knn/majority/k=20'] < 1.0  # clusters, not chance


def test_bad_arguments_are_named():
  train, labels = np.ones((10, 4)), np.zeros(10, np.int32)
  with pytest.raises(ValueError, match='k must be between 1 and the number of train'):
    knn_predict(train, labels, train, 11, 2)
  with pytest.raises(ValueError, match='same F'):
    knn_predict(train, labels, np.ones((3, 5)), 1, 2)
  with pytest.raises(ValueError, match=r'train labels must lie in \[0, 2\)'):
    knn_predict(train, labels + 2, train, 1, 2)
  with pytest.raises(ValueError, match='vote must be one of'):
    knn_accuracies(train, labels, train, labels, 2, votes=('median',))
  with pytest.raises(ValueError, match='vote must be one of'):
    knn_predict(train, labels, train, 1, 2, vote='median')
  with pytest.raises(ValueError, match='train_chunk_size must be at least 1'):
    knn_predict(train, labels, train, 1, 2, train_chunk_size=0)
