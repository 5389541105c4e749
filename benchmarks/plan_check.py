"""msf_jax.plan's step-time model against a measurement, on the machine at hand.

  .venv/bin/python benchmarks/plan_check.py            # both recipes, 1 device
  .venv/bin/python benchmarks/plan_check.py --runs 9 --recipes demo

For each recipe: the train step compiled here as the planner compiles it (same builder),
`roofline.compiled_step_time` of that very program on this device's figures (a CPU's are
measured here, `roofline.host_chip`), then the step run on random data `--runs` times after
one warm-up: the median measured time against the bound and the estimate. On an accelerator
the same comparison is one line of benchmarks/accelerator.py's output.

Recipes: 'demo' (configs/demo.py: ResNet-18 of width 8 at 24 px, batch 32) and 'resnet50'
(configs/imagenet_msf.py's ResNet-50 at 112 px, batch 8, a bank of 4,096 rows, BatchNorm over
the batch: a step a CPU runs in seconds).
"""

import argparse
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPES = {
  'demo': ('demo.py', {}),
  'resnet50': (
    'imagenet_msf.py',
    {
      'image_size': 112,
      'batch_size': 8,
      'msf.bank_size': 4096,
      'model.bn_group_size': 0,
      'model.dtype': 'float32',
    },
  ),
}


def recipe_config(name: str):
  from msf_jax.config_utils import load_config

  file, settings = RECIPES[name]
  config = load_config(os.path.join(REPO, 'configs', file))
  with config.unlocked():
    for key, value in settings.items():
      section, _, field = key.rpartition('.')
      setattr(config[section] if section else config, field, value)
  return config


def check(name: str, runs: int) -> dict:
  """Bound, estimate and the measured median of one recipe's step on this device."""
  import jax
  import numpy as np

  import msf_jax
  from msf_jax.plan import planner, roofline
  from msf_jax.testing import random_host_batch

  devices = jax.local_devices()[:1]
  config = planner.for_platform(recipe_config(name), devices[0].platform)
  mesh = msf_jax.make_mesh(devices)
  program = planner.train_program(config, mesh, 100)
  compiled = program.jitted.lower(*program.args).compile()
  chip = roofline.chip_of(devices[0], 1)
  if chip is None:
    raise SystemExit(f'No figures for {devices[0].device_kind}.')
  estimate = roofline.compiled_step_time(compiled, 1, chip)
  state = msf_jax.put_state(
    jax.jit(lambda key: msf_jax.create_state(config, key))(jax.random.key(0)), config, mesh
  )
  batch = msf_jax.put_batch(random_host_batch(np.random.default_rng(0), config), mesh)
  times = []
  for _ in range(runs + 1):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  measured = statistics.median(times[1:])
  return {
    'recipe': name,
    'chip': chip.name,
    'peaks_tflops': chip.peak_tflops,
    'bandwidth_gb_per_s': chip.hbm_gb_per_s,
    'bound_s': estimate.bound_seconds,
    'estimate_s': estimate.estimate_seconds,
    'measured_s': measured,
    'measured_range_s': (min(times[1:]), max(times[1:])),
  }


def main() -> None:
  from msf_jax import distributed

  distributed.cpu_alone_without_accelerators()  # no libtpu lines on a CPU-only machine
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--recipes', nargs='+', default=list(RECIPES), choices=list(RECIPES))
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args()
  print(
    '| recipe | device figures (measured here) | bound ms | estimate ms | measured ms, median '
    '(min-max) | measured / bound | measured / estimate |'
  )
  print('|---|---|---|---|---|---|---|')
  for name in args.recipes:
    r = check(name, args.runs)
    ms = lambda seconds: f'{seconds * 1e3:,.1f}'
    low, high = r['measured_range_s']
    print(
      f'| {name} | {r["chip"]}: f32 {r["peaks_tflops"]["f32"] * 1e3:.0f} GFLOP/s, '
      f'{r["bandwidth_gb_per_s"]:.1f} GB/s | {ms(r["bound_s"])} | {ms(r["estimate_s"])} | '
      f'{ms(r["measured_s"])} ({ms(low)}-{ms(high)}) | {r["measured_s"] / r["bound_s"]:.2f} | '
      f'{r["measured_s"] / r["estimate_s"]:.2f} |',
      flush=True,
    )


if __name__ == '__main__':
  main()
