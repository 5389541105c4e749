"""Orbax checkpoints of any pytree: asynchronous saves, the last K kept, restore onto any mesh
given an abstract target (`jax.eval_shape` of the function that builds the tree), and a
restore of chosen subtrees alone (one encoder without the bank or the optimizer state).

Only this module knows orbax's directory layout; it knows nothing of models or configs.
"""

import os
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

STATE_ITEM = 'state'
METADATA_ITEM = 'metadata'  # JSON beside the tree, e.g. the config that made it
CHECKPOINT_FOLDER = 'checkpoints'
DAMAGED_FOLDER = 'damaged_checkpoints'

KeyPath = tuple[str, ...]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read safely or does not fit what is asked of it."""


def checkpoint_directory(workdir: str) -> str:
  """Where a training run in `workdir` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINT_FOLDER)


def damaged_directory(workdir: str) -> str:
  """Where a training run moves checkpoints it cannot read (kept for inspection)."""
  return os.path.join(workdir, DAMAGED_FOLDER)


def manager_directory(directory: str) -> str:
  """Orbax needs an absolute path; a URL such as gs://bucket/run is one already."""
  return directory if '://' in directory else os.path.abspath(directory)


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaves_by_path(tree: Any) -> dict[KeyPath, Any]:
  """{('online', 'params', ...): leaf} of a pytree (dataclass fields and dict keys alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(key) for key in path): leaf for path, leaf in leaves}


def _fields(leaves: dict[KeyPath, Any]) -> str:
  return ', '.join(sorted({path[0] for path in leaves if path}))


def check_structure(saved: Any, target: Any, where: str) -> None:
  """Raises a CheckpointError naming what differs when the saved tree (orbax metadata) and
  the target have other leaves, shapes or dtypes: a checkpoint of another layout or another
  config is never restored by guesswork."""
  saved_leaves, target_leaves = _leaves_by_path(saved), _leaves_by_path(target)
  differing = sorted({path[0] for path in set(saved_leaves) ^ set(target_leaves)})
  if _fields(saved_leaves) != _fields(target_leaves):
    raise CheckpointError(
      f'{where} was written by another version of msf_jax: its fields {", ".join(differing)} '
      f"differ from this version's (saved: {_fields(saved_leaves)}; expected: "
      f'{_fields(target_leaves)}). Evaluate it with the version that wrote it, or export its '
      'backbone there (python -m msf_jax.interop export-backbone) and read that file here.'
    )
  if differing:
    example = '.'.join(min(set(saved_leaves) ^ set(target_leaves)))
    raise CheckpointError(
      f'{where} holds other {", ".join(differing)} trees than the config builds (e.g. '
      f'{example} is only in one of them): run with the config the checkpoint was trained '
      'with (depth, width, stem).'
    )
  for path, leaf in target_leaves.items():
    stored = saved_leaves[path]
    if tuple(stored.shape) != tuple(leaf.shape) or np.dtype(stored.dtype) != np.dtype(leaf.dtype):
      raise CheckpointError(
        f'{where}: {".".join(path)} is {stored.dtype}{list(stored.shape)} there, but the '
        f'config makes {leaf.dtype}{list(leaf.shape)}: run with the config the checkpoint '
        'was trained with.'
      )


class Checkpointer:
  """A CheckpointManager for one checkpoint directory. Saves return at once and finish in the
  background; `wait()` before the process exits."""

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1):
    self.directory = manager_directory(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, save_interval_steps=save_interval_steps
      ),
      item_names=(STATE_ITEM, METADATA_ITEM),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree: Any, force: bool = False, metadata: dict | None = None) -> bool:
    """Saves `tree` (and the JSON-able `metadata`) at `step` if the interval says so
    (always with `force`)."""
    items = {STATE_ITEM: ocp.args.StandardSave(tree)}
    if metadata is not None:
      items[METADATA_ITEM] = ocp.args.JsonSave(metadata)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_metadata(self, step: int) -> dict | None:
    """The metadata saved with the checkpoint at `step`, or None if it has none."""
    if not tf.io.gfile.exists(os.path.join(self.directory, str(step), METADATA_ITEM)):
      return None
    return self.manager.restore(
      step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
    )[METADATA_ITEM]

  def _saved_tree(self, step: int) -> Any:
    """The saved tree's structure, shapes and dtypes, read from its metadata alone."""
    return (
      ocp.PyTreeCheckpointHandler().metadata(self.manager.directory / str(step) / STATE_ITEM).tree
    )

  def restore(self, abstract: Any, step: int | None = None) -> Any | None:
    """The tree saved at `step` (the latest by default) in the structure, shapes, dtypes and
    shardings of `abstract` (jax.ShapeDtypeStruct leaves), or None if there is none yet."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    check_structure(
      self._saved_tree(step), abstract, f'The checkpoint at step {step} in {self.directory}'
    )
    restored = self.manager.restore(
      step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
    )
    return restored[STATE_ITEM]

  def restore_newest_readable(self, abstract: Any, aside: str) -> Any | None:
    """`restore` of the newest checkpoint that can be read, or None if there is none yet.

    A damaged one (a truncated data file, a missing manifest) is reported with its step and
    the reason and moved into `aside`, never deleted, and the next older one is tried. A
    checkpoint of another layout or config is not damage: its CheckpointError stops the
    run. If every checkpoint is damaged, a CheckpointError lists what was tried."""
    tried = []
    for step in reversed(self.all_steps()):
      try:
        return self.restore(abstract, step)
      except CheckpointError:
        raise
      except Exception as e:  # TensorStore, orbax and file-system errors alike
        first_line = (str(e).strip().splitlines() or [''])[0][:300]
        reason = f'{type(e).__name__}: {first_line}'
        logging.warning(
          'The checkpoint at step %d in %s cannot be read (%s); moving it to %s '
          'and trying the one before.',
          step,
          self.directory,
          reason,
          aside,
        )
        tried.append(f'step {step} ({reason})')
        self._move_aside(step, aside)
    if tried:
      raise CheckpointError(
        f'No checkpoint in {self.directory} can be read; tried '
        f'{"; ".join(tried)}. They were moved to {aside}.'
      )
    return None

  def _move_aside(self, step: int, aside: str) -> None:
    """Moves a step's folder out of the manager's view (process 0; the others wait)."""
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      destination = os.path.join(aside, f'{step}-{int(time.time())}')
      tf.io.gfile.makedirs(aside)
      _move_directory(source, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved aside checkpoint {step}')
    self.manager.reload()

  def restore_subtrees(self, step: int, paths: Sequence[KeyPath]) -> list[Any]:
    """The subtrees at `paths` (keys from the root, e.g. ('online', 'params', 'backbone')) of
    the tree saved at `step`, as host numpy arrays; nothing else is read from storage."""
    saved = self._saved_tree(step)
    item: dict = {}
    for path in paths:
      node, destination = saved, item
      for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
          raise CheckpointError(
            f'The checkpoint at step {step} in {self.directory} has no '
            f'{".".join(path[: depth + 1])}: it holds '
            f'{sorted(node) if isinstance(node, dict) else "an array"} there. Was it written '
            'by another version of msf_jax?'
          )
        node = node[key]
        destination = destination.setdefault(key, node if depth == len(path) - 1 else {})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True
          )
        }
      ),
    )[STATE_ITEM]
    out = []
    for path in paths:
      node = restored
      for key in path:
        node = node[key]
      out.append(node)
    return out

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _move_directory(source: str, destination: str) -> None:
  """A rename where the file system has one; on object stores (gs://), which rename only
  files, a copy of every file and then the removal of the source."""
  if '://' not in source:
    os.rename(source, destination)
    return
  for directory, _, files in tf.io.gfile.walk(source):
    target = os.path.join(destination, os.path.relpath(directory, source))
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(os.path.join(directory, name), os.path.join(target, name))
  tf.io.gfile.rmtree(source)


def find_checkpoint_directory(path: str) -> str:
  """The checkpoint directory of `path`, given as a training workdir or as the directory."""
  if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
    raise CheckpointError(
      f'{path} is a file: msf_jax checkpoints are directories (the '
      f'training workdir or its {CHECKPOINT_FOLDER}/ folder).'
    )
  if not tf.io.gfile.isdir(path):
    raise FileNotFoundError(
      f'No msf_jax checkpoint directory at {path!r}: give the training '
      f'workdir or its {CHECKPOINT_FOLDER}/ folder.'
    )
  inside = checkpoint_directory(path)
  return inside if tf.io.gfile.isdir(inside) else path


def resolve_step(directory: str, step: int | None = None) -> int:
  """`step` if the checkpoint directory has it, else (step None) its latest."""
  checkpointer = Checkpointer(directory)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  if not steps:
    raise CheckpointError(
      f'No msf_jax checkpoint in {directory}: expected the step folders '
      'that msf_jax.checkpoint.Checkpointer writes (or a training workdir).'
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f'{directory} has no step {step}; it has steps {steps}.')
  return step
