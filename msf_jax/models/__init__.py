"""Flax networks of MSF."""

from msf_jax.models.heads import MLPHead
from msf_jax.models.msf import Encoder, build_networks
from msf_jax.models.resnet import ResNet, feature_dim
