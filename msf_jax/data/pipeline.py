"""tf.data pipelines: two-view training batches and masked evaluation batches, per host,
handed to JAX as global arrays sharded over the mesh. Images cross as uint8, PIL's 8-bit
pixels at a quarter of float32's bytes; the device program that takes them converts and
normalizes them (`msf_jax.data.color.normalize`). Training batches carry each view's colour
parameters; the train step applies them on the accelerator
(`msf_jax.data.color.finish_views`).

Determinism: epoch e reads its split in the order of shuffle seed (seed, e), and the
augmentation of the example in slot s of that epoch uses the stateless seed
fold_in(fold_in(seed, e), s). A run resumed at step t rebuilds the stream from step t with
no hidden iterator state. A shuffled target batch (`shuffle_target`) is permuted by a
function of (seed, step, process).
"""

import collections
import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from msf_jax.data import augment
from msf_jax.data.sources import Split
from msf_jax.sharding import batch_sharded

# (encoded image, its stateless seed) -> {name: view} of one example.
ExampleViews = Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]
# (a number of the step and process, a host's batch) -> the batch the host hands over.
BatchMap = Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the host CPU: TensorFlow must not reserve GPU (or TPU) memory. Programs
  call this first (msf_jax.main does), before TensorFlow touches a device."""
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')


def _this_host(
  global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  """(process index, process count, per-host batch), the first two from JAX by default."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(
      f'The global batch ({global_batch}) must divide among {process_count} processes.'
    )
  return process_index, process_count, global_batch // process_count


def steps_per_epoch(split: Split, global_batch: int) -> int:
  """Training drops the last incomplete batch of each epoch."""
  steps = split.num_examples // global_batch
  if steps == 0:
    raise ValueError(
      f'{split.name} has {split.num_examples} examples, fewer than one global '
      f'batch of {global_batch}.'
    )
  return steps


@dataclasses.dataclass(frozen=True)
class StreamPosition:
  """Where a host's stream stands after a step: the slot of the next example it reads (slots
  count every image, the undecodable ones too) and how many images it has skipped. Saved
  with a checkpoint, it resumes the stream on the exact image the run would have read."""

  slot: int
  skipped: int


class TrainStream:
  """An iterator of per-host two-view batches that counts the images it could not decode and
  names them (`pop_skipped_names`), by file where the source can tell, and knows its
  position after each recent batch (`position_after`).

  It is one pass over an endless stream: iterating it again continues where it stopped.
  """

  def __init__(
    self,
    dataset: tf.data.Dataset,
    start_step: int,
    start: StreamPosition,
    name_of_slot: Callable[[int], str],
  ):
    self.dataset = dataset
    self.next_slot = start.slot  # stream slot of the next example expected
    self.skipped = start.skipped
    self._name_of_slot = name_of_slot
    self._skipped_slots: list[int] = []
    self._batches: Iterator[dict[str, np.ndarray]] | None = None
    self._step = start_step
    # The positions after the last few steps: batches are fetched ahead of the steps that
    # train on them (prefetch_to_mesh), and a checkpoint asks for its step's.
    self._positions = collections.deque([(start_step, start)], maxlen=8)

  def __iter__(self) -> 'TrainStream':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = self.dataset.as_numpy_iterator()
    batch = next(self._batches)
    # Slots are consecutive before decoding; the ones missing were skipped.
    for slot in batch.pop('slot').tolist():
      self._skipped_slots += range(self.next_slot, slot)
      self.skipped += slot - self.next_slot
      self.next_slot = slot + 1
    self._step += 1
    self._positions.append((self._step, StreamPosition(self.next_slot, self.skipped)))
    return batch

  def position_after(self, step: int) -> StreamPosition:
    """The position after the batch of `step` (one of the last few fetched)."""
    for fetched_step, position in self._positions:
      if fetched_step == step:
        return position
    raise ValueError(
      f'The stream has no position for step {step}: it knows steps '
      f'{[s for s, _ in self._positions]}.'
    )

  def pop_skipped_names(self, limit: int = 5) -> list[str]:
    """Names of (at most `limit` of) the images skipped since the last call."""
    slots, self._skipped_slots = self._skipped_slots[:limit], []
    return [self._name_of_slot(slot) for slot in slots]


def _global_slot_seed(
  seed: int, epoch: tf.Tensor, slot: tf.Tensor, process_index: int, process_count: int
) -> tf.Tensor:
  """The augmentation seed of one example: a function of (seed, epoch, global slot)."""
  epoch_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
  return tf.random.experimental.stateless_fold_in(epoch_seed, slot * process_count + process_index)


