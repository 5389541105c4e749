"""What several test modules share (no test module imports another, so a change to one file
reaches only the files that use what changed here): tree comparisons, the pyproject reads,
the few train steps, image folders, the notebook's cells, the training program's settings and
multi-process runs. Small configs and batches: msf_jax.testing."""

import copy
import importlib.util
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tomllib
import types
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from msf_jax import create_state, make_mesh, make_train_step, put_batch, put_state, workdir_lock
from msf_jax.testing import REPO

STEPS_PER_EPOCH = 10


def max_scaled_error(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |actual - expected| / max |expected|: relative to the tensor's scale, not per element
  (elementwise ratios are meaningless for entries that are near zero by chance)."""
  expected = np.asarray(expected, np.float64)
  scale = np.max(np.abs(expected)) if expected.size else 0.0
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(scale, 1e-30))


def assert_trees_close(actual, expected, rtol: float) -> None:
  """Every leaf of two pytrees of the same structure within `rtol` of its scale."""
  flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(actual))
  flat_e = jax.tree.leaves(jax.device_get(expected))
  errors = {
    jax.tree_util.keystr(path): max_scaled_error(a, e)
    for (path, a), e in zip(flat_a, flat_e, strict=True)
  }
  bad = {k: v for k, v in errors.items() if not v <= rtol}
  assert not bad, f'{len(bad)} leaves differ by more than {rtol}: {sorted(bad.items())[:10]}'


def relative_tree_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| over all leaves of two pytrees (Frobenius norm)."""
  pairs = zip(
    jax.tree.leaves(jax.device_get(actual)), jax.tree.leaves(jax.device_get(expected)), strict=True
  )
  diff = total = 0.0
  for a, e in pairs:
    diff += float(np.sum((np.asarray(a, np.float64) - np.asarray(e, np.float64)) ** 2))
    total += float(np.sum(np.asarray(e, np.float64) ** 2))
  return (diff / total) ** 0.5


def benchmark(name: str) -> types.ModuleType:
  """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(REPO, 'benchmarks', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def pyproject() -> dict:
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def home() -> str:
  """The project's home, pyproject's Repository: every link to the project derives from it."""
  return pyproject()['project']['urls']['Repository']


_TRAIN_STEPS: dict = {}


def train_step(config, mesh, steps_per_epoch=STEPS_PER_EPOCH, donate=True, finish_views=True):
  """`make_train_step`, built and compiled once per test process for each configuration,
  mesh and option (each `make_train_step` is a new function, which jit compiles anew). The
  step is made from a copy of `config`, so a test may change its config afterwards."""
  key = (
    config.to_json_best_effort(sort_keys=True),
    tuple(device.id for device in mesh.devices.flat),
    mesh.devices.shape,
    mesh.axis_names,
    steps_per_epoch,
    donate,
    finish_views,
    jax.config.jax_enable_x64,
  )
  if key not in _TRAIN_STEPS:
    _TRAIN_STEPS[key] = make_train_step(
      copy.deepcopy(config), mesh, steps_per_epoch, donate=donate, finish_views=finish_views
    )
  return _TRAIN_STEPS[key]


def run_steps(config, devices, batches, seed=0):
  """`batches` (finished views) through a fresh state's train step on `devices`: the final
  state and each step's metrics, on the host."""
  mesh = make_mesh(devices)
  state = put_state(create_state(config, jax.random.key(seed)), config, mesh)
  step = train_step(config, mesh, STEPS_PER_EPOCH, finish_views=False)
  metrics = []
  for batch in batches:
    state, step_metrics = step(state, put_batch(batch, mesh))
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state), metrics


def write_folder(root, split='train', classes=3, per_class=7, size=(40, 56), corrupt=0):
  """root/split/class_k/*.jpg|png with distinct images; `corrupt` extra unreadable JPEGs."""
  rng = np.random.default_rng(0)
  for k in range(classes):
    os.makedirs(os.path.join(root, split, f'class_{k}'), exist_ok=True)
    for i in range(per_class):
      image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
      fmt = 'PNG' if i % 2 else 'JPEG'
      Image.fromarray(image).save(
        os.path.join(root, split, f'class_{k}', f'{i}.{fmt.lower()}'), format=fmt
      )
  for i in range(corrupt):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    with open(os.path.join(root, split, 'class_0', f'broken_{i}.jpg'), 'wb') as f:
      f.write(buffer.getvalue()[:200])  # a header, then nothing: undecodable
  return str(root)


