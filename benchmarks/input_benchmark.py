"""Two-view w/s samples per second per CPU core: the msf_jax tf.data pipeline against a PIL
pipeline of the official torchvision transforms, on the same JPEG files, one core each.

msf_jax's host stage decodes, crops, resizes, flips and samples colour parameters; the colour
ops run batched on the accelerator (`color.finish_views`). For the record the script also
times that stage on one CPU core, as it would run on a CPU-only machine.

The files are ImageNet-like photos made from the two photos scikit-learn ships (random
crops of 427x640 photos resized to about 500x375, JPEG quality 90).

  python benchmarks/input_benchmark.py --images 64 --samples 300 --runs 7
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_photos(folder: str, count: int) -> list[str]:
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_sample_images

  rng = np.random.default_rng(0)
  photos = load_sample_images().images
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = rng.integers(300, photo.shape[0] + 1), rng.integers(400, photo.shape[1] + 1)
    top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
    size = (500, 375) if rng.uniform() < 0.7 else (375, 500)
    image = Image.fromarray(photo[top : top + h, left : left + w]).resize(size, Image.BICUBIC)
    path = os.path.join(folder, f'{i:04d}.jpg')
    image.save(path, 'JPEG', quality=90)
    paths.append(path)
  return paths


def run_pinned_child(
  script: str,
  which: str,
  folder: str,
  samples: int,
  size: int,
  core: int = 0,
  env: dict[str, str] | None = None,
) -> list[str]:
  """`script --child WHICH FOLDER` in a fresh process pinned to one core (no GPU, `env`
  added): its output lines. Benchmarks that time a host core run each measurement so."""
  command = [
    'taskset',
    '-c',
    str(core),
    sys.executable,
    script,
    '--child',
    which,
    folder,
    '--samples',
    str(samples),
    '--size',
    str(size),
  ]
  out = subprocess.run(
    command,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', **(env or {})},
  )
  return out.stdout.strip().splitlines()


def time_tf(paths: list[str], samples: int, size: int) -> float:
  import tensorflow as tf

  from msf_jax.data import augment

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  files = tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file).cache().repeat()
  seeds = tf.data.Dataset.range(samples + 50).map(lambda i: tf.stack([i, 0]))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  dataset = (
    tf.data.Dataset.zip(files, seeds)
    .map(lambda image, seed: augment.two_views(image, seed, size, 'w/s'))
    .with_options(options)
  )
  iterator = iter(dataset)
  for _ in range(50):  # warm-up: tracing, file cache
    next(iterator)
  start = time.perf_counter()
  for _ in range(samples):
    views = next(iterator)
  views['online'].numpy()
  return samples / (time.perf_counter() - start)


def time_device_colors_on_cpu(paths: list[str], samples: int, size: int) -> float:
  """`color.finish_views` on the CPU (one core), batches of 64 strong/weak pairs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import tensorflow as tf

  from msf_jax.data import augment, color

  batch = 64
  views = [
    augment.two_views(
      tf.constant(open(paths[i % len(paths)], 'rb').read()), tf.constant([i, 0], tf.int64), size
    )
    for i in range(batch)
  ]
  data = {k: jnp.asarray(np.stack([v[k].numpy() for v in views])) for k in views[0]}
  data['label'] = jnp.zeros(batch, jnp.int32)
  jax.block_until_ready(color.finish_views(data, 'w/s'))
  start = time.perf_counter()
  rounds = max(1, samples // batch)
  for _ in range(rounds):
    jax.block_until_ready(color.finish_views(data, 'w/s'))
  return rounds * batch / (time.perf_counter() - start)


def time_pil(paths: list[str], samples: int, size: int) -> float:
  import numpy as np
  from PIL import Image

  from msf_jax.testing import pil_reference

  rng = np.random.default_rng(0)
  encoded = [open(p, 'rb').read() for p in paths]
  start = time.perf_counter()
  for i in range(samples):
    image = Image.open(io.BytesIO(encoded[i % len(encoded)])).convert('RGB')
    pil_reference.weak_view(image, rng, size)
    pil_reference.strong_view(image, rng, size)
  return samples / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--samples', type=int, default=300)
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    which, folder = args.child
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    rate = {'tf': time_tf, 'pil': time_pil, 'colors_cpu': time_device_colors_on_cpu}[which](
      paths, args.samples, args.size
    )
    print(rate)
    return
  folder = tempfile.mkdtemp()
  make_photos(folder, args.images)
  rates = {'tf': [], 'pil': [], 'colors_cpu': []}
  for _ in range(args.runs):  # alternate, each run in a fresh process pinned to one core
    for which in rates:
      lines = run_pinned_child(
        __file__, which, folder, args.samples, args.size, env={'JAX_PLATFORMS': 'cpu'}
      )
      rates[which].append(float(lines[-1]))
  tf_rate, pil_rate = statistics.median(rates['tf']), statistics.median(rates['pil'])
  # This VM's speed drifts between runs: the ratio of each back-to-back pair is steadier.
  ratios = [t / p for t, p in zip(rates['tf'], rates['pil'], strict=True)]
  colors = statistics.median(rates['colors_cpu'])
  both = 1 / (1 / tf_rate + 1 / colors)
  print(f'runs: {rates}')
  print('| pipeline | two-view samples/s on one core (median) |')
  print('|---|---|')
  print(f'| msf_jax host stage, tf.data (w/s, {args.size}px) | {tf_rate:.1f} |')
  print(f'| msf_jax colour stage, JAX on one CPU core | {colors:.1f} |')
  print(f'| msf_jax both stages on one CPU core | {both:.1f} ({both / pil_rate:.2f}x PIL) |')
  print(f'| PIL, official torchvision transforms | {pil_rate:.1f} |')
  print(f'| ratio of medians | {tf_rate / pil_rate:.2f}x |')
  print(
    f'| median of paired ratios (min-max) | {statistics.median(ratios):.2f}x '
    f'({min(ratios):.2f}-{max(ratios):.2f}) |'
  )


if __name__ == '__main__':
  main()
