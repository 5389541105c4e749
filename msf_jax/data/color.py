"""The colour half of the MSF augmentations, in JAX on the accelerator, batched.

The host (tf.data) crops, resizes and flips, and samples each example's colour parameters
from its seed; the pixel work of ColorJitter, RandomGrayscale and GaussianBlur, and the
normalization, run here on whole batches, where they cost next to nothing instead of about
half of a host core's time. Semantics are torchvision's on PIL images: PIL's ImageEnhance
for brightness, contrast (against the rounded mean grey level) and saturation, torchvision's
HSV hue rotation, ITU-R 601 grey, and PIL's GaussianBlur (three extended box passes per
axis, edges replicated). Flipping before these ops, instead of after as torchvision does,
changes nothing: each commutes with a horizontal mirror.

Views cross from the host as uint8 pixels (PIL's 8-bit crops, a quarter of float32's bytes);
`to_unit` turns them into [0, 1] floats here, on the chip, inside the program that consumes
them. A view's parameters travel as one float32 vector per example, laid out as
`PARAM_SLICES`.
"""

import functools
import math
import operator

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert('L')
BLUR_SIGMA = (0.1, 2.0)
BLUR_PASSES = 3
# [jitter?, brightness, contrast, saturation, hue, order (4 op indices), grey?, blur?, sigma]
PARAM_SLICES = {
  'jitter': slice(0, 1),
  'factors': slice(1, 5),
  'order': slice(5, 9),
  'gray': slice(9, 10),
  'blur': slice(10, 11),
  'sigma': slice(11, 12),
}
NUM_PARAMS = 12


def luma(images: jax.Array) -> jax.Array:
  """[..., H, W, 1] ITU-R 601-2 luma of [..., H, W, 3] images."""
  return jnp.tensordot(images, jnp.asarray(LUMA_WEIGHTS, images.dtype), axes=1)[..., None]


def _per_image(factor: jax.Array, images: jax.Array) -> jax.Array:
  """A per-example factor [B] broadcast against images [B, H, W, C]."""
  return jnp.reshape(factor, jnp.shape(factor) + (1,) * (images.ndim - jnp.ndim(factor)))


def _blend(degenerate, images, factor):
  return jnp.clip(degenerate + _per_image(factor, images) * (images - degenerate), 0.0, 1.0)


