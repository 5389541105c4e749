"""Evaluation of a frozen encoder:

  python -m msf_jax.main --config=configs/eval.py:PRESET --config.checkpoint=PATH \
      --config.checkpoint_format=msf_jax|official|torchvision|safetensors|random --workdir=DIR

Presets (the config argument):
  imagenet  ResNet-50 at 224 px on TFDS imagenet2012: kNN (k = 1, 20; majority and weighted
            votes) and the official linear protocol (augmented views, 40 epochs)
  cifar10   ResNet-18 with the small stem at 32 px on TFDS cifar10: kNN and the linear protocol
  digits    ResNet-18 with the small stem at 24 px on scikit-learn's digits (offline, CPU):
            kNN and the fast linear probe on cached centre-crop features

The model and data sections are those of the preset's training config (configs/
<preset>_msf.py), so that a checkpoint is evaluated as it was trained.
"""

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from msf_jax.config_utils import load_config
from msf_jax.evaluate import linear_probe

# preset: (training config, held-out split, tasks)
PRESETS = {
  'imagenet': ('imagenet_msf.py', 'validation', 'knn,linear'),
  'cifar10': ('cifar10_msf.py', 'test', 'knn,linear'),
  'digits': ('digits_msf.py', 'test', 'knn,linear_fast'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or 'imagenet'
  if preset not in PRESETS:
    raise ValueError(
      f'Unknown evaluation preset {preset!r}: use one of {sorted(PRESETS)}, '
      'e.g. --config=configs/eval.py:digits.'
    )
  training_file, test_split, tasks = PRESETS[preset]
  training = load_config(os.path.join(os.path.dirname(__file__), training_file))

  config = ml_collections.ConfigDict()
  config.mode = 'evaluate'  # msf_jax.main runs msf_jax.evaluate.run.evaluate
  config.checkpoint = ''  # a file, or for msf_jax a checkpoint directory or training workdir
  config.checkpoint_format = 'msf_jax'  # msf_jax, official, torchvision, safetensors, random
  config.encoder = 'online'  # or 'target' (msf_jax and official checkpoints hold both)
  config.step = config_dict.placeholder(int)  # msf_jax checkpoints: None is the latest step
  config.seed = 0  # the random encoder, kNN tie-breaks, the linear probe

  config.image_size = training.image_size
  config.model = training.model
  config.data = training.data
  config.data.train_split = 'train'
  config.data.test_split = test_split
  config.data.max_examples = 0  # the first N of each split (a quick look); 0: all of it
  config.batch_size = 256  # global batch of the feature extraction

  config.tasks = tasks  # comma-separated: knn, linear_fast, linear, transfer

  config.knn = ml_collections.ConfigDict()
  config.knn.ks = (1, 20)

  # linear_fast and linear: the official protocol (epochs, batch_size, lr, momentum,
  # weight_decay, milestones), defined once in msf_jax.evaluate.linear_probe.
  config.linear = ml_collections.ConfigDict(dataclasses.asdict(linear_probe.OFFICIAL))

  config.transfer = ml_collections.ConfigDict()
  # Names of msf_jax.evaluate.transfer.TRANSFER_DATASETS, comma-separated, read from TFDS in
  # config.data.data_dir (prepare them first: nothing is downloaded).
  config.transfer.datasets = 'food101,cifar10,cifar100,sun397,cars,dtd,pets,caltech101,flowers'
  return config
