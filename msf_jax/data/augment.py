"""The host half of the MSF augmentations, in TensorFlow, with torchvision's semantics:
decoding, RandomResizedCrop, flip, and the sampling of the colour ops' parameters, which
`msf_jax.data.color` applies on the accelerator.

Every random choice is drawn with stateless ops from a per-example seed, so an example's
views are a function of (seed, epoch, index) alone. The crops and their resizes are PIL's own
(`crop_and_resize` calls Image.resize from inside the tf.data map), so the views are PIL's
uint8 pixels for the decoded image, and they cross to the accelerator at one byte a channel,
where `color.to_unit` and `color.normalize` make them float inside the device program. The
ops that take sampled parameters (`crop_and_resize`, `resize`) and the samplers
(`view_params` for the two views, `crop_window` for the probe's fused decode-and-crop) are
exposed separately so that tests can compare them with PIL and torchvision for the same
parameters.

Official transforms (the authors' code):
  weak:   RandomResizedCrop(scale=(0.2, 1)) -> flip
  strong: RandomResizedCrop(scale=(0.2, 1)) -> p=0.8 ColorJitter(0.4, 0.4, 0.4, 0.1) in a
          random order -> p=0.2 grayscale -> p=0.5 PIL GaussianBlur(sigma ~ U[0.1, 2]) -> flip
"""

import functools
import math
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from msf_jax.data import PAIRINGS, color

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's default, the linear probe's train views


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=tf.float32)


def _coin(seed, probability: float) -> tf.Tensor:
  return _uniform(seed) < probability


# ---------------------------------------------------------------------------------------------
# RandomResizedCrop


def crop_window(
  seed: tf.Tensor,
  height: tf.Tensor,
  width: tf.Tensor,
  scale: Sequence[float] = CROP_SCALE,
  ratio: Sequence[float] = CROP_RATIO,
) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params in TensorFlow, for a window needed before
  decoding (`random_resized_crop`): [top, left, crop_height, crop_width].

  Up to 10 tries of (area fraction ~ U(scale), log-aspect ~ U(log ratio)), rounded half to
  even as Python's round; the first that fits is placed uniformly. If none fits, a central
  crop at the aspect ratio clamped into `ratio`.
  """
  area_seed, aspect_seed, top_seed, left_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, 4)
  )
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target_area = h_f * w_f * _uniform(area_seed, [CROP_TRIES], scale[0], scale[1])
  aspect = tf.exp(_uniform(aspect_seed, [CROP_TRIES], math.log(ratio[0]), math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = crop_h[first], crop_w[first]
  # randint(0, n + 1) for n = height - h, width - w, from one U[0, 1) each.
  top = tf.cast(tf.floor(_uniform(top_seed) * tf.cast(height - h + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(_uniform(left_seed) * tf.cast(width - w + 1, tf.float32)), tf.int32)
  sampled = tf.stack([tf.minimum(top, height - h), tf.minimum(left, width - w), h, w])
  return tf.cond(
    tf.reduce_any(fits), lambda: sampled, lambda: _central_crop_window(height, width, ratio)
  )


def _central_crop_window(height, width, ratio):
  in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  narrow_h = tf.cast(tf.round(w_f / ratio[0]), tf.int32)
  wide_w = tf.cast(tf.round(h_f * ratio[1]), tf.int32)
  h = tf.where(in_ratio < ratio[0], narrow_h, height)
  w = tf.where(in_ratio > ratio[1], wide_w, width)
  return tf.stack([(height - h) // 2, (width - w) // 2, h, w])


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Any of JPEG, PNG, GIF, BMP to uint8 RGB [H, W, 3] (JPEG with libjpeg's accurate DCT, as
  PIL)."""
  image = tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def _pil_window(pixels: np.ndarray, window: Sequence[int]) -> Image.Image:
  """The window (top, left, height, width) of a C-contiguous uint8 RGB array as a PIL image,
  unpacked by Pillow from the array's own rows (a row stride): no copy of the whole image, and
  Pillow unpacks without the GIL. The same pixels as Image.fromarray(pixels).crop(...)."""
  top, left, height, width = window
  row = pixels.shape[1] * 3
  rows = pixels.reshape(-1)[top * row + left * 3 :]
  return Image.frombuffer('RGB', (width, height), rows, 'raw', 'RGB', row, 1)


