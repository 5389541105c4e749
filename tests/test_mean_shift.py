"""The bank, the nearest-neighbour search and the loss, against direct numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msf_jax import mean_shift
from msf_jax.testing import random_batch, small_config

from helpers import run_steps


def unit_rows(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_init_bank_is_unit_norm_and_unlabelled():
  bank = mean_shift.init_bank(jax.random.key(0), 32, 8)
  np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, rtol=1e-6)
  assert (np.asarray(bank.labels) == -1).all() and int(bank.ptr) == 0


def test_enqueue_writes_at_pointer_and_wraps():
  rng = np.random.default_rng(0)
  bank = mean_shift.init_bank(jax.random.key(0), 12, 4)
  batches = [unit_rows(rng, 4, 4) for _ in range(4)]
  for i, batch in enumerate(batches):
    bank = mean_shift.enqueue(bank, jnp.asarray(batch), jnp.full((4,), i))
  # The fourth batch overwrote rows 0-3; the second and third sit at 4-7 and 8-11.
  np.testing.assert_array_equal(bank.embeddings[:4], batches[3])
  np.testing.assert_array_equal(bank.embeddings[4:8], batches[1])
  np.testing.assert_array_equal(bank.labels, [3] * 4 + [1] * 4 + [2] * 4)
  assert int(bank.ptr) == 4


def test_enqueue_rejects_a_batch_that_does_not_divide_the_bank():
  bank = mean_shift.init_bank(jax.random.key(0), 10, 4)
  with pytest.raises(ValueError, match='multiple of the global batch'):
    mean_shift.enqueue(bank, jnp.zeros((4, 4)), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize('chunk_size', [None, 64, 100, 256, 1024])
def test_nearest_neighbors_matches_numpy(chunk_size):
  rng = np.random.default_rng(1)
  queries, bank = unit_rows(rng, 16, 32), unit_rows(rng, 1024, 32)
  got = np.asarray(
    mean_shift.nearest_neighbors(jnp.asarray(queries), jnp.asarray(bank), 5, chunk_size)
  )
  distances = 2 - 2 * queries @ bank.T
  expected = np.argsort(distances, axis=1, kind='stable')[:, :5]
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('chunk_size', [3, 4, 7, 9])
def test_chunks_that_do_not_divide_the_bank_equal_the_unchunked_search(chunk_size):
  """The last chunk is shifted back over rows already seen; they must not count twice. Chunk 3
  is smaller than k, and rows 2 and 8 tie across chunks: the lower one comes first."""
  rng = np.random.default_rng(7)
  queries, bank = unit_rows(rng, 6, 8), unit_rows(rng, 10, 8)
  bank[8] = bank[2]
  queries[0] = bank[2]
  search = lambda chunk: mean_shift.top_k_similar(jnp.asarray(queries), jnp.asarray(bank), 5, chunk)
  (similarity, index), (expected_similarity, expected_index) = search(chunk_size), search(None)
  np.testing.assert_array_equal(index, expected_index)
  np.testing.assert_allclose(similarity, expected_similarity, rtol=1e-6)
  assert list(np.asarray(index)[0, :2]) == [2, 8]


def test_top_k_similar_with_normalize_rows_ranks_by_cosine():
  rng = np.random.default_rng(8)
  queries, rows = unit_rows(rng, 4, 8), rng.standard_normal((30, 8)).astype(np.float32)
  similarity, index = mean_shift.top_k_similar(
    jnp.asarray(queries), jnp.asarray(rows), 6, 7, normalize_rows=True
  )
  cosine = queries @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
  expected = np.argsort(-cosine, axis=1, kind='stable')[:, :6]
  np.testing.assert_array_equal(index, expected)
  np.testing.assert_allclose(similarity, np.take_along_axis(cosine, expected, 1), atol=1e-6)


@pytest.mark.parametrize('dtype, x64', [('bfloat16', False), ('float32', False), ('float64', True)])
def test_chunked_bank_search_keeps_the_dtype_and_equals_lax_top_k(dtype, x64):
  """The official parity runs in float64 under x64: the chunked search must run there too."""
  rng = np.random.default_rng(9)
  with jax.enable_x64(x64):
    queries = jnp.asarray(unit_rows(rng, 8, 16), dtype)
    bank = jnp.asarray(unit_rows(rng, 50, 16), dtype)
    similarity, index = mean_shift.top_k_similar(queries, bank, 4, 16)
    assert similarity.dtype == dtype and index.dtype == jnp.int32
    expected = jax.lax.top_k(queries @ bank.T, 4)
    np.testing.assert_array_equal(index, expected[1])
    # A chunk's product may round its last bit differently from the whole product's.
    np.testing.assert_allclose(
      np.asarray(similarity, np.float64),
      np.asarray(expected[0], np.float64),
      rtol=4 * float(jnp.finfo(dtype).eps),
    )


@pytest.mark.parametrize('chunk_size', [None, 300, 16])
def test_bfloat16_search_rescored_in_float32_equals_the_float32_search(chunk_size):
  """Chunks of 300 do not divide the 1,000 rows; chunks of 16 hold fewer rows than the 20
  candidates. Row 900 duplicates row 2: the tie goes to the lower row, as in float32."""
  rng = np.random.default_rng(10)
  queries, bank = unit_rows(rng, 16, 32), unit_rows(rng, 1000, 32)
  bank[900] = bank[2]
  queries[0] = bank[2]
  search = lambda *option: np.asarray(
    mean_shift.nearest_neighbors(jnp.asarray(queries), jnp.asarray(bank), 5, chunk_size, *option)
  )
  np.testing.assert_array_equal(search('bfloat16', 20), search('float32'))
  assert list(search('bfloat16', 20)[0, :2]) == [2, 900]


def test_a_bfloat16_search_needs_its_candidates():
  rows = jnp.asarray(unit_rows(np.random.default_rng(12), 8, 4))
  with pytest.raises(ValueError, match='needs `candidates`'):
    mean_shift.nearest_neighbors(rows[:2], rows, 3, search_dtype='bfloat16')


@pytest.mark.parametrize('chunk_size', [None, 3])
def test_rescoring_orders_rows_that_bfloat16_cannot_tell_apart(chunk_size):
  """Rows at angles of 0.035 down to 0.005 from the query: every bfloat16 similarity rounds
  to 1.0, so bfloat16 alone keeps the lower rows; float32 sees the nearest rows last."""
  angles = 0.005 * np.arange(7, 0, -1)
  near = np.zeros((7, 16), np.float32)
  near[:, 0], near[:, 1] = np.cos(angles), np.sin(angles)
  far = unit_rows(np.random.default_rng(11), 25, 16)
  far[:, 0] = -np.abs(far[:, 0])  # similarity <= 0
  bank = jnp.asarray(np.concatenate([near, far]))
  query = jnp.asarray(np.eye(16, dtype=np.float32)[:1])
  bf16_alone = mean_shift.top_k_similar(query, bank, 3, chunk_size, dtype=jnp.bfloat16)
  assert list(np.asarray(bf16_alone[1])[0]) == [0, 1, 2]
  similarity, index = mean_shift.top_k_similar_rescored(query, bank, 3, 7, chunk_size)
  np.testing.assert_array_equal(index, [[6, 5, 4]])
  np.testing.assert_array_equal(index, mean_shift.nearest_neighbors(query, bank, 3, chunk_size))
  np.testing.assert_allclose(similarity, [np.cos(angles[[6, 5, 4]])], rtol=1e-7)


@pytest.mark.slow  # two ResNet-18 train steps to compile: about 30 s on two CPU cores
def test_train_step_with_the_bfloat16_search_equals_the_float32_step():
  config = small_config(image_size=32, small_stem=True, batch_size=8, bank_size=32)
  batch = random_batch(np.random.default_rng(12), config)
  exact_state, [exact] = run_steps(config, jax.devices()[:1], [batch])
  config.msf.bank_search_dtype, config.msf.bank_search_candidates = 'bfloat16', 16
  state, [metrics] = run_steps(config, jax.devices()[:1], [batch])
  assert metrics['loss'] == pytest.approx(exact['loss'], abs=1e-6)
  assert (metrics['purity'], metrics['purity_others']) == (exact['purity'], exact['purity_others'])
  # The same neighbours pull the online network the same way, to the bit.
  jax.tree.map(np.testing.assert_array_equal, state.online, exact_state.online)


def test_top1_after_enqueue_is_the_query_itself_and_k1_is_byol_loss():
  """Enqueue-before-search: with k = 1 MSF is BYOL's asymmetric loss 2 - 2 <v, u>."""
  rng = np.random.default_rng(2)
  bank = mean_shift.init_bank(jax.random.key(1), 64, 16)
  bank = bank._replace(ptr=jnp.asarray(32, jnp.int32))
  targets, predictions = unit_rows(rng, 16, 16), unit_rows(rng, 16, 16)
  bank = mean_shift.enqueue(bank, jnp.asarray(targets), jnp.arange(16))
  idx = mean_shift.nearest_neighbors(jnp.asarray(targets), bank.embeddings, 1)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], np.arange(32, 48))
  loss = mean_shift.mean_shift_loss(jnp.asarray(predictions), bank.embeddings[idx])
  byol = np.mean(2 - 2 * np.sum(predictions * targets, axis=1))
  np.testing.assert_allclose(float(loss), byol, rtol=1e-6)


