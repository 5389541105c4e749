"""Official MSF PyTorch checkpoints <-> MSFState, and torchvision-style backbone export.

Official layout (`torch.load(path)['state_dict']`): `encoder_q.*` online backbone with its
projection MLP as `fc.0/1/3`, `encoder_t.*` the target, `predict_q.0/1/3.*` the predictor,
`queue` [K, D], `labels` [K], `queue_ptr` [1]. Under DataParallel each network's keys carry
`module.` after the network name. Flax names mirror torchvision's (`layer1_0` for `layer1.0`),
so the mapping below is a renaming plus the kernel layout change.
"""

import argparse
import pickle
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from flax import traverse_util

from msf_jax.checkpoint import CheckpointError
from msf_jax.mean_shift import MemoryBank
from msf_jax.models import Variables, backbone_only
from msf_jax.models.resnet import BOTTLENECK_DEPTHS, STAGE_SIZES
from msf_jax.train_state import MSFState, create_state

ONLINE, TARGET, PREDICTOR = 'encoder_q', 'encoder_t', 'predict_q'
# MSFState's networks and their official prefixes.
OFFICIAL_PREFIXES = {'online': ONLINE, 'target': TARGET, 'predictor': PREDICTOR}
SAFETENSORS_EXTENSION = '.safetensors'
_LEAF_TO_TORCH = {
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('params', 'kernel'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      'Reading or writing PyTorch checkpoints needs torch, an optional dependency of '
      'msf_jax.interop: pip install torch'
    ) from e
  return torch


# torch.save writes a zip archive; files of torch < 1.6 are a bare pickle (protocol 2+).
_TORCH_FILE_STARTS = (b'PK\x03\x04', b'\x80')


def _check_torch_header(path: str) -> None:
  with open(path, 'rb') as f:
    start = f.read(4)
  if not start:
    raise CheckpointError(f'{path} is empty: not a checkpoint (an interrupted copy?).')
  if not start.startswith(_TORCH_FILE_STARTS):
    raise CheckpointError(
      f'{path} is not a PyTorch file: it is neither the zip archive that '
      'torch.save writes nor a pickle.'
    )


def read_torch_file(path: str) -> dict[str, Any]:
  """Loads a .pth/.pth.tar without running pickled code; anything that is not a PyTorch file
  holding a dict is a CheckpointError that says what it is instead.

  `weights_only=True` allows tensors and plain containers; official MSF checkpoints also
  pickle their `argparse.Namespace` options under 'opt', so exactly that class is allowed.
  """
  torch = _import_torch()
  _check_torch_header(path)
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
      f'Refusing to load {path}: it pickles objects other than tensors, plain containers '
      f'and argparse.Namespace, and unpickling them could run code from the file. Re-save '
      f'its state_dict alone if you trust it. PyTorch said: {str(e).splitlines()[0]}'
    ) from e
  except (EOFError, RuntimeError, KeyError, ValueError) as e:
    raise CheckpointError(
      f'{path} is a damaged PyTorch file ({type(e).__name__}: {str(e).strip()[:200]}).'
    ) from e
  if not isinstance(loaded, dict):  # weights_only unpickles no other mapping
    raise CheckpointError(
      f'{path} holds a {type(loaded).__name__}, not a state dict (a dict of tensors).'
    )
  return loaded


def state_dict_arrays(state_dict: Any, source: str) -> dict[str, np.ndarray]:
  """numpy arrays of a state dict (torch tensors or arrays), checked: a dict of tensors with
  finite floating-point values, or a CheckpointError naming the offending keys."""
  if not isinstance(state_dict, Mapping):
    raise CheckpointError(
      f'{source}: the state dict is a {type(state_dict).__name__}, not a dict of tensors.'
    )
  arrays, not_tensors = {}, []
  for key, value in state_dict.items():
    if hasattr(value, 'detach'):
      arrays[key] = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
      arrays[key] = value
    else:
      not_tensors.append(f'{key} ({type(value).__name__})')
  if not_tensors:
    raise CheckpointError(
      f'{source}: {len(not_tensors)} entries are not tensors: {", ".join(not_tensors[:5])}.'
    )
  not_finite = [
    key
    for key, value in arrays.items()
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
  ]
  if not_finite:
    raise CheckpointError(
      f'{source} has NaN or infinite weights in {len(not_finite)} tensors '
      f'({", ".join(not_finite[:5])}): the training that wrote it diverged.'
    )
  return arrays


