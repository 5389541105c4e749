"""msf_jax: Mean Shift for Self-Supervised Learning (ICCV 2021) in JAX and Flax."""

from msf_jax.config_utils import load_config
from msf_jax.sharding import make_mesh, put_batch, put_replicated
from msf_jax.train import make_train_step
from msf_jax.train_state import MSFState, create_state, init_state, put_state

__version__ = '0.1.0'

__all__ = [
  'MSFState',
  'create_state',
  'init_state',
  'load_config',
  'make_mesh',
  'make_train_step',
  'put_batch',
  'put_replicated',
  'put_state',
]
