"""Backbone features of a whole split, every image once, computed sharded over the mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from msf_jax.data import pipeline
from msf_jax.data.sources import Split
from msf_jax.models import build_networks


def extract_features(variables: dict, split: Split, config: ml_collections.ConfigDict,
                     mesh: Mesh, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, F] float32, labels [N]) of the encoder `variables` ({'params',
  'batch_stats'} of an Encoder) on the centre-crop views of `split`; BatchNorm in eval mode.
  Padding from the last batches is dropped with its mask."""
  encoder, _ = build_networks(config.model)
  batch_size = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
  forward = jax.jit(lambda images: encoder.apply(variables, images, method=encoder.features)
                    .astype(jnp.float32))
  dataset, _ = pipeline.eval_batches(split, global_batch=batch_size,
                                     image_size=config.image_size)
  features, labels = [], []
  for host_batch in dataset.as_numpy_iterator():
    batch = pipeline.to_global(host_batch, mesh)
    gathered = multihost_utils.process_allgather(
        {'features': forward(batch['image']), 'label': batch['label'],
         'mask': batch['mask']}, tiled=True)
    keep = np.asarray(gathered['mask'])
    features.append(np.asarray(gathered['features'])[keep])
    labels.append(np.asarray(gathered['label'])[keep])
  return np.concatenate(features), np.concatenate(labels)