def official_state_dict(
  checkpoint: Mapping[str, Any], source: str = 'The checkpoint'
) -> dict[str, np.ndarray]:
  """The numpy `state_dict` of an official checkpoint, with DataParallel's `module.` removed."""
  state_dict = checkpoint.get('state_dict', checkpoint)
  if not isinstance(state_dict, Mapping) or (
    'queue' not in state_dict and 'module.queue' not in state_dict
  ):
    raise CheckpointError(
      'Not an MSF checkpoint: no memory bank (`queue`) in its state_dict. Expected the keys '
      'encoder_q.*, encoder_t.*, predict_q.*, queue, labels, queue_ptr.'
    )
  arrays = state_dict_arrays(state_dict, source)
  return {re.sub(r'(^|\.)module\.', r'\1', key): value for key, value in arrays.items()}


def infer_backbone(state_dict: Mapping[str, np.ndarray], prefix: str = '') -> dict[str, Any]:
  """Depth, stem and width (first-stage channels) of the ResNet whose torchvision keys start
  with `prefix` ('' for a bare torchvision state dict), read from its keys and shapes."""
  start = f'{prefix}.' if prefix else ''
  if f'{start}conv1.weight' not in state_dict:
    raise CheckpointError(
      f'Not a ResNet state dict: no {start}conv1.weight among its keys '
      f'(first keys: {sorted(state_dict)[:4]}).'
    )
  blocks = [
    len({k[len(start) :].split('.')[1] for k in state_dict if k.startswith(f'{start}layer{i}.')})
    for i in range(1, 5)
  ]
  bottleneck = f'{start}layer1.0.conv3.weight' in state_dict
  depths = [
    d
    for d, sizes in STAGE_SIZES.items()
    if tuple(blocks) == sizes and (d in BOTTLENECK_DEPTHS) == bottleneck
  ]
  if not depths:
    raise CheckpointError(f'Unknown ResNet: blocks per stage {blocks}, bottleneck={bottleneck}.')
  conv1 = state_dict[f'{start}conv1.weight']  # [O, I, H, W]
  return {'depth': depths[0], 'small_stem': conv1.shape[-1] == 3, 'width': int(conv1.shape[0])}


