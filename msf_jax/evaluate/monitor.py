"""The kNN monitor of a training run: how good the online backbone's features are, every few
epochs, on a held-out subset, without stopping training for a full evaluation."""

from typing import Callable

import ml_collections
from jax.sharding import Mesh

from msf_jax.data import sources
from msf_jax.evaluate.features import extract_features
from msf_jax.evaluate.knn import knn_accuracies
from msf_jax.models import Variables


def knn_monitor(config: ml_collections.ConfigDict, mesh: Mesh, train_split: sources.Split
                ) -> Callable[[Variables], dict[str, float]]:
  """A function of the online encoder's variables giving `monitor/knn_k{k}`: the
  majority-vote kNN accuracy of `config.monitor.num_queries` images of the held-out split
  `config.monitor.split` against the centre-crop features of `config.monitor.num_train`
  images of `train_split`."""
  monitor = config.monitor
  train = sources.take(train_split, monitor.num_train)
  held_out = sources.take(sources.build_split(config.data, monitor.split, config.image_size),
                          monitor.num_queries)

  def evaluate(variables: Variables) -> dict[str, float]:
    bank = extract_features(variables, train, config, mesh, monitor.batch_size)
    queries = extract_features(variables, held_out, config, mesh, monitor.batch_size)
    accuracies = knn_accuracies(*bank, *queries, train.num_classes, ks=tuple(monitor.ks),
                                votes=('majority',))
    return {f'monitor/knn_k{k}': accuracies[f'knn/majority/k={k}'] for k in monitor.ks}

  return evaluate
