"""msf_jax.plan: slice names, what it reads from compiled programs, and the command line on
XLA's host devices (no libtpu) and on TPU topologies (libtpu, installed by the test
requirements; those tests are skipped without it)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msf_jax.config_utils import load_config
from msf_jax.plan import compiled, parse_slice, planner, slices
from msf_jax.testing import REPO

from helpers import with_settings

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU,
  reason='libtpu is not installed: pip install "jax[tpu]==0.10.2" to plan for TPU slices',
)
# The ImageNet recipe made small: ResNet-18 at 32 px, 32 images a step, a 4,096-row bank,
# BatchNorm over groups of 8 (a chip's images on 4 chips; the recipe's 64 would not divide).
SMALL_RECIPE_SETTINGS = {
  'model.depth': 18,
  'image_size': 32,
  'batch_size': 32,
  'msf.bank_size': 4096,
  'msf.bank_chunk_size': 0,
  'model.bn_group_size': 8,
}
SMALL_RECIPE = [
  '--config=configs/imagenet_msf.py',
  *(f'--config.{key}={value}' for key, value in SMALL_RECIPE_SETTINGS.items()),
]


@pytest.mark.parametrize(
  'name, topology, chips, hosts',
  [
    ('v4-8', 'v4:2x2x1', 4, 1),
    ('v4-32', 'v4:2x2x4', 16, 4),
    ('v4-128', 'v4:4x4x4', 64, 16),
    ('v5e-8', 'v5e:2x4', 8, 1),
    ('v5litepod-16', 'v5e:4x4', 16, 4),
    ('v5e-64', 'v5e:8x8', 64, 16),
    ('v5p-8', 'v5p:2x2x1', 4, 1),
    ('v6e-8', 'v6e:2x4', 8, 1),
    ('v6e-256', 'v6e:16x16', 256, 64),
    ('v5e:2x2', 'v5e:2x2', 4, 1),
    ('cpu:8', 'cpu:8', 8, 1),
    ('v5litepod-1', 'v5e:1x1', 1, 1),
  ],
)
def test_slice_names_map_to_compiler_topologies(name, topology, chips, hosts):
  tpu_slice = parse_slice(name)
  assert (tpu_slice.topology, tpu_slice.chips, tpu_slice.hosts) == (topology, chips, hosts)


@pytest.mark.slow  # python -m msf_jax.plan
def test_a_slice_it_does_not_know_is_one_error_line(tmp_path):
  """No traceback and nothing from TensorFlow on the console: the one line that says what
  the planner knows."""
  result = _plan(['--config=configs/imagenet_msf.py', '--topology=v3-8'], tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    "error: Unknown TPU generation in 'v3-8': the planner knows v4, v5e, v5p, v6e (v5litepod "
    'is v5e).'
  ]


@pytest.mark.parametrize('name', ['v3-8', 'v5e-12', 'tpu', 'v5e'])
def test_unknown_slices_are_refused_with_what_is_known(name):
  with pytest.raises(slices.SliceError, match=r'v5e|power-of-two'):
    parse_slice(name)


def test_collective_bytes_are_read_from_the_optimized_hlo():
  """A tuple all-reduce counts both arrays; an asynchronous pair counts once, by its result."""
  hlo = '\n'.join(
    [
      '  %all-reduce.1 = (f32[1000]{0}, bf16[10,10]{1,0}) all-reduce(f32[1000]{0} %a, '
      'bf16[10,10]{1,0} %b), replica_groups={}',
      '  %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %c)',
      '  %all-gather-done = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %all-gather-start)',
      '  ROOT %add = f32[16]{0} add(f32[16]{0} %d, f32[16]{0} %e)',
    ]
  )
  assert compiled.collective_bytes(hlo) == {'all-reduce': 4000 + 200, 'all-gather': 64}
  assert compiled.collectives(hlo) == [
    ('all-reduce', {'f32': 4000, 'bf16': 200}),
    ('all-gather', {'f32': 64}),
  ]
  assert compiled.collective_counts(hlo + '\n' + hlo) == {
    'all-reduce': {'count': 2, 'f32': 8000, 'bf16': 400},
    'all-gather': {'count': 2, 'f32': 128},
  }
  line, size = compiled.largest_collective(hlo)
  assert size == 4200 and 'all-reduce(' in line


@pytest.mark.parametrize(
  'padding, stride', [('SAME', 1), ('SAME', 2), ('VALID', 1), (((2, 1), (0, 3)), 2)]
)
def test_architecture_flops_count_the_multiply_adds_xla_counts(padding, stride):
  """Convolutions count only the taps on real pixels, as XLA does: the same number."""
  image = jax.ShapeDtypeStruct((2, 9, 7, 3), np.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 3, 5), np.float32)
  dense = jax.ShapeDtypeStruct((5, 4), np.float32)

  def layer(x, w, v):
    y = jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return y @ v

  xla = jax.jit(layer).lower(image, kernel, dense).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  assert compiled.matmul_flops(layer, image, kernel, dense) == xla['flops']


def _plan(
  arguments: list[str], tmp_path, python_prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
  env = {**os.environ, 'XLA_FLAGS': ''}
  return subprocess.run(
    [
      sys.executable,
      *(python_prefix or ['-m', 'msf_jax.plan']),
      *arguments,
      f'--cache_dir={tmp_path / "cache"}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


# Runs msf_jax.plan with libtpu made unimportable: what a machine without it sees.
WITHOUT_LIBTPU = [
  '-c',
  """
