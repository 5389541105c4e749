"""The MSF train step on one machine's accelerator: msf_jax against the official-style PyTorch
step, the device's own matrix-product peak, and the input pipeline on all the CPU cores, in
one command that stays under 8 minutes (`--budget-s`, 450 by default, bounds every part).

  python benchmarks/accelerator.py --out results.json          # full size, on the accelerator
  python benchmarks/accelerator.py --tiny --out results.json   # CPU only, tiny: 1-2 minutes

Full size is the paper's ImageNet run: ResNet-50, 224 px, batch 256 per device, bank
1,024,000, k = 5; msf_jax computes in bfloat16 over all local devices, PyTorch on one CUDA
device in fp32 (the official way; PyTorch's default TF32 for convolutions stays as it is) and
under bf16 autocast. `--tiny`: ResNet-18 of width 8 with the small stem, 32 px, batch 8 per
device, bank 64, float32; the PyTorch reference has no width option, so its rows run
ResNet-18 at width 64 and the table says so.

What the table says (the JSON holds every raw time and the config):
- msf_jax step: `make_train_step` with the colour augmentations inside (one device program),
  on one synthetic host-stage batch kept on the devices. images/s = global batch / median
  step time; step ms: median (min-max; interquartile range); peak memory: the device
  allocator's peak, or where the device keeps none (the CPU) XLA's temp + argument bytes.
- PyTorch official step: `msf_jax/testing/torch_reference.py`'s iteration on device-resident
  random tensors (the official code augments on CPU workers, outside the step), cudnn
  benchmark mode on as in the official train_msf.py; memory: `max_memory_allocated`.
- model FLOP per step: counted from the architecture, the same for both frameworks (the work
  MSF needs; the official step also multiplies the predictions with the whole bank): per image
  3 online forwards (forward + backward) + 1 target forward + one product of the target with
  the bank; ResNet-50 at 224 px is 4.09 GMAC a forward, about 34 GFLOP an image in all. XLA:
  the compiled step's own count (`cost_analysis`), per device.
- MFU: model FLOP/s per device / the matrix-product peak (XLA's count in brackets), for the
  PyTorch rows too, against the same peak. The peak is measured here: a jitted chain of
  square matrix products in the step's compute dtype (bfloat16 8192^3 at full size; float32
  1024^3 with --tiny), median of several runs.
- bank search alone: one step's search of the bank (the step's queries, rows, k and chunks)
  with the exact float32 product and with `msf.bank_search_dtype='bfloat16'` (512 candidates
  re-scored in float32), on random unit rows: milliseconds, and how often both agree.
- msf_jax vs this: msf_jax images/s per device / PyTorch images/s (on one device).
- input pipeline: `train_stream`'s two-view samples/s on every core this process may use
  (tf.data, AUTOTUNE) from ImageNet-like JPEGs in an image folder, against the msf_jax step's
  images/s: below 1, one host's CPUs cannot feed its devices and data limits a real run.

Each part runs in its own process, one after another (no two hold the device at once); a part
that fails, runs out of its share of the budget or is unavailable (no torch, no CUDA, no
TensorFlow, JAX without an accelerator at full size) reads "not measured: <why>".
"""

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: each part imports JAX in its own process, when it runs
  import jax
  import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN_IMAGES = 1_281_167  # steps per epoch for the learning-rate schedule
PARTS = ('matmul_peak', 'msf_jax', 'bank_search', 'torch_fp32', 'torch_bf16', 'pipeline')
RESERVE_S = 45  # the least of the budget each part after the running one keeps
PACKAGES = ('jax', 'jaxlib', 'flax', 'torch', 'tensorflow', 'tensorflow-cpu')  # versions

