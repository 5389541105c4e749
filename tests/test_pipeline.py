"""Sources and tf.data pipelines: determinism, per-host shares, padding, bad data."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from msf_jax import make_mesh
from msf_jax.data import pipeline, sources

from helpers import write_folder


def take(stream, n):
  return [batch for _, batch in zip(range(n), stream, strict=False)]  # stream: endless


def test_digits_split_is_fixed_and_real():
  train, test = sources.digits('train', 24), sources.digits('test', 24)
  assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
  first = next(iter(test.read(0, 1, None, 0)))
  image = tf.io.decode_png(first['image']).numpy()
  assert image.shape == (24, 24, 3) and image.max() > 100  # a real, upsampled digit
  with pytest.raises(sources.DatasetNotFoundError, match="'train' and 'test'"):
    sources.digits('validation')


def test_same_seed_same_batches_and_resume_is_exact():
  split = sources.digits('train', 16)
  make = lambda start=0, seed=3: pipeline.train_stream(
    split,
    global_batch=32,
    image_size=16,
    seed=seed,
    start_step=start,
    process_index=0,
    process_count=1,
  )
  first = take(make(), 4)
  again = take(make(), 4)
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  resumed = take(make(start=2), 2)
  for a, b in zip(first[2:], resumed, strict=True):
    np.testing.assert_array_equal(a['online'], b['online'])
  other = take(make(seed=4), 1)[0]
  assert not np.allclose(other['online'], first[0]['online'])
  batch = first[0]
  assert batch['online'].shape == batch['target'].shape == (32, 16, 16, 3)
  assert not np.allclose(batch['online'], batch['target'])  # two independent views


def test_pil_crops_reach_the_views_and_are_seeded():
  """train_stream(crops='pil') hands two_views its choice: uint8 views of the size asked, the
  same for a seed, and not TensorFlow's crops (PIL draws its windows otherwise)."""
  split = sources.digits('train', 16)
  make = lambda crops='pil': pipeline.train_stream(
    split, global_batch=8, image_size=16, seed=3, process_index=0, process_count=1, crops=crops
  )
  first, again, tensorflow = next(make()), next(make()), next(make('tensorflow'))
  assert first['online'].dtype == first['target'].dtype == np.uint8
  assert first['online'].shape == first['target'].shape == (8, 16, 16, 3)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  np.testing.assert_array_equal(first['label'], tensorflow['label'])
  assert not np.array_equal(first['online'], tensorflow['online'])


def test_shuffled_target_views_are_the_same_views_permuted_with_their_order():
  """Each host batch's target views and colours permuted, the online views and labels
  unchanged, 'target_order' putting them back; another permutation at each step and on each
  host, the same on a resumed stream."""
  split = sources.digits('train', 8)
  make = lambda shuffle, start=0, process=0: take(
    pipeline.train_stream(
      split,
      global_batch=32,
      image_size=8,
      seed=3,
      start_step=start,
      process_index=process,
      process_count=2,
      shuffle_target=shuffle,
    ),
    2,
  )
  plain, shuffled = make(False), make(True)
  for a, b in zip(plain, shuffled, strict=True):
    for key in ('online', 'online_color', 'label'):
      np.testing.assert_array_equal(b[key], a[key])
    order = b['target_order']
    assert order.dtype == np.int32 and sorted(order) == list(range(16))
    for key in ('target', 'target_color'):
      np.testing.assert_array_equal(b[key][order], a[key])
  orders = [batch['target_order'] for batch in shuffled + make(True, process=1)]
  assert all((x != orders[0]).any() for x in orders[1:])
  np.testing.assert_array_equal(make(True, start=1)[0]['target_order'], orders[1])
  spec = pipeline.train_batch_spec(32, 8, shuffle_target=True)['target_order']
  assert (spec.shape, spec.dtype) == ((32,), np.int32)


def test_an_epoch_reads_every_example_once_across_hosts():
  split = sources.digits('train', 8)
  global_batch, hosts = 64, 2
  steps = pipeline.steps_per_epoch(split, global_batch)
  seen = []
  for p in range(hosts):
    stream = pipeline.train_stream(
      split, global_batch=global_batch, image_size=8, seed=0, process_index=p, process_count=hosts
    )
    hashed = stream.dataset.unbatch().map(lambda x: x['slot']).take(steps * 32)
    seen.append(list(hashed.as_numpy_iterator()))
  # Each host's slots cover its share once; the shares come from one permutation.
  assert all(sorted(s) == list(range(steps * 32)) for s in seen)
  # The hosts' shares of one epoch's permutation are disjoint and cover the split.
  read = lambda p, count, seed: sorted(
    x['image'] for x in split.read(p, count, seed, 0).as_numpy_iterator()
  )
  epoch_seed = tf.constant([0, 1], tf.int64)
  shares = [read(p, hosts, epoch_seed) for p in range(hosts)]
  assert sorted(shares[0] + shares[1]) == read(0, 1, None)


