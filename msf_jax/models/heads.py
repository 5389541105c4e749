"""The MLP heads of MSF: Linear -> BatchNorm1d -> ReLU -> Linear (both linears with biases)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msf_jax.models.layers import BatchNorm, TorchDense


class MLPHead(nn.Module):
  """Projection (on both encoders) or prediction (online only) head.

  Submodule names mirror the official `nn.Sequential` indices: `fc_0`, `fc_1`, `fc_3`.
  """
  hidden_dim: int
  out_dim: int
  dtype: Any | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = TorchDense(self.hidden_dim, self.dtype, self.param_dtype, name='fc_0')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='fc_1')(x, train))
    return TorchDense(self.out_dim, self.dtype, self.param_dtype, name='fc_3')(x)
