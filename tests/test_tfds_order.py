"""The TFDS source's order, on TFDS datasets the tests build in both file formats: every
training epoch a new order (a function of the seed and the epoch), every example once an
epoch over all hosts, and a resume that lands on the next batch (by index, reading nothing
before it, where the files allow random access; TFRecord's reading again at most a file a
lane and one window)."""

import numpy as np
import pytest
import tensorflow as tf

from msf_jax.data import pipeline, sources
from msf_jax.testing import tfds_data

NUM_EXAMPLES, NUM_FILES, BATCH = 512, 8, 8  # 64 batches an epoch
STEPS = NUM_EXAMPLES // BATCH


@pytest.fixture(scope='module', params=('array_record', 'tfrecord'))
def built(request, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp(request.param))
  return tfds_data.build(data_dir, NUM_EXAMPLES, NUM_FILES, request.param), data_dir


def split_of(built):
  name, data_dir = built
  return sources.tfds_split(name, 'train', data_dir=data_dir)


def labels(split, steps, start_step=0):
  """The example indices (labels, see tfds_data) of `steps` training batches [steps, BATCH]."""
  stream = pipeline.train_stream(
    split,
    global_batch=BATCH,
    image_size=8,
    seed=0,
    start_step=start_step,
    process_index=0,
    process_count=1,
  )
  return np.stack([next(stream)['label'] for _ in range(steps)])


def test_every_epoch_is_a_new_order_of_every_example(built):
  epochs = labels(split_of(built), 2 * STEPS).reshape(2, STEPS, BATCH)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(NUM_EXAMPLES))
  alike = tfds_data.order_statistics(*epochs)
  # A fresh permutation: an example moves 1/3 of the epoch on average, and 0.4% of the
  # examples meet two of their batch-mates again; a repeated order: 0 and 100%.
  assert alike['moved_mean'] > 0.25 and alike['met_again'] < 0.05, alike


def test_a_resumed_stream_continues_with_the_next_batch(built):
  split = split_of(built)
  uninterrupted = labels(split, STEPS + 4)
  np.testing.assert_array_equal(labels(split, 6, start_step=STEPS - 2), uninterrupted[-6:])


def test_hosts_share_each_epoch(built):
  split, seed = split_of(built), np.array([5, 1], np.int64)
  shares = [
    [int(x['label']) for x in split.read(p, 2, seed, 0).as_numpy_iterator()] for p in range(2)
  ]
  assert sorted(shares[0] + shares[1]) == list(range(NUM_EXAMPLES))


@pytest.mark.parametrize('built', ['array_record'], indirect=True)
def test_array_record_resume_reads_nothing_before_the_resume_point(built, monkeypatch):
  name, data_dir = built
  import tensorflow_datasets as tfds

  split = split_of(built)
  trained = set(labels(split, STEPS // 2).ravel())  # the first half of epoch 0
  source_type = type(tfds.builder(name, data_dir=data_dir).as_data_source('train'))
  read, original = [], source_type.__getitem__

  def counting_getitem(self, index):
    example = original(self, index)
    read.append(int(example['label']))
    return example

  monkeypatch.setattr(source_type, '__getitem__', counting_getitem)
  resumed = labels(split, 1, start_step=STEPS // 2)
  assert set(resumed.ravel()) <= set(read)
  assert not trained & set(read), 'a resume read examples it had already trained on'


def test_tfrecord_epoch_resumes_exactly_reading_one_file_a_lane_and_one_window_again():
  """Files of unequal lengths as ranges of record numbers, each read from its first record as
  a TFRecord file is: from any position, a resumed epoch is the rest of the uninterrupted one,
  and it reads again at most the lanes' current files and one window."""
  lengths = [int(n) for n in np.random.default_rng(0).integers(5, 40, 21)]
  lanes, window, seed = 8, 50, tf.constant([3, 4], tf.int64)
  read = []
  read_file = tfds_data.record_number_files(lengths, read)

  def epoch(start):
    read.clear()
    records = sources.tfrecord_epoch(lengths, seed, start, read_file, lanes, window)
    return list(records.as_numpy_iterator())

  whole = epoch(0)
  assert sorted(whole) == list(range(sum(lengths)))
  for start in (window - 1, int(0.9 * len(whole)), len(whole) - 1):
    assert epoch(start) == whole[start:], start
    read_again = len(set(read) & set(whole[:start]))
    assert read_again <= min(start, lanes * max(lengths) + window), (start, read_again)
  other_seed = sources.tfrecord_epoch(lengths, seed + 1, 0, read_file, lanes, window)
  assert list(other_seed.as_numpy_iterator()) != whole
