"""Orbax checkpoints: round trip of the MSFState, retention, restore onto another device
count, restore of chosen subtrees, and clear errors for checkpoints of another layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msf_jax import create_state, make_mesh, make_train_step, put_batch, put_replicated, put_state
from msf_jax.checkpoint import (
  Checkpointer,
  CheckpointError,
  checkpoint_directory,
  find_checkpoint_directory,
  resolve_step,
)
from msf_jax.sharding import replicated
from msf_jax.testing import random_batch, small_config
from msf_jax.train_state import abstract_state, state_shardings

from helpers import assert_trees_close

STEPS_PER_EPOCH = 10


def test_restore_of_an_empty_directory_is_none(tmp_path):
  abstract = abstract_state(small_config(), replicated(make_mesh(jax.devices()[:1])))
  assert Checkpointer(str(tmp_path)).restore(abstract) is None


@pytest.mark.slow  # ResNet-18 steps on one and on eight devices
def test_saved_state_restores_exactly_onto_eight_devices_and_trains_on(tmp_path):
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=16)
  one = make_mesh(jax.devices()[:1])
  state = put_replicated(create_state(config, jax.random.key(0)), one)
  train_step = make_train_step(config, one, STEPS_PER_EPOCH, donate=False, finish_views=False)
  rng = np.random.default_rng(0)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2)
  for _ in range(3):
    state, _ = train_step(state, put_batch(random_batch(rng, config), one))
    checkpointer.save(int(state.step), state)
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3

  eight = make_mesh(jax.devices()[:8])
  abstract = abstract_state(config, state_shardings(config, eight))
  restored = Checkpointer(str(tmp_path)).restore(abstract)
  assert_trees_close(restored, state, rtol=0)
  assert restored.bank.embeddings.sharding.mesh.devices.size == 8
  restored_at_2 = Checkpointer(str(tmp_path)).restore(abstract, step=2)
  assert int(restored_at_2.step) == 2
  # The restored state keeps training on the new mesh.
  stepped, metrics = make_train_step(config, eight, STEPS_PER_EPOCH, finish_views=False)(
    restored, put_batch(random_batch(rng, config), eight)
  )
  assert int(stepped.step) == 4 and np.isfinite(float(metrics['loss']))

  # One encoder's backbone alone, as host numpy arrays.
  (params,) = Checkpointer(str(tmp_path)).restore_subtrees(3, [('target', 'params', 'backbone')])
  assert isinstance(params['conv1']['kernel'], np.ndarray)
  assert_trees_close(params, state.target['params']['backbone'], rtol=0)
  with pytest.raises(CheckpointError, match='no online.params.head'):
    Checkpointer(str(tmp_path)).restore_subtrees(3, [('online', 'params', 'head')])


@pytest.mark.slow
def test_a_sharded_bank_saved_on_eight_devices_resumes_on_four_and_on_one(tmp_path):
  """A preempted v4-32 back as a v4-16: the bank's rows come back in the same order, split
  over the new mesh (or whole on one device), and training goes on."""
  config = small_config(image_size=8, small_stem=True, batch_size=16, bank_size=64)
  config.model.width = 8
  eight = make_mesh(jax.devices()[:8])
  state = put_state(create_state(config, jax.random.key(0)), config, eight)
  rng = np.random.default_rng(0)
  bank = state.bank._replace(labels=jnp.arange(64, dtype=jnp.int32), ptr=jnp.int32(48))
  state = put_state(state.replace(bank=bank), config, eight)
  assert state.bank.embeddings.sharding.spec == P('data', None)
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(1, state)
  checkpointer.wait()
  for devices, spec in ((4, P('data', None)), (1, P())):
    mesh = make_mesh(jax.devices()[:devices])
    restored = Checkpointer(str(tmp_path)).restore(
      abstract_state(config, state_shardings(config, mesh))
    )
    assert restored.bank.embeddings.sharding.spec == spec
    assert restored.bank.embeddings.sharding.mesh.devices.size == devices
    assert_trees_close(restored, state, rtol=0)  # the same rows in the same order
    np.testing.assert_array_equal(restored.bank.labels, np.arange(64))
  four = make_mesh(jax.devices()[:4])
  restored = Checkpointer(str(tmp_path)).restore(
    abstract_state(config, state_shardings(config, four))
  )
  stepped, metrics = make_train_step(config, four, STEPS_PER_EPOCH, finish_views=False)(
    restored, put_batch(random_batch(rng, config), four)
  )
  assert int(stepped.bank.ptr) == 0 and np.isfinite(float(metrics['loss']))
  assert (np.asarray(stepped.bank.labels[48:]) < 4).all()  # the batch went to rows 48-63
  np.testing.assert_array_equal(stepped.bank.labels[:48], np.arange(48))


def test_another_layout_or_config_is_a_clear_error_not_a_misload(tmp_path):
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=16)
  state = create_state(config, jax.random.key(0))
  # A checkpoint of the layout before the bank became one MemoryBank field.
  old_layout = {
    'step': state.step,
    'online_params': state.online['params'],
    'bank': state.bank.embeddings,
    'bank_labels': state.bank.labels,
    'bank_ptr': state.bank.ptr,
    'rng': jnp.zeros((2,), jnp.uint32),
  }
  checkpointer = Checkpointer(str(tmp_path / 'old'))
  checkpointer.save(7, old_layout)
  checkpointer.wait()
  with pytest.raises(
    CheckpointError,
    match=r'another version of msf_jax: its fields bank, '
    r'bank_labels, bank_ptr, online, online_params, opt_state, predictor, rng, '
    r'target differ',
  ):
    Checkpointer(str(tmp_path / 'old')).restore(abstract_state(config))

  checkpointer = Checkpointer(str(tmp_path / 'other_bank'))
  checkpointer.save(1, state)
  checkpointer.wait()
  config.msf.bank_size = 32
  with pytest.raises(CheckpointError, match=r'bank.embeddings is float32\[16, 128\] there'):
    Checkpointer(str(tmp_path / 'other_bank')).restore(abstract_state(config))
  config.msf.bank_size, config.model.depth = 16, 34
  with pytest.raises(
    CheckpointError,
    match=r'other online, opt_state, target trees than the '
    r'config builds \(e.g. online.batch_stats.backbone.layer1_2',
  ):
    Checkpointer(str(tmp_path / 'other_bank')).restore(abstract_state(config))


def test_checkpoint_directories_of_a_workdir(tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(FileNotFoundError, match='training workdir'):
    find_checkpoint_directory(str(workdir))
  checkpointer = Checkpointer(checkpoint_directory(str(workdir)))
  checkpointer.save(4, {'x': jnp.ones(2)})
  checkpointer.save(9, {'x': jnp.ones(2)})
  checkpointer.wait()
  directory = find_checkpoint_directory(str(workdir))
  assert directory == str(workdir / 'checkpoints')
  assert find_checkpoint_directory(directory) == directory
  assert resolve_step(directory) == 9 and resolve_step(directory, 4) == 4
  with pytest.raises(CheckpointError, match=r'no step 5; it has steps \[4, 9\]'):
    resolve_step(directory, 5)
  (tmp_path / 'file').write_text('')
  with pytest.raises(CheckpointError, match='is a file'):
    find_checkpoint_directory(str(tmp_path / 'file'))


def test_cloud_storage_directories_stay_urls(tmp_path, monkeypatch):
  from msf_jax.checkpoint import manager_directory

  monkeypatch.chdir(tmp_path)
  assert manager_directory('gs://bucket/runs/msf') == 'gs://bucket/runs/msf'
  assert manager_directory('runs/msf') == str(tmp_path / 'runs' / 'msf')
