"""Transfer evaluation: the regularization follows the data, the reported test accuracy is a
plain scikit-learn fit at the chosen value, and the dataset table names real TFDS builders."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from msf_jax.evaluate.transfer import TRANSFER_DATASETS, logistic_regression_transfer

REGULARIZATIONS = tuple(float(r) for r in np.logspace(-5, 1, 7))


def informative_features(rng, num, num_classes, informative, noise_dims, separation):
  """Labels, and features whose first `informative` dimensions carry them; the rest noise."""
  labels = rng.integers(0, num_classes, num)
  centres = separation * rng.standard_normal((num_classes, informative))
  signal = centres[labels] + rng.standard_normal((num, informative))
  return np.hstack([signal, rng.standard_normal((num, noise_dims))]), labels


def splits(features, labels, sizes):
  bounds = np.cumsum(sizes)[:-1]
  pairs = zip(np.split(features, bounds), np.split(labels, bounds), strict=True)
  return [x for pair in pairs for x in pair]


def test_noisy_high_dimensional_features_choose_stronger_regularization():
  """Few examples of many dimensions, nearly all noise, against many examples of a few
  informative ones. One draw's validation curve is nearly flat (max-margin solutions are
  already robust), so the median choice over five draws is compared."""

  def chosen(seed, num, informative, noise_dims, separation, sizes):
    rng = np.random.default_rng(seed)
    data = splits(*informative_features(rng, num, 4, informative, noise_dims, separation), sizes)
    return logistic_regression_transfer(*data, regularizations=REGULARIZATIONS)['regularization']

  clean = [chosen(seed, 3000, 8, 0, 0.7, (2000, 500, 500)) for seed in range(5)]
  noisy = [chosen(seed, 1300, 2, 298, 2.0, (300, 500, 500)) for seed in range(5)]
  assert np.median(noisy) >= 10 * np.median(clean), (clean, noisy)


def test_test_accuracy_is_a_direct_fit_on_train_and_validation_at_the_chosen_value():
  rng = np.random.default_rng(1)
  train_x, train_y, val_x, val_y, test_x, test_y = splits(
    *informative_features(rng, 900, 5, 6, 20, 0.8), (500, 200, 200)
  )
  result = logistic_regression_transfer(
    train_x, train_y, val_x, val_y, test_x, test_y, regularizations=REGULARIZATIONS
  )
  assert result['val_accuracy'] == max(result['val_accuracies'].values())
  x, y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
  direct = make_pipeline(
    StandardScaler(), LogisticRegression(C=1 / (result['regularization'] * len(x)), max_iter=1000)
  ).fit(x, y)
  assert result['test_accuracy'] == pytest.approx(direct.score(test_x, test_y), abs=1e-9)
  assert 0.4 < result['test_accuracy'] < 1.0


def test_bad_inputs_are_named():
  x, y = np.ones((4, 3)), np.arange(4) % 2
  with pytest.raises(ValueError, match='regularizations must be positive'):
    logistic_regression_transfer(x, y, x, y, x, y, regularizations=(0.0, 1.0))
  with pytest.raises(ValueError, match=r'val features must be a non-empty \[N, F\]'):
    logistic_regression_transfer(x, y, x[:0], y[:0], x, y)


@pytest.mark.parametrize('key', sorted(TRANSFER_DATASETS))
def test_datasets_name_tfds_builders_and_configs(key):
  dataset = TRANSFER_DATASETS[key]
  if dataset.tfds_name is None:
    assert dataset.note  # says why and what to do instead
    return
  name, _, config = dataset.tfds_name.partition('/')
  builder = tfds.builder_cls(name)  # resolves the class only: nothing is downloaded
  if config:
    assert config in [c.name for c in builder.BUILDER_CONFIGS]
  for split in (dataset.train_split, dataset.val_split, dataset.test_split):
    assert split.split('[')[0] in ('train', 'validation', 'test')
  assert len({dataset.train_split, dataset.val_split, dataset.test_split}) == 3


def test_the_ten_datasets_of_the_paper():
  assert sorted(TRANSFER_DATASETS) == sorted(
    [
      'food101',
      'cifar10',
      'cifar100',
      'sun397',
      'cars',
      'aircraft',
      'dtd',
      'pets',
      'caltech101',
      'flowers',
    ]
  )
