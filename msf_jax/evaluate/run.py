"""The evaluation program: a frozen encoder's kNN, linear-probe and transfer accuracies.

`evaluate(config, workdir)` loads the encoder (msf_jax.interop.backbones), computes the
centre-crop features of each split once (cached in workdir/features, so that a rerun or
another task reuses them), runs `config.tasks` and writes every result to TensorBoard (CLU)
and, from process 0, to workdir/eval_results.json. It runs as it is on one device or on
many hosts: features are computed sharded over all devices and gathered on every host.
"""

import datetime
import functools
import json
import os
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from msf_jax.checkpoint import manager_directory
from msf_jax.config_utils import ConfigError
from msf_jax.data import sources
from msf_jax.evaluate.features import cached_features, write_atomically
from msf_jax.evaluate.knn import knn_accuracies
from msf_jax.evaluate.linear_probe import ProbeSettings, linear_probe, linear_probe_on_features
from msf_jax.evaluate.transfer import TRANSFER_DATASETS, logistic_regression_transfer
from msf_jax.interop import backbones
from msf_jax.sharding import make_mesh

TASKS = ('knn', 'linear_fast', 'linear', 'transfer')
RESULTS_FILE = 'eval_results.json'
CACHE_DIR = 'features'
PROJECTOR_DIR = 'projector'
PROJECTOR_POINTS = 5000  # the projector's browser page stays responsive up to a few thousand

Features = tuple[np.ndarray, np.ndarray]


def parse_names(value: str | Sequence[str], allowed: Sequence[str], key: str) -> tuple[str, ...]:
  """Names from a comma-separated string or a sequence, each checked against `allowed`."""
  given = value.split(',') if isinstance(value, str) else list(value)
  names = tuple(dict.fromkeys(name.strip() for name in given if name.strip()))
  unknown = [name for name in names if name not in allowed]
  if unknown or not names:
    problem = f'unknown {unknown}' if unknown else 'nothing to run'
    raise ConfigError(
      f'config.{key} = {value!r}: {problem}; choose from {", ".join(allowed)} (comma-separated).'
    )
  return names


def _split(config: ml_collections.ConfigDict, split: sources.Split) -> sources.Split:
  """The split, cut to its first config.data.max_examples when that is set."""
  return sources.take(split, config.data.max_examples) if config.data.max_examples else split


def _transfer_splits(
  name: str, config: ml_collections.ConfigDict
) -> tuple[sources.Split, sources.Split, sources.Split]:
  """(train, validation, test) of a transfer dataset from TFDS in config.data.data_dir; an
  unprepared one is a DatasetNotFoundError saying how to prepare it."""
  dataset = TRANSFER_DATASETS[name]
  if dataset.tfds_name is None:
    raise sources.DatasetNotFoundError(
      f'The transfer dataset {name!r} has no TFDS version: {dataset.note}'
    )
  train, validation, test = (
    _split(
      config, sources.tfds_split(dataset.tfds_name, split, config.data.get('data_dir') or None)
    )
    for split in (dataset.train_split, dataset.val_split, dataset.test_split)
  )
  return train, validation, test


def _prefixed(prefix: str, results: dict[str, float]) -> dict[str, float]:
  return {f'{prefix}/{key}': float(value) for key, value in results.items()}


def _transfer(
  name: str, splits: Sequence[sources.Split], features: Callable[[sources.Split], Features]
) -> dict[str, float]:
  """Test and validation accuracy and the chosen regularization of the logistic regression."""
  (train, val, test) = (features(split) for split in splits)
  result = logistic_regression_transfer(*train, *val, *test)
  return {
    f'transfer/{name}/top1': result['test_accuracy'],
    f'transfer/{name}/val_top1': result['val_accuracy'],
    f'transfer/{name}/regularization': result['regularization'],
  }


def _linear_options(config: ml_collections.ConfigDict) -> dict:
  linear = config.linear
  settings = ProbeSettings(
    epochs=linear.epochs,
    batch_size=linear.batch_size,
    lr=linear.lr,
    momentum=linear.momentum,
    weight_decay=linear.weight_decay,
    milestones=tuple(linear.milestones),
  )
  return {'settings': settings, 'seed': config.seed}


def dataset_name(data: ml_collections.ConfigDict) -> str:
  """What a config's data section reads, in a word or a path."""
  return {'digits': 'digits', 'tfds': data.get('name'), 'folder': data.get('root')}.get(
    data.source, data.source
  )


