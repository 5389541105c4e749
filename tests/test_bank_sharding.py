"""The memory bank split by rows over 8 CPU devices: the same bank, neighbours, loss, purity
and parameters as the replicated bank, and no bank-sized collective in the compiled step."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msf_jax import make_mesh, make_train_step, mean_shift
from msf_jax.sharding import DATA_AXIS, resolve_bank_layout
from msf_jax.testing import random_batch, small_config
from msf_jax.train import bank_step_fn, make_train_step_fn
from msf_jax.train_state import abstract_state, bank_layout, state_shardings

from helpers import STEPS_PER_EPOCH, assert_trees_close, run_steps

# 8 devices hold 6 rows each; batches of 16 straddle shard boundaries (rows 0-15 end inside
# shard 2, 16-31 inside shard 5) and the pointer wraps after three steps.
BANK, BATCH, DEVICES = 48, 16, 8


def tiny_config(layout: str, topk: int = 5, param_dtype: str = 'float32'):
  """ResNet-18 of width 8 at 8 px (the small stem): a full step that compiles fast."""
  config = small_config(
    image_size=8,
    small_stem=True,
    batch_size=BATCH,
    bank_size=BANK,
    topk=topk,
    param_dtype=param_dtype,
  )
  config.model.width = 8
  config.msf.bank_layout = layout
  return config


def test_auto_layout_shards_when_the_rows_divide_among_several_devices():
  assert resolve_bank_layout('auto', 48, 8) == 'sharded'
  assert resolve_bank_layout('auto', 48, 1) == 'replicated'
  assert resolve_bank_layout('auto', 50, 8) == 'replicated'
  assert resolve_bank_layout('replicated', 48, 8) == 'replicated'
  with pytest.raises(ValueError, match='does not divide among 8 devices'):
    resolve_bank_layout('sharded', 50, 8)
  with pytest.raises(ValueError, match='not one of replicated, sharded, auto'):
    resolve_bank_layout('striped', 48, 8)
  mesh = make_mesh(jax.devices()[:DEVICES])
  assert bank_layout(tiny_config('auto'), DEVICES) == 'sharded'
  shardings = state_shardings(tiny_config('auto'), mesh)
  assert shardings.bank.embeddings.spec == P(DATA_AXIS, None)
  assert shardings.bank.labels.spec == P(DATA_AXIS) and shardings.bank.ptr.spec == P()
  assert shardings.online['params']['backbone']['conv1']['kernel'].spec == P()


def run_bank_steps(config, mesh, bank, batches):
  """`bank_step_fn` jitted as the train step places it, over a few (targets, labels)."""
  step = jax.jit(bank_step_fn(config, mesh))
  bank = jax.device_put(bank, state_shardings(config, mesh).bank)
  outputs = []
  for targets, labels in batches:
    bank, *found = step(bank, targets, labels)
    outputs.append(jax.device_get((bank, *found)))
  return outputs


@pytest.mark.parametrize(
  'topk, chunk_size, search_dtype',
  [(1, 0, 'float32'), (5, 0, 'float32'), (5, 4, 'float32'), (5, 0, 'bfloat16'), (3, 4, 'bfloat16')],
)
def test_sharded_bank_steps_equal_the_replicated_ones(topk, chunk_size, search_dtype):
  """Four enqueues and searches (the pointer wraps, batches straddle shards), bit for bit."""
  rng = np.random.default_rng(topk + chunk_size)
  bank = mean_shift.init_bank(jax.random.key(0), BANK, 16)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  batches = [
    (
      unit(rng.standard_normal((BATCH, 16))).astype(np.float32),
      rng.integers(0, 4, BATCH).astype(np.int32),
    )
    for _ in range(4)
  ]
  mesh = make_mesh(jax.devices()[:DEVICES])
  results = {}
  for layout in ('replicated', 'sharded'):
    config = tiny_config(layout, topk)
    config.msf.bank_chunk_size, config.msf.bank_search_dtype = chunk_size, search_dtype
    config.msf.bank_search_candidates = 12
    results[layout] = run_bank_steps(config, mesh, bank, batches)
  for replicated, sharded in zip(results['replicated'], results['sharded'], strict=True):
    for r, s in zip(jax.tree.leaves(replicated), jax.tree.leaves(sharded), strict=True):
      np.testing.assert_array_equal(s, r)
  last_bank = results['sharded'][-1][0]
  assert int(last_bank.ptr) == 4 * BATCH % BANK  # wrapped
  np.testing.assert_array_equal(last_bank.embeddings[:BATCH], batches[3][0])  # over the start
  np.testing.assert_array_equal(last_bank.labels[BATCH : 2 * BATCH], batches[1][1])


def tie_problem():
  """Rows and queries of dyadic entries, so that every inner product is exact whatever the
  summation order: row 40 (shard 6), row 13 (shard 2) and row 3 (shard 0) are equal and
  nearest to query 0; rows 9 and 10 (one shard) tie for query 1."""
  rows = np.zeros((BANK, 8), np.float32)
  rows[np.arange(BANK), np.arange(BANK) % 8] = 0.5
  best = np.array([1.0, 0.5, 0, 0, 0, 0, 0, 0], np.float32)
  rows[[40, 13, 3]] = best
  rows[[9, 10]] = np.array([0, 0, 0, 0, 0, 0, 1.0, 0.5], np.float32)
  queries = np.stack([best, rows[9]] + [np.roll(best, i) for i in range(2, 8)])
  return queries, rows


@pytest.mark.parametrize('chunk_size', [0, 4])
def test_a_planted_tie_picks_the_same_rows_in_both_layouts(chunk_size):
  queries, rows = tie_problem()
  mesh = make_mesh(jax.devices()[:DEVICES])
  replicated = jax.jit(lambda q, r: mean_shift.top_k_similar(q, r, 3, chunk_size))
  sharded = jax.jit(
    jax.shard_map(
      lambda q, r: mean_shift.top_k_similar(q, r, 3, chunk_size, axis_name=DATA_AXIS),
      mesh=mesh,
      in_specs=(P(), P(DATA_AXIS, None)),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )
  expected = replicated(queries, rows)
  found = sharded(
    queries, jax.device_put(rows, jax.sharding.NamedSharding(mesh, P(DATA_AXIS, None)))
  )
  np.testing.assert_array_equal(found[1], expected[1])
  np.testing.assert_array_equal(found[0], expected[0])
  np.testing.assert_array_equal(found[1][0], [3, 13, 40])  # the lowest rows first
  np.testing.assert_array_equal(found[1][1][:2], [9, 10])


@pytest.mark.slow
@pytest.mark.parametrize('topk, also_one_device', [(1, False), (5, True)])
def test_three_float64_steps_with_a_sharded_bank_equal_the_replicated_bank(topk, also_one_device):
  """On 8 devices, and (once: the comparison does not depend on k) the replicated bank's 8
  devices against one device, tensor by tensor: float64 keeps other reduction orders far
  below the tolerance (float32 at 8 against 1 device: test_train_step.py)."""
  with jax.enable_x64(True):
    devices = jax.devices()[:DEVICES]
    rng = np.random.default_rng(topk)
    config = tiny_config('replicated', topk, 'float64')
    batches = [random_batch(rng, config, dtype=np.float64) for _ in range(3)]
    replicated, replicated_metrics = run_steps(config, devices, batches)
    sharded, sharded_metrics = run_steps(tiny_config('sharded', topk, 'float64'), devices, batches)
    if also_one_device:
      one_device, _ = run_steps(config, devices[:1], batches)
      assert_trees_close(replicated, one_device, rtol=1e-9)
  assert int(sharded.bank.ptr) == 3 * BATCH % BANK == 0  # wrapped to the start
  np.testing.assert_array_equal(sharded.bank.labels, replicated.bank.labels)
  np.testing.assert_array_equal(sharded.bank.embeddings, replicated.bank.embeddings)
  assert_trees_close(sharded, replicated, rtol=1e-12)  # every parameter and buffer
  for s, r in zip(sharded_metrics, replicated_metrics, strict=True):
    assert float(s['loss']) == pytest.approx(float(r['loss']), rel=1e-12, abs=0)
    assert float(s['purity']) == float(r['purity'])
    assert float(s['purity_others']) == float(r['purity_others'])


COLLECTIVE = re.compile(
  r'= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|'
  r'reduce-scatter)(-start)?\((.*?)\)'
)
SHAPE = re.compile(r'\b[a-z]+\d*\[([\d,]*)\]')


def collective_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(op, shape) of every result and operand shape of the collectives in optimized HLO."""
  shapes = []
  for match in COLLECTIVE.finditer(hlo):
    for text in (match.group(1), match.group(4)):
      shapes += [
        (match.group(2), tuple(int(d) for d in dims.split(',') if d))
        for dims in SHAPE.findall(text)
      ]
  return shapes


