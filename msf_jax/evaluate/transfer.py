"""Transfer to other datasets (the paper's 10-dataset table): L2-regularized multinomial
logistic regression on frozen, standardized features, the regularization chosen on a
validation split, then refit on train + validation and scored on test (the protocol of
Kornblith et al. 2019 that SimCLR and BYOL follow).

scikit-learn's L-BFGS solver: the problem is convex and small (features are cached, at most
a few 100k x 2048), exact to its tolerance, and needs no tuning of a learning rate, which a
JAX SGD would; a JAX L-BFGS would add code to maintain for no measurable gain here.

The regularization is per example, independent of the dataset size: the objective is
mean cross-entropy + (reg / 2) ||W||^2, which is scikit-learn's with C = 1 / (reg x n). The
same value therefore means the same thing on train and on train + validation.
"""

import dataclasses
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

DEFAULT_REGULARIZATIONS = tuple(float(r) for r in np.logspace(-6, 5, 12))
MAX_ITERATIONS = 1000


@dataclasses.dataclass(frozen=True)
class TransferDataset:
  """A dataset of the transfer table as TFDS serves it: `tfds_name` ('name' or
  'name/config'; None where TFDS 4.9.10 does not have it) and three TFDS split strings."""

  tfds_name: str | None
  train_split: str
  val_split: str
  test_split: str
  note: str = ''


_HELD_OUT = ('train[:90%]', 'train[90%:]')  # no official validation split: 10% of train

TRANSFER_DATASETS = {
  'food101': TransferDataset(
    'food101',
    *_HELD_OUT,
    'validation',
    "TFDS names the official 25,250-image test set 'validation'.",
  ),
  'cifar10': TransferDataset('cifar10', *_HELD_OUT, 'test'),
  'cifar100': TransferDataset('cifar100', *_HELD_OUT, 'test'),
  'sun397': TransferDataset(
    'sun397/standard-part1-120k',
    *_HELD_OUT,
    'test',
    'The first of the ten official train/test partitions.',
  ),
  'cars': TransferDataset('cars196', *_HELD_OUT, 'test'),
  'aircraft': TransferDataset(
    None,
    'train',
    'val',
    'test',
    'FGVC-Aircraft is not in TFDS 4.9.10 at full resolution (visual_domain_decathlon/'
    'aircraft is resized to 72 px): read it with sources.image_folder from a folder '
    'made of its train / val / test lists.',
  ),
  'dtd': TransferDataset('dtd', 'train', 'validation', 'test', 'Split 1 of the ten official ones.'),
  'pets': TransferDataset(
    'oxford_iiit_pet', *_HELD_OUT, 'test', "TFDS 'train' is the official trainval list."
  ),
  'caltech101': TransferDataset(
    'caltech101', *_HELD_OUT, 'test', "TFDS 'train' is 30 random images per class."
  ),
  'flowers': TransferDataset('oxford_flowers102', 'train', 'validation', 'test'),
}


def _fit(
  model: LogisticRegression, features: np.ndarray, labels: np.ndarray, regularization: float
) -> LogisticRegression:
  model.set_params(C=1.0 / (regularization * len(features)))
  with warnings.catch_warnings():  # weak regularizations of separable data converge slowly
    warnings.simplefilter('ignore', ConvergenceWarning)
    return model.fit(features, labels)


def _accuracy(
  model: LogisticRegression, scaler: StandardScaler, features: np.ndarray, labels: np.ndarray
) -> float:
  return float(np.mean(model.predict(scaler.transform(features)) == labels))


def logistic_regression_transfer(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  val_features: np.ndarray,
  val_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  regularizations: tuple[float, ...] = DEFAULT_REGULARIZATIONS,
) -> dict:
  """{'regularization', 'val_accuracy', 'test_accuracy', 'val_accuracies'}.

  Each regularization is fit on train (standardized with train's statistics) and scored on
  validation, from the strongest to the weakest, each fit starting from the previous one's
  weights; among equal validation accuracies the strongest wins. The chosen one is refit from
  scratch on train + validation (standardized with their statistics) and scored on test."""
  if not regularizations or min(regularizations) <= 0:
    raise ValueError(f'regularizations must be positive values, got {regularizations}.')
  for name, features, labels in (
    ('train', train_features, train_labels),
    ('val', val_features, val_labels),
    ('test', test_features, test_labels),
  ):
    if np.ndim(features) != 2 or np.shape(labels) != (len(features),) or not len(features):
      raise ValueError(
        f'{name} features must be a non-empty [N, F] with labels [N]; got '
        f'{np.shape(features)} and {np.shape(labels)}.'
      )
  scaler = StandardScaler().fit(train_features)
  standardized = scaler.transform(train_features)
  model = LogisticRegression(max_iter=MAX_ITERATIONS, warm_start=True)
  val_accuracies = {}
  for regularization in sorted(regularizations, reverse=True):
    _fit(model, standardized, train_labels, regularization)
    val_accuracies[regularization] = _accuracy(model, scaler, val_features, val_labels)
  best = max(val_accuracies, key=lambda r: (val_accuracies[r], r))
  all_features = np.concatenate([train_features, val_features])
  scaler = StandardScaler().fit(all_features)
  model = _fit(
    LogisticRegression(max_iter=MAX_ITERATIONS),
    scaler.transform(all_features),
    np.concatenate([train_labels, val_labels]),
    best,
  )
  return {
    'regularization': best,
    'val_accuracy': val_accuracies[best],
    'test_accuracy': _accuracy(model, scaler, test_features, test_labels),
    'val_accuracies': val_accuracies,
  }