def test_loss_and_purity_match_the_official_formulation():
  """Against the official two-matrix computation: d_q gathered at the top-k of d_t."""
  rng = np.random.default_rng(3)
  targets, predictions, bank = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16), unit_rows(rng, 40, 16)
  bank_labels, labels = rng.integers(0, 3, 40), rng.integers(0, 3, 8)
  d_t, d_q = 2 - 2 * targets @ bank.T, 2 - 2 * predictions @ bank.T
  nn_index = np.argsort(d_t, axis=1, kind='stable')[:, :5]
  expected_loss = np.take_along_axis(d_q, nn_index, 1).mean()
  expected_purity = (bank_labels[nn_index] == labels[:, None]).mean()

  idx = mean_shift.nearest_neighbors(jnp.asarray(targets), jnp.asarray(bank), 5)
  loss = mean_shift.mean_shift_loss(jnp.asarray(predictions), jnp.asarray(bank)[idx])
  purity = mean_shift.purity(jnp.asarray(labels), jnp.asarray(bank_labels)[idx])
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-6)
  np.testing.assert_allclose(float(purity), expected_purity, rtol=1e-6)


def test_loss_gradient_reaches_only_the_predictions():
  rng = np.random.default_rng(4)
  predictions, neighbors = unit_rows(rng, 4, 8), unit_rows(rng, 12, 8).reshape(4, 3, 8)
  grad = jax.grad(mean_shift.mean_shift_loss)(jnp.asarray(predictions), jnp.asarray(neighbors))
  np.testing.assert_allclose(grad, -2 * neighbors.mean(axis=1) / 4, rtol=1e-5, atol=1e-7)


