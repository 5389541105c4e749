"""Layers with PyTorch's initialisation and BatchNorm semantics, so that weights and
statistics move between msf_jax and the official PyTorch code without drift."""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu') (JAX's 'normal' is untruncated).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Linear's default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_dense_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchDense(nn.Module):
  """A Dense layer initialised as torch.nn.Linear (kernel and bias both U(+-1/sqrt(fan_in)))."""
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param('kernel', dense_kernel_init, (fan_in, self.features), self.param_dtype)
    bias = self.param('bias', torch_dense_bias_init(fan_in), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return x @ kernel + bias


class BatchNorm(nn.Module):
  """BatchNorm with torch.nn.BatchNorm semantics.

  The batch is normalised with the biased variance while the running variance is updated
  with the unbiased one, as PyTorch does (Flax's BatchNorm uses the biased one for both).
  Statistics are computed in at least float32 whatever the compute dtype. Under `jit` with
  a batch sharded over a mesh, the means are over the global batch.
  """
  momentum: float = 0.1  # PyTorch's convention: weight of the new batch statistics.
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), self.param_dtype)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), self.param_dtype)

    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = xs.mean(axes)
      var = jnp.square(xs - mean).mean(axes)
      if not self.is_initializing():
        count = x.size // features
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = ((1 - self.momentum) * running_mean.value +
                              self.momentum * mean).astype(running_mean.value.dtype)
        running_var.value = ((1 - self.momentum) * running_var.value +
                             self.momentum * unbiased_var).astype(running_var.value.dtype)
    else:
      mean, var = running_mean.value, running_var.value
    y = (xs - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype or x.dtype)
