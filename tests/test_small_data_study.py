"""The small-data study's own logic: disjoint texture splits, one factor at a time, the
combination of the best levels."""

import dataclasses
import json
import time

import numpy as np

from helpers import benchmark

study = benchmark('small_data_study')


def test_texture_test_patches_never_share_a_pixel_with_train_patches():
  rows = np.repeat(np.arange(200, dtype=np.uint8)[:, None], 300, axis=1)  # pixel = its row
  train, test = study.texture_patches(rows, np.random.default_rng(0))
  boundary = int(200 * study.TRAIN_FRACTION)
  assert len(train) == study.TRAIN_PATCHES and len(test) == study.TEST_PATCHES
  assert all(p.shape == (study.PATCH_SIZE,) * 2 for p in train + test)
  assert max(p.max() for p in train) < boundary <= min(p.min() for p in test)


def test_settings_change_one_factor_at_a_time_and_cover_every_level():
  settings = study.one_factor_settings()
  assert settings[0] == study.BASE and len(set(settings)) == len(settings)
  for setting in settings[1:]:
    changed = [f for f in study.FACTORS if getattr(setting, f) != getattr(study.BASE, f)]
    assert len(changed) == 1
  for factor, levels in study.FACTORS.items():
    assert {getattr(s, factor) for s in settings} == set(levels)


def test_combined_setting_takes_each_factors_most_robust_level(tmp_path):
  def write(setting, seed, knn20):
    path = tmp_path / 'runs' / 'digits' / setting.name / f'seed{seed}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
      json.dumps({'setting': dataclasses.asdict(setting), 'results': {'knn/majority/k=20': knn20}})
    )

  for setting in study.one_factor_settings():
    for seed in study.SEEDS:
      write(setting, seed, 0.5)
  # lr 0.1 has the best mean but one bad seed; lr 1.0 the best worst seed: robust wins.
  write(dataclasses.replace(study.BASE, base_lr=0.1), 0, 0.95)
  write(dataclasses.replace(study.BASE, base_lr=0.1), 1, 0.4)
  for seed in study.SEEDS:
    write(dataclasses.replace(study.BASE, base_lr=1.0), seed, 0.6)
    write(dataclasses.replace(study.BASE, topk=2), seed, 0.7)
  assert study.combined_setting(str(tmp_path), 'digits') == dataclasses.replace(
    study.BASE, base_lr=1.0, topk=2
  )


def fake_runner(tmp_path, ran, cores):
  """A stand-in for one training: records the job and its core, writes a record in which
  k = 10 and lr 0.1 win and every other level ties the base."""

  def fake_run(job, out, epochs, core):
    dataset, setting, seed = job
    ran.append(job)
    cores.add(core)
    time.sleep(0.2)  # long enough for the other worker to take a job meanwhile
    path = tmp_path / 'runs' / dataset / setting.name / f'seed{seed}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    knn20 = 0.5 + 0.2 * (setting.topk == 10) + 0.1 * (setting.base_lr == 0.1)
    path.write_text(
      json.dumps({'setting': dataclasses.asdict(setting), 'results': {'knn/majority/k=20': knn20}})
    )

  return fake_run


def test_run_study_runs_each_missing_job_once_then_the_combination(tmp_path, monkeypatch):
  ran, cores = [], set()
  fake_run = fake_runner(tmp_path, ran, cores)
  monkeypatch.setattr(study, '_run_job', fake_run)
  done_before = ('textures', study.BASE, 0)
  fake_run(done_before, None, None, None)  # an earlier invocation's run
  ran.clear()
  cores.clear()
  study.run_study(['textures'], str(tmp_path), workers=2, epochs=1)
  one_factor = {
    ('textures', s, seed)
    for s in study.one_factor_settings(study.VARIED['textures'])
    for seed in (study.SEEDS if s == study.BASE else study.VARIATION_SEEDS['textures'])
  }
  best = dataclasses.replace(study.BASE, topk=10, base_lr=0.1)
  combination = {('textures', best, seed) for seed in study.SEEDS}
  assert len(ran) == len(set(ran)) and set(ran) == one_factor - {done_before} | combination
  assert set(ran[-3:]) == combination and cores == {0, 1}

  # Resumed once the one-factor runs are all done: both workers take combination runs.
  for path in (tmp_path / 'runs' / 'textures' / best.name).glob('seed*.json'):
    path.unlink()
  ran.clear()
  cores.clear()
  study.run_study(['textures'], str(tmp_path), workers=2, epochs=1)
  assert sorted(ran, key=lambda job: job[2]) == sorted(combination, key=lambda job: job[2])
  assert cores == {0, 1}