FULL = {
  'depth': 50,
  'width': 64,
  'small_stem': False,
  'image_size': 224,
  'batch_per_device': 256,
  'bn_group_size': 64,  # the official run's BatchNorm groups: 4 a device here
  'bank_size': 1_024_000,
  'topk': 5,
  'bank_chunk_size': None,  # None: the config's
  'compute_dtype': 'bfloat16',
  'warmup_steps': 5,
  'timed_steps': 20,
  'accelerator': True,
  'matmul_size': 8192,
  'matmul_chain': 16,
  'matmul_runs': 10,
  'torch_device': 'cuda',
  'torch_width': 64,
  'pipeline_photos': 64,
  'pipeline_warmup_batches': 5,
  'pipeline_timed_batches': 20,
}
TINY = {
  'depth': 18,
  'width': 8,
  'small_stem': True,
  'image_size': 32,
  'batch_per_device': 8,
  'bn_group_size': 4,  # two groups a device: the grouped step, as the full run's
  'bank_size': 64,
  'topk': 5,
  'bank_chunk_size': 0,
  'compute_dtype': 'float32',
  'warmup_steps': 1,
  'timed_steps': 2,
  'accelerator': False,
  'matmul_size': 1024,
  'matmul_chain': 4,
  'matmul_runs': 5,
  'torch_device': 'cpu',
  'torch_width': 64,
  'pipeline_photos': 8,
  'pipeline_warmup_batches': 2,
  'pipeline_timed_batches': 4,
}


# --- Counting --------------------------------------------------------------------------------


