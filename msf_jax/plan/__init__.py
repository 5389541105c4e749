"""Planning a run before paying for the hardware: the programs a run would execute, compiled
for a TPU slice (or XLA's host devices) on this machine, and what the compiler says of them.
`python -m msf_jax.plan` is the command line."""

from msf_jax.plan.planner import ProgramPlan, plan_run
from msf_jax.plan.slices import GENERATIONS, Slice, parse_slice
