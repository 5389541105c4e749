"""ResNet in torchvision's layout ("v1.5": the stride of a bottleneck sits on its 3x3 conv).

Module names follow torchvision's state-dict keys (`layer1_0/conv1` for `layer1.0.conv1`) so
that `msf_jax.interop` maps weights one to one.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from msf_jax.models.layers import BatchNorm, conv_kernel_init, max_pool_3x3_s2

Dtype = Any

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
               152: (3, 8, 36, 3)}
BOTTLENECK_DEPTHS = frozenset({50, 101, 152})


def feature_dim(depth: int) -> int:
  """Width of the pooled feature: 512 for basic-block ResNets, 2048 for bottleneck ones."""
  return 2048 if depth in BOTTLENECK_DEPTHS else 512


def _conv(features: int, kernel: int, stride: int, name: str, dtype, param_dtype) -> nn.Conv:
  # Explicit symmetric padding as in PyTorch; 'SAME' pads asymmetrically at stride 2.
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.relu(norm(name='bn1')(conv(self.planes, 3, self.stride, 'conv1')(x), train))
    y = norm(name='bn2')(conv(self.planes, 3, 1, 'conv2')(y), train)
    if self.downsample:
      x = conv(self.planes, 1, self.stride, 'downsample_0')(x)
      x = norm(name='downsample_1')(x, train)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.relu(norm(name='bn1')(conv(self.planes, 1, 1, 'conv1')(x), train))
    y = nn.relu(norm(name='bn2')(conv(self.planes, 3, self.stride, 'conv2')(y), train))
    y = norm(name='bn3')(conv(self.planes * 4, 1, 1, 'conv3')(y), train)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, 'downsample_0')(x)
      x = norm(name='downsample_1')(x, train)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet backbone returning globally average-pooled features (no classifier).

  `small_stem` swaps the 7x7/2 conv and max-pool for one 3x3/1 conv, for 32-64 px images.
  """
  depth: int = 50
  small_stem: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}.')
    block_cls = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
    x = x.astype(self.dtype) if self.dtype else x
    if self.small_stem:
      x = _conv(64, 3, 1, 'conv1', self.dtype, self.param_dtype)(x)
    else:
      x = _conv(64, 7, 2, 'conv1', self.dtype, self.param_dtype)(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='bn1')(x, train))
    if not self.small_stem:
      x = max_pool_3x3_s2(x)
    in_planes = 64
    for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
      planes = 64 * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        out_planes = planes * block_cls.expansion
        x = block_cls(planes, stride, downsample=stride != 1 or in_planes != out_planes,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f'layer{stage + 1}_{index}')(x, train)
        in_planes = out_planes
    return jnp.mean(x, axis=(1, 2))
