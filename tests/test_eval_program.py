"""The evaluation program: encoders from every checkpoint format, backbone export to .pth and
.safetensors, the feature cache, and `evaluate` end to end on the digits (a narrow ResNet-18
keeps every forward pass to seconds on the CPU)."""

import argparse
import datetime
import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import tensorflow_datasets as tfds

from msf_jax import create_state, load_config, make_mesh
from msf_jax.checkpoint import Checkpointer, checkpoint_directory
from msf_jax.data import sources
from msf_jax.evaluate import features as features_module, run
from msf_jax.evaluate.features import cached_features, write_atomically
from msf_jax.evaluate.transfer import DEFAULT_REGULARIZATIONS
from msf_jax.interop import torch_checkpoint as tc
from msf_jax.interop.__main__ import main as interop_main
from msf_jax.interop.backbones import load_encoder, random_encoder
from msf_jax.models import backbone_only, build_networks
from msf_jax.testing import small_config

from helpers import EVAL_CONFIG, EVAL_WIDTH, eval_config, run_in_process

KNN_KEYS = {f'knn/{vote}/k={k}' for vote in ('majority', 'weighted') for k in (1, 20)}


def backbone_features(variables, images):
  encoder, _ = build_networks(eval_config().model)
  return np.asarray(
    jax.jit(lambda v, x: encoder.apply(v, x, method=encoder.features))(variables, images)
  )


def backbone_of(state, encoder):
  return backbone_only(getattr(state, encoder))


@pytest.fixture(scope='module')
def state():
  """A digits-model state whose target encoder differs from the online one, as in training."""
  config = small_config(image_size=24, small_stem=True, bank_size=32)
  config.model.width = EVAL_WIDTH
  state = create_state(config, jax.random.key(0))
  other = create_state(config, jax.random.key(1))
  return state.replace(
    step=state.step + 5, target={**state.target, 'params': other.online['params']}
  )


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, state):
  """A training workdir holding `state` at step 5, as msf_jax.main writes it."""
  workdir = tmp_path_factory.mktemp('training')
  checkpointer = Checkpointer(checkpoint_directory(str(workdir)))
  checkpointer.save(int(state.step), state, force=True)
  checkpointer.wait()
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.key(2), (4, 24, 24, 3))


def export(source, out, *options):
  assert interop_main(['export-backbone', str(source), str(out), *options]) == 0
  return str(out)


def test_official_checkpoint_exports_to_pth_and_safetensors_with_the_same_tensors(tmp_path):
  torch = pytest.importorskip('torch', reason='official checkpoints are PyTorch files')
  from msf_jax.testing import torch_reference

  torch.manual_seed(0)
  reference = torch_reference.MeanShift(18, mem_bank_size=32, topk=5)
  path = tmp_path / 'msf_resnet18.pth.tar'
  torch.save(
    {'state_dict': reference.state_dict(), 'opt': argparse.Namespace(arch='resnet18')}, path
  )
  expected = {
    key: value.numpy()
    for key, value in reference.encoder_t.state_dict().items()
    if not key.startswith('fc.')
  }
  pth = export(path, tmp_path / 'backbone.pth', '--encoder', 'target')
  from_safetensors = safetensors.numpy.load_file(
    export(path, tmp_path / 'backbone.safetensors', '--encoder', 'target')
  )
  from_pth = {key: value.numpy() for key, value in torch.load(pth, weights_only=True).items()}
  for tensors in (from_pth, from_safetensors):
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(tensors[key], value, err_msg=key)


