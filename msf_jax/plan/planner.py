"""A run planned from its compiled programs: the train step, the kNN monitor's feature step,
the linear probe's step and the kNN evaluation's search, built by the functions a run uses
(same mesh, shardings, donation and fused colour stage), lowered with abstract inputs for the
devices of a slice and compiled there. Nothing is allocated; no TPU is needed, only the
compiler.

Each program's step time is read from its optimized HLO by `roofline.step_time` for the
slice's chip (or, for cpu:N, this machine's CPU as measured): a bound no run beats and an
estimate with stated assumptions, every loop counted by its trip count; `run_estimate` turns
the train step's into the run's hours. XLA's own TPU time estimate came out negative for
these programs, so it is not used.
"""

import dataclasses
import functools
import gzip
import math
import os
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from msf_jax.config_utils import ConfigError, check_training_config
from msf_jax.data import pipeline, sources
from msf_jax.evaluate import features as feature_extraction, knn, linear_probe
from msf_jax.models import feature_dim, resolve_dtype_name
from msf_jax.plan import compiled as reading, roofline
from msf_jax.plan.slices import Slice, SliceError, tpu_devices
from msf_jax.sharding import batch_sharded, make_mesh, replicated
from msf_jax.train import make_train_step
from msf_jax.train_state import abstract_state, bank_layout, state_shardings

# (train images, classes) of TFDS datasets a plan may be asked for before they are prepared.
KNOWN_DATASETS = {'imagenet2012': (1_281_167, 1000)}
# Two-view samples/s one host core makes at 224 px (msf_jax's tf.data host stage, median of
# 7 runs of benchmarks/input_benchmark.py, benchmarks/RESULTS.md, 2026-11-26).
INPUT_SAMPLES_PER_CORE = 268.0
TRAIN_STEP, KNN_SEARCH = 'train step', 'kNN search'  # the programs' names, as plans show them


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
  """One compiled program: per-device memory by kind (bytes), XLA's FLOPs and bytes accessed
  per device and step (each loop body counted once: `while_loops`), the architecture's FLOPs
  per image, collective bytes per step, and the collectives' count and bytes by dtype
  (`compiled.collective_counts`)."""

  name: str
  global_batch: int
  devices: int
  memory: dict[str, int]
  flops: float
  bytes_accessed: float
  architecture_flops_per_image: float
  collectives: dict[str, int]
  compile_seconds: float
  while_loops: int = 0
  collective_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  hlo_file: str | None = None
  step_time: dict[str, Any] | None = None  # roofline.StepTime's fields on the plan's chip
  step_time_error: str | None = None  # why there is no step time where a chip was given

  @property
  def flops_per_image(self) -> float:
    """XLA's FLOPs per image: a device's count over the images it computes."""
    return self.flops * self.devices / self.global_batch


def devices_of(tpu_slice: Slice) -> list:
  """The devices a plan compiles for: a TPU slice's from its topology, or this process's CPU
  devices for 'cpu:N' (`jax_num_cpu_devices` must allow N before JAX starts)."""
  if tpu_slice.platform == 'tpu':
    return tpu_devices(tpu_slice)
  devices = jax.devices('cpu')
  if len(devices) < tpu_slice.chips:
    raise SliceError(
      f'{tpu_slice.name} needs {tpu_slice.chips} CPU devices; this process has '
      f'{len(devices)} (start it with --xla_force_host_platform_device_count).'
    )
  return devices[: tpu_slice.chips]


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """The config as a run on `platform` resolves it: `model.dtype='auto'` becomes bfloat16 on
  TPU even though the planner runs on a CPU."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = resolve_dtype_name(config.model.dtype, platform)
  return config


def dataset_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(train images, classes): ImageNet's are known without the data; other sources are read."""
  if config.data.source == 'tfds' and config.data.name in KNOWN_DATASETS:
    return KNOWN_DATASETS[config.data.name]
  split = sources.build_split(config.data, 'train', config.image_size)
  return split.num_examples, split.num_classes


