"""A step-time estimate read from the optimized HLO of a compiled program, operation by
operation: each top-level operation (a fusion, a convolution, a copy...) takes the larger of
its FLOPs at the chip's peak for its dtype and precision and its HBM bytes at the chip's
bandwidth; a while loop's body counts once per iteration (XLA's own cost analysis counts it
once in all); each collective takes a latency per hop plus its bytes at the interconnect's
bandwidth. The chips' figures, with their sources, are in `CHIPS`.

Two numbers come out, named for what they are:
- the bound: the larger of all FLOPs at peak and the program's arguments read once; no run
  of this program is faster (collectives may overlap compute, so they are not added);
- the estimate: the operations one after another at their own roofline, plus every
  collective waited for. Its assumptions: nothing overlaps (XLA's TPU scheduler overlaps
  asynchronous collectives and prefetches with compute, which makes a run faster), every
  operation reaches its roofline (small or oddly shaped ones do not, which makes it slower),
  and an operation's operands and result cross HBM once (on TPU, buffers the compiler placed
  in another memory space, a layout's `S(n)`: the on-chip VMEM, v4's CMEM, do not count).
"""

import collections
import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp

from msf_jax.plan.compiled import valid_taps

# Figures a chip. TPU peaks and HBM bandwidths are Google Cloud's per-chip specifications;
# the interconnect is the bidirectional ICI bandwidth a chip (v4: twice the 1.1 PB/s
# all-reduce bandwidth of its 4,096-chip pod over those chips, as Google gives no per-chip
# figure). Hop latency: 1 µs a hop, the figure the ASTRA-sim team validated TPU collectives
# with ("link latency is 1 us, as per TPU research team",
# https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html).
# A float32 product at TPU precision HIGHEST is 6 bfloat16 passes, HIGH 3, DEFAULT 1
# (https://docs.jax.dev/en/latest/_autosummary/jax.lax.Precision.html: bf16_6x, bf16_3x).
TPU_HOP_LATENCY_SECONDS = 1e-6
TPU_F32_PASSES = {'default': 1, 'high': 3, 'highest': 6}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One device's figures: matrix peaks in TFLOP/s by operand dtype (float32 by precision:
  'f32' default, 'f32_high', 'f32_highest'), HBM bandwidth, interconnect bandwidth
  (bidirectional, a chip; None: no collectives priced), the latency of one hop, and where
  the figures come from."""

  name: str
  peak_tflops: dict[str, float]
  hbm_gb_per_s: float
  interconnect_gb_per_s: float | None
  hop_latency_seconds: float
  source: str

  def matmul_seconds(self, flops: float, dtype: str, precision: str) -> float:
    key = dtype if dtype != 'f32' or precision == 'default' else f'f32_{precision}'
    peak = self.peak_tflops.get(key) or self.peak_tflops.get(dtype) or self.peak_tflops['bf16']
    return flops / (peak * 1e12)


def tpu_chip(name: str, bf16_tflops: float, hbm: float, ici: float, source: str) -> Chip:
  peaks = {'bf16': bf16_tflops, 'f32': bf16_tflops}
  peaks |= {f'f32_{p}': bf16_tflops / n for p, n in TPU_F32_PASSES.items() if p != 'default'}
  return Chip(name, peaks, hbm, ici, TPU_HOP_LATENCY_SECONDS, source)


def gpu_chip(
  name: str, bf16: float, tf32: float, fp32: float, hbm: float, nvlink: float, source: str
) -> Chip:
  """NVIDIA parts: dense tensor-core peaks (no sparsity). XLA computes a float32 product at
  DEFAULT precision in TF32 on these parts, at HIGHEST in full float32."""
  peaks = {'bf16': bf16, 'f16': bf16, 'f32': tf32, 'f32_high': tf32, 'f32_highest': fp32}
  return Chip(name, peaks, hbm, nvlink, 0.0, source)


CHIPS = {
  chip.name: chip
  for chip in (
    tpu_chip('v4', 275, 1200, 2 * 1.1e6 / 4096, 'https://cloud.google.com/tpu/docs/v4'),
    tpu_chip('v5e', 197, 819, 400, 'https://cloud.google.com/tpu/docs/v5e'),
    tpu_chip('v5p', 459, 2765, 1200, 'https://cloud.google.com/tpu/docs/v5p'),
    tpu_chip('v6e', 918, 1640, 800, 'https://cloud.google.com/tpu/docs/v6e'),
    gpu_chip(
      'A100-SXM4-80GB', 312, 156, 19.5, 2039, 600, 'https://www.nvidia.com/en-us/data-center/a100/'
    ),
    gpu_chip('H100-SXM', 989, 495, 67, 3350, 900, 'https://www.nvidia.com/en-us/data-center/h100/'),
    gpu_chip('H200-SXM', 989, 495, 67, 4800, 900, 'https://www.nvidia.com/en-us/data-center/h200/'),
  )
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The figures of a GPU JAX names ('NVIDIA H100 80GB HBM3', 'NVIDIA H200'), or None."""
  kind = device_kind.upper()
  for marker, name in (('H200', 'H200-SXM'), ('H100', 'H100-SXM'), ('A100', 'A100-SXM4-80GB')):
    if marker in kind:
      return CHIPS[name]
  return None


