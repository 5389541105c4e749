"""What the compiler says about a program: memory per device by kind, its FLOPs and memory
traffic, and the bytes of each collective read from the optimized HLO; and the
architecture's own FLOP count (convolutions and matrix products of the traced program), to
check XLA's against."""

import collections
import math
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.extend import core as jax_core

GIB = 2**30
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
  'c64': 8,
  'c128': 16,
}
# `%name = <shape> all-gather(...)`, or the `-done` half of an asynchronous pair, whose shape
# is the result (a `-start`'s shape also holds its operands, so it is not counted).
_COLLECTIVE_LINE = re.compile(
  r'=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>' + '|'.join(COLLECTIVES) + r')(?:-done)?\('
)
_ARRAY_SHAPE = re.compile(r'(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\]')


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of `jax.ShapeDtypeStruct`s with shardings: each leaf's
  shard (the whole leaf where it is replicated)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


MEMORY_KINDS = ('state', 'batch', 'other_arguments', 'outputs', 'temporaries', 'code')


def memory(compiled: jax.stages.Compiled, state_bytes: int, batch_bytes: int) -> dict[str, int]:
  """Bytes per device by kind: the state and batch arguments, other arguments, outputs that do
  not reuse a donated argument, temporaries and code; `total` is their sum, what the program
  needs resident at its peak."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError('XLA gave no memory analysis of the compiled program.')
  kinds = {
    'state': state_bytes,
    'batch': batch_bytes,
    'other_arguments': max(analysis.argument_size_in_bytes - state_bytes - batch_bytes, 0),
    'outputs': max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0),
    'temporaries': analysis.temp_size_in_bytes,
    'code': analysis.generated_code_size_in_bytes,
  }
  return {**kinds, 'total': sum(kinds.values())}


def cost(compiled: jax.stages.Compiled) -> dict[str, float]:
  """XLA's count for one device and one run of the program: 'flops' and 'bytes accessed'."""
  analysis = compiled.cost_analysis() or {}  # None where XLA counts nothing
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict a device program
    analysis = analysis[0]
  return {
    'flops': float(analysis.get('flops', 0.0)),
    'bytes_accessed': float(analysis.get('bytes accessed', 0.0)),
  }


def _shape_bytes(shape: str) -> int:
  return sum(
    _DTYPE_BYTES.get(m['dtype'], 0) * math.prod(int(d) for d in m['dims'].split(',') if d)
    for m in _ARRAY_SHAPE.finditer(shape)
  )


def collectives(hlo_text: str) -> list[tuple[str, dict[str, int]]]:
  """(kind, {dtype: result bytes per device}) of each collective written in the optimized
  HLO, in order: a tuple all-reduce is one collective of several arrays."""
  found: list[tuple[str, dict[str, int]]] = []
  for match in _COLLECTIVE_LINE.finditer(hlo_text):
    by_dtype: collections.Counter[str] = collections.Counter()
    for array in _ARRAY_SHAPE.finditer(match['shape']):
      by_dtype[array['dtype']] += _shape_bytes(array[0])
    found.append((match['op'], dict(by_dtype)))
  return found