def _placed(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _out_of_memory_bytes(message: str) -> int | None:
  """What a TPU compiler's out-of-memory error says the program needs ('Total hbm usage >=
  22.47G', else 'Used 21.95G of 15.48G hbm'), in bytes; None for any other error."""
  match = re.search(r'Total hbm usage >= ([\d.]+)([KMGT])?', message) or re.search(
    r'Used ([\d.]+)([KMGT])? of [\d.]+[KMGT]? hbm', message
  )
  if not match:
    return None
  return int(float(match[1]) * 1024 ** ' KMGT'.index(match[2] or ' '))


@dataclasses.dataclass(frozen=True)
class Program:
  """What to compile: a jitted function of abstract, placed arguments, and the bytes of its
  state and batch arguments a device."""

  name: str
  jitted: Callable
  args: tuple
  global_batch: int
  devices: int
  state_bytes: int
  batch_bytes: int


def compile_program(
  program: Program,
  hbm_bytes: int | None,
  hlo_dir: str | None = None,
  chip: roofline.Chip | None = None,
  torus_dims: int = 1,
) -> ProgramPlan:
  """Compiles and reads the program; one whose arguments alone overflow the chip is not
  compiled (its memory is then those arguments), and one the compiler finds too large for
  the chip keeps the size the compiler reports. With `chip`, the program's step time on it
  (`roofline.step_time`); with `hlo_dir`, the optimized HLO is kept there (gzipped), so that
  later estimates need no new compile."""
  plan = functools.partial(
    ProgramPlan,
    name=program.name,
    global_batch=program.global_batch,
    devices=program.devices,
    architecture_flops_per_image=(
      reading.matmul_flops(program.jitted, *program.args) / program.global_batch
    ),
  )
  state_bytes, batch_bytes = program.state_bytes, program.batch_bytes
  arguments = {'state': state_bytes, 'batch': batch_bytes}
  if hbm_bytes and state_bytes + batch_bytes > hbm_bytes:
    return plan(
      memory=_memory_of_parts(arguments),
      flops=math.nan,
      bytes_accessed=math.nan,
      collectives={},
      compile_seconds=0.0,
    )
  start = time.perf_counter()
  try:
    # The builders' steps are jax.jit's, typed by their makers as the functions they run.
    executable = program.jitted.lower(*program.args).compile()  # type: ignore[attr-defined]
  except Exception as error:  # the compiler's out-of-memory error is a plain runtime error
    needed = _out_of_memory_bytes(str(error))
    if needed is None:
      raise
    return plan(
      memory=_memory_of_parts({**arguments, 'temporaries': needed - state_bytes - batch_bytes}),
      flops=math.nan,
      bytes_accessed=math.nan,
      collectives={},
      compile_seconds=time.perf_counter() - start,
    )
  seconds = time.perf_counter() - start
  cost, hlo = reading.cost(executable), executable.as_text() or ''  # None: no HLO text kept
  memory = reading.memory(executable, state_bytes, batch_bytes)
  return plan(
    memory=memory,
    flops=cost['flops'],
    bytes_accessed=cost['bytes_accessed'],
    collectives=reading.collective_bytes(hlo),
    compile_seconds=seconds,
    while_loops=reading.while_loops(hlo),
    collective_counts=reading.collective_counts(hlo),
    hlo_file=_keep_hlo(hlo, program.name, hlo_dir),
    **(_read_step_time(hlo, program.devices, memory, chip, torus_dims) if chip and hlo else {}),
  )


def step_time_of(
  hlo: str, devices: int, memory: dict[str, int], chip: roofline.Chip, torus_dims: int
) -> dict[str, Any]:
  """`roofline.step_time` of a compiled program, its arguments (state, batch and the rest)
  read once, as a JSON-ready dict."""
  arguments = memory['state'] + memory['batch'] + memory['other_arguments']
  return dataclasses.asdict(roofline.step_time(hlo, devices, chip, arguments, torus_dims))


def _read_step_time(
  hlo: str, devices: int, memory: dict[str, int], chip: roofline.Chip, torus_dims: int
) -> dict[str, Any]:
  """{'step_time': ...}, or {'step_time_error': why} where the HLO reader fails on a program
  it was not written for: the program's memory and fit, which the compiler gave, still stand."""
  try:
    return {'step_time': step_time_of(hlo, devices, memory, chip, torus_dims)}
  except Exception as error:  # any reader failure: the plan keeps what the compiler said
    return {'step_time_error': f'{type(error).__name__}: {error}'}


def unestimated_lines(programs: list[dict]) -> list[str]:
  """A line for each program the HLO reader could not read: why it has no step time."""
  return [
    f'No step-time estimate for the {p["name"]}: the HLO reader failed on its program '
    f"({p['step_time_error']}); its memory above is the compiler's."
    for p in programs
    if p.get('step_time_error')
  ]


def _keep_hlo(hlo: str, name: str, hlo_dir: str | None) -> str | None:
  if not hlo_dir or not hlo:
    return None
  os.makedirs(hlo_dir, exist_ok=True)
  path = os.path.join(hlo_dir, name.replace(' ', '_') + '.hlo.gz')
  with gzip.open(path, 'wt') as f:
    f.write(hlo)
  return path


def _memory_of_parts(parts: dict[str, int]) -> dict[str, int]:
  kinds = {kind: parts.get(kind, 0) for kind in reading.MEMORY_KINDS}
  return {**kinds, 'total': sum(kinds.values())}


def _unplaced(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def bank_row_bytes(bank: Any, bank_size: int) -> int:
  """Bytes one bank row takes in the (abstract) state: each array of the bank with a row a
  slot (the embedding, its label), at its own dtype."""
  return sum(
    math.prod(leaf.shape[1:]) * np.dtype(leaf.dtype).itemsize
    for leaf in jax.tree.leaves(bank)
    if leaf.ndim and leaf.shape[0] == bank_size
  )


def train_program(config: ml_collections.ConfigDict, mesh: Mesh, steps_per_epoch: int) -> Program:
  """The train step as `train_loop` builds it, for the abstract state and batch."""
  state = abstract_state(config, state_shardings(config, mesh))
  batch = _placed(
    pipeline.train_batch_spec(
      config.batch_size, config.image_size, config.data.pairing, config.msf.shuffle_target
    ),
    batch_sharded(mesh),
  )
  return Program(
    TRAIN_STEP,
    make_train_step(config, mesh, steps_per_epoch),
    (state, batch),
    config.batch_size,
    mesh.devices.size,
    reading.bytes_per_device(state),
    reading.bytes_per_device(batch),
  )


def feature_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
  """The feature extraction of the kNN monitor (and of evaluation) for one batch."""
  variables = abstract_state(config, replicated(mesh)).online
  global_batch = feature_extraction.feature_batch_size(config.monitor.batch_size, mesh)
  images = _placed(pipeline.eval_images_spec(global_batch, config.image_size), batch_sharded(mesh))
  return Program(
    'feature step',
    feature_extraction.make_feature_step(config, mesh),
    (variables, images),
    global_batch,
    mesh.devices.size,
    reading.bytes_per_device(variables),
    reading.bytes_per_device(images),
  )


def probe_program(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  num_classes: int,
  train_examples: int,
) -> Program:
  """One step of the official linear probe (fresh views through the frozen backbone)."""
  num_features = feature_dim(config.model.depth, config.model.width)
  probe = linear_probe.OFFICIAL
  optimizer = linear_probe.make_probe_optimizer(max(train_examples // probe.batch_size, 1), probe)
  params = jax.eval_shape(lambda: linear_probe.init_linear(num_features, num_classes, 0))
  stats = (jax.ShapeDtypeStruct((num_features,), np.float32),) * 2
  backbone = abstract_state(config).online
  arguments = _placed(
    (params, jax.eval_shape(optimizer.init, params), backbone, stats), replicated(mesh)
  )
  batch = _placed(
    pipeline.probe_batch_spec(probe.batch_size, config.image_size), batch_sharded(mesh)
  )
  return Program(
    'linear probe step',
    linear_probe.make_probe_step(config, mesh, optimizer, num_classes),
    (*arguments, batch),
    probe.batch_size,
    mesh.devices.size,
    reading.bytes_per_device(arguments),
    reading.bytes_per_device(batch),
  )


def knn_program(config: ml_collections.ConfigDict, mesh: Mesh, train_examples: int) -> Program:
  """The kNN evaluation's search of one chunk of queries against every train image's features,
  held as `knn.nearest_neighbours` holds them: split by rows over the chips (on one chip, all
  of them). Its 'images' are the chunk's queries; its state, the train features."""
  num_features = feature_dim(config.model.depth, config.model.width)
  mesh_of_search = knn.search_mesh(mesh)
  search = knn.chunk_search(
    max(knn.DEFAULT_KS),
    knn.TRAIN_CHUNK_SIZE,
    mesh_of_search,
    train_examples if mesh_of_search else None,
  )
  train = knn.train_features_spec(train_examples, num_features, mesh)
  queries = _placed(
    jax.ShapeDtypeStruct((knn.QUERY_CHUNK_SIZE, num_features), np.float32), replicated(mesh)
  )
  return Program(
    KNN_SEARCH,
    search,
    (queries, train),
    knn.QUERY_CHUNK_SIZE,
    mesh.devices.size,
    reading.bytes_per_device(train),
    reading.bytes_per_device(queries),
  )


PROGRAMS = ('train', 'features', 'probe', 'knn')


def _gib(size: float) -> float:
  return size / reading.GIB


def fit_advice(
  program: ProgramPlan, config: ml_collections.ConfigDict, hbm_bytes: float
) -> list[str]:
  """Settings under which the program would fit a chip of `hbm_bytes`, from its memory by
  kind: a smaller batch per chip (what grows with it: the batch and the temporaries), a
  smaller bank (each row: its embedding and label)."""
  if program.name == KNN_SEARCH:
    return knn_fit_advice(program, hbm_bytes)
  memory, per_chip = program.memory, program.global_batch // program.devices
  advice = []
  per_image = (memory['batch'] + memory['temporaries']) / per_chip
  fixed = memory['total'] - memory['batch'] - memory['temporaries']
  images = int((hbm_bytes - fixed) // per_image) if per_image else 0
  if 1 <= images < per_chip:
    advice.append(f'--config.batch_size={images * program.devices} ({images} a chip)')
  if program.name == TRAIN_STEP:
    row_bytes = bank_row_bytes(abstract_state(config).bank, config.msf.bank_size)
    shards = program.devices if bank_layout(config, program.devices) == 'sharded' else 1
    bank_bytes = config.msf.bank_size * row_bytes // shards
    if shards == 1 and program.devices > 1 and config.msf.bank_size % program.devices == 0:
      if memory['total'] - bank_bytes * (1 - 1 / program.devices) <= hbm_bytes:
        advice.append(
          f'--config.msf.bank_layout=sharded (each chip then holds 1/'
          f'{program.devices} of the bank, {_gib(bank_bytes / program.devices):.2f}'
          ' GiB)'
        )
    rows = int((hbm_bytes - (memory['total'] - bank_bytes)) // row_bytes) * shards
    rows -= rows % config.batch_size
    if config.batch_size <= rows < config.msf.bank_size:
      advice.append(f'--config.msf.bank_size={rows}')
  return advice


def knn_fit_advice(program: ProgramPlan, hbm_bytes: float) -> list[str]:
  """The smallest slice (a power of two of chips) over which the train features would fit:
  each chip holds its share of them beside what does not shrink with their number (queries,
  code, the search's temporaries)."""
  features = program.memory['state'] * program.devices
  room = hbm_bytes - (program.memory['total'] - program.memory['state'])
  if room <= 0:
    return []
  chips = 2 ** math.ceil(math.log2(max(features / room, 1)))
  return [
    f'a slice of {chips} chips or more (each holding its share of the '
    f'{_gib(features):.1f} GiB of train features)'
  ]


def does_not_fit_sentence(
  program: ProgramPlan, config: ml_collections.ConfigDict, tpu_slice: Slice
) -> str:
  """One sentence: what the program needs, what a chip has, and what would make it fit."""
  generation = tpu_slice.tpu_generation
  hbm = generation.hbm_gib * reading.GIB
  advice = fit_advice(program, config, hbm)
  remedy = (
    f'it would fit with {" or ".join(advice)}'
    if advice
    else 'no smaller batch or bank fits it: use a generation with more memory a chip'
  )
  return (
    f'The {program.name} needs {_gib(program.memory["total"]):.1f} GiB a chip and a '
    f'{generation.name} chip has {generation.hbm_gib:.1f} GiB: '
    f'{remedy}.'
  )


def plan_run(
  config: ml_collections.ConfigDict,
  tpu_slice: Slice,
  programs: tuple[str, ...] = PROGRAMS,
  train_examples: int | None = None,
  num_classes: int | None = None,
  input_samples_per_core: float = INPUT_SAMPLES_PER_CORE,
  hlo_dir: str | None = None,
) -> dict[str, Any]:
  """The plan of training `config` on `tpu_slice`, as a JSON-ready dict: each program's
  memory, FLOPs and collectives, whether all fit, the step-time bound, the host feed it
  needs and the whole run's hours. With `hlo_dir`, each program's optimized HLO is kept."""
  unknown = [name for name in programs if name not in PROGRAMS]
  if unknown:
    raise ConfigError(
      f'Unknown program(s) {", ".join(unknown)}: choose from {", ".join(PROGRAMS)}.'
    )
  config = for_platform(config, tpu_slice.platform)
  check_training_config(config, tpu_slice.chips, tpu_slice.hosts)
  if train_examples is None or num_classes is None:
    known_examples, known_classes = dataset_size(config)
    train_examples, num_classes = train_examples or known_examples, num_classes or known_classes
  steps_per_epoch = train_examples // config.batch_size
  generation = tpu_slice.generation
  hbm = int(generation.hbm_gib * reading.GIB) if generation else None
  mesh = make_mesh(devices_of(tpu_slice))
  builders = {
    'train': lambda: train_program(config, mesh, steps_per_epoch),
    'features': lambda: feature_program(config, mesh),
    'probe': lambda: probe_program(config, mesh, num_classes, train_examples),
    'knn': lambda: knn_program(config, mesh, train_examples),
  }
  chip = generation.chip if generation else roofline.host_chip(tpu_slice.chips)
  torus_dims = generation.torus_dims if generation else 1
  compiled = [
    compile_program(builders[name](), hbm, hlo_dir, chip, torus_dims) for name in programs
  ]
  plan = {
    'slice': dataclasses.asdict(tpu_slice) | {'host_vcpus': tpu_slice.host_vcpus},
    'config': {
      'batch_size': config.batch_size,
      'image_size': config.image_size,
      'depth': config.model.depth,
      'dtype': config.model.dtype,
      'bank_size': config.msf.bank_size,
      'bank_layout': bank_layout(config, tpu_slice.chips),
      'num_epochs': config.num_epochs,
      'train_examples': train_examples,
      'steps_per_epoch': steps_per_epoch,
    },
    'programs': {
      p.name: dataclasses.asdict(p) | {'flops_per_image': p.flops_per_image} for p in compiled
    },
    'fits': None if hbm is None else all(p.memory['total'] <= hbm for p in compiled),
    'does_not_fit': [
      does_not_fit_sentence(p, config, tpu_slice)
      for p in compiled
      if hbm is not None and p.memory['total'] > hbm
    ],
  }
  train = next((p for p in compiled if p.name == TRAIN_STEP), None)
  if train and train.step_time and plan['fits'] is not False:
    plan['run'] = run_estimate(
      train, tpu_slice, config.num_epochs * steps_per_epoch, input_samples_per_core
    )
  plan['chip'] = dataclasses.asdict(chip)
  return plan


def run_estimate(
  train: ProgramPlan, tpu_slice: Slice, total_steps: int, input_samples_per_core: float
) -> dict[str, float]:
  """The whole run from the train step's bound and estimate (`roofline.step_time`): images
  a second, the two-view images each host must make at them (and the cores that takes), and
  the run's hours and chip-hours."""
  assert train.step_time is not None
  run: dict[str, float] = {
    'input_samples_per_core': input_samples_per_core,
    'total_steps': total_steps,
  }
  for name in ('bound', 'estimate'):
    seconds = train.step_time[f'{name}_seconds']
    per_host = train.global_batch / seconds / tpu_slice.hosts
    hours = total_steps * seconds / 3600
    run |= {
      f'{name}_step_seconds': seconds,
      f'{name}_images_per_second': train.global_batch / seconds,
      f'{name}_images_per_second_per_host': per_host,
      f'{name}_host_cores_needed': per_host / input_samples_per_core,
      f'{name}_hours': hours,
      f'{name}_chip_hours': hours * tpu_slice.chips,
    }
  return run
