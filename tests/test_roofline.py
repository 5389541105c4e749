"""msf_jax.plan.roofline: the step-time model read from optimized HLO. Loops count by their
trip counts, collectives by their bytes and their number, and the FLOPs it reads agree with
XLA's and with the traced program's where there is no loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msf_jax.plan import compiled as reading, roofline

# A made-up chip, so that the tests do not depend on any machine's speed.
CHIP = roofline.Chip(
  'test', {'bf16': 1.0, 'f32': 1.0, 'f32_highest': 1 / 6}, 100.0, 10.0, 1e-6, 'none'
)


def _looped(n: int):
  def body(_, x):
    return jnp.tanh(x @ x)

  return lambda x: jax.lax.fori_loop(0, n, body, x).sum()


def _step_time(fn, *args, devices: int = 1) -> roofline.StepTime:
  return roofline.compiled_step_time(jax.jit(fn).lower(*args).compile(), devices, CHIP)


def test_a_loop_of_n_iterations_costs_n_bodies():
  """XLA's cost analysis counts the loop's body once whatever n is; the roofline counts it n
  times: its FLOPs grow by exactly one body's per iteration, its estimate linearly."""
  x = jax.ShapeDtypeStruct((128, 128), np.float32)
  times = {n: _step_time(_looped(n), x) for n in (4, 8, 16)}
  body_flops = 2 * 128**3 + 128 * 128  # the product and the tanh
  assert times[16].matmul_flops == 16 * 2 * 128**3
  assert times[16].flops - times[4].flops == pytest.approx(12 * body_flops, rel=1e-3)
  per_iteration = (times[16].estimate_seconds - times[8].estimate_seconds) / 8
  assert times[8].estimate_seconds - times[4].estimate_seconds == pytest.approx(
    4 * per_iteration, rel=1e-9
  )
  overhead = times[4].estimate_seconds - 4 * per_iteration  # what runs outside the loop
  assert 0 <= overhead < 0.5 * per_iteration
  xla = reading.cost(jax.jit(_looped(16)).lower(x).compile())['flops']
  assert xla < 2 * body_flops  # XLA's own count: one body


def test_a_trip_count_the_compiler_does_not_annotate_is_read_from_the_loop_condition():
  """TPU programs may carry no `known_trip_count`: the count is then read from the loop's
  condition (a counter from a constant, compared with a constant)."""
  x = jax.ShapeDtypeStruct((64, 64), np.float32)
  hlo = jax.jit(_looped(7)).lower(x).compile().as_text()
  assert '"known_trip_count":{"n":"7"}' in hlo
  bare = re.sub(r',"known_trip_count":\{"n":"7"\}', '', hlo)
  counted, read = (roofline.step_time(text, 1, CHIP, 0) for text in (hlo, bare))
  assert read.matmul_flops == counted.matmul_flops == 7 * 2 * 64**3
  assert read.unknown_trip_counts == 0


def test_float32_products_at_highest_precision_are_charged_six_passes():
  x = jax.ShapeDtypeStruct((256, 256), np.float32)
  product = lambda precision: lambda a: jnp.matmul(a, a, precision=precision)
  default = _step_time(product(jax.lax.Precision.DEFAULT), x)
  highest = _step_time(product(jax.lax.Precision.HIGHEST), x)
  assert default.matmul_flops == highest.matmul_flops == 2 * 256**3
  assert highest.compute_seconds == pytest.approx(6 * default.compute_seconds)


def _all_reduce_line(name: str, floats: int, group: str = '{{0,1,2,3}}') -> str:
  return (
    f'  %{name} = f32[{floats}]{{0}} all-reduce(%p), channel_id=1, replica_groups={group}, '
    'to_apply=%add'
  )


def _module(*lines: str) -> str:
  return '\n'.join(
    [
      '%add (a: f32[], b: f32[]) -> f32[] {',
      '  %a = f32[] parameter(0)',
      '  %b = f32[] parameter(1)',
      '  ROOT %s = f32[] add(%a, %b)',
      '}',
      '',
      'ENTRY %main (p: f32[1000000]) -> f32[1000000] {',
      '  %p = f32[1000000]{0} parameter(0)',
      *lines,
      '}',
    ]
  )


