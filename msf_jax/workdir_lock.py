"""One training run per workdir: a lock file that a second run refuses and that a dead run's
leftover does not block.

The lock (WORKDIR/msf_jax.lock, JSON) names its holder: host, process id, the job (SLURM's job
id, or MSF_JAX_RUN_ID for a restart loop such as launch/'s supervisor) and a heartbeat that a
background thread renews every minute. A lock is stale, and is taken over with a warning,
when its process is gone (same host), when it is the same job come back (a requeued or
restarted run), or when its heartbeat is older than ten minutes (another host: a preempted VM).

On a local disk the lock is created atomically. On a bucket (gs://) two runs that start
within the same second can both pass the check; the heartbeat of the one whose lock was
overwritten then logs an error naming the other, and any later start is refused. Only
process 0 of a multi-process job holds the lock.
"""

import dataclasses
import json
import os
import socket
import threading
import time

import tensorflow as tf
from absl import logging

LOCK_FILE = 'msf_jax.lock'
HEARTBEAT_SECONDS = 60
STALE_AFTER_SECONDS = 600
RUN_ID_VARIABLES = ('SLURM_JOB_ID', 'MSF_JAX_RUN_ID')


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  job: str
  heartbeat: float


UNREADABLE = Holder('', 0, '', 0.0)  # a lock file that is not JSON: no live holder named


def this_process() -> Holder:
  job = next((os.environ[name] for name in RUN_ID_VARIABLES if os.environ.get(name)), '')
  return Holder(socket.gethostname(), os.getpid(), job, time.time())


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def stale_reason(holder: Holder, me: Holder) -> str | None:
  """Why `holder`'s lock no longer counts for `me`, or None while it does."""
  if holder.host == me.host:
    if holder.pid == me.pid:
      return "it is this process's own"
    return None if _process_exists(holder.pid) else f'process {holder.pid} has exited'
  if holder.job and holder.job == me.job:
    return f'job {holder.job} is back (requeued or restarted)'
  age = me.heartbeat - holder.heartbeat
  if age > STALE_AFTER_SECONDS:
    return f'its last heartbeat was {age / 60:.0f} minutes ago'
  return None


def _read(path: str) -> Holder | None:
  try:
    with tf.io.gfile.GFile(path) as f:
      return Holder(**json.load(f))
  except tf.errors.NotFoundError:
    return None
  except (ValueError, TypeError) as e:  # a half-written or foreign file: not a live holder
    logging.warning('Ignoring the unreadable workdir lock %s (%s).', path, e)
    return UNREADABLE


def _write(path: str, holder: Holder, exclusive: bool) -> bool:
  """Writes the lock; with `exclusive` on a local disk, only if no file is there (atomic)."""
  payload = json.dumps(dataclasses.asdict(holder)).encode()
  if exclusive and '://' not in path:
    try:
      descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
      return False
    with os.fdopen(descriptor, 'wb') as f:
      f.write(payload)
    return True
  temporary = f'{path}.{holder.pid}.tmp'
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(payload)
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return True


class WorkdirLock:
  """Held from `acquire()` to `release()` (or the `with` block), with a heartbeat thread."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> None:
    tf.io.gfile.makedirs(os.path.dirname(self.path))
    me = this_process()
    if not _write(self.path, me, exclusive=True):
      holder = _read(self.path)
      reason = stale_reason(holder, me) if holder else 'it vanished'
      if holder and reason is None:  # (reason is None only for a holder)
        raise WorkdirBusyError(
          f'{os.path.dirname(self.path)} is in use by process {holder.pid} on {holder.host} '
          f'(heartbeat {me.heartbeat - holder.heartbeat:.0f} s ago): use another --workdir, '
          f'or stop that run. If it is dead on another host, its lock ({self.path}) is taken '
          f'over {STALE_AFTER_SECONDS // 60} minutes after its last heartbeat, or delete it.'
        )
      logging.warning('Taking over the workdir lock %s: %s.', self.path, reason)
      _write(self.path, me, exclusive=False)
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      holder, me = _read(self.path), this_process()
      if holder == UNREADABLE:  # caught mid-write by another run: look again next beat
        continue
      if holder and (holder.host, holder.pid) != (me.host, me.pid):
        logging.error(
          'The workdir lock %s now names process %d on %s: another run writes to '
          'this workdir too. Stop one of them.',
          self.path,
          holder.pid,
          holder.host,
        )
        return
      _write(self.path, me, exclusive=False)

  def release(self) -> None:
    self._stop.set()
    if self._thread:
      self._thread.join()
    holder = _read(self.path)
    if holder and (holder.host, holder.pid) == (socket.gethostname(), os.getpid()):
      tf.io.gfile.remove(self.path)

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
