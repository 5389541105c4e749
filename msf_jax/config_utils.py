"""Loading the Python config files of `configs/` outside of absl flags (tests, notebooks)."""

import importlib.util
import os

import ml_collections


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` (or `get_config()`) of the config file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file at {path!r}.')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