def _rgb_into(array: np.ndarray):
  """A PIL core image in RGB mode over a uint8 [height, width, 4] array's own memory (Pillow
  keeps an RGB pixel in 4 bytes, the 4th unused): pasting into it writes the array without
  the GIL, where Image.tobytes and a numpy copy hold it for the whole copy. Pillow's C core
  (`Image.core`, pillow pinned in requirements.txt; the tests compare the views bit for bit)."""
  height, width = array.shape[:2]
  return Image.core.map_buffer(array, (width, height), 'raw', 0, ('RGB', width * 4, 1))


def _pil_crops(pixels: np.ndarray, windows, flips, height: int, width: int) -> np.ndarray:
  """[n, height, width, 4] (RGB and an unused byte): each window [top, left, h, w] of a
  uint8 RGB array resized by PIL's Image.resize(BILINEAR), then mirrored where `flips` says
  so: what torchvision's RandomResizedCrop and RandomHorizontalFlip do to a PIL image. (A
  resize with `box=` would not do: its filter reads pixels outside the window at the edges.)
  Pillow unpacks, resamples, mirrors and pastes without the GIL; the Python around it is what
  a sample holds it for."""
  views = np.empty((len(windows), height, width, 4), np.uint8)
  for view, window, flip in zip(views, windows, flips, strict=True):
    resized = _pil_window(pixels, window).resize((width, height), Image.Resampling.BILINEAR)
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
    _rgb_into(view).paste(resized.im, (0, 0, width, height))
  return views


def _pil_crops_of_tensors(pixels, windows, flips, height, width):
  return _pil_crops(pixels, windows.tolist(), flips.tolist(), int(height), int(width))


def crop_and_resize(
  image: tf.Tensor,
  windows: tf.Tensor,
  size: Sequence[int] | tf.Tensor,
  flips: tf.Tensor | None = None,
) -> tf.Tensor:
  """[n, height, width, 3] uint8: the `windows` [n, 4] (top, left, height, width) of a uint8
  RGB image, each resized to `size` (height, width) by PIL itself (crop, then
  Image.resize(BILINEAR), as the official pipeline's crops and resizes are: its pixels
  exactly), then flipped left-right where `flips` [n] (bool) is true."""
  windows = tf.convert_to_tensor(windows, tf.int32)
  flips = tf.zeros(tf.shape(windows)[:1], tf.bool) if flips is None else flips
  size = tf.convert_to_tensor(size, tf.int32)
  views = tf.numpy_function(
    _pil_crops_of_tensors, [image, windows, flips, size[0], size[1]], tf.uint8, stateful=False
  )[..., :3]
  static = tf.get_static_value(size)
  views.set_shape(
    [windows.shape[0], *([None, None] if static is None else [int(v) for v in static]), 3]
  )
  return views


# A view's uniforms, U[0, 1): CROP_TRIES area fractions, CROP_TRIES log-aspects, the window's
# top and left, the flip's coin.
VIEW_UNIFORMS = 2 * CROP_TRIES + 3