def _report(
  results: dict[str, float],
  config: ml_collections.ConfigDict,
  workdir: str,
  undecodable: dict[str, dict],
) -> None:
  """TensorBoard scalars at the checkpoint's step (0 if unknown), and the JSON record from
  process 0, with the images of each split that could not be decoded."""
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(config.get('step') or 0, results)
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    record = {
      'results': results,
      'checkpoint': manager_directory(config.checkpoint) if config.checkpoint else '',
      'checkpoint_format': config.checkpoint_format,
      'encoder': config.encoder,
      'step': config.get('step'),
      'dataset': dataset_name(config.data),
      'splits': [config.data.train_split, config.data.test_split],
      'max_examples': config.data.max_examples,
      'image_size': config.image_size,
      'model': config.model.to_dict(),
      'undecodable_images': undecodable,
      'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    write_atomically(
      os.path.join(workdir, RESULTS_FILE), json.dumps(record, indent=2, sort_keys=True).encode()
    )


def write_projector(
  workdir: str,
  features: np.ndarray,
  labels: np.ndarray,
  name: str,
  max_points: int = PROJECTOR_POINTS,
) -> None:
  """TensorBoard's embedding projector for (the first `max_points` of) a split's features:
  TSV files and the projector_config.pbtxt that points at them, from process 0."""
  if jax.process_index() > 0:
    return
  features, labels = features[:max_points], labels[:max_points]
  rows = '\n'.join('\t'.join(f'{x:.6g}' for x in row) for row in features)
  write_atomically(os.path.join(workdir, PROJECTOR_DIR, 'features.tsv'), rows.encode())
  write_atomically(
    os.path.join(workdir, PROJECTOR_DIR, 'labels.tsv'),
    '\n'.join(map(str, labels.tolist())).encode(),
  )
  config = (
    f'embeddings {{\n  tensor_name: "{name}"\n'
    f'  tensor_path: "{PROJECTOR_DIR}/features.tsv"\n'
    f'  metadata_path: "{PROJECTOR_DIR}/labels.tsv"\n}}\n'
  )
  write_atomically(os.path.join(workdir, 'projector_config.pbtxt'), config.encode())


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs config.tasks on the encoder config.checkpoint names; returns {metric: value}, e.g.
  'knn/majority/k=20', 'linear_fast/top1', 'linear/top5', 'transfer/cifar10/top1'."""
  tasks = parse_names(config.tasks, TASKS, 'tasks')
  transfer = (
    parse_names(config.transfer.datasets, tuple(TRANSFER_DATASETS), 'transfer.datasets')
    if 'transfer' in tasks
    else ()
  )
  config = config.copy_and_resolve_references()
  if config.checkpoint_format == 'msf_jax':  # read and record one step, even mid-training
    config.step = backbones.msf_jax_step(config.checkpoint, config.get('step'))
  variables, model_config = backbones.load_encoder(config)
  with config.unlocked():
    config.model = model_config
  # Every split is opened before any compute, so that a missing dataset fails at once.
  train_split = _split(
    config, sources.build_split(config.data, config.data.train_split, config.image_size)
  )
  test_split = _split(
    config, sources.build_split(config.data, config.data.test_split, config.image_size)
  )
  transfer_splits = {name: _transfer_splits(name, config) for name in transfer}
  mesh = make_mesh()
  cache_dir = os.path.join(workdir, CACHE_DIR)

  undecodable = {}

  @functools.cache
  def features(split: sources.Split) -> Features:
    extracted = cached_features(variables, split, config, mesh, cache_dir, config.batch_size)
    undecodable[split.name] = {'count': extracted.skipped, 'first': list(extracted.skipped_names)}
    return extracted.features, extracted.labels

  num_classes = train_split.num_classes
  runners: dict[str, Callable[[], dict[str, float]]] = {
    'knn': lambda: knn_accuracies(
      *features(train_split),
      *features(test_split),
      num_classes,
      ks=tuple(config.knn.ks),
      seed=config.seed,
      mesh=mesh,
    ),
    'linear_fast': lambda: _prefixed(
      'linear_fast',
      linear_probe_on_features(
        *features(train_split), *features(test_split), num_classes, **_linear_options(config)
      ),
    ),
    'linear': lambda: _prefixed(
      'linear',
      linear_probe(
        variables,
        config,
        mesh,
        train_split,
        test_split,
        **_linear_options(config),
        train_features=features(train_split)[0],
        test_features=features(test_split),
        eval_batch_size=config.batch_size,
      ),
    ),
    'transfer': lambda: {
      key: value
      for name, splits in transfer_splits.items()
      for key, value in _transfer(name, splits, features).items()
    },
  }
  results = {}
  for task in tasks:
    logging.info('Evaluating %s.', task)
    results.update(runners[task]())
  _report(results, config, workdir, undecodable)
  write_projector(workdir, *features(test_split), test_split.name)
  logging.info('Results: %s', ', '.join(f'{key} {value:.4g}' for key, value in results.items()))
  return results
