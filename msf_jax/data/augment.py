"""The host half of the MSF augmentations, in TensorFlow, with torchvision's semantics:
decoding, RandomResizedCrop, flip, and the sampling of the colour ops' parameters, which
`msf_jax.data.color` applies on the accelerator.

Every random choice is drawn with stateless ops from a per-example seed, so an example's
views are a function of (seed, epoch, index) alone. Views are uint8 RGB, as PIL's crops are:
the resize rounds to 8 bits as PIL's does, and the views cross to the accelerator at one byte
a channel, where `color.to_unit` and `color.normalize` make them float inside the device
program. The ops that take sampled parameters (`crop_window`, `resize`) are exposed
separately so that tests can compare them with PIL for the same parameters.

`two_views(crops='pil')` (`config.data.crops`) has PIL itself crop, resize and flip the two
views instead, inside the tf.data map (`random_views`): PIL's pixels exactly and more samples
a host core, but each sample holds the GIL for a while, which caps one process below what a
TPU host needs; TensorFlow's crops, the default, hold none.

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

from msf_jax.data import CROPS, PAIRINGS, color

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
  """torchvision's RandomResizedCrop.get_params: [top, left, crop_height, crop_width].

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


def resize(image: tf.Tensor, size: Sequence[int] | tf.Tensor) -> tf.Tensor:
  """Bilinear resize of a uint8 image that antialiases when it shrinks, as PIL's BILINEAR,
  rounded half up and clipped to uint8 as PIL returns it: closer to PIL's pixels than the
  float result, and a quarter of its bytes to send. (PIL also rounds between its horizontal
  and vertical passes; two resizes that did so were about twice as slow on the host.)"""
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.floor(resized + 0.5), 0.0, 255.0), tf.uint8)


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


def random_resized_crop_decoded(
  image: tf.Tensor, seed: tf.Tensor, size: int, scale: Sequence[float] = CROP_SCALE
) -> tf.Tensor:
  """RandomResizedCrop of an already decoded uint8 image: two views of one image decode it
  once (on ImageNet-sized JPEGs one full decode costs about what one fused crop-decode does)."""
  shape = tf.shape(image)
  return resize(_crop(image, crop_window(seed, shape[0], shape[1], scale)), [size, size])


