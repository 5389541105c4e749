"""Bad input and damaged files: each fault gives a clear error or a logged, counted recovery,
never a silent wrong result. The README's fault table points at these tests."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msf_jax import checkpoint, load_config, train_loop, workdir_lock
from msf_jax.checkpoint import Checkpointer, CheckpointError
from msf_jax.config_utils import training_config_errors
from msf_jax.evaluate import run
from msf_jax.interop import backbones
from msf_jax.testing import small_config

from helpers import REPO, with_settings, write_folder, write_lock

DIGITS = os.path.join(REPO, 'configs', 'digits_msf.py')


# --- One run per workdir --------------------------------------------------------------------


def read_lock(path):
  with open(path) as f:
    return json.load(f)


def test_a_live_run_keeps_its_workdir_and_a_dead_one_does_not(tmp_path, sleeper, monkeypatch):
  workdir = str(tmp_path)
  write_lock(workdir, pid=sleeper.pid)
  with pytest.raises(
    workdir_lock.WorkdirBusyError,
    match=f'in use by process {sleeper.pid} on {socket.gethostname()}',
  ):
    workdir_lock.WorkdirLock(workdir).acquire()
  sleeper.kill()
  sleeper.wait()
  with workdir_lock.WorkdirLock(workdir):  # the holder has exited: taken over
    assert read_lock(os.path.join(workdir, workdir_lock.LOCK_FILE))['pid'] == os.getpid()
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released

  # Another host: refused while its heartbeat is fresh, taken when it is old or the same job.
  write_lock(workdir, host='elsewhere', pid=1)
  with pytest.raises(workdir_lock.WorkdirBusyError, match='on elsewhere'):
    workdir_lock.WorkdirLock(workdir).acquire()
  monkeypatch.setenv('SLURM_JOB_ID', '42')
  write_lock(workdir, host='elsewhere', pid=1, job='42')
  workdir_lock.WorkdirLock(workdir).release()  # not ours: left alone
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  with workdir_lock.WorkdirLock(workdir):
    pass
  write_lock(
    workdir,
    host='elsewhere',
    pid=1,
    job='7',
    heartbeat=workdir_lock.this_process().heartbeat - 2 * workdir_lock.STALE_AFTER_SECONDS,
  )
  with workdir_lock.WorkdirLock(workdir):
    pass


def test_the_heartbeat_renews_the_lock_and_reports_another_writer(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  path = os.path.join(tmp_path, workdir_lock.LOCK_FILE)
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  first = read_lock(path)['heartbeat']
  deadline = time.time() + 10
  while time.time() < deadline and read_lock(path)['heartbeat'] == first:
    time.sleep(0.05)
  assert read_lock(path)['heartbeat'] > first  # renewed
  with open(path, 'w') as f:
    f.write('{"host": "half-wri')  # a write caught midway: not another run
  time.sleep(0.3)
  assert lock._thread.is_alive() and 'another run' not in caplog.text
  deadline = time.time() + 10
  while 'process 9 on elsewhere' not in caplog.text and time.time() < deadline:
    write_lock(str(tmp_path), host='elsewhere', pid=9)  # another run overwrote it (a bucket)
    time.sleep(0.2)
  lock._thread.join(timeout=10)
  assert 'process 9 on elsewhere' in caplog.text and not lock._thread.is_alive()
  lock.release()
  assert os.path.exists(path)  # the other run's lock is left alone


def test_training_refuses_a_workdir_another_run_holds(tmp_path, sleeper):
  write_lock(str(tmp_path), pid=sleeper.pid)
  config = load_config(DIGITS)
  with pytest.raises(workdir_lock.WorkdirBusyError, match='use another --workdir'):
    train_loop.train(config, str(tmp_path))
  assert not os.path.exists(checkpoint.checkpoint_directory(str(tmp_path)))  # nothing written


# --- Damaged checkpoints --------------------------------------------------------------------


def save_steps(directory, steps):
  checkpointer = Checkpointer(directory)
  for step in steps:
    checkpointer.save(step, {'w': jnp.full((4,), float(step))})
  checkpointer.wait()
  return jax.eval_shape(lambda: {'w': jnp.zeros((4,))})


def damage(step_dir, how):
  for directory, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(directory, name)
      if how == 'truncate' and os.sep + 'd' + os.sep in path:
        open(path, 'wb').close()
      if how == 'manifest' and name == 'manifest.ocdbt':
        os.remove(path)


@pytest.mark.parametrize('how', ['truncate', 'manifest'])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_one_before_restored(tmp_path, how):
  directory, aside = str(tmp_path / 'checkpoints'), str(tmp_path / 'damaged')
  abstract = save_steps(directory, [1, 2, 3])
  damage(os.path.join(directory, '3'), how)
  restored = Checkpointer(directory).restore_newest_readable(abstract, aside)
  assert float(restored['w'][0]) == 2.0
  assert Checkpointer(directory).all_steps() == [1, 2]
  assert [name.split('-')[0] for name in os.listdir(aside)] == ['3']  # kept, not deleted


def test_no_readable_checkpoint_stops_with_what_was_tried(tmp_path):
  directory, aside = str(tmp_path / 'checkpoints'), str(tmp_path / 'damaged')
  abstract = save_steps(directory, [1, 2])
  for step in ('1', '2'):
    damage(os.path.join(directory, step), 'manifest')
  with pytest.raises(CheckpointError, match=r'can be read; tried step 2 \(.*\); step 1 \('):
    Checkpointer(directory).restore_newest_readable(abstract, aside)
  assert Checkpointer(str(tmp_path / 'empty')).restore_newest_readable(abstract, aside) is None


# --- Files that are not checkpoints ---------------------------------------------------------


class NotATensor:
  """A class that a weights-only load must refuse to unpickle."""


def write_bytes(path, payload):
  with open(path, 'wb') as f:
    f.write(payload)
  return str(path)


@pytest.mark.slow  # torch, and python -m msf_jax.interop
def test_every_unreadable_torch_file_is_one_clear_sentence(tmp_path):
  torch = pytest.importorskip('torch', reason='torch files need PyTorch')
  cases = {
    'empty.pth': (write_bytes(tmp_path / 'empty.pth', b''), 'is empty'),
    'random.pth': (
      write_bytes(tmp_path / 'random.pth', np.random.default_rng(0).bytes(999)),
      'is not a PyTorch file',
    ),
    'truncated.pth': (
      write_bytes(tmp_path / 'truncated.pth', b'PK\x03\x04' + b'0' * 50),
      'is a damaged PyTorch file',
    ),
  }
  torch.save([1, 2], tmp_path / 'list.pth')
  cases['list.pth'] = (str(tmp_path / 'list.pth'), 'holds a list, not a state dict')
  torch.save({'conv1.weight': 1}, tmp_path / 'ints.pth')
  cases['ints.pth'] = (
    str(tmp_path / 'ints.pth'),
    r'1 entries are not tensors: conv1.weight \(int\)',
  )
  torch.save({'conv1.weight': torch.full((2,), float('nan'))}, tmp_path / 'nan.pth')
  cases['nan.pth'] = (str(tmp_path / 'nan.pth'), 'NaN or infinite weights in 1 tensors')
  for path, message in cases.values():
    with pytest.raises(CheckpointError, match=message):
      backbones.backbone_state_dict(path, 'torchvision')
  # The security refusal stays for files that really pickle other objects.
  torch.save({'x': NotATensor()}, tmp_path / 'code.pth')
  with pytest.raises(CheckpointError, match='Refusing to load'):
    backbones.backbone_state_dict(str(tmp_path / 'code.pth'), 'torchvision')
  # The command line prints the sentence as one `error:` line.
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'msf_jax.interop',
      'export-backbone',
      cases['random.pth'][0],
      str(tmp_path / 'out.pth'),
    ],
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert (
    result.returncode == 1
    and result.stderr.strip().splitlines()[-1].startswith('error: ')
    and 'is not a PyTorch file' in result.stderr
  )


def test_unreadable_safetensors_are_clear_errors(tmp_path):
  for payload, message in ((b'', 'is empty'), (b'\x00' * 64, 'is not a safetensors file')):
    path = write_bytes(tmp_path / 'weights.safetensors', payload)
    with pytest.raises(CheckpointError, match=message):
      backbones.backbone_state_dict(path, 'safetensors')


@pytest.mark.slow  # a ResNet-18 state to create and save
def test_an_msf_jax_checkpoint_with_nan_weights_is_refused(tmp_path):
  from msf_jax import create_state

  config = small_config(image_size=24, small_stem=True, bank_size=16)
  config.model.width = 8
  state = create_state(config, jax.random.key(0))
  online = jax.tree.map(lambda x: x * jnp.nan, state.online)
  checkpointer = Checkpointer(checkpoint.checkpoint_directory(str(tmp_path)))
  checkpointer.save(3, state.replace(online=online))
  checkpointer.wait()
  with pytest.raises(CheckpointError, match='at step 3 has NaN or infinite weights'):
    backbones.backbone_state_dict(str(tmp_path), 'msf_jax')
  assert backbones.backbone_state_dict(str(tmp_path), 'msf_jax', encoder='target')


# --- Config errors before anything is built -------------------------------------------------


@pytest.mark.parametrize(
  'settings, message',
  [
    ({'image_size': 1}, 'image_size=1 is below 8'),
    ({'batch_size': 12}, 'batch_size=12 must be a positive multiple of the 8 devices'),
    ({'msf.bank_size': 1000}, 'msf.bank_size=1000 must be a multiple of batch_size=32'),
    ({'msf.topk': 0}, 'msf.topk=0 must be between 1 and msf.bank_size=1440'),
    ({'msf.topk': 2000}, 'msf.topk=2000 must be between 1'),
    ({'num_epochs': 0}, 'num_epochs=0 must be positive'),
    ({'checkpoint.every_epochs': 0.0}, 'checkpoint.every_epochs=0.0 must be positive'),
    ({'data.pairing': 'x/y'}, "data.pairing='x/y' is not one of w/s, w/w, s/s, s/w"),
    ({'data.crops': 'opencv'}, "data.crops='opencv' is not one of tensorflow, pil"),
    ({'optim.schedule': 'step'}, "optim.schedule='step' is not one of cosine_per_epoch"),
    (
      {'msf.bank_search_dtype': 'float16'},
      "msf.bank_search_dtype='float16' is not one of float32, bfloat16",
    ),
    (
      {'msf.bank_search_dtype': 'bfloat16', 'msf.bank_search_candidates': 10},
      'msf.bank_search_candidates=10 must be more than msf.topk=10',
    ),
    (
      {'msf.bank_search_dtype': 'bfloat16', 'msf.bank_search_candidates': 2000},
      'and at most msf.bank_size=1440',
    ),
    (
      {'msf.bank_layout': 'striped'},
      "msf.bank_layout='striped' is not one of replicated, sharded, auto",
    ),
    ({'model.bn_group_size': 12}, 'model.bn_group_size=12 must divide batch_size=32'),
    (
      {'batch_size': 48, 'model.bn_group_size': 16},
      'divide or be a multiple of the 6 images of a device',
    ),
  ],
)
def test_config_errors_name_the_key_and_what_is_valid(settings, message):
  config = with_settings(load_config(DIGITS), settings)
  errors = training_config_errors(config, device_count=8)
  assert len(errors) == 1 and message in errors[0], errors
  with pytest.raises(ValueError, match='The config cannot train'):
    train_loop.train(config, '/nonexistent/never/created')


def test_every_shipped_training_config_is_sound():
  for name in ('imagenet_msf.py', 'cifar10_msf.py', 'digits_msf.py', 'demo.py'):
    assert training_config_errors(load_config(os.path.join(REPO, 'configs', name)), 8) == []


# --- Undecodable images in evaluation -------------------------------------------------------


@pytest.mark.slow  # an evaluation of an image folder
def test_evaluation_counts_and_names_undecodable_images(tmp_path):
  root = write_folder(tmp_path / 'data', 'train', classes=2, per_class=4, size=(24, 24))
  write_folder(tmp_path / 'data', 'test', classes=2, per_class=3, size=(24, 24), corrupt=1)
  config = load_config(os.path.join(REPO, 'configs', 'eval.py'), 'digits')
  config.model.width = 8
  config.checkpoint_format, config.tasks, config.batch_size = 'random', 'knn', 8
  config.data.source, config.data.root = 'folder', root
  config.knn.ks = (1,)
  run.evaluate(config, str(tmp_path / 'eval'))
  with open(tmp_path / 'eval' / run.RESULTS_FILE) as f:
    record = json.load(f)['undecodable_images']
  assert record[f'{root}/train'] == {'count': 0, 'first': []}
  assert record[f'{root}/test'] == {
    'count': 1,
    'first': [os.path.join(root, 'test', 'class_0', 'broken_0.jpg')],
  }