# --- Reading the HLO text ----------------------------------------------------------------

_HEADER = re.compile(r'^(?:ENTRY )?%?(?P<name>[\w.\-]+) \(.*\) -> .* \{$')
_ARRAY = re.compile(r'(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\](?:\{(?P<layout>[^}]*)\})?')
_CALLED = re.compile(
  r'\b(?P<key>calls|to_apply|body|condition|true_computation|false_computation)=%?(?P<name>[\w.\-]+)'
)
_BRANCHES = re.compile(r'branch_computations=\{(?P<names>[^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_PRECISION = re.compile(r'operand_precision=\{(?P<first>\w+)')
_REPLICA_GROUPS = re.compile(
  r'replica_groups=(?:\[(?P<groups>\d+),(?P<size>\d+)\]|\{\{(?P<first>[^}]*)\})'
)
_CHAIN = re.compile(r'chain_id="(?P<chain>[^"]+)"')
_DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1,
  'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
  'f32': 4, 's32': 4, 'u32': 4,
  'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16,
}  # fmt: skip
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# What a chip sends and receives for each byte of a collective's result, over the ring(s)
# of its group: an all-reduce is a reduce-scatter and an all-gather.
_COLLECTIVE_TRAFFIC = {'all-reduce': 2.0}
_FREE = {
  'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
  'partition-id', 'replica-id', 'iota', 'opt-barrier', 'add-dependency', 'domain',
}  # fmt: skip
_ELEMENTWISE = {
  'add', 'subtract', 'multiply', 'divide', 'maximum', 'minimum', 'negate', 'abs', 'exponential',
  'exp', 'log', 'tanh', 'rsqrt', 'sqrt', 'power', 'compare', 'select', 'clamp', 'and', 'or',
  'xor', 'not', 'floor', 'ceil', 'round-nearest-even', 'round-nearest-afz', 'sign', 'remainder',
  'logistic', 'cosine', 'sine', 'atan2', 'log-plus-one', 'exponential-minus-one', 'cbrt',
  'shift-left', 'shift-right-logical', 'shift-right-arithmetic', 'is-finite', 'convert',
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  on_chip: bool  # a TPU layout's memory space S(n), n > 0 (VMEM, CMEM, SMEM...), not HBM

  @property
  def size(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> int:
    return _DTYPE_BYTES.get(self.dtype, 4) * self.size


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  result: tuple[Array, ...]
  operands: tuple[str, ...]
  attributes: str
  inside: str = ''  # the text between the parentheses (a parameter's number)

  @property
  def result_size(self) -> int:
    return sum(a.size for a in self.result)


def _arrays(shape: str) -> tuple[Array, ...]:
  return tuple(
    Array(
      m['dtype'],
      tuple(int(d) for d in m['dims'].split(',') if d),
      bool(re.search(r'S\([1-9]\d*\)', m['layout'] or '')),
    )
    for m in _ARRAY.finditer(shape)
    if m['dtype'] in _DTYPE_BYTES
  )


def _balanced(text: str, start: int) -> int:
  """The index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f'Unbalanced parentheses in HLO line: {text[:200]}')


def _instruction(line: str) -> Instruction | None:
  """One instruction line (`%name = shape opcode(operands), attributes`), or None."""
  match = re.match(r'\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = ', line)
  if not match:
    return None
  rest = line[match.end() :]
  shape_end = _balanced(rest, 0) if rest.startswith('(') else rest.index(' ')
  shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
  opcode_match = re.match(r'(?P<opcode>[\w\-]+)\(', rest)
  if not opcode_match:
    return None
  operands_end = _balanced(rest, opcode_match.end() - 1)
  inside = rest[opcode_match.end() : operands_end - 1]
  operands = re.findall(r'%([\w.\-]+)', inside)
  return Instruction(
    match['name'],
    opcode_match['opcode'],
    _arrays(shape),
    tuple(operands),
    rest[operands_end:],
    inside,
  )


@dataclasses.dataclass
class Module:
  """The computations of an HLO module by name, the entry's name, and every value's shape
  (HLO names are unique across a module)."""

  computations: dict[str, list[Instruction]]
  entry: str
  shapes: dict[str, tuple[Array, ...]]
  instructions: dict[str, Instruction]


def parse(hlo_text: str) -> Module:
  computations: dict[str, list[Instruction]] = {}
  shapes: dict[str, tuple[Array, ...]] = {}
  instructions: dict[str, Instruction] = {}
  entry, current = '', None
  for line in hlo_text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = computations.setdefault(header['name'], [])
        entry = header['name'] if line.startswith('ENTRY') else entry
      continue
    if line.startswith('}'):
      current = None
      continue
    instruction = _instruction(line)
    if instruction:
      current.append(instruction)
      shapes[instruction.name] = instruction.result
      instructions[instruction.name] = instruction
  if not entry:
    raise ValueError('No ENTRY computation in the HLO text.')
  return Module(computations, entry, shapes, instructions)


# --- Costs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  bytes: int  # result bytes a device
  group_size: int


@dataclasses.dataclass
class Cost:
  """One device's work on a chip: matrix FLOPs by (dtype, precision), other FLOPs, HBM bytes,
  the operations' roofline seconds, the collectives (each with how many times it runs), the
  costliest operations, and the loops whose trip count the HLO does not give (counted once)."""

  matmul_flops: dict[tuple[str, str], float] = dataclasses.field(
    default_factory=lambda: collections.defaultdict(float)
  )
  other_flops: float = 0.0
  hbm_bytes: float = 0.0
  operation_seconds: float = 0.0
  collectives: list[tuple[Collective, float]] = dataclasses.field(default_factory=list)
  operations: dict[str, float] = dataclasses.field(
    default_factory=lambda: collections.defaultdict(float)
  )
  unknown_trip_counts: int = 0

  @property
  def flops(self) -> float:
    return sum(self.matmul_flops.values()) + self.other_flops

  def add(self, other: 'Cost', times: float = 1.0) -> None:
    for key, flops in other.matmul_flops.items():
      self.matmul_flops[key] += flops * times
    self.other_flops += other.other_flops * times
    self.hbm_bytes += other.hbm_bytes * times
    self.operation_seconds += other.operation_seconds * times
    self.collectives += [(c, n * times) for c, n in other.collectives]
    for name, seconds in other.operations.items():
      self.operations[name] += seconds * times
    self.unknown_trip_counts += other.unknown_trip_counts


def _dot_flops(instruction: Instruction, shapes: dict) -> int:
  lhs = shapes[instruction.operands[0]][0]
  contracting = re.search(r'lhs_contracting_dims=\{(?P<dims>[\d,]*)\}', instruction.attributes)
  dims = [int(d) for d in contracting['dims'].split(',') if d] if contracting else []
  return 2 * instruction.result_size * math.prod(lhs.dims[d] for d in dims)


def _search(pattern: str, text: str) -> re.Match:
  match = re.search(pattern, text)
  if match is None:
    raise ValueError(f'HLO attribute {pattern!r} not found in: {text[:200]}')
  return match


def _window(attributes: str) -> dict[str, list]:
  """An HLO convolution's window: size, stride, padding (low, high), dilations, a spatial
  dimension each."""
  window = re.search(r'window=\{([^}]*)\}', attributes)  # none: no spatial dimension
  fields: dict[str, str] = dict(re.findall(r'(\w+)=(\S+)', window[1])) if window else {}

  def split(key: str, default: str) -> list:
    return [
      tuple(int(v) for v in part.split('_')) if '_' in part else int(part)
      for part in fields.get(key, default).split('x')
    ]

  if 'size' not in fields:
    return {key: [] for key in ('size', 'stride', 'pad', 'lhs_dilate', 'rhs_dilate')}
  rank = len(fields['size'].split('x'))
  ones = 'x'.join(['1'] * rank)
  return {
    'size': split('size', ones),
    'stride': split('stride', ones),
    'pad': split('pad', 'x'.join(['0_0'] * rank)),
    'lhs_dilate': split('lhs_dilate', ones),
    'rhs_dilate': split('rhs_dilate', ones),
  }


def _convolution_flops(instruction: Instruction, shapes: dict) -> int:
  """2 x the multiply-adds on real input pixels (the taps that land on padding are no work),
  as XLA counts them."""
  lhs, kernel = shapes[instruction.operands[0]][0], shapes[instruction.operands[1]][0]
  out = instruction.result[0]
  labels = _search(r'dim_labels=(\w+)_(\w+)->(\w+)', instruction.attributes)
  lhs_labels, kernel_labels, out_labels = labels[1], labels[2], labels[3]
  window = _window(instruction.attributes)
  taps = 1
  for axis in range(len(window['size'])):
    digit = str(axis)
    taps *= valid_taps(
      lhs.dims[lhs_labels.index(digit)],
      out.dims[out_labels.index(digit)],
      kernel.dims[kernel_labels.index(digit)],
      window['stride'][axis],
      window['pad'][axis][0],
      window['lhs_dilate'][axis],
      window['rhs_dilate'][axis],
    )
  batch, features = out.dims[out_labels.index('b')], out.dims[out_labels.index('f')]
  return 2 * batch * features * kernel.dims[kernel_labels.index('i')] * taps


def _matmul_key(instruction: Instruction, shapes: dict) -> tuple[str, str]:
  dtype = shapes[instruction.operands[0]][0].dtype
  precision = _PRECISION.search(instruction.attributes)
  return dtype, (precision['first'].lower() if precision else 'default')


def _group_size(instruction: Instruction, devices: int) -> int:
  groups = _REPLICA_GROUPS.search(instruction.attributes)
  if not groups:
    return devices
  if groups['size']:
    return int(groups['size'])
  return len([d for d in groups['first'].split(',') if d.strip()])


class _Reader:
  """Costs of a parsed module's computations on a chip, each computation read once."""

  def __init__(self, module: Module, devices: int, chip: Chip):
    self.module, self.devices, self.chip = module, devices, chip
    self.shapes = module.shapes
    self._seen_chains: set[tuple[str, str]] = set()
    self._costs: dict[str, Cost] = {}

  def computation(self, name: str) -> Cost:
    """The cost of running computation `name` once, as the program runs it."""
    if name not in self._costs:
      cost = Cost()
      for instruction in self.module.computations[name]:
        cost.add(self._instruction(instruction))
      self._costs[name] = cost
    return self._costs[name]

  def _instruction(self, instruction: Instruction) -> Cost:
    opcode, called = instruction.opcode, _called(instruction)
    if opcode in _FREE or opcode.endswith('-done'):
      return Cost()
    if opcode == 'while':
      return self._loop(instruction, called)
    if opcode == 'conditional':
      names = _branches(instruction) or [called['true_computation'], called['false_computation']]
      return max((self.computation(n) for n in names), key=lambda c: c.operation_seconds)
    if opcode in ('call', 'async-start'):
      return self.computation(called.get('calls') or called['to_apply'])
    cost = Cost()
    if collective := self._collective(instruction):
      cost.collectives.append((collective, 1.0))
      return cost
    if opcode == 'fusion':
      cost.add(self._fused(called['calls']))
    else:
      self._count_flops(instruction, cost)
    cost.hbm_bytes = self._read_bytes(instruction) + self._written_bytes(instruction)
    seconds = operation_seconds(cost.matmul_flops, cost.other_flops, cost.hbm_bytes, self.chip)
    cost.operation_seconds = seconds
    cost.operations[instruction.name] = seconds
    return cost

  def _loop(self, instruction: Instruction, called: dict[str, str]) -> Cost:
    trips = self._trip_count(instruction, called['condition'])
    body = Cost()
    body.add(self.computation(called['body']))
    body.add(self.computation(called['condition']))
    cost = Cost(unknown_trip_counts=0 if trips else 1)
    cost.add(body, trips or 1)
    return cost

  def _trip_count(self, loop: Instruction, condition: str) -> int | None:
    """The compiler's known trip count; else, for a counter compared with a constant
    (`i < n`, counting up by one from a constant), n minus the start; else None."""
    known = _TRIP_COUNT.search(loop.attributes)
    if known:
      return int(known['n'])
    compare = self._comparison(self.module.computations[condition][-1])
    if compare is None:
      return None
    direction, (counter, bound) = compare
    index = re.search(r'index=(\d+)', counter.attributes) if counter else None
    if direction not in ('LT', 'LE') or not (index and counter and bound):
      return None
    if bound.opcode != 'constant' or counter.opcode != 'get-tuple-element':
      return None
    start = self._constant_element(loop.operands[0], int(index[1]))
    if start is None:
      return None
    return int(bound.inside) - start + (direction == 'LE')

  def _comparison(self, root: Instruction) -> tuple[str, list] | None:
    """(direction, [its two operands' instructions]) of a loop condition's compare, also
    where the compiler wrapped it in a fusion (the operands are then the fusion's)."""
    operands = [self.module.instructions.get(o) for o in root.operands]
    if root.opcode == 'fusion':
      inner = self.module.computations[_called(root)['calls']][-1]
      parameters = [self.module.instructions.get(o) for o in inner.operands]
      if inner.opcode != 'compare' or not all(p and p.opcode == 'parameter' for p in parameters):
        return None
      operands = [operands[int(p.inside)] for p in parameters if p]
      root = inner
    direction = re.search(r'direction=(\w+)', root.attributes)
    if root.opcode != 'compare' or not direction:
      return None
    return direction[1], operands

  def _constant_element(self, name: str, index: int) -> int | None:
    """Element `index` of the tuple `name` when it is a constant (through copies)."""
    tuple_ = self.module.instructions.get(name)
    if not tuple_ or tuple_.opcode != 'tuple':
      return None
    value = self.module.instructions.get(tuple_.operands[index])
    while value and value.opcode in ('copy', 'bitcast'):
      value = self.module.instructions.get(value.operands[0])
    return int(value.inside) if value and value.opcode == 'constant' else None

  def _count_flops(self, instruction: Instruction, cost: Cost) -> None:
    opcode = instruction.opcode
    if opcode in ('dot', 'convolution'):
      flops = (_dot_flops if opcode == 'dot' else _convolution_flops)(instruction, self.shapes)
      cost.matmul_flops[_matmul_key(instruction, self.shapes)] += flops
    elif opcode in _ELEMENTWISE:
      cost.other_flops += instruction.result_size
    elif opcode == 'reduce':
      cost.other_flops += sum(a.size for a in self.shapes[instruction.operands[0]])

  def _fused(self, name: str) -> Cost:
    """FLOPs and collectives inside a fused computation (its bytes are its caller's)."""
    cost = Cost()
    for instruction in self.module.computations[name]:
      if instruction.opcode == 'fusion':
        cost.add(self._fused(_called(instruction)['calls']))
      elif collective := self._collective(instruction):
        cost.collectives.append((collective, 1.0))
      else:
        self._count_flops(instruction, cost)
    return cost

  def _collective(self, instruction: Instruction) -> Collective | None:
    kind = instruction.opcode.removesuffix('-start')
    if kind not in COLLECTIVES:
      return None
    chain = _CHAIN.search(instruction.attributes)
    if chain:  # TPU async collective fusion: one collective written into several fusions
      key = (kind, chain['chain'])
      if key in self._seen_chains:
        return None
      self._seen_chains.add(key)
    arrays = instruction.result
    if instruction.opcode.endswith('-start') and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2 :]  # a start's shape holds (operands, results)
    return Collective(kind, sum(a.bytes for a in arrays), _group_size(instruction, self.devices))

  def _read_bytes(self, instruction: Instruction) -> int:
    """HBM bytes the operation reads: each operand once, except what a fusion only slices
    (then the slices) or updates in place (then nothing)."""
    if instruction.opcode == 'fusion':
      callee = self.module.computations[_called(instruction)['calls']]
      parameters = {int(i.inside): i.name for i in callee if i.opcode == 'parameter'}
      return sum(
        _operand_read_bytes(self.shapes[operand], parameters.get(position), callee)
        for position, operand in enumerate(instruction.operands)
      )
    if instruction.opcode == 'dynamic-update-slice':
      return sum(_hbm_bytes(self.shapes[o]) for o in instruction.operands[1:])
    if instruction.opcode in ('dynamic-slice', 'slice', 'gather'):
      return _hbm_bytes(instruction.result)
    if instruction.opcode in ('copy-start', 'slice-start'):  # into or out of on-chip memory
      source = self.shapes[instruction.operands[0]]
      copied = instruction.result[len(source)] if instruction.opcode == 'slice-start' else source[0]
      return copied.bytes
    return sum(_hbm_bytes(self.shapes[o]) for o in instruction.operands if o in self.shapes)

  def _written_bytes(self, instruction: Instruction) -> int:
    if instruction.opcode in ('copy-start', 'slice-start'):
      return 0  # counted as read: the other side is on-chip memory or the same traffic
    root = instruction
    if instruction.opcode == 'fusion':
      root = self.module.computations[_called(instruction)['calls']][-1]
    if root.opcode == 'dynamic-update-slice':
      return _hbm_bytes(self.shapes[root.operands[1]])
    return _hbm_bytes(instruction.result)


def _called(instruction: Instruction) -> dict[str, str]:
  return {m['key']: m['name'] for m in _CALLED.finditer(instruction.attributes)}


def _branches(instruction: Instruction) -> list[str]:
  match = _BRANCHES.search(instruction.attributes)
  return re.findall(r'%?([\w.\-]+)', match['names']) if match else []


def _hbm_bytes(arrays: tuple[Array, ...]) -> int:
  return sum(a.bytes for a in arrays if not a.on_chip)


def _operand_read_bytes(arrays: tuple[Array, ...], parameter: str | None, callee: list) -> int:
  """What a fusion reads of one operand: the slices its users take when they only slice it,
  nothing when it is the buffer updated in place, else all of it."""
  users = [i for i in callee if parameter is not None and parameter in i.operands]
  if users and all(u.opcode in ('dynamic-slice', 'slice', 'gather') for u in users):
    return sum(_hbm_bytes(u.result) for u in users)
  in_place = [u.opcode == 'dynamic-update-slice' and u.operands[0] == parameter for u in users]
  if users and all(in_place):
    return 0
  return _hbm_bytes(arrays)


# --- Time ----------------------------------------------------------------------------------


def operation_seconds(matmul: dict, other_flops: float, hbm_bytes: float, chip: Chip) -> float:
  """An operation's roofline: its FLOPs at the peak for their dtype and precision (other
  FLOPs at the bfloat16 peak: they are bandwidth-bound anyway), or its bytes at HBM
  bandwidth, whichever takes longer."""
  compute = sum(
    chip.matmul_seconds(f, dtype, precision) for (dtype, precision), f in matmul.items()
  )
  compute += other_flops / (chip.peak_tflops['bf16'] * 1e12)
  return max(compute, hbm_bytes / (chip.hbm_gb_per_s * 1e9))


def collective_seconds(collective: Collective, chip: Chip, torus_dims: int) -> float:
  """Latency of the hops it waits for, then the bytes a chip sends and receives at the
  interconnect's bidirectional bandwidth (over a ring of g chips a chip moves (g-1)/g of
  the result, twice for an all-reduce)."""
  if chip.interconnect_gb_per_s is None or collective.group_size <= 1:
    return 0.0
  share = (collective.group_size - 1) / collective.group_size
  traffic = _COLLECTIVE_TRAFFIC.get(collective.kind, 1.0) * share * collective.bytes
  hops = hops_for(collective.kind, collective.group_size, torus_dims)
  return hops * chip.hop_latency_seconds + traffic / (chip.interconnect_gb_per_s * 1e9)


def hops_for(kind: str, group_size: int, torus_dims: int) -> int:
  """Hops a collective over `group_size` chips waits for on a torus of `torus_dims`
  dimensions, its group as square as it goes: one ring a dimension in turn, an all-reduce's
  two phases each."""
  if group_size <= 1:
    return 0
  exponent = max(round(math.log2(group_size)), 1)
  sides = [2 ** (exponent // torus_dims + (i < exponent % torus_dims)) for i in range(torus_dims)]
  return int(_COLLECTIVE_TRAFFIC.get(kind, 1.0)) * sum(side - 1 for side in sides)


@dataclasses.dataclass(frozen=True)
class StepTime:
  """A program's time on a chip: the bound, the estimate and its parts (seconds)."""

  bound_seconds: float
  estimate_seconds: float
  compute_seconds: float
  arguments_seconds: float
  operations_seconds: float
  collective_seconds: float
  collectives: int
  flops: float
  matmul_flops: float
  hbm_bytes: float
  unknown_trip_counts: int
  top_operations: list[tuple[str, float]]


def step_time(
  hlo_text: str, devices: int, chip: Chip, argument_bytes: float, torus_dims: int = 2
) -> StepTime:
  """The bound and the estimate of one run of the program on one of `devices` chips."""
  module = parse(hlo_text)
  cost = _Reader(module, devices, chip).computation(module.entry)
  compute = operation_seconds(cost.matmul_flops, cost.other_flops, 0.0, chip)
  arguments = argument_bytes / (chip.hbm_gb_per_s * 1e9)
  collectives = sum(n * collective_seconds(c, chip, torus_dims) for c, n in cost.collectives)
  return StepTime(
    bound_seconds=max(compute, arguments),
    estimate_seconds=cost.operation_seconds + collectives,
    compute_seconds=compute,
    arguments_seconds=arguments,
    operations_seconds=cost.operation_seconds,
    collective_seconds=collectives,
    collectives=round(sum(n for c, n in cost.collectives if c.group_size > 1)),
    flops=cost.flops,
    matmul_flops=sum(cost.matmul_flops.values()),
    hbm_bytes=cost.hbm_bytes,
    unknown_trip_counts=cost.unknown_trip_counts,
    top_operations=sorted(cost.operations.items(), key=lambda item: -item[1])[:5],
  )


def _median_seconds(fn, *args, runs: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


@functools.cache
def host_chip(devices: int = 1) -> Chip:
  """This machine's CPU as `devices` XLA host devices see it, measured here (no public
  figure describes a VM's share of a CPU): the rate of a 1,024-square matrix product in
  float32 and in bfloat16, and the bandwidth of an elementwise pass over 256 MB written in
  place (a fresh output would time the kernel's page faults), each the median of 5 runs,
  shared evenly by the devices (they run on the same cores)."""
  size = 1024
  rates = {}
  for name, dtype in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    a = jnp.ones((size, size), dtype)
    rates[name] = 2 * size**3 / _median_seconds(jax.jit(jnp.matmul), a, a) / 1e12 / devices
  bandwidth = _in_place_bandwidth(64 * 2**20) / 1e9 / devices
  peaks = {'bf16': rates['bf16'], 'f32': rates['f32'], 'f32_highest': rates['f32']}
  return Chip(f'cpu ({devices} device(s))', peaks, bandwidth, bandwidth, 0.0, 'measured here')


def _in_place_bandwidth(floats: int, runs: int = 5) -> float:
  """Bytes a second read and written by `x + 1` over `floats` float32, its buffer donated
  back each run: the median of `runs`."""
  add_one = jax.jit(lambda v: v + 1, donate_argnums=0)
  x = jax.block_until_ready(add_one(jnp.zeros((floats,), jnp.float32)))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    x = jax.block_until_ready(add_one(x))
    times.append(time.perf_counter() - start)
  return 2 * 4 * floats / sorted(times)[runs // 2]


def compiled_step_time(executable: jax.stages.Compiled, devices: int, chip: Chip) -> StepTime:
  """`step_time` of a program compiled here, its arguments read once."""
  analysis = executable.memory_analysis()
  arguments = analysis.argument_size_in_bytes if analysis else 0
  return step_time(executable.as_text() or '', devices, chip, arguments)


def chip_of(device: jax.Device, devices: int) -> Chip | None:
  """The figures of the chip a local device is: a known GPU, this CPU as measured, or a TPU
  generation by JAX's device kind ('TPU v5 lite' is v5e); None for an unknown part."""
  if device.platform == 'cpu':
    return host_chip(devices)
  if device.platform == 'gpu':
    return chip_for_device_kind(device.device_kind)
  kind = device.device_kind.lower()
  for marker, name in (
    ('v5 lite', 'v5e'),
    ('v5e', 'v5e'),
    ('v5p', 'v5p'),
    ('v6', 'v6e'),
    ('v4', 'v4'),
  ):
    if marker in kind:
      return CHIPS[name]
  return None
