"""The training program end to end, in subprocesses: resume after SIGKILL, SIGTERM, a
misspelt config key and a NaN loss. A small image folder keeps each run to seconds. And the
order of start-up in `main`."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from msf_jax import load_config
from msf_jax.checkpoint import Checkpointer, checkpoint_directory
from msf_jax.sharding import make_mesh, replicated
from msf_jax.train_state import abstract_state

from helpers import REPO, assert_trees_close
from test_pipeline import write_folder

CONFIG = os.path.join(REPO, 'configs', 'digits_msf.py')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp('images'), 'train', classes=2, per_class=12,
                      size=(30, 30))


def overrides(folder, **extra):
  settings = {'data.source': 'folder', 'data.root': folder, 'batch_size': 8,
              'msf.bank_size': 32, 'num_epochs': 3, 'checkpoint.every_epochs': 4 / 3,
              'log_every_epochs': 2 / 3, **extra}
  return [f'--config.{k}={v}' for k, v in settings.items()]


def start(workdir, args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.Popen([sys.executable, '-m', 'msf_jax.main', f'--config={CONFIG}',
                           f'--workdir={workdir}', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(workdir, args, timeout=300):
  process = start(workdir, args)
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def final_state(workdir, folder, **extra):
  config = load_config(CONFIG)
  for key, value in {'batch_size': 8, 'msf.bank_size': 32, **extra}.items():
    section, _, name = key.rpartition('.')
    setattr(config[section] if section else config, name, value)
  checkpointer = Checkpointer(checkpoint_directory(workdir))
  abstract = abstract_state(config, replicated(make_mesh(jax.devices()[:1])))
  return checkpointer.latest_step(), checkpointer.restore(abstract)


def wait_for_checkpoint(workdir, process, at_least, timeout=240):
  directory = checkpoint_directory(str(workdir))
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    steps = ([int(d) for d in os.listdir(directory) if d.isdigit()]
             if os.path.isdir(directory) else [])
    if steps and max(steps) >= at_least:
      return max(steps)
    time.sleep(0.2)
  raise AssertionError('no checkpoint appeared in time')


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_state(tmp_path, folder):
  # 24 images, batch 8: 3 steps an epoch, 9 steps in all, checkpoints at 4, 8 and 9.
  code, output = run(tmp_path / 'straight', overrides(folder))
  assert code == 0, output
  process = start(tmp_path / 'killed', overrides(folder))
  wait_for_checkpoint(tmp_path / 'killed', process, at_least=4)
  process.send_signal(signal.SIGKILL)
  process.wait()
  code, output = run(tmp_path / 'killed', overrides(folder))
  assert code == 0 and 'Resuming at step' in output, output
  straight_step, straight = final_state(tmp_path / 'straight', folder)
  resumed_step, resumed = final_state(tmp_path / 'killed', folder)
  assert straight_step == resumed_step == 9
  assert_trees_close(resumed, straight, rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, folder):
  process = start(tmp_path, overrides(folder, num_epochs=1000))
  wait_for_checkpoint(tmp_path, process, at_least=4)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  stopped = int(output.split('Stopping at step ')[1].split(';')[0])
  assert final_state(tmp_path, folder)[0] == stopped


def test_misspelt_config_key_is_named(tmp_path):
  code, output = run(tmp_path, ['--config.msf.topkk=3'], timeout=120)
  assert code != 0 and 'topkk' in output


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, folder):
  code, output = run(tmp_path, overrides(folder, **{'optim.base_lr': 1e30,
                                                     'checkpoint.every_epochs': 1 / 3}))
  assert code != 0 and 'training stopped without saving' in output, output
  step, state = final_state(tmp_path, folder)
  assert step is not None and step >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.trainable_params)))


def test_main_hides_accelerators_from_tensorflow_before_anything_else(monkeypatch, tmp_path):
  from absl import flags
  from msf_jax import main as main_module
  calls = []
  monkeypatch.setattr(main_module.pipeline, 'hide_accelerators_from_tensorflow',
                      lambda: calls.append('hide'))
  monkeypatch.setattr(main_module.distributed, 'initialize', lambda *args: calls.append('join'))
  monkeypatch.setattr(main_module.console, 'quiet_console', lambda: calls.append('quiet'))
  monkeypatch.setattr(main_module.console, 'log_to_file', lambda *args: calls.append('logs'))
  monkeypatch.setitem(main_module.MODES, 'train', lambda config, workdir: calls.append('train'))
  flags.FLAGS(['main', f'--config={CONFIG}', f'--workdir={tmp_path}'])
  try:
    main_module.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert calls == ['quiet', 'hide', 'join', 'logs', 'train']
