"""kNN against a brute-force numpy reference, ties included; features of a split, once each."""

import jax
import numpy as np
import pytest

from msf_jax import create_state, make_mesh
from msf_jax.data import sources
from msf_jax.evaluate.features import extract_features
from msf_jax.evaluate.knn import knn_accuracy, knn_predict
from msf_jax.testing import small_config

from helpers import brute_force_votes, write_folder


@pytest.mark.parametrize('k', [1, 5, 20])
def test_majority_vote_equals_brute_force_and_breaks_ties_at_random(k):
  rng = np.random.default_rng(0)
  train, queries = rng.standard_normal((300, 16)), rng.standard_normal((200, 16))
  labels = rng.integers(0, 4, 300)
  scores = brute_force_votes(train, labels, queries, k, 4, weighted=False)
  predictions = knn_predict(train, labels, queries, k, 4, chunk_size=64)
  best = scores.max(axis=1, keepdims=True)
  # Each prediction is one of the labels with the most votes.
  assert (scores[np.arange(200), predictions] == best[:, 0]).all()
  tied = (scores == best).sum(axis=1) > 1
  if k > 1:
    assert tied.any()
    # Ties are broken at random: over many seeds every tied label wins sometimes.
    q = np.flatnonzero(tied)[0]
    winners = {
      int(knn_predict(train, labels, queries[q : q + 1], k, 4, seed=s)[0]) for s in range(40)
    }
    assert winners == set(np.flatnonzero(scores[q] == best[q]))


def test_weighted_vote_equals_brute_force():
  rng = np.random.default_rng(1)
  train, queries = rng.standard_normal((300, 16)), rng.standard_normal((100, 16))
  labels = rng.integers(0, 5, 300)
  scores = brute_force_votes(train, labels, queries, 20, 5, weighted=True)
  np.testing.assert_array_equal(
    knn_predict(train, labels, queries, 20, 5, vote='weighted'), scores.argmax(axis=1)
  )
  queries_are_train = knn_accuracy(train, labels, train, labels, 1, 5)
  assert queries_are_train == 1.0


def test_features_of_a_split_once_each_over_eight_devices(tmp_path):
  split = sources.image_folder(write_folder(tmp_path, 'val', classes=3, per_class=7), 'val')
  config = small_config(image_size=24, small_stem=True)
  state = create_state(config, jax.random.key(0))
  variables = state.online
  eight, one = make_mesh(jax.devices()[:8]), make_mesh(jax.devices()[:1])
  features, labels = extract_features(variables, split, config, eight, batch_size=16)
  assert features.shape == (21, 512) and sorted(labels) == sorted([0] * 7 + [1] * 7 + [2] * 7)
  single, single_labels = extract_features(variables, split, config, one, batch_size=5)
  np.testing.assert_array_equal(labels, single_labels)
  np.testing.assert_allclose(features, single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a ResNet-18 state and its kNN monitor over 8 devices
def test_knn_monitor_finds_each_training_image_as_its_own_neighbour():
  from msf_jax.evaluate.monitor import KnnMonitor

  config = small_config(image_size=24, small_stem=True)
  config.model.width = 8
  config.data.source = 'digits'
  config.monitor.split, config.monitor.ks = 'train', (1, 20)
  config.monitor.num_train = config.monitor.num_queries = 40
  state = create_state(config, jax.random.key(0))
  result = KnnMonitor(config, make_mesh(jax.devices()[:8]), sources.digits('train', 24))(
    state.online
  )
  accuracy = result.metrics
  assert result.train[0].shape == result.held_out[0].shape == (40, 8 * 8)
  # Queries are the bank's own images: 1-NN is each image itself, so the labels must line up.
  assert accuracy['monitor/knn_k1'] == 1.0
  assert 0.0 < accuracy['monitor/knn_k20'] < 1.0
