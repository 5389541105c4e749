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
import os
import sys

import jax
import numpy as np
import tensorflow as tf

from msf_jax.config_utils import load_config
from msf_jax.evaluate import encoders
from msf_jax.interop import torch_checkpoint as tc

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'imagenet_msf.py')


def _load(args):
  config = load_config(args.config)
  return tc.load_official_checkpoint(args.checkpoint, config, jax.random.key(0))


def summary(args) -> None:
  state, config = _load(args)
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  print(f'ResNet-{config.model.depth} (small stem: {config.model.small_stem})')
  print(f'online encoder parameters: {count(state.online_params):,}; '
        f'predictor: {count(state.predictor_params):,}')
  print(f'memory bank: {state.bank.shape[0]:,} x {state.bank.shape[1]}, pointer '
        f'{int(state.bank_ptr)}, labelled rows {int((state.bank_labels >= 0).sum()):,}')


def export_backbone(args) -> None:
  source_format = 'msf_jax' if tf.io.gfile.isdir(args.checkpoint) else 'official'
  tensors = encoders.backbone_state_dict(args.checkpoint, source_format, args.encoder,
                                         args.step)
  model = tc.infer_backbone(tensors)
  tc.save_backbone(tensors, args.out)
  print(f'wrote {len(tensors)} tensors of the {args.encoder} ResNet-{model["depth"]} backbone '
        f'(small stem: {model["small_stem"]}) to {args.out}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m msf_jax.interop', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config whose non-architecture settings the state is built with')
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('summary', help='architecture, sizes and bank of a checkpoint')
  p.add_argument('checkpoint')
  p.set_defaults(run=summary)
  p = commands.add_parser('export-backbone',
                          help='write a torchvision-style ResNet .pth or .safetensors')
  p.add_argument('checkpoint', help='official checkpoint file or msf_jax checkpoint directory')
  p.add_argument('out', help='.safetensors for safetensors, any other name for torch.save')
  p.add_argument('--encoder', choices=encoders.ENCODERS, default='online')
  p.add_argument('--step', type=int, default=None,
                 help='step of an msf_jax checkpoint (default: the latest)')
  p.set_defaults(run=export_backbone)
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except (tc.CheckpointError, ImportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
