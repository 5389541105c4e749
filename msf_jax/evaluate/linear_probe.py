"""Linear probe of a frozen encoder: features L2-normalized, standardized with the
train set's centre-crop statistics, (x - mean) / sqrt(var + 1e-5), then one linear layer
trained with SGD (lr 0.01, momentum 0.9, weight decay 1e-4, batch 256, 40 epochs, lr x0.1 at
epochs 15 and 30). Top-1 and top-5 on the test split's centre-crop features.

`linear_probe` is the official protocol: each step draws fresh RandomResizedCrop + flip views
and passes them through the frozen backbone. `linear_probe_on_features` trains on fixed
(cached) centre-crop features instead: much faster, usually a little lower.

The layer starts as torch.nn.Linear does (U(+-1/sqrt(F)) kernel and bias), as the official
code, so that both see the same starting point; with standardized inputs it hardly matters.
"""

import dataclasses
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from msf_jax.data import color, pipeline
from msf_jax.data.sources import Split
from msf_jax.evaluate.features import extract_features
from msf_jax.mean_shift import l2_normalize
from msf_jax.models import build_networks
from msf_jax.models.layers import TorchDense
from msf_jax.sharding import batch_sharded, put_replicated, replicated

VARIANCE_EPSILON = 1e-5
TOP_K = (1, 5)


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """The official linear protocol's hyperparameters (MSF's linear evaluation: SGD with
  momentum, the learning rate divided by 10 at each milestone epoch); `configs/eval.py`, the
  probe functions' defaults and the planner all read `OFFICIAL`. Milestones must be
  increasing positive epochs, `epochs` and `batch_size` at least 1."""

  epochs: int = 40
  batch_size: int = 256
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  milestones: tuple[int, ...] = (15, 30)

  def __post_init__(self):  # checked where they are made, before any batch is counted
    milestones = self.milestones
    if list(milestones) != sorted(set(milestones)) or any(m < 1 for m in milestones):
      raise ValueError(f'milestones must be increasing positive epochs, got {milestones}.')
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(
        f'epochs and batch_size must be at least 1, got {self.epochs}, {self.batch_size}.'
      )


OFFICIAL = ProbeSettings()
Params = Any


