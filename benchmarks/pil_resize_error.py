"""How far the host stage's crops are from PIL's, in uint8 levels (0-255), before and after
the views became uint8: the float32 resize they replaced (antialiased bilinear of [0, 1]
images, what the views were until they crossed as uint8) against `augment.resize`, which
rounds the same resize to uint8 as PIL does. PIL's resize of an 8-bit image is the reference
(the official pipeline's RandomResizedCrop and Resize).

Cases: the PIL parity tests' own (tests/test_augment.py: resize shrink and enlarge, a random
crop to 32, the centre crop's resize), then 224-pixel RandomResizedCrops and the 256-pixel
centre-crop resize of the two photos scikit-learn ships (427x640), 20 seeds each. Prints a
markdown table: max and mean absolute difference, and the share of values equal to PIL's.

  python benchmarks/pil_resize_error.py
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from msf_jax.data import augment  # noqa: E402
from msf_jax.testing.pil_reference import smooth_image  # noqa: E402

PHOTO_SEEDS = 20


def float32_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Before: the [0, 1] float32 resize the views used to be, in levels."""
  resized = tf.image.resize(
    tf.constant(image, tf.float32) / 255.0, size, method='bilinear', antialias=True
  )
  return tf.clip_by_value(resized, 0.0, 1.0).numpy() * 255.0


def uint8_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """After: the host stage's resize, uint8."""
  return augment.resize(tf.constant(image), size).numpy()


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def test_cases() -> dict[str, list[tuple[np.ndarray, tuple[int, int]]]]:
  """The parity tests' images and sizes: (image, (height, width)) to resize to."""
  top, left, h, w = augment.crop_window(tf.constant([3, 4]), 120, 160).numpy()
  return {
    'test: resize shrink 120x160 -> 48x64': [(smooth_image(1), (48, 64))],
    'test: resize enlarge 120x160 -> 200x150': [(smooth_image(1), (200, 150))],
    'test: random crop -> 32x32': [(smooth_image(2)[top : top + h, left : left + w], (32, 32))],
    'test: centre-crop resize 150x200 -> 128x170': [(smooth_image(10, 150, 200), (128, 170))],
  }


def photo_cases() -> dict[str, list[tuple[np.ndarray, tuple[int, int]]]]:
  """RandomResizedCrop(224) windows and the centre crop's Resize(256) of real photos."""
  from sklearn.datasets import load_sample_images

  photos = load_sample_images().images
  crops, centre = [], []
  for index, photo in enumerate(photos):
    height, width = photo.shape[:2]
    for seed in range(PHOTO_SEEDS):
      top, left, h, w = augment.crop_window(tf.constant([index, seed]), height, width).numpy()
      crops.append((photo[top : top + h, left : left + w], (224, 224)))
    centre.append((photo, (256, round(256 * width / height))))
  return {
    f'photos: RandomResizedCrop -> 224 ({len(crops)} crops)': crops,
    'photos: centre-crop Resize(256)': centre,
  }


def errors(resize, cases: list) -> tuple[float, float, float]:
  """(max, mean |ours - PIL|, share equal) over all values of the cases, in levels."""
  diffs = np.concatenate(
    [
      np.abs(resize(image, size).astype(np.float64) - pil_resize(image, size)).ravel()
      for image, size in cases
    ]
  )
  return diffs.max(), diffs.mean(), np.mean(diffs == 0)


def main() -> None:
  print(
    '| case | float32 (before): max / mean | uint8 (after): max / mean | '
    'equal to PIL (before / after) |'
  )
  print('|---|---|---|---|')
  for name, cases in {**test_cases(), **photo_cases()}.items():
    before, after = errors(float32_resize, cases), errors(uint8_resize, cases)
    print(
      f'| {name} | {before[0]:.2f} / {before[1]:.3f} | {after[0]:.0f} / {after[1]:.3f} | '
      f'{100 * before[2]:.1f}% / {100 * after[2]:.1f}% |'
    )


if __name__ == '__main__':
  main()
