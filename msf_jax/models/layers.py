"""Layers with PyTorch's initialisation and BatchNorm semantics, so that weights and
statistics move between msf_jax and the official PyTorch code without drift."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def _pool_windows(x: jax.Array) -> jax.Array:
  """The 9 strided views [9, B, H', W', C] of 3x3 windows at stride 2, padded with -inf."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  height, width = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return jnp.stack([padded[:, i:i + 2 * height - 1:2, j:j + 2 * width - 1:2]
                    for i in range(3) for j in range(3)])


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """MaxPool2d(3, stride=2, padding=1) whose gradient goes to the first maximum of each window,
  as PyTorch's does.

  With `nn.max_pool` (reduce-window, differentiated by select-and-scatter), float32
  gradients of a ResNet-18 on the CPU were 1e-3 to 1e-2 off float64 in the block after the
  pool, where PyTorch float32 was 1e-5 off; with this version they are 1e-5 off too. The
  forward's argmax is kept as the residual and the backward only scatters to it.
  """
  return jnp.max(_pool_windows(x), axis=0)


def _max_pool_fwd(x):
  windows = _pool_windows(x)
  return jnp.max(windows, axis=0), (jnp.argmax(windows, axis=0).astype(jnp.int8), x.shape)


def _max_pool_bwd(residuals, grad):
  argmax, shape = residuals
  padded = jnp.zeros((shape[0], shape[1] + 2, shape[2] + 2, shape[3]), grad.dtype)
  height, width = grad.shape[1], grad.shape[2]
  for position in range(9):
    i, j = divmod(position, 3)
    padded = padded.at[:, i:i + 2 * height - 1:2, j:j + 2 * width - 1:2].add(
        jnp.where(argmax == position, grad, 0))
  return (padded[:, 1:-1, 1:-1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
