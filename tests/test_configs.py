"""Every config in configs/ loads; training configs build their splits (TFDS from mock data,
never the network) and a state of the shapes they describe; variants set what they say."""

import glob
import json
import os

import jax
import ml_collections
import pytest

from msf_jax import create_state, load_config
from msf_jax.config_utils import SOURCE_SETTINGS, ConfigError, recorded_settings
from msf_jax.data import pipeline, sources
from msf_jax.optim import learning_rate_schedule

from helpers import REPO

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
IMAGENET = os.path.join(REPO, 'configs', 'imagenet_msf.py')
CIFAR10 = os.path.join(REPO, 'configs', 'cifar10_msf.py')


def is_training_config(config: ml_collections.ConfigDict) -> bool:
  return 'msf' in config and config.get('mode', 'train') == 'train'


def training_configs() -> list[str]:
  return [path for path in CONFIG_FILES if is_training_config(load_config(path))]


def test_configs_directory_is_found():
  assert {'imagenet_msf.py', 'digits_msf.py', 'cifar10_msf.py'} <= set(
    map(os.path.basename, CONFIG_FILES)
  )


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_loads(path):
  assert isinstance(load_config(path), ml_collections.ConfigDict)


@pytest.mark.parametrize(
  'path', [p for p in CONFIG_FILES if 'data' in load_config(p)], ids=os.path.basename
)
def test_a_run_records_only_the_data_settings_of_its_source(path):
  config = load_config(path)
  recorded = recorded_settings(config)
  assert set(recorded['data']) & {'name', 'data_dir', 'root'} == set(
    SOURCE_SETTINGS[config.data.source]
  )
  if config.data.source != 'tfds':  # the digits demo's config.json names no TFDS dataset
    assert 'imagenet2012' not in json.dumps(recorded)
  assert recorded['model'] == config.model.to_dict()  # only data settings are left out


@pytest.mark.parametrize('path', training_configs(), ids=os.path.basename)
def test_training_config_builds_its_state_shapes(path):
  config = load_config(path)
  state = jax.eval_shape(lambda: create_state(config, jax.random.key(config.seed)))
  assert state.bank.embeddings.shape[0] == state.bank.labels.shape[0] == config.msf.bank_size
  assert config.msf.topk <= config.msf.bank_size


@pytest.mark.parametrize('path', training_configs(), ids=os.path.basename)
def test_training_config_builds_its_splits(path):
  import tensorflow_datasets as tfds

  config = load_config(path)
  with tfds.testing.mock_data(num_examples=8):  # only used by TFDS sources
    split = sources.build_split(config.data, 'train', config.image_size)
    monitor = sources.build_split(config.data, config.monitor.split, config.image_size)
    stream = pipeline.train_stream(
      split,
      global_batch=4,
      image_size=config.image_size,
      seed=config.seed,
      pairing=config.data.pairing,
      process_index=0,
      process_count=1,
      crops=config.data.crops,
    )
    batch = next(stream)
  assert split.num_classes == monitor.num_classes
  assert config.data.crops == 'tensorflow'  # no GIL held: PIL's crops are an opt-in
  assert batch['online'].shape == (4, config.image_size, config.image_size, 3)


def test_imagenet_variants_set_what_they_say():
  config = load_config(IMAGENET, 'aug=s/s,k=1')
  assert (config.data.pairing, config.msf.topk) == ('s/s', 1)
  assert config.msf.bank_size == 1_024_000 and config.msf.bank_chunk_size == 128_000
  config = load_config(IMAGENET, 'bank=128000')
  assert (config.msf.bank_size, config.msf.bank_chunk_size) == (128_000, 128_000)
  assert load_config(IMAGENET, 'aug=w/w').data.pairing == 'w/w'
  with pytest.raises(ValueError, match='aug=w/s'):
    load_config(IMAGENET, 'aug=x/y')
  with pytest.raises(ValueError, match='bank=N'):
    load_config(IMAGENET, 'topk=3')


def test_a_config_file_that_is_not_python_is_a_config_error(tmp_path):
  path = tmp_path / 'digits.cfg'
  path.write_text('batch_size = 8\n')
  with pytest.raises(ConfigError, match='not a Python file'):
    load_config(str(path))


def test_cifar10_is_resnet18_small_stem_at_32px_with_a_bank_under_one_epoch():
  config = load_config(CIFAR10)
  assert (config.model.depth, config.model.small_stem, config.image_size) == (18, True, 32)
  assert (config.data.source, config.data.name, config.monitor.split) == ('tfds', 'cifar10', 'test')
  assert (config.batch_size, config.msf.topk, config.num_epochs) == (256, 5, 200)
  assert learning_rate_schedule(config, 50_000 // 256)(0) == pytest.approx(0.05 * 256 / 256)
  # Every bank row is a different image: the bank fills in less than one epoch.
  assert config.msf.bank_size < 50_000


@pytest.mark.parametrize(
  'path', [p for p in CONFIG_FILES if 'msf' in load_config(p)], ids=os.path.basename
)
def test_every_msf_config_takes_the_paper_variants(path):
  default = load_config(path)
  config = load_config(path, 'bank=4096,k=1,aug=s/s')
  assert (config.msf.bank_size, config.msf.topk, config.data.pairing) == (4096, 1, 's/s')
  assert (config.image_size, config.data.source) == (default.image_size, default.data.source)
  with pytest.raises(ValueError, match='bank=N or k=N'):
    load_config(path, 'k=many')


def test_intervals_are_in_epochs_so_a_batch_size_change_keeps_them():
  from msf_jax.train_loop import epochs_to_steps

  for path in training_configs():
    config = load_config(path)
    assert 'steps_per_epoch' not in config  # it follows from the data
    assert config.log_every_epochs > 0 and config.checkpoint.every_epochs > 0
  assert epochs_to_steps(0.2, 5004) == 1001 and epochs_to_steps(0.2, 2502) == 500
  assert epochs_to_steps(0.01, 44) == 1  # never zero: at least every step
