"""python -m msf_jax.plan --config=configs/imagenet_msf.py --topology=v5e-64 [--config.k=v]

Plans a training run before any slice exists: compiles the train step, the kNN monitor's
feature step, the linear probe's step and the kNN evaluation's search for the slice's chips
on this machine (TPU slices need libtpu: `pip install "jax[tpu]==0.10.2"`; no TPU), then
prints per chip the memory by kind against the chip's HBM, FLOPs per image (XLA's and the
architecture's), collective bytes a step, a lower bound on the step time, the host feed it
needs and the whole run's hours. Exits 1 with one sentence when the run does not fit, and
with one `error:` line for a setting, a slice or a missing libtpu it cannot plan with
(MSF_JAX_TRACEBACK=1 shows the traceback). A plan is cached by config, slice and code
(--cache_dir), so a second identical call is instant.
"""

import hashlib
import importlib.metadata
import json
import math
import os
import sys

from msf_jax import cli

cli.quiet_tensorflow()  # before the planner imports TensorFlow

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msf_jax.config_utils import ConfigError  # noqa: E402
from msf_jax.data.sources import DatasetNotFoundError  # noqa: E402
from msf_jax.plan import planner, slices  # noqa: E402
from msf_jax.plan.compiled import GIB  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
_TOPOLOGY = flags.DEFINE_string(  # required=True: its value typed a str, not None
  'topology',
  None,
  'Slice: an accelerator type (v5e-64, v5litepod-16, v4-32, v5p-8, '
  'v6e-8), a compiler topology (v5e:2x2) or cpu:N (XLA host devices, no libtpu).',
  required=True,
)
_JSON = flags.DEFINE_string('json', None, 'Also write the plan to this JSON file.')
_HLO_DIR = flags.DEFINE_string(
  'hlo_dir', None, "Keep each program's optimized HLO here (gzipped), to estimate again later."
)
_CACHE_DIR = flags.DEFINE_string(
  'cache_dir',
  os.path.join(
    os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'msf_jax', 'plans'
  ),
  "Plans already made; '' turns it off.",
)
_PROGRAMS = flags.DEFINE_list(
  'programs', list(planner.PROGRAMS), f'Which programs to compile: {", ".join(planner.PROGRAMS)}.'
)
_TRAIN_EXAMPLES = flags.DEFINE_integer(
  'train_examples', None, 'Train images (known for imagenet2012; read from the data otherwise).'
)
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Classes, for the linear probe.')
_INPUT_RATE = flags.DEFINE_float(
  'input_samples_per_core',
  None,
  'Two-view samples/s one host core makes '
  '(benchmarks/input_benchmark.py); default: the 224 px figure in benchmarks/RESULTS.md.',
)
flags.mark_flag_as_required('config')

FLAGS_HINT = 'python -m msf_jax.plan --helpshort lists the flags.'
# What a user causes and can fix from the message alone: a setting, a slice name, no libtpu,
# a dataset not prepared (only ImageNet's size is known without it).
USER_ERRORS = (ConfigError, slices.SliceError, DatasetNotFoundError)


def _code_digest() -> str:
  """Digest of msf_jax's sources: a plan made by other code is not reused."""
  digest = hashlib.sha256()
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for directory, _, files in sorted(os.walk(package)):
    for name in sorted(f for f in files if f.endswith('.py')):
      with open(os.path.join(directory, name), 'rb') as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'absent'


def cache_key(config_json: str, arguments: dict) -> str:
  """A plan's identity: the config, the planner's arguments, JAX, libtpu and msf_jax's code."""
  identity = json.dumps(
    {
      'config': config_json,
      'arguments': arguments,
      'jax': _version('jax'),
      'libtpu': _version('libtpu'),
      'code': _code_digest(),
    },
    sort_keys=True,
  )
  return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _megabytes(size: float) -> str:
  return f'{size / 1e6:,.1f} MB'


def render(plan: dict) -> str:
  """The plan as a person reads it: one column a program, then the run's figures."""
  tpu_slice, config = plan['slice'], plan['config']
  generation = tpu_slice['generation']
  lines = [
    f'Plan for {tpu_slice["name"]} (topology {tpu_slice["topology"]}: '
    f'{tpu_slice["chips"]} chips, {tpu_slice["hosts"]} host(s)), ResNet-'
    f'{config["depth"]} at {config["image_size"]} px in {config["dtype"]}, global batch '
    f'{config["batch_size"]}, bank {config["bank_size"]:,} rows '
    f'({config.get("bank_layout", "replicated")}).'
  ]
  programs = list(plan['programs'].values())
  row = lambda label, cells: f'  {label:<28}' + ''.join(f'{c:>20}' for c in cells)
  lines.append(row('per chip', [p['name'] for p in programs]))
  for kind in ('state', 'batch', 'other_arguments', 'outputs', 'temporaries', 'code', 'total'):
    lines.append(
      row(f'  {kind.replace("_", " ")} GiB', [f'{p["memory"][kind] / GIB:.3f}' for p in programs])
    )
  if generation:
    lines.append(row('  HBM GiB', [f'{generation["hbm_gib"]:.1f}'] * len(programs)))
  lines.append(
    row(
      'GFLOP an image (XLA)',
      [
        'not compiled' if math.isnan(p['flops_per_image']) else f'{p["flops_per_image"] / 1e9:.2f}'
        for p in programs
      ],
    )
  )
  lines.append(
    row(
      'GFLOP an image (architecture)',
      [f'{p["architecture_flops_per_image"] / 1e9:.2f}' for p in programs],
    )
  )
  lines += [
    f"    {p['name']}: XLA counts a loop's body once ({p['while_loops']} while loop(s) in it)"
    for p in programs
    if p.get('while_loops')
  ]
  lines.append(
    row('collectives a step', [_megabytes(sum(p['collectives'].values())) for p in programs])
  )
  for p in programs:
    if p['collectives']:
      lines.append(
        f'    {p["name"]}: '
        + ', '.join(f'{op} {_megabytes(size)}' for op, size in sorted(p['collectives'].items()))
      )
    for op, counts in sorted(p.get('collective_counts', {}).items()):
      dtypes = ', '.join(
        f'{dtype} {_megabytes(size)}' for dtype, size in sorted(counts.items()) if dtype != 'count'
      )
      lines.append(f'      {counts["count"]} {op}: {dtypes}')
  lines.append(row('compile seconds', [f'{p["compile_seconds"]:.0f}' for p in programs]))
  if plan['fits'] is not None:
    lines.append('Fits: ' + ('yes' if plan['fits'] else 'no'))
  if run := plan.get('run'):
    lines += _run_lines(plan, run)
  lines += planner.unestimated_lines(programs)
  return '\n'.join(lines)


