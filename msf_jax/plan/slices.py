"""Cloud TPU slices by the names `gcloud` takes (v5e-64, v4-32, ...): their chips and hosts,
the compiler's topology for them, and each generation's memory a chip, which the planner's
memory check uses (its speed figures are `roofline.CHIPS`')."""

import dataclasses
import importlib.util
import math
import re

from jax.experimental import topologies

from msf_jax.plan import roofline


class SliceError(ValueError):
  """A slice the planner cannot compile for: a name it does not know, or no libtpu here."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as Google publishes it (`source`): memory a chip, its hosts and how
  slices are named. Its peak, bandwidths and latency: `chip`.

    `name_counts_cores`: v4-N and v5p-N count TensorCores (two a chip), v5e-N and v6e-N chips.
    `megacore`: JAX sees one device a chip, its two TensorCores fused (v4, v5p).
    Hosts: slices of up to `single_host_chips` chips are one host with `single_host_vcpus`;
    larger ones are `chips_per_host` chips a host with `host_vcpus` each.
  """

  name: str
  torus_dims: int
  name_counts_cores: bool
  megacore: bool
  hbm_gib: float
  chips_per_host: int
  host_vcpus: int
  single_host_chips: int
  single_host_vcpus: int
  source: str

  @property
  def chip(self) -> roofline.Chip:
    return roofline.CHIPS[self.name]


GENERATIONS = {
  g.name: g
  for g in (
    Generation('v4', 3, True, True, 32, 4, 240, 4, 240, 'https://cloud.google.com/tpu/docs/v4'),
    Generation('v5e', 2, False, False, 16, 4, 112, 8, 224, 'https://cloud.google.com/tpu/docs/v5e'),
    Generation('v5p', 3, True, True, 95, 4, 208, 4, 208, 'https://cloud.google.com/tpu/docs/v5p'),
    Generation('v6e', 2, False, False, 32, 4, 180, 8, 180, 'https://cloud.google.com/tpu/docs/v6e'),
  )
}
ALIASES = {'v5litepod': 'v5e'}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A slice to plan for: `name` as given, the compiler's `topology` ('v5e:8x8'; 'cpu:8' for
  XLA's host platform), its chips and hosts; `generation` is None on the CPU."""

  name: str
  topology: str
  chips: int
  hosts: int
  generation: Generation | None

  @property
  def platform(self) -> str:
    return 'cpu' if self.generation is None else 'tpu'

  @property
  def tpu_generation(self) -> Generation:
    """The generation of a TPU slice; a CPU slice has none."""
    if self.generation is None:
      raise SliceError(f'{self.name} is not a TPU slice.')
    return self.generation

  @property
  def host_vcpus(self) -> int | None:
    if self.generation is None:
      return None
    g = self.generation
    return g.single_host_vcpus if self.chips <= g.single_host_chips else g.host_vcpus


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The compiler's shape of a slice of `chips` (a power of two): as square as it goes,
  smaller sides first (v5e-32: 4x8; v4-32's 16 chips: 2x2x4); 3-D slices of 4 chips are
  2x2x1."""
  exponent = round(math.log2(chips))
  if chips < 1 or 2**exponent != chips:
    raise SliceError(f'A TPU slice has a power-of-two number of chips, not {chips}.')
  if dims == 3 and chips < 8:
    return (2, 2, 1) if chips == 4 else (chips, 1, 1)
  sides = [exponent // dims + (i < exponent % dims) for i in range(dims)]
  return tuple(2**s for s in sorted(sides))


def _hosts(generation: Generation, chips: int) -> int:
  if chips <= generation.single_host_chips:
    return 1
  return chips // generation.chips_per_host


def parse_slice(name: str) -> Slice:
  """'v5e-64', 'v5litepod-16', 'v4-32', 'v5p-8', 'v6e-8' (accelerator types), a compiler
  topology such as 'v5e:2x2' or 'v4:2x2x1', or 'cpu:N' (N devices of XLA's host platform)."""
  if match := re.fullmatch(r'cpu:(\d+)', name):
    return Slice(name, name, int(match[1]), 1, None)
  if match := re.fullmatch(r'(v\w+?):(\d+(?:x\d+)+)', name):
    generation = _generation(match[1], name)
    chips = math.prod(int(side) for side in match[2].split('x'))
    return Slice(name, name, chips, _hosts(generation, chips), generation)
  if match := re.fullmatch(r'(v\w+?)-(\d+)', name):
    generation = _generation(match[1], name)
    count = int(match[2])
    chips = count // 2 if generation.name_counts_cores else count
    shape = torus_shape(chips, generation.torus_dims)
    topology = f'{generation.name}:{"x".join(map(str, shape))}'
    return Slice(name, topology, chips, _hosts(generation, chips), generation)
  raise SliceError(
    f'Unknown slice {name!r}: use an accelerator type such as v5e-64, v4-32, '
    f'v5p-8 or v6e-8, a topology such as v5e:2x2, or cpu:N.'
  )


def _generation(prefix: str, name: str) -> Generation:
  generation = GENERATIONS.get(ALIASES.get(prefix, prefix))
  if generation is None:
    raise SliceError(
      f'Unknown TPU generation in {name!r}: the planner knows '
      f'{", ".join(GENERATIONS)} (v5litepod is v5e).'
    )
  return generation


def tpu_devices(tpu_slice: Slice) -> list:
  """The devices of `tpu_slice` as JAX on the real slice sees them (one a chip: megacore on
  v4 and v5p), from the TPU compiler's topology description: no TPU needed, libtpu is."""
  chip_config = 'megacore' if tpu_slice.tpu_generation.megacore else 'default'
  try:
    description = topologies.get_topology_desc(
      topology_name=tpu_slice.topology,
      platform='tpu',
      chip_config_name=chip_config,
      **_small_slice_host(tpu_slice),
    )
  except Exception as error:  # no libtpu: JAX raises a plain runtime error
    if _has_libtpu():
      raise
    raise SliceError(
      f'Planning for {tpu_slice.name} compiles for TPU and needs libtpu, which is not '
      'installed: pip install "jax[tpu]==0.10.2" (no TPU needed), or plan on XLA\'s host '
      'devices with --topology=cpu:8.'
    ) from error
  devices = list(description.devices)
  if len(devices) != tpu_slice.chips:
    raise RuntimeError(
      f'The compiler lists {len(devices)} devices for {tpu_slice.topology}, '
      f'expected one for each of its {tpu_slice.chips} chips.'
    )
  return devices


def _small_slice_host(tpu_slice: Slice) -> dict:
  """A slice of fewer chips than the compiler's default host (2x2x1) is one host of its own
  shape (v5e-1: 1x1x1); the compiler refuses it otherwise."""
  shape = [int(side) for side in tpu_slice.topology.split(':')[1].split('x')]
  if tpu_slice.chips >= 4:
    return {}
  return {'chips_per_host_bounds': tuple(shape + [1] * (3 - len(shape)))}


def _has_libtpu() -> bool:
  try:
    return importlib.util.find_spec('libtpu') is not None
  except ImportError:
    return False