import importlib.abc, runpy, sys
class NoLibtpu(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'libtpu':
      raise ImportError('libtpu is hidden by the test')
sys.meta_path.insert(0, NoLibtpu())
sys.argv[0] = 'msf_jax.plan'
runpy.run_module('msf_jax.plan', run_name='__main__', alter_sys=True)
""",
]


@pytest.mark.slow  # python -m msf_jax.plan, twice
def test_cpu_plan_runs_without_libtpu_and_is_cached(tmp_path):
  """cpu:N plans on XLA's host devices: memory by kind, FLOPs from XLA next to the
  architecture's, the gradient's all-reduce; a second identical call reads the cache.

  XLA also counts the elementwise work: the colour stage (about 1.8 MFLOP an image at 32 px),
  BatchNorm, the optimizer and the EMA. Next to ResNet-18's 0.6 GFLOP an image that is within
  a few percent (with width 16 it was 12%: 16.6 against 14.8 MFLOP)."""
  arguments = [
    *SMALL_RECIPE,
    '--config.batch_size=64',
    '--topology=cpu:2',
    '--programs=train,features,knn',
    f'--json={tmp_path / "plan.json"}',
  ]
  first = _plan(arguments, tmp_path, WITHOUT_LIBTPU)
  assert first.returncode == 0, first.stderr[-3000:]
  plan = json.loads((tmp_path / 'plan.json').read_text())
  train = plan['programs']['train step']
  assert plan['fits'] is None  # no memory figure for the host platform
  # Its speed figures are this CPU's, measured: a bound and an estimate of the step.
  assert 0 < plan['run']['bound_step_seconds'] <= plan['run']['estimate_step_seconds']
  assert 'Step time on cpu (2 device(s)): bound' in first.stdout
  knn = plan['programs']['kNN search']  # the roofline counts every chunk of the search loop
  assert knn['step_time']['flops'] > 1.5 * knn['flops'] and knn['while_loops'] == 1
  assert train['memory']['state'] > 0 and train['memory']['total'] >= train['memory']['state']
  _assert_flops_agree(train)
  assert train['collectives'].get('all-reduce', 0) > 0
  assert 'GFLOP an image (XLA)' in first.stdout
  assert "kNN search: XLA counts a loop's body once (1 while loop(s) in it)" in first.stdout
  second = _plan(arguments, tmp_path, WITHOUT_LIBTPU)
  assert second.returncode == 0 and '(cached plan' in second.stdout
  assert json.loads((tmp_path / 'plan.json').read_text()) == plan


def _assert_flops_agree(train: dict) -> None:
  """The convolutions and products of the traced step (the architecture's count) are those
  of the compiled program (read from its HLO, every loop counted); XLA's total adds the
  elementwise work (colour stage, BatchNorm, optimizer, EMA: 5% at this small net)."""
  architecture = train['architecture_flops_per_image']
  compiled_matmuls = train['step_time']['matmul_flops'] * train['devices'] / train['global_batch']
  assert compiled_matmuls == pytest.approx(architecture, rel=0.005)
  assert architecture < train['flops_per_image'] < 1.1 * architecture


def test_tpu_topology_without_libtpu_says_how_to_install_it(monkeypatch):
  def no_tpu_plugin(**kwargs):
    raise RuntimeError('Unable to initialize backend tpu')

  monkeypatch.setattr(slices.topologies, 'get_topology_desc', no_tpu_plugin)
  monkeypatch.setattr(slices, '_has_libtpu', lambda: False)
  with pytest.raises(slices.SliceError, match=r'pip install "jax\[tpu\]==0.10.2".*cpu:8'):
    slices.tpu_devices(parse_slice('v5e-8'))


@pytest.mark.slow  # python -m msf_jax.plan
@needs_libtpu
def test_a_bank_that_cannot_fit_exits_1_with_one_sentence(tmp_path):
  """Refused before compiling (the state alone overflows a v5e chip's 16 GiB), with one
  sentence that says what would fit: 40,960,000 rows of ResNet-18's 128-d embeddings and
  labels (19.7 GiB) on every chip, where a quarter would fit."""
  result = _plan(
    [
      *SMALL_RECIPE,
      '--config.msf.bank_size=40960000',
      '--config.msf.bank_layout=replicated',
      '--topology=v5e:2x2',
      '--programs=train',
    ],
    tmp_path,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  sentence = result.stderr.strip().splitlines()[-1]
  assert sentence.startswith(
    'The train step needs 19.8 GiB a chip and a v5e chip has 16.0 GiB: it would fit with '
  )
  assert '--config.msf.bank_layout=sharded' in sentence and 'Fits: no' in result.stdout


@pytest.mark.slow  # a step compiled for a TPU slice (libtpu)
@needs_libtpu
def test_a_sharded_bank_too_large_is_refused_with_the_bank_that_fits(monkeypatch):
  """200,000,000 rows of 128-d embeddings and labels (96 GiB), a quarter a chip: 24.2 GiB."""
  plan = _plan_here(
    ('train',),
    'v5e:2x2',
    monkeypatch,
    **{
      'model.depth': 18,
      'image_size': 32,
      'batch_size': 32,
      'msf.bank_size': 200_000_000,
      'msf.bank_chunk_size': 0,
      'model.bn_group_size': 8,
    },
  )
  [sentence] = plan['does_not_fit']
  assert sentence.startswith(
    'The train step needs 24.2 GiB a chip and a v5e chip has 16.0 GiB: it would fit with '
  )
  assert '--config.msf.bank_size=132058688' in sentence and 'bank_layout' not in sentence


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize('topology', ['v5e:2x2', 'v4-8'])
def test_small_recipe_compiles_for_tpu_topologies(topology, tmp_path, monkeypatch):
  """The train step of ResNet-18 at 32 px compiled for 4 TPU chips (v4: megacore, a device a
  chip): it fits, XLA's FLOPs agree with the architecture's, only what must cross chips is
  all-reduced, and the roofline gives a positive step time. 32 images a chip: XLA also counts
  the optimizer's and the EMA's work over every parameter once a step, 6% of this small net's
  FLOPs an image at 32 images a chip, 9% at 16, 12% at 8 (the check allows 10%); the compile
  takes longer with more (v5e, idle machine: 20 s at 32 a chip, 23 s at 64). v5e through the
  command line and its JSON, v4 in this process (one Python start with libtpu fewer)."""
  if topology.startswith('v5e'):
    result = _plan(
      [
        *SMALL_RECIPE,
        '--config.batch_size=128',
        f'--topology={topology}',
        '--programs=train',
        f'--json={tmp_path / "plan.json"}',
      ],
      tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / 'plan.json').read_text())
  else:
    settings = {**SMALL_RECIPE_SETTINGS, 'batch_size': 128}
    plan = _plan_here(('train',), topology, monkeypatch, **settings)
  train = plan['programs']['train step']
  assert plan['fits'] and plan['slice']['chips'] == 4 and plan['config']['dtype'] == 'bfloat16'
  _assert_flops_agree(train)
  assert train['collectives']['all-reduce'] > 11e6 * 2  # ResNet-18's gradients, at least bf16
  # BatchNorm over groups of 8 of a chip's 32 images: no statistic crosses chips in the
  # forward or backward pass. What is left: the labels and the target order gathered for the
  # bank (all-reduces of int32), the bank's neighbour rows and their labels (exact sums over
  # the sharded rows), and one float32 all-reduce of every gradient with the loss and the
  # first group's running statistics. (With bn_group_size=0 the same step held 80
  # all-reduces, its gradients summed in bfloat16.)
  all_reduces = train['collective_counts']['all-reduce']
  assert all_reduces['count'] == 4 and set(all_reduces) == {'count', 'f32', 's32'}, all_reduces
  assert all_reduces['f32'] > 11.5e6 * 4  # ResNet-18 and its heads: 11.5M parameters
  run = plan['run']
  assert 0 < run['bound_step_seconds'] <= run['estimate_step_seconds'] and run['bound_chip_hours']
  assert train['step_time']['collectives'] >= 1  # the gradients' sum, priced


def _plan_here(
  programs: tuple[str, ...], topology: str, monkeypatch, train_examples=None, **settings
) -> dict:
  """A plan of configs/imagenet_msf.py with `settings` ({'model.depth': 18}), made in this
  process: no subprocess to start, for programs that compile quickly or not at all."""
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  config = load_config(os.path.join(REPO, 'configs', 'imagenet_msf.py'))
  with config.unlocked():
    with_settings(config, settings)
  return planner.plan_run(config, parse_slice(topology), programs, train_examples, 1000)


def _knn_plan(topology: str, train_examples: int, monkeypatch, depth: int = 50) -> dict:
  return _plan_here(('knn',), topology, monkeypatch, train_examples, **{'model.depth': depth})


@pytest.mark.slow  # a kNN program compiled for a TPU slice (libtpu)
@needs_libtpu
def test_the_knn_search_holds_a_share_of_the_train_features_and_gathers_no_more(monkeypatch):
  """100,000 train features of ResNet-18 (512 floats) over a v5e:2x2: a quarter a chip, the
  query chunk replicated; only the chips' candidates ([1,024 x 20] each) are gathered."""
  plan = _knn_plan('v5e:2x2', 100_000, monkeypatch, depth=18)
  search = plan['programs']['kNN search']
  assert plan['fits'] and search['memory']['state'] == 25_000 * 512 * 4
  assert search['memory']['batch'] == 1024 * 512 * 4
  assert 0 < sum(search['collectives'].values()) <= 4 * 1024 * 20 * 8
  # The chunked scan is a loop whose body XLA counts once: a chunk's FLOPs, not the share's.
  # Counted from the traced search and from the compiled one (its loop by its trip count):
  # each chip's 25,000 rows searched as 2 chunks of 16,384 (the padding is work too).
  assert search['while_loops'] >= 1
  searched = 2 * (4 * 2 * 16_384) * 512  # 2 FLOPs a multiply-add, the rows searched, 512
  assert search['architecture_flops_per_image'] == searched
  assert search['step_time']['matmul_flops'] * 4 / 1024 == pytest.approx(searched, rel=1e-3)


@needs_libtpu
@pytest.mark.parametrize('name', ['v5litepod-1', 'v5e-4', 'v4-8', 'v4:1x1x1'])
def test_the_compiler_gives_a_device_for_each_chip(name, monkeypatch):
  """Slices smaller than a host too (v5e-1), and megacore chips (v4) as one device each."""
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  tpu_slice = parse_slice(name)
  assert len(slices.tpu_devices(tpu_slice)) == tpu_slice.chips


@needs_libtpu
def test_a_knn_set_too_large_for_the_slice_is_refused_with_the_chips_it_needs(monkeypatch):
  """ImageNet-21k's 14,197,122 ResNet-50 features (2,048 floats, 108 GiB) on 4 v5e chips:
  27 GiB a chip, refused before compiling; 7 chips would each hold 15.5 GiB of them, and a
  slice has a power of two: 8."""
  plan = _knn_plan('v5e:2x2', 14_197_122, monkeypatch)
  assert not plan['fits'] and plan['programs']['kNN search']['compile_seconds'] == 0
  assert plan['does_not_fit'] == [
    'The kNN search needs 27.1 GiB a chip and a v5e chip has 16.0 GiB: it would fit with a '
    'slice of 8 chips or more (each holding its share of the 108.3 GiB of train features).'
  ]


@pytest.mark.parametrize(
  'message, needed',
  [
    (
      'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space '
      'hbm. Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= '
      '22.47G:\n    reserved        530.00M',
      22.47 * 2**30,
    ),
    ('Ran out of memory in memory space hbm. Used 63.80G of 30.75G hbm.', 63.8 * 2**30),
    ('INTERNAL: something else', None),
  ],
)
def test_the_compilers_out_of_memory_error_gives_what_the_program_needs(message, needed):
  found = planner._out_of_memory_bytes(message)
  assert found == (None if needed is None else int(needed))


def test_a_program_the_hlo_reader_fails_on_keeps_its_memory_and_says_why(monkeypatch):
  def unreadable(*args, **kwargs):
    raise ValueError('an HLO form the reader does not know')

  monkeypatch.setattr(planner.roofline, 'step_time', unreadable)
  x = jax.ShapeDtypeStruct((64, 64), np.float32)
  program = planner.Program('matmul', jax.jit(lambda a: a @ a), (x,), 64, 1, 0, 64 * 64 * 4)
  plan = planner.compile_program(program, None, chip=planner.roofline.CHIPS['v4'])
  assert plan.step_time is None and plan.memory['batch'] == 64 * 64 * 4
  assert plan.step_time_error == 'ValueError: an HLO form the reader does not know'
  (line,) = planner.unestimated_lines([dataclasses.asdict(plan)])
  assert line.startswith('No step-time estimate for the matmul') and 'does not know' in line
