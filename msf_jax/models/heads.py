"""The MLP heads of MSF: Linear -> BatchNorm1d -> ReLU -> Linear (both linears with biases)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msf_jax.models.layers import BatchGroups, BatchNorm, TorchDense


class MLPHead(nn.Module):
  """Projection (on both encoders) or prediction (online only) head.

  Submodule names mirror the official `nn.Sequential` indices: `fc_0`, `fc_1`, `fc_3`.
  The last Linear computes in at least float32 whatever `dtype`: its outputs are normalized
  into bank rows and predictions, which the float32 search and loss compare, and a bfloat16
  product would turn each direction by up to 2^-9 (the two heads' last layers are 0.2% of
  ResNet-50's FLOPs).
  """

  hidden_dim: int
  out_dim: int
  dtype: Any | None = None
  param_dtype: Any = jnp.float32
  groups: BatchGroups = BatchGroups()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = TorchDense(self.hidden_dim, self.dtype, self.param_dtype, name='fc_0')(x)
    x = nn.relu(
      BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, groups=self.groups, name='fc_1')(
        x, train
      )
    )
    last_dtype = None if self.dtype is None else jnp.promote_types(self.dtype, jnp.float32)
    return TorchDense(self.out_dim, last_dtype, self.param_dtype, name='fc_3')(x)