def resnet_forward_macs(depth: int, width: int, image_size: int, small_stem: bool) -> int:
  """Multiply-accumulates of one image through a torchvision-layout ResNet's convolutions
  (BatchNorm, ReLU, pooling and the residual adds are well under 1% of them)."""
  from msf_jax.models.resnet import BOTTLENECK_DEPTHS, STAGE_SIZES

  bottleneck = depth in BOTTLENECK_DEPTHS
  size = image_size if small_stem else -(-image_size // 2)  # every stride 2 here: ceil(n/2)
  macs = size * size * 3 * width * (9 if small_stem else 49)
  size = size if small_stem else -(-size // 2)  # the stem's max pool
  channels = width
  for stage, blocks in enumerate(STAGE_SIZES[depth]):
    planes = width * 2**stage
    out_channels = planes * (4 if bottleneck else 1)
    for block in range(blocks):
      stride = 2 if stage and not block else 1
      out = -(-size // stride)
      if bottleneck:  # 1x1 at the input size, then the 3x3 carrying the stride, then 1x1
        macs += size**2 * channels * planes + out**2 * planes * (9 * planes + out_channels)
      else:
        macs += out**2 * 9 * planes * (channels + planes)
      if stride > 1 or channels != out_channels:  # the projection shortcut
        macs += out**2 * channels * out_channels
      size, channels = out, out_channels
  return macs


def msf_model_flops(
  depth: int, width: int, image_size: int, small_stem: bool, bank_size: int
) -> dict:
  """FLOP of one image of an MSF step, by part: the online encoder and predictor forward and
  backward (3 forwards), the target encoder forward, and the target's product with the bank."""
  from msf_jax.models.resnet import feature_dim

  feature = feature_dim(depth, width)
  projector = feature * 2 * feature + 2 * feature * feature // 4  # F -> 2F -> F/4
  predictor = feature // 4 * 2 * feature + 2 * feature * feature // 4  # F/4 -> 2F -> F/4
  backbone = resnet_forward_macs(depth, width, image_size, small_stem)
  parts = {
    'online_macs': 3 * (backbone + projector + predictor),
    'target_macs': backbone + projector,
    'bank_search_macs': bank_size * feature // 4,
  }
  return {**parts, 'backbone_forward_macs': backbone, 'flops': 2 * sum(parts.values())}


def spread(times: list[float]) -> dict:
  """Median, extremes and interquartile range of step times (inclusive quartiles, so that
  two timed steps give a range inside them)."""
  q1, _, q3 = statistics.quantiles(times, n=4, method='inclusive')
  return {
    'times_s': times,
    'median_s': statistics.median(times),
    'min_s': min(times),
    'max_s': max(times),
    'iqr_s': q3 - q1,
  }


# --- Parts, each in its own process ------------------------------------------------------------


def device_info(settings: dict) -> dict:
  """The devices JAX runs on; at full size, a CPU backend ends the part (hours, not minutes)."""
  import jax

  if settings['accelerator'] and jax.default_backend() == 'cpu':
    sys.exit('JAX sees no accelerator (backend cpu); --tiny is the CPU run')
  return {
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.local_device_count(),
    'platform': jax.default_backend(),
    'jax': jax.__version__,
  }


def measure_matmul_peak(settings: dict) -> dict:
  """FLOP/s of a jitted chain of square matrix products on the first device."""
  import jax
  import numpy as np

  info = device_info(settings)
  n, chain, dtype = settings['matmul_size'], settings['matmul_chain'], settings['compute_dtype']
  x_key, w_key = jax.random.split(jax.random.key(0))
  device = jax.devices()[0]
  x = jax.device_put(jax.random.normal(x_key, (n, n), dtype), device)
  w = jax.device_put((jax.random.normal(w_key, (n, n)) / np.sqrt(n)).astype(dtype), device)

  @jax.jit
  def products(x, w):
    for _ in range(chain):  # unit-scaled w keeps the values finite along the chain
      x = x @ w
    return x

  jax.block_until_ready(products(x, w))
  times = []
  for _ in range(settings['matmul_runs']):
    start = time.perf_counter()
    jax.block_until_ready(products(x, w))
    times.append(time.perf_counter() - start)
  flop = 2 * n**3 * chain
  return {
    **info,
    **spread(times),
    'dtype': dtype,
    'size': n,
    'chain': chain,
    'flop_per_run': flop,
    'flops_per_s': flop / statistics.median(times),
  }


def msf_jax_config(settings: dict, device_count: int) -> 'ml_collections.ConfigDict':
  """The ImageNet config at the benchmark's size, global batch over `device_count`."""
  from msf_jax import load_config

  config = load_config(os.path.join(REPO, 'configs', 'imagenet_msf.py'))
  config.model.depth, config.model.width = settings['depth'], settings['width']
  config.model.small_stem, config.model.dtype = settings['small_stem'], settings['compute_dtype']
  config.image_size = settings['image_size']
  config.batch_size = settings['batch_per_device'] * device_count
  config.model.bn_group_size = settings['bn_group_size']
  config.msf.bank_size, config.msf.topk = settings['bank_size'], settings['topk']
  if settings['bank_chunk_size'] is not None:
    config.msf.bank_chunk_size = settings['bank_chunk_size']
  return config


def peak_memory(compiled: 'jax.stages.Compiled') -> tuple[int, str]:
  """(bytes, where from): the device allocator's peak, else XLA's estimate of the step."""
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
  analysis = compiled.memory_analysis()
  return (
    analysis.temp_size_in_bytes + analysis.argument_size_in_bytes,
    'XLA memory_analysis temp + arguments',
  )


def xla_flops(compiled: 'jax.stages.Compiled') -> float | None:
  """The compiled (per-device) program's FLOP count; older JAX returns a list of dicts."""
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  flops = float((costs or {}).get('flops', 0.0))
  return flops if flops > 0 else None


def planner_step_time(compiled: 'jax.stages.Compiled', devices: list) -> dict | None:
  """msf_jax.plan's bound and estimate of this very program on this device (None where
  the planner has no figures for it), to compare with the measured step."""
  import dataclasses

  from msf_jax.plan import roofline

  chip = roofline.chip_of(devices[0], len(devices))
  if chip is None:
    return None
  return {'chip': chip.name} | dataclasses.asdict(
    roofline.compiled_step_time(compiled, len(devices), chip)
  )


def measure_msf_jax(settings: dict) -> dict:
  import jax
  import numpy as np

  import msf_jax
  from msf_jax.testing import random_host_batch

  info = device_info(settings)
  devices = jax.local_devices()
  config = msf_jax_config(settings, len(devices))
  mesh = msf_jax.make_mesh(devices)
  # Jitted: one compilation, not one per operation of the initialization.
  create_state = jax.jit(functools.partial(msf_jax.create_state, config))
  state = msf_jax.put_state(create_state(jax.random.key(0)), config, mesh)
  batch = msf_jax.put_batch(random_host_batch(np.random.default_rng(0), config), mesh)
  train_step = msf_jax.make_train_step(
    config, mesh, IMAGENET_TRAIN_IMAGES // config.batch_size, donate=True
  )
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(settings['warmup_steps'] + settings['timed_steps']):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  memory, memory_source = peak_memory(compiled)
  return {
    **info,
    **spread(times[settings['warmup_steps'] :]),
    'planner': planner_step_time(compiled, devices),
    'warmup_times_s': times[: settings['warmup_steps']],
    'compile_s': compile_s,
    'global_batch': config.batch_size,
    'xla_flops_per_step_per_device': xla_flops(compiled),
    'peak_memory_bytes': memory,
    'memory_source': memory_source,
    'last_loss': float(metrics['loss']),
    'config': config.to_dict(),
  }


def measure_bank_search(settings: dict) -> dict:
  """One step's bank search alone, on random unit rows of the step's shapes: the exact float32
  product against `msf.bank_search_dtype='bfloat16'` (candidates re-scored in float32)."""
  import jax
  import numpy as np

  from msf_jax import mean_shift
  from msf_jax.models.resnet import feature_dim

  info = device_info(settings)
  config = msf_jax_config(settings, 1)
  dim = feature_dim(settings['depth'], settings['width']) // 4  # the projection's width
  bank = mean_shift.init_bank(jax.random.key(0), config.msf.bank_size, dim).embeddings
  queries = bank[-settings['batch_per_device'] :]
  candidates = min(config.msf.bank_search_candidates, config.msf.bank_size // 2)
  k = max(config.msf.topk, 2)  # as the step searches
  found, timings = {}, {}
  for dtype in mean_shift.SEARCH_DTYPES:
    search = jax.jit(
      functools.partial(
        mean_shift.nearest_neighbors,
        k=k,
        chunk_size=config.msf.bank_chunk_size,
        search_dtype=dtype,
        candidates=candidates,
      )
    )
    found[dtype] = np.asarray(search(queries, bank))
    times = []
    for _ in range(settings['matmul_runs']):
      start = time.perf_counter()
      jax.block_until_ready(search(queries, bank))
      times.append(time.perf_counter() - start)
    timings[dtype] = spread(times)
  same = np.mean(np.all(found['float32'] == found['bfloat16'], axis=1))
  return {
    **info,
    'float32': timings['float32'],
    'bfloat16': timings['bfloat16'],
    'queries': len(queries),
    'rows': config.msf.bank_size,
    'dim': dim,
    'k': k,
    'chunk_size': config.msf.bank_chunk_size,
    'candidates': candidates,
    'same_neighbours': float(same),
  }


def load_torch_reference() -> types.ModuleType:
  """msf_jax/testing/torch_reference.py by its path: it needs torch alone, not the packages
  that importing msf_jax brings (an accelerator image may lack some)."""
  path = os.path.join(REPO, 'msf_jax', 'testing', 'torch_reference.py')
  spec = importlib.util.spec_from_file_location('torch_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def measure_torch(settings: dict, autocast: bool) -> dict:
  import torch

  reference = load_torch_reference()
  device = torch.device(settings['torch_device'])
  if device.type == 'cuda' and not torch.cuda.is_available():
    sys.exit(f'torch {torch.__version__} sees no CUDA device')
  cuda = device.type == 'cuda'
  torch.backends.cudnn.benchmark = True  # as the official train_msf.py
  torch.manual_seed(0)
  batch, size = settings['batch_per_device'], settings['image_size']
  model = reference.MeanShift(
    settings['depth'],
    mem_bank_size=settings['bank_size'],
    topk=settings['topk'],
    small_stem=settings['small_stem'],
  ).to(device)
  optimizer = reference.make_optimizer(model, 0.05 * batch / 256)
  im_q, im_t = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
  labels = torch.randint(0, 4, (batch,), device=device)
  # Around the whole iteration: backward ops take the forward's dtypes anyway, SGD none.
  precision = lambda: (
    torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
  )
  synchronize = torch.cuda.synchronize if cuda else lambda: None
  times = []
  for _ in range(settings['warmup_steps'] + settings['timed_steps']):
    synchronize()
    start = time.perf_counter()
    with precision():
      loss, _ = reference.train_iteration(model, optimizer, im_q, im_t, labels)
    synchronize()
    times.append(time.perf_counter() - start)
  return {
    **spread(times[settings['warmup_steps'] :]),
    'warmup_times_s': times[: settings['warmup_steps']],
    'torch': torch.__version__,
    'device': torch.cuda.get_device_name() if cuda else 'cpu',
    'batch': batch,
    'width': settings['torch_width'],
    'precision': 'bf16 autocast' if autocast else 'fp32',
    'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
    'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32,
    'peak_memory_bytes': torch.cuda.max_memory_allocated() if cuda else None,
    'memory_source': 'torch.cuda.max_memory_allocated' if cuda else 'not tracked on CPU',
    'last_loss': loss,
  }


def write_image_folder(root: str, num_files: int, num_photos: int, num_classes: int = 10) -> None:
  """root/train/class_<k>/<i>.jpg: `num_photos` ImageNet-like JPEGs (input_benchmark's),
  hard-linked over and over up to `num_files`; a repeated file costs a full decode again."""
  from input_benchmark import make_photos

  photos = make_photos(tempfile.mkdtemp(dir=root), num_photos)
  for i in range(num_files):
    folder = os.path.join(root, 'train', f'class_{i % num_classes}')
    os.makedirs(folder, exist_ok=True)
    os.link(photos[i % num_photos], os.path.join(folder, f'{i:05d}.jpg'))


def measure_pipeline(settings: dict, global_batch: int) -> dict:
  from msf_jax import load_config
  from msf_jax.data import pipeline, sources

  pipeline.hide_accelerators_from_tensorflow()
  size = settings['image_size']
  with tempfile.TemporaryDirectory() as root:
    num_files = 2 * global_batch  # two steps an epoch: epochs turn over while timed
    write_image_folder(root, num_files, min(settings['pipeline_photos'], num_files))
    config = load_config(os.path.join(REPO, 'configs', 'imagenet_msf.py'))
    config.data.source, config.data.root = 'folder', root
    split = sources.build_split(config.data, 'train', size)
    stream = pipeline.train_stream(split, global_batch=global_batch, image_size=size, seed=0)
    for _ in range(settings['pipeline_warmup_batches']):  # tracing, autotuning, file cache
      next(stream)
    start = time.perf_counter()
    for _ in range(settings['pipeline_timed_batches']):
      next(stream)
    elapsed = time.perf_counter() - start
  samples = settings['pipeline_timed_batches'] * global_batch
  return {
    'samples_per_s': samples / elapsed,
    'timed_samples': samples,
    'seconds': elapsed,
    'global_batch': global_batch,
    'image_size': size,
    'files': num_files,
    'cpu_cores': len(os.sched_getaffinity(0)),
  }


def run_part(settings: dict, part: str, global_batch: int) -> dict:
  if part == 'matmul_peak':
    return measure_matmul_peak(settings)
  if part == 'msf_jax':
    return measure_msf_jax(settings)
  if part == 'bank_search':
    return measure_bank_search(settings)
  if part == 'pipeline':
    return measure_pipeline(settings, global_batch)
  return measure_torch(settings, autocast=part == 'torch_bf16')


# --- The parent: runs the parts, derives, reports -----------------------------------------------


def part_environment(part: str, tiny: bool) -> dict:
  """The CPU for everything with --tiny; the input pipeline on the CPU always, with the
  accelerator hidden so that neither TensorFlow nor JAX reserves its memory."""
  if tiny or part == 'pipeline':
    return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
  return dict(os.environ)


def spawn(part: str, args, global_batch: int, timeout: float) -> dict:
  """One part in a fresh process: its JSON, or why it was not measured."""
  command = [
    sys.executable,
    __file__,
    '--part',
    part,
    '--global-batch',
    str(global_batch),
    *(['--tiny'] if args.tiny else []),
  ]
  start = time.perf_counter()
  try:
    out = subprocess.run(
      command,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=part_environment(part, args.tiny),
    )
  except subprocess.TimeoutExpired:
    return {'measured': False, 'reason': f'timed out after {timeout:.0f} s', 'wall_s': timeout}
  wall_s = time.perf_counter() - start
  if out.returncode:
    lines = [line for line in out.stderr.splitlines() if line.strip()] or ['no message']
    return {'measured': False, 'reason': lines[-1].strip()[:300], 'wall_s': wall_s}
  return {'measured': True, **json.loads(out.stdout.strip().splitlines()[-1]), 'wall_s': wall_s}


def version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def derive(results: dict, settings: dict) -> None:
  """Rates, model FLOP, MFU and ratios, added to the parts' results in place."""
  peak = results['matmul_peak'].get('flops_per_s')
  step = results['msf_jax']
  jax_model = msf_model_flops(
    settings['depth'],
    settings['width'],
    settings['image_size'],
    settings['small_stem'],
    settings['bank_size'],
  )
  torch_model = msf_model_flops(
    settings['depth'],
    settings['torch_width'],
    settings['image_size'],
    settings['small_stem'],
    settings['bank_size'],
  )
  per_device_flops = settings['batch_per_device'] * jax_model['flops']
  if step['measured']:
    step['images_per_s'] = step['global_batch'] / step['median_s']
    step['images_per_s_per_device'] = step['images_per_s'] / step['device_count']
    step['model_flops_per_image'] = jax_model
    step['model_flops_per_step_per_device'] = per_device_flops
    if peak:
      step['mfu'] = per_device_flops / step['median_s'] / peak
      xla = step['xla_flops_per_step_per_device']
      step['mfu_xla'] = xla / step['median_s'] / peak if xla else None
  for name in ('torch_fp32', 'torch_bf16'):
    row = results[name]
    if not row['measured']:
      continue
    row['images_per_s'] = row['batch'] / row['median_s']
    row['model_flops_per_image'] = torch_model
    row['model_flops_per_step'] = row['batch'] * torch_model['flops']
    row['mfu'] = row['model_flops_per_step'] / row['median_s'] / peak if peak else None
    same_model = settings['torch_width'] == settings['width']
    row['msf_jax_over_this'] = (
      step['images_per_s_per_device'] / row['images_per_s']
      if step['measured'] and same_model
      else None
    )
  search = results['bank_search']
  if search['measured']:
    search['bfloat16_speedup'] = search['float32']['median_s'] / search['bfloat16']['median_s']
  data = results['pipeline']
  if data['measured'] and step['measured']:
    data['pipeline_over_step'] = data['samples_per_s'] / step['images_per_s']


def si(value: float, unit: str) -> str:
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if value >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'


def binary(size: int | None, source: str) -> str:
  if size is None:
    return f'n/a ({source})'
  scale, prefix = (2**30, 'GiB') if size >= 2**30 else (2**20, 'MiB')
  return f'{size / scale:.2f} {prefix} ({source})'


def step_cells(row: dict) -> str:
  ms = lambda s: f'{1e3 * s:.1f}'
  return f'{ms(row["median_s"])} ({ms(row["min_s"])}-{ms(row["max_s"])}; IQR {ms(row["iqr_s"])})'


def optional(value: float | None, fmt: str) -> str:
  return '—' if value is None else format(value, fmt)


def table(results: dict, settings: dict) -> list[str]:
  s = settings
  step, peak, data = results['msf_jax'], results['matmul_peak'], results['pipeline']
  devices = step.get('device_count') or peak.get('device_count') or 1
  stem = ', small stem' if s['small_stem'] else ''
  model = lambda width: f'ResNet-{s["depth"]} w{width}{stem}, {s["image_size"]} px'
  names = {
    'msf_jax': (
      f'msf_jax step ({model(s["width"])}, {s["compute_dtype"]}, '
      f'{s["batch_per_device"]}/device x {devices}, bank {s["bank_size"]:,}, '
      f'k {s["topk"]}, colour aug inside)'
    ),
    'torch_fp32': f'PyTorch official step, fp32 ({model(s["torch_width"])}, '
    f'batch {s["batch_per_device"]}, one device)',
    'torch_bf16': f'PyTorch official step, autocast bf16 ({model(s["torch_width"])}, '
    f'batch {s["batch_per_device"]}, one device)',
    'matmul_peak': f'matmul peak ({s["compute_dtype"]} {s["matmul_size"]}^3 x '
    f'{s["matmul_chain"]}, device 0)',
    'bank_search': (
      f'bank search alone ({s["batch_per_device"]} queries x '
      f'{s["bank_size"]:,} rows, float32 / bfloat16 re-scored)'
    ),
    'pipeline': f'input pipeline (tf.data two views, {s["image_size"]} px, '
    f'{data.get("cpu_cores", os.cpu_count())} CPU cores)',
  }
  lines = [
    '| measured | rate | step ms: median (min-max; IQR) | peak memory | '
    'model / XLA FLOP per step per device | MFU (XLA) | vs msf_jax step |',
    '|---|---|---|---|---|---|---|',
  ]
  for part in PARTS:
    row = results[part]
    if not row['measured']:
      reason = row['reason'].replace('|', '/')  # a table cell
      lines.append(f'| {names[part]} | not measured: {reason} | — | — | — | — | — |')
    elif part == 'msf_jax':
      xla = row['xla_flops_per_step_per_device']
      lines.append(
        f'| {names[part]} | {row["images_per_s"]:,.1f} img/s | {step_cells(row)} | '
        f'{binary(row["peak_memory_bytes"], row["memory_source"])} | '
        f'{si(row["model_flops_per_step_per_device"], "FLOP")} / '
        f'{si(xla, "FLOP") if xla else "—"} | {optional(row.get("mfu"), ".3f")} '
        f'({optional(row.get("mfu_xla"), ".3f")}) | 1.00 |'
      )
    elif part.startswith('torch'):
      ratio = row['msf_jax_over_this']
      versus = (
        f'msf_jax/this: {ratio:.2f}'
        if ratio
        else 'no ratio: other width'
        if s['torch_width'] != s['width']
        else '—'
      )
      lines.append(
        f'| {names[part]} | {row["images_per_s"]:,.1f} img/s | {step_cells(row)} | '
        f'{binary(row["peak_memory_bytes"], row["memory_source"])} | '
        f'{si(row["model_flops_per_step"], "FLOP")} / — | {optional(row["mfu"], ".3f")} | '
        f'{versus} |'
      )
    elif part == 'bank_search':
      ms = lambda timing: f'{1e3 * timing["median_s"]:.2f}'
      lines.append(
        f'| {names[part]} | {ms(row["float32"])} / {ms(row["bfloat16"])} ms | '
        f'{step_cells(row["bfloat16"])} (bfloat16) | — | — | — | bfloat16 '
        f'{row["bfloat16_speedup"]:.2f}x faster, same neighbours for '
        f'{100 * row["same_neighbours"]:.1f}% |'
      )
    elif part == 'matmul_peak':
      lines.append(
        f'| {names[part]} | {si(row["flops_per_s"], "FLOP/s")} | {step_cells(row)} '
        f'| — | {si(row["flop_per_run"], "FLOP")} a run | — | — |'
      )
    else:
      ratio = row.get('pipeline_over_step')
      versus = (
        f'this/msf_jax: {ratio:.2f} ({"data keeps up" if ratio >= 1 else "data-bound"})'
        if ratio
        else '—'
      )
      lines.append(
        f'| {names[part]} | {row["samples_per_s"]:,.1f} two-view samples/s | — | — '
        f'| — | — | {versus} |'
      )
  return planner_lines(step) + lines


def planner_lines(step: dict) -> list[str]:
  """The planner's bound and estimate of the measured step's own program, and how far the
  measurement is from each: the check of `msf_jax.plan`'s model on real hardware."""
  planner = step.get('planner') if step.get('measured') else None
  if not planner:
    return ['msf_jax.plan: no figures for this device, no estimate to compare.', '']
  ms = lambda seconds: f'{1e3 * seconds:.2f} ms'
  return [
    f'msf_jax.plan on this program ({planner["chip"]}): bound {ms(planner["bound_seconds"])}, '
    f'estimate {ms(planner["estimate_seconds"])}; measured {ms(step["median_s"])} = '
    f'{step["median_s"] / planner["bound_seconds"]:.2f}x the bound, '
    f'{step["median_s"] / planner["estimate_seconds"]:.2f}x the estimate.',
    '',
  ]


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--out', help='the JSON file of all results (required)')
  parser.add_argument('--tiny', action='store_true', help='CPU only, tiny sizes')
  parser.add_argument(
    '--budget-s', type=float, default=450.0, help='wall-clock seconds for all the parts together'
  )
  parser.add_argument('--part', choices=PARTS, help=argparse.SUPPRESS)
  parser.add_argument('--global-batch', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  settings = TINY if args.tiny else FULL
  if args.part:  # a child: one part
    print(json.dumps(run_part(settings, args.part, args.global_batch)))
    return
  if not args.out:
    parser.error('--out is required')
  started = time.perf_counter()
  deadline = started + args.budget_s
  results, devices = {}, 1
  for index, part in enumerate(PARTS):
    later = len(PARTS) - index - 1
    timeout = max(RESERVE_S, deadline - time.perf_counter() - RESERVE_S * later)
    results[part] = spawn(part, args, settings['batch_per_device'] * devices, timeout)
    devices = results[part].get('device_count', devices)
    row = results[part]
    status = 'measured' if row['measured'] else f'not measured: {row["reason"]}'
    print(f'{part}: {status} ({row["wall_s"]:.0f} s)', flush=True)
  derive(results, settings)
  jax_part = next((results[p] for p in ('msf_jax', 'matmul_peak') if results[p]['measured']), {})
  report = {
    'command': shlex.join(['python', *sys.argv]),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'mode': 'tiny' if args.tiny else 'full',
    'budget_s': args.budget_s,
    'wall_s': time.perf_counter() - started,
    'machine': {
      **{key: jax_part.get(key) for key in ('device_kind', 'device_count', 'platform')},
      'cpu_cores': os.cpu_count(),
      'python': sys.version.split()[0],
      **{package: version(package) for package in PACKAGES},
    },
    'settings': settings,
    'results': results,
  }
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1)
  print(f'\n{report["mode"]} run, {report["wall_s"]:.0f} s, results in {args.out}\n')
  print('\n'.join(table(results, settings)))


if __name__ == '__main__':
  main()