def test_drop_own_rows_keeps_the_other_neighbours_in_order():
  neighbor_idx = jnp.asarray([[7, 3, 9], [4, 8, 5], [1, 2, 6]])
  own_rows = jnp.asarray([7, 8, 0])  # first, middle, absent (a tie pushed it out)
  np.testing.assert_array_equal(
    mean_shift.drop_own_rows(neighbor_idx, own_rows), [[3, 9], [4, 5], [1, 2]]
  )


def test_purity_of_the_others_excludes_the_query_itself():
  """After the enqueue the official purity counts each query's own row: 1.0 at k = 1 and
  at least 1/k at any k. Without it, purity measures the neighbours the loss pulls toward."""
  rng = np.random.default_rng(5)
  bank = mean_shift.init_bank(jax.random.key(2), 32, 8)
  bank = mean_shift.enqueue(bank, jnp.asarray(unit_rows(rng, 16, 8)), jnp.arange(16) % 4)
  targets = jnp.asarray(unit_rows(rng, 8, 8))
  labels = jnp.arange(8) % 4
  own_rows = 16 + jnp.arange(8)
  bank = mean_shift.enqueue(bank, targets, labels)
  found = mean_shift.nearest_neighbors(targets, bank.embeddings, 3)
  np.testing.assert_array_equal(found[:, 0], own_rows)
  assert float(mean_shift.purity(labels, bank.labels[found[:, :1]])) == 1.0
  others = np.asarray(mean_shift.drop_own_rows(found, own_rows))
  stored = np.asarray(bank.labels)
  expected = np.mean(stored[np.asarray(found)[:, 1:]] == np.asarray(labels)[:, None])
  assert float(mean_shift.purity(labels, bank.labels[others])) == pytest.approx(expected)


@pytest.mark.parametrize('step, expected', [(0, 1), (9, 1), (10, 2), (29, 3), (40, 5), (1000, 5)])
def test_ramped_topk_grows_by_epoch_from_one_to_k(step, expected):
  # k = 5 over 4 epochs of 10 steps: epochs 0, 1, 2, 3, 4+ use k = 1, 2, 3, 4, 5.
  assert int(mean_shift.ramped_topk(jnp.asarray(step), 5, 4, 10)) == expected


def test_loss_and_purity_with_inactive_neighbours_count_only_the_nearest():
  rng = np.random.default_rng(6)
  predictions, neighbors = unit_rows(rng, 4, 8), unit_rows(rng, 20, 8).reshape(4, 5, 8)
  active = mean_shift.active_neighbors(jnp.asarray(2), 5)
  np.testing.assert_array_equal(active, [True, True, False, False, False])
  masked = mean_shift.mean_shift_loss(jnp.asarray(predictions), jnp.asarray(neighbors), active)
  nearest_two = mean_shift.mean_shift_loss(jnp.asarray(predictions), jnp.asarray(neighbors[:, :2]))
  np.testing.assert_allclose(float(masked), float(nearest_two), rtol=1e-6)
  labels, neighbor_labels = jnp.asarray([0, 1, 2, 3]), jnp.asarray(rng.integers(0, 4, (4, 5)))
  np.testing.assert_allclose(
    float(mean_shift.purity(labels, neighbor_labels, active)),
    float(mean_shift.purity(labels, neighbor_labels[:, :2])),
    rtol=1e-6,
  )