@pytest.mark.slow  # each format's features of the digits
@pytest.mark.parametrize('encoder', ['online', 'target'])
def test_every_format_loads_the_same_encoder(tmp_path, state, workdir, images, encoder):
  expected = backbone_features(backbone_of(state, encoder), images)
  paths = {
    'msf_jax': workdir,
    'safetensors': export(workdir, tmp_path / 'b.safetensors', '--encoder', encoder),
  }
  try:
    import torch

    paths['torchvision'] = export(workdir, tmp_path / 'b.pth', '--encoder', encoder)
    paths['official'] = str(tmp_path / 'official.pth.tar')
    torch.save(
      {
        'state_dict': {
          key: torch.from_numpy(np.array(value))
          for key, value in tc.state_to_official(state).items()
        }
      },
      paths['official'],
    )
  except ImportError:  # .pth formats need torch, an optional dependency
    pass
  for checkpoint_format, path in paths.items():
    variables, model = load_encoder(
      eval_config(checkpoint=path, encoder=encoder, checkpoint_format=checkpoint_format)
    )
    assert model.width == EVAL_WIDTH and model.depth == 18
    np.testing.assert_array_equal(
      backbone_features(variables, images), expected, err_msg=checkpoint_format
    )
  other = 'target' if encoder == 'online' else 'online'
  assert np.abs(backbone_features(backbone_of(state, other), images) - expected).max() > 1e-3


def test_an_msf_jax_checkpoint_brings_its_model_settings(tmp_path, state):
  checkpointer = Checkpointer(checkpoint_directory(str(tmp_path)))
  checkpointer.save(5, state, force=True, metadata={'model': eval_config().model.to_dict()})
  checkpointer.wait()
  config = load_config(EVAL_CONFIG, 'digits')  # width 64: no --config.model flag given
  config.checkpoint = str(tmp_path)
  variables, model = load_encoder(config)
  assert model.width == EVAL_WIDTH
  assert variables['params']['backbone']['conv1']['kernel'].shape[-1] == EVAL_WIDTH


def test_bad_checkpoints_are_clear_errors(tmp_path, workdir):
  with pytest.raises(ValueError, match="checkpoint_format.*'onnx'"):
    load_encoder(eval_config(checkpoint=workdir, checkpoint_format='onnx'))
  missing = str(tmp_path / 'missing.safetensors')
  with pytest.raises(FileNotFoundError, match='missing.safetensors'):
    load_encoder(eval_config(checkpoint=missing, checkpoint_format='safetensors'))
  with pytest.raises(FileNotFoundError, match='no_run'):
    load_encoder(eval_config(checkpoint=str(tmp_path / 'no_run'), checkpoint_format='msf_jax'))
  with pytest.raises(tc.CheckpointError, match='No msf_jax checkpoint'):
    load_encoder(eval_config(checkpoint=str(tmp_path), checkpoint_format='msf_jax'))
  with pytest.raises(tc.CheckpointError, match=r'no step 3; it has steps \[5\]'):
    load_encoder(eval_config(checkpoint=workdir, checkpoint_format='msf_jax', step=3))
  exported = export(workdir, tmp_path / 'b.safetensors')
  with pytest.raises(tc.CheckpointError, match='msf_jax checkpoints are directories'):
    load_encoder(eval_config(checkpoint=exported, checkpoint_format='msf_jax'))
  with pytest.raises(tc.CheckpointError, match='--config.model.depth=18'):
    load_encoder(
      eval_config(checkpoint=exported, checkpoint_format='safetensors', **{'model.depth': 34})
    )
  with pytest.raises(tc.CheckpointError, match='--config.model.small_stem=True'):
    load_encoder(
      eval_config(
        checkpoint=exported, checkpoint_format='safetensors', **{'model.small_stem': False}
      )
    )
  with pytest.raises(tc.CheckpointError, match="checkpoint_format='msf_jax'"):
    load_encoder(eval_config(checkpoint=workdir, checkpoint_format='safetensors'))


