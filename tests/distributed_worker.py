"""One process of the two-process job of tests/test_distributed.py.

python tests/distributed_worker.py PORT PROCESS_ID NUM_PROCESSES FOLDER OUT_DIR

Joins the job on 127.0.0.1:PORT, runs one train step on its half of a global batch that
every process builds alike, saves the state with orbax (collectively), reads two epochs of
the image folder with its real process index, and evaluates a random encoder on the digits
twice in OUT_DIR/evaluation (the second time from the features the first one cached);
writes OUT_DIR/process_<id>.npz and OUT_DIR/evaluation_<id>.json.
"""

import json
import os
import sys
import time

import ml_collections
import numpy as np

STEP_SEED = 0
EPOCHS_READ = 2


PROCESSES = 2


def step_config() -> ml_collections.ConfigDict:
  """The job's model: ResNet-18 with the small stem at 32 px, global batch 8, in float64
  (needs x64), where other reduction orders across processes stay far below the tolerance
  instead of flipping near-zero ReLU inputs as in float32. As the official run: BatchNorm
  over groups of 2 images (a device's), the target views shuffled within each host."""
  from msf_jax.testing import small_config

  return small_config(
    image_size=32,
    small_stem=True,
    batch_size=8,
    bank_size=32,
    param_dtype='float64',
    bn_group_size=2,
    shuffle_target=True,
  )


def global_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The same global batch in every process (and in the single-process reference), its
  target views permuted within each process's half as the host stage permutes them, with
  'target_order' counting in that half."""
  from msf_jax.testing import random_batch

  rng = np.random.default_rng(STEP_SEED)
  batch = random_batch(rng, config, dtype=np.float64)
  size = config.batch_size // PROCESSES
  permutation = np.concatenate([p * size + rng.permutation(size) for p in range(PROCESSES)])
  return {
    **batch,
    'target': batch['target'][permutation],
    'target_order': (np.argsort(permutation) % size).astype(np.int32),
  }


def host_share(
  batch: dict[str, np.ndarray], process_index: int, process_count: int
) -> dict[str, np.ndarray]:
  """This process's contiguous slice of the global batch, as a host's input pipeline gives it."""
  size = len(batch['label']) // process_count
  return {k: v[process_index * size : (process_index + 1) * size] for k, v in batch.items()}


def local_copy(tree):
  """Host copies of a pytree of global arrays: a replicated one's first local shard, a
  sharded one (the bank) gathered from all processes."""
  import jax
  from jax.experimental import multihost_utils

  return jax.tree.map(
    lambda x: (
      np.asarray(x.addressable_data(0))
      if x.is_fully_replicated
      else np.asarray(multihost_utils.process_allgather(x, tiled=True))
    ),
    tree,
  )


def train_one_step(out_dir: str) -> dict[str, np.ndarray]:
  import jax

  from msf_jax import create_state, make_mesh, make_train_step, put_state
  from msf_jax.checkpoint import Checkpointer, checkpoint_directory
  from msf_jax.data import pipeline

  config = step_config()
  mesh = make_mesh()
  state = put_state(create_state(config, jax.random.key(0)), config, mesh)
  host = host_share(global_batch(config), jax.process_index(), jax.process_count())
  train_step = make_train_step(config, mesh, steps_per_epoch=1, finish_views=False)
  state, metrics = train_step(state, pipeline.to_global(host, mesh))
  checkpointer = Checkpointer(checkpoint_directory(out_dir))
  checkpointer.save(int(state.step), state, force=True)
  checkpointer.wait()
  checkpointer.close()
  leaves = jax.tree.leaves(local_copy(state))
  return {
    'loss': local_copy(metrics['loss']),
    **{f'state_{i}': leaf for i, leaf in enumerate(leaves)},
  }


def read_epochs(folder: str) -> dict[str, np.ndarray]:
  """The labels (one class per image: its identity) this process reads, epoch by epoch."""
  from msf_jax.data import pipeline, sources

  config = step_config()
  split = sources.image_folder(folder, 'train')
  steps = pipeline.steps_per_epoch(split, config.batch_size)
  stream = pipeline.train_stream(split, global_batch=config.batch_size, image_size=16, seed=0)
  labels = np.stack(
    [np.concatenate([next(stream)['label'] for _ in range(steps)]) for _ in range(EPOCHS_READ)]
  )
  return {'epoch_labels': labels, 'steps_per_epoch': np.asarray(steps)}


# A random encoder on 45 digits of each split: an odd count, so padded batches on every host.
EVALUATION = {
  'checkpoint_format': 'random',
  'data.max_examples': 45,
  'batch_size': 16,
  'tasks': 'knn',
}


def evaluate_twice(workdir: str) -> dict:
  """The evaluation program's results, twice, and after each time the feature cache's files
  (name: mtime) and the count of event files; as two jobs one after the other, the second
  starts when both processes have finished the first."""
  import jax
  from jax.experimental import multihost_utils

  from msf_jax.evaluate import run

  from helpers import eval_config

  def cache_files() -> dict[str, int]:
    cache = os.path.join(workdir, run.CACHE_DIR)
    return {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)}

  def event_files() -> int:
    return sum(name.startswith('events.out.tfevents.') for name in os.listdir(workdir))

  record = {}
  with jax.enable_x64(False):  # as msf_jax.main runs it
    for which in ('first', 'second'):
      record[f'{which}_results'] = run.evaluate(eval_config(**EVALUATION), workdir)
      multihost_utils.sync_global_devices(f'evaluated the {which} time')
      record[f'cache_after_{which}'] = cache_files()
      record[f'event_files_after_{which}'] = event_files()
  return record


def main(port: str, process_id: str, num_processes: str, folder: str, out_dir: str) -> None:
  import jax

  from msf_jax import distributed

  start = time.perf_counter()
  progress = lambda what: print(
    f'process {process_id}: {what} after {time.perf_counter() - start:.0f} s', flush=True
  )
  jax.config.update('jax_enable_x64', True)
  distributed.initialize(f'127.0.0.1:{port}', int(num_processes), int(process_id))
  results = {
    'process_index': np.asarray(jax.process_index()),
    'process_count': np.asarray(jax.process_count()),
    'device_count': np.asarray(jax.device_count()),
    'local_device_count': np.asarray(jax.local_device_count()),
  }
  progress('joined the job')
  results.update(train_one_step(out_dir))
  progress('trained one step and saved it')
  results.update(read_epochs(folder))
  progress('read the epochs')
  np.savez(os.path.join(out_dir, f'process_{process_id}.npz'), **results)
  evaluation = evaluate_twice(os.path.join(out_dir, 'evaluation'))
  progress('evaluated twice')
  with open(os.path.join(out_dir, f'evaluation_{process_id}.json'), 'w') as f:
    json.dump(evaluation, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
