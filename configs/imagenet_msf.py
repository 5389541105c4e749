"""MSF on ImageNet with the paper's settings: ResNet-50, batch 256, 200 epochs, k = 5,
a 1,024,000-row bank, target momentum 0.99, weak target view and strong online view.

The paper's variants through the config argument, comma-separated:
  aug=w/s|w/w|s/s|s/w   augmentation pairing (target/online)
  bank=N                memory-bank rows (the paper's "128K" rows use bank=128000)
  k=N                   neighbours; k=1 is the BYOL-asym baseline
e.g. --config=configs/imagenet_msf.py:aug=s/s,k=1
"""

import ml_collections

from msf_jax.config_utils import apply_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = 224
  config.batch_size = 256  # global; the learning rate scales with batch_size / 256.
  config.num_epochs = 200  # the steps of an epoch follow from the data and batch_size

  config.model = ml_collections.ConfigDict()
  config.model.depth = 50
  config.model.small_stem = False
  config.model.width = 64  # channels of the first stage (torchvision's 64)
  config.model.dtype = 'auto'  # compute: bfloat16 on GPU and TPU, float32 on the CPU
  config.model.param_dtype = 'float32'
  # BatchNorm statistics over groups of this many consecutive images of the global batch, as
  # the official run (nn.DataParallel, 4 GPUs x 64 images) made them; 0: the whole batch.
  config.model.bn_group_size = 64

  config.msf = ml_collections.ConfigDict()
  config.msf.topk = 5
  config.msf.bank_size = 1_024_000
  config.msf.ema_momentum = 0.99
  # The target view's batch shuffled before the target encoder and its embeddings put back
  # in order after (the official ShuffleBN): a query's target is normalized with other images.
  config.msf.shuffle_target = True
  # k grows linearly from 1 (BYOL's loss) to topk over this many epochs; 0 (the paper):
  # topk from the first step.
  config.msf.topk_ramp_epochs = 0
  config.msf.bank_chunk_size = 128_000  # 0 searches the whole bank in one product.
  # 'float32' (the official): one exact float32 search. 'bfloat16': a bfloat16 product
  # proposes bank_search_candidates rows per query, which are re-scored in float32.
  config.msf.bank_search_dtype = 'float32'
  # In 53 banks of trained small-data runs (benchmarks/bank_search_precision.py), the float32
  # neighbours (k <= 10) sat up to 275th in the bfloat16 order: how many rows lie within
  # bfloat16's rounding of the k-th follows the bank's density, not k. 512 holds them all.
  config.msf.bank_search_candidates = 512
  # 'replicated': every chip holds the whole bank. 'sharded': each chip holds
  # bank_size / chips consecutive rows and searches them for the whole batch (same answers, a
  # fraction of the memory and bank reads). 'auto': sharded when there is more than one
  # device and bank_size divides among them, else replicated.
  config.msf.bank_layout = 'auto'

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 0.05
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'cosine_per_epoch'

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'  # 'tfds', 'folder' or 'digits'
  config.data.name = 'imagenet2012'
  config.data.data_dir = ''  # TFDS data_dir: a local path or gs://bucket/path
  config.data.pairing = 'w/s'
  config.data.crop_scale = (0.2, 1.0)  # RandomResizedCrop's area range, both views
  config.data.flip = True
  # Who crops and resizes the views: 'tensorflow' (no GIL held: a TPU host's ~10,000 samples/s)
  # or 'pil' (PIL's exact pixels, ~1.4x the samples a core, but a process holds the GIL
  # ~0.2 ms a sample: near 5,000/s at most; for a few accelerators a process).
  config.data.crops = 'tensorflow'
  config.data.root = ''  # for source 'folder': root/<split>/<class>/<image>

  # kNN of the online backbone during training; 0 switches the monitor off.
  config.monitor = ml_collections.ConfigDict()
  config.monitor.knn_every_epochs = 10
  config.monitor.split = 'validation'  # held out: queries never seen in training
  config.monitor.num_train = 50_000  # the first images of the train split form the kNN bank
  config.monitor.num_queries = 10_000
  config.monitor.ks = (20,)
  config.monitor.batch_size = 256

  # Intervals in epochs (fractions allowed), so that they keep their meaning under any
  # batch size: 0.02 is about 100 steps at batch 256.
  config.log_every_epochs = 0.02
  config.profile = True  # a profiler window early in training, written to the workdir
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 0.2  # about 1,000 steps at batch 256
  config.checkpoint.keep = 3
  return apply_variants(config, arg)
