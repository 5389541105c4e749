"""The train step: sharding invariance, schedule, metrics, the EMA target."""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msf_jax import (
  create_state,
  load_config,
  make_mesh,
  mean_shift,
  put_batch,
  put_replicated,
  put_state,
)
from msf_jax.data import color
from msf_jax.optim import learning_rate_schedule
from msf_jax.plan.compiled import equations
from msf_jax.testing import random_batch, random_host_batch, small_config
from msf_jax.train import make_train_step_fn, target_sources

from helpers import (
  REPO,
  STEPS_PER_EPOCH,
  assert_trees_close,
  relative_tree_error,
  run_steps,
  train_step,
)


@pytest.mark.slow  # two ResNet-18 steps to compile
def test_eight_devices_equal_one_device_float32():
  assert jax.device_count() >= 8, 'conftest.py sets 8 fake CPU devices'
  # The ImageNet stem (strided 7x7 convolution, max pooling) at 32 px: layer4 works on 1 x 1.
  config = small_config(image_size=32, batch_size=16, bank_size=64)
  batches = [random_batch(np.random.default_rng(0), config)]
  one, m1 = run_steps(config, jax.devices()[:1], batches)
  eight, m8 = run_steps(config, jax.devices()[:8], batches)
  # Forward quantities tensor by tensor; gradient-derived ones (parameters, momentum) as a
  # whole: in float32, reductions in another order flip the odd near-zero ReLU input, which
  # moves single channels (float64 is compared tensor by tensor in test_bank_sharding.py).
  forward = lambda state: (
    state.bank,
    state.target,
    state.online['batch_stats'],
    state.predictor['batch_stats'],
  )
  assert_trees_close(forward(eight), forward(one), rtol=1e-5)
  trained = lambda state: {'trainable': state.trainable_params, 'opt_state': state.opt_state}
  for field in ('trainable', 'opt_state'):
    error = relative_tree_error(trained(eight)[field], trained(one)[field])
    assert error < 1e-3, (field, error)
  assert m8[0]['loss'] == pytest.approx(m1[0]['loss'], rel=1e-5)
  assert m8[0]['purity'] == m1[0]['purity']


def test_target_sources_map_each_hosts_order_to_its_own_rows():
  """Two processes whose devices alternate in the mesh: process 0 holds rows 0-1 and 4-5,
  process 1 rows 2-3 and 6-7; each row's 'target_order' counts in its own host's rows."""
  device = lambda process: types.SimpleNamespace(process_index=process)
  mesh = types.SimpleNamespace(devices=np.array([device(p) for p in (0, 1, 0, 1)]))
  order = np.array([3, 0, 0, 1, 1, 2, 2, 3])
  np.testing.assert_array_equal(target_sources(order, mesh), [5, 0, 2, 3, 1, 4, 6, 7])
  np.testing.assert_array_equal(target_sources(order, make_mesh(jax.devices()[:4])), order)


def test_step_updates_bank_pointer_target_and_metrics():
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  config.msf.bank_chunk_size = 16
  rng = np.random.default_rng(2)
  initial = jax.device_get(create_state(config, jax.random.key(0)))
  state, metrics = run_steps(config, jax.devices()[:1], [random_batch(rng, config)] * 2)
  assert int(state.step) == 2 and int(state.bank.ptr) == 16
  assert (state.bank.labels[:16] >= 0).all() and (state.bank.labels[16:] == -1).all()
  # Target after step 2 = 0.99 * target_1 + 0.01 * online_1, and target_1 = online_0.
  leaf = lambda variables: variables['params']['backbone']['conv1']['kernel']
  np.testing.assert_array_equal(leaf(initial.target), leaf(initial.online))
  assert not np.allclose(leaf(state.target), leaf(initial.target))
  for m in metrics:
    assert np.isfinite(m['loss']) and 0 <= m['purity'] <= 1 and 0 <= m['purity_others'] <= 1
    assert m['lr'] == pytest.approx(0.05 * 8 / 256) and m['topk'] == 5
  # The batch repeats, so the second step's neighbours include the first step's copies:
  # purity without the query's own row is then high, but never above the official one.
  assert metrics[1]['purity_others'] <= metrics[1]['purity']


