"""Multi-process start-up: `jax.distributed` on pods and clusters, nothing on one machine.

One process runs per host (per GPU under SLURM); each sees its local devices, the mesh
spans all of them, and each process reads its own share of the data. On Cloud TPU pod
slices and SLURM allocations jax finds the coordinator, the process count and this
process's index by itself; elsewhere all three are given explicitly (or none, to train on
one machine). Cross-process collectives on the CPU use gloo, jax 0.10's default.
"""

import jax
from absl import logging


def detected_cluster() -> str | None:
  """The cluster environment `jax.distributed.initialize()` would configure itself from
  ('gcetpu', 'gketpu', 'slurm', 'ompi', ...), or None on a plain machine.

  jax keeps its detection private; opt-in methods (mpi4py) are never picked implicitly,
  as in `jax.distributed.initialize`."""
  from jax._src import clusters
  for cluster in clusters.ClusterEnv._cluster_types:
    if not cluster.opt_in_only_method and cluster.is_env_present():
      return cluster.name
  return None


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int) -> None:
  if not coordinator_address or ':' not in coordinator_address:
    raise ValueError(f'The coordinator address must be host:port (process 0\'s host and a '
                     f'free port), got {coordinator_address!r}.')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'The process id must be in [0, num_processes): got process id '
                     f'{process_id} of {num_processes} processes.')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a multi-process job before anything touches the backend.

  All three arguments or none: with all three they are passed to `jax.distributed`; with
  none, a Cloud TPU pod slice or a SLURM job is detected and configures itself, and on a
  plain machine nothing happens (one process with its local devices).
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  missing = [name for name, value in given.items() if value is None]
  if missing and len(missing) < len(given):
    raise ValueError(f'Give all of --coordinator_address, --num_processes and --process_id, '
                     f'or none of them (on a Cloud TPU pod or under SLURM they are detected); '
                     f'missing: {", ".join("--" + name for name in missing)}.')
  if not missing:
    _check_explicit(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := detected_cluster()) is not None:
    logging.info('Detected a %s cluster: joining it with jax.distributed.', cluster)
    jax.distributed.initialize()
  logging.info('Process %d of %d: %d local devices of %d.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