def train_stream(
  split: Split,
  *,
  global_batch: int,
  image_size: int,
  seed: int,
  pairing: str = 'w/s',
  start_step: int = 0,
  start_position: StreamPosition | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  crop_scale: tuple[float, float] = augment.CROP_SCALE,
  random_flip: bool = True,
  shuffle_target: bool = False,
  crops: str = 'tensorflow',
) -> TrainStream:
  """Endless two-view batches of this host's share, from `start_step` on: {'online',
  'target'} cropped and flipped, uint8, {'online_color', 'target_color'} their colour
  parameters, 'label'. An image that cannot be decoded is dropped and counted in `skipped`.
  A resumed run passes the position saved at `start_step` (`TrainStream.position_after`);
  without one, the stream starts at slot start_step x host batch, which is exact only while
  no image was skipped. With `shuffle_target`, the target views (and their colours) of this
  host's batch come permuted, with 'target_order' (`shuffled_target`). `crops` picks who
  crops and resizes the views (`augment.two_views`): TensorFlow, or PIL itself."""
  return _augmented_stream(
    split,
    global_batch,
    seed,
    start_step,
    process_index,
    process_count,
    _two_views(image_size, pairing, crop_scale, random_flip, crops),
    start_position,
    shuffled_target(seed) if shuffle_target else None,
  )


def shuffled_target(seed: int) -> BatchMap:
  """A host batch whose target views and their colour parameters are permuted, as the
  official step permutes the target batch before the target encoder (`get_shuffle_ids`), so
  that each image's target is normalized in another BatchNorm group than its online view;
  'target_order' [host batch] int32 holds the position of each row's target view, which the
  train step uses to put the embeddings back in order. The permutation is a function of
  (seed, step, process): each host permutes its own share, no image moves between hosts."""

  def shuffle(batch_id: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    step_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 2], tf.int64), batch_id)
    permutation = tf.argsort(tf.random.stateless_uniform(tf.shape(batch['label']), step_seed))
    return {
      **batch,
      'target': tf.gather(batch['target'], permutation),
      'target_color': tf.gather(batch['target_color'], permutation),
      'target_order': tf.math.invert_permutation(permutation),
    }

  return shuffle


def probe_stream(
  split: Split,
  *,
  global_batch: int,
  image_size: int,
  seed: int,
  scale: tuple[float, float] = augment.PROBE_CROP_SCALE,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainStream:
  """Endless single-view batches for the linear probe, with the order and per-example seeds
  of `train_stream`: {'image': RandomResizedCrop(scale) + flip, uint8 (the probe's step
  normalizes it); 'label'}."""
  return _augmented_stream(
    split,
    global_batch,
    seed,
    start_step,
    process_index,
    process_count,
    _probe_view(image_size, scale),
  )


def _as_written(views: ExampleViews) -> ExampleViews:
  """`views` traced by tf.data as written: the augmentations hold no Python control flow on
  tensors, so AutoGraph's rewrite of every function they call buys nothing and costs time at
  each start of a process (benchmarks/stream_startup.py: the digits training stream built in
  1.37 s with it, 0.68 s without)."""
  return tf.autograph.experimental.do_not_convert(views)


def _two_views(
  image_size: int,
  pairing: str,
  crop_scale: tuple[float, float],
  random_flip: bool,
  crops: str = 'tensorflow',
) -> ExampleViews:
  return _as_written(
    lambda encoded, seed: augment.two_views(
      encoded, seed, image_size, pairing, crop_scale, random_flip, crops
    )
  )


def _probe_view(image_size: int, scale: tuple[float, float]) -> ExampleViews:
  return _as_written(
    lambda encoded, seed: {'image': augment.probe_view(encoded, seed, image_size, scale)}
  )


def _center_crop_view(image_size: int) -> ExampleViews:
  return _as_written(lambda encoded, seed: {'image': augment.center_crop_view(encoded, image_size)})


def _global_batch_spec(views: ExampleViews, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of `views` and labels, traced by tf.data on a
  placeholder example: no data is read, and they follow any change to the views."""
  placeholder = tf.data.Dataset.from_tensors((tf.constant(b''), tf.constant([0, 0], tf.int64)))
  spec = {**placeholder.map(views).element_spec, 'label': tf.TensorSpec([], tf.int32)}
  return {
    key: jax.ShapeDtypeStruct((global_batch, *s.shape), s.dtype.as_numpy_dtype)
    for key, s in spec.items()
  }


def train_batch_spec(
  global_batch: int, image_size: int, pairing: str = 'w/s', shuffle_target: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
  """What `train_stream` hands the train step (over all hosts), without reading any data:
  the shapes a run is planned and compiled with ahead of time."""
  spec = _global_batch_spec(_two_views(image_size, pairing, augment.CROP_SCALE, True), global_batch)
  order = {'target_order': jax.ShapeDtypeStruct((global_batch,), np.int32)}
  return {**spec, **order} if shuffle_target else spec


def probe_batch_spec(global_batch: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What `probe_stream` hands the linear probe's step, without reading any data."""
  return _global_batch_spec(_probe_view(image_size, augment.PROBE_CROP_SCALE), global_batch)


def eval_images_spec(global_batch: int, image_size: int) -> jax.ShapeDtypeStruct:
  """The images of an `eval_batches` batch, the feature extractor's input."""
  return _global_batch_spec(_center_crop_view(image_size), global_batch)['image']


def _augmented_stream(
  split: Split,
  global_batch: int,
  seed: int,
  start_step: int,
  process_index: int | None,
  process_count: int | None,
  augment_example: ExampleViews,
  start_position: StreamPosition | None = None,
  map_batch: BatchMap | None = None,
) -> TrainStream:
  """This host's share of `split`, epoch after epoch, each example mapped by
  `augment_example(encoded image, its seed) -> dict of views`, batched with its label, each
  batch then by `map_batch(step * processes + process, batch)` if given."""
  process_index, process_count, host_batch = _this_host(global_batch, process_index, process_count)
  host_per_epoch = steps_per_epoch(split, global_batch) * host_batch
  start = start_position or StreamPosition(start_step * host_batch, 0)
  start_epoch, start_offset = divmod(start.slot, host_per_epoch)

  def order_seed(e):
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), e)

  def name_of_slot(slot: int) -> str:
    e, position = divmod(slot, host_per_epoch)
    if split.name_at is None:
      return f'{split.name}: example {position} of epoch {e} on process {process_index}'
    return split.name_at(
      process_index, process_count, order_seed(tf.constant(e, tf.int64)), position
    )

  def epoch(e):
    first = tf.where(e == start_epoch, tf.constant(start_offset, tf.int64), 0)
    examples = split.read(process_index, process_count, order_seed(e), first)
    examples = examples.take(host_per_epoch - first)
    slots = tf.data.Dataset.range(first, host_per_epoch)
    return tf.data.Dataset.zip(examples, slots).map(
      lambda x, slot: {
        **x,
        'slot': e * host_per_epoch + slot,
        'seed': _global_slot_seed(seed, e, slot, process_index, process_count),
      }
    )

  def views(x):
    return {**augment_example(x['image'], x['seed']), 'label': x['label'], 'slot': x['slot']}

  dataset = (
    tf.data.Dataset.range(start_epoch, 2**62)
    .flat_map(epoch)
    .map(views, num_parallel_calls=tf.data.AUTOTUNE)
    .ignore_errors()
    .batch(host_batch, drop_remainder=True)
  )
  if map_batch is not None:
    dataset = dataset.enumerate(start_step).map(
      lambda step, batch: map_batch(step * process_count + process_index, batch)
    )
  dataset = dataset.prefetch(tf.data.AUTOTUNE)
  return TrainStream(dataset, start_step, start, name_of_slot)