@pytest.mark.slow  # a ResNet-18 step to compile
def test_topk_ramp_starts_as_k_equals_one_and_reaches_k():
  """With every label distinct, the official purity is the share of the query's own row
  among the active neighbours: 1 when one neighbour counts, 1/5 when five do."""
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  config.msf.topk_ramp_epochs = 2  # 10 steps an epoch: k = 1, then 3, then 5 from step 20
  batch = {**random_batch(np.random.default_rng(4), config), 'label': np.arange(8, dtype=np.int32)}
  mesh = make_mesh(jax.devices()[:1])
  state = create_state(config, jax.random.key(0))
  step_fn = train_step(config, mesh, donate=False, finish_views=False)
  metrics = [
    jax.device_get(
      step_fn(put_state(state.replace(step=step), config, mesh), put_batch(batch, mesh))[1]
    )
    for step in (0, 10, 20)
  ]
  assert [int(m['topk']) for m in metrics] == [1, 3, 5]
  assert [float(m['purity']) for m in metrics] == pytest.approx([1, 1 / 3, 1 / 5])
  assert metrics[0]['loss'] != pytest.approx(metrics[2]['loss'])


def test_schedules():
  config = small_config(batch_size=512)
  config.num_epochs = 4
  per_epoch = learning_rate_schedule(config, steps_per_epoch=10)
  for step, epoch in ((0, 1), (9, 1), (10, 2), (39, 4)):
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 4))
    assert float(per_epoch(step)) == pytest.approx(expected)
  config.optim.schedule = 'cosine_per_step'
  assert float(learning_rate_schedule(config, steps_per_epoch=10)(20)) == pytest.approx(0.05)
  config.optim.schedule = 'linear'
  with pytest.raises(ValueError, match='config.optim.schedule'):
    learning_rate_schedule(config, steps_per_epoch=10)


@pytest.mark.slow  # a ResNet-18 step in bfloat16 to compile
def test_bfloat16_compute_keeps_float32_parameters():
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=16)
  config.model.dtype = 'bfloat16'
  batch = random_batch(np.random.default_rng(3), config)
  state, metrics = run_steps(config, jax.devices()[:2], [batch])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.online))
  assert state.bank.embeddings.dtype == np.float32 and np.isfinite(metrics[0]['loss'])


# bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 of itself, and
# values one apart in its last place differ by 2^-8 of themselves.
BF16_ULP = 2.0**-8


def planted_bank(
  targets: np.ndarray, labels: np.ndarray, angles: np.ndarray, rng: np.random.Generator
) -> mean_shift.MemoryBank:
  """A bank whose first rows are `targets` and whose other rows lie, for each target, at
  `angles` (radians) from it in random directions: with angles far below the targets'
  angles to each other, every query's nearest rows are its own, then its planted ones in
  order, by margins no bfloat16 rounding can bridge. The planted rows get random labels."""
  directions = rng.standard_normal((len(targets), len(angles), targets.shape[1]))
  directions -= np.sum(directions * targets[:, None], -1, keepdims=True) * targets[:, None]
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  planted = np.cos(angles)[:, None] * targets[:, None] + np.sin(angles)[:, None] * directions
  rows = np.concatenate([targets, planted.reshape(-1, targets.shape[1])]).astype(np.float32)
  row_labels = np.concatenate([labels, rng.integers(0, 4, planted.shape[0] * len(angles))])
  return mean_shift.MemoryBank(
    jnp.asarray(rows), jnp.asarray(row_labels, jnp.int32), jnp.zeros((), jnp.int32)
  )


def operand_dtypes(jaxpr, primitive: str, has_shape=None) -> set[str]:
  """The operand dtypes of a primitive's equations (those with an operand of `has_shape`)."""
  return {
    str(v.aval.dtype)
    for eqn in equations(jaxpr)
    if eqn.primitive.name == primitive
    and (has_shape is None or any(v.aval.shape == has_shape for v in eqn.invars))
    for v in eqn.invars
  }


