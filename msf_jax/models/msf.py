"""The networks of MSF: an encoder (backbone + projection) used online and as the target, and
the online-only predictor. Dimensions follow the official code: F -> 2F -> F/4."""

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msf_jax.models.heads import MLPHead
from msf_jax.models.layers import WHOLE_BATCH, BatchGroups
from msf_jax.models.resnet import ResNet, feature_dim

Variables = dict[str, Any]  # {'params': ..., 'batch_stats': ...} of one network


class Encoder(nn.Module):
  """Backbone followed by the projection MLP; `backbone` alone gives evaluation features."""

  depth: int = 50
  small_stem: bool = False
  width: int = 64
  dtype: Any | None = None
  param_dtype: Any = jnp.float32
  groups: BatchGroups = BatchGroups()

  def setup(self):
    dim = feature_dim(self.depth, self.width)
    self.backbone = ResNet(
      self.depth, self.small_stem, self.width, self.dtype, self.param_dtype, self.groups
    )
    self.projector = MLPHead(2 * dim, dim // 4, self.dtype, self.param_dtype, self.groups)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.projector(self.backbone(x, train), train)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.backbone(x, train)


ACCELERATOR_BACKENDS = ('gpu', 'tpu')


def resolve_dtype_name(name: str | None, backend: str | None = None) -> str | None:
  """The dtype that `name` means on `backend` (this process's by default): 'auto' is
  bfloat16 on GPU and TPU, whose matrix units run it at several times the float32 rate, and
  float32 on the CPU, where bfloat16 is emulated and slower. The planner resolves it for the
  chips it compiles for, not for the machine it runs on."""
  if name != 'auto':
    return name
  backend = jax.default_backend() if backend is None else backend
  return 'bfloat16' if backend in ACCELERATOR_BACKENDS else 'float32'


def parse_dtype(name: str | None) -> Any:
  """Maps a config string ('float32', 'bfloat16', 'float64', 'auto') to a dtype; None stays
  None."""
  name = resolve_dtype_name(name)
  return None if name in (None, '', 'none') else jnp.dtype(name)


def build_networks(
  model_config: ml_collections.ConfigDict, groups: BatchGroups = WHOLE_BATCH
) -> tuple[Encoder, MLPHead]:
  """The encoder (shared architecture of online and target) and the predictor of a config,
  their BatchNorms over `groups` (the train step's: `msf_jax.train.batch_groups`)."""
  dtype = parse_dtype(model_config.dtype)
  # float32 compute means "whatever the parameters are": float64 tests then run in float64.
  compute = None if dtype == jnp.float32 else dtype
  param_dtype = parse_dtype(model_config.param_dtype)
  dim = feature_dim(model_config.depth, model_config.width)
  encoder = Encoder(
    model_config.depth, model_config.small_stem, model_config.width, compute, param_dtype, groups
  )
  predictor = MLPHead(2 * dim, dim // 4, compute, param_dtype, groups)
  return encoder, predictor


def projection_dim(model_config: ml_collections.ConfigDict) -> int:
  """Width of the projections, predictions and bank rows: a quarter of the feature width."""
  return feature_dim(model_config.depth, model_config.width) // 4


def init_encoder(
  model_config: ml_collections.ConfigDict, image_size: int, rng: jax.Array
) -> Variables:
  """{'params', 'batch_stats'} of a freshly initialized Encoder (torchvision's init); under
  `jax.eval_shape`, their shapes and dtypes without any computation."""
  encoder, _ = build_networks(model_config)
  images = jnp.zeros((1, image_size, image_size, 3), parse_dtype(model_config.param_dtype))
  return cast(Variables, encoder.init(rng, images, train=False))  # flax returns a plain dict


def init_predictor(model_config: ml_collections.ConfigDict, rng: jax.Array) -> Variables:
  """{'params', 'batch_stats'} of a freshly initialized predictor."""
  _, predictor = build_networks(model_config)
  projections = jnp.zeros((1, projection_dim(model_config)), parse_dtype(model_config.param_dtype))
  return cast(Variables, predictor.init(rng, projections, train=False))


def backbone_only(variables: Variables) -> Variables:
  """An Encoder's variables without the projection head: all that `Encoder.features` reads."""
  return {collection: {'backbone': tree['backbone']} for collection, tree in variables.items()}