def torchvision_crop_window(
  uniforms: Sequence[float],
  height: int,
  width: int,
  scale: Sequence[float] = CROP_SCALE,
  ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params in Python, as torchvision computes it (in
  float64, Python's round), from a view's uniforms (`VIEW_UNIFORMS`): (top, left,
  crop_height, crop_width). Up to 10 tries of (area fraction ~ U(scale), log-aspect ~ U(log
  ratio)); the first that fits is placed uniformly (randint as floor(u * (n + 1))); if none
  fits, a central crop at the aspect ratio clamped into `ratio`."""
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  tries = zip(uniforms[:CROP_TRIES], uniforms[CROP_TRIES : 2 * CROP_TRIES], strict=True)
  for fraction, log_aspect in tries:
    target_area = area * (scale[0] + (scale[1] - scale[0]) * fraction)
    aspect = math.exp(log_low + (log_high - log_low) * log_aspect)
    w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = uniforms[2 * CROP_TRIES : 2 * CROP_TRIES + 2]
      return int(top * (height - h + 1)), int(left * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    h, w = height, round(height * max(ratio))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def view_params(
  uniforms: Sequence[Sequence[float]],
  height: int,
  width: int,
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
) -> tuple[list, list]:
  """Each view's crop window (top, left, height, width) and flip, from its uniforms."""
  windows = [torchvision_crop_window(u, height, width, crop_scale) for u in uniforms]
  return windows, [random_flip and u[-1] < 0.5 for u in uniforms]


def _random_views(pixels, uniforms, size, crop_scale, random_flip):
  height, width = pixels.shape[:2]
  windows, flips = view_params(uniforms.tolist(), height, width, crop_scale, random_flip)
  return _pil_crops(pixels, windows, flips, size, size)


def random_views(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
  views: int = 2,
) -> tf.Tensor:
  """[views, size, size, 3] uint8: RandomResizedCrop(size, crop_scale) -> flip of a decoded
  uint8 image, PIL's crops, in one Python call a sample. The uniforms are drawn by one
  stateless op (no GIL, far fewer host ops than the sampler's arithmetic in TensorFlow); the
  sampler's few scalar steps are Python's, as torchvision's are (`view_params`)."""
  uniforms = tf.random.stateless_uniform([views, VIEW_UNIFORMS], seed, dtype=tf.float32)
  crops = tf.numpy_function(
    functools.partial(
      _random_views, size=size, crop_scale=tuple(crop_scale), random_flip=random_flip
    ),
    [image, uniforms],
    tf.uint8,
    stateful=False,
  )[..., :3]
  crops.set_shape([views, size, size, 3])
  return crops


def resize(image: tf.Tensor, size: Sequence[int] | tf.Tensor) -> tf.Tensor:
  """PIL's Image.resize(size, BILINEAR) of a whole uint8 RGB image (`crop_and_resize`): it
  antialiases when it shrinks and rounds to uint8 as PIL does, because it is PIL's."""
  shape = tf.shape(image)
  return crop_and_resize(image, [[0, 0, shape[0], shape[1]]], size)[0]


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  top, left, height, width = tf.unstack(window)
  return image[top : top + height, left : left + width]


def random_resized_crop(
  encoded: tf.Tensor, seed: tf.Tensor, size: int, scale: Sequence[float] = CROP_SCALE
) -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio=(3/4, 4/3)) of an encoded image, uint8, for a
  single view: a JPEG is decoded only inside the crop window (fused decode-and-crop, its
  size read from the header); other formats are decoded whole, then cropped."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = crop_window(seed, shape[0], shape[1], scale)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method='INTEGER_ACCURATE')

  def other():
    image = decode(encoded)
    return _crop(image, crop_window(seed, tf.shape(image)[0], tf.shape(image)[1], scale))

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  crop.set_shape([None, None, 3])
  return resize(crop, [size, size])


# ---------------------------------------------------------------------------------------------
# Colour parameters: sampled here, applied on the accelerator by `msf_jax.data.color`.


def strong_color_params(
  seed: tf.Tensor,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.4,
  hue: float = 0.1,
) -> tf.Tensor:
  """[12] parameters (layout `color.PARAM_SLICES`) of the strong view's colour ops:
  p=0.8 ColorJitter (factors as torchvision samples them, a uniform random order of the four
  ops), p=0.2 grayscale, p=0.5 blur with sigma ~ U[0.1, 2]. All from one draw of 12
  uniforms, in vector ops: each scalar op costs the host core more than its arithmetic."""
  uniforms = _uniform(seed, [color.NUM_PARAMS])
  low = tf.constant(
    [max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue]
  )
  high = tf.constant([1 + brightness, 1 + contrast, 1 + saturation, hue])
  factors = low + (high - low) * uniforms[1:5]
  order = tf.cast(tf.argsort(uniforms[5:9]), tf.float32)  # uniform permutation
  flags = tf.cast(tf.gather(uniforms, [0, 9, 10]) < [0.8, 0.2, 0.5], tf.float32)
  sigma = color.BLUR_SIGMA[0] + (color.BLUR_SIGMA[1] - color.BLUR_SIGMA[0]) * uniforms[11:]
  return tf.concat([flags[:1], factors, order, flags[1:], sigma], axis=0)


# The weak view's: every colour op off.
WEAK_COLOR_PARAMS = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, color.BLUR_SIGMA[0])


