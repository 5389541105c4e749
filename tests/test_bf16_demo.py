"""The bfloat16-against-float32 demo benchmark's report: curves at whole epochs, paired
differences seed by seed."""

import functools
import json
import os
import sys

from helpers import REPO, benchmark

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))  # bf16_demo imports small_data_study
bf16_demo = benchmark('bf16_demo')


def fake_record(dtype: str, loss: float, knn: float) -> dict:
  """Two epochs of 4 steps, logged every epoch and at step 6 (a resumed run), monitored at 2."""
  curves = {
    'loss': [[4, loss + 1], [6, 9.0], [8, loss]],
    'purity_others': [[4, 0.1], [8, 0.2]],
    'monitor/knn_k1': [[8, knn + 0.05]],
    'monitor/knn_k20': [[8, knn]],
  }
  return {
    'dtype': dtype,
    'seed': 0,
    'epochs': 2,
    'steps_per_epoch': 4,
    'curves': curves,
    'seconds': 60.0 if dtype == 'float32' else 90.0,
  }


def test_table_shows_curves_at_whole_epochs_and_bfloat16_minus_float32():
  records = {
    ('float32', 0): fake_record('float32', 0.5, 0.80),
    ('bfloat16', 0): fake_record('bfloat16', 0.4, 0.85),
  }
  assert bf16_demo.at_epochs(records['float32', 0], 'loss') == {1: 1.5, 2: 0.5}
  lines = bf16_demo.table(records).splitlines()
  assert lines[0].startswith('| dtype | seed | loss e2 | 20-NN e2 | final 1-NN |')
  assert lines[2] == '| float32 | 0 | 0.5000 | 80.0 | 85.0 | 0.200 | 1.0 |'
  assert lines[4] == '| bf16 - f32 | 0 | -0.1000 | +5.0 | +5.0 | +0.000 | 1.50x |'
  assert 'bfloat16 (1 seeds): final loss 0.4000' in bf16_demo.summary(records)


def test_seeds_are_a_count_or_a_range():
  assert bf16_demo.parse_seeds('6') == range(6)
  assert bf16_demo.parse_seeds('2:3') == range(2, 3)


def test_report_reads_every_seed_and_variant_recorded(tmp_path):
  """Six seeds (more than the default three) and a variant's run: all in the table, the
  variant's against its float32 twin, and the spread of the seeds in the summary."""
  written = {}
  for seed in range(6):
    for dtype, knn in (('float32', 0.80 + seed / 100), ('bfloat16', 0.81 + seed / 100)):
      written[dtype, seed] = fake_record(dtype, 0.5, knn)
  written['bfloat16+heads_f32', 2] = fake_record('bfloat16', 0.5, 0.90)
  for (kind, seed), record in written.items():
    path = bf16_demo.record_path(str(tmp_path), kind, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump({**record, 'seed': seed}, f)
  records = bf16_demo.load_records(str(tmp_path))
  assert list(records)[:7] == [('float32', s) for s in range(6)] + [('bfloat16', 0)]
  assert list(records)[-1] == ('bfloat16+heads_f32', 2)
  lines = bf16_demo.table(records).splitlines()
  assert len(lines) == 2 + 13 + 7  # header, runs, differences
  assert lines[-1].startswith('| bf16+heads_f32 - f32 | 2 | +0.0000 | +8.0 |')
  summary = bf16_demo.summary(records).splitlines()
  assert summary[0].startswith('- float32 (6 seeds): final loss 0.5000 (sd 0.0000, range')
  assert '20-NN 82.5 (sd 1.9, range 80.0-85.0)' in summary[0]
  assert summary[2].startswith('- bfloat16+heads_f32 (1 seeds): final loss 0.5000 (range')


def _features_dtype(encoder, variables, images):
  import jax

  forward = functools.partial(encoder.apply, method=encoder.features)
  return jax.eval_shape(forward, variables, images).dtype


def _hidden_dtype(predictor, projections):
  """The dtype of the predictor's first layer's output."""
  import jax

  def hidden():
    _, state = predictor.init_with_output(
      jax.random.key(1), projections, train=False, capture_intermediates=True
    )
    return state['intermediates']['fc_0']['__call__'][0]

  return jax.eval_shape(hidden).dtype


def test_variants_put_their_part_in_float32_and_keep_the_initial_weights(monkeypatch):
  import jax
  import jax.numpy as jnp
  import ml_collections

  from msf_jax import train
  from msf_jax.evaluate import features
  from msf_jax.models import init_encoder

  model = ml_collections.ConfigDict(
    {'depth': 18, 'small_stem': True, 'width': 8, 'dtype': 'bfloat16', 'param_dtype': 'float32'}
  )
  images, projections = jnp.zeros((2, 24, 24, 3)), jnp.zeros((2, 64))
  # Flax draws each parameter from the key and its path: the same paths, shapes and dtypes
  # are the same initial weights.
  initial = jax.eval_shape(lambda: init_encoder(model, 24, jax.random.key(0)))
  found = {}
  for variant in bf16_demo.VARIANTS:
    for module in (train, features):  # restored after the test
      monkeypatch.setattr(module, 'build_networks', module.build_networks)
    bf16_demo.apply_variant(variant)
    encoder, predictor = train.build_networks(model)
    monitor, _ = features.build_networks(model)
    variables = jax.eval_shape(
      functools.partial(encoder.init, train=False), jax.random.key(0), images
    )
    assert variables == initial

    found[variant] = (
      _features_dtype(encoder, variables, images),
      _hidden_dtype(predictor, projections),
      _features_dtype(monitor, variables, images),
    )
    monkeypatch.undo()
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert found == {  # (backbone features, predictor's hidden layer, the monitor's features)
    'backbone_f32': (f32, bf16, f32),
    'heads_f32': (bf16, f32, bf16),
    'monitor_f32': (bf16, bf16, f32),
  }
