"""Command line for official MSF checkpoints.

  python -m msf_jax.interop summary CHECKPOINT
  python -m msf_jax.interop export-backbone CHECKPOINT OUT.pth [--encoder online|target]

`export-backbone` loads the checkpoint into an MSFState (the same loader as training and
evaluation use) and writes the chosen encoder's ResNet as a torchvision state dict, which
`torchvision.models.resnet50().load_state_dict(sd, strict=False)` accepts (no `fc`).
"""

import argparse
import os
import sys

import jax
import numpy as np

from msf_jax.config_utils import load_config
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
  state, _ = _load(args)
  tensors = tc.backbone_to_torchvision(state, args.encoder)
  tc.save_torch_file(tensors, args.out)
  print(f'wrote {len(tensors)} tensors of the {args.encoder} backbone to {args.out}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m msf_jax.interop', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config whose non-architecture settings the state is built with')
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('summary', help='architecture, sizes and bank of a checkpoint')
  p.add_argument('checkpoint')
  p.set_defaults(run=summary)
  p = commands.add_parser('export-backbone', help='write a torchvision-style ResNet .pth')
  p.add_argument('checkpoint')
  p.add_argument('out')
  p.add_argument('--encoder', choices=('online', 'target'), default='online')
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
