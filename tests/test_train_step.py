"""The train step: sharding invariance, schedule, metrics, the EMA target."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msf_jax import (create_state, load_config, make_mesh, make_train_step, put_batch,
                     put_state)
from msf_jax.data import color
from msf_jax.optim import learning_rate_schedule

from msf_jax.testing import random_batch, random_host_batch, small_config
from helpers import REPO, assert_trees_close, relative_tree_error


STEPS_PER_EPOCH = 10


def run_steps(config, devices, batches, seed=0):
  mesh = make_mesh(devices)
  state = put_state(create_state(config, jax.random.key(seed)), config, mesh)
  train_step = make_train_step(config, mesh, STEPS_PER_EPOCH, finish_views=False)
  metrics = []
  for batch in batches:
    state, step_metrics = train_step(state, put_batch(batch, mesh))
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state), metrics


def test_eight_devices_equal_one_device_float32():
  assert jax.device_count() >= 8, 'conftest.py sets 8 fake CPU devices'
  config = small_config(image_size=96, batch_size=16, bank_size=64)
  batches = [random_batch(np.random.default_rng(0), config)]
  one, m1 = run_steps(config, jax.devices()[:1], batches)
  eight, m8 = run_steps(config, jax.devices()[:8], batches)
  # Forward quantities tensor by tensor; gradient-derived ones (parameters, momentum) as a
  # whole: in float32, reductions in another order flip the odd near-zero ReLU input, which
  # moves single channels (float64, below, is compared tensor by tensor).
  forward = lambda state: (state.bank, state.target, state.online['batch_stats'],
                           state.predictor['batch_stats'])
  assert_trees_close(forward(eight), forward(one), rtol=1e-5)
  trained = lambda state: {'trainable': state.trainable_params, 'opt_state': state.opt_state}
  for field in ('trainable', 'opt_state'):
    error = relative_tree_error(trained(eight)[field], trained(one)[field])
    assert error < 1e-3, (field, error)
  assert m8[0]['loss'] == pytest.approx(m1[0]['loss'], rel=1e-5)
  assert m8[0]['purity'] == m1[0]['purity']


@pytest.mark.slow
def test_eight_devices_equal_one_device_float64_three_steps():
  with jax.enable_x64(True):
    config = small_config(image_size=32, small_stem=True, batch_size=16, bank_size=64,
                          param_dtype='float64')
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, config, dtype=np.float64) for _ in range(3)]
    one, _ = run_steps(config, jax.devices()[:1], batches)
    eight, _ = run_steps(config, jax.devices()[:8], batches)
    assert_trees_close(eight, one, rtol=1e-9)


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


def test_topk_ramp_starts_as_k_equals_one_and_reaches_k():
  """With every label distinct, the official purity is the share of the query's own row
  among the active neighbours: 1 when one neighbour counts, 1/5 when five do."""
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  config.msf.topk_ramp_epochs = 2  # 10 steps an epoch: k = 1, then 3, then 5 from step 20
  batch = {**random_batch(np.random.default_rng(4), config), 'label': np.arange(8, dtype=np.int32)}
  mesh = make_mesh(jax.devices()[:1])
  state = create_state(config, jax.random.key(0))
  train_step = make_train_step(config, mesh, STEPS_PER_EPOCH, donate=False,
                               finish_views=False)
  metrics = [jax.device_get(train_step(put_state(state.replace(step=step), config, mesh),
                                       put_batch(batch, mesh))[1]) for step in (0, 10, 20)]
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


def test_bfloat16_compute_keeps_float32_parameters():
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=16)
  config.model.dtype = 'bfloat16'
  batch = random_batch(np.random.default_rng(3), config)
  state, metrics = run_steps(config, jax.devices()[:2], [batch])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.online))
  assert state.bank.embeddings.dtype == np.float32 and np.isfinite(metrics[0]['loss'])


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


@pytest.mark.parametrize('backend, expected', [('cpu', None), ('gpu', jnp.bfloat16),
                                               ('tpu', jnp.bfloat16)])
def test_auto_compute_dtype_is_bfloat16_on_accelerators_only(monkeypatch, backend, expected):
  from msf_jax.models import build_networks
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  config = small_config()
  assert config.model.dtype == 'auto'
  encoder, predictor = build_networks(config.model)
  assert encoder.dtype == expected and predictor.dtype == expected
  assert encoder.param_dtype == jnp.float32


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
  features = encoder.apply(state.online, np.zeros((2, 32, 32, 3), np.float32),
                           method=encoder.features)
  assert features.shape == (2, 128)


def test_fused_colour_stage_equals_finishing_the_views_first():
  """One device program (colour ops inside the step) against two (`color.finish_views`,
  then the step on finished views), on two devices."""
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  mesh = make_mesh(jax.devices()[:2])
  state = put_state(create_state(config, jax.random.key(0)), config, mesh)
  host_batch = put_batch(random_host_batch(np.random.default_rng(5), config), mesh)
  fused = make_train_step(config, mesh, STEPS_PER_EPOCH, donate=False)
  two_programs = make_train_step(config, mesh, STEPS_PER_EPOCH, donate=False,
                                 finish_views=False)
  fused_state, fused_metrics = jax.device_get(fused(state, host_batch))
  finished = color.finish_views(host_batch, config.data.pairing)
  state_2, metrics_2 = jax.device_get(two_programs(state, finished))
  forward = lambda s: (s.bank, s.target, s.online['batch_stats'], s.predictor['batch_stats'])
  assert_trees_close(forward(fused_state), forward(state_2), rtol=1e-6)
  assert relative_tree_error(fused_state.trainable_params, state_2.trainable_params) < 1e-6
  assert fused_metrics['loss'] == pytest.approx(metrics_2['loss'], rel=1e-6)
  assert fused_metrics['purity'] == metrics_2['purity']
  # The colour stage did something: the raw [0, 1] views give other embeddings.
  raw = {key: host_batch[key] for key in ('online', 'target', 'label')}
  raw_state, _ = jax.device_get(two_programs(state, raw))
  assert relative_tree_error(raw_state.bank.embeddings, state_2.bank.embeddings) > 1e-2


def test_the_readme_python_api_example_runs(monkeypatch):
  with open(os.path.join(REPO, 'README.md')) as f:
    example = f.read().split('## The Python API', 1)[1].split('```python', 1)[1].split('```')[0]
  monkeypatch.chdir(REPO)  # the example loads configs/ by a relative path
  namespace = {}
  exec(example, namespace)  # noqa: S102 - our own README
  assert int(namespace['state'].step) == 1 and np.isfinite(float(namespace['metrics']['loss']))
