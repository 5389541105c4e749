"""The MSF training step: pure, jitted over a data-parallel mesh."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec as P

from msf_jax import mean_shift
from msf_jax.data import color
from msf_jax.models import build_networks
from msf_jax.optim import learning_rate_schedule, make_optimizer
from msf_jax.sharding import DATA_AXIS, batch_sharded, replicated
from msf_jax.train_state import MSFState, bank_layout, bank_specs, state_shardings

# The host stage's batch: {'online', 'target'} [B,H,W,3] uint8 (float [0, 1] is taken too),
# {'online_color', 'target_color'} [B, color.NUM_PARAMS] float32, 'label' [B] int32; with
# finished views, only {'online', 'target'} normalized float and 'label'.
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _as_float(x: jax.Array) -> jax.Array:
  """At least float32 (bf16 activations are promoted, float64 ones kept)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def search_k(config: ml_collections.ConfigDict) -> int:
  """The rows a step searches: one more than the loss uses when k = 1, so that
  `purity_others` has a neighbour."""
  return max(config.msf.topk, 2)


def bank_step_fn(config: ml_collections.ConfigDict, mesh: Mesh | None = None
                 ) -> Callable[[mean_shift.MemoryBank, jax.Array, jax.Array], tuple]:
  """`mean_shift.enqueue_and_search` with the config's search settings. With a sharded bank
  layout on `mesh`, it runs under `jax.shard_map`: each device updates and searches its own
  rows for the whole batch, so no collective of the program is bank-sized."""
  msf = config.msf
  step = functools.partial(mean_shift.enqueue_and_search, k=msf.topk,
                           search_k=search_k(config), chunk_size=msf.bank_chunk_size,
                           search_dtype=msf.bank_search_dtype,
                           candidates=msf.bank_search_candidates)
  if mesh is None or bank_layout(config, mesh.devices.size) == 'replicated':
    return step
  specs = bank_specs('sharded')
  return jax.shard_map(functools.partial(step, axis_name=DATA_AXIS), mesh=mesh,
                       in_specs=(specs, P(), P()), out_specs=(specs, P(), P(), P()),
                       check_vma=False)


