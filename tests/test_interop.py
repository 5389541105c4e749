"""Official-checkpoint loading, safety and torchvision export."""

import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip(
  'torch', reason='interop tests need PyTorch (CPU): pip install torch==2.13.0'
)

from msf_jax.interop import (  # noqa: E402
  __main__ as interop_command_line,
  backbones,
  torch_checkpoint as tc,
)
from msf_jax.models import backbone_only  # noqa: E402
from msf_jax.testing import small_config, torch_reference  # noqa: E402


class NotAllowed:
  """Any class other than argparse.Namespace must be refused by the loader."""


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  return torch_reference.MeanShift(18, mem_bank_size=32, topk=5)


def save(path, state_dict, **extra):
  torch.save({'state_dict': state_dict, 'epoch': 3, **extra}, path)
  return str(path)


def data_parallel_keys(state_dict):
  """Keys as the official code saves them after `model.data_parallel()`."""
  out = {}
  for key, value in state_dict.items():
    net, _, rest = key.partition('.')
    out[f'{net}.module.{rest}' if net in (tc.ONLINE, tc.TARGET, tc.PREDICTOR) else key] = value
  return out


@pytest.mark.parametrize('wrap', [False, True], ids=['plain', 'data_parallel'])
def test_official_checkpoint_round_trips(tmp_path, reference, wrap):
  state_dict = reference.state_dict()
  path = save(
    tmp_path / 'ckpt.pth.tar',
    data_parallel_keys(state_dict) if wrap else state_dict,
    opt=argparse.Namespace(arch='resnet18', topk=5),
  )
  config = small_config(depth=50, bank_size=8)  # Architecture and bank come from the file.
  state, config = tc.load_official_checkpoint(path, config, jax.random.key(0))
  assert (config.model.depth, config.model.small_stem, config.msf.bank_size) == (18, False, 32)
  back = tc.state_to_official(state)
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.slow  # two ResNet-18 states created and converted both ways
def test_narrow_model_round_trips_with_its_architecture():
  from msf_jax import create_state

  config = small_config(image_size=32, small_stem=True, bank_size=16)
  config.model.width = 8
  state = create_state(config, jax.random.key(1))
  official = tc.state_to_official(state)
  inferred = tc.config_for_checkpoint(small_config(depth=50), official)
  assert (
    inferred.model.depth,
    inferred.model.small_stem,
    inferred.model.width,
    inferred.msf.bank_size,
  ) == (18, True, 8, 16)
  template = create_state(inferred, jax.random.key(2))
  back = tc.state_to_official(tc.state_from_official(official, template))
  for key, value in official.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_exported_backbone_loads_into_a_torchvision_resnet(tmp_path, reference):
  path = save(tmp_path / 'ckpt.pth.tar', reference.state_dict())
  state, _ = tc.load_official_checkpoint(path, small_config(), jax.random.key(0))
  out = tmp_path / 'backbone.pth'
  tc.save_torch_file(tc.backbone_to_torchvision(state, 'target'), str(out))
  resnet = torch_reference.resnet(18)
  missing, unexpected = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
  assert not missing and not unexpected
  for key, value in resnet.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      torch.testing.assert_close(value, reference.encoder_t.state_dict()[key], rtol=0, atol=0)


def read_exported(path):
  """{key: numpy array} of an exported backbone, read with the format's own reader."""
  if path.endswith(tc.SAFETENSORS_EXTENSION):
    return safetensors.numpy.load_file(path)
  return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize('suffix', ['.pth', tc.SAFETENSORS_EXTENSION])
def test_export_has_torchvision_shapes_and_reads_back_as_the_same_variables(
  tmp_path, reference, suffix
):
  state, config = tc.load_official_checkpoint(
    save(tmp_path / 'ckpt.pth.tar', reference.state_dict()), small_config(), jax.random.key(0)
  )
  out = str(tmp_path / f'backbone{suffix}')
  tc.save_backbone(tc.backbone_to_torchvision(state, 'online'), out)
  written = {k: (v.shape, v.dtype.name) for k, v in read_exported(out).items()}
  torchvision = {
    k: (tuple(v.shape), str(v.dtype).removeprefix('torch.'))
    for k, v in torch_reference.resnet(18).state_dict().items()
  }
  assert written == torchvision  # num_batches_tracked included: int64 scalars []
  assert written['bn1.num_batches_tracked'] == ((), 'int64')
  file_format = 'safetensors' if suffix == tc.SAFETENSORS_EXTENSION else 'torchvision'
  back = backbones.encoder_from_torchvision(
    backbones.backbone_state_dict(out, file_format), config.model, config.image_size, out
  )
  expected = jax.device_get(backbone_only(state.online))
  assert jax.tree.structure(back) == jax.tree.structure(expected)
  for got, want in zip(
    jax.tree.leaves(jax.device_get(back)), jax.tree.leaves(expected), strict=True
  ):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path, reference):
  path = save(tmp_path / 'evil.pth.tar', reference.state_dict(), extra=NotAllowed())
  with pytest.raises(tc.CheckpointError, match='Refusing to load'):
    tc.read_torch_file(path)


def test_missing_and_mismatched_keys_are_clear_errors(tmp_path, reference):
  state_dict = dict(reference.state_dict())
  del state_dict['encoder_t.layer2.0.conv1.weight']
  path = save(tmp_path / 'partial.pth.tar', state_dict)
  with pytest.raises(tc.CheckpointError, match='encoder_t.layer2.0.conv1.weight'):
    tc.load_official_checkpoint(path, small_config(), jax.random.key(0))
  with pytest.raises(tc.CheckpointError, match='Not an MSF checkpoint'):
    tc.official_state_dict({'state_dict': {'conv1.weight': torch.zeros(1)}})


@pytest.mark.slow  # python -m msf_jax.interop, with torch
def test_command_line_exports_a_backbone(tmp_path, reference, capsys):
  path = save(tmp_path / 'ckpt.pth.tar', reference.state_dict())
  out = tmp_path / 'backbone.pth'
  # From outside the checkout: the command line needs no file of the source tree.
  result = subprocess.run(
    [sys.executable, '-m', 'msf_jax.interop', 'export-backbone', path, str(out)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stderr
  assert 'layer4.1.bn2.running_var' in torch.load(out, weights_only=True)
  # Its other command and its error, through the same `main` in this process.
  assert interop_command_line.main(['summary', path]) == 0
  printed = capsys.readouterr().out
  assert 'ResNet-18 (small stem: False, width 64)' in printed and '32 x 128' in printed
  assert interop_command_line.main(['summary', str(tmp_path / 'missing.pth')]) == 1
  assert 'error:' in capsys.readouterr().err
