"""Shared test fixtures: small configs, random batches, tree comparisons."""

import os

import jax
import ml_collections
import numpy as np

from msf_jax.config_utils import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(depth: int = 18, image_size: int = 96, batch_size: int = 16,
                 bank_size: int = 64, topk: int = 5, small_stem: bool = False,
                 param_dtype: str = 'float32') -> ml_collections.ConfigDict:
  """The ImageNet config shrunk to CPU-test size (architecture and optimizer unchanged)."""
  config = load_config(os.path.join(REPO, 'configs', 'imagenet_msf.py'))
  config.model.depth, config.model.small_stem = depth, small_stem
  config.model.param_dtype = param_dtype
  config.image_size, config.batch_size = image_size, batch_size
  config.msf.bank_size, config.msf.topk, config.msf.bank_chunk_size = bank_size, topk, 0
  config.num_epochs, config.steps_per_epoch = 2, 10
  return config


def random_batch(rng: np.random.Generator, config: ml_collections.ConfigDict,
                 num_classes: int = 4, dtype=np.float32) -> dict[str, np.ndarray]:
  """NHWC views and labels drawn from few classes, so that purity is not trivially 0."""
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  return {'online': rng.standard_normal(shape).astype(dtype),
          'target': rng.standard_normal(shape).astype(dtype),
          'label': rng.integers(0, num_classes, config.batch_size).astype(np.int32)}


def max_scaled_error(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |actual - expected| / max |expected|: relative to the tensor's scale, not per element
  (elementwise ratios are meaningless for entries that are near zero by chance)."""
  expected = np.asarray(expected, np.float64)
  scale = np.max(np.abs(expected)) if expected.size else 0.0
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(scale, 1e-30))


def assert_trees_close(actual, expected, rtol: float) -> None:
  """Every leaf of two pytrees of the same structure within `rtol` of its scale."""
  flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(actual))
  flat_e = jax.tree.leaves(jax.device_get(expected))
  errors = {jax.tree_util.keystr(path): max_scaled_error(a, e)
            for (path, a), e in zip(flat_a, flat_e)}
  bad = {k: v for k, v in errors.items() if not v <= rtol}
  assert not bad, f'{len(bad)} leaves differ by more than {rtol}: {sorted(bad.items())[:10]}'


def relative_tree_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| over all leaves of two pytrees (Frobenius norm)."""
  pairs = zip(jax.tree.leaves(jax.device_get(actual)), jax.tree.leaves(jax.device_get(expected)))
  diff = total = 0.0
  for a, e in pairs:
    diff += float(np.sum((np.asarray(a, np.float64) - np.asarray(e, np.float64))**2))
    total += float(np.sum(np.asarray(e, np.float64)**2))
  return (diff / total)**0.5