def image_digest(image: np.ndarray) -> str:
  return hashlib.sha1(np.round(image, 3).tobytes()).hexdigest()


def eval_digests(split, global_batch, process_count):
  digests, batches = [], set()
  for p in range(process_count):
    dataset, num_batches = pipeline.eval_batches(
      split, global_batch=global_batch, image_size=16, process_index=p, process_count=process_count
    )
    count = 0
    for batch in dataset.as_numpy_iterator():
      count += 1
      assert len(batch['mask']) == global_batch // process_count
      digests += [image_digest(x) for x, m in zip(batch['image'], batch['mask'], strict=True) if m]
    assert count == num_batches
    batches.add(count)
  assert len(batches) == 1  # every host runs the same number of steps
  return sorted(digests)


def test_eval_counts_each_image_once_over_two_processes_and_eight_devices(tmp_path):
  split = sources.image_folder(write_folder(tmp_path, 'val', classes=3, per_class=9), 'val')
  assert split.num_examples == 27  # divides neither the batch nor the processes
  one_host = eval_digests(split, global_batch=8, process_count=1)
  two_hosts = eval_digests(split, global_batch=16, process_count=2)
  assert len(one_host) == 27 and one_host == two_hosts
  # On one process with 8 devices a batch becomes one global array split over the mesh.
  mesh = make_mesh(jax.devices()[:8])
  dataset, _ = pipeline.eval_batches(
    split, global_batch=16, image_size=16, process_index=0, process_count=1
  )
  batch = pipeline.to_global(next(dataset.as_numpy_iterator()), mesh)
  assert batch['image'].shape == (16, 16, 16, 3)
  assert len(batch['image'].addressable_shards) == 8


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
  root = write_folder(tmp_path, classes=2, per_class=6, corrupt=1)
  split = sources.image_folder(root, 'train')
  assert split.num_examples == 13
  stream = pipeline.train_stream(
    split, global_batch=4, image_size=16, seed=0, process_index=0, process_count=1
  )
  take(stream, 3)  # one epoch: 12 of 13 slots, in which the broken file is or is not
  # Over several epochs the broken file is drawn and skipped: counted, never a crash.
  take(stream, 12)
  assert stream.skipped >= 1 and stream.next_slot == 15 * 4 + stream.skipped
  broken = os.path.join(root, 'train', 'class_0', 'broken_0.jpg')
  assert stream.pop_skipped_names() == [broken] * min(stream.skipped, 5)
  assert stream.pop_skipped_names() == []  # reported once
  dataset, _ = pipeline.eval_batches(
    split, global_batch=4, image_size=16, process_index=0, process_count=1
  )
  batches = list(dataset.as_numpy_iterator())
  assert sum(int(b['mask'].sum()) for b in batches) == 12
  read = {int(p) for b in batches for p in b['position'][b['mask']]}
  (missing,) = set(range(13)) - read
  assert split.name_at(0, 1, None, missing) == broken


