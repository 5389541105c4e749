"""Where images come from: TFDS datasets, image folders, and the digits that scikit-learn ships.

A `Split` reads encoded images (bytes) and integer labels for one process of a multi-host
job, in an order fixed by a seed, so that the pipeline can decode, crop and augment in one
place whatever the source.
"""

import dataclasses
import io
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from msf_jax.data import SOURCES, prepare

# (process_index, process_count, shuffle seed [2] int64 tensor or None, start position)
#   -> {'image': bytes, 'label': int32} of this process's share, from `start` on.
Reader = Callable[[int, int, tf.Tensor | None, tf.Tensor | int], tf.data.Dataset]
# (process_index, process_count, shuffle seed or None, position) -> the name (a file path,
# an index) of the example a read with these arguments yields at `position`.
Namer = Callable[[int, int, tf.Tensor | None, int], str]
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
DIGITS_TRAIN_EXAMPLES = 1437  # of 1,797; the rest (360) is the test split
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
  """A dataset or split that is not where the config says, with how to prepare it."""


@dataclasses.dataclass(frozen=True)
class Split:
  """`name_at`, where a source can tell, names the example at a position of a read, so that
  an image that cannot be decoded is reported by its file, not only counted."""

  name: str
  num_examples: int
  num_classes: int
  read: Reader
  name_at: Namer | None = None


def _order(
  num_examples: int, process_index: int, process_count: int, shuffle_seed: tf.Tensor | None
) -> tf.Tensor:
  """The indices a process reads: a seeded permutation (or the stored order), of which
  process p takes every process_count-th, from position p."""
  indices = tf.range(num_examples, dtype=tf.int64)
  if shuffle_seed is not None:
    indices = tf.random.experimental.stateless_shuffle(indices, shuffle_seed)
  return indices[process_index::process_count]


def _indexed_reader(num_examples: int, lookup: Callable[[tf.Tensor], dict]) -> Reader:
  """A reader for random-access sources. Starting late skips indices, not reads."""

  def read(process_index, process_count, shuffle_seed, start=0):
    indices = _order(num_examples, process_index, process_count, shuffle_seed)[start:]
    return tf.data.Dataset.from_tensor_slices(indices).map(
      lookup, num_parallel_calls=tf.data.AUTOTUNE
    )

  return read


def _indexed_namer(num_examples: int, name_of_index: Callable[[int], str]) -> Namer:
  def name_at(process_index, process_count, shuffle_seed, position):
    order = _order(num_examples, process_index, process_count, shuffle_seed)
    return name_of_index(int(order[position]))

  return name_at


# --- scikit-learn digits --------------------------------------------------------------------


def _encode_png(image: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def digits(split: str, image_size: int = 32) -> Split:
  """The UCI handwritten digits shipped with scikit-learn: 1,797 real 8x8 grey images of 10
  classes, served as RGB PNGs of `image_size` px (PIL bilinear upsampling). The split is a
  fixed permutation (seed 0): the first 1,437 images are 'train', the other 360 'test'."""
  from PIL import Image
  from sklearn.datasets import load_digits

  data = load_digits()
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(data.images))
  chosen = {'train': order[:DIGITS_TRAIN_EXAMPLES], 'test': order[DIGITS_TRAIN_EXAMPLES:]}
  if split not in chosen:
    raise DatasetNotFoundError(f"The digits dataset has splits 'train' and 'test', not {split!r}.")
  encoded, labels = [], []
  for i in chosen[split]:
    grey = Image.fromarray(np.round(data.images[i] * 255 / 16).astype(np.uint8))
    rgb = grey.resize((image_size, image_size), Image.Resampling.BILINEAR).convert('RGB')
    encoded.append(_encode_png(np.asarray(rgb)))
    labels.append(data.target[i])
  images = tf.constant(encoded)
  label_table = tf.constant(np.asarray(labels, np.int32))
  lookup = lambda i: {'image': tf.gather(images, i), 'label': tf.gather(label_table, i)}
  names = [f'digits/{split}[{i}]' for i in range(len(encoded))]
  return Split(
    f'digits/{split}',
    len(encoded),
    10,
    _indexed_reader(len(encoded), lookup),
    _indexed_namer(len(names), names.__getitem__),
  )


# --- Image folders --------------------------------------------------------------------------


