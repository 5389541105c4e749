"""One MSF training step of ResNet-18 at batch 64: msf_jax against the PyTorch reference of
the official iteration (msf_jax/testing/torch_reference.py), same CPU, same threads, images/s.

  python benchmarks/train_step_benchmark.py --runs 5

msf_jax runs once with XLA's default CPU settings and once with each of `XLA_CPU_VARIANTS`,
the backend's alternative convolution paths, so that one run says which is fastest here
(benchmarks/cpu_conv_profile.py shows which kernels each one uses). Each variant and
framework runs in its own process (their thread pools would otherwise compete, and XLA reads
its flags once per process).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {'96px_imagenet_stem': (96, False), '32px_small_stem': (32, True)}
# jax 0.10.2 runs large CPU convolutions in YNNPACK; 'eigen' keeps them on XLA's own kernels
# (products stay in YNNPACK); the other two are the flags the speed issue named.
XLA_CPU_VARIANTS = {
  'defaults': '',
  'eigen': '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT',
  'xnnpack': '--xla_cpu_use_xnnpack=true',
  'onednn': '--xla_cpu_experimental_onednn_custom_call=true',
}


def time_msf_jax(image_size, small_stem, batch, bank, runs):
  import jax
  import numpy as np

  from msf_jax import create_state, make_mesh, make_train_step, put_batch, put_state
  from msf_jax.testing import random_batch, small_config

  config = small_config(
    image_size=image_size, small_stem=small_stem, batch_size=batch, bank_size=bank
  )
  mesh = make_mesh(jax.devices()[:1])
  state = put_state(create_state(config, jax.random.key(0)), config, mesh)
  step = make_train_step(config, mesh, steps_per_epoch=1, finish_views=False)
  batch_data = put_batch(random_batch(np.random.default_rng(0), config), mesh)
  state, _ = jax.block_until_ready(step(state, batch_data))  # compile
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch_data))
    times.append(time.perf_counter() - start)
  return times


def time_torch(image_size, small_stem, batch, bank, runs):
  import torch

  from msf_jax.testing import torch_reference

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = torch_reference.MeanShift(18, mem_bank_size=bank, topk=5, small_stem=small_stem)
  optimizer = torch_reference.make_optimizer(model, 0.05 * batch / 256)
  images = lambda: torch.randn(batch, 3, image_size, image_size)
  im_q, im_t, labels = images(), images(), torch.randint(0, 4, (batch,))
  torch_reference.train_iteration(model, optimizer, im_q, im_t, labels)  # warm-up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    torch_reference.train_iteration(model, optimizer, im_q, im_t, labels)
    times.append(time.perf_counter() - start)
  return times


def child_rate(framework: str, setting: str, args: argparse.Namespace, xla_flags: str) -> float:
  """Images/s (batch over the median step time) of one framework in a process of its own."""
  out = subprocess.run(
    [
      sys.executable,
      __file__,
      '--child',
      framework,
      setting,
      '--batch',
      str(args.batch),
      '--bank',
      str(args.bank),
      '--runs',
      str(args.runs),
    ],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags},
  )
  times = json.loads(out.stdout.strip().splitlines()[-1])
  return args.batch / statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--bank', type=int, default=4096)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    framework, setting = args.child
    fn = {'msf_jax': time_msf_jax, 'torch': time_torch}[framework]
    print(json.dumps(fn(*SETTINGS[setting], args.batch, args.bank, args.runs)))
    return
  print(
    '| setting | msf_jax XLA CPU variant | msf_jax img/s | PyTorch img/s | '
    'ratio (msf_jax / PyTorch) |'
  )
  print('|---|---|---|---|---|')
  for setting in SETTINGS:
    torch_rate = child_rate('torch', setting, args, '')
    for variant, flags in XLA_CPU_VARIANTS.items():
      rate = child_rate('msf_jax', setting, args, flags)
      print(
        f'| ResNet-18, batch {args.batch}, {setting} | {variant} `{flags}` | {rate:.1f} | '
        f'{torch_rate:.1f} | {rate / torch_rate:.2f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()
