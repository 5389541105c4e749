"""What a run prints: its settings in a few lines, one line a log step, other libraries' INFO
kept for the log file, and where the results are."""

import logging
import os

import pytest

from msf_jax import console, load_config

from helpers import REPO


def record(path: str, level: int = logging.INFO) -> logging.LogRecord:
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_only_our_info_lines_and_everyones_warnings_reach_the_console():
  keep = console.OwnInfoOnly()
  assert keep.filter(record(os.path.join(console.PACKAGE_DIR, 'train_loop.py')))
  orbax = '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not keep.filter(record(orbax))
  assert keep.filter(record(orbax, logging.WARNING))
  line = console.ConsoleFormatter().format(record(orbax, logging.WARNING))
  assert line.endswith(' WARNING message') and len(line.split()[0]) == len('12:03:44')


def test_progress_line_says_where_how_fast_and_how_long():
  metrics = {
    'loss': 0.51234,
    'purity': 0.457,
    'purity_others': 0.396,
    'target_std_ratio': 0.861,
    'lr': 0.03546,
    'images_per_sec': 665.4,
  }
  line = console.progress_line(440, 2640, 44, metrics, eta_seconds=128)
  assert line == (
    'epoch 10/60  step 440/2640  loss 0.5123  purity 0.457 (others 0.396)  '
    'spread 0.86  lr 0.03546  665 img/s  ETA 2m08s'
  )
  assert console.progress_line(1, 2640, 44, metrics, 0).startswith('epoch  1/60  step 1/2640')


@pytest.mark.parametrize(
  'seconds, text', [(0, '0s'), (59.6, '1m00s'), (545, '9m05s'), (3 * 3600 + 720, '3h12m')]
)
def test_durations(seconds, text):
  assert console.duration(seconds) == text


def test_config_summary_names_only_the_settings_that_apply():
  demo = console.config_summary(load_config(os.path.join(REPO, 'configs', 'demo.py')), 44, 1437)
  assert (
    "scikit-learn's digits, views w/s (target/online), crops of 0.3-1 of the image, no "
    'flips; 1,437 training images.' in demo
  )
  assert 'ResNet-18 (small stem, width 8) at 24 px, compute float32' in demo
  assert 'kNN monitor every 10 epochs: 360 test images' in demo
  assert 'Logs every epoch, checkpoints every 10 epochs' in demo
  assert 'imagenet2012' not in demo and 'data_dir' not in demo  # ImageNet leftovers
  pil = load_config(os.path.join(REPO, 'configs', 'demo.py'))
  pil.data.crops = 'pil'
  assert 'crops of 0.3-1 of the image by PIL, no flips' in console.config_summary(pil, 44, 1437)
  imagenet = load_config(os.path.join(REPO, 'configs', 'imagenet_msf.py'))
  imagenet.monitor.knn_every_epochs = 0
  text = console.config_summary(imagenet, 5004, 1_281_167)
  assert 'TFDS imagenet2012' in text and 'kNN monitor' not in text
  assert '200 epochs of 5,004 steps of batch 256' in text and len(text.splitlines()) == 5
  assert 'bank of 1,024,000 rows, target' in text  # the official search goes unmentioned
  imagenet.msf.bank_search_dtype = 'bfloat16'
  assert (
    'bank of 1,024,000 rows searched in bfloat16 (best 512 re-scored in float32)'
    in console.config_summary(imagenet, 5004, 1_281_167)
  )
  assert (
    'bank of 1,024,000 rows sharded over 8 devices (128,000 each) searched in bfloat16'
    in console.config_summary(imagenet, 5004, 1_281_167, device_count=8)
  )
  imagenet.msf.bank_layout = 'replicated'
  assert (
    'bank of 1,024,000 rows replicated on each of 8 devices searched'
    in console.config_summary(imagenet, 5004, 1_281_167, device_count=8)
  )


def test_closing_lines_point_at_the_results():
  text = console.where_results_are(
    'runs/demo', 'runs/demo/msf_jax.log', {'trained': 'runs/demo/eval_trained/eval_results.json'}
  )
  assert text.splitlines() == [
    'Checkpoints: runs/demo/checkpoints',
    'trained: runs/demo/eval_trained/eval_results.json',
    'Log: runs/demo/msf_jax.log',
    'Metrics: tensorboard --logdir runs/demo',
  ]
