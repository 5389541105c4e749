"""A frozen encoder to evaluate, from any of the checkpoint formats msf_jax reads.

Every format goes through one torchvision-named backbone state dict (numpy, no `fc`), so the
architecture check and the weight layout are the same whatever the file:

  msf_jax      an orbax checkpoint directory of msf_jax.checkpoint.Checkpointer, or the
               training workdir holding it in checkpoints/ (latest step unless config.step)
  official     an official MSF PyTorch checkpoint (.pth.tar)
  torchvision  a torchvision ResNet state dict (.pth): ImageNet weights, or one written by
               `python -m msf_jax.interop export-backbone`; the classifier fc.* is ignored
  safetensors  the same torchvision keys in a .safetensors file (no torch, no pickle)
  random       a randomly initialized encoder from config.seed: the untrained baseline

msf_jax directories and .safetensors files may be gs:// URLs (tf.io.gfile); torch files are
read from local paths. Variables are the backbone's
{'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} of msf_jax.models.Encoder;
`Encoder.features` needs nothing else.
"""

import re
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
import tensorflow as tf
from absl import logging

from msf_jax import checkpoint
from msf_jax.config_utils import ConfigError
from msf_jax.interop import torch_checkpoint as tc
from msf_jax.models import Variables, backbone_only, init_encoder

FORMATS = ('msf_jax', 'official', 'torchvision', 'safetensors', 'random')
ENCODERS = ('online', 'target')
_CLASSIFIER = re.compile(r'^fc\.')


def msf_jax_step(path: str, step: int | None = None) -> int:
  """The step an msf_jax checkpoint (a workdir or its checkpoint directory) is read at:
  `step` if it has it, else its latest."""
  return checkpoint.resolve_step(checkpoint.find_checkpoint_directory(path), step)


def _msf_jax_backbone(path: str, encoder: str, step: int | None) -> dict[str, np.ndarray]:
  """Restores only the chosen encoder's backbone (not the bank or optimizer) as numpy."""
  directory = checkpoint.find_checkpoint_directory(path)
  step = checkpoint.resolve_step(directory, step)
  checkpointer = checkpoint.Checkpointer(directory)
  try:
    params, batch_stats = checkpointer.restore_subtrees(
      step, [(encoder, collection, 'backbone') for collection in ('params', 'batch_stats')]
    )
  finally:
    checkpointer.close()
  tensors = tc.network_to_torch(
    '', {'params': {'backbone': params}, 'batch_stats': {'backbone': batch_stats}}, step
  )
  return tc.state_dict_arrays(tensors, f'The msf_jax checkpoint {path} at step {step}')


def _official_backbone(path: str, encoder: str) -> dict[str, np.ndarray]:
  state_dict = tc.official_state_dict(tc.read_torch_file(path), path)
  start = tc.OFFICIAL_PREFIXES[encoder] + '.'
  return {
    key[len(start) :]: value
    for key, value in state_dict.items()
    if key.startswith(start) and not _CLASSIFIER.match(key[len(start) :])
  }


def _without_classifier(state_dict: dict[str, Any], source: str) -> dict[str, np.ndarray]:
  """Checked numpy arrays of a torchvision state dict, DataParallel's `module.` and `fc.*`
  removed."""
  state_dict = state_dict.get('state_dict', state_dict)
  if isinstance(state_dict, dict) and any(
    key.startswith((tc.ONLINE + '.', 'module.' + tc.ONLINE)) for key in state_dict
  ):
    raise tc.CheckpointError(
      'This is an official MSF checkpoint (encoder_q.* keys), not a '
      "torchvision backbone: use checkpoint_format='official'."
    )
  arrays = tc.state_dict_arrays(state_dict, source)
  return {
    re.sub(r'^module\.', '', key): value
    for key, value in arrays.items()
    if not _CLASSIFIER.match(re.sub(r'^module\.', '', key))
  }


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  with tf.io.gfile.GFile(path, 'rb') as f:
    payload = f.read()
  try:
    return safetensors.numpy.load(payload)
  except Exception as e:  # SafetensorError derives from Exception only
    problem = 'is empty' if not payload else f'is not a safetensors file ({e})'
    raise tc.CheckpointError(f'{path} {problem}.') from e


