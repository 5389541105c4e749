"""The training loop: the only place with side effects (data, metrics, checkpoints, signals).

It resumes from the latest checkpoint in `workdir`, saves every `checkpoint.every_epochs`
epochs and at the end, saves and exits cleanly on SIGTERM or a preemption notice, saves and
raises TrainingInterrupted on Ctrl-C (a second Ctrl-C stops at once), and stops on a
non-finite loss without saving, so that the last good checkpoint is the latest.
"""

import json
import logging as python_logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util
from jax.experimental import multihost_utils

from msf_jax import console, visualize
from msf_jax.checkpoint import Checkpointer, checkpoint_directory, damaged_directory
from msf_jax.config_utils import check_training_config, recorded_settings
from msf_jax.data import pipeline, sources
from msf_jax.evaluate.features import write_atomically
from msf_jax.evaluate.monitor import KnnMonitor
from msf_jax.sharding import make_mesh
from msf_jax.train import make_train_step
from msf_jax.train_state import MSFState, abstract_state, init_state, state_shardings
from msf_jax.workdir_lock import WorkdirBusyError, WorkdirLock

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped training after a checkpoint of `step` was saved in `directory`: still a
  KeyboardInterrupt for callers (a notebook, a script), with where the run resumes from."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'Interrupted: saved a checkpoint of step {step} in {directory}.')
    self.step, self.directory = step, directory


def _stop_at_once() -> None:
  """A second Ctrl-C: exit now, abandoning a save in progress. Orbax writes each checkpoint
  to a temporary folder and renames it when complete, so the previous one stays whole."""
  logging.warning(
    'Ctrl-C again: stopping at once; the checkpoint being saved is abandoned, '
    'the run resumes from the one before.'
  )
  for handler in python_logging.getLogger().handlers:
    handler.flush()
  os._exit(EXIT_INTERRUPTED)


