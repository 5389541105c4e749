"""Backbone features of a whole split, every image once, computed sharded over the mesh,
and an on-disk cache of them so that kNN and the linear probes share one forward pass."""

import hashlib
import io
import json
import os
import re
import uuid
from typing import Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from msf_jax.data import color, pipeline
from msf_jax.data.sources import Split
from msf_jax.models import build_networks
from msf_jax.sharding import batch_sharded, put_replicated, replicated

CACHE_VERSION = 3  # bump when the cached views or the file layout change (3: uint8 views)
SKIPPED_NAMES_KEPT = 5


class SplitFeatures(NamedTuple):
  """Features of a split and what could not be read: `skipped` images over all processes
  (undecodable files), the first few of them named (from this process's share)."""

  features: np.ndarray  # [N, F] float32
  labels: np.ndarray  # [N]
  skipped: int
  skipped_names: tuple[str, ...]


def _names_of_gaps(split: Split, positions: set[int]) -> tuple[str, ...]:
  """Names of the positions of this process's read that never came out (undecodable)."""
  if split.name_at is None or not positions:
    return ()
  gaps = sorted(set(range(max(positions) + 1)) - positions)[:SKIPPED_NAMES_KEPT]
  return tuple(split.name_at(jax.process_index(), jax.process_count(), None, p) for p in gaps)


def feature_batch_size(batch_size: int, mesh: Mesh) -> int:
  """The global batch of feature extraction: `batch_size` rounded down to whole devices."""
  return max(batch_size // mesh.devices.size, 1) * mesh.devices.size


def make_feature_step(
  config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[dict, jax.Array], jax.Array]:
  """`forward(variables, images) -> float32 backbone features`, BatchNorm in eval mode,
  jitted over `mesh`: the weights replicated, the images (uint8 views, normalized here on the
  chip) split along the batch. The weights are an argument, not closed over, which jit would
  embed as constants."""
  encoder, _ = build_networks(config.model)

  def forward(variables: dict, images: jax.Array) -> jax.Array:
    features = encoder.apply(variables, color.normalize(images), method=encoder.features)
    return cast(jax.Array, features).astype(jnp.float32)  # no `mutable`: the output alone

  return jax.jit(
    forward, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=batch_sharded(mesh)
  )


def extract_split(
  variables: dict,
  split: Split,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  batch_size: int = 256,
) -> SplitFeatures:
  """Features and labels of the encoder `variables` ({'params', 'batch_stats'} of an
  Encoder) on the centre-crop views of `split`, BatchNorm in eval mode, and the images that
  could not be decoded. Padding from the last batches is dropped with its mask."""
  batch_size = feature_batch_size(batch_size, mesh)
  forward = make_feature_step(config, mesh)
  variables = put_replicated(variables, mesh)
  dataset, _ = pipeline.eval_batches(split, global_batch=batch_size, image_size=config.image_size)
  feature_parts, label_parts, positions = [], [], set()
  for host_batch in dataset.as_numpy_iterator():
    positions.update(host_batch.pop('position')[host_batch['mask']].tolist())
    batch = pipeline.to_global(host_batch, mesh)
    gathered = multihost_utils.process_allgather(
      {
        'features': forward(variables, batch['image']),
        'label': batch['label'],
        'mask': batch['mask'],
      },
      tiled=True,
    )
    keep = np.asarray(gathered['mask'])
    feature_parts.append(np.asarray(gathered['features'])[keep])
    label_parts.append(np.asarray(gathered['label'])[keep])
  features, labels = np.concatenate(feature_parts), np.concatenate(label_parts)
  skipped = split.num_examples - len(labels)
  names = _names_of_gaps(split, positions) if skipped else ()
  if skipped:
    logging.warning(
      '%d images of %s could not be decoded and were left out, e.g. %s.',
      skipped,
      split.name,
      ', '.join(names) or 'unnamed',
    )
  return SplitFeatures(features, labels, skipped, names)


def extract_features(
  variables: dict,
  split: Split,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, F] float32, labels [N]) of `extract_split`."""
  return extract_split(variables, split, config, mesh, batch_size)[:2]


def fingerprint(variables: dict, split: Split, config: ml_collections.ConfigDict) -> str:
  """A digest of everything the features depend on: every weight, the split (name and size),
  the image size, the model settings, the backend (which resolves dtype 'auto') and the
  process count (a `sources.take` subset of TFDS depends on it). Another checkpoint, split
  or view never gets another's features."""
  digest = hashlib.sha256(
    json.dumps(
      {
        'version': CACHE_VERSION,
        'split': split.name,
        'num_examples': split.num_examples,
        'image_size': config.image_size,
        'model': config.model.to_dict(),
        'backend': jax.default_backend(),
        'processes': jax.process_count(),
      },
      sort_keys=True,
      default=str,
    ).encode()
  )
  for path, value in sorted(traverse_util.flatten_dict(jax.device_get(variables)).items()):
    value = np.ascontiguousarray(value)
    digest.update(f'{"/".join(path)}:{value.dtype}:{value.shape}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:32]


def write_atomically(path: str, payload: bytes) -> None:
  """Writes a temporary file next to `path`, then renames it: readers see the whole file
  or none, even if the writer is killed halfway. Local paths and gs:// alike (tf.io.gfile)."""
  tf.io.gfile.makedirs(os.path.dirname(path) or '.')
  temporary = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with tf.io.gfile.GFile(temporary, 'wb') as f:
      f.write(payload)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(temporary):
      tf.io.gfile.remove(temporary)


def _everywhere(found: bool) -> bool:
  """True if every process found it: extraction is collective, so all must agree to skip it."""
  if jax.process_count() == 1:
    return found
  return bool(np.all(multihost_utils.process_allgather(np.asarray(found))))


def cache_path(
  variables: dict, split: Split, config: ml_collections.ConfigDict, cache_dir: str
) -> str:
  """Where `cached_features` keeps the features of this encoder on this split."""
  name = re.sub(r'[^\w.-]+', '_', split.name).strip('_')
  return os.path.join(cache_dir, f'features_{name}_{fingerprint(variables, split, config)}.npz')


def cached_features(
  variables: dict,
  split: Split,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  cache_dir: str,
  batch_size: int = 256,
) -> SplitFeatures:
  """`extract_split`, read from `cache_dir` when this encoder's features of this split are
  there (no forward pass), else computed and written there by process 0."""
  path = cache_path(variables, split, config, cache_dir)
  if _everywhere(tf.io.gfile.exists(path)):
    with tf.io.gfile.GFile(path, 'rb') as f, np.load(f) as cached:
      return SplitFeatures(
        cached['features'],
        cached['labels'],
        int(cached['skipped']),
        tuple(str(name) for name in cached['skipped_names']),
      )
  extracted = extract_split(variables, split, config, mesh, batch_size)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(
      buffer,
      features=extracted.features,
      labels=extracted.labels,
      skipped=extracted.skipped,
      skipped_names=np.asarray(extracted.skipped_names, str),
    )
    write_atomically(path, buffer.getvalue())
  return extracted
