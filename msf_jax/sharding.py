"""One device mesh with a `data` axis: the batch is split along it; the memory bank is either
replicated or split by rows along it (`msf.bank_layout`); everything else is replicated."""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# msf.bank_layout: every device holds the whole bank ('replicated'), or bank_size / devices
# consecutive rows of it ('sharded'); 'auto' shards whenever it can.
BANK_LAYOUTS = ('replicated', 'sharded', 'auto')


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (all devices, over all hosts, by default)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree of host or device arrays onto every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(batch: Any, mesh: Mesh) -> Any:
  """Shards a global batch held in full by this (single) process over the mesh."""
  return jax.device_put(batch, batch_sharded(mesh))


def resolve_bank_layout(layout: str, num_rows: int, device_count: int) -> str:
  """'replicated' or 'sharded' for a bank of `num_rows` on `device_count` devices. 'auto'
  shards when there is more than one device and the rows divide evenly among them."""
  if layout not in BANK_LAYOUTS:
    raise ValueError(f'msf.bank_layout={layout!r} is not one of {", ".join(BANK_LAYOUTS)}.')
  if layout == 'auto':
    return 'sharded' if device_count > 1 and num_rows % device_count == 0 else 'replicated'
  if layout == 'sharded' and num_rows % device_count:
    raise ValueError(
      f'A sharded bank of {num_rows} rows does not divide among '
      f'{device_count} devices: use a multiple of {device_count} rows.'
    )
  return layout


def row_spec(ndim: int, layout: str) -> P:
  """The PartitionSpec of a [rows, ...] array in `layout`: rows split over `data`, or none."""
  return P(DATA_AXIS, *(None,) * (ndim - 1)) if layout == 'sharded' else P()


def rows_sharded(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """A [rows, ...] array split by rows over the `data` axis: consecutive rows a device."""
  return NamedSharding(mesh, row_spec(ndim, 'sharded'))
