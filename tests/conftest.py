"""Eight fake CPU devices for the sharding tests; set before JAX is first imported. The fixtures
that several test modules use."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # Tests run on the CPU, even on a GPU box.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


@pytest.fixture
def sleeper():
  """A live process that is not this one."""
  process = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  yield process
  process.kill()
  process.wait()
