"""The bfloat16-against-float32 demo benchmark's report: curves at whole epochs, paired
differences seed by seed."""

import importlib.util
import os
import sys

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))  # bf16_demo imports small_data_study
_spec = importlib.util.spec_from_file_location(
  'bf16_demo', os.path.join(REPO, 'benchmarks', 'bf16_demo.py')
)
bf16_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf16_demo)


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
