"""Flax networks of MSF."""

from msf_jax.models.heads import MLPHead
from msf_jax.models.msf import (
  Encoder,
  Variables,
  backbone_only,
  build_networks,
  init_encoder,
  init_predictor,
  parse_dtype,
  projection_dim,
  resolve_dtype_name,
)
from msf_jax.models.resnet import ResNet, feature_dim

__all__ = [
  'MLPHead',
  'Encoder',
  'Variables',
  'backbone_only',
  'build_networks',
  'init_encoder',
  'init_predictor',
  'parse_dtype',
  'projection_dim',
  'resolve_dtype_name',
  'ResNet',
  'feature_dim',
]
