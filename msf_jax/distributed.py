"""Multi-process start-up: `jax.distributed` on pods and clusters, nothing on one machine.

One process runs per host (per GPU under SLURM); each sees its local devices, the mesh
spans all of them, and each process reads its own share of the data. On Cloud TPU VMs, in
SLURM allocations and under Open MPI's mpirun jax finds the coordinator, the process count
and this process's index by itself; elsewhere all three are given explicitly (or none, to
train on one machine). Cross-process collectives on the CPU use gloo, jax 0.10's default.
"""

import glob
import os
import pathlib
from importlib.util import find_spec

import jax
from absl import logging

# The variables jax 0.10's own detection (jax.distributed.initialize() with no arguments)
# reads; a variable counts as soon as it is set, even to ''.
_OMPI_URI = 'OMPI_MCA_orte_hnp_uri'  # set only under Open MPI's mpirun / mpiexec
_SLURM_ENV = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)
_GKE_TPU_HOSTS_ENV = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')
# jax counts TPU chips on the PCI bus: Google's vendor id (which gVNIC network cards share)
# with the device id of a TPU chip (v3, plc, v4, v5p, v5e, v6e, 7x).
_PCI_DEVICES = '/sys/bus/pci/devices'
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICE_IDS = frozenset(
  {'0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'}
)
# A GPU's device files: NVIDIA's and WSL2's, as jax looks for them, and AMD's ROCm driver.
_GPU_DEVICE_FILES = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg', '/dev/kfd')


def _is_tpu_chip(pci_device: str) -> bool:
  """Whether a PCI device folder is a TPU chip: Google's vendor id alone is not enough."""

  def read(name: str) -> str:
    return pathlib.Path(pci_device, name).read_text().strip()

  return read('vendor') == _GOOGLE_PCI_VENDOR and read('device') in _TPU_PCI_DEVICE_IDS


def _libtpu_found() -> bool:
  """libtpu as jax looks for it: a file named by TPU_LIBRARY_PATH, else the libtpu package."""
  return os.path.isfile(os.environ.get('TPU_LIBRARY_PATH', '')) or find_spec('libtpu') is not None


def _tpu_chips_attached() -> bool:
  return any(
    _is_tpu_chip(os.path.dirname(vendor)) for vendor in glob.glob(f'{_PCI_DEVICES}/*/vendor')
  )


def _running_in_cloud_tpu_vm() -> bool:
  """Whether jax takes this machine for a Cloud TPU VM, the only place its TPU clusters exist:
  libtpu is found and TPU chips are attached, or JAX_FORCE_TPU_INIT says so regardless."""
  if 'JAX_FORCE_TPU_INIT' in os.environ:
    return True
  return _libtpu_found() and _tpu_chips_attached()


def cpu_alone_without_accelerators() -> bool:
  """Has JAX use the CPU alone (jax_platforms 'cpu') on a machine with no TPU chip and no GPU;
  returns whether it did. Called before anything touches a backend.

  Where libtpu is installed (the test requirements install it for the planner), jax loads it
  on any machine, and libtpu, finding no TPU, prints four lines of errors that read as a broken
  install. A TPU chip on the PCI bus, a GPU's device file, JAX_FORCE_TPU_INIT or a
  JAX_PLATFORMS of the user's leaves jax's own choice, so no accelerator is ever hidden."""
  if (
    os.environ.get('JAX_PLATFORMS')
    or 'JAX_FORCE_TPU_INIT' in os.environ
    or _tpu_chips_attached()
    or any(map(os.path.exists, _GPU_DEVICE_FILES))
  ):
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True


def detected_cluster() -> str | None:
  """The cluster environment `jax.distributed.initialize()` would configure itself from:
  'ompi', 'slurm', 'gketpu' or 'gcetpu' (checked in jax's order), or None on a plain machine.

  jax keeps its detection private; its rules are repeated here, read from the environment, so
  that we join a job exactly when jax can configure itself. On a Cloud TPU VM without GKE's
  worker list jax also asks the GCE metadata server for this host's worker number; that needs
  the network, so it is taken as given (every TPU VM has one) unless TPU_SKIP_MDS_QUERY is set.
  Not detected: Kubernetes jobs (jax detects them only when the kubernetes package is
  installed) and mpi4py (opt-in in jax, never picked by `jax.distributed.initialize()` alone);
  there, give the three values explicitly."""
  if _OMPI_URI in os.environ:
    return 'ompi'
  if all(name in os.environ for name in _SLURM_ENV):
    return 'slurm'
  if not _running_in_cloud_tpu_vm():
    return None
  if any(name in os.environ for name in _GKE_TPU_HOSTS_ENV):
    return 'gketpu'
  if 'TPU_SKIP_MDS_QUERY' not in os.environ:
    return 'gcetpu'
  return None


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int) -> None:
  if not coordinator_address or ':' not in coordinator_address:
    raise ValueError(
      f"The coordinator address must be host:port (process 0's host and a "
      f'free port), got {coordinator_address!r}.'
    )
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f'The process id must be in [0, num_processes): got process id '
      f'{process_id} of {num_processes} processes.'
    )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins this process to a multi-process job before anything touches the backend.

  All three arguments or none: with all three they are passed to `jax.distributed`; with
  none, a cluster jax knows (`detected_cluster`: a Cloud TPU VM, a SLURM job, an Open MPI
  launch) configures itself, and on a plain machine nothing happens (one process with its
  local devices).
  """
  given = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
  }
  missing = [name for name, value in given.items() if value is None]
  if missing and len(missing) < len(given):
    raise ValueError(
      f'Give all of --coordinator_address, --num_processes and --process_id, '
      f'or none of them (on a Cloud TPU pod or under SLURM they are detected); '
      f'missing: {", ".join("--" + name for name in missing)}.'
    )
  if coordinator_address is not None and num_processes is not None and process_id is not None:
    _check_explicit(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := detected_cluster()) is not None:
    logging.info('Detected a %s cluster: joining it with jax.distributed.', cluster)
    jax.distributed.initialize()
  logging.info(
    'Process %d of %d: %d local devices of %d.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
