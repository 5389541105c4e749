"""The training program end to end, in subprocesses: resume after SIGKILL, SIGTERM, Ctrl-C
(once, and again during the save), a misspelt config key and a NaN loss. A small image folder
keeps each run to seconds. The order of start-up in `main`, and each mistake a user can make
as one `error:` line (in this process, the console captured) while a bug keeps its
traceback."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from msf_jax import create_state
from msf_jax.checkpoint import Checkpointer, checkpoint_directory, damaged_directory
from msf_jax.console import LOG_FILE
from msf_jax.sharding import make_mesh, replicated
from msf_jax.train_loop import STREAM_METADATA
from msf_jax.train_state import abstract_state

from helpers import (
  REPO,
  TRAIN_CONFIG as CONFIG,
  assert_trees_close,
  overrides,
  run_in_process,
  small_run_config,
  write_folder,
  write_lock,
)

EVAL_CONFIG = os.path.join(REPO, 'configs', 'eval.py')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """24 images and 2 undecodable files: 3 steps of 8 an epoch, a few images skipped."""
  return write_folder(
    tmp_path_factory.mktemp('images'), 'train', classes=2, per_class=12, size=(30, 30), corrupt=2
  )


def start(workdir, args, program=('-m', 'msf_jax.main'), env=None):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **(env or {})}
  return subprocess.Popen(
    [sys.executable, *program, f'--config={CONFIG}', f'--workdir={workdir}', *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def run(workdir, args, timeout=300):
  process = start(workdir, args)
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def one_device_state(**extra):
  """The abstract state of a run's config (`small_run_config`), on one device: what the
  tests restore a run's checkpoints into."""
  return abstract_state(small_run_config(**extra), replicated(make_mesh(jax.devices()[:1])))


def final_state(workdir, folder, **extra):
  checkpointer = Checkpointer(checkpoint_directory(workdir))
  return checkpointer.latest_step(), checkpointer.restore(one_device_state(**extra))


def wait_for_checkpoint(workdir, process, at_least, timeout=240):
  """The newest checkpoint's step once it is `at_least` (the run may have ended since)."""
  directory = checkpoint_directory(str(workdir))
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = (
      [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    )
    if steps and max(steps) >= at_least:
      return max(steps)
    if process.poll() is not None:
      break
    time.sleep(0.2)
  raise AssertionError('no checkpoint appeared in time')


@pytest.fixture(scope='module')
def straight(tmp_path_factory, folder):
  """The workdir of an uninterrupted run of 9 steps with a checkpoint of every step: what the
  interrupted runs must end as (how often a run saves does not change its states)."""
  workdir = tmp_path_factory.mktemp('straight')
  code, output = run(
    workdir, overrides(folder, **{'checkpoint.every_epochs': 1 / 3, 'checkpoint.keep': 9})
  )
  assert code == 0, output
  return workdir


INTERRUPT_WORKER = ('tests/interrupt_worker.py',)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, folder):
  # SIGTERM (a preemption, a job scheduler) right after the checkpoint of step 4 of 9: the
  # run saves the step it is at and exits 0. The run is the straight run's program, which the
  # compilation cache holds.
  process = start(
    tmp_path,
    overrides(folder),
    program=INTERRUPT_WORKER,
    env={'SIGNAL_AFTER_STEP': '4', 'SIGNAL': 'SIGTERM'},
  )
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  stopped = int(output.split('Stopping at step ')[1].split(';')[0])
  assert 4 < stopped < 9 and final_state(tmp_path, folder)[0] == stopped


def saved_steps(workdir, folder, steps):
  """{step: state} of the checkpoints of `steps` in `workdir`."""
  checkpointer = Checkpointer(checkpoint_directory(workdir))
  abstract = one_device_state()
  return {step: checkpointer.restore(abstract, step) for step in steps}


