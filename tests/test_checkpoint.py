"""Orbax checkpoints of MSFState: round trip, retention, restore onto another device count."""

import jax
import numpy as np

from msf_jax import create_state, make_mesh, make_train_step, put_batch, put_replicated
from msf_jax.checkpoint import Checkpointer

from helpers import assert_trees_close, random_batch, small_config


def test_restore_of_an_empty_directory_is_none(tmp_path):
  assert Checkpointer(str(tmp_path)).restore(small_config(), make_mesh(jax.devices()[:1])) is None


def test_saved_state_restores_exactly_onto_eight_devices_and_trains_on(tmp_path):
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=16)
  one = make_mesh(jax.devices()[:1])
  state = put_replicated(create_state(config, jax.random.key(0)), one)
  train_step = make_train_step(config, one, donate=False)
  rng = np.random.default_rng(0)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2)
  for _ in range(3):
    state, _ = train_step(state, put_batch(random_batch(rng, config), one))
    checkpointer.save(state)
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3

  eight = make_mesh(jax.devices()[:8])
  restored = Checkpointer(str(tmp_path)).restore(config, eight)
  assert_trees_close(restored, state, rtol=0)
  assert restored.bank.sharding.mesh.devices.size == 8
  restored_at_2 = Checkpointer(str(tmp_path)).restore(config, eight, step=2)
  assert int(restored_at_2.step) == 2
  # The restored state keeps training on the new mesh.
  stepped, metrics = make_train_step(config, eight)(restored, put_batch(random_batch(rng, config),
                                                                        eight))
  assert int(stepped.step) == 4 and np.isfinite(float(metrics['loss']))


def test_cloud_storage_directories_stay_urls(tmp_path, monkeypatch):
  from msf_jax.checkpoint import manager_directory
  monkeypatch.chdir(tmp_path)
  assert manager_directory('gs://bucket/runs/msf') == 'gs://bucket/runs/msf'
  assert manager_directory('runs/msf') == str(tmp_path / 'runs' / 'msf')
