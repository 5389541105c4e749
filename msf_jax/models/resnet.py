"""ResNet in torchvision's layout ("v1.5": the stride of a bottleneck sits on its 3x3 conv).

Module names follow torchvision's state-dict keys (`layer1_0/conv1` for `layer1.0.conv1`) so
that `msf_jax.interop` maps weights one to one.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msf_jax.models.layers import BatchGroups, BatchNorm, conv_kernel_init, max_pool_3x3_s2

Dtype = Any

STAGE_SIZES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}
BOTTLENECK_DEPTHS = frozenset({50, 101, 152})


def feature_dim(depth: int, width: int = 64) -> int:
  """Width of the pooled feature: 512 for basic-block ResNets, 2048 for bottleneck ones (at
  torchvision's base width of 64)."""
  return width * (32 if depth in BOTTLENECK_DEPTHS else 8)


def _conv(features: int, kernel: int, stride: int, name: str, dtype, param_dtype) -> nn.Conv:
  # Explicit symmetric padding as in PyTorch; 'SAME' pads asymmetrically at stride 2.
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_kernel_init,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class ResidualBlock(nn.Module):
  """torchvision's BasicBlock (3x3, 3x3) or, with `bottleneck`, its Bottleneck (1x1, 3x3
  carrying the stride, 1x1 to 4x the width), plus the projection shortcut when needed."""

  planes: int
  stride: int
  downsample: bool
  bottleneck: bool
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  groups: BatchGroups = BatchGroups()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(
      BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype, groups=self.groups
    )
    p, s = self.planes, self.stride
    layers = ((1, p, 1), (3, p, s), (1, 4 * p, 1)) if self.bottleneck else ((3, p, s), (3, p, 1))
    y = x
    for index, (kernel, width, stride) in enumerate(layers, start=1):
      y = norm(name=f'bn{index}')(conv(width, kernel, stride, f'conv{index}')(y), train)
      if index < len(layers):
        y = nn.relu(y)
    if self.downsample:
      x = conv(layers[-1][1], 1, s, 'downsample_0')(x)
      x = norm(name='downsample_1')(x, train)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet backbone returning globally average-pooled features (no classifier).

  `small_stem` swaps the 7x7/2 conv and max-pool for one 3x3/1 conv, for 32-64 px images.
  `width` is the first stage's channel count (torchvision: 64); narrower nets suit CPU demos.
  `groups`: the images each BatchNorm normalizes together (`BatchGroups`).
  """

  depth: int = 50
  small_stem: bool = False
  width: int = 64
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  groups: BatchGroups = BatchGroups()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}.')
    bottleneck = self.depth in BOTTLENECK_DEPTHS
    expansion = 4 if bottleneck else 1
    x = x.astype(self.dtype) if self.dtype else x
    if self.small_stem:
      x = _conv(self.width, 3, 1, 'conv1', self.dtype, self.param_dtype)(x)
    else:
      x = _conv(self.width, 7, 2, 'conv1', self.dtype, self.param_dtype)(x)
    x = nn.relu(
      BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, groups=self.groups, name='bn1')(
        x, train
      )
    )
    if not self.small_stem:
      x = max_pool_3x3_s2(x)
    in_planes = self.width
    for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
      planes = self.width * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        out_planes = planes * expansion
        x = ResidualBlock(
          planes,
          stride,
          downsample=stride != 1 or in_planes != out_planes,
          bottleneck=bottleneck,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          groups=self.groups,
          name=f'layer{stage + 1}_{index}',
        )(x, train)
        in_planes = out_planes
    return jnp.mean(x, axis=(1, 2))
