"""Tree comparisons and the pyproject reads shared by the tests (small configs and batches:
msf_jax.testing)."""

import os
import tomllib

import jax
import numpy as np

from msf_jax.testing import REPO


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
            for (path, a), e in zip(flat_a, flat_e, strict=True)}
  bad = {k: v for k, v in errors.items() if not v <= rtol}
  assert not bad, f'{len(bad)} leaves differ by more than {rtol}: {sorted(bad.items())[:10]}'


def relative_tree_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| over all leaves of two pytrees (Frobenius norm)."""
  pairs = zip(jax.tree.leaves(jax.device_get(actual)), jax.tree.leaves(jax.device_get(expected)),
              strict=True)
  diff = total = 0.0
  for a, e in pairs:
    diff += float(np.sum((np.asarray(a, np.float64) - np.asarray(e, np.float64))**2))
    total += float(np.sum(np.asarray(e, np.float64)**2))
  return (diff / total)**0.5


def pyproject() -> dict:
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def home() -> str:
  """The project's home, pyproject's Repository: every link to the project derives from it."""
  return pyproject()['project']['urls']['Repository']
