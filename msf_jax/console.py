"""What a run prints: a short summary of the settings that apply, one line a log step, and
where the results are. Other libraries' INFO lines (orbax, CLU, JAX) go to the run's log file
only; their warnings and errors still reach the console."""

import logging
import math
import os

import ml_collections
from absl import logging as absl_logging

from msf_jax.models import parse_dtype
from msf_jax.sharding import resolve_bank_layout

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LOG_FILE = 'msf_jax.log'


class OwnInfoOnly(logging.Filter):
  """Passes msf_jax's own records and everyone's warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


class ConsoleFormatter(logging.Formatter):
  """'12:03:44 message', with the level named for warnings and errors: short enough that a
  progress line fits on one line of a terminal."""

  def format(self, record: logging.LogRecord) -> str:
    level = '' if record.levelno < logging.WARNING else f'{record.levelname} '
    return f'{self.formatTime(record, "%H:%M:%S")} {level}{record.getMessage()}'


def quiet_console() -> None:
  """Keeps other libraries' INFO lines off the console, and its lines short."""
  handler = absl_logging.get_absl_handler()
  handler.addFilter(OwnInfoOnly())
  handler.setFormatter(ConsoleFormatter())


def log_to_file(workdir: str, process_index: int = 0) -> str | None:
  """Writes every line, third-party INFO included, to WORKDIR/msf_jax.log (msf_jax.<i>.log
  for process i > 0) in absl's full format. On a bucket there is no such file (the launch
  scripts keep each worker's log). Returns the path."""
  if '://' in workdir:
    return None
  os.makedirs(workdir, exist_ok=True)
  name = LOG_FILE if process_index == 0 else LOG_FILE.replace('.log', f'.{process_index}.log')
  path = os.path.join(workdir, name)
  handler = logging.FileHandler(path)
  handler.setFormatter(absl_logging.PythonFormatter())
  logging.getLogger().addHandler(handler)
  return path


def duration(seconds: float) -> str:
  """'42s', '9m05s', '3h12m'."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def progress_line(
  step: int, total_steps: int, steps_per_epoch: int, metrics: dict[str, float], eta_seconds: float
) -> str:
  """One line of a log step: where the run is, how it learns, how fast, how long to go."""
  epoch = math.ceil(step / steps_per_epoch)
  num_epochs = total_steps // steps_per_epoch
  return (
    f'epoch {epoch:>{len(str(num_epochs))}}/{num_epochs}  step {step}/{total_steps}  '
    f'loss {metrics["loss"]:.4f}  purity {metrics["purity"]:.3f} '
    f'(others {metrics["purity_others"]:.3f})  spread {metrics["target_std_ratio"]:.2f}  '
    f'lr {metrics["lr"]:.4g}  {metrics["images_per_sec"]:,.0f} img/s  '
    f'ETA {duration(eta_seconds)}'
  )


def _model(model: ml_collections.ConfigDict, image_size: int) -> str:
  stem = 'small stem' if model.small_stem else '7x7 stem'
  compute = parse_dtype(model.dtype)
  return (
    f'ResNet-{model.depth} ({stem}, width {model.width}) at {image_size} px, compute '
    f'{compute.name if compute else model.param_dtype}, parameters {model.param_dtype}'
  )


def _every(epochs: float) -> str:
  return 'every epoch' if epochs == 1 else f'every {epochs:g} epochs'


def _data(data: ml_collections.ConfigDict) -> str:
  where = {
    'digits': "scikit-learn's digits",
    'folder': f'the image folder {data.root}',
    'tfds': f'TFDS {data.name}' + (f' in {data.data_dir}' if data.data_dir else ''),
  }
  flips = 'flips' if data.flip else 'no flips'
  low, high = data.crop_scale
  by_pil = ' by PIL' if data.crops == 'pil' else ''  # TensorFlow's, the default, go unnamed
  return (
    f'{where.get(data.source, data.source)}, views {data.pairing} (target/online), '
    f'crops of {low:g}-{high:g} of the image{by_pil}, {flips}'
  )


def _search(msf: ml_collections.ConfigDict) -> str:
  """How the bank is searched, where it is not the official float32 product."""
  if msf.bank_search_dtype == 'float32':
    return ''
  return (
    f' searched in {msf.bank_search_dtype} (best {msf.bank_search_candidates} re-scored in float32)'
  )


def _layout(msf: ml_collections.ConfigDict, device_count: int) -> str:
  """Where the bank lives, when there is more than one device to put it on."""
  if device_count == 1:
    return ''
  if resolve_bank_layout(msf.bank_layout, msf.bank_size, device_count) == 'replicated':
    return f' replicated on each of {device_count} devices'
  return f' sharded over {device_count} devices ({msf.bank_size // device_count:,} each)'


def config_summary(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_train: int, device_count: int = 1
) -> str:
  """The settings that apply to this run on `device_count` devices, in a few lines (the whole
  resolved config is in WORKDIR/config.json and in TensorBoard's text tab)."""
  msf, optim = config.msf, config.optim
  k = f'k = {msf.topk}' + (
    f' (ramped over {msf.topk_ramp_epochs} epochs)' if msf.topk_ramp_epochs else ''
  )
  lines = [
    f'Data: {_data(config.data)}; {num_train:,} training images.',
    f'Model: {_model(config.model, config.image_size)}.',
    f'MSF: {k}, bank of {msf.bank_size:,} rows{_layout(msf, device_count)}{_search(msf)}, '
    f'target momentum '
    f'{msf.ema_momentum:g}.',
    f'Training: {config.num_epochs} epochs of {steps_per_epoch:,} steps of batch '
    f'{config.batch_size}; SGD lr {optim.base_lr:g} x batch/256 '
    f'({optim.base_lr * config.batch_size / 256:.4g}), {optim.schedule}, momentum '
    f'{optim.momentum:g}, weight decay {optim.weight_decay:g}.',
  ]
  monitor = config.monitor
  if monitor.knn_every_epochs:
    lines.append(
      f'kNN monitor {_every(monitor.knn_every_epochs)}: '
      f'{monitor.num_queries:,} {monitor.split} images against {monitor.num_train:,} '
      f'training images, k = {", ".join(map(str, monitor.ks))}.'
    )
  lines.append(
    f'Logs {_every(config.log_every_epochs)}, checkpoints '
    f'{_every(config.checkpoint.every_epochs)} (the last {config.checkpoint.keep} '
    'kept).'
  )
  return '\n'.join(lines)


def where_results_are(
  workdir: str, log_path: str | None, extra: dict[str, str] | None = None, checkpoints: bool = True
) -> str:
  """The closing lines of a run: its files and the TensorBoard command."""
  lines = [f'Checkpoints: {os.path.join(workdir, "checkpoints")}'] if checkpoints else []
  lines += [f'{name}: {path}' for name, path in (extra or {}).items()]
  if log_path:
    lines.append(f'Log: {log_path}')
  lines.append(f'Metrics: tensorboard --logdir {workdir}')
  return '\n'.join(lines)