@pytest.mark.slow  # two ResNet-18 steps to compile: 60 s of CPU time (measured under load)
def test_bfloat16_step_matches_float32_step_within_bfloat16_tolerances():
  """One step computed in bfloat16 against float32, same weights, batch and bank.

  What runs in bfloat16: every convolution and dense product of the three networks, forward
  and backward, but the heads' last Linear (checked on the traced step). What stays float32, and is checked exactly: the
  bank rows (normalised in float32: unit to 1e-6, where a bfloat16 normalisation is off by up
  to 2^-8), the search's and the loss's products, the EMA target (bit-identical) and every
  leaf of the new state.

  The bank is planted so that each query's 4 neighbours are its own row and rows at 0.05,
  0.15 and 0.25 rad from it, the next row 0.29 or more farther in cosine: both dtypes then
  choose the same neighbours, in the same order, and the purities are equal to the bit.

  Tolerances, from bfloat16's 8-bit significand (one rounding: 2^-9 of the value) and what
  this step measured (ResNet-18 of width 16 at 32 px, noise images, fresh weights):
  - loss: 2^-7 relative (2 bfloat16 ulps); measured 3.3e-3. The loss is 2 - 2 v.z over unit
    vectors in float32, so only the directions' bfloat16 error reaches it.
  - bank rows (the target embeddings): 2^-4 relative (16 ulps); measured 4.6e-2. Twenty
    layers each round their output, and BatchNorm can magnify a rounding by its channel's
    |mean| / std: rounding only the weights to bfloat16, in a float32 step, moved
    them by 2.5e-2.
  - BatchNorm running statistics: 2^-8 relative (1 ulp); measured 2.6e-4, as a mean over
    thousands of rounded values, summed in float32, averages their rounding out.
  - parameter updates: 1/2 relative (over all of them); measured 0.39. Not a bfloat16 fault but
    the step's conditioning at initialisation: the float32 step itself moved its update by
    0.33 when only its weights were rounded to bfloat16 (and by 0.33 when its images were
    perturbed by 2^-9 of themselves). The update of the predictor's last layer, its input
    times the loss's gradient, meets none of the backward pass's BatchNorm cancellations and
    carries the forward pass's error: 2^-4 relative, as the bank rows; measured 3.6e-2.
  """
  config = small_config(image_size=32, small_stem=True, batch_size=16, bank_size=64, topk=4)
  config.model.width = 16
  batch = random_batch(np.random.default_rng(0), config)
  state = create_state(config, jax.random.key(0))
  mesh = make_mesh(jax.devices()[:1])

  def step(dtype, state):
    config.model.dtype = dtype
    step_fn = train_step(config, mesh, donate=False, finish_views=False)  # float32: built once
    return jax.device_get(step_fn(put_replicated(state, mesh), put_batch(batch, mesh)))

  first, _ = step('float32', state)
  targets = np.asarray(first.bank.embeddings[:16])
  state = state.replace(
    bank=planted_bank(
      targets, batch['label'], np.array([0.05, 0.15, 0.25]), np.random.default_rng(1)
    )
  )
  (exact, exact_metrics), (bf16, metrics) = step('float32', state), step('bfloat16', state)

  config.model.dtype = 'bfloat16'
  traced = jax.make_jaxpr(make_train_step_fn(config, STEPS_PER_EPOCH, finish_views=False))(
    state, batch
  ).jaxpr
  assert operand_dtypes(traced, 'conv_general_dilated') == {'bfloat16'}
  assert operand_dtypes(traced, 'dot_general', has_shape=(256, 32)) == {'float32'}  # fc_3
  assert operand_dtypes(traced, 'dot_general', has_shape=(32, 64)) == {'float32'}  # search
  assert operand_dtypes(traced, 'dot_general', has_shape=(16, 4, 32)) == {'float32'}  # loss
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {np.dtype(np.float32), np.dtype(np.int32)}

  def neighbors(new_state):
    queries = new_state.bank.embeddings[:16]
    return np.asarray(mean_shift.nearest_neighbors(queries, new_state.bank.embeddings, 4))

  planted = 16 + 3 * np.arange(16)[:, None] + np.arange(3)
  np.testing.assert_array_equal(neighbors(exact), np.c_[np.arange(16), planted])
  np.testing.assert_array_equal(neighbors(bf16), neighbors(exact))
  assert (metrics['purity'], metrics['purity_others']) == (
    exact_metrics['purity'],
    exact_metrics['purity_others'],
  )
  assert metrics['loss'] == pytest.approx(exact_metrics['loss'], rel=2 * BF16_ULP)
  rows = np.asarray(bf16.bank.embeddings)
  assert np.abs(np.linalg.norm(rows, axis=1) - 1).max() < 1e-6
  error = relative_tree_error(rows[:16], exact.bank.embeddings[:16])
  assert error < 16 * BF16_ULP, error
  for network in ('online', 'target', 'predictor'):
    error = relative_tree_error(
      getattr(bf16, network)['batch_stats'], getattr(exact, network)['batch_stats']
    )
    assert error < BF16_ULP, (network, error)
  jax.tree.map(np.testing.assert_array_equal, bf16.target['params'], exact.target['params'])

  update = lambda new: jax.tree.map(np.subtract, new.trainable_params, state.trainable_params)
  top = lambda tree: tree['predictor']['fc_3']
  errors = {
    'all': relative_tree_error(update(bf16), update(exact)),
    'top': relative_tree_error(top(update(bf16)), top(update(exact))),
  }
  assert errors['all'] < 0.5 and errors['top'] < 16 * BF16_ULP, errors


