"""MSF on ImageNet with the paper's settings: ResNet-50, batch 256, 200 epochs, k = 5,
a 1,024,000-row bank, target momentum 0.99, weak target view and strong online view."""

import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = 224
  config.batch_size = 256  # global; the learning rate scales with batch_size / 256.
  config.num_epochs = 200
  config.steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size

  config.model = ml_collections.ConfigDict()
  config.model.depth = 50
  config.model.small_stem = False
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU and TPU.
  config.model.param_dtype = 'float32'

  config.msf = ml_collections.ConfigDict()
  config.msf.topk = 5
  config.msf.bank_size = 1_024_000
  config.msf.ema_momentum = 0.99
  config.msf.bank_chunk_size = 128_000  # 0 searches the whole bank in one product.

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 0.05
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'cosine_per_epoch'
  return config