@pytest.mark.slow  # feature extractions of the digits, cached and not
def test_feature_cache_skips_the_forward_pass_and_misses_for_another_encoder(tmp_path, monkeypatch):
  config = eval_config()
  split = sources.take(sources.digits('test', 24), 16)
  mesh = make_mesh()
  cache = str(tmp_path / 'cache')
  first = cached_features(random_encoder(config.model, 24, 0), split, config, mesh, cache, 16)
  assert first[0].shape == (16, 8 * EVAL_WIDTH) and len(os.listdir(cache)) == 1
  forward_passes = []
  extract = features_module.extract_split
  monkeypatch.setattr(
    features_module, 'extract_split', lambda *args: forward_passes.append(args) or extract(*args)
  )
  second = cached_features(random_encoder(config.model, 24, 0), split, config, mesh, cache, 16)
  assert not forward_passes
  np.testing.assert_array_equal(second[0], first[0])
  np.testing.assert_array_equal(second[1], first[1])
  other = cached_features(random_encoder(config.model, 24, 1), split, config, mesh, cache, 16)
  assert len(forward_passes) == 1 and np.abs(other[0] - first[0]).max() > 1e-3
  fewer = sources.take(split, 8)
  cached_features(random_encoder(config.model, 24, 0), fewer, config, mesh, cache, 16)
  assert len(forward_passes) == 2
  assert len(os.listdir(cache)) == 3  # one file each, no temporary left behind


def test_interrupted_write_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / 'results.json')
  write_atomically(path, b'old')

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(features_module.tf.io.gfile, 'rename', killed)
  with pytest.raises(KeyboardInterrupt):
    write_atomically(path, b'new')
  assert os.listdir(tmp_path) == ['results.json']
  assert (tmp_path / 'results.json').read_bytes() == b'old'


def test_ctrl_c_during_feature_extraction_caches_nothing(tmp_path, monkeypatch):
  config = eval_config()
  split = sources.take(sources.digits('test', 24), 32)
  batches = []
  to_global = features_module.pipeline.to_global

  def interrupted_at_the_second_batch(*args):
    batches.append(args)
    if len(batches) == 2:
      raise KeyboardInterrupt
    return to_global(*args)

  monkeypatch.setattr(features_module.pipeline, 'to_global', interrupted_at_the_second_batch)
  cache = tmp_path / 'cache'
  with pytest.raises(KeyboardInterrupt):
    cached_features(random_encoder(config.model, 24, 0), split, config, make_mesh(), str(cache), 16)
  assert len(batches) == 2 and not (cache.exists() and os.listdir(cache))


@pytest.mark.slow  # features and a linear probe of the 1,797 digits
def test_evaluate_a_random_encoder_on_digits(tmp_path):
  config = eval_config(
    checkpoint_format='random',
    tasks='knn,linear_fast,linear',
    batch_size=32,
    **{
      'data.max_examples': 96,
      'linear.epochs': 3,
      'linear.batch_size': 32,
      'linear.milestones': (2,),
    },
  )
  results = run.evaluate(config, str(tmp_path))
  record = json.loads((tmp_path / run.RESULTS_FILE).read_text())
  assert record['results'] == results
  assert set(results) == KNN_KEYS | {
    f'{probe}/top{k}' for probe in ('linear_fast', 'linear') for k in (1, 5)
  }
  assert all(0 <= value <= 1 for value in results.values())
  # Random convolutional features already separate the digits (chance: 0.1).
  assert results['knn/majority/k=1'] > 0.4 and results['linear_fast/top5'] > 0.5
  assert (record['checkpoint_format'], record['dataset'], record['step']) == (
    'random',
    'digits',
    None,
  )
  assert datetime.datetime.fromisoformat(record['timestamp']).tzinfo is not None
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  assert len(os.listdir(tmp_path / run.CACHE_DIR)) == 2  # train and test, computed once
  # The test features, for TensorBoard's embedding projector.
  projected = np.loadtxt(tmp_path / run.PROJECTOR_DIR / 'features.tsv', delimiter='\t')
  assert projected.shape == (96, 8 * EVAL_WIDTH)
  labels = (tmp_path / run.PROJECTOR_DIR / 'labels.tsv').read_text().split()
  assert len(labels) == 96 and set(labels) <= set(map(str, range(10)))
  assert (
    'tensor_path: "projector/features.tsv"' in (tmp_path / 'projector_config.pbtxt').read_text()
  )