def test_encoder_features_are_the_pooled_backbone_output():
  from msf_jax.models import build_networks, feature_dim

  config = small_config(image_size=32, small_stem=True)
  encoder, _ = build_networks(config.model)
  state = create_state(config, jax.random.key(0))
  images = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
  variables = state.online
  features = encoder.apply(variables, images, method=encoder.features)
  assert features.shape == (2, feature_dim(18))
  projection = encoder.apply(variables, images, train=False)
  assert projection.shape == (2, feature_dim(18) // 4)


def test_paper_variants_through_the_config_argument():
  path = os.path.join(REPO, 'configs', 'imagenet_msf.py')
  default = load_config(path)
  assert (default.data.pairing, default.msf.bank_size, default.msf.topk) == ('w/s', 1_024_000, 5)
  byol = load_config(path, 'aug=s/s,k=1,bank=128000')
  assert (byol.data.pairing, byol.msf.bank_size, byol.msf.topk) == ('s/s', 128_000, 1)
  with pytest.raises(ValueError, match='topk=3'):
    load_config(path, 'topk=3')


@pytest.mark.parametrize(
  'backend, expected', [('cpu', None), ('gpu', jnp.bfloat16), ('tpu', jnp.bfloat16)]
)
def test_auto_compute_dtype_is_bfloat16_on_accelerators_only(monkeypatch, backend, expected):
  from msf_jax.models import build_networks

  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  config = small_config()
  assert config.model.dtype == 'auto'
  encoder, predictor = build_networks(config.model)
  assert encoder.dtype == expected and predictor.dtype == expected
  assert encoder.param_dtype == jnp.float32


@pytest.mark.slow  # a ResNet-18 of width 16 created and applied
def test_width_scales_every_stage_and_the_heads():
  from msf_jax.models import build_networks, feature_dim

  config = small_config(image_size=32, small_stem=True)
  config.model.width = 16
  state = create_state(config, jax.random.key(0))
  encoder, _ = build_networks(config.model)
  assert feature_dim(18, 16) == 128
  backbone = state.online['params']['backbone']
  assert backbone['conv1']['kernel'].shape == (3, 3, 3, 16)
  assert backbone['layer4_1']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert state.bank.embeddings.shape == (config.msf.bank_size, 128 // 4)
  features = encoder.apply(
    state.online, np.zeros((2, 32, 32, 3), np.float32), method=encoder.features
  )
  assert features.shape == (2, 128)


@pytest.mark.slow  # two ResNet-18 steps to compile
def test_fused_colour_stage_equals_finishing_the_views_first():
  """One device program (colour ops inside the step) against two (`color.finish_views`,
  then the step on finished views), on two devices."""
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  mesh = make_mesh(jax.devices()[:2])
  state = put_state(create_state(config, jax.random.key(0)), config, mesh)
  host_batch = put_batch(random_host_batch(np.random.default_rng(5), config), mesh)
  fused = train_step(config, mesh, donate=False)
  two_programs = train_step(config, mesh, donate=False, finish_views=False)
  fused_state, fused_metrics = jax.device_get(fused(state, host_batch))
  finished = color.finish_views(host_batch, config.data.pairing)
  state_2, metrics_2 = jax.device_get(two_programs(state, finished))
  assert_same_step((fused_state, fused_metrics), (state_2, metrics_2))
  # The colour stage did something: the raw [0, 1] views give other embeddings.
  raw = {
    'label': host_batch['label'],
    **{key: color.to_unit(host_batch[key]) for key in ('online', 'target')},
  }
  raw_state, _ = jax.device_get(two_programs(state, raw))
  assert relative_tree_error(raw_state.bank.embeddings, state_2.bank.embeddings) > 1e-2


def assert_same_step(step, other, rtol=1e-6):
  """Two (state, metrics) of one step, equal to float32 rounding: forward quantities tensor by
  tensor, the trained parameters as a whole, the loss, and the purity exactly."""
  (state, metrics), (other_state, other_metrics) = step, other
  forward = lambda s: (s.bank, s.target, s.online['batch_stats'], s.predictor['batch_stats'])
  assert_trees_close(forward(state), forward(other_state), rtol=rtol)
  assert relative_tree_error(state.trainable_params, other_state.trainable_params) < rtol
  assert metrics['loss'] == pytest.approx(other_metrics['loss'], rel=rtol)
  assert metrics['purity'] == other_metrics['purity']


@pytest.mark.slow  # a ResNet-18 step and the colour stage, three times
def test_step_on_uint8_views_equals_the_step_on_their_float_levels():
  """The host ships uint8 views and the step converts them on the chip: the same views given
  as float32 k / 255 make the same step to float32 rounding, not bit for bit: XLA divides by
  255 as a product with 1/255 and fuses the conversion into the colour ops and normalization,
  one rounding apart, which the colour ops and the network grow (measured: finished views
  1.5e-6 of their scale apart, bank rows 4.8e-6)."""
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  mesh = make_mesh(jax.devices()[:2])
  state = put_state(create_state(config, jax.random.key(0)), config, mesh)
  as_uint8 = random_host_batch(np.random.default_rng(6), config)
  assert as_uint8['online'].dtype == as_uint8['target'].dtype == np.uint8
  views_as = lambda convert: {
    **as_uint8,
    **{key: convert(as_uint8[key].astype(np.float32)) for key in ('online', 'target')},
  }
  as_float = views_as(lambda k: k / 255)
  finished = [
    color.finish_views(put_batch(batch, mesh), config.data.pairing)
    for batch in (as_uint8, as_float)
  ]
  assert_trees_close(finished[0], finished[1], rtol=1e-5)  # the network's inputs
  step = train_step(config, mesh, donate=False)  # the fused step of the test above
  run = lambda batch: jax.device_get(step(state, put_batch(batch, mesh)))
  from_uint8 = run(as_uint8)
  assert_same_step(from_uint8, run(as_float), rtol=1e-5)
  # Levels taken as [0, 1] values (no conversion) would be another step altogether.
  wrong, _ = run(views_as(lambda k: k))
  assert relative_tree_error(wrong.bank.embeddings, from_uint8[0].bank.embeddings) > 1e-2


@pytest.mark.slow  # a ResNet-18 step at README's size
def test_the_readme_python_api_example_runs(monkeypatch):
  with open(os.path.join(REPO, 'README.md')) as f:
    example = f.read().split('## The Python API', 1)[1].split('```python', 1)[1].split('```')[0]
  monkeypatch.chdir(REPO)  # the example loads configs/ by a relative path
  namespace = {}
  exec(example, namespace)  # noqa: S102 - our own README
  assert int(namespace['state'].step) == 1 and np.isfinite(float(namespace['metrics']['loss']))