def eval_batches(
  split: Split,
  *,
  global_batch: int,
  image_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """Every image of the split exactly once over all hosts: centre-crop views (uint8, to
  normalize on the chip with `color.normalize`), in order, padded to whole batches with
  `mask` False (no dropped remainder). Every host yields the same number of batches.
  Returns (dataset, number of batches); an undecodable image is dropped and replaced by
  padding, so `mask.sum()` over all batches counts what was read, and `position` (the
  example's place in this host's read, -1 for padding) tells which."""
  process_index, process_count, host_batch = _this_host(global_batch, process_index, process_count)
  most_per_host = -(-split.num_examples // process_count)
  num_batches = -(-most_per_host // host_batch)

  center_crop = _center_crop_view(image_size)

  def view(x, position):
    return {
      **center_crop(x['image'], None),
      'label': x['label'],
      'mask': tf.constant(True),
      'position': position,
    }

  padding = tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros([image_size, image_size, 3], tf.uint8),
      'label': tf.constant(-1, tf.int32),
      'mask': tf.constant(False),
      'position': tf.constant(-1, tf.int64),
    }
  ).repeat()
  examples = split.read(process_index, process_count, None, 0)
  dataset = (
    tf.data.Dataset.zip(examples, tf.data.Dataset.range(most_per_host))
    .map(view, num_parallel_calls=tf.data.AUTOTUNE)
    .ignore_errors()
    .concatenate(padding)
    .take(num_batches * host_batch)
    .batch(host_batch)
    .prefetch(tf.data.AUTOTUNE)
  )
  return dataset, num_batches


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's share of a batch into global arrays split over the mesh."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_mesh(
  batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """The batches as global arrays on the mesh, `depth` of them placed ahead: the next
  batch's host-to-device copy runs while the current step computes, not after it."""
  placed: collections.deque[dict[str, jax.Array]] = collections.deque()
  for batch in batches:
    placed.append(to_global(batch, mesh))
    if len(placed) == depth:
      yield placed.popleft()
  yield from placed