def _images_by_class(split_dir: str) -> dict[str, list[str]]:
  """{class folder: its image paths, sorted}; folders without an image are left out with a
  warning (an empty folder is no class)."""
  if not tf.io.gfile.isdir(split_dir):
    raise DatasetNotFoundError(
      f'No folder {split_dir}: an image-folder dataset needs <root>/<split>/<class>/<image>.'
    )
  images = {}
  for name in sorted(
    d.rstrip('/')
    for d in tf.io.gfile.listdir(split_dir)
    if tf.io.gfile.isdir(os.path.join(split_dir, d))
  ):
    files = sorted(
      f
      for f in tf.io.gfile.listdir(os.path.join(split_dir, name))
      if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if files:
      images[name] = [os.path.join(split_dir, name, f) for f in files]
    else:
      logging.warning(
        'Skipping the class folder %s: it holds no %s image.',
        os.path.join(split_dir, name),
        '/'.join(IMAGE_EXTENSIONS),
      )
  return images


def image_folder(
  root: str, split: str, classes: Sequence[str] | None = None, class_split: str = 'train'
) -> Split:
  """`root/<split>/<class>/<image>` (JPEG or PNG). Labels index `classes`, by default the
  sorted non-empty class folders of `class_split` (the split's own where there is no such
  folder), so that every split of a dataset numbers its classes alike, whichever of them it
  has; a class folder that the list lacks is an error that names it."""
  split_dir = os.path.join(root, split)
  images = _images_by_class(split_dir)
  class_dir = os.path.join(root, class_split)
  if classes is None:  # a folder without a training split numbers its own classes
    own = split == class_split or not tf.io.gfile.isdir(class_dir)
    classes = list(images if own else _images_by_class(class_dir))
  classes = list(classes)
  unknown = sorted(set(images) - set(classes))
  if unknown:
    raise DatasetNotFoundError(
      f'{os.path.join(split_dir, unknown[0])} is a class that {root}/{class_split} does not '
      f'have ({len(unknown)} such folders: {", ".join(unknown[:5])}): labels would not '
      'match between splits. Add it to the training split, remove it, or give the class list.'
    )
  paths, labels = [], []
  for label, name in enumerate(classes):
    paths += images.get(name, [])
    labels += [label] * len(images.get(name, []))
  if not paths:
    raise DatasetNotFoundError(
      f'The split {split_dir} has no {"/".join(IMAGE_EXTENSIONS)} images in class folders.'
    )
  path_table, label_table = tf.constant(paths), tf.constant(np.asarray(labels, np.int32))
  lookup = lambda i: {
    'image': tf.io.read_file(tf.gather(path_table, i)),
    'label': tf.gather(label_table, i),
  }
  return Split(
    f'{root}/{split}',
    len(paths),
    len(classes),
    _indexed_reader(len(paths), lookup),
    _indexed_namer(len(paths), paths.__getitem__),
  )


# --- TFDS -----------------------------------------------------------------------------------

_MANUAL_DOWNLOADS = {
  'imagenet2012': (
    'ImageNet needs a manual download. Get ILSVRC2012_img_train.tar and '
    'ILSVRC2012_img_val.tar from https://image-net.org (an account is required), put them '
    'in {data_dir}/downloads/manual/, then build the TFDS files once with\n'
    '  {command}\n'
    '(about 150 GB of disk). On a TPU VM, build once and copy {data_dir} to a gs:// '
    'bucket, then set config.data.data_dir to it.'
  ),
}
# TFRecord files have no index. A training epoch deals the files, in an order drawn from the
# seed, to up to this many lanes read one record from each in turn, and shuffles each window of
# this many consecutive records: a resume reads again only each lane's current file up to its
# place and the window it lands in (`tfrecord_epoch`). A lane takes at least
# TFRECORD_FILES_PER_LANE files, so that a host's few files (one of many hosts) still resume
# without reading most of what they hold.
TFRECORD_LANES = 64
TFRECORD_FILES_PER_LANE = 4
TFRECORD_WINDOW = 10_000

# (file, first record, records) -> those records of that file, reading it from its start.
FileReader = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.data.Dataset]


