"""MSFState: everything a training step reads and writes, as one pytree."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from msf_jax import mean_shift
from msf_jax.models import build_networks, feature_dim
from msf_jax.models.msf import parse_dtype
from msf_jax.optim import make_optimizer

Params = Any


@struct.dataclass
class MSFState:
  """The whole training state.

  `online_*` is the online encoder (backbone + projection), `predictor_*` the online-only
  prediction head, `target_*` the EMA encoder. `opt_state` covers the trainable tree
  `{'online': online_params, 'predictor': predictor_params}`. `rng` is the run's root key as
  raw uint32 key data (it checkpoints like any array; `jax.random.wrap_key_data` restores
  it): device-side randomness is derived with `fold_in(key, step)`, so that it never needs
  to be advanced and a resumed run is exact.
  """
  step: jax.Array
  online_params: Params
  online_batch_stats: Params
  predictor_params: Params
  predictor_batch_stats: Params
  target_params: Params
  target_batch_stats: Params
  opt_state: optax.OptState
  bank: jax.Array
  bank_labels: jax.Array
  bank_ptr: jax.Array
  rng: jax.Array

  @property
  def trainable_params(self) -> Params:
    return {'online': self.online_params, 'predictor': self.predictor_params}

  @property
  def memory_bank(self) -> mean_shift.MemoryBank:
    return mean_shift.MemoryBank(self.bank, self.bank_labels, self.bank_ptr)


def create_state(config: ml_collections.ConfigDict, rng: jax.Array) -> MSFState:
  """A fresh state: random online and predictor weights, the target an exact copy of the
  online encoder, zero optimizer buffers and a random unit-norm bank labelled -1."""
  encoder, predictor = build_networks(config.model)
  param_dtype = parse_dtype(config.model.param_dtype)
  encoder_rng, predictor_rng, bank_rng, root_rng = jax.random.split(rng, 4)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), param_dtype)
  online = encoder.init(encoder_rng, images, train=False)
  proj_dim = feature_dim(config.model.depth, config.model.width) // 4
  heads = predictor.init(predictor_rng, jnp.zeros((1, proj_dim), param_dtype), train=False)
  bank = mean_shift.init_bank(bank_rng, config.msf.bank_size, proj_dim, param_dtype)
  trainable = {'online': online['params'], 'predictor': heads['params']}
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return MSFState(
      step=jnp.zeros((), jnp.int32),
      online_params=online['params'],
      online_batch_stats=online['batch_stats'],
      predictor_params=heads['params'],
      predictor_batch_stats=heads['batch_stats'],
      target_params=copy(online['params']),
      target_batch_stats=copy(online['batch_stats']),
      opt_state=make_optimizer(config).init(trainable),
      bank=bank.embeddings,
      bank_labels=bank.labels,
      bank_ptr=bank.ptr,
      rng=jax.random.key_data(root_rng),
  )