def test_a_collective_costs_its_latency_and_its_bytes():
  """Over a group of 4 chips on a 2-D torus: 2 hops a phase, two phases for an all-reduce,
  then 2 x 3/4 of its bytes at the interconnect's bandwidth. Twice the bytes cost more, and
  two collectives cost twice one."""
  one = roofline.step_time(_module(_all_reduce_line('r', 1000)), 4, CHIP, 0, torus_dims=2)
  assert one.collectives == 1
  assert one.collective_seconds == pytest.approx(4 * 1e-6 + 2 * 0.75 * 4000 / 10e9)
  bigger = roofline.step_time(_module(_all_reduce_line('r', 10**6)), 4, CHIP, 0, torus_dims=2)
  assert bigger.collective_seconds > one.collective_seconds
  two = roofline.step_time(
    _module(_all_reduce_line('r', 1000), _all_reduce_line('s', 1000)), 4, CHIP, 0, torus_dims=2
  )
  assert two.collectives == 2 and two.collective_seconds == pytest.approx(
    2 * one.collective_seconds
  )
  alone = roofline.step_time(_module(_all_reduce_line('r', 1000, '{{0}}')), 4, CHIP, 0)
  assert alone.collectives == 0 and alone.collective_seconds == 0  # a group of one chip


def test_the_collectives_of_a_compiled_program_are_found_and_priced():
  """Two psums over 8 host devices: two all-reduces in the compiled program, each priced."""
  mesh = jax.make_mesh((8,), ('data',))
  x = jax.ShapeDtypeStruct((8, 1024), np.float32)

  def twice(v):
    v = jax.lax.psum(v, 'data')
    return jax.lax.psum(jnp.sin(v), 'data')

  fn = jax.shard_map(twice, mesh=mesh, in_specs=P('data'), out_specs=P('data'))
  sharded = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, P('data')))
  step = _step_time(fn, sharded, devices=8)
  assert step.collectives == 2 and step.collective_seconds > 0
  assert step.estimate_seconds == pytest.approx(step.operations_seconds + step.collective_seconds)


def test_chips_have_sources_and_gpus_are_known_by_device_kind():
  for chip in roofline.CHIPS.values():
    assert chip.source.startswith('https://') and chip.hbm_gb_per_s > 0
  assert roofline.chip_for_device_kind('NVIDIA H100 80GB HBM3').name == 'H100-SXM'
  assert roofline.chip_for_device_kind('NVIDIA H200').name == 'H200-SXM'
  assert roofline.chip_for_device_kind('Quadro RTX 6000') is None
  v5e = roofline.CHIPS['v5e']
  assert v5e.matmul_seconds(6e12, 'f32', 'highest') == pytest.approx(6 * 6e12 / 197e12)


@pytest.mark.slow  # compiles a train step
def test_on_a_train_step_without_loops_the_counts_agree():
  """A small train step (ResNet-18 of width 8 at 16 px, a bank searched in one piece): no
  loop, so XLA's own FLOP count is whole. The roofline's count from the optimized HLO equals
  it, and the convolutions and products counted from the traced step (the architecture's
  count the planner reports) equal those in the compiled program."""
  import os

  from msf_jax.config_utils import load_config
  from msf_jax.plan import planner
  from msf_jax.sharding import make_mesh

  config = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'digits_msf.py'))
  config.model.width, config.image_size, config.batch_size = 8, 16, 8
  config.msf.bank_size = 64
  program = planner.train_program(config, make_mesh(jax.devices()[:1]), 10)
  executable = program.jitted.lower(*program.args).compile()
  assert reading.while_loops(executable.as_text()) == 0
  step = roofline.compiled_step_time(executable, 1, CHIP)
  assert step.flops == pytest.approx(reading.cost(executable)['flops'], rel=1e-3)
  traced = reading.matmul_flops(program.jitted, *program.args)
  assert traced == pytest.approx(step.matmul_flops, rel=1e-3)
