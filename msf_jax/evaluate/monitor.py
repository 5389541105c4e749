"""The kNN monitor of a training run: how good the online backbone's features are, every few
epochs, on a held-out subset, without stopping training for a full evaluation."""

import dataclasses

import ml_collections
import numpy as np
from jax.sharding import Mesh

from msf_jax.data import sources
from msf_jax.evaluate.features import extract_features
from msf_jax.evaluate.knn import knn_accuracies
from msf_jax.models import Variables

Features = tuple[np.ndarray, np.ndarray]  # (features [N, F], labels [N])


@dataclasses.dataclass(frozen=True)
class MonitorResult:
  """`metrics` for TensorBoard, and the features they came from (for a retrieval grid)."""

  metrics: dict[str, float]
  train: Features
  held_out: Features


class KnnMonitor:
  """The majority-vote kNN accuracy (`monitor/knn_k{k}`) of `config.monitor.num_queries`
  images of the held-out split `config.monitor.split` against the centre-crop features of
  `config.monitor.num_train` images of the training split."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, train_split: sources.Split):
    self.config, self.mesh = config, mesh
    monitor = config.monitor
    self.train = sources.take(train_split, monitor.num_train)
    self.held_out = sources.take(
      sources.build_split(config.data, monitor.split, config.image_size), monitor.num_queries
    )

  def __call__(self, variables: Variables) -> MonitorResult:
    monitor = self.config.monitor
    bank, queries = (
      extract_features(variables, split, self.config, self.mesh, monitor.batch_size)
      for split in (self.train, self.held_out)
    )
    accuracies = knn_accuracies(
      *bank,
      *queries,
      self.train.num_classes,
      ks=tuple(monitor.ks),
      votes=('majority',),
      mesh=self.mesh,
    )
    return MonitorResult(
      {f'monitor/knn_k{k}': accuracies[f'knn/majority/k={k}'] for k in monitor.ks}, bank, queries
    )
