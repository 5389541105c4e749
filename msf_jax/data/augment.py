"""The MSF augmentations as TensorFlow ops with torchvision's (PIL-image) semantics.

Every random choice is drawn with stateless ops from a per-example seed, so an example's
views are a function of (seed, epoch, index) alone. Images are float32 in [0, 1] until
`normalize`. The ops that take sampled parameters (`crop_window`, `adjust_*`, `gaussian_blur`)
are exposed separately so that tests can compare them with PIL for the same parameters.

Official transforms (MSF_SPEC §3):
  weak:   RandomResizedCrop(scale=(0.2, 1)) -> flip
  strong: RandomResizedCrop(scale=(0.2, 1)) -> p=0.8 ColorJitter(0.4, 0.4, 0.4, 0.1) in a
          random order -> p=0.2 grayscale -> p=0.5 PIL GaussianBlur(sigma ~ U[0.1, 2]) -> flip
"""

import math
from typing import Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's convert('L').
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
PAIRINGS = ('w/s', 'w/w', 's/s', 's/w')  # target view / online view
BLUR_SIGMA = (0.1, 2.0)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=tf.float32)


def _coin(seed, probability: float) -> tf.Tensor:
  return _uniform(seed) < probability


# ---------------------------------------------------------------------------------------------
# RandomResizedCrop


def crop_window(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                scale: Sequence[float] = CROP_SCALE,
                ratio: Sequence[float] = CROP_RATIO) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params: [top, left, crop_height, crop_width].

  Up to 10 tries of (area fraction ~ U(scale), log-aspect ~ U(log ratio)), rounded half to
  even as Python's round; the first that fits is placed uniformly. If none fits, a central
  crop at the aspect ratio clamped into `ratio`.
  """
  area_seed, aspect_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
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
  return tf.cond(tf.reduce_any(fits), lambda: sampled,
                 lambda: _central_crop_window(height, width, ratio))


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
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(image, tf.float32) / 255.0


def resize(image: tf.Tensor, size: Sequence[int] | tf.Tensor) -> tf.Tensor:
  """Bilinear resize of a [0, 1] image that antialiases when it shrinks, as PIL's BILINEAR."""
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  return tf.clip_by_value(resized, 0.0, 1.0)


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  top, left, height, width = tf.unstack(window)
  return image[top:top + height, left:left + width]


def random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float] = CROP_SCALE) -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio=(3/4, 4/3)) of an encoded image, float [0, 1], for
  a single view: a JPEG is decoded only inside the crop window (fused decode-and-crop, its
  size read from the header); other formats are decoded whole, then cropped."""
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = crop_window(seed, shape[0], shape[1], scale)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3,
                                         dct_method='INTEGER_ACCURATE')

  def other():
    image = decode(encoded)
    return _crop(image, crop_window(seed, tf.shape(image)[0], tf.shape(image)[1], scale))

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  crop.set_shape([None, None, 3])
  return resize(to_float(crop), [size, size])


def random_resized_crop_decoded(image: tf.Tensor, seed: tf.Tensor, size: int,
                                scale: Sequence[float] = CROP_SCALE) -> tf.Tensor:
  """RandomResizedCrop of an already decoded uint8 image: two views of one image decode it
  once (on ImageNet-sized JPEGs one full decode costs about what one fused crop-decode does)."""
  shape = tf.shape(image)
  return resize(to_float(_crop(image, crop_window(seed, shape[0], shape[1], scale))),
                [size, size])


# ---------------------------------------------------------------------------------------------
# Colour: PIL's ImageEnhance and torchvision's PIL hue, on float images in [0, 1].


def _luma(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 1] ITU-R 601-2 luma."""
  red, green, blue = tf.split(image, 3, axis=-1)
  return LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L') (ITU-R 601-2 luma) back to 3 channels."""
  return tf.tile(_luma(image), [1, 1, 3])


def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Contrast: blend with the mean grey level, rounded to a uint8 level as PIL."""
  mean_rgb = tf.reduce_mean(image, axis=[0, 1])
  mean = tf.round(tf.reduce_sum(mean_rgb * tf.constant(LUMA_WEIGHTS)) * 255.0) / 255.0
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Color: blend with the grey version."""
  return _blend(_luma(image), image, factor)


