"""Where the CPU train step's time goes: ResNet-18's convolutions alone, XLA against PyTorch.

A train step runs every convolution forward twice (the target and the online encoder) and
backward once (the input and the weight gradient). This times each of ResNet-18's
convolution shapes that way in both frameworks on random data, same CPU, same threads, and
sums them over the network, next to the whole step's time from train_step_benchmark.py:

  python benchmarks/cpu_conv_profile.py --runs 5

If XLA's convolutions alone take longer than PyTorch's whole step, no change outside the
convolution kernels (BatchNorm, pooling, the loss) can bring the step to PyTorch's speed.
Each framework runs in its own process.

A second table says which kernels XLA uses for the convolutions under each of its CPU
flags (`XLA_CPU_FLAGS`): the optimized program of one 3x3 convolution's forward and
backward (batch 64, 32 px, 64 channels) holds three convolutions; it counts those that sit
in a library fusion (`__ynn_fusion`: YNNPACK; XNNPACK and oneDNN would show their names) and
names the libraries. The rest run on XLA's own Eigen kernels.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SETTINGS = {'96px_imagenet_stem': (96, False), '32px_small_stem': (32, True)}
LIBRARY_CONVOLUTION = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
XLA_CPU_FLAGS = (
  '',
  '--xla_cpu_use_xnnpack=true',
  '--xla_cpu_experimental_onednn_custom_call=true',
  '--xla_cpu_use_onednn=true',
  '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT',  # Eigen
  *(
    f'--xla_cpu_experimental_{library}_fusion_type={LIBRARY_CONVOLUTION}'
    for library in ('xnn', 'ynn', 'onednn')
  ),
)


def conv_shapes(image_size: int, small_stem: bool) -> list[tuple[int, int, int, int, int]]:
  """(input size, in channels, out channels, kernel, stride) of each ResNet-18 convolution."""
  shapes = [(image_size, 3, 64, 3, 1)] if small_stem else [(image_size, 3, 64, 7, 2)]
  size = image_size if small_stem else image_size // 4  # the stem's stride and max-pool
  channels = 64
  for stage, planes in enumerate((64, 128, 256, 512)):
    stride = 1 if stage == 0 else 2
    shapes.append((size, channels, planes, 3, stride))
    if stride == 2:
      shapes.append((size, channels, planes, 1, 2))  # the projection shortcut
      size //= 2
    shapes += [(size, planes, planes, 3, 1)] * 3
    channels = planes
  return shapes


def _median_ms(fn, runs: int) -> float:
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def time_xla(shape, batch: int, runs: int) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  size, cin, cout, kernel, stride = shape
  pad = (kernel - 1) // 2
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)) * 0.05, jnp.float32)
  forward = jax.jit(conv)
  backward = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  return {
    'forward': _median_ms(lambda: jax.block_until_ready(forward(x, w)), runs),
    'forward_backward': _median_ms(lambda: jax.block_until_ready(backward(x, w)), runs),
  }


def time_torch(shape, batch: int, runs: int) -> dict[str, float]:
  import torch

  torch.set_num_threads(os.cpu_count())
  size, cin, cout, kernel, stride = shape
  x = torch.randn(batch, cin, size, size, requires_grad=True)
  w = (torch.randn(cout, cin, kernel, kernel) * 0.05).requires_grad_()
  conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=(kernel - 1) // 2)

  def forward():
    with torch.no_grad():
      conv()

  def forward_backward():
    (conv() ** 2).sum().backward()

  return {
    'forward': _median_ms(forward, runs),
    'forward_backward': _median_ms(forward_backward, runs),
  }


def count_convolution_paths() -> dict:
  """How many of the three convolutions of one compiled forward and backward run in a
  library fusion, and which libraries (YNNPACK's fusions are named `ynn_fusion`)."""
  import jax
  import jax.numpy as jnp

  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  gradient = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  text = gradient.lower(jnp.ones((64, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
  libraries = re.findall(r'%(\w+?)_fusion(?:\.\d+)? = \S+ fusion\([^)]*\), kind=kCustom', text)
  return {
    'convolutions': len(re.findall(r'\sconvolution\(', text)),
    'in_library': len(libraries),
    'libraries': sorted(set(libraries)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  parser.add_argument('--count', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.count:
    print(json.dumps(count_convolution_paths()))
    return
  if args.child:
    framework, setting = args.child
    timer = {'xla': time_xla, 'torch': time_torch}[framework]
    print(
      json.dumps([timer(shape, args.batch, args.runs) for shape in conv_shapes(*SETTINGS[setting])])
    )
    return
  print(
    '| setting | framework | convolutions of one step, ms (2 forwards + 1 backward) | '
    'of which backward, ms |'
  )
  print('|---|---|---|---|')
  for setting in SETTINGS:
    for framework in ('xla', 'torch'):
      out = subprocess.run(
        [
          sys.executable,
          __file__,
          '--child',
          framework,
          setting,
          '--batch',
          str(args.batch),
          '--runs',
          str(args.runs),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      )
      layers = json.loads(out.stdout.strip().splitlines()[-1])
      step = sum(t['forward'] + t['forward_backward'] for t in layers)
      backward = sum(t['forward_backward'] - t['forward'] for t in layers)
      print(
        f'| ResNet-18, batch {args.batch}, {setting} | {framework} | {step:.0f} | {backward:.0f} |',
        flush=True,
      )
  print('\n| XLA_FLAGS | convolutions | in a library fusion | libraries |\n|---|---|---|---|')
  for flags in XLA_CPU_FLAGS:
    out = subprocess.run(
      [sys.executable, __file__, '--count'],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': flags},
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    print(
      f'| `{flags or "(defaults)"}` | {counts["convolutions"]} | {counts["in_library"]} | '
      f'{", ".join(counts["libraries"]) or "none: Eigen"} |',
      flush=True,
    )


if __name__ == '__main__':
  main()
