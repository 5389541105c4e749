"""MSFState: everything a training step reads and writes, as one pytree."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from msf_jax import mean_shift
from msf_jax.models import Variables, init_encoder, init_predictor, parse_dtype, projection_dim
from msf_jax.optim import init_optimizer_state


@struct.dataclass
class MSFState:
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


def create_state(config: ml_collections.ConfigDict, rng: jax.Array) -> MSFState:
  """A fresh state: random online and predictor weights, the target an exact copy of the
  online encoder, zero optimizer buffers and a random unit-norm bank labelled -1."""
  # Four keys, the last unused (it was the state's own key once): a seed initializes as it
  # did for the runs recorded in benchmarks/RESULTS.md.
  encoder_rng, predictor_rng, bank_rng, _ = jax.random.split(rng, 4)
  online = init_encoder(config.model, config.image_size, encoder_rng)
  predictor = init_predictor(config.model, predictor_rng)
  bank = mean_shift.init_bank(bank_rng, config.msf.bank_size, projection_dim(config.model),
                              parse_dtype(config.model.param_dtype))
  return MSFState(
      step=jnp.zeros((), jnp.int32),
      online=online,
      predictor=predictor,
      target=jax.tree.map(jnp.copy, online),
      opt_state=init_optimizer_state(
          config, {'online': online['params'], 'predictor': predictor['params']}),
      bank=bank,
  )


def abstract_state(config: ml_collections.ConfigDict,
                   sharding: jax.sharding.Sharding | None = None) -> MSFState:
  """The shapes and dtypes of `create_state(config, ...)` (placed with `sharding`), computed
  without building it: the target a checkpoint is restored into."""
  shapes = jax.eval_shape(lambda: create_state(config, jax.random.key(0)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)