# ---------------------------------------------------------------------------------------------
# RandomResizedCrop by PIL itself (`two_views(crops='pil')`)

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
  fits, a central crop at the aspect ratio clamped into `ratio`. A few scalar steps: cheaper
  in Python than as TensorFlow ops on the host."""
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


def _pil_window(pixels: np.ndarray, window: Sequence[int]) -> Image.Image:
  """The window (top, left, height, width) of a C-contiguous uint8 RGB array as a PIL image,
  unpacked by Pillow from the array's own rows (a row stride): no copy of the whole image, and
  Pillow unpacks without the GIL. The same pixels as Image.fromarray(pixels).crop(...)."""
  top, left, height, width = window
  row = pixels.shape[1] * 3
  rows = pixels.reshape(-1)[top * row + left * 3 :]
  return Image.frombuffer('RGB', (width, height), rows, 'raw', 'RGB', row, 1)


def _pil_crops(pixels: np.ndarray, windows, flips, height: int, width: int) -> np.ndarray:
  """[n, height, width, 3]: each window [top, left, h, w] of a uint8 RGB array resized by
  PIL's Image.resize(BILINEAR), then mirrored where `flips` says so: what torchvision's
  RandomResizedCrop and RandomHorizontalFlip do to a PIL image. (A resize with `box=` would
  not do: its filter reads pixels outside the window at the edges.) Pillow resamples and
  mirrors without the GIL; the Python around it is what a sample holds it for."""
  views = np.empty((len(windows), height, width, 3), np.uint8)
  for view, window, flip in zip(views, windows, flips, strict=True):
    resized = _pil_window(pixels, window).resize((width, height), Image.Resampling.BILINEAR)
    view[...] = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized)
  return views


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
  )
  crops.set_shape([views, size, size, 3])
  return crops


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
  ops), p=0.2 grayscale, p=0.5 blur with sigma ~ U[0.1, 2]."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 9))
  factors = [
    _uniform(seeds[1], (), max(0.0, 1 - brightness), 1 + brightness),
    _uniform(seeds[2], (), max(0.0, 1 - contrast), 1 + contrast),
    _uniform(seeds[3], (), max(0.0, 1 - saturation), 1 + saturation),
    _uniform(seeds[4], (), -hue, hue),
  ]
  order = tf.cast(tf.argsort(_uniform(seeds[5], [4])), tf.float32)  # uniform permutation
  flag = lambda s, p: tf.cast(_coin(s, p), tf.float32)[None]
  return tf.concat(
    [
      flag(seeds[0], 0.8),
      tf.stack(factors),
      order,
      flag(seeds[6], 0.2),
      flag(seeds[7], 0.5),
      _uniform(seeds[8], [1], *color.BLUR_SIGMA),
    ],
    axis=0,
  )


# The weak view's: every colour op off.
WEAK_COLOR_PARAMS = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, color.BLUR_SIGMA[0])


# ---------------------------------------------------------------------------------------------
# Views


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """RandomHorizontalFlip(0.5)."""
  return tf.cond(_coin(seed, 0.5), lambda: tf.reverse(image, [1]), lambda: image)


def _cropped_flipped(image, seed, size, crop_scale, random_flip):
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  crop = random_resized_crop_decoded(image, crop_seed, size, crop_scale)
  return flip(crop, flip_seed) if random_flip else crop


def weak_view(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
  """RandomResizedCrop(scale=(0.2, 1)) -> flip, of a decoded uint8 image: (uint8 view,
  colour parameters that switch every colour op off)."""
  return (
    _cropped_flipped(image, seed, size, crop_scale, random_flip),
    tf.constant(WEAK_COLOR_PARAMS, tf.float32),
  )


def strong_view(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
  """RandomResizedCrop -> flip, and the parameters of the colour ops the accelerator applies
  after (p0.8 ColorJitter -> p0.2 grayscale -> p0.5 blur)."""
  crop_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return (
    _cropped_flipped(image, crop_seed, size, crop_scale, random_flip),
    strong_color_params(color_seed),
  )


def _tensorflow_views(image, seed, size, kinds, crop_scale, random_flip):
  """Each view made by its pipeline (`weak_view`, `strong_view`), crops in TensorFlow."""
  views = {'w': weak_view, 's': strong_view}
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return [
    views[k](image, s, size, crop_scale, random_flip) for k, s in zip(kinds, seeds, strict=True)
  ]


def _pil_views(image, seed, size, kinds, crop_scale, random_flip):
  """Both views' crops made by PIL in one Python call (`random_views`), their colour
  parameters drawn in TensorFlow as `_tensorflow_views` draws them."""
  crop_seed, *color_seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  crops = tf.unstack(random_views(image, crop_seed, size, crop_scale, random_flip))
  colors = {'w': lambda _: tf.constant(WEAK_COLOR_PARAMS, tf.float32), 's': strong_color_params}
  return [(c, colors[k](s)) for c, k, s in zip(crops, kinds, color_seeds, strict=True)]


def two_views(
  encoded: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  pairing: str = 'w/s',
  crop_scale: Sequence[float] = CROP_SCALE,
  random_flip: bool = True,
  crops: str = 'tensorflow',
) -> dict[str, tf.Tensor]:
  """Two independent crops of one image: {'target', 'online'} uint8 and their colour
  parameters {'target_color', 'online_color'}, to finish with `color.finish_views`.
  `pairing` names the target's and the online view's pipelines ('w/s': the paper's);
  `crop_scale` and `random_flip` change both views' geometry for data unlike ImageNet's
  (the paper's (0.2, 1) and flips by default). `crops` (`CROPS`) picks who crops and
  resizes: 'tensorflow' (within a level of PIL, no GIL held) or 'pil' (PIL's pixels, more
  samples a core, the GIL held a while each sample)."""
  if pairing not in PAIRINGS:
    raise ValueError(f'Unknown augmentation pairing {pairing!r}; use one of {PAIRINGS}.')
  if crops not in CROPS:
    raise ValueError(f'Unknown crops {crops!r}; use one of {CROPS}.')
  make = _pil_views if crops == 'pil' else _tensorflow_views
  kinds = pairing.split('/')
  target, online = make(decode(encoded), seed, size, kinds, crop_scale, random_flip)
  return {
    'target': target[0],
    'target_color': target[1],
    'online': online[0],
    'online_color': online[1],
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
