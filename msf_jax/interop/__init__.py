"""PyTorch interoperability: official MSF checkpoints and torchvision-style backbones.

torch is optional: it is imported only when a .pth file is read or written.
"""

from msf_jax.interop.torch_checkpoint import (
  CheckpointError,
  backbone_to_torchvision,
  config_for_checkpoint,
  infer_model,
  load_official_checkpoint,
  official_state_dict,
  read_torch_file,
  save_torch_file,
  state_from_official,
  state_to_official,
)

__all__ = [
  'CheckpointError',
  'backbone_to_torchvision',
  'config_for_checkpoint',
  'infer_model',
  'load_official_checkpoint',
  'official_state_dict',
  'read_torch_file',
  'save_torch_file',
  'state_from_official',
  'state_to_official',
]