def adjust_hue(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision adjust_hue: rotate the hue of HSV by `factor` turns (in [-0.5, 0.5])."""
  return tf.clip_by_value(tf.image.adjust_hue(image, factor), 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1) -> tf.Tensor:
  """torchvision ColorJitter: the four adjustments with sampled factors, in a random order."""
  order_seed, b_seed, c_seed, s_seed, h_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  factors = [_uniform(b_seed, (), max(0.0, 1 - brightness), 1 + brightness),
             _uniform(c_seed, (), max(0.0, 1 - contrast), 1 + contrast),
             _uniform(s_seed, (), max(0.0, 1 - saturation), 1 + saturation),
             _uniform(h_seed, (), -hue, hue)]
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  order = tf.argsort(_uniform(order_seed, [4]))  # a uniform random permutation
  for position in range(4):
    branches = [lambda op=op, f=f: op(image, f) for op, f in zip(ops, factors)]
    image = tf.switch_case(order[position], branches)
  return image


# ---------------------------------------------------------------------------------------------
# PIL's GaussianBlur: three passes of an "extended" box blur per axis.

_BLUR_PASSES = 3


def pil_box_radius(sigma, sqrt=tf.sqrt, floor=tf.floor):
  """The fractional box radius PIL uses for a Gaussian of standard deviation `sigma` over
  three passes (Gwosdek et al. 2011, as in Pillow's BoxBlur.c). With `math.sqrt` and
  `math.floor` it works on Python floats."""
  sigma2 = sigma * sigma / _BLUR_PASSES
  length = sqrt(12.0 * sigma2 + 1.0)
  whole = floor((length - 1.0) / 2.0)
  fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
  fraction /= 6 * (sigma2 - (whole + 1) * (whole + 1))
  return whole + fraction


def _box_kernel(radius: tf.Tensor, half_width: int) -> tf.Tensor:
  """Weights 1/(2r+1) on the 2*floor(r)+1 central taps and the remainder split between the
  two next ones; zero-padded to 2 * half_width + 1 taps."""
  whole = tf.floor(radius)
  inner = 1.0 / (2.0 * radius + 1.0)
  edge = (1.0 - (2.0 * whole + 1.0) * inner) / 2.0
  distance = tf.abs(tf.range(-half_width, half_width + 1, dtype=tf.float32))
  return tf.where(distance <= whole, inner, tf.where(distance == whole + 1, edge, 0.0))


def _blur_axis(image: tf.Tensor, kernel: tf.Tensor, half_width: int, axis: int) -> tf.Tensor:
  """One box pass along `axis` of [H, W, C], edges replicated: a weighted sum of shifted
  slices (a handful of taps; far cheaper on the CPU than a depthwise convolution)."""
  size = tf.shape(image)[axis]
  first = tf.gather(image, [0], axis=axis)
  last = tf.gather(image, [size - 1], axis=axis)
  padded = tf.concat([first] * half_width + [image] + [last] * half_width, axis=axis)
  taps = 2 * half_width + 1
  out = 0.0
  for tap in range(taps):
    begin = [0, 0, 0]
    begin[axis] = tap
    shape = [-1, -1, -1]
    shape[axis] = size
    out += kernel[tap] * tf.slice(padded, begin, shape)
  return out


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, max_sigma: float = BLUR_SIGMA[1]) -> tf.Tensor:
  """PIL's ImageFilter.GaussianBlur(radius=sigma) on an [H, W, C] float image: three box
  passes along the width, then three along the height, each replicating the edges, as
  Pillow's BoxBlur.c does."""
  half_width = math.floor(pil_box_radius(max_sigma, math.sqrt, math.floor)) + 1
  kernel = _box_kernel(pil_box_radius(tf.cast(sigma, tf.float32)), half_width)
  for axis in (1, 0):
    for _ in range(_BLUR_PASSES):
      image = _blur_axis(image, kernel, half_width, axis)
  return image


# ---------------------------------------------------------------------------------------------
# Views


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """RandomHorizontalFlip(0.5)."""
  return tf.cond(_coin(seed, 0.5), lambda: tf.reverse(image, [1]), lambda: image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def _maybe(image, seed, probability, op):
  return tf.cond(_coin(seed, probability), lambda: op(image), lambda: image)


def weak_view(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """RandomResizedCrop(scale=(0.2, 1)) -> flip -> normalize, of a decoded uint8 image."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return normalize(flip(random_resized_crop_decoded(image, crop_seed, size), flip_seed))


def strong_view(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """RandomResizedCrop -> p0.8 ColorJitter -> p0.2 grayscale -> p0.5 blur -> flip -> normalize,
  of a decoded uint8 image."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
  image = random_resized_crop_decoded(image, seeds[0], size)
  image = _maybe(image, seeds[1], 0.8, lambda x: color_jitter(x, seeds[2]))
  image = _maybe(image, seeds[3], 0.2, grayscale)
  sigma = _uniform(seeds[4], (), *BLUR_SIGMA)
  image = _maybe(image, seeds[5], 0.5, lambda x: gaussian_blur(x, sigma))
  return normalize(flip(image, seeds[6]))


def two_views(encoded: tf.Tensor, seed: tf.Tensor, size: int, pairing: str = 'w/s'
              ) -> dict[str, tf.Tensor]:
  """{'target': ..., 'online': ...}, two independent crops of one image; `pairing` names the
  target's and the online view's pipelines ('w/s' is the paper's default)."""
  if pairing not in PAIRINGS:
    raise ValueError(f'Unknown augmentation pairing {pairing!r}; use one of {PAIRINGS}.')
  views = {'w': weak_view, 's': strong_view}
  target_seed, online_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  target, online = pairing.split('/')
  image = decode(encoded)
  return {'target': views[target](image, target_seed, size),
          'online': views[online](image, online_seed, size)}


def center_crop_view(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Evaluation view: shorter side to size * 256 / 224, centre crop `size`, normalize."""
  image = to_float(decode(encoded))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = round(size * 256 / 224)
  scale = short / tf.reduce_min(shape)
  # torchvision Resize(int): the shorter side to `short`, the longer one int(short * ratio).
  new_shape = tf.cast(tf.maximum(tf.floor(shape * scale), short), tf.int32)
  new_shape = tf.where(shape == tf.reduce_min(shape), short, new_shape)
  image = resize(image, new_shape)
  # CenterCrop: offsets round((n - size) / 2), half to even as Python's round.
  offsets = tf.cast(tf.round(tf.cast(new_shape - size, tf.float32) / 2.0), tf.int32)
  image = image[offsets[0]:offsets[0] + size, offsets[1]:offsets[1] + size]
  image.set_shape([size, size, 3])
  return normalize(image)