def brute_force_votes(train, train_labels, queries, k, num_classes, weighted, temperature=0.07):
  """Each query's kNN class scores by direct numpy: cosine similarity, the k nearest, one vote
  each or exp(similarity / temperature)."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  similarity = queries @ train.T
  index = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
  scores = np.zeros((len(queries), num_classes))
  for q in range(len(queries)):
    for i in index[q]:
      scores[q, train_labels[i]] += np.exp(similarity[q, i] / temperature) if weighted else 1
  return scores


# --- The notebook ---------------------------------------------------------------------------

NOTEBOOK = os.path.join(REPO, 'notebooks', 'msf_demo.ipynb')


def load_notebook() -> dict:
  with open(NOTEBOOK, encoding='utf-8') as f:
    return json.load(f)


def code_sources(notebook: dict) -> list[str]:
  return [''.join(cell['source']) for cell in notebook['cells'] if cell['cell_type'] == 'code']


# --- The training program -------------------------------------------------------------------

TRAIN_CONFIG = os.path.join(REPO, 'configs', 'digits_msf.py')


# The digits config made small for the training program's tests: a ResNet-18 of width 8
# (checkpoints of a few MB, not the 137 MB of width 64), batches of 8, a bank of 32 rows.
SMALL_RUN = {'model.width': 8, 'batch_size': 8, 'msf.bank_size': 32}


def with_settings(config, settings: dict):
  """`config` with dotted-key `settings` ({'msf.topk': 3}) set, as `--config.` flags set them."""
  for key, value in settings.items():
    section, _, name = key.rpartition('.')
    setattr(config[section] if section else config, name, value)
  return config


def small_run_config(**settings):
  """TRAIN_CONFIG with SMALL_RUN and `settings` ({'msf.topk': 3}): the config a run of
  `overrides` trains, for building or restoring its states."""
  from msf_jax import load_config

  return with_settings(load_config(TRAIN_CONFIG), {**SMALL_RUN, **settings})


def overrides(folder, **extra):
  """`--config.` flags that train the digits config (SMALL_RUN) on a small image folder in
  seconds."""
  settings = {
    'data.source': 'folder',
    'data.root': folder,
    **SMALL_RUN,
    'num_epochs': 3,
    'checkpoint.every_epochs': 4 / 3,
    'log_every_epochs': 2 / 3,
    **extra,
  }
  return [f'--config.{k}={v}' for k, v in settings.items()]


def write_lock(workdir, **holder):
  """A workdir lock held by this process, or by the holder's fields given."""
  os.makedirs(workdir, exist_ok=True)
  me = workdir_lock.this_process()
  record = {'host': me.host, 'pid': me.pid, 'job': '', 'heartbeat': me.heartbeat, **holder}
  path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(f'{path}.tmp', 'w') as f:  # whole or not at all, as a heartbeat thread reads it
    json.dump(record, f)
  os.replace(f'{path}.tmp', path)


def run_in_process(args, capfd):
  """`python -m msf_jax.main ARGS` in this process: (exit status, console output)."""
  from absl import flags

  from msf_jax import main as main_module

  before = set(logging.getLogger().handlers)
  capfd.readouterr()
  argv = ['main', *args]
  try:  # ml_collections finds the --config.* overrides in sys.argv
    with pytest.raises(SystemExit) as exited, mock.patch.object(sys, 'argv', argv):
      main_module.run(argv)
  finally:
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith('config.')]:
      delattr(flags.FLAGS, name)  # ml_collections defines them anew at each parse
    for handler in set(logging.getLogger().handlers) - before:
      if isinstance(handler, logging.FileHandler):  # the run's log file
        logging.getLogger().removeHandler(handler)
        handler.close()
  return exited.value.code, capfd.readouterr().err


# --- The evaluation program ----------------------------------------------------------------

EVAL_CONFIG = os.path.join(REPO, 'configs', 'eval.py')
EVAL_WIDTH = 8  # first-stage channels: a ResNet-18 narrow enough for fast CPU tests


def eval_config(**settings):
  """configs/eval.py:digits with a narrow model and dotted-key `settings`."""
  from msf_jax import load_config

  config = load_config(EVAL_CONFIG, 'digits')
  config.model.width = EVAL_WIDTH
  return with_settings(config, settings)


# --- Multi-process jobs ---------------------------------------------------------------------

PROCESSES, DEVICES_PER_PROCESS = 2, 2
JOB_TIMEOUT_S = 600


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def skip_without_cpu_collectives() -> None:
  from jax._src.lib import _jax

  if not hasattr(_jax, 'make_gloo_tcp_collectives'):
    pytest.skip('This jaxlib has no gloo: multi-process CPU collectives are unavailable.')


def run_processes(
  commands: list[list[str]], before_waiting=lambda: None, extra_env=None, expected_status: int = 0
):
  """Starts one CPU process per command (2 devices each, `extra_env` added to the
  environment), calls `before_waiting`, then waits for all of them (killing any left after
  the timeout); returns its result and each process's output, having checked every exit
  status."""
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}',
    **(extra_env or {}),
  }
  processes = [
    subprocess.Popen(
      command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for command in commands
  ]
  try:
    result = before_waiting()
    outputs = [process.communicate(timeout=JOB_TIMEOUT_S)[0] for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for p, (process, output) in enumerate(zip(processes, outputs, strict=True)):
    assert process.returncode == expected_status, (
      f'process {p} exited {process.returncode}, not {expected_status}:\n{output[-5000:]}'
    )
  return result, outputs
