"""Loading the Python config files of `configs/` outside of absl flags (tests, notebooks), and
the paper's variants that every training config takes as its argument."""

import importlib.util
import os
from typing import Any

import ml_collections

from msf_jax.data import CROPS, PAIRINGS, SOURCES
from msf_jax.mean_shift import SEARCH_DTYPES
from msf_jax.optim import SCHEDULES
from msf_jax.sharding import BANK_LAYOUTS

VARIANTS_HELP = f'aug={"|".join(PAIRINGS)}, bank=N or k=N, comma-separated'


class ConfigError(ValueError):
  """A setting (of a config file, a --config.* override or another flag) that cannot work:
  the user's to change, so the program reports it in one line, not as a traceback."""


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` (or `get_config()`) of the config file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file at {path!r}.')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:  # no loader for the file's extension
    raise ConfigError(f'{path!r} is not a Python file: a config file ends in .py.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


# The data settings only some sources read; a run records only its own source's.
SOURCE_SETTINGS = {'tfds': ('name', 'data_dir'), 'folder': ('root',), 'digits': ()}


def _only_read(settings: dict) -> dict:
  """`settings` with every data section (one with a `source`) cut to what its source reads."""
  out: dict[str, Any] = {
    key: _only_read(value) if isinstance(value, dict) else value for key, value in settings.items()
  }
  if 'source' in out:
    others = {key for keys in SOURCE_SETTINGS.values() for key in keys}
    unread = others - set(SOURCE_SETTINGS.get(out['source'], others))
    out = {key: value for key, value in out.items() if key not in unread}
  return out


def recorded_settings(config: ml_collections.ConfigDict) -> dict:
  """`config` as a dict without the data settings its source does not read (in the demo's
  evaluation section too), so that what a run records (config.json, TensorBoard) shows what
  ran: a digits run names no TFDS dataset."""
  return _only_read(config.to_dict())


def _apply_variant(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  if key == 'aug' and value in PAIRINGS:
    config.data.pairing = value
  elif key == 'bank' and value.isdigit():
    config.msf.bank_size = int(value)
  elif key == 'k' and value.isdigit():
    config.msf.topk = int(value)
  else:
    raise ConfigError(f'Bad config argument {key}={value}: use {VARIANTS_HELP}.')


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's variants from a config argument such as 'aug=s/s,bank=128000,k=1': the
  augmentation pairing (target/online), the bank rows and the neighbours."""
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    _apply_variant(config, key.strip(), value.strip())
  return config


def minimum_image_size(model_config: ml_collections.ConfigDict) -> int:
  """The smallest input the ResNet reduces to at least one pixel: its total stride (the
  7x7/2 stem and max-pool add 4 to the stages' 8; the small stem adds nothing)."""
  return 8 if model_config.small_stem else 32


def bn_group_errors(size: int, batch: int, device_count: int) -> list[str]:
  """A BatchNorm group is consecutive images of the batch: it divides the batch, and a device
  holds whole groups or a group whole devices (a batch that does not divide among the
  devices has its own error)."""
  if size == 0 or batch < 1 or batch % device_count:
    return []
  per_device = batch // device_count
  if size > 0 and batch % size == 0 and (per_device % size == 0 or size % per_device == 0):
    return []
  return [
    f'model.bn_group_size={size} must divide batch_size={batch}, and divide or be a '
    f'multiple of the {per_device} images of a device (0: the whole batch).'
  ]


def training_config_errors(
  config: ml_collections.ConfigDict, device_count: int, process_count: int = 1
) -> list[str]:
  """Every setting of a training config that cannot work, each naming its keys and what
  would be valid; empty when the config is sound. Checked before anything is built, so that
  a bad flag fails in a second, not at the first traced step."""
  errors = []
  batch, bank, topk = config.batch_size, config.msf.bank_size, config.msf.topk
  smallest = minimum_image_size(config.model)
  if config.image_size < smallest:
    errors.append(
      f'image_size={config.image_size} is below {smallest}, the smallest input '
      f'a ResNet with model.small_stem={config.model.small_stem} reduces to one '
      'pixel.'
    )
  if batch < 1 or batch % device_count or batch % process_count:
    errors.append(
      f'batch_size={batch} must be a positive multiple of the {device_count} '
      f'devices (and of the {process_count} processes), e.g. '
      f'{max(device_count, batch - batch % device_count)}.'
    )
  if batch >= 1 and (bank < batch or bank % batch):
    errors.append(
      f'msf.bank_size={bank} must be a multiple of batch_size={batch} (whole '
      f'batches are enqueued), e.g. {max(batch, bank - bank % batch)}.'
    )
  errors += bn_group_errors(config.model.get('bn_group_size', 0), batch, device_count)
  if not 1 <= topk <= bank:
    errors.append(f'msf.topk={topk} must be between 1 and msf.bank_size={bank}.')
  candidates = config.msf.bank_search_candidates
  if config.msf.bank_search_dtype == 'bfloat16' and not topk < candidates <= bank:
    errors.append(
      f'msf.bank_search_candidates={candidates} must be more than msf.topk={topk} '
      '(k or fewer could only reorder the k rows found) and at most '
      f'msf.bank_size={bank}.'
    )
  for key in ('num_epochs', 'log_every_epochs', 'checkpoint.every_epochs', 'checkpoint.keep'):
    section, _, name = key.rpartition('.')
    value = (config[section] if section else config)[name]
    if not value > 0:
      errors.append(f'{key}={value} must be positive.')
  for key, value, valid in (
    ('data.pairing', config.data.pairing, PAIRINGS),
    ('data.crops', config.data.crops, CROPS),
    ('optim.schedule', config.optim.schedule, SCHEDULES),
    ('data.source', config.data.source, SOURCES),
    ('msf.bank_search_dtype', config.msf.bank_search_dtype, SEARCH_DTYPES),
    ('msf.bank_layout', config.msf.bank_layout, BANK_LAYOUTS),
  ):
    if value not in valid:
      errors.append(f'{key}={value!r} is not one of {", ".join(valid)}.')
  if config.monitor.knn_every_epochs < 0:
    errors.append(
      f'monitor.knn_every_epochs={config.monitor.knn_every_epochs} must be 0 (off) or positive.'
    )
  return errors


def check_training_config(
  config: ml_collections.ConfigDict, device_count: int, process_count: int = 1
) -> None:
  """Raises one ConfigError listing every error of `training_config_errors`."""
  errors = training_config_errors(config, device_count, process_count)
  if errors:
    raise ConfigError('The config cannot train:\n  ' + '\n  '.join(errors))
