"""How long the two-view stage holds Python's GIL a sample, measured, and what that caps one
process at.

The stage runs on its own core (a thread consuming batches, tf.data's threads under it) while
a probe on another core reads the GIL's `locked` word in a loop of C, called through ctypes
(which releases the GIL for the call): the share of reads that find the GIL held is the
share of the wall time some thread of the stage held it. Times the window, over the samples
made in it, that is the GIL held a sample, and a process of such a stage makes at most
1e6 / (µs a sample) samples a second, whatever its cores.

The `locked` word is found, not assumed: the one int of `_PyRuntime` that reads 1 from
Python and 0 from a C call that has released the GIL. It needs a C compiler (`cc`). The probe
and the stage must be on different cores (on one core the probe runs only when the stage is
descheduled, and reads the GIL free). Controls: `--stage spin --spin_us 200` adds a Python
function holding the GIL 200 µs a sample to the stage (the method should read about 200 µs
more), and the TensorFlow stage itself, whose only Python is one call a batch (it should read
about 0). `--repo` measures another checkout's stage (PIL's crops: commit 347afbc).

  python benchmarks/host_gil.py --windows 5
  python benchmarks/host_gil.py --windows 5 --stage spin --spin_us 200
  python benchmarks/host_gil.py --windows 5 --repo /path/to/other/checkout
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64
PROBE_CORE, STAGE_CORE = 0, 1

PROBE_C = r"""
#include <string.h>
#include <time.h>
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
long held_reads(volatile int *locked, double seconds, long *reads) {
  double end = now() + seconds;
  long held = 0, n = 0;
  while (now() < end) {
    held += (*locked != 0);
    n++;
  }
  *reads = n;
  return held;
}
void copy_bytes(const char *from, char *to, long n) { memcpy(to, from, n); }
"""


def _probe_library() -> ctypes.CDLL:
  folder = tempfile.mkdtemp()
  source, library = os.path.join(folder, 'probe.c'), os.path.join(folder, 'probe.so')
  with open(source, 'w') as f:
    f.write(PROBE_C)
  subprocess.run(['cc', '-O2', '-shared', '-fPIC', '-o', library, source], check=True)
  lib = ctypes.CDLL(library)  # CDLL: every call releases the GIL
  lib.held_reads.restype = ctypes.c_long
  return lib


def gil_locked_address(lib: ctypes.CDLL, span: int = 1 << 16) -> int:
  """The address of the GIL's `locked` word: the one int of `_PyRuntime` that is 1 while
  Python runs (read by ctypes.string_at, which keeps the GIL) and 0 inside a C call that
  released it, in each of five pairs of reads."""
  base = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, '_PyRuntime'))
  released = ctypes.create_string_buffer(span)
  found = None
  for _ in range(5):
    held = np.frombuffer(ctypes.string_at(base, span), np.int32)
    lib.copy_bytes(ctypes.c_void_p(base), released, ctypes.c_long(span))
    flips = set(np.flatnonzero((held == 1) & (np.frombuffer(released.raw, np.int32) == 0)))
    found = flips if found is None else found & flips
  if len(found) != 1:
    raise RuntimeError(f"the GIL's locked word is not one int of _PyRuntime: {sorted(found)}")
  return base + 4 * int(found.pop())


def _stage_batches(folder: str, stage: str, size: int, spin_us: float):
  """A function that makes one batch of BATCH two-view samples, consumed inside TensorFlow."""
  import tensorflow as tf

  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from host_profile import _dataset, _read

  from msf_jax.data import augment

  def spin() -> float:
    end = time.perf_counter() + spin_us / 1e6
    while time.perf_counter() < end:
      pass
    return 0.0

  def fn(encoded, seed):
    views = augment.two_views(encoded, seed, size)
    if stage == 'spin':
      views['spin'] = tf.numpy_function(spin, [], tf.float64, stateful=False)
    return views

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  sink = _dataset(_read(folder), fn, BATCH).repeat().map(lambda x: tf.size(x['target']))
  return tf.function(lambda: sink.take(1).reduce(0, lambda n, size: n + 1))


def measure(folder: str, args) -> None:
  """Windows of probe reads while the stage runs: each window's GIL share, samples a second
  and GIL µs a sample, then the medians."""
  lib = _probe_library()
  locked = ctypes.c_void_p(gil_locked_address(lib))
  batch = _stage_batches(folder, args.stage, args.size, args.spin_us)
  batch()  # traced
  done, stop = [], threading.Event()

  def stage():
    while not stop.is_set():
      batch()
      done.append(time.perf_counter())

  worker = threading.Thread(target=stage)
  worker.start()
  os.sched_setaffinity(0, {PROBE_CORE})  # this thread only: the stage's stay on STAGE_CORE
  figures = []
  for _ in range(args.windows):
    reads = ctypes.c_long()
    start = time.perf_counter()
    held = lib.held_reads(locked, ctypes.c_double(args.seconds), ctypes.byref(reads))
    end = time.perf_counter()
    samples = BATCH * sum(start <= t < end for t in done)
    gil_us = held / reads.value * (end - start) / max(samples, 1) * 1e6
    figures.append((gil_us, samples / (end - start), held / reads.value))
    print(
      f'window: GIL held {100 * held / reads.value:.2f}% of {end - start:.1f} s, '
      f'{samples / (end - start):.1f} samples/s: {gil_us:.1f} µs a sample'
    )
  stop.set()
  worker.join()
  gil_us = statistics.median(f[0] for f in figures)
  print(
    f'median: GIL {gil_us:.1f} µs a sample (windows {min(f[0] for f in figures):.1f}-'
    f'{max(f[0] for f in figures):.1f}), {statistics.median(f[1] for f in figures):.1f} '
    f'samples/s on one core; cap {1e6 / gil_us:,.0f} samples/s a process'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=4.0, help='seconds a window')
  parser.add_argument('--stage', choices=['two_views', 'spin'], default='two_views')
  parser.add_argument('--spin_us', type=float, default=200.0)
  parser.add_argument('--repo', default=REPO, help='the checkout whose augment is measured')
  args = parser.parse_args()
  if os.environ.get('PYTHONPATH') != args.repo:  # that checkout's msf_jax
    os.environ['PYTHONPATH'] = args.repo
    os.execv(sys.executable, [sys.executable, *sys.argv])
  os.sched_setaffinity(0, {STAGE_CORE})  # every thread TensorFlow starts stays there
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from input_benchmark import make_photos

  folder = tempfile.mkdtemp()
  make_photos(folder, args.images)
  measure(folder, args)


if __name__ == '__main__':
  main()