@pytest.mark.slow
def test_ctrl_c_saves_the_step_exits_130_and_a_killed_rerun_still_ends_as_if_uninterrupted(
  tmp_path, folder, straight
):
  # 24 images, batch 8: 3 steps an epoch, 9 steps in all, checkpoints every 4 steps and at
  # the end. Ctrl-C after the checkpoint of step 4: the run saves step 5 and exits 130.
  workdir = tmp_path / 'stopped'
  process = start(
    workdir, overrides(folder), program=INTERRUPT_WORKER, env={'SIGNAL_AFTER_STEP': '4'}
  )
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 130, output
  assert f'saved a checkpoint of step 5 in {workdir}/checkpoints' in output
  assert (
    f'Resume with: python -m msf_jax.main --config={CONFIG} --workdir={workdir}' in output
    and 'Traceback' not in output
  )
  with open(workdir / 'config.json') as f:  # a folder run: no TFDS name
    assert 'root' in (data := json.load(f)['data']) and 'name' not in data
  expected = saved_steps(straight, folder, [5, 9])
  assert_trees_close(saved_steps(workdir, folder, [5])[5], expected[5], rtol=1e-6)
  # The rerun resumes at step 5, saving every step, and is killed (SIGKILL: no save) once it
  # saved step 6.
  process = start(workdir, overrides(folder, **{'checkpoint.every_epochs': 1 / 3}))
  wait_for_checkpoint(workdir, process, at_least=6)
  process.send_signal(signal.SIGKILL)
  output, _ = process.communicate(timeout=60)
  assert 'Resuming at step 5' in output, output
  # The last run ends as the uninterrupted one: the same state, and its stream on the image
  # the uninterrupted run read next, the skipped ones counted (both end at the same slot with
  # the same count, and skipped some).
  code, output = run(workdir, overrides(folder))
  assert code == 0 and 'Resuming at step' in output, output
  assert 6 <= int(output.split('Resuming at step ')[1].split()[0]) < 9  # killed mid-run
  assert_trees_close(final_state(workdir, folder)[1], expected[9], rtol=1e-6)
  straight_stream, resumed_stream = (
    Checkpointer(checkpoint_directory(str(w))).read_metadata(9)[STREAM_METADATA]
    for w in (straight, workdir)
  )
  assert resumed_stream == straight_stream and straight_stream['skipped'][0] > 0


@pytest.mark.slow
def test_ctrl_c_again_during_the_save_exits_at_once_keeping_the_checkpoint_before(tmp_path, folder):
  process = start(
    tmp_path,
    overrides(folder),
    program=INTERRUPT_WORKER,
    env={'SIGNAL_AFTER_STEP': '4', 'CTRL_C_AGAIN': '1'},
  )
  output, _ = process.communicate(timeout=300)  # the save of step 5 would take ten minutes
  assert process.returncode == 130 and 'Ctrl-C again: stopping at once' in output, output
  saved_steps(tmp_path, folder, [4])  # whole and readable
  # What a rerun resumes from, found as the training loop finds it, in this process (a
  # rerun's resume is the Ctrl-C test's above).
  resumed = Checkpointer(checkpoint_directory(str(tmp_path))).restore_newest_readable(
    one_device_state(), aside=damaged_directory(str(tmp_path))
  )
  assert int(resumed.step) in (4, 5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, folder):
  code, output = run(
    tmp_path, overrides(folder, **{'optim.base_lr': 1e30, 'checkpoint.every_epochs': 1 / 3})
  )
  assert code != 0 and 'training stopped without saving' in output, output
  step, state = final_state(tmp_path, folder)
  assert step is not None and step >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.trainable_params)))


def test_main_hides_accelerators_from_tensorflow_before_anything_else(monkeypatch, tmp_path):
  from absl import flags

  from msf_jax import main as main_module

  calls = []
  monkeypatch.setattr(
    main_module.pipeline, 'hide_accelerators_from_tensorflow', lambda: calls.append('hide')
  )
  monkeypatch.setattr(main_module.distributed, 'initialize', lambda *args: calls.append('join'))
  monkeypatch.setattr(
    main_module.distributed, 'cpu_alone_without_accelerators', lambda: calls.append('cpu')
  )
  monkeypatch.setattr(main_module.console, 'quiet_console', lambda: calls.append('quiet'))
  monkeypatch.setattr(main_module.console, 'log_to_file', lambda *args: calls.append('logs'))
  monkeypatch.setitem(main_module.MODES, 'train', lambda config, workdir: calls.append('train'))
  flags.FLAGS(['main', f'--config={CONFIG}', f'--workdir={tmp_path}'])
  try:
    main_module.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert calls == ['quiet', 'hide', 'cpu', 'join', 'logs', 'train']


# --- A user's mistakes: one line each; a bug: its traceback ---------------------------------