class _StopRequest:
  """Set by SIGTERM (a preempted VM, a job scheduler) or Ctrl-C; the loop checkpoints and
  stops. A second Ctrl-C exits at once.

  On one process the handlers set a flag that the loop reads after each step. With several,
  each would stop at the step its own signal came, leaving the others waiting in the next
  step's collectives. There JAX's preemption notifier (set up by jax.distributed) catches
  SIGTERM and `reached_preemption_sync_point` makes every process stop at the same step, so
  no Python handler may replace it: Ctrl-C is passed on to it as a SIGTERM to this process.
  Python delivers signals to the main thread only, so elsewhere nothing is installed."""

  def __init__(self):
    self.requested = False  # this process stops after the current step (one process only)
    self.interrupted = False  # Ctrl-C was pressed here
    self._single = jax.process_count() == 1
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM) if self._single else (signal.SIGINT,):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    if signum == signal.SIGTERM:
      logging.warning('SIGTERM: saving a checkpoint at the current step, then exiting.')
      self.requested = True
      return
    if self.interrupted:
      _stop_at_once()
    logging.warning(
      'Ctrl-C: saving a checkpoint at the current step, then exiting (Ctrl-C '
      'again stops at once and keeps the previous checkpoint).'
    )
    self.interrupted = True
    if self._single:
      self.requested = True
    else:
      os.kill(os.getpid(), signal.SIGTERM)

  def interrupted_anywhere(self) -> bool:
    """Whether Ctrl-C reached any process: all of them then end as interrupted. Called at
    the step where every process stopped, so the gather meets no one mid-step."""
    if self._single:
      return self.interrupted
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.interrupted))))

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _check_finite(step: int, loss: float, params_finite: bool = True) -> None:
  if not (np.isfinite(loss) and params_finite):
    what = f'The loss is {loss}' if not np.isfinite(loss) else 'The parameters are not finite'
    raise NonFiniteLossError(
      f'{what} at step {step}: training stopped without saving, so the latest checkpoint '
      'is the last good one. Lower config.optim.base_lr, or check the input data '
      '(images, normalization).'
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """An interval given in epochs, in whole steps (at least one): it keeps its meaning when
  --config.batch_size changes the number of steps an epoch."""
  return max(1, round(epochs * steps_per_epoch))


def _own_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process stops if it cannot."""
  lock, refusal = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      lock, refusal = None, e
  if (
    jax.process_count() > 1
    and bool(multihost_utils.broadcast_one_to_all(np.asarray(refusal is not None)))
    and not refusal
  ):
    raise WorkdirBusyError(f'Process 0 could not take the lock of {workdir}: see its log.')
  if refusal:
    raise refusal
  return lock


def train(config: ml_collections.ConfigDict, workdir: str) -> MSFState:
  """Trains (or resumes training) to `config.num_epochs`; returns the final state."""
  check_training_config(config, jax.device_count(), jax.process_count())
  lock = _own_workdir(workdir)
  try:
    return _train(config, workdir)
  finally:
    if lock:
      lock.release()


CONFIG_FILE = 'config.json'


def _record_config(settings: dict, workdir: str, writer: metric_writers.MetricWriter) -> None:
  """The run's settings (`recorded_settings`) as WORKDIR/config.json (evaluation reads the
  model from it, or from the copy beside each checkpoint) and in TensorBoard as text and
  hyperparameters."""
  if jax.process_index() == 0:
    write_atomically(
      os.path.join(workdir, CONFIG_FILE), json.dumps(settings, indent=2, sort_keys=True).encode()
    )
  writer.write_texts(0, {'config': f'```\n{ml_collections.ConfigDict(settings).to_yaml()}\n```'})
  writer.write_hparams(
    {
      key: value if isinstance(value, (bool, int, float, str)) else str(value)
      for key, value in traverse_util.flatten_dict(settings, sep='.').items()
    }
  )


STREAM_METADATA = 'data_stream'  # every process's stream position, beside each checkpoint


def _stream_positions(stream: pipeline.TrainStream, step: int) -> dict[str, list[int]]:
  """Every process's stream position after `step`, for the checkpoint's metadata (a
  collective: all processes call it at the same step)."""
  position = stream.position_after(step)
  gathered = multihost_utils.process_allgather(np.array([position.slot, position.skipped]))
  gathered = np.asarray(gathered).reshape(-1, 2)
  return {'slots': gathered[:, 0].tolist(), 'skipped': gathered[:, 1].tolist()}


def _saved_stream_position(checkpointer: Checkpointer, step: int) -> pipeline.StreamPosition | None:
  """This process's stream position saved with the checkpoint at `step`, or None where the
  checkpoint has none or was written by another number of processes (each host then reads
  from slot step x host batch, which is exact while no image was skipped)."""
  saved = (checkpointer.read_metadata(step) or {}).get(STREAM_METADATA)
  if saved is None:
    return None
  if len(saved['slots']) != jax.process_count():
    logging.warning(
      'The checkpoint at step %d was written by %d processes and this run has '
      '%d: each starts its share of the data at slot step x host batch, and the '
      '%d images skipped so far are not counted again.',
      step,
      len(saved['slots']),
      jax.process_count(),
      sum(saved['skipped']),
    )
    return None
  return pipeline.StreamPosition(
    saved['slots'][jax.process_index()], saved['skipped'][jax.process_index()]
  )


def _train(config: ml_collections.ConfigDict, workdir: str) -> MSFState:
  mesh = make_mesh()
  split = sources.build_split(config.data, 'train', config.image_size)
  config = config.copy_and_resolve_references()
  steps_per_epoch = pipeline.steps_per_epoch(split, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  log_every = epochs_to_steps(config.log_every_epochs, steps_per_epoch)
  checkpoint_every = epochs_to_steps(config.checkpoint.every_epochs, steps_per_epoch)

  checkpointer = Checkpointer(
    checkpoint_directory(workdir),
    max_to_keep=config.checkpoint.keep,
    save_interval_steps=checkpoint_every,
  )
  # The bank's layout follows this run's devices, whatever wrote the checkpoint.
  state = checkpointer.restore_newest_readable(
    abstract_state(config, state_shardings(config, mesh)), aside=damaged_directory(workdir)
  )
  if state is None:
    state = init_state(config, mesh, jax.random.key(config.seed))
  start = int(jax.device_get(state.step))
  logging.info(
    '%s\n%s at step %d of %d.',
    console.config_summary(config, steps_per_epoch, split.num_examples, jax.device_count()),
    'Resuming' if start else 'Starting',
    start,
    total_steps,
  )

  start_position = _saved_stream_position(checkpointer, start) if start else None
  stream = pipeline.train_stream(
    split,
    global_batch=config.batch_size,
    image_size=config.image_size,
    seed=config.seed,
    pairing=config.data.pairing,
    start_step=start,
    start_position=start_position,
    crop_scale=tuple(config.data.crop_scale),
    random_flip=config.data.flip,
    crops=config.data.crops,
    shuffle_target=config.msf.shuffle_target,
  )
  train_step = make_train_step(config, mesh, steps_per_epoch)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  settings = recorded_settings(config)  # the config is locked: once for the whole run
  _record_config(settings, workdir, writer)
  if start == 0:  # what the two encoders are shown, before the first step
    visualize.write_pictures(
      {'views': visualize.views_grid_from_config(config, mesh, split)}, workdir, 0, writer
    )
  hooks = [
    periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_secs=None, every_steps=log_every
    )
  ]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  monitor_every = config.monitor.knn_every_epochs * steps_per_epoch
  monitor = KnnMonitor(config, mesh, split) if monitor_every else None
  stop = _StopRequest()
  window_start, data_wait, pending = time.perf_counter(), 0.0, []
  training_seconds = 0.0  # wall time of the steps so far, for the ETA (monitor excluded)
  batches = pipeline.prefetch_to_mesh(stream, mesh)
  step, preempted = start, False
  try:
    for step in range(start + 1, total_steps + 1):
      fetch_start = time.perf_counter()
      batch = next(batches)
      data_wait += time.perf_counter() - fetch_start
      state, metrics = train_step(state, batch)  # dispatched: the loop does not wait for it
      pending.append(metrics)
      for hook in hooks:
        hook(step)
      preempted = stop.requested or multihost_utils.reached_preemption_sync_point(step)
      if step % log_every == 0 or step == total_steps or preempted:
        summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        _check_finite(step, summary['loss'])
        elapsed = time.perf_counter() - window_start
        training_seconds += elapsed
        summary.update(
          images_per_sec=len(pending) * config.batch_size / elapsed,
          data_wait_fraction=data_wait / elapsed,
          skipped_images=stream.skipped,
        )
        writer.write_scalars(step, summary)
        eta = training_seconds / (step - start) * (total_steps - step)
        logging.info(console.progress_line(step, total_steps, steps_per_epoch, summary, eta))
        if skipped_names := stream.pop_skipped_names():
          logging.warning(
            'Skipped undecodable images (%d so far): %s', stream.skipped, ', '.join(skipped_names)
          )
        window_start, data_wait, pending = time.perf_counter(), 0.0, []
      if monitor and (step % monitor_every == 0 or step == total_steps):
        monitor_start = time.perf_counter()
        result = monitor(state.online)
        writer.write_scalars(step, result.metrics)
        logging.info(
          'kNN monitor at epoch %d: %s',
          step // steps_per_epoch,
          ', '.join(
            f'{k}-NN {100 * result.metrics[f"monitor/knn_k{k}"]:.1f}%' for k in config.monitor.ks
          ),
        )
        grid = visualize.retrieval_grid_from_features(
          monitor.train,
          result.train,
          monitor.held_out,
          result.held_out,
          config.image_size,
          mesh,
          batch_size=config.monitor.batch_size,
        )
        visualize.write_pictures({'retrieval': grid}, workdir, step, writer)
        window_start += time.perf_counter() - monitor_start  # not training time
      if step % checkpoint_every == 0 or step == total_steps or preempted:
        # Never save a non-finite state: the latest checkpoint stays the last good one.
        last_loss = float(jax.device_get(pending[-1]['loss'])) if pending else 0.0
        _check_finite(step, last_loss, bool(_all_finite(state.trainable_params)))
        checkpointer.save(
          step,
          state,
          force=True,
          metadata={**settings, STREAM_METADATA: _stream_positions(stream, step)},
        )
      if preempted:
        logging.warning('Stopping at step %d; the run resumes from here.', step)
        break
  finally:
    try:  # the handlers stay until the last save is complete: a second Ctrl-C may cut it
      checkpointer.wait()
      writer.flush()
    finally:
      stop.restore()
  if preempted and stop.interrupted_anywhere():
    raise TrainingInterrupted(step, checkpointer.directory)
  return state
