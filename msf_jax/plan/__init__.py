"""Planning a run before paying for the hardware: the programs a run would execute, compiled
for a TPU slice (or XLA's host devices) on this machine, and what the compiler says of them.
`python -m msf_jax.plan` is the command line; `msf_jax.plan.planner.plan_run` makes a plan.
The package imports only the slices (no TensorFlow), so that the command line can quiet
TensorFlow's logs before the planner imports it."""

from msf_jax.plan.slices import GENERATIONS, Slice, SliceError, parse_slice

__all__ = [
  'GENERATIONS',
  'Slice',
  'SliceError',
  'parse_slice',
]