def saved_state(workdir, **settings):
  """A training workdir holding a fresh state of the test config with `settings`, at step 1."""
  config = small_run_config(**settings)
  checkpointer = Checkpointer(checkpoint_directory(str(workdir)))
  checkpointer.save(1, create_state(config, jax.random.key(0)))
  checkpointer.wait()
  return str(workdir)


def not_a_folder(tmp_path):
  (tmp_path / 'file').write_text('')
  return str(tmp_path / 'file' / 'run')


def error_case(name, tmp_path, folder, holder):
  """The command line of a user's mistake, words of its message and whether a log file
  exists to hold the traceback; only the named case's files are written."""
  workdir = str(tmp_path / 'run')
  train = lambda *more, workdir=workdir: [
    f'--config={CONFIG}',
    f'--workdir={workdir}',
    *overrides(folder),
    *more,
  ]
  cases = {
    'config file': lambda: (
      [f'--config={REPO}/configs/digits_msfx.py', f'--workdir={workdir}'],
      'digits_msfx.py: there is no such file',
      True,
    ),
    'config key': lambda: (train('--config.msf.topkk=3'), 'topkk', False),
    'config setting': lambda: (
      train('--config.batch_size=7'),
      'msf.bank_size=32 must be a multiple of batch_size=7',
      True,
    ),
    'workdir cannot be created': lambda: (
      train(workdir=not_a_folder(tmp_path)),
      'cannot be used: Not a directory',
      False,
    ),
    'workdir busy': lambda: (
      train(workdir=write_lock(workdir, pid=holder.pid) or workdir),
      'use another --workdir',
      True,
    ),
    'dataset missing': lambda: (
      train('--config.data.root=/nonexistent/images'),
      '/nonexistent/images',
      True,
    ),
    'no checkpoint to evaluate': lambda: (
      [f'--config={EVAL_CONFIG}:digits', f'--workdir={workdir}', f'--config.checkpoint={tmp_path}'],
      'No msf_jax checkpoint in',
      True,
    ),
    'bank differs from the checkpoint': lambda: (
      train('--config.msf.bank_size=64', workdir=saved_state(workdir)),
      'run with the config the checkpoint was trained with',
      True,
    ),
  }
  return cases[name]()


@pytest.mark.parametrize(
  'case',
  [
    'config file',
    'config key',
    'config setting',
    'workdir cannot be created',
    'workdir busy',
    'dataset missing',
    'no checkpoint to evaluate',
    pytest.param('bank differs from the checkpoint', marks=pytest.mark.slow),
  ],
)  # saves a state
def test_a_users_mistake_is_one_error_line_and_the_traceback_goes_to_the_log(
  case, tmp_path, folder, sleeper, capfd
):
  args, words, logged = error_case(case, tmp_path, folder, sleeper)
  code, console = run_in_process(args, capfd)
  errors = [line for line in console.splitlines() if line.startswith('error: ')]
  assert code == 1 and len(errors) == 1 and words in errors[0], console
  assert 'Traceback' not in console, console
  log = tmp_path / 'run' / LOG_FILE
  assert log.is_file() == logged
  if logged:
    assert 'Traceback (most recent call last)' in log.read_text()


def test_the_traceback_of_a_users_mistake_is_shown_when_asked_for(
  tmp_path, folder, capfd, monkeypatch
):
  args = [f'--config={CONFIG}', f'--workdir={tmp_path}', *overrides(folder, batch_size=7)]
  code, console = run_in_process([*args, '--verbosity=1'], capfd)
  assert code == 1 and 'Traceback (most recent call last)' in console
  monkeypatch.setenv('MSF_JAX_TRACEBACK', '1')
  code, console = run_in_process(args, capfd)
  assert code == 1 and 'Traceback (most recent call last)' in console
  assert console.rstrip().splitlines()[-1].startswith('error: The config cannot train')


def test_a_bug_propagates_with_its_traceback(tmp_path, folder, monkeypatch, capfd):
  """Not one of a user's mistakes: the program lets it out as it is, so Python prints its
  traceback and exits 1, and nothing reads as an `error:` line."""
  from msf_jax import main as main_module

  def bug(config, workdir):
    raise RuntimeError('injected bug')

  monkeypatch.setitem(main_module.MODES, 'train', bug)
  with pytest.raises(RuntimeError, match='injected bug'):
    run_in_process([f'--config={CONFIG}', f'--workdir={tmp_path}', *overrides(folder)], capfd)
  assert not any(line.startswith('error: ') for line in capfd.readouterr().err.splitlines())