def backbone_state_dict(
  path: str, checkpoint_format: str, encoder: str = 'online', step: int | None = None
) -> dict[str, np.ndarray]:
  """The torchvision-named numpy tensors of a checkpoint's backbone (no classifier)."""
  if checkpoint_format not in FORMATS[:-1]:
    raise ConfigError(
      f'checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r} '
      "('random' reads no file)."
    )
  if encoder not in ENCODERS:
    raise ConfigError(f"encoder must be 'online' or 'target', got {encoder!r}.")
  if not path or not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'No {checkpoint_format} checkpoint at {path!r} (config.checkpoint).')
  if checkpoint_format == 'msf_jax':
    return _msf_jax_backbone(path, encoder, step)
  if tf.io.gfile.isdir(path):
    raise tc.CheckpointError(
      f'{path} is a directory, not a {checkpoint_format} file: use '
      "checkpoint_format='msf_jax' for an msf_jax checkpoint directory."
    )
  if checkpoint_format == 'official':
    return _official_backbone(path, encoder)
  if checkpoint_format == 'torchvision':
    return _without_classifier(tc.read_torch_file(path), path)
  return _without_classifier(_read_safetensors(path), path)


def _describe(model: dict[str, Any]) -> str:
  return ', '.join(f'{key}={value}' for key, value in model.items())


def check_architecture(
  state_dict: dict[str, np.ndarray], model_config: ml_collections.ConfigDict, source: str
) -> None:
  """Raises a CheckpointError naming the settings to change when the file's ResNet is not the
  one `model_config` describes."""
  found = tc.infer_backbone(state_dict)
  mismatched = {
    key: value for key, value in found.items() if key in model_config and model_config[key] != value
  }
  if mismatched:
    flags = ' '.join(f'--config.model.{key}={value}' for key, value in mismatched.items())
    wanted = {key: model_config[key] for key in mismatched}
    raise tc.CheckpointError(
      f'{source} holds a ResNet with {_describe(found)}, but config.model '
      f'says {_describe(wanted)}: run with {flags}.'
    )


def encoder_from_torchvision(
  state_dict: dict[str, np.ndarray],
  model_config: ml_collections.ConfigDict,
  image_size: int,
  source: str,
) -> Variables:
  """Backbone variables of an Encoder from torchvision-named tensors, after checking that the
  architecture matches `model_config` (a missing or extra key is an error too)."""
  check_architecture(state_dict, model_config, source)
  template = jax.eval_shape(lambda: init_encoder(model_config, image_size, jax.random.key(0)))
  return tc.network_from_torch('', state_dict, backbone_only(template))


def random_encoder(
  model_config: ml_collections.ConfigDict, image_size: int, seed: int
) -> Variables:
  """Backbone variables of a freshly initialized Encoder (torchvision init) from `seed`."""
  return backbone_only(init_encoder(model_config, image_size, jax.random.key(seed)))


def trained_model_config(path: str, step: int | None = None) -> ml_collections.ConfigDict | None:
  """The model section of the config an msf_jax checkpoint was trained with (saved beside
  it), or None for a checkpoint that has none (written before configs were kept)."""
  directory = checkpoint.find_checkpoint_directory(path)
  checkpointer = checkpoint.Checkpointer(directory)
  try:
    saved = checkpointer.read_metadata(checkpoint.resolve_step(directory, step))
  finally:
    checkpointer.close()
  return ml_collections.ConfigDict(saved['model']) if saved and 'model' in saved else None


def load_encoder(config: ml_collections.ConfigDict) -> tuple[Variables, ml_collections.ConfigDict]:
  """(backbone variables, model config) of the encoder `config` names: config.checkpoint in
  config.checkpoint_format, config.encoder ('online' or 'target') and, for msf_jax
  checkpoints, config.step (None: the latest). An msf_jax checkpoint brings its own model
  settings (saved with it), so that no --config.model flag is needed. The weights are host
  numpy/JAX arrays."""
  model_config = config.model.copy_and_resolve_references()
  if config.checkpoint_format == 'msf_jax':
    trained = trained_model_config(config.checkpoint, config.get('step'))
    if trained is not None and trained.to_dict() != model_config.to_dict():
      logging.info('Model settings from the checkpoint: %s', _describe(trained.to_dict()))
      model_config = trained
  if config.checkpoint_format == 'random':
    return random_encoder(model_config, config.image_size, config.seed), model_config
  state_dict = backbone_state_dict(
    config.checkpoint, config.checkpoint_format, config.encoder, config.get('step')
  )
  source = f'The {config.checkpoint_format} checkpoint {config.checkpoint}'
  return (
    encoder_from_torchvision(state_dict, model_config, config.image_size, source),
    model_config,
  )
