"""The MSF training step: pure, jitted over a data-parallel mesh."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from msf_jax import mean_shift
from msf_jax.config_utils import ConfigError, bn_group_errors
from msf_jax.data import color
from msf_jax.models import build_networks
from msf_jax.models.layers import BatchGroups
from msf_jax.optim import learning_rate_schedule, make_optimizer
from msf_jax.sharding import DATA_AXIS, batch_sharded, replicated
from msf_jax.train_state import MSFState, bank_layout, bank_specs, state_shardings

# The host stage's batch: {'online', 'target'} [B,H,W,3] uint8 (float [0, 1] is taken too),
# {'online_color', 'target_color'} [B, color.NUM_PARAMS] float32, 'label' [B] int32; with
# finished views, only {'online', 'target'} normalized float and 'label'. With
# msf.shuffle_target, also 'target_order' [B] int32 (`target_sources`).
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _as_float(x: jax.Array) -> jax.Array:
  """At least float32 (bf16 activations are promoted, float64 ones kept)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def search_k(config: ml_collections.ConfigDict) -> int:
  """The rows a step searches: one more than the loss uses when k = 1, so that
  `purity_others` has a neighbour."""
  return max(config.msf.topk, 2)


def batch_groups(config: ml_collections.ConfigDict, device_count: int) -> BatchGroups:
  """The BatchNorm groups of the step on `device_count` devices, as a device sees them:
  config.model.bn_group_size consecutive images of the global batch (0: all of them), inside
  one device or spanning consecutive devices (one must divide the other)."""
  size = config.model.get('bn_group_size', 0)
  errors = bn_group_errors(size, config.batch_size, device_count)
  if errors:
    raise ConfigError(errors[0])
  per_device = config.batch_size // device_count
  if size <= per_device:
    return BatchGroups(size)
  return BatchGroups(0, DATA_AXIS, size // per_device)


def bank_search_fn(
  config: ml_collections.ConfigDict, axis_name: str | None = None
) -> Callable[[mean_shift.MemoryBank, jax.Array, jax.Array], tuple]:
  """`mean_shift.enqueue_and_search` with the config's search settings; with `axis_name`,
  for a bank split by rows over that axis, inside `jax.shard_map`."""
  msf = config.msf
  return functools.partial(
    mean_shift.enqueue_and_search,
    k=msf.topk,
    search_k=search_k(config),
    chunk_size=msf.bank_chunk_size,
    search_dtype=msf.bank_search_dtype,
    candidates=msf.bank_search_candidates,
    axis_name=axis_name,
  )


def bank_step_fn(
  config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> Callable[[mean_shift.MemoryBank, jax.Array, jax.Array], tuple]:
  """`bank_search_fn` for a step under `jit`. With a sharded bank layout on `mesh`, it runs
  under `jax.shard_map`: each device updates and searches its own rows for the whole batch,
  so no collective of the program is bank-sized."""
  if mesh is None or bank_layout(config, mesh.devices.size) == 'replicated':
    return bank_search_fn(config)
  specs = bank_specs('sharded')
  return jax.shard_map(
    bank_search_fn(config, DATA_AXIS),
    mesh=mesh,
    in_specs=(specs, P(), P()),
    out_specs=(specs, P(), P(), P()),
    check_vma=False,
  )


def target_sources(order: jax.Array, mesh: Mesh | None) -> jax.Array:
  """The global row of each image's target embedding, in a batch whose target views each
  host permuted within its own share: `order` [B] is batch['target_order'], the position of
  each row's target view in its host's share. A host's share is the rows of its devices, in
  mesh order (how `pipeline.to_global` places it)."""
  devices = [] if mesh is None else list(mesh.devices.flat)
  processes = sorted({device.process_index for device in devices})
  if len(processes) <= 1:
    return order
  rows = order.shape[0] // len(devices)
  device_rows = np.arange(order.shape[0]).reshape(len(devices), rows)
  host_rows = np.stack(
    [device_rows[[d.process_index == p for d in devices]].ravel() for p in processes]
  )
  row_host = np.repeat([processes.index(d.process_index) for d in devices], rows)
  return jnp.asarray(host_rows)[row_host, order]


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """The whole batch of a per-device array (itself under `jit` alone)."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _own_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's rows of a whole-batch array (all of them under `jit` alone)."""
  if axis_name is None:
    return x
  rows = x.shape[0] // jax.lax.axis_size(axis_name)
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * rows, rows)


def _sum_over_devices(grads, loss: jax.Array, batch_stats, axis_name: str | None) -> tuple:
  """(gradients, loss) averaged over the devices and the running statistics of device 0 (the
  first BatchNorm group's), in one all-reduce; as they are under `jit` alone. The gradients
  are summed in their own dtype, the parameters': float32."""
  if axis_name is None:
    return grads, loss, batch_stats
  first = jax.lax.axis_index(axis_name) == 0
  device_0 = jax.tree.map(lambda x: jnp.where(first, x, jnp.zeros((), x.dtype)), batch_stats)
  grads, loss, batch_stats = jax.lax.psum((grads, loss, device_0), axis_name)
  count = jax.lax.axis_size(axis_name)
  return jax.tree.map(lambda g: g / count, grads), loss / count, batch_stats


def make_train_step_fn(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  finish_views: bool = True,
  mesh: Mesh | None = None,
) -> Callable[[MSFState, Batch], tuple[MSFState, Metrics]]:
  """The un-jitted step for a config and the data's steps per epoch (the learning-rate
  schedule and a k ramp count epochs); `make_train_step` jits it over a mesh. `mesh` (None:
  one device, a replicated bank) is the step's.

  With config.model.bn_group_size = 0, the step is written for the global batch and `jit`
  splits it (GSPMD): every BatchNorm's statistics are reduced over all devices. With groups,
  the forward and backward passes run under `jax.shard_map`, each device on its own rows:
  BatchNorm statistics cross no device unless a group spans several, and the gradients, the
  loss and the running statistics are summed in one explicit all-reduce; the target
  embeddings and labels are gathered for the bank (`_gather`), as the official step puts the
  whole batch in it.

  With `finish_views`, the step takes the host stage's batch and applies the colour
  augmentations itself (`color.finish_views`), so that a training step is one device program;
  without, it takes views already finished (the parity tests hand both frameworks the same
  normalized images). With config.msf.shuffle_target, the batch's target views come permuted
  (`target_sources`) and the target embeddings are put back in order before the bank.
  """
  device_count = 1 if mesh is None else mesh.devices.size
  per_device = bool(config.model.get('bn_group_size', 0))
  if per_device and mesh is None:
    raise ValueError('A step with model.bn_group_size > 0 runs under shard_map: give its mesh.')
  encoder, predictor = build_networks(config.model, batch_groups(config, device_count))
  optimizer = make_optimizer(config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  ema_momentum = config.msf.ema_momentum
  topk, num_searched = config.msf.topk, search_k(config)
  axis_name = DATA_AXIS if per_device else None
  layout = bank_layout(config, device_count)
  bank_step = (
    bank_search_fn(config, DATA_AXIS if layout == 'sharded' else None)
    if per_device
    else bank_step_fn(config, mesh)
  )
  ramp_epochs = config.msf.topk_ramp_epochs
  pairing = config.data.pairing
  shuffled = config.msf.get('shuffle_target', False)

  def forward_backward(trainable, batch_stats, target_params, bank, batch, step):
    """Gradients, loss, new running statistics, bank and metrics from this device's rows
    (under `jit` alone: the whole batch's)."""
    # 2. Target embeddings of the target view (BatchNorm in training mode, no gradient).
    target_out, target_vars = encoder.apply(
      {'params': target_params, 'batch_stats': batch_stats['target']},
      batch['target'],
      train=True,
      mutable=['batch_stats'],
    )
    targets = jax.lax.stop_gradient(mean_shift.l2_normalize(_as_float(target_out)))
    targets, labels = _gather(targets, axis_name), _gather(batch['label'], axis_name)
    if shuffled:  # back in the images' order (the official `get_shuffle_ids`)
      targets = targets[target_sources(_gather(batch['target_order'], axis_name), mesh)]

    # 3. Enqueue before the search: each target is its own nearest neighbour.
    own_rows = bank.ptr + jnp.arange(targets.shape[0], dtype=bank.ptr.dtype)
    bank, found, neighbors, found_labels = bank_step(bank, targets, labels)
    others = mean_shift.others_positions(found, own_rows)  # [B, num_searched - 1]
    if ramp_epochs:  # a k schedule: only the nearest k_t of the k neighbours count
      k_t = mean_shift.ramped_topk(step, topk, ramp_epochs, steps_per_epoch)
      active = mean_shift.active_neighbors(k_t, topk)
      others_active = mean_shift.active_neighbors(jnp.maximum(k_t - 1, 1), num_searched - 1)
    else:  # the paper: all k, and the plain mean (bit-identical to the official loss)
      k_t, active, others_active = jnp.asarray(topk, jnp.int32), None, None
    neighbors = _own_rows(neighbors, axis_name)

    # 4. Online prediction of the online view, pulled toward the target's neighbours.
    def loss_fn(trainable):
      projection, online_vars = encoder.apply(
        {'params': trainable['online'], 'batch_stats': batch_stats['online']},
        batch['online'],
        train=True,
        mutable=['batch_stats'],
      )
      prediction, predictor_vars = predictor.apply(
        {'params': trainable['predictor'], 'batch_stats': batch_stats['predictor']},
        projection,
        train=True,
        mutable=['batch_stats'],
      )
      predictions = mean_shift.l2_normalize(_as_float(prediction))
      loss = mean_shift.mean_shift_loss(predictions, neighbors.astype(predictions.dtype), active)
      return loss, {
        'online': online_vars['batch_stats'],
        'predictor': predictor_vars['batch_stats'],
      }

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads, loss, new_stats = _sum_over_devices(
      grads, loss, {**new_stats, 'target': target_vars['batch_stats']}, axis_name
    )
    metrics = {
      'loss': loss,
      # Collapse indicator: the spread of the unit target embeddings over the batch, 1 for
      # directions spread evenly over the sphere (std 1/sqrt(d) a dimension), 0 collapsed.
      'target_std_ratio': jnp.mean(jnp.std(targets, axis=0)) * jnp.sqrt(targets.shape[1]),
      # The official purity counts the query's own embedding (1.0 at k = 1); the other
      # one is the purity of the loss's neighbours besides it (at k = 1, the nearest other).
      'purity': mean_shift.purity(labels, found_labels[:, :topk], active),
      'purity_others': mean_shift.purity(
        labels, jnp.take_along_axis(found_labels, others, axis=1), others_active
      ),
      'topk': k_t,
    }
    return grads, new_stats, bank, metrics

  if per_device:
    specs = bank_specs(layout)
    forward_backward = jax.shard_map(
      forward_backward,
      mesh=mesh,
      in_specs=(P(), P(), P(), specs, P(DATA_AXIS), P()),
      out_specs=(P(), P(), specs, P()),
      check_vma=False,
    )

  def train_step(state: MSFState, batch: Batch) -> tuple[MSFState, Metrics]:
    if finish_views:
      batch = color.finish_views(batch, pairing)
    # 1. Target <- m * target + (1 - m) * online, parameters only (official order: first).
    target_params = optax.incremental_update(
      state.online['params'], state.target['params'], 1.0 - ema_momentum
    )
    batch_stats = {
      name: getattr(state, name)['batch_stats'] for name in ('online', 'predictor', 'target')
    }
    grads, new_stats, bank, metrics = forward_backward(
      state.trainable_params, batch_stats, target_params, state.bank, batch, state.step
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable_params)
    trainable = optax.apply_updates(state.trainable_params, updates)

    new_state = state.replace(
      step=state.step + 1,
      online={'params': trainable['online'], 'batch_stats': new_stats['online']},
      predictor={'params': trainable['predictor'], 'batch_stats': new_stats['predictor']},
      target={'params': target_params, 'batch_stats': new_stats['target']},
      opt_state=opt_state,
      bank=bank,
    )
    return new_state, {**metrics, 'lr': jnp.asarray(schedule(state.step), jnp.float32)}

  return train_step


def make_train_step(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  steps_per_epoch: int,
  donate: bool = True,
  finish_views: bool = True,
) -> Callable[[MSFState, Batch], tuple[MSFState, Metrics]]:
  """`train_step(state, batch) -> (state, metrics)`, jitted over `mesh`.

  The batch is split over the `data` axis; parameters and optimizer state are replicated;
  BatchNorm statistics cover config.model.bn_group_size consecutive images, or the global
  batch (`make_train_step_fn`); the bank is replicated or split by rows as
  config.msf.bank_layout says (`state_shardings`: place the state with
  `train_state.put_state` or `init_state`). With `donate`, the input state's buffers are
  reused. `finish_views`: see `make_train_step_fn`.
  """
  shardings = state_shardings(config, mesh)
  return jax.jit(
    make_train_step_fn(config, steps_per_epoch, finish_views, mesh),
    in_shardings=(shardings, batch_sharded(mesh)),
    out_shardings=(shardings, replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )
