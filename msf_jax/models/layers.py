"""Layers with PyTorch's initialisation and BatchNorm semantics, so that weights and
statistics move between msf_jax and the official PyTorch code without drift."""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class BatchGroups:
  """Which images a BatchNorm normalizes together in training mode.

  The official run is `nn.DataParallel` on 4 GPUs: each GPU normalizes its own consecutive
  share of the batch. Here a group is `size` consecutive images of what the layer sees (0:
  all of them, which under `jit` on a sharded batch is the global batch), or, when `devices`
  > 1, all the images of that many consecutive devices along `axis_name` (inside
  `jax.shard_map`). Such a group's sums are reduced by a `psum` with `axis_index_groups`
  over its devices only (jax's shard_map supports it; a 2-D mesh would change the bank's
  axis, and an all-gather would move every device's sums to every device), in two passes
  (mean, then squared deviations) as a single device computes them.
  """

  size: int = 0
  axis_name: str | None = None
  devices: int = 1

  def device_groups(self) -> list[list[int]] | None:
    """The `axis_index_groups` of a group spanning devices, None when it does not."""
    if self.devices == 1:
      return None
    count = jax.lax.axis_size(self.axis_name)
    return [list(range(start, start + self.devices)) for start in range(0, count, self.devices)]


WHOLE_BATCH = BatchGroups()  # BatchNorm over everything a layer sees


class BatchNorm(nn.Module):
  """BatchNorm with torch.nn.BatchNorm semantics, over the groups of `groups`.

  The batch is normalised with the biased variance while the running variance is updated
  with the unbiased one, as PyTorch does (Flax's BatchNorm uses the biased one for both).
  Statistics are computed in at least float32 whatever the compute dtype. The running
  statistics are those of the first group, as `nn.DataParallel` keeps the updates of its
  first replica only; the unbiased variance counts that group's values.
  """

  momentum: float = 0.1  # PyTorch's convention: weight of the new batch statistics.
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  groups: BatchGroups = BatchGroups()

  def _group_mean(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Mean of each group over `axes` (kept), summed over the group's devices if it spans
    several."""
    if self.groups.devices == 1:
      return x.mean(axes, keepdims=True)
    count = self.groups.devices * (x.size // (x.shape[0] * x.shape[-1]))
    total = jax.lax.psum(
      x.sum(axes, keepdims=True),
      self.groups.axis_name,
      axis_index_groups=self.groups.device_groups(),
    )
    return total / count

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), self.param_dtype)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), self.param_dtype)

    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    normalize = lambda v, mean, var: (v - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    xs = x.astype(stat_dtype)
    if not train:
      return normalize(xs, running_mean.value, running_var.value).astype(self.dtype or x.dtype)
    size = self.groups.size or x.shape[0]
    grouped = xs.reshape((x.shape[0] // size, size) + x.shape[1:])  # [groups, size, ..., C]
    axes = tuple(range(1, grouped.ndim - 1))
    mean = self._group_mean(grouped, axes)
    var = self._group_mean(jnp.square(grouped - mean), axes)
    if not self.is_initializing():
      count = self.groups.devices * (grouped[0].size // features)
      first_mean, first_var = mean[0].reshape(features), var[0].reshape(features)
      unbiased_var = first_var * (count / max(count - 1, 1))
      running_mean.value = (
        (1 - self.momentum) * running_mean.value + self.momentum * first_mean
      ).astype(running_mean.value.dtype)
      running_var.value = (
        (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
      ).astype(running_var.value.dtype)
    y = normalize(grouped, mean, var).reshape(x.shape)
    return y.astype(self.dtype or x.dtype)


def _pool_windows(x: jax.Array) -> jax.Array:
  """The 9 strided views [9, B, H', W', C] of 3x3 windows at stride 2, padded with -inf."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  height, width = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return jnp.stack(
    [
      padded[:, i : i + 2 * height - 1 : 2, j : j + 2 * width - 1 : 2]
      for i in range(3)
      for j in range(3)
    ]
  )


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
    padded = padded.at[:, i : i + 2 * height - 1 : 2, j : j + 2 * width - 1 : 2].add(
      jnp.where(argmax == position, grad, 0)
    )
  return (padded[:, 1:-1, 1:-1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