# ---------------------------------------------------------------------------------------------
# Views


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """RandomHorizontalFlip(0.5)."""
  return tf.cond(_coin(seed, 0.5), lambda: tf.reverse(image, [1]), lambda: image)


def two_views(
  encoded: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  pairing: str = 'w/s',
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
) -> dict[str, tf.Tensor]:
  """Two independent crops of one image: {'target', 'online'} uint8 and their colour
  parameters {'target_color', 'online_color'}, to finish with `color.finish_views`.
  `pairing` names the target's and the online view's pipelines ('w/s': the paper's);
  `crop_scale` and `random_flip` change both views' geometry for data unlike ImageNet's
  (the paper's (0.2, 1) and flips by default)."""
  if pairing not in PAIRINGS:
    raise ValueError(f'Unknown augmentation pairing {pairing!r}; use one of {PAIRINGS}.')
  crop_seed, target_seed, online_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  views = random_views(decode(encoded), crop_seed, size, crop_scale, random_flip)
  colours = {'w': lambda _: tf.constant(WEAK_COLOR_PARAMS, tf.float32), 's': strong_color_params}
  target, online = pairing.split('/')
  return {
    'target': views[0],
    'target_color': colours[target](target_seed),
    'online': views[1],
    'online_color': colours[online](online_seed),
  }


def probe_view(
  encoded: tf.Tensor, seed: tf.Tensor, size: int, scale: Sequence[float] = PROBE_CROP_SCALE
) -> tf.Tensor:
  """The linear probe's train view: RandomResizedCrop(size, scale) -> flip, uint8. The
  probe's step normalizes it on the chip (`color.normalize`): the probe's stream is a
  per-step hot path too, and uint8 is a quarter of the bytes."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return flip(random_resized_crop(encoded, crop_seed, size, scale), flip_seed)


def center_crop_view(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Evaluation view: shorter side to size * 256 / 224, centre crop `size`, uint8 (PIL's
  Resize and CenterCrop; normalized on the chip by the program that takes it)."""
  image = decode(encoded)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = round(size * 256 / 224)
  scale = short / tf.reduce_min(shape)
  # torchvision Resize(int): the shorter side to `short`, the longer one int(short * ratio).
  new_shape = tf.cast(tf.maximum(tf.floor(shape * scale), short), tf.int32)
  new_shape = tf.where(shape == tf.reduce_min(shape), short, new_shape)
  image = resize(image, new_shape)
  # CenterCrop: offsets round((n - size) / 2), half to even as Python's round.
  offsets = tf.cast(tf.round(tf.cast(new_shape - size, tf.float32) / 2.0), tf.int32)
  image = image[offsets[0] : offsets[0] + size, offsets[1] : offsets[1] + size]
  image.set_shape([size, size, 3])
  return image