def standardization(
  train_features: np.ndarray, rows_per_pass: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
  """(mean, 1 / sqrt(var + 1e-5)) per dimension of the L2-normalized train features (the
  biased variance), accumulated in float64 over row blocks, so that ImageNet's features are
  never copied whole."""
  total = np.zeros(train_features.shape[1])
  total_sq = np.zeros(train_features.shape[1])
  for start in range(0, len(train_features), rows_per_pass):
    block = np.asarray(train_features[start : start + rows_per_pass], np.float64)
    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  mean = total / len(train_features)
  variance = np.maximum(total_sq / len(train_features) - np.square(mean), 0.0)
  return mean.astype(np.float32), (1 / np.sqrt(variance + VARIANCE_EPSILON)).astype(np.float32)


def _standardize(features: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
  mean, inv_std = stats
  return (l2_normalize(features.astype(jnp.float32)) - mean) * inv_std


def _linear(num_classes: int) -> TorchDense:
  return TorchDense(num_classes)


def init_linear(num_features: int, num_classes: int, seed: int) -> Params:
  """Parameters of the probe's layer, initialized as torch.nn.Linear."""
  return _linear(num_classes).init(jax.random.key(seed), jnp.zeros((1, num_features)))


def make_probe_optimizer(
  steps_per_epoch: int, settings: ProbeSettings = OFFICIAL
) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay) with MultiStepLR(milestones, 0.1) stepped
  once per epoch: decay added to the gradient (bias included), lr constant within an epoch."""
  schedule = optax.piecewise_constant_schedule(
    settings.lr, {m * steps_per_epoch: 0.1 for m in settings.milestones}
  )
  return optax.chain(
    optax.add_decayed_weights(settings.weight_decay), optax.sgd(schedule, settings.momentum)
  )


def _loss(
  params: Params,
  standardized: jax.Array,
  labels: jax.Array,
  num_classes: int,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Mean cross-entropy over the batch (over its `mask`ed rows: a short last batch)."""
  logits = _linear(num_classes).apply(params, standardized)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.sum(mask)


def _sgd_step(params, opt_state, optimizer, standardized, labels, num_classes, mask=None):
  grads = jax.grad(_loss)(params, standardized, labels, num_classes, mask)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def top_k_accuracies(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'top1', 'top5'}: the fraction of rows whose label is among the k largest logits. A tie
  or a NaN counts against the label. With fewer than 5 classes top-5 counts every class, so
  it is 1.0."""
  labels = np.asarray(labels)
  label_logit = np.take_along_axis(logits, labels[:, None], axis=1)
  rank = np.sum(~(logits < label_logit), axis=1) - 1  # the other logits not below the label's
  return {f'top{k}': float(np.mean(rank < k)) for k in TOP_K}


def evaluate_linear(
  params: Params,
  stats: tuple[np.ndarray, np.ndarray],
  features: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
) -> dict[str, float]:
  """Top-1 and top-5 of the probe on (centre-crop) features."""
  logits = jax.jit(lambda p, s, x: _linear(num_classes).apply(p, _standardize(x, s)))(
    params, stats, jnp.asarray(features)
  )
  return top_k_accuracies(np.asarray(logits), labels)


def _check_features(features: np.ndarray, labels: np.ndarray, num_classes: int, what: str) -> None:
  if features.ndim != 2 or labels.shape != (len(features),):
    raise ValueError(
      f'{what} features must be [N, F] with labels [N]; got {features.shape} and {labels.shape}.'
    )
  if len(labels) == 0:
    raise ValueError(f'{what} features are empty.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
      f'{what} labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].'
    )


def linear_probe_on_features(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  *,
  settings: ProbeSettings = OFFICIAL,
  seed: int = 0,
) -> dict[str, float]:
  """{'top1', 'top5'} on the test features of a probe trained on fixed train features.

  Each epoch visits the train set in the order of a permutation from (seed, epoch) in batches
  of the settings' batch size, the last one shorter (as torch's DataLoader); one jitted scan per epoch."""
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  _check_features(train_features, train_labels, num_classes, 'train')
  _check_features(test_features, test_labels, num_classes, 'test')
  stats = standardization(train_features)
  num_train, batch_size = len(train_features), settings.batch_size
  num_batches = -(-num_train // batch_size)
  optimizer = make_probe_optimizer(num_batches, settings)
  params = init_linear(train_features.shape[1], num_classes, seed)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_epoch(params, opt_state, standardized, labels, key):
    order = jnp.pad(
      jax.random.permutation(key, num_train), (0, num_batches * batch_size - num_train)
    )
    mask = (jnp.arange(num_batches * batch_size) < num_train).astype(jnp.float32)

    def step(carry, batch):
      (params, opt_state), (index, batch_mask) = carry, batch
      return _sgd_step(
        params, opt_state, optimizer, standardized[index], labels[index], num_classes, batch_mask
      ), None

    batches = (order.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size))
    return jax.lax.scan(step, (params, opt_state), batches)[0]

  standardized = jax.jit(_standardize)(jnp.asarray(train_features), stats)
  labels = jnp.asarray(train_labels, jnp.int32)
  shuffle_key = jax.random.key(seed + 1)
  for epoch in range(settings.epochs):
    params, opt_state = train_epoch(
      params, opt_state, standardized, labels, jax.random.fold_in(shuffle_key, epoch)
    )
  return evaluate_linear(params, stats, test_features, test_labels, num_classes)


def make_probe_step(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  optimizer: optax.GradientTransformation,
  num_classes: int,
) -> Callable:
  """`step(params, opt_state, backbone, stats, batch) -> (params, opt_state)`: one SGD step of
  the official probe on fresh views through the frozen backbone (BatchNorm in eval mode),
  jitted over `mesh` with the batch split and everything else replicated."""
  encoder, _ = build_networks(config.model)

  def train_step(params, opt_state, backbone, stats, batch):
    features = cast(
      jax.Array, encoder.apply(backbone, color.normalize(batch['image']), method=encoder.features)
    )  # no `mutable`
    return _sgd_step(
      params, opt_state, optimizer, _standardize(features, stats), batch['label'], num_classes
    )

  return jax.jit(
    train_step,
    donate_argnums=(0, 1),
    in_shardings=(replicated(mesh),) * 4 + (batch_sharded(mesh),),
    out_shardings=replicated(mesh),
  )


def linear_probe(
  variables: dict,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  train_split: Split,
  test_split: Split,
  *,
  settings: ProbeSettings = OFFICIAL,
  seed: int = 0,
  train_features: np.ndarray | None = None,
  test_features: tuple[np.ndarray, np.ndarray] | None = None,
  eval_batch_size: int = 256,
) -> dict[str, float]:
  """{'top1', 'top5'} of the official linear probe of the Encoder `variables` ({'params',
  'batch_stats'}), BatchNorm in eval mode.

  The standardization comes from the train split's centre-crop features and the accuracy from
  the test split's: pass them (`train_features` [N, F]; `test_features` (features, labels))
  when a cache has them, else they are extracted here. Training views come from
  `pipeline.probe_stream` (seeded by `seed`; each epoch drops its last incomplete batch), the
  batch split over `mesh`, the layer replicated; the settings' batch size is global."""
  devices, batch_size = mesh.devices.size, settings.batch_size
  if batch_size % devices:
    raise ValueError(
      f'batch_size ({batch_size}) must be a multiple of the {devices} devices of the mesh.'
    )
  if train_features is None:
    train_features, _ = extract_features(variables, train_split, config, mesh, eval_batch_size)
  if test_features is None:
    test_features = extract_features(variables, test_split, config, mesh, eval_batch_size)
  num_classes = train_split.num_classes
  stats = standardization(train_features)
  steps = pipeline.steps_per_epoch(train_split, batch_size)
  optimizer = make_probe_optimizer(steps, settings)
  params = init_linear(train_features.shape[1], num_classes, seed)
  step = make_probe_step(config, mesh, optimizer, num_classes)
  params, opt_state, backbone, device_stats = put_replicated(
    (params, optimizer.init(params), variables, stats), mesh
  )
  stream = pipeline.probe_stream(
    train_split, global_batch=batch_size, image_size=config.image_size, seed=seed
  )
  for _ in range(settings.epochs * steps):
    params, opt_state = step(
      params, opt_state, backbone, device_stats, pipeline.to_global(next(stream), mesh)
    )
  host_params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
  return evaluate_linear(host_params, stats, *test_features, num_classes)
