"""The memory bank replicated on every device against split by rows over them
(`msf.bank_layout`), on 8 host CPU devices:

  python benchmarks/bank_layout_benchmark.py memory --banks 1024000 4096000 16384000
  python benchmarks/bank_layout_benchmark.py time --runs 5

`memory`: the compiled step's `memory_analysis()` per device for each layout and bank (the
program is compiled from shapes alone, so a bank larger than this machine's memory costs
nothing), and the largest collective of the compiled program. `time`: the step of both layouts
in one process, alternating, medians of `--runs` timed steps each after a warm-up.
"""

import argparse
import json
import os
import re
import statistics
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from msf_jax import create_state, make_mesh, make_train_step, put_batch, put_state  # noqa: E402
from msf_jax.sharding import DATA_AXIS  # noqa: E402
from msf_jax.testing import random_batch, small_config  # noqa: E402
from msf_jax.train_state import abstract_state, state_shardings  # noqa: E402

LAYOUTS = ('replicated', 'sharded')
GIB = 2**30
COLLECTIVE = re.compile(
  r'= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|'
  r'reduce-scatter)(-start)?\('
)
SHAPE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
BYTES = {'f32': 4, 'f64': 8, 's32': 4, 'u32': 4, 'bf16': 2, 'pred': 1, 's8': 1, 'u8': 1}


def benchmark_config(args, layout: str, bank_size: int):
  config = small_config(
    depth=args.depth,
    image_size=args.image_size,
    small_stem=True,
    batch_size=args.batch_size,
    bank_size=bank_size,
  )
  config.model.width = args.width
  config.msf.bank_chunk_size = args.chunk
  config.msf.bank_layout = layout
  return config


def largest_collective(hlo: str) -> tuple[str, int]:
  """(op and shape, bytes) of the largest result of a collective in optimized HLO."""
  best = ('none', 0)
  for match in COLLECTIVE.finditer(hlo):
    for dtype, dims in SHAPE.findall(match.group(1)):
      size = BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
      if size > best[1]:
        best = (f'{match.group(2)} {dtype}[{dims}]', size)
  return best


def compiled(config, mesh):
  step = make_train_step(config, mesh, steps_per_epoch=1000, finish_views=False)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(DATA_AXIS))),
    random_batch(np.random.default_rng(0), config),
  )
  return step.lower(abstract_state(config, state_shardings(config, mesh)), batch).compile()


def memory(args) -> list[dict]:
  mesh = make_mesh()
  rows = []
  for bank_size in args.banks:
    for layout in LAYOUTS:
      start = time.perf_counter()
      executable = compiled(benchmark_config(args, layout, bank_size), mesh)
      analysis = executable.memory_analysis()
      collective, collective_bytes = largest_collective(executable.as_text())
      row = {
        'bank_rows': bank_size,
        'layout': layout,
        'arguments_gib': analysis.argument_size_in_bytes / GIB,
        'temporaries_gib': analysis.temp_size_in_bytes / GIB,
        'outputs_gib': analysis.output_size_in_bytes / GIB,
        'aliased_gib': analysis.alias_size_in_bytes / GIB,
        'largest_collective': collective,
        'largest_collective_mib': collective_bytes / 2**20,
        'compile_s': time.perf_counter() - start,
      }
      # Donated state: the outputs reuse the arguments' buffers.
      row['peak_gib'] = (
        row['arguments_gib'] + row['temporaries_gib'] + row['outputs_gib'] - row['aliased_gib']
      )
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def step_times(args) -> dict[str, float]:
  """Median seconds a step of each layout, the layouts timed in turn within one process."""
  mesh = make_mesh()
  steps, states = {}, {}
  for layout in LAYOUTS:
    config = benchmark_config(args, layout, args.banks[0])
    states[layout] = put_state(create_state(config, jax.random.key(0)), config, mesh)
    steps[layout] = make_train_step(config, mesh, steps_per_epoch=1000, finish_views=False)
  batch = put_batch(random_batch(np.random.default_rng(0), config), mesh)
  for layout in LAYOUTS:  # compile and warm up
    for _ in range(2):
      states[layout], _ = jax.block_until_ready(steps[layout](states[layout], batch))
  times = {layout: [] for layout in LAYOUTS}
  for _ in range(args.runs):
    for layout in LAYOUTS:
      start = time.perf_counter()
      states[layout], _ = jax.block_until_ready(steps[layout](states[layout], batch))
      times[layout].append(time.perf_counter() - start)
  result = {layout: statistics.median(t) for layout, t in times.items()}
  print(json.dumps({'median_step_s': result, 'all_s': times}), flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('what', choices=('memory', 'time'))
  parser.add_argument('--banks', type=int, nargs='+', default=[1_024_000])
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--chunk', type=int, default=128_000, help='msf.bank_chunk_size')
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args()
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices; {vars(args)}', flush=True)
  memory(args) if args.what == 'memory' else step_times(args)


if __name__ == '__main__':
  main()
