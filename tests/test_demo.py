"""The offline demo: `python -m msf_jax.main --config=configs/demo.py` trains, evaluates the
trained and a random encoder the same way and prints both side by side."""

import json
import os
import subprocess
import sys

import pytest

from msf_jax import load_config
from msf_jax.checkpoint import checkpoint_directory
from msf_jax.demo import comparison_table, settings_summary
from msf_jax.evaluate import run

from helpers import REPO

DEMO_CONFIG = os.path.join(REPO, 'configs', 'demo.py')
CHECK_README = os.path.join(REPO, 'scripts', 'check_readme_demo.py')


def test_comparison_table_lists_each_metric_for_each_encoder():
  table = comparison_table(
    {
      'trained': {'knn/majority/k=1': 0.95, 'transfer/x/regularization': 3},
      'random': {'knn/majority/k=1': 0.9, 'transfer/x/regularization': 1},
    }
  )
  header, row = table.splitlines()
  assert header.split() == ['trained', 'random']
  assert row.split() == ['knn/majority/k=1', '95.0%', '90.0%']


def test_demo_config_evaluates_the_model_it_trains():
  config = load_config(DEMO_CONFIG)
  assert config.mode == 'demo' and config.data.source == 'digits'
  assert config.evaluation.model == config.model
  assert config.evaluation.image_size == config.image_size
  assert set(config.evaluation.tasks.split(',')) == {'knn', 'linear_fast'}


@pytest.mark.slow
def test_demo_trains_then_compares_with_a_random_encoder(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'msf_jax.main',
      f'--config={DEMO_CONFIG}',
      f'--workdir={tmp_path}',
      '--config.num_epochs=1',
      '--config.evaluation.linear.epochs=2',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = result.stdout.split('MSF on digits')[1].splitlines()
  assert table[1].split() == ['trained', 'random']
  rows = {line.split()[0]: line.split()[1:] for line in table[2:8]}
  assert set(rows) == {
    'knn/majority/k=1',
    'knn/majority/k=20',
    'knn/weighted/k=1',
    'knn/weighted/k=20',
    'linear_fast/top1',
    'linear_fast/top5',
  }
  for name, encoder_format in (('trained', 'msf_jax'), ('random', 'random')):
    with open(tmp_path / f'eval_{name}' / 'eval_results.json') as f:
      record = json.load(f)
    assert record['checkpoint_format'] == encoder_format
    assert record['results']['knn/majority/k=1'] > 0.5  # 10 classes: chance is 0.1
  config = load_config(DEMO_CONFIG)
  config.num_epochs = 1
  assert table[8] == settings_summary(config)  # which k, and the rest of the recipe
  assert table[9] == config.why
  # 1,437 images, batch 32: 44 steps
  assert os.path.isdir(os.path.join(checkpoint_directory(str(tmp_path)), '44'))
  # The kNN monitor ran at the last step: one console line, the metric in the log file.
  console = result.stderr.splitlines()
  assert sum('kNN monitor at epoch 1: 20-NN' in line for line in console) == 1
  with open(tmp_path / 'msf_jax.log') as f:
    assert '[44] monitor/knn_k20=' in f.read()  # orbax's and CLU's lines went there
  assert not any('orbax' in line or 'checkpoint_manager' in line for line in console)
  # One line an epoch: the 60 epochs of the README's run print under 120 lines in all.
  progress = [line for line in console if ' step 44/44 ' in line]
  assert len(progress) == 1 and 'ETA' in progress[0]
  assert len(console) + len(result.stdout.splitlines()) + 59 + 5 < 120
  assert (tmp_path / 'views.png').is_file() and (tmp_path / 'retrieval.png').is_file()
  # The run's config is kept: evaluation needs no --config.model flag (the demo is width 8).
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['model']['width'] == 8
  evaluation = load_config(os.path.join(REPO, 'configs', 'eval.py'), 'digits')
  evaluation.checkpoint, evaluation.tasks = str(tmp_path), 'knn'
  assert run.evaluate(evaluation, str(tmp_path / 'eval_plain'))['knn/majority/k=1'] > 0.5


def check_readme(tmp_path, demo_output: str, *args) -> subprocess.CompletedProcess:
  """scripts/check_readme_demo.py on `demo_output` as the demo's console output."""
  (tmp_path / 'demo.out').write_text(demo_output)
  return subprocess.run(
    [sys.executable, CHECK_README, str(tmp_path / 'demo.out'), *args],
    capture_output=True,
    text=True,
    timeout=60,
  )


def readme_text() -> str:
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    return f.read()


def test_readme_check_passes_readmes_own_table_and_names_a_changed_digit(tmp_path):
  readme = readme_text()
  table = readme.split('## Try it: the offline demo')[1].split('```')[3]
  assert table.lstrip().startswith('MSF on digits') and table.count('%') == 12
  assert check_readme(tmp_path, readme).returncode == 0
  first_row = next(line for line in table.splitlines() if line.startswith('knn/majority/k=1 '))
  value = first_row.split()[1]
  changed = f'{float(value[:-1]) - 0.1:.1f}%'
  result = check_readme(tmp_path, readme.replace(first_row, first_row.replace(value, changed)))
  assert result.returncode == 1
  assert f'-{first_row}' in result.stderr and changed in result.stderr
  assert (
    check_readme(
      tmp_path, readme.replace(first_row, first_row.replace(value, changed)), '--tolerance=0.1'
    ).returncode
    == 0
  )


def test_readme_check_fails_without_a_table(tmp_path):
  result = check_readme(tmp_path, 'Traceback (most recent call last):\n')
  assert result.returncode == 1 and 'no results table' in result.stderr
