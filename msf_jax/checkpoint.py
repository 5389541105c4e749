"""Orbax checkpoints of the whole MSFState: asynchronous saves, the last K kept, restore of
the latest onto any mesh (another number of devices included)."""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from msf_jax.sharding import replicated
from msf_jax.train_state import MSFState, create_state

STATE_ITEM = 'state'


def manager_directory(directory: str) -> str:
  """Orbax needs an absolute path; a URL such as gs://bucket/run is one already."""
  return directory if '://' in directory else os.path.abspath(directory)


class Checkpointer:
  """A CheckpointManager for one run directory. Saves return at once and finish in the
  background; `wait()` before the process exits."""

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1):
    self.manager = ocp.CheckpointManager(
        manager_directory(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             save_interval_steps=save_interval_steps),
        item_names=(STATE_ITEM,))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: MSFState, force: bool = False) -> bool:
    """Saves at `state.step` if the interval says so (always with `force`)."""
    return self.manager.save(int(state.step),
                             args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}),
                             force=force)

  def restore(self, config: ml_collections.ConfigDict, mesh: Mesh, step: int | None = None
              ) -> MSFState | None:
    """The state saved at `step` (the latest by default) replicated over `mesh`, or None if
    there is no checkpoint yet. The config gives the structure, shapes and dtypes."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    shapes = jax.eval_shape(lambda: create_state(config, jax.random.key(0)))
    sharding = replicated(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            shapes)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}))
    return restored[STATE_ITEM]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