def _run_lines(plan: dict, run: dict) -> list[str]:
  """The train step's bound and estimate, their parts, and the run they make."""
  step = plan['programs']['train step']['step_time']
  chip, tpu_slice, config = plan['chip'], plan['slice'], plan['config']
  ms = lambda seconds: f'{seconds * 1e3:,.2f} ms'
  loops = (
    f' ({step["unknown_trip_counts"]} loop(s) of unknown trip count counted once)'
    if step['unknown_trip_counts']
    else ''
  )
  lines = [
    f'Step time on {chip["name"]}: bound {ms(step["bound_seconds"])} (no run is faster: the '
    f'larger of {step["flops"] / 1e9:,.1f} GFLOP at peak, {ms(step["compute_seconds"])}, and '
    f'the arguments read once, {ms(step["arguments_seconds"])}); estimate '
    f'{ms(step["estimate_seconds"])} = the operations one after another at their roofline '
    f'{ms(step["operations_seconds"])} + {step["collectives"]} collective(s) waited for '
    f'{ms(step["collective_seconds"])}{loops}.',
    '  costliest operations: '
    + ', '.join(f'{name} {ms(seconds)}' for name, seconds in step['top_operations']),
  ]
  for name in ('bound', 'estimate'):
    lines.append(
      f'At the {name}: {run[f"{name}_images_per_second"]:,.0f} images/s; each host makes '
      f'{run[f"{name}_images_per_second_per_host"]:,.0f} two-view images/s = '
      f'{run[f"{name}_host_cores_needed"]:.1f} cores at {run["input_samples_per_core"]:.0f} a '
      f"core (of the host's {tpu_slice['host_vcpus'] or 'unknown'} vCPUs); "
      f'{config["num_epochs"]} epochs ({run["total_steps"]:,} steps) take '
      f'{run[f"{name}_hours"]:,.1f} hours, {run[f"{name}_chip_hours"]:,.0f} chip-hours.'
    )
  lines.append(f'Chip figures: {chip["source"]} (msf_jax/plan/roofline.py lists them all).')
  return lines


def _ask_for_cpu_devices(count: int) -> None:
  """cpu:N plans on N host devices: asked for before JAX starts its backends (a process that
  already started them keeps its own count, which `planner.devices_of` checks)."""
  try:
    current = jax.config.jax_num_cpu_devices  # type: ignore[attr-defined]  # set at run time
    jax.config.update('jax_num_cpu_devices', max(count, current))
  except RuntimeError:
    pass


def _compile_only() -> None:
  """The planner only compiles: JAX's backend stays the CPU (on a TPU VM, the chips stay free
  for a run), and libtpu, loaded for its compiler, does not take the lock that keeps a second
  process off the chips, so plans can run side by side."""
  jax.config.update('jax_platforms', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def main(argv) -> None:
  if len(argv) > 1:
    raise ConfigError(f'Unexpected arguments: {argv[1:]} (flags are written --name=value).')
  _compile_only()
  tpu_slice = slices.parse_slice(_TOPOLOGY.value)
  if tpu_slice.platform == 'cpu':
    _ask_for_cpu_devices(tpu_slice.chips)
  arguments = {
    'topology': _TOPOLOGY.value,
    'programs': _PROGRAMS.value,
    'train_examples': _TRAIN_EXAMPLES.value,
    'num_classes': _NUM_CLASSES.value,
    'input_samples_per_core': _INPUT_RATE.value,
    'hlo_dir': _HLO_DIR.value,
  }
  config = cli.read_config(_CONFIG)
  path = None
  if _CACHE_DIR.value:
    key = cache_key(config.to_json(sort_keys=True), arguments)
    path = os.path.join(_CACHE_DIR.value, f'{key}.json')
  if path and os.path.exists(path):
    with open(path) as f:
      plan = json.load(f)
    print(f'(cached plan: {path})')
  else:
    plan = planner.plan_run(
      config,
      tpu_slice,
      tuple(_PROGRAMS.value),
      _TRAIN_EXAMPLES.value,
      _NUM_CLASSES.value,
      _INPUT_RATE.value or planner.INPUT_SAMPLES_PER_CORE,
      _HLO_DIR.value,
    )
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w') as f:
        json.dump(plan, f, indent=1)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(plan, f, indent=1)
  print(render(plan))
  if plan['does_not_fit']:
    print('\n'.join(plan['does_not_fit']), file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main, None, FLAGS_HINT, USER_ERRORS)