def _round_at(lane_lengths: tf.Tensor, position: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(r, extra): the last round r of the lanes' round robin (one record from each lane that
  has one left) that starts at or before stream `position`, and `position` minus its start."""
  rounds = tf.range(tf.reduce_max(lane_lengths) + 1, dtype=tf.int64)
  starts = tf.reduce_sum(tf.minimum(rounds[:, None], lane_lengths[None, :]), axis=1)
  r = tf.reduce_sum(tf.cast(starts <= position, tf.int64)) - 1
  return r, position - starts[r]


def tfrecord_lanes(num_files: int, most: int = TFRECORD_LANES) -> int:
  """The lanes a share of `num_files` TFRecord files is read in (`tfrecord_epoch`)."""
  return max(1, min(most, num_files // TFRECORD_FILES_PER_LANE))


def _lane_pieces(counts: tf.Tensor, lanes: int, rotation_seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
  """[pieces a lane, lanes] grids (file position, first record, records) of each lane's files
  in turn: position i goes to lane i % lanes, and each lane starts at a random record of its
  first file and ends with that file's beginning. Without the rotation, every lane would be
  at the same record of its file when a window closes, and the files read side by side would
  meet again, at the same records, whenever the seeded order deals them into one window."""
  num_files = int(counts.shape[0])
  rows = -(-num_files // lanes)
  grid = lambda values: tf.reshape(tf.pad(values, [[0, rows * lanes - num_files]]), [rows, lanes])
  positions, records = grid(tf.range(num_files, dtype=tf.int64)), grid(counts)
  rotation = tf.cast(
    tf.random.stateless_uniform([lanes], rotation_seed) * tf.cast(records[0], tf.float32), tf.int64
  )
  first = tf.concat([rotation[None], tf.zeros_like(records[1:])], axis=0)
  return (
    tf.concat([positions, positions[:1]], axis=0),
    tf.concat([first, tf.zeros_like(rotation)[None]], axis=0),
    tf.concat([records - first, rotation[None]], axis=0),
  )


def tfrecord_epoch(
  file_lengths: Sequence[int],
  shuffle_seed: tf.Tensor,
  start: tf.Tensor | int,
  read_file: FileReader,
  lanes: int = TFRECORD_LANES,
  window: int = TFRECORD_WINDOW,
) -> tf.data.Dataset:
  """One training epoch of files read in sequence only, from position `start` on: a function
  of the seed alone, different every epoch.

  The files (of `file_lengths` records) are dealt in a seeded order to `lanes` lanes (fewer
  where there are not TFRECORD_FILES_PER_LANE files a lane: `tfrecord_lanes`), each
  lane rotated to start at a random record of its first file (`_lane_pieces`); the stream
  takes one record from each lane in turn; each window of `window` consecutive records of the
  stream is shuffled (seeded by the window's index). Records of one file end up in the same
  window as their neighbours (about window / lanes of them), not as a full permutation
  would. The lanes' places at any position are arithmetic on the lengths, so a resume opens
  each lane's current file and skips to its place, and reads the window from its start: at
  most one file a lane and one window again, not everything before `start`.
  """
  num_files, lanes = len(file_lengths), tfrecord_lanes(len(file_lengths), lanes)
  order_seed, rotation_seed, window_seed = tf.unstack(
    tf.random.experimental.stateless_split(shuffle_seed, 3)
  )
  start = tf.cast(start, tf.int64)
  order = tf.random.experimental.stateless_shuffle(tf.range(num_files, dtype=tf.int64), order_seed)
  positions, firsts, counts = _lane_pieces(
    tf.gather(tf.constant(file_lengths, tf.int64), order), lanes, rotation_seed
  )
  lane_lengths = tf.reduce_sum(counts, axis=0)
  window_start = start // window * window
  r, extra = _round_at(lane_lengths, window_start)
  # records each piece has given when the round robin reaches round r
  given = tf.clip_by_value(
    tf.minimum(lane_lengths, r) - tf.cumsum(counts, exclusive=True), 0, counts
  )

  def lane(index):
    pieces = (
      tf.gather(order, positions[:, index]),
      firsts[:, index] + given[:, index],
      counts[:, index] - given[:, index],
    )
    return (
      tf.data.Dataset.from_tensor_slices(pieces)
      .filter(lambda file, first, left: left > 0)
      .flat_map(read_file)
    )

  def shuffled(index, records):
    seed = tf.random.experimental.stateless_fold_in(window_seed, index)
    return tf.gather(
      records, tf.random.experimental.stateless_shuffle(tf.range(tf.shape(records)[0]), seed)
    )

  return (
    tf.data.Dataset.range(lanes)
    .interleave(
      lane,
      cycle_length=lanes,
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    .skip(extra)
    .batch(window)
    .enumerate(start // window)
    .map(shuffled)
    .unbatch()
    .skip(start - window_start)
  )


def _tfds_random_access_reader(source, num_examples: int) -> Reader:
  """Reads an `array_record` split by index, in the order of `_order`: every epoch is a
  fresh permutation of the whole split, as a PyTorch DataLoader with shuffle=True reads."""

  def fetch(index):
    example = source[int(index)]
    return example['image'], np.int32(example['label'])

  def lookup(index):
    image, label = tf.numpy_function(fetch, [index], (tf.string, tf.int32), stateful=False)
    return {'image': tf.ensure_shape(image, []), 'label': tf.ensure_shape(label, [])}

  return _indexed_reader(num_examples, lookup)


def _tfds_sequential_reader(builder, split: str, shuffle_window: int) -> Reader:
  """Reads a TFRecord split, which has no index. Unshuffled reads take this process's block
  in stored order. A training epoch reads the process's files as `tfrecord_epoch` orders
  them."""
  import tensorflow_datasets as tfds

  features = builder.info.features
  decoders = {'image': tfds.decode.SkipDecoding()}

  def parse(record):
    example = features.deserialize_example(record, decoders=decoders)
    return {'image': example['image'], 'label': tf.cast(example['label'], tf.int32)}

  def read(process_index, process_count, shuffle_seed, start=0):
    share = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count
    )
    if shuffle_seed is None:
      ds = builder.as_dataset(
        split=share,
        shuffle_files=False,
        decoders=decoders,
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
      )
      return ds.map(lambda x: {'image': x['image'], 'label': tf.cast(x['label'], tf.int32)}).skip(
        start
      )
    files = builder.info.splits[share].file_instructions
    names = tf.constant([f.filename for f in files])
    skips = tf.constant([f.skip for f in files], tf.int64)

    def read_file(file, first, count):
      return (
        tf.data.TFRecordDataset(tf.gather(names, file))
        .skip(tf.gather(skips, file) + first)
        .take(count)
      )

    records = tfrecord_epoch(
      [f.take for f in files], shuffle_seed, start, read_file, window=shuffle_window
    )
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

  return read


def _random_access_source(builder, split: str):
  """The split's random-access data source, or None where its files are TFRecord (read in
  sequence only). Raises what TFDS raises for a dataset that is not prepared."""
  import tensorflow_datasets as tfds

  try:
    return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
  except NotImplementedError:
    builder.as_dataset(split=split)  # cheap: opens the file list only
    return None


def tfds_split(
  name: str, split: str, data_dir: str | None = None, shuffle_window: int = TFRECORD_WINDOW
) -> Split:
  """A TFDS image-classification split read as encoded bytes (decoding is the pipeline's).

  Stored as `array_record` (`python -m msf_jax.data.prepare`'s default), the split is read
  by index: every training epoch is a fresh permutation, and a resumed run starts at its
  index without reading what came before. Stored as TFRecord, it is read file by file
  (`_tfds_sequential_reader`). Never downloads: a dataset that is not prepared under
  `data_dir` is a DatasetNotFoundError saying how to prepare it.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    source = _random_access_source(builder, split)
  except (AssertionError, FileNotFoundError, KeyError) as e:
    if builder.info.splits:  # prepared: the split is what is wrong
      raise
    how = _MANUAL_DOWNLOADS.get(name, 'Prepare it once with\n  {command}').format(
      data_dir=where, command=prepare.command(name, where)
    )
    raise DatasetNotFoundError(f'TFDS dataset {name!r} is not prepared in {where}. {how}') from e
  num_classes = builder.info.features['label'].num_classes
  if source is None:
    return Split(
      f'{name}/{split}',
      builder.info.splits[split].num_examples,
      num_classes,
      _tfds_sequential_reader(builder, split, shuffle_window),
    )
  names = lambda index: f'{name}/{split}[{index}]'
  return Split(
    f'{name}/{split}',
    len(source),
    num_classes,
    _tfds_random_access_reader(source, len(source)),
    _indexed_namer(len(source), names),
  )


def take(split: Split, num_examples: int) -> Split:
  """`num_examples` of a split (all of it if smaller), for quick evaluations such as the
  training's kNN monitor: every host keeps the first examples of its share, so over all hosts
  exactly `num_examples` are read. On one host, or for sources whose hosts take every
  process_count-th example (digits, folders, TFDS array_record), these are the split's
  first; TFDS TFRecord gives each host a contiguous block, so there the subset depends on the
  number of hosts."""
  if num_examples >= split.num_examples:
    return split

  def read(process_index, process_count, shuffle_seed, start=0):
    share = -(-(num_examples - process_index) // process_count)
    return split.read(process_index, process_count, shuffle_seed, start).take(
      tf.maximum(share - tf.cast(start, tf.int64), 0)
    )

  return Split(
    f'{split.name}[:{num_examples}]', num_examples, split.num_classes, read, split.name_at
  )


def build_split(data_config, split: str, image_size: int) -> Split:
  """The split named by a config: `source` is 'digits' (served at `image_size`), 'folder'
  or 'tfds'."""
  if data_config.source == 'digits':
    return digits(split, image_size)
  if data_config.source == 'folder':
    return image_folder(
      data_config.root, split, class_split=data_config.get('train_split', 'train')
    )
  if data_config.source == 'tfds':
    return tfds_split(data_config.name, split, data_config.get('data_dir') or None)
  raise ValueError(
    f'config.data.source must be one of {", ".join(SOURCES)}, got {data_config.source!r}.'
  )
