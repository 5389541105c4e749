"""Eight fake CPU devices for the sharding tests, and one compilation cache for the session;
both set before JAX is first imported."""

import collections
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # Tests run on the CPU, even on a GPU box.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _own_compilation_cache() -> str | None:
  """JAX's persistent compilation cache in a folder this session makes and removes: tests
  that build the same step (every `make_train_step` is a fresh closure, so JAX's in-memory
  cache misses) and the programs they start in subprocesses compile it once. The pytest-xdist
  workers and the subprocesses inherit the variable, so only the first process (the one the
  command started) makes the folder. None when the cache was given from outside."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return None
  folder = tempfile.mkdtemp(prefix='msf_jax_test_jit_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  # Every program, not only those that took a second or more to compile: creating a state
  # runs flax's init op by op, hundreds of small programs (16 s for a ResNet-18 in a fresh
  # process on 2 busy cores, 4 s with them read from this cache).
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  return folder


_CACHE = _own_compilation_cache()


def pytest_collection_modifyitems(config, items):
  """Test files in order of their count of `slow` tests, most first (each file's tests in
  their order; ties in pytest's order). scripts/test.sh runs whole files on each worker
  (`--dist loadfile`, which keeps a module's fixtures, such as its subprocess runs, in one
  process) in this order (`--no-loadscope-reorder`: pytest-xdist would otherwise send the
  files with the most tests first, leaving the few long tests of test_main.py, test_parity.py
  or test_demo.py for the end while the other worker idles): the longest work starts first,
  and the quick files fill in at the end."""
  slow = collections.Counter(item.path for item in items if item.get_closest_marker('slow'))
  first = {}
  for index, item in enumerate(items):
    first.setdefault(item.path, index)
  items.sort(key=lambda item: (-slow[item.path], first[item.path]))


def pytest_unconfigure(config):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def sleeper():
  """A live process that is not this one."""
  process = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  yield process
  process.kill()
  process.wait()
