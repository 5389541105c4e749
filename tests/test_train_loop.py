"""The training loop keeps the device busy: between log points it never reads a device value,
so the host runs ahead and the next step is queued while the current one computes."""

import jax.numpy as jnp
import pytest

from msf_jax import load_config, train_loop

from helpers import REPO, write_folder


def device_reads_by_step(monkeypatch, config, workdir):
  """Trains; returns how many steps had been dispatched at each read of a device value.

  Every way to read a jax.Array on the host (float(), np.asarray, jax.device_get, printing)
  goes through the array type's `_value`; counting its calls counts the host's waits on the
  device. (jax.transfer_guard cannot tell: on the CPU nothing is transferred.)"""
  array_type = type(jnp.zeros(()))
  value = array_type.__dict__['_value']
  dispatched, reads = [0], []

  def counted_value(array):
    reads.append(dispatched[0])
    return value.fget(array)

  make_train_step = train_loop.make_train_step

  def counting_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def train_step(state, batch):
      dispatched[0] += 1
      return step(state, batch)

    return train_step

  monkeypatch.setattr(array_type, '_value', property(counted_value))
  monkeypatch.setattr(train_loop, 'make_train_step', counting_step)
  train_loop.train(config, str(workdir))
  return dispatched[0], reads


@pytest.mark.slow
def test_the_loop_reads_the_device_only_at_log_and_checkpoint_steps(monkeypatch, tmp_path):
  root = write_folder(tmp_path / 'images', 'train', classes=2, per_class=12, size=(30, 30))
  config = load_config(f'{REPO}/configs/digits_msf.py')
  config.data.source, config.data.root = 'folder', str(root)
  config.batch_size, config.msf.bank_size = 8, 32  # 3 steps an epoch
  config.model.width = 8  # what is read when does not depend on the width
  config.num_epochs, config.log_every_epochs = 4, 2  # logs at steps 6 and 12
  config.checkpoint.every_epochs = 4  # one checkpoint, at the end
  config.monitor.knn_every_epochs = 0
  steps, reads = device_reads_by_step(monkeypatch, config, tmp_path / 'run')
  assert steps == 12
  # Before the first step (restore, the views picture) and at the log and final steps only.
  assert reads and set(reads) <= {0, 6, 12}, sorted(set(reads))


class _SavedMetadata:
  """A checkpointer whose checkpoint at any step holds `metadata`."""

  def __init__(self, metadata):
    self.metadata = metadata

  def read_metadata(self, step):
    return self.metadata


def test_a_resume_takes_its_process_position_or_says_why_it_cannot(caplog):
  two_processes = {train_loop.STREAM_METADATA: {'slots': [40, 41], 'skipped': [2, 3]}}
  assert train_loop._saved_stream_position(_SavedMetadata({}), 5) is None  # an older one
  one_process = {train_loop.STREAM_METADATA: {'slots': [41], 'skipped': [1]}}
  position = train_loop._saved_stream_position(_SavedMetadata(one_process), 5)
  assert (position.slot, position.skipped) == (41, 1)
  assert train_loop._saved_stream_position(_SavedMetadata(two_processes), 5) is None
  assert 'written by 2 processes and this run has 1' in caplog.text