def test_a_stream_resumed_at_its_saved_position_reads_what_the_uninterrupted_one_does(tmp_path):
  split = sources.image_folder(write_folder(tmp_path, classes=2, per_class=6, corrupt=2), 'train')
  make = lambda **resume: pipeline.train_stream(
    split, global_batch=4, image_size=16, seed=1, process_index=0, process_count=1, **resume
  )
  uninterrupted = make()
  batches = take(uninterrupted, 8)
  assert uninterrupted.skipped > 0  # the broken files were drawn before step 5
  saved = uninterrupted.position_after(5)
  resumed = make(start_step=5, start_position=saved)
  for a, b in zip(batches[5:], take(resumed, 3), strict=True):
    np.testing.assert_array_equal(a['online'], b['online'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert (resumed.next_slot, resumed.skipped) == (uninterrupted.next_slot, uninterrupted.skipped)
  with pytest.raises(ValueError, match='no position for step 0'):  # it keeps the last 8
    uninterrupted.position_after(0)


def test_every_split_of_a_folder_numbers_its_classes_like_the_training_split(tmp_path):
  root = write_folder(tmp_path, 'train', classes=3, per_class=2)
  write_folder(tmp_path, 'test', classes=3, per_class=2)
  shutil.rmtree(os.path.join(root, 'test', 'class_0'))  # the test split lacks a class
  os.makedirs(os.path.join(root, 'train', 'empty'))  # an empty folder is no class
  train, test = sources.image_folder(root, 'train'), sources.image_folder(root, 'test')
  assert train.num_classes == test.num_classes == 3
  labels = sorted(int(x['label']) for x in test.read(0, 1, None, 0).as_numpy_iterator())
  assert labels == [1, 1, 2, 2]  # class_1 and class_2 keep the training split's indices
  assert sources.image_folder(root, 'test', classes=['class_2', 'class_1']).num_classes == 2
  os.makedirs(os.path.join(root, 'test', 'extra'))
  write_folder(tmp_path, 'test', classes=1, per_class=1)  # refills class_0
  Image.new('RGB', (8, 8)).save(os.path.join(root, 'test', 'extra', 'x.png'))
  with pytest.raises(
    sources.DatasetNotFoundError,
    match=r'test/extra is a class that .*/train '
    r'does not have',
  ):
    sources.image_folder(root, 'test')


def test_missing_or_empty_splits_are_clear_errors(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match='class'):
    sources.image_folder(str(tmp_path), 'train')
  os.makedirs(tmp_path / 'train' / 'cats')
  with pytest.raises(sources.DatasetNotFoundError, match='no .jpg'):
    sources.image_folder(str(tmp_path), 'train')


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(
    sources.DatasetNotFoundError, match='python -m msf_jax.data.prepare imagenet2012 --data_dir='
  ):
    sources.tfds_split('imagenet2012', 'train', data_dir=str(tmp_path))


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12):
    split = sources.tfds_split('imagenet2012', 'train')
    assert (split.num_examples, split.num_classes) == (12, 1000)
    stream = pipeline.train_stream(
      split, global_batch=4, image_size=24, seed=0, process_index=0, process_count=1
    )
    batch = take(stream, 1)[0]
    assert batch['online'].shape == (4, 24, 24, 3) and batch['label'].dtype == np.int32


def test_tensorflow_sees_no_accelerator():
  pipeline.hide_accelerators_from_tensorflow()
  assert tf.config.get_visible_devices('GPU') == []


def test_take_reads_the_first_examples_once_over_hosts(tmp_path):
  split = sources.digits('test', 8)
  subset = sources.take(split, 7)
  assert subset.num_examples == 7 and subset.name == 'digits/test[:7]'
  first_seven = sorted(x['image'] for x in split.read(0, 1, None, 0).take(7).as_numpy_iterator())
  over_three_hosts = sorted(
    x['image'] for p in range(3) for x in subset.read(p, 3, None, 0).as_numpy_iterator()
  )
  assert over_three_hosts == first_seven
  assert sources.take(split, 10_000) is split
  resumed = list(subset.read(0, 1, None, 5).as_numpy_iterator())
  assert len(resumed) == 2


def test_prepare_names_missing_archives_first_and_builds_through_the_tfds_api(
  tmp_path, monkeypatch, capsys
):
  from msf_jax.data import prepare

  assert prepare.main(['imagenet2012', f'--data_dir={tmp_path}']) == 1
  assert 'ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar' in capsys.readouterr().err
  built = []

  class Builder:
    info = type('Info', (), {'splits': {'train': type('S', (), {'num_examples': 3})()}})()

    def __init__(self, name, data_dir, file_format):
      built.append((name, data_dir, file_format))

    def download_and_prepare(self, download_config):
      built.append(download_config.manual_dir)

  import tensorflow_datasets as tfds

  monkeypatch.setattr(tfds, 'builder', Builder)
  assert prepare.main(['cifar10', f'--data_dir={tmp_path}']) == 0
  assert built == [
    ('cifar10', str(tmp_path), 'array_record'),
    str(tmp_path / 'downloads' / 'manual'),
  ]
  assert 'cifar10 is in' in capsys.readouterr().out


def test_prefetch_places_the_next_batch_before_the_current_one_is_used():
  mesh = make_mesh(jax.devices()[:2])
  read = []

  def source():
    for index in range(4):
      read.append(index)
      yield {'x': np.full((4, 2), index, np.float32)}

  placed = pipeline.prefetch_to_mesh(source(), mesh, depth=2)
  for index in range(4):
    batch = next(placed)
    assert read[-1] == min(index + 1, 3)  # one batch ahead of the one handed out
    assert isinstance(batch['x'], jax.Array) and len(batch['x'].sharding.device_set) == 2
    np.testing.assert_array_equal(batch['x'], np.full((4, 2), index))
  assert next(placed, None) is None
