"""What the tests and benchmarks share: CPU-sized configs, random batches, and the reference
implementations that parity is checked against (PyTorch and PIL; torch is imported only by
`msf_jax.testing.torch_reference`, so it stays a test-only dependency).

`small_config` reads the checkout's configs/ folder: these helpers serve the repository's
tests and benchmarks, not an installed package.
"""

import os

import ml_collections
import numpy as np

from msf_jax.config_utils import load_config
from msf_jax.data import color

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, 'configs')


def small_config(
  depth: int = 18,
  image_size: int = 96,
  batch_size: int = 16,
  bank_size: int = 64,
  topk: int = 5,
  small_stem: bool = False,
  param_dtype: str = 'float32',
  width: int = 64,
  bn_group_size: int = 0,
  shuffle_target: bool = False,
) -> ml_collections.ConfigDict:
  """The ImageNet config shrunk to CPU-test size (architecture and optimizer unchanged);
  BatchNorm over the whole batch and the target unshuffled unless asked (a single-GPU run)."""
  config = load_config(os.path.join(CONFIGS, 'imagenet_msf.py'))
  config.model.depth, config.model.small_stem = depth, small_stem
  config.model.param_dtype, config.model.width = param_dtype, width
  config.image_size, config.batch_size = image_size, batch_size
  config.msf.bank_size, config.msf.topk, config.msf.bank_chunk_size = bank_size, topk, 0
  config.model.bn_group_size, config.msf.shuffle_target = bn_group_size, shuffle_target
  config.num_epochs = 2
  return config


def random_batch(
  rng: np.random.Generator,
  config: ml_collections.ConfigDict,
  num_classes: int = 4,
  dtype=np.float32,
) -> dict[str, np.ndarray]:
  """Finished (normalized) NHWC views and labels drawn from few classes, so that purity is
  not trivially 0: a step made with `finish_views=False` takes them."""
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  return {
    'online': rng.standard_normal(shape).astype(dtype),
    'target': rng.standard_normal(shape).astype(dtype),
    'label': rng.integers(0, num_classes, config.batch_size).astype(np.int32),
  }


def random_color_params(rng: np.random.Generator, batch_size: int) -> np.ndarray:
  """[B, NUM_PARAMS] strong-view colour parameters, drawn as the host stage draws them
  (jitter p=0.8, its factors and a random order, grey p=0.2, blur p=0.5)."""
  coin = lambda p: (rng.random((batch_size, 1)) < p).astype(np.float32)
  factors = rng.uniform([0.6, 0.6, 0.6, -0.1], [1.4, 1.4, 1.4, 0.1], (batch_size, 4))
  order = np.argsort(rng.random((batch_size, 4)), axis=1)
  sigma = rng.uniform(*color.BLUR_SIGMA, (batch_size, 1))
  return np.concatenate([coin(0.8), factors, order, coin(0.2), coin(0.5), sigma], axis=1).astype(
    np.float32
  )


def random_host_batch(
  rng: np.random.Generator, config: ml_collections.ConfigDict, num_classes: int = 4
) -> dict[str, np.ndarray]:
  """The host stage's batch (uint8 views with their colour parameters), which the train
  step finishes itself: both views carry strong parameters, whatever the pairing. With
  config.msf.shuffle_target, a random 'target_order' (the views are random already)."""
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  views = {name: rng.integers(0, 256, shape, np.uint8) for name in ('online', 'target')}
  colors = {
    f'{name}_color': random_color_params(rng, config.batch_size) for name in ('online', 'target')
  }
  batch = {
    **views,
    **colors,
    'label': rng.integers(0, num_classes, config.batch_size).astype(np.int32),
  }
  if config.msf.get('shuffle_target', False):
    batch['target_order'] = rng.permutation(config.batch_size).astype(np.int32)
  return batch