def make_train_step_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                       finish_views: bool = True, mesh: Mesh | None = None
                       ) -> Callable[[MSFState, Batch], tuple[MSFState, Metrics]]:
  """The un-jitted step for a config and the data's steps per epoch (the learning-rate
  schedule and a k ramp count epochs); `make_train_step` jits it over a mesh. `mesh` (None:
  a replicated bank) is where a sharded bank lives (`bank_step_fn`).

  With `finish_views`, the step takes the host stage's batch and applies the colour
  augmentations itself (`color.finish_views`), so that a training step is one device program;
  without, it takes views already finished (the parity tests hand both frameworks the same
  normalized images).
  """
  encoder, predictor = build_networks(config.model)
  optimizer = make_optimizer(config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  ema_momentum = config.msf.ema_momentum
  topk, num_searched = config.msf.topk, search_k(config)
  bank_step = bank_step_fn(config, mesh)
  ramp_epochs = config.msf.topk_ramp_epochs
  pairing = config.data.pairing

  def train_step(state: MSFState, batch: Batch) -> tuple[MSFState, Metrics]:
    if finish_views:
      batch = color.finish_views(batch, pairing)
    # 1. Target <- m * target + (1 - m) * online, parameters only (official order: first).
    target_params = optax.incremental_update(
        state.online['params'], state.target['params'], 1.0 - ema_momentum)

    # 2. Target embeddings of the target view (BatchNorm in training mode, no gradient).
    target_out, target_vars = encoder.apply(
        {'params': target_params, 'batch_stats': state.target['batch_stats']},
        batch['target'], train=True, mutable=['batch_stats'])
    targets = jax.lax.stop_gradient(mean_shift.l2_normalize(_as_float(target_out)))

    # 3. Enqueue before the search: each target is its own nearest neighbour.
    own_rows = state.bank.ptr + jnp.arange(targets.shape[0], dtype=state.bank.ptr.dtype)
    bank, found, neighbors, found_labels = bank_step(state.bank, targets, batch['label'])
    others = mean_shift.others_positions(found, own_rows)  # [B, num_searched - 1]
    if ramp_epochs:  # a k schedule: only the nearest k_t of the k neighbours count
      k_t = mean_shift.ramped_topk(state.step, topk, ramp_epochs, steps_per_epoch)
      active = mean_shift.active_neighbors(k_t, topk)
      others_active = mean_shift.active_neighbors(jnp.maximum(k_t - 1, 1), num_searched - 1)
    else:  # the paper: all k, and the plain mean (bit-identical to the official loss)
      k_t, active, others_active = jnp.asarray(topk, jnp.int32), None, None

    # 4. Online prediction of the online view, pulled toward the target's neighbours.
    def loss_fn(trainable):
      projection, online_vars = encoder.apply(
          {'params': trainable['online'], 'batch_stats': state.online['batch_stats']},
          batch['online'], train=True, mutable=['batch_stats'])
      prediction, predictor_vars = predictor.apply(
          {'params': trainable['predictor'], 'batch_stats': state.predictor['batch_stats']},
          projection, train=True, mutable=['batch_stats'])
      predictions = mean_shift.l2_normalize(_as_float(prediction))
      loss = mean_shift.mean_shift_loss(predictions, neighbors.astype(predictions.dtype), active)
      return loss, (online_vars['batch_stats'], predictor_vars['batch_stats'])

    (loss, (online_stats, predictor_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.trainable_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable_params)
    trainable = optax.apply_updates(state.trainable_params, updates)

    new_state = state.replace(
        step=state.step + 1,
        online={'params': trainable['online'], 'batch_stats': online_stats},
        predictor={'params': trainable['predictor'], 'batch_stats': predictor_stats},
        target={'params': target_params, 'batch_stats': target_vars['batch_stats']},
        opt_state=opt_state,
        bank=bank,
    )
    metrics = {
        'loss': loss,
        # Collapse indicator: the spread of the unit target embeddings over the batch, 1 for
        # directions spread evenly over the sphere (std 1/sqrt(d) a dimension), 0 collapsed.
        'target_std_ratio': jnp.mean(jnp.std(targets, axis=0)) * jnp.sqrt(targets.shape[1]),
        # The official purity counts the query's own embedding (1.0 at k = 1); the other
        # one is the purity of the loss's neighbours besides it (at k = 1, the nearest other).
        'purity': mean_shift.purity(batch['label'], found_labels[:, :topk], active),
        'purity_others': mean_shift.purity(
            batch['label'], jnp.take_along_axis(found_labels, others, axis=1), others_active),
        'topk': k_t,
        'lr': jnp.asarray(schedule(state.step), jnp.float32),
    }
    return new_state, metrics

  return train_step


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh, steps_per_epoch: int,
                    donate: bool = True, finish_views: bool = True
                    ) -> Callable[[MSFState, Batch], tuple[MSFState, Metrics]]:
  """`train_step(state, batch) -> (state, metrics)`, jitted over `mesh`.

  The batch is split over the `data` axis; parameters and optimizer state are replicated, so
  BatchNorm statistics cover the global batch and are identical on every device; the bank is
  replicated or split by rows as config.msf.bank_layout says (`state_shardings`: place the
  state with `train_state.put_state` or `init_state`). With `donate`, the input state's
  buffers are reused. `finish_views`: see `make_train_step_fn`.
  """
  shardings = state_shardings(config, mesh)
  return jax.jit(
      make_train_step_fn(config, steps_per_epoch, finish_views, mesh),
      in_shardings=(shardings, batch_sharded(mesh)),
      out_shardings=(shardings, replicated(mesh)),
      donate_argnums=(0,) if donate else (),
  )
