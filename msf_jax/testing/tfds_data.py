"""Small TFDS datasets built on the spot, in either of TFDS's file formats, for the tests and
benchmarks of the TFDS source: nothing is downloaded. The label of example i is i, so that a
batch's labels tell which examples it holds and in what order."""

import numpy as np
import tensorflow as tf

NAME = 'msf_indexed'  # the builder's name; its config is the file format


def build(
  data_dir: str,
  num_examples: int,
  num_shards: int,
  file_format: str,
  image_size: int = 8,
  quality: int = 90,
) -> str:
  """Writes `num_examples` random JPEG images of `image_size` px in `num_shards` files of
  `file_format` ('array_record' or 'tfrecord') under `data_dir`; returns the name that
  `tfds.builder(name, data_dir=data_dir)` and `sources.tfds_split` take."""
  import tensorflow_datasets as tfds

  images = np.random.default_rng(0).integers(
    0, 256, (num_examples, image_size, image_size, 3), np.uint8
  )
  examples = tf.data.Dataset.from_tensor_slices(
    {'image': images, 'label': np.arange(num_examples, dtype=np.int64)}
  )
  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(image_size, image_size, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(num_classes=num_examples),
    }
  )
  builder = tfds.dataset_builders.TfDataBuilder(
    name=NAME,
    config=file_format,
    version='1.0.0',
    data_dir=data_dir,
    split_datasets={'train': examples},
    features=features,
    file_format=file_format,
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return f'{NAME}/{file_format}'


def order_statistics(previous: np.ndarray, current: np.ndarray) -> dict[str, float]:
  """[steps, batch] example indices of two epochs -> how alike their orders are: the fraction
  of examples whose batch holds two or more of its batch-mates of the epoch before, and how
  far an example moves (a fraction of the epoch: mean, median, 10th percentile)."""
  num_examples, size = previous.size, max(previous.max(), current.max()) + 1
  batch_of = np.full(size, -1)  # an example's batch in the epoch before, -1 if dropped
  batch_of[previous.ravel()] = np.repeat(np.arange(len(previous)), previous.shape[1])
  # a key per (batch now, batch before): examples sharing a key are batch-mates in both
  before = batch_of[current]
  keys = np.arange(len(current))[:, None] * (len(previous) + 1) + before + 1
  _, group, group_size = np.unique(keys.ravel(), return_inverse=True, return_counts=True)
  met = (group_size[group] - 1 >= 2)[before.ravel() >= 0]
  position = np.full((2, size), -1)
  position[0, previous.ravel()] = np.arange(num_examples)
  position[1, current.ravel()] = np.arange(num_examples)
  in_both = (position >= 0).all(axis=0)  # the dropped remainders differ between epochs
  moved = np.abs(position[1] - position[0])[in_both] / num_examples
  return {
    'met_again': float(np.mean(met)),
    'moved_mean': float(moved.mean()),
    'moved_median': float(np.median(moved)),
    'moved_p10': float(np.quantile(moved, 0.1)),
  }


def record_number_files(lengths: list[int], read: list[int] | None = None):
  """A `sources.FileReader` over files of `lengths` records that yields record numbers (file
  i's follow file i-1's), so that an order can be checked or measured without images. With
  `read`, each file is read from its first record, as a TFRecord file is, and every record
  read is appended to `read`; without, it yields only the records asked for, fast."""
  first_record = tf.constant(np.concatenate([[0], np.cumsum(lengths)]), tf.int64)

  def read_file(file, first, count):
    file_start = tf.gather(first_record, file)
    if read is None:
      return tf.data.Dataset.range(file_start + first, file_start + first + count)
    records = tf.data.Dataset.range(file_start, file_start + first + count)
    return records.map(lambda r: tf.py_function(note, [r], tf.int64)).skip(first)

  def note(record):
    assert read is not None
    read.append(int(record))
    return record

  return read_file
