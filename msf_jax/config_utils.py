"""Loading the Python config files of `configs/` outside of absl flags (tests, notebooks), and
the paper's variants that every training config takes as its argument."""

import importlib.util
import os

import ml_collections

from msf_jax.data.augment import PAIRINGS

VARIANTS_HELP = f'aug={"|".join(PAIRINGS)}, bank=N or k=N, comma-separated'


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` (or `get_config()`) of the config file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file at {path!r}.')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _apply_variant(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  if key == 'aug' and value in PAIRINGS:
    config.data.pairing = value
  elif key == 'bank' and value.isdigit():
    config.msf.bank_size = int(value)
  elif key == 'k' and value.isdigit():
    config.msf.topk = int(value)
  else:
    raise ValueError(f'Bad config argument {key}={value}: use {VARIANTS_HELP}.')


def apply_variants(config: ml_collections.ConfigDict, arg: str | None
                   ) -> ml_collections.ConfigDict:
  """The paper's variants from a config argument such as 'aug=s/s,bank=128000,k=1': the
  augmentation pairing (target/online), the bank rows and the neighbours."""
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    _apply_variant(config, key.strip(), value.strip())
  return config
