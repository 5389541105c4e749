"""The official torchvision transforms of MSF on PIL images, written with PIL and numpy
(torchvision itself does not install beside the CPU torch used here). Used by the
augmentation tests as a reference and by the input benchmark as the baseline, with the
photo-like test image the crops' error against PIL is measured on."""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def smooth_image(seed: int, height: int = 120, width: int = 160) -> np.ndarray:
  """A photo-like uint8 RGB image: smooth gradients plus mild noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [
    np.sin(2 * math.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
    for _ in range(3)
  ]
  image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def torchvision_crop_params(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision.transforms.RandomResizedCrop.get_params, in numpy."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    h, w = height, round(height * max(ratio))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def torchvision_pil_hue(image: np.ndarray, factor: float) -> np.ndarray:
  """torchvision.transforms.functional_pil.adjust_hue: uint8 shift of PIL's HSV hue."""
  h, s, v = Image.fromarray(image).convert('HSV').split()
  shifted = (np.asarray(h).astype(np.int64) + int(factor * 255)) % 256
  hsv = Image.merge('HSV', (Image.fromarray(shifted.astype(np.uint8), 'L'), s, v))
  return np.asarray(hsv.convert('RGB'))


def color_jitter(image: Image.Image, rng, strength=0.4, hue=0.1) -> Image.Image:
  """ColorJitter(0.4, 0.4, 0.4, 0.1): the four adjustments in a random order."""
  factors = [rng.uniform(1 - strength, 1 + strength) for _ in range(3)] + [rng.uniform(-hue, hue)]
  ops = [
    lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    lambda im, f: ImageEnhance.Color(im).enhance(f),
    lambda im, f: Image.fromarray(torchvision_pil_hue(np.asarray(im), f)),
  ]
  for i in rng.permutation(4):
    image = ops[i](image, factors[i])
  return image


def to_normalized(image: Image.Image) -> np.ndarray:
  return (np.asarray(image, np.float32) / 255.0 - MEAN) / STD


def weak_view(image: Image.Image, rng, size: int) -> np.ndarray:
  top, left, h, w = torchvision_crop_params(rng, image.height, image.width)
  view = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
  if rng.uniform() < 0.5:
    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return to_normalized(view)


def strong_view(image: Image.Image, rng, size: int) -> np.ndarray:
  top, left, h, w = torchvision_crop_params(rng, image.height, image.width)
  view = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
  if rng.uniform() < 0.8:
    view = color_jitter(view, rng)
  if rng.uniform() < 0.2:
    view = view.convert('L').convert('RGB')
  if rng.uniform() < 0.5:
    view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  if rng.uniform() < 0.5:
    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return to_normalized(view)