def grayscale(images: jax.Array) -> jax.Array:
  """PIL convert('L') back to 3 channels."""
  return jnp.broadcast_to(luma(images), images.shape)


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Brightness: blend with black."""
  return _blend(jnp.zeros_like(images), images, factor)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast: blend with the mean grey level, rounded to a uint8 level as PIL."""
  mean = jnp.mean(luma(images), axis=(-3, -2, -1), keepdims=True)
  return _blend(jnp.round(mean * 255.0) / 255.0, images, factor)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Color: blend with the grey version."""
  return _blend(luma(images), images, factor)


def _rgb_to_hsv(images):
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  value = jnp.max(images, axis=-1)
  delta = value - jnp.min(images, axis=-1)
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  saturation = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0), 0.0)
  hue = jnp.where(
    value == red,
    (green - blue) / safe_delta,
    jnp.where(value == green, 2.0 + (blue - red) / safe_delta, 4.0 + (red - green) / safe_delta),
  )
  hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
  return hue, saturation, value


def _hsv_to_rgb(hue, saturation, value):
  # Each channel from the distance of the hue to that channel's sextant (n = 5, 3, 1).
  def channel(n):
    k = jnp.mod(n + hue * 6.0, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(images: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision adjust_hue: rotate the HSV hue by `factor` turns (in [-0.5, 0.5])."""
  hue, saturation, value = _rgb_to_hsv(images)
  hue = jnp.mod(hue + _per_image(factor, hue), 1.0)
  return jnp.clip(_hsv_to_rgb(hue, saturation, value), 0.0, 1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """ColorJitter with per-example factors [B, 4] (brightness, contrast, saturation, hue) and
  orders [B, 4] (a permutation of the op indices 0-3 each)."""
  for position in range(4):
    chosen = order[:, position]
    result = images
    for index, op in enumerate(JITTER_OPS):
      result = jnp.where(_per_image(chosen == index, images), op(images, factors[:, index]), result)
    images = result
  return images


def pil_box_radius(sigma, sqrt=jnp.sqrt, floor=jnp.floor):
  """The fractional box radius Pillow's BoxBlur.c uses for a Gaussian of standard deviation
  `sigma` over three passes (Gwosdek et al. 2011); with math.sqrt and math.floor it works on
  Python floats."""
  sigma2 = sigma * sigma / BLUR_PASSES
  length = sqrt(12.0 * sigma2 + 1.0)
  whole = floor((length - 1.0) / 2.0)
  fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
  fraction /= 6 * (sigma2 - (whole + 1) * (whole + 1))
  return whole + fraction


def _box_kernels(sigma: jax.Array, half_width: int) -> jax.Array:
  """[B, 2 * half_width + 1]: weight 1/(2r+1) on the 2*floor(r)+1 central taps and the rest
  split between the next two, for each example's radius r."""
  radius = pil_box_radius(sigma)[:, None]
  whole = jnp.floor(radius)
  inner = 1.0 / (2.0 * radius + 1.0)
  edge = (1.0 - (2.0 * whole + 1.0) * inner) / 2.0
  distance = jnp.abs(jnp.arange(-half_width, half_width + 1, dtype=sigma.dtype))[None]
  return jnp.where(distance <= whole, inner, jnp.where(distance == whole + 1, edge, 0.0))


def _box_pass(images: jax.Array, kernels: jax.Array, axis: int) -> jax.Array:
  half_width = (kernels.shape[1] - 1) // 2
  pad = [(0, 0)] * images.ndim
  pad[axis] = (half_width, half_width)
  padded = jnp.pad(images, pad, mode='edge')
  size = images.shape[axis]
  return functools.reduce(
    operator.add,
    (
      _per_image(kernels[:, tap], images) * jax.lax.slice_in_dim(padded, tap, tap + size, axis=axis)
      for tap in range(kernels.shape[1])
    ),
  )


def gaussian_blur(
  images: jax.Array, sigma: jax.Array, max_sigma: float = BLUR_SIGMA[1]
) -> jax.Array:
  """PIL's ImageFilter.GaussianBlur(radius=sigma) of [B, H, W, C] images, sigma [B]: three
  box passes along the width, then three along the height, edges replicated each pass."""
  half_width = math.floor(pil_box_radius(max_sigma, math.sqrt, math.floor)) + 1
  kernels = _box_kernels(sigma, half_width)
  for axis in (2, 1):
    for _ in range(BLUR_PASSES):
      images = _box_pass(images, kernels, axis)
  return images


def to_unit(images: jax.Array) -> jax.Array:
  """uint8 levels k as float32 k / 255 (the host ships views as uint8); float images, already
  in [0, 1], pass unchanged, so that tests and callers may hand either."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images


def normalize(images: jax.Array) -> jax.Array:
  """ImageNet normalization of uint8 or [0, 1] float images."""
  return (to_unit(images) - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def apply_view_colors(images: jax.Array, params: jax.Array) -> jax.Array:
  """Colour ops of a batch of views [B, H, W, 3] (uint8, or float in [0, 1]) given their
  params [B, 12], then normalization. Weak views carry params that switch every op off."""
  images = to_unit(images)
  get = lambda name: params[:, PARAM_SLICES[name]]
  flag = lambda name: _per_image(get(name)[:, 0] > 0.5, images)
  jittered = color_jitter(images, get('factors'), get('order').astype(jnp.int32))
  images = jnp.where(flag('jitter'), jittered, images)
  images = jnp.where(flag('gray'), grayscale(images), images)
  images = jnp.where(flag('blur'), gaussian_blur(images, get('sigma')[:, 0]), images)
  return normalize(images)


@functools.partial(jax.jit, static_argnames='pairing')
def finish_views(batch: dict[str, jax.Array], pairing: str = 'w/s') -> dict[str, jax.Array]:
  """The train step's batch from the pipeline's (uint8 views): {'online', 'target', 'label'},
  normalized float32, and 'target_order' where the target views come shuffled.
  `pairing` (target/online, as the pipeline's) lets weak views skip the colour ops, whose
  parameters would switch them all off anyway."""
  finished: dict[str, jax.Array] = {
    key: batch[key] for key in ('label', 'target_order') if key in batch
  }
  for key, kind in zip(('target', 'online'), pairing.split('/'), strict=True):
    images = batch[key]
    finished[key] = (
      apply_view_colors(images, batch[f'{key}_color']) if kind == 's' else normalize(images)
    )
  return finished
