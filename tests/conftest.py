"""Eight fake CPU devices for the sharding tests; set before JAX is first imported."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # Tests run on the CPU, even on a GPU box.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