def collective_counts(hlo_text: str) -> dict[str, dict[str, int]]:
  """{collective: {'count': how many, dtype: result bytes per device}} over the optimized
  HLO: a step's latency grows with the count of collectives it waits on, not only with their
  bytes, and the dtypes tell a float32 gradient sum from a bfloat16 one. A collective the
  compiler copies into several fusions (TPU) counts once for each copy."""
  found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for kind, by_dtype in collectives(hlo_text):
    found[kind].update({'count': 1, **by_dtype})
  return {kind: dict(counts) for kind, counts in found.items()}


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{collective: result bytes per device} summed over the collectives written in the
  optimized HLO. One in a loop body counts once (the train step has none)."""
  found: collections.Counter[str] = collections.Counter()
  for kind, by_dtype in collectives(hlo_text):
    found[kind] += sum(by_dtype.values())
  return dict(found)


def while_loops(hlo_text: str) -> int:
  """The while loops of the optimized HLO: XLA's cost analysis counts each body once, however
  many times it runs (a chunked search's FLOPs are then one chunk's)."""
  return len(re.findall(r'\swhile\(', hlo_text))


def largest_collective(hlo_text: str) -> tuple[str, int] | None:
  """(HLO line, result bytes) of the largest collective in the program, or None."""
  sized = [(_shape_bytes(m['shape']), m) for m in _COLLECTIVE_LINE.finditer(hlo_text)]
  if not sized:
    return None
  size, match = max(sized, key=lambda item: item[0])
  line_start = hlo_text.rfind('\n', 0, match.start()) + 1
  return hlo_text[line_start : hlo_text.find('\n', match.end())].strip(), size


def valid_taps(
  in_size: int,
  out_size: int,
  kernel: int,
  stride: int,
  low: int,
  input_dilation: int,
  kernel_dilation: int,
) -> int:
  """(output position, kernel tap) pairs of one spatial axis that land on a real input pixel,
  not on zero padding."""
  outputs = np.arange(out_size)[:, None] * stride - low
  positions = outputs + np.arange(kernel)[None, :] * kernel_dilation
  real = (
    (positions % input_dilation == 0)
    & (positions >= 0)
    & (positions < (in_size - 1) * input_dilation + 1)
  )
  return int(real.sum())


def _conv_flops(equation) -> int:
  params = equation.params
  lhs_spec, rhs_spec, out_spec = params['dimension_numbers']
  lhs, kernel = equation.invars[0].aval.shape, equation.invars[1].aval.shape
  out = equation.outvars[0].aval.shape
  taps = math.prod(
    valid_taps(lhs[i], out[o], kernel[k], stride, low, input_dilation, kernel_dilation)
    for i, k, o, stride, (low, _), input_dilation, kernel_dilation in zip(
      lhs_spec[2:],
      rhs_spec[2:],
      out_spec[2:],
      params['window_strides'],
      params['padding'],
      params['lhs_dilation'],
      params['rhs_dilation'],
      strict=True,
    )
  )
  return 2 * out[out_spec[0]] * kernel[rhs_spec[0]] * kernel[rhs_spec[1]] * taps


def _equation_flops(equation) -> int:
  """2 x multiply-adds of a convolution (those with a real input pixel: zero padding is no
  work, and XLA does not count it either) or of a matrix product; 0 for anything else."""
  name = equation.primitive.name
  if name == 'conv_general_dilated':
    return _conv_flops(equation)
  if name == 'dot_general':
    (contracting, _), _ = equation.params['dimension_numbers']
    lhs = equation.invars[0].aval.shape
    return 2 * math.prod(equation.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
  return 0


def equations(jaxpr) -> Iterator:
  """Every equation of a jaxpr, those of the jaxprs inside it (jit, custom_vjp, scan) too."""
  for equation, _ in counted_equations(jaxpr):
    yield equation


def _repeats(equation) -> int:
  """How many times an equation's inner jaxprs run for one run of it: a scan's length; a
  shard_map's body once on every device of its manual axes (its shapes are one device's)."""
  params = equation.params
  if equation.primitive.name == 'scan':
    return params['length']
  if equation.primitive.name == 'shard_map':
    mesh, axes = params['mesh'], params.get('manual_axes') or params['mesh'].axis_names
    return math.prod(mesh.shape[axis] for axis in axes)
  return 1


def counted_equations(jaxpr, times: int = 1) -> Iterator[tuple[Any, int]]:
  """(equation, how many times it runs) for every equation of a jaxpr and of the jaxprs
  inside it. A while loop's trip count is not in its jaxpr: its body counts once (static
  loops, `fori_loop` with Python bounds included, are traced as scans)."""
  for equation in jaxpr.eqns:
    yield equation, times
    inner_times = times * _repeats(equation)
    for param in equation.params.values():
      for inner in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(inner, jax_core.ClosedJaxpr):
          inner = inner.jaxpr
        if isinstance(inner, jax_core.Jaxpr):
          yield from counted_equations(inner, inner_times)


def matmul_flops(fn: Callable, *args) -> int:
  """FLOPs of the convolutions and matrix products of `fn(*args)` as traced (shapes only:
  `args` may be `jax.ShapeDtypeStruct`s), counted from the architecture, not by XLA: each
  scan's body as many times as it runs, a shard_map's body once a device."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return sum(_equation_flops(e) * times for e, times in counted_equations(jaxpr))