def infer_model(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Depth, stem, width and bank size of an official state dict, read from its keys and
  shapes."""
  return {**infer_backbone(state_dict, ONLINE), 'bank_size': int(state_dict['queue'].shape[0])}


def config_for_checkpoint(
  config: ml_collections.ConfigDict, state_dict: Mapping[str, np.ndarray]
) -> ml_collections.ConfigDict:
  """A copy of `config` whose architecture and bank size are those of the checkpoint."""
  model = infer_model(state_dict)
  config = config.copy_and_resolve_references()
  for key in ('depth', 'small_stem', 'width'):
    config.model[key] = model[key]
  config.msf.bank_size = model['bank_size']
  return config


def _torch_module_name(name: str) -> str:
  # 'layer1_0' -> 'layer1.0', 'downsample_1' -> 'downsample.1', 'fc_3' -> '3' (inside `fc`).
  if re.fullmatch(r'fc_\d+', name):
    return name[3:]
  return re.sub(r'^(\w+?)_(\d+)$', r'\1.\2', name)


def _torch_key(prefix: str, collection: str, path: tuple[str, ...]) -> str:
  names = [{'backbone': None, 'projector': 'fc'}.get(n, n) for n in path[:-1]]
  modules = [_torch_module_name(n) for n in names if n is not None]
  return '.'.join(filter(None, [prefix, *modules, _LEAF_TO_TORCH[(collection, path[-1])]]))


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv kernel [H, W, I, O] -> [O, I, H, W]
    return value.transpose(3, 2, 0, 1)
  return value.T if value.ndim == 2 else value  # dense kernel [I, O] -> [O, I]


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def network_to_torch(
  prefix: str, variables: Variables, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
  """Torch-named numpy tensors of one network's {'params', 'batch_stats'} (prefix '' gives
  bare torchvision names)."""
  out = {}
  for collection, tree in variables.items():
    for path, value in traverse_util.flatten_dict(jax.device_get(tree)).items():
      out[_torch_key(prefix, collection, path)] = _to_torch_layout(np.asarray(value))
  for key in [k for k in out if k.endswith('.running_mean')]:
    out[key.replace('.running_mean', '.num_batches_tracked')] = np.asarray(
      num_batches_tracked, np.int64
    )
  return out


def network_from_torch(
  prefix: str, state_dict: Mapping[str, np.ndarray], template: Variables
) -> Variables:
  """One network's {'params', 'batch_stats'} in the shapes and dtypes of `template` (arrays
  or jax.ShapeDtypeStruct), filled from torch-named tensors.

  Strict: a missing key, a shape mismatch or an unused key of that network (with prefix '',
  any unused key) is an error.
  """
  used = set()

  def fill(collection, tree):
    flat = {}
    for path, template in traverse_util.flatten_dict(tree).items():
      key = _torch_key(prefix, collection, path)
      if key not in state_dict:
        raise CheckpointError(f'Missing {key!r} in the checkpoint.')
      value = _from_torch_layout(state_dict[key])
      if value.shape != template.shape:
        raise CheckpointError(
          f'{key!r} has shape {value.shape}, the model wants '
          f'{template.shape}: check the architecture in the config.'
        )
      flat[path] = jnp.asarray(value, template.dtype)
      used.add(key)
    return traverse_util.unflatten_dict(flat)

  filled = {collection: fill(collection, tree) for collection, tree in template.items()}
  start = f'{prefix}.' if prefix else ''
  unused = sorted(
    k
    for k in state_dict
    if k.startswith(start) and k not in used and not k.endswith('num_batches_tracked')
  )
  if unused:
    raise CheckpointError(
      f'Keys of {prefix or "the network"} the model has no place for: {unused[:8]}'
    )
  return filled


def networks_from_official(
  state_dict: Mapping[str, np.ndarray], templates: Mapping[str, Variables]
) -> dict[str, Variables]:
  """{'online', 'target', 'predictor'}: each network's variables, strictly checked against
  its template (a missing, misshapen or unused key is a CheckpointError)."""
  return {
    name: network_from_torch(OFFICIAL_PREFIXES[name], state_dict, template)
    for name, template in templates.items()
  }


def state_from_official(state_dict: Mapping[str, np.ndarray], template: MSFState) -> MSFState:
  """`template` with its networks, BN statistics and bank replaced by the checkpoint's.

  The step and optimizer state stay the template's (official checkpoints keep the optimizer
  in another format; a loaded state starts with fresh momentum buffers).
  """
  networks = networks_from_official(
    state_dict, {name: getattr(template, name) for name in OFFICIAL_PREFIXES}
  )
  if state_dict['queue'].shape != template.bank.embeddings.shape:
    raise CheckpointError(
      f'The bank is {state_dict["queue"].shape}, the config wants '
      f'{template.bank.embeddings.shape}: set config.msf.bank_size.'
    )
  bank = MemoryBank(
    jnp.asarray(state_dict['queue'], template.bank.embeddings.dtype),
    jnp.asarray(state_dict['labels'], jnp.int32),
    jnp.asarray(state_dict['queue_ptr'].reshape(()), jnp.int32),
  )
  return template.replace(**networks, bank=bank)


def state_to_official(state: MSFState) -> dict[str, np.ndarray]:
  """The official state_dict of an MSFState (networks, BN statistics, bank)."""
  steps = int(state.step)
  out = {}
  for name, prefix in OFFICIAL_PREFIXES.items():
    out.update(network_to_torch(prefix, getattr(state, name), steps))
  out['queue'] = np.asarray(state.bank.embeddings)
  out['labels'] = np.asarray(state.bank.labels, np.int64)
  out['queue_ptr'] = np.asarray([state.bank.ptr], np.int64)
  return out


def backbone_to_torchvision(state: MSFState, encoder: str = 'online') -> dict[str, np.ndarray]:
  """The backbone of the online or target encoder under torchvision's ResNet keys (no `fc`)."""
  if encoder not in ('online', 'target'):
    raise ValueError(f"encoder must be 'online' or 'target', got {encoder!r}.")
  return network_to_torch('', backbone_only(getattr(state, encoder)), int(state.step))


def save_torch_file(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Saves numpy arrays as a torch state dict of tensors."""
  torch = _import_torch()
  # np.array copies: arrays fetched from JAX are read-only, which torch warns about.
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)


def save_backbone(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes torchvision-named tensors as safetensors when `path` ends in .safetensors (no
  torch needed, no pickle), as a torch .pth state dict otherwise."""
  if path.endswith(SAFETENSORS_EXTENSION):
    # np.require, not np.ascontiguousarray, which makes a scalar (num_batches_tracked) [1].
    safetensors.numpy.save_file(
      {k: np.require(v, requirements='C') for k, v in tensors.items()}, path
    )
  else:
    save_torch_file(tensors, path)


def load_official_checkpoint(
  path: str, config: ml_collections.ConfigDict, rng: jax.Array
) -> tuple[MSFState, ml_collections.ConfigDict]:
  """An MSFState from an official checkpoint file, and `config` adapted to its architecture."""
  state_dict = official_state_dict(read_torch_file(path), path)
  config = config_for_checkpoint(config, state_dict)
  return state_from_official(state_dict, create_state(config, rng)), config