def bank_sized(hlo: str, rows: int) -> list[tuple[str, tuple[int, ...]]]:
  """The collectives that move an array with `rows` or more rows."""
  return [(op, shape) for op, shape in collective_shapes(hlo) if shape and max(shape) >= rows]


def compiled_text(step, config, mesh) -> str:
  state = abstract_state(config, state_shardings(config, mesh))
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, P(DATA_AXIS))
    ),
    random_batch(np.random.default_rng(0), config),
  )
  return step.lower(state, batch).compile().as_text()


@pytest.mark.slow
def test_the_compiled_sharded_step_holds_no_bank_sized_collective():
  # 8,000 rows: more than any dimension of the model (the predictor's hidden layer: 4,096).
  config = tiny_config('sharded')
  config.msf.bank_size = 8000
  mesh = make_mesh(jax.devices()[:DEVICES])
  hlo = compiled_text(
    make_train_step(config, mesh, STEPS_PER_EPOCH, finish_views=False), config, mesh
  )
  assert collective_shapes(hlo), 'the step has collectives (batch statistics, gradients)'
  assert bank_sized(hlo, 8000) == []
  # The check sees a bank-sized collective where there is one: the same step with the bank
  # sharded by jit alone (no shard_map) makes XLA gather the bank.
  naive = jax.jit(
    make_train_step_fn(config, STEPS_PER_EPOCH, finish_views=False),
    in_shardings=(state_shardings(config, mesh), jax.sharding.NamedSharding(mesh, P(DATA_AXIS))),
  )
  assert bank_sized(compiled_text(naive, config, mesh), 8000)
