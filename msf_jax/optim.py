"""SGD with weight decay and the official learning-rate schedule."""

import math

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('cosine_per_epoch', 'cosine_per_step', 'constant')


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """base_lr at batch 256, scaled linearly with the global batch."""
  return config.optim.base_lr * config.batch_size / 256


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """The official per-epoch cosine (constant within an epoch), a per-step cosine, or constant.
  `steps_per_epoch` comes from the data (msf_jax.data.pipeline.steps_per_epoch).

  Official: lr(e) = lr0 * 0.5 * (1 + cos(pi * (e - 1) / E)) for epochs e = 1..E.
  """
  peak = peak_learning_rate(config)
  epochs = config.num_epochs
  kind = config.optim.schedule
  if kind == 'cosine_per_epoch':
    return lambda step: peak * 0.5 * (1 + jnp.cos(math.pi * (step // steps_per_epoch) / epochs))
  if kind == 'cosine_per_step':
    return optax.cosine_decay_schedule(peak, epochs * steps_per_epoch)
  if kind == 'constant':
    return optax.constant_schedule(peak)
  raise ValueError(f'config.optim.schedule must be one of {SCHEDULES}, got {kind!r}.')


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay): decay is added to every gradient, BN included."""
  return optax.chain(
    optax.add_decayed_weights(config.optim.weight_decay),
    optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.optim.momentum),
  )


def init_optimizer_state(config: ml_collections.ConfigDict, params) -> optax.OptState:
  """The optimizer's initial state: momentum buffers and a step count. No value of the
  schedule is stored, so it does not depend on the number of steps per epoch."""
  return make_optimizer(config, steps_per_epoch=1).init(params)
