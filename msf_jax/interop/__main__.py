"""Command line for official MSF checkpoints.

  python -m msf_jax.interop summary CHECKPOINT
  python -m msf_jax.interop export-backbone SRC OUT.pth|OUT.safetensors [--encoder online|target]

`export-backbone` reads the chosen encoder's ResNet from SRC, an official checkpoint file or
an msf_jax checkpoint directory (a training workdir; `--step`, else the latest), with the
loader evaluation uses, and writes it under torchvision's keys, which
`torchvision.models.resnet50().load_state_dict(sd, strict=False)` accepts (no `fc`): as a
torch state dict, or as safetensors when OUT ends in .safetensors.
"""

import argparse
import sys

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from msf_jax import distributed
from msf_jax.interop import backbones, torch_checkpoint as tc
from msf_jax.models import init_encoder, init_predictor


def _networks(state_dict: dict[str, np.ndarray]) -> dict:
  """The official file's three networks, read strictly (a missing or misshapen key is an
  error) into the architecture its keys describe; float32, as the file stores them."""
  model = ml_collections.ConfigDict(
    {**tc.infer_backbone(state_dict, tc.ONLINE), 'dtype': 'float32', 'param_dtype': 'float32'}
  )
  rng = jax.random.key(0)
  templates = jax.eval_shape(
    lambda: {
      'online': init_encoder(model, 32, rng),
      'target': init_encoder(model, 32, rng),
      'predictor': init_predictor(model, rng),
    }
  )
  return tc.networks_from_official(state_dict, templates)


def summary(args) -> None:
  state_dict = tc.official_state_dict(tc.read_torch_file(args.checkpoint), args.checkpoint)
  model, networks = tc.infer_model(state_dict), _networks(state_dict)
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  print(f'ResNet-{model["depth"]} (small stem: {model["small_stem"]}, width {model["width"]})')
  print(
    f'online encoder parameters: {count(networks["online"]["params"]):,}; '
    f'predictor: {count(networks["predictor"]["params"]):,}'
  )
  bank, labels = state_dict['queue'], state_dict['labels']
  print(
    f'memory bank: {bank.shape[0]:,} x {bank.shape[1]}, pointer '
    f'{int(state_dict["queue_ptr"].reshape(()))}, labelled rows {int((labels >= 0).sum()):,}'
  )


def export_backbone(args) -> None:
  source_format = 'msf_jax' if tf.io.gfile.isdir(args.checkpoint) else 'official'
  tensors = backbones.backbone_state_dict(args.checkpoint, source_format, args.encoder, args.step)
  model = tc.infer_backbone(tensors)
  tc.save_backbone(tensors, args.out)
  print(
    f'wrote {len(tensors)} tensors of the {args.encoder} ResNet-{model["depth"]} backbone '
    f'(small stem: {model["small_stem"]}) to {args.out}'
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m msf_jax.interop',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('summary', help='architecture, sizes and bank of a checkpoint')
  p.add_argument('checkpoint')
  p.set_defaults(run=summary)
  p = commands.add_parser(
    'export-backbone', help='write a torchvision-style ResNet .pth or .safetensors'
  )
  p.add_argument('checkpoint', help='official checkpoint file or msf_jax checkpoint directory')
  p.add_argument('out', help='.safetensors for safetensors, any other name for torch.save')
  p.add_argument('--encoder', choices=backbones.ENCODERS, default='online')
  p.add_argument(
    '--step', type=int, default=None, help='step of an msf_jax checkpoint (default: the latest)'
  )
  p.set_defaults(run=export_backbone)
  args = parser.parse_args(argv)
  distributed.cpu_alone_without_accelerators()  # no libtpu errors on a CPU machine
  try:
    args.run(args)
  except (tc.CheckpointError, ImportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