@pytest.mark.slow  # an evaluation of the digits
def test_evaluate_records_the_step_of_an_msf_jax_checkpoint(tmp_path, workdir):
  config = eval_config(
    checkpoint=workdir,
    checkpoint_format='msf_jax',
    tasks='knn',
    **{'data.max_examples': 24, 'knn.ks': (1, 3)},
  )
  results = run.evaluate(config, str(tmp_path))
  record = json.loads((tmp_path / run.RESULTS_FILE).read_text())
  assert record['step'] == 5 and record['checkpoint'] == os.path.abspath(workdir)
  assert set(results) == {f'knn/{vote}/k={k}' for vote in ('majority', 'weighted') for k in (1, 3)}


@pytest.mark.slow  # TFDS mock datasets and a transfer run
def test_transfer_reads_tfds_datasets_and_names_a_missing_one(tmp_path):
  config = eval_config(
    checkpoint_format='random',
    tasks='transfer',
    batch_size=16,
    **{'transfer.datasets': 'cifar10', 'data.data_dir': str(tmp_path)},
  )
  with pytest.raises(sources.DatasetNotFoundError, match="'cifar10' is not prepared"):
    run.evaluate(config, str(tmp_path / 'missing'))
  config.transfer.datasets = 'aircraft'
  with pytest.raises(sources.DatasetNotFoundError, match='no TFDS version'):
    run.evaluate(config, str(tmp_path / 'aircraft'))
  config.transfer.datasets = 'cifar10,imagenet'
  with pytest.raises(ValueError, match=r"unknown \['imagenet'\]"):
    run.evaluate(config, str(tmp_path / 'unknown'))
  config.transfer.datasets = 'cifar10'
  with tfds.testing.mock_data(num_examples=24):  # random images and labels, offline
    results = run.evaluate(config, str(tmp_path / 'mock'))
  assert set(results) == {
    'transfer/cifar10/top1',
    'transfer/cifar10/val_top1',
    'transfer/cifar10/regularization',
  }
  assert 0 <= results['transfer/cifar10/top1'] <= 1
  assert results['transfer/cifar10/regularization'] in DEFAULT_REGULARIZATIONS


def test_unknown_task_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"unknown \['knnn'\]"):
    run.evaluate(eval_config(checkpoint_format='random', tasks='knnn,linear'), str(tmp_path))


def main_args(workdir, *settings):
  """msf_jax.main's arguments for the digits evaluation config and the narrow model."""
  return [
    f'--config={EVAL_CONFIG}:digits',
    f'--workdir={workdir}',
    f'--config.model.width={EVAL_WIDTH}',
    *settings,
  ]


@pytest.mark.slow
def test_main_evaluates_in_evaluate_mode(tmp_path, capfd):
  # msf_jax.main's run in this process (test_distributed.py evaluates with two processes).
  settings = [
    '--config.checkpoint_format=random',
    '--config.tasks=knn',
    '--config.data.max_examples=64',
  ]
  code, console = run_in_process(main_args(tmp_path, *settings), capfd)
  assert not code, console[-3000:]
  record = json.loads((tmp_path / run.RESULTS_FILE).read_text())
  assert set(record['results']) == KNN_KEYS


def test_main_names_a_wrong_format_and_a_misspelt_key(tmp_path, capfd):
  # msf_jax.main's run in this process, as test_main.py's mistakes: both stop at the config.
  code, console = run_in_process(main_args(tmp_path, '--config.checkpoint_format=onnx'), capfd)
  assert code == 1 and "got 'onnx'" in console, console[-3000:]
  assert 'error: ' in console and 'Traceback' not in console, console[-3000:]
  code, console = run_in_process(main_args(tmp_path, '--config.knn.kss=1'), capfd)
  assert code != 0 and 'kss' in console, console[-3000:]
