"""The offline demo: MSF on scikit-learn's digits in a few minutes on a 2-core CPU, then the
kNN and linear-probe accuracies of the trained encoder next to a random one's.

  python -m msf_jax.main --config=configs/demo.py --workdir=runs/demo

Settings sized for a CPU and 1,437 tiny images: a narrow ResNet-18 (width 8: 2x faster than
width 16 and, with the other settings, the one that beat its random twin in the time), crops
of at least 30% of the image, no flips (a mirrored digit is another symbol), lr 1.0 x
batch/256, and k = 10 neighbours in a bank of 1,024 rows, most of the data. Everything else
is the paper's (`imagenet_msf.py`).
"""

import os

import ml_collections

from msf_jax.config_utils import load_config

CONFIGS = os.path.dirname(__file__)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = load_config(os.path.join(CONFIGS, 'digits_msf.py'), arg or '')
  config.mode = 'demo'  # msf_jax.main trains, then runs msf_jax.demo's comparison
  config.model.width = 8
  config.batch_size = 32
  config.num_epochs = 40
  config.optim.base_lr = 1.0  # 0.125 at batch 32
  config.msf.topk = 10
  config.msf.bank_size = 1024
  config.data.crop_scale = (0.3, 1.0)
  config.data.flip = False
  config.log_every_steps = 45  # one epoch
  config.checkpoint.every_steps = 440  # every 10 epochs

  config.evaluation = load_config(os.path.join(CONFIGS, 'eval.py'), 'digits')
  config.evaluation.model = config.model
  config.evaluation.image_size = config.image_size
  return config
