"""MSFState: everything a training step reads and writes, as one pytree."""

from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msf_jax import mean_shift
from msf_jax.models import Variables, init_encoder, init_predictor, parse_dtype, projection_dim
from msf_jax.optim import init_optimizer_state
from msf_jax.sharding import replicated, resolve_bank_layout, row_spec


class MSFState(struct.PyTreeNode):  # struct.dataclass, with `replace` typed
  """The whole training state.

  `online` is the online encoder (backbone + projection), `predictor` the online-only
  prediction head, `target` the EMA encoder: each the {'params', 'batch_stats'} variables
  that `apply` takes. `opt_state` covers the trainable tree `trainable_params`. The run's
  randomness lives outside the state: initialization from config.seed, and augmentations
  that the data pipeline derives from (seed, epoch, slot), so a resumed run is exact.
  """

  step: jax.Array
  online: Variables
  predictor: Variables
  target: Variables
  opt_state: optax.OptState
  bank: mean_shift.MemoryBank

  @property
  def trainable_params(self) -> dict:
    return {'online': self.online['params'], 'predictor': self.predictor['params']}


def create_state(
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  bank_sharding: jax.sharding.Sharding | None = None,
) -> MSFState:
  """A fresh state: random online and predictor weights, the target an exact copy of the
  online encoder, zero optimizer buffers and a random unit-norm bank labelled -1 (its rows
  drawn in place with `bank_sharding`, see `init_state`)."""
  # Four keys, the last unused (it was the state's own key once): a seed initializes as it
  # did for the runs recorded in benchmarks/RESULTS.md.
  encoder_rng, predictor_rng, bank_rng, _ = jax.random.split(rng, 4)
  online = init_encoder(config.model, config.image_size, encoder_rng)
  predictor = init_predictor(config.model, predictor_rng)
  bank = mean_shift.init_bank(
    bank_rng,
    config.msf.bank_size,
    projection_dim(config.model),
    parse_dtype(config.model.param_dtype),
    bank_sharding,
  )
  return MSFState(
    step=jnp.zeros((), jnp.int32),
    online=online,
    predictor=predictor,
    target=jax.tree.map(jnp.copy, online),
    opt_state=init_optimizer_state(
      config, {'online': online['params'], 'predictor': predictor['params']}
    ),
    bank=bank,
  )


def bank_layout(config: ml_collections.ConfigDict, device_count: int) -> str:
  """'replicated' or 'sharded': what config.msf.bank_layout means on `device_count` devices."""
  return resolve_bank_layout(
    config.msf.get('bank_layout', 'auto'), config.msf.bank_size, device_count
  )


def bank_specs(layout: str) -> mean_shift.MemoryBank:
  """The bank's PartitionSpecs: rows (and their labels) split over the data axis when
  sharded; the pointer always replicated."""
  # A MemoryBank of specs where it holds arrays: the pytree structure jit and device_put match
  # (so too the MemoryBank of shardings and the MSFState of shardings below).
  specs = (row_spec(2, layout), row_spec(1, layout), P())
  return mean_shift.MemoryBank(*specs)  # type: ignore[arg-type]


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> MSFState:
  """A NamedSharding for every leaf of the state: all replicated but the bank, which follows
  config.msf.bank_layout on this mesh."""
  shapes = jax.eval_shape(lambda: create_state(config, jax.random.key(0)))
  specs = bank_specs(bank_layout(config, mesh.devices.size))
  bank = [NamedSharding(mesh, spec) for spec in specs]  # type: ignore[arg-type]
  return jax.tree.map(lambda _: replicated(mesh), shapes).replace(bank=mean_shift.MemoryBank(*bank))  # type: ignore[arg-type]


def put_state(state: MSFState, config: ml_collections.ConfigDict, mesh: Mesh) -> MSFState:
  """Places a state (host or device arrays) on the mesh as the train step takes it."""
  return jax.device_put(state, state_shardings(config, mesh))


def init_state(config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array) -> MSFState:
  """`create_state` placed on the mesh as the train step takes it. A sharded bank is drawn
  shard by shard, so no device ever holds all of it (the same draw; see `init_bank`)."""
  shardings = state_shardings(config, mesh)
  bank_sharding = cast(NamedSharding, shardings.bank.embeddings)  # see bank_specs
  return put_state(create_state(config, rng, bank_sharding), config, mesh)


def abstract_state(
  config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding | Any | None = None
) -> MSFState:
  """The shapes and dtypes of `create_state(config, ...)` placed with `sharding` (one for all
  leaves, or a tree of them such as `state_shardings`), computed without building it: the
  target a checkpoint is restored into."""
  shapes = jax.eval_shape(lambda: create_state(config, jax.random.key(0)))
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding
  )
