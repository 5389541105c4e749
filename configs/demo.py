"""The offline demo: MSF on scikit-learn's digits in a few minutes on a 2-core CPU, then the
kNN and linear-probe accuracies of the trained encoder next to a random one's.

  python -m msf_jax.main --config=configs/demo.py --workdir=runs/demo

Settings sized for a CPU and 1,437 tiny images: a narrow ResNet-18 (width 8, twice as fast as
width 16), crops of at least 30% of the image, no flips (a mirrored digit is another symbol),
lr 1.0 x batch/256 and k = 1, MSF's BYOL-asym case. With k = 10 the bank's neighbours of a
barely trained network are mostly of other classes (purity about 0.3), and pulling toward
them left 2 of 3 seeds below the random encoder's 20-NN accuracy after 40 epochs (k = 3: just
above it); k = 1 beat it by 5 points or more in all 3 seeds (benchmarks/RESULTS.md). On
ImageNet-sized data the paper's k = 5 is the better choice. Everything else is the paper's
(`imagenet_msf.py`).
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
  config.msf.topk = 1
  config.msf.bank_size = 1024
  config.data.crop_scale = (0.3, 1.0)
  config.data.flip = False
  config.log_every_steps = 44  # one epoch: 1,437 images // 32
  config.checkpoint.every_steps = 440  # every 10 epochs
  config.monitor.knn_every_epochs = 10  # monitor/knn_k20 in TensorBoard: the learning curve

  config.evaluation = load_config(os.path.join(CONFIGS, 'eval.py'), 'digits')
  config.evaluation.model = config.model
  config.evaluation.image_size = config.get_ref('image_size')
  return config
