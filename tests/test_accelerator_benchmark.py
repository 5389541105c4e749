"""benchmarks/accelerator.py: its FLOP count, and a whole `--tiny` run on the CPU that must give
every number the accelerator run reports, with the table printed last."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, benchmark

SCRIPT = os.path.join(REPO, 'benchmarks', 'accelerator.py')
accelerator = benchmark('accelerator')


def test_resnet_macs_match_the_published_counts():
  # torchvision's counts at 224 px: 4.09 GMAC (ResNet-50), 1.81 GMAC (ResNet-18).
  assert accelerator.resnet_forward_macs(50, 64, 224, False) / 1e9 == pytest.approx(4.087, 1e-3)
  assert accelerator.resnet_forward_macs(18, 64, 224, False) / 1e9 == pytest.approx(1.814, 1e-3)
  flops = accelerator.msf_model_flops(50, 64, 224, False, 1_024_000)
  assert 33e9 < flops['flops'] < 35e9  # 4 forwards of 4.1 GMAC + the bank product


@pytest.mark.slow
def test_tiny_run_measures_every_part_and_prints_the_table_last(tmp_path):
  out = tmp_path / 'r.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # one CPU device
  result = subprocess.run(
    [sys.executable, SCRIPT, '--tiny', '--out', str(out)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['mode'] == 'tiny' and '--tiny' in report['command'] and report['date']
  assert report['machine']['device_count'] == 1 and report['machine']['jax']
  parts = report['results']
  step, peak = parts['msf_jax'], parts['matmul_peak']
  assert step['measured'] and peak['measured'], (step, peak)
  assert step['images_per_s'] > 0 and peak['flops_per_s'] > 0
  assert len(step['times_s']) == report['settings']['timed_steps']
  assert step['model_flops_per_step_per_device'] > 0 and step['xla_flops_per_step_per_device'] > 0
  assert 0 < step['mfu'] <= 1 and 0 < step['mfu_xla'] <= 1
  assert step['config']['model']['width'] == 8
  planner = step['planner']  # msf_jax.plan's bound and estimate of the same program
  assert 0 < planner['bound_seconds'] <= planner['estimate_seconds'], planner
  assert 'msf_jax.plan on this program' in result.stdout
  assert parts['pipeline']['measured'] and parts['pipeline']['samples_per_s'] > 0
  search = parts['bank_search']
  assert search['measured'] and search['bfloat16_speedup'] > 0, search
  assert search['candidates'] > search['k'] and 0 <= search['same_neighbours'] <= 1

  lines = result.stdout.rstrip().splitlines()
  header = max(i for i, line in enumerate(lines) if line.startswith('| measured |'))
  table = lines[header:]
  assert all(line.startswith('|') for line in table)  # nothing printed after it
  names = (
    'matmul peak',
    'msf_jax step',
    'bank search alone',
    'PyTorch official step, fp32',
    'PyTorch official step, autocast bf16',
    'input pipeline',
  )
  rows = {name: next(line for line in table if name in line) for name in names}
  torch_available = importlib.util.find_spec('torch') is not None
  for name in ('torch_fp32', 'torch_bf16'):
    assert parts[name]['measured'] == torch_available, parts[name]
    if torch_available:
      assert parts[name]['images_per_s'] > 0 and 0 < parts[name]['mfu']
    else:
      assert 'torch' in parts[name]['reason']
  for name, row in rows.items():
    measured = torch_available or not name.startswith('PyTorch')
    assert ('not measured' not in row) == measured, row
