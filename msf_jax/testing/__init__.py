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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, 'configs')


def small_config(depth: int = 18, image_size: int = 96, batch_size: int = 16,
                 bank_size: int = 64, topk: int = 5, small_stem: bool = False,
                 param_dtype: str = 'float32') -> ml_collections.ConfigDict:
  """The ImageNet config shrunk to CPU-test size (architecture and optimizer unchanged)."""
  config = load_config(os.path.join(CONFIGS, 'imagenet_msf.py'))
  config.model.depth, config.model.small_stem = depth, small_stem
  config.model.param_dtype = param_dtype
  config.image_size, config.batch_size = image_size, batch_size
  config.msf.bank_size, config.msf.topk, config.msf.bank_chunk_size = bank_size, topk, 0
  config.num_epochs = 2
  return config


def random_batch(rng: np.random.Generator, config: ml_collections.ConfigDict,
                 num_classes: int = 4, dtype=np.float32) -> dict[str, np.ndarray]:
  """NHWC views and labels drawn from few classes, so that purity is not trivially 0."""
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  return {'online': rng.standard_normal(shape).astype(dtype),
          'target': rng.standard_normal(shape).astype(dtype),
          'label': rng.integers(0, num_classes, config.batch_size).astype(np.int32)}
