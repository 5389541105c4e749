"""The pictures of msf_jax.visualize: grid layouts and their frames, images found again in the
order of the extracted features, the t-SNE, the views of the training stream, and the files
the command line writes. A narrow ResNet-18 with weights filled in numpy (no init compile)
keeps the feature passes to seconds on the CPU."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from msf_jax import load_config, make_mesh, visualize as vis
from msf_jax.data import color, pipeline, sources
from msf_jax.evaluate.features import extract_features
from msf_jax.interop.backbones import random_encoder
from msf_jax.models import build_networks

from helpers import REPO

EVAL_CONFIG = os.path.join(REPO, 'configs', 'eval.py')
NUM_EXAMPLES = 24
BATCH = 8  # a multiple of the 8 test devices: three batches of the 24 digits


@pytest.fixture(scope='module')
def config():
  config = load_config(EVAL_CONFIG, 'digits')
  config.model.width = 8
  return config


@pytest.fixture(scope='module')
def mesh():
  return make_mesh()


@pytest.fixture(scope='module')
def split(config):
  return sources.take(sources.digits('test', config.image_size), NUM_EXAMPLES)


@pytest.fixture(scope='module')
def variables(config):
  """A He-initialized encoder of the right structure, drawn in numpy."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'kernel' in name:
      fan_in = np.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)
    return (np.ones if 'scale' in name or 'var' in name else np.zeros)(leaf.shape, leaf.dtype)

  template = jax.eval_shape(lambda: random_encoder(config.model, config.image_size, 0))
  return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope='module')
def features(variables, split, config, mesh):
  return extract_features(variables, split, config, mesh, BATCH)


def uniform_images(shape, values):
  """uint8 images of `shape` [..., H, W, 3], each one grey level of `values`."""
  return np.broadcast_to(
    np.asarray(values, np.uint8).reshape(np.shape(values) + (1, 1, 1)), shape
  ).copy()


def test_denormalize_undoes_the_pipeline_normalization():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
  normalized = np.asarray(color.normalize(pixels.astype(np.float32) / 255.0))
  np.testing.assert_array_equal(vis.denormalize(normalized), pixels)


def test_retrieval_grid_frames_queries_blue_and_wrong_neighbours_red():
  size, zoom, border, gap = 5, 2, 2, 4
  queries = uniform_images((2, size, size, 3), [10, 20])
  neighbours = uniform_images((2, 3, size, size, 3), [[30, 40, 50], [60, 70, 80]])
  query_labels, neighbour_labels = np.array([1, 2]), np.array([[1, 0, 1], [2, 2, 7]])
  grid = vis.retrieval_grid(
    queries, query_labels, neighbours, neighbour_labels, zoom=zoom, border=border, gap=gap
  )
  tile = size * zoom + 2 * border
  assert grid.shape == (gap + 2 * (tile + gap), gap + 4 * (tile + gap), 3)
  assert grid.dtype == np.uint8

  def corner_and_centre(row, column):
    top, left = gap + row * (tile + gap), gap + column * (tile + gap)
    return tuple(grid[top, left]), int(grid[top + tile // 2, left + tile // 2, 0])

  for row in range(2):
    assert corner_and_centre(row, 0) == (vis.QUERY_COLOR, queries[row, 0, 0, 0])
    for k in range(3):
      wrong = neighbour_labels[row, k] != query_labels[row]
      expected = vis.WRONG_CLASS_COLOR if wrong else vis.SAME_CLASS_COLOR
      assert corner_and_centre(row, k + 1) == (expected, neighbours[row, k, 0, 0, 0])
  assert tuple(grid[0, 0]) == vis.BACKGROUND
  # Exactly the two wrong neighbours carry red frames.
  red = np.all(grid == vis.WRONG_CLASS_COLOR, axis=-1).sum()
  assert red == 2 * (tile**2 - (size * zoom) ** 2)


def test_grids_refuse_mismatched_or_float_images():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match='uint8'):
    vis.views_grid(images.astype(np.float32), images)
  with pytest.raises(ValueError, match='differ in shape'):
    vis.views_grid(images, images[:1])
  with pytest.raises(ValueError, match='do not match'):
    vis.retrieval_grid(images, np.zeros(2), np.zeros((3, 1, 4, 4, 3), np.uint8), np.zeros((3, 1)))


def test_views_grid_puts_target_views_over_online_views():
  target = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  online = 255 - target
  grid = vis.views_grid(target, online, zoom=2, gap=1)
  assert grid.shape == (1 + 2 * 17, 1 + 3 * 17, 3)
  np.testing.assert_array_equal(grid[1:17, 18:34], np.kron(target[1], np.ones((2, 2, 1))))
  np.testing.assert_array_equal(grid[18:34, 18:34], np.kron(online[1], np.ones((2, 2, 1))))
  titled = vis.views_grid(target, online, zoom=2, gap=1, row_titles=('target', 'online'))
  margin = titled.shape[1] - grid.shape[1]
  assert titled.shape[0] == grid.shape[0] and margin > 0
  np.testing.assert_array_equal(titled[:, margin:], grid)
  assert (titled[:, :margin] < 128).any()  # the titles are drawn in black


def test_spread_queries_takes_the_classes_in_turn():
  labels = np.array([0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(vis.spread_queries(labels, 4), [0, 3, 5, 1])
  np.testing.assert_array_equal(vis.spread_queries(labels, 10), [0, 3, 5, 1, 4, 2])


@pytest.mark.slow  # t-SNE
def test_tsne_separates_clusters_and_plots_one_colour_a_class():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((3, 16)) * 10
  labels = np.repeat(np.arange(3), 10)
  features = centres[labels] + rng.standard_normal((30, 16)) * 0.1
  embedding = vis.tsne_embedding(features, seed=0)
  assert embedding.shape == (30, 2) and np.all(np.isfinite(embedding))
  # Every point lies nearer to its own class's centroid than to any other.
  centroids = np.stack([embedding[labels == c].mean(0) for c in range(3)])
  nearest = np.argmin(np.linalg.norm(embedding[:, None] - centroids[None], axis=-1), axis=1)
  np.testing.assert_array_equal(nearest, labels)

  plot = vis.tsne_plot(embedding, labels, title='three classes', size_inches=3, dpi=100)
  assert plot.shape == (300, 300, 3) and plot.dtype == np.uint8
  tab10 = np.round(
    np.asarray([vis.matplotlib.colormaps['tab10'](i)[:3] for i in range(4)]) * 255
  ).astype(np.uint8)
  present = [np.all(plot == colour, axis=-1).any() for colour in tab10]
  assert present == [True, True, True, False]
  with pytest.raises(ValueError, match='N >= 4'):
    vis.tsne_embedding(features[:3])


def test_centre_crop_images_follow_the_order_of_extracted_features(
  variables, split, config, mesh, features
):
  positions = np.array([23, 0, 9, 9, 17])
  images, labels = vis.centre_crop_images(split, positions, config.image_size, mesh, BATCH)
  assert images.shape == (5, config.image_size, config.image_size, 3)
  assert images.dtype == np.uint8
  np.testing.assert_array_equal(labels, features[1][positions])
  # The images' own features (from the 8-bit pixels) are nearest those at their positions.
  encoder, _ = build_networks(config.model)
  own = np.asarray(
    encoder.apply(variables, np.asarray(color.normalize(images / 255.0)), method=encoder.features)
  )
  distances = np.linalg.norm(own[:, None] - features[0][None], axis=-1)
  np.testing.assert_array_equal(np.argmin(distances, axis=1), positions)
  with pytest.raises(ValueError, match='positions up to 24'):
    vis.centre_crop_images(split, [24], config.image_size, mesh, BATCH)


def test_centre_crop_images_interleave_the_processes_shares(split, config, mesh, monkeypatch):
  """With two processes each batch of extract_features holds process 0's share of the batch,
  then process 1's; the digits give process p every second example from p."""
  labels = np.concatenate(
    [
      b['label']
      for b in pipeline.eval_batches(
        split, global_batch=NUM_EXAMPLES, image_size=config.image_size
      )[0].as_numpy_iterator()
    ]
  )
  monkeypatch.setattr(vis.jax, 'process_count', lambda: 2)
  order = [p + 2 * (4 * b + j) for b in range(3) for p in range(2) for j in range(4)]
  _, found = vis.centre_crop_images(split, np.arange(NUM_EXAMPLES), config.image_size, mesh, BATCH)
  np.testing.assert_array_equal(found, labels[order])


def test_retrieval_grid_from_features_finds_each_query_first(split, config, mesh, features):
  # The split is its own gallery: each query's nearest neighbour is itself.
  grid = vis.retrieval_grid_from_features(
    split, features, split, features, config.image_size, mesh, num_queries=3, k=2, batch_size=BATCH
  )
  zoom = -(-vis.MIN_TILE // config.image_size)
  tile = config.image_size * zoom + 2 * vis.BORDER
  stride = tile + vis.GAP
  assert grid.shape == (vis.GAP + 3 * stride, vis.GAP + 3 * stride, 3)
  for row in range(3):
    top = vis.GAP + row * stride
    query = grid[top : top + tile, vis.GAP : vis.GAP + tile]
    first = grid[top : top + tile, vis.GAP + stride : vis.GAP + stride + tile]
    inner = slice(vis.BORDER, -vis.BORDER)
    np.testing.assert_array_equal(first[inner, inner], query[inner, inner])
    assert tuple(first[0, 0]) == vis.SAME_CLASS_COLOR


@pytest.mark.slow  # the views grid and the digits' training stream
def test_views_grid_from_config_shows_the_first_views_of_training(config, mesh):
  train = sources.take(sources.digits('train', config.image_size), 32)
  grid = vis.views_grid_from_config(config, mesh, train, count=3)
  # The same images and augmentations as the first batch of a stream of another batch size.
  stream = pipeline.train_stream(
    train,
    global_batch=16,
    image_size=config.image_size,
    seed=config.seed,
    pairing=config.data.pairing,
    crop_scale=tuple(config.data.crop_scale),
    random_flip=config.data.flip,
    crops=config.data.crops,
  )
  first = color.finish_views(pipeline.to_global(next(stream), mesh), config.data.pairing)
  expected = vis.views_grid(
    *(vis.denormalize(first[key][:3]) for key in ('target', 'online')),
    row_titles=('target (weak)', 'online (strong)'),
  )
  np.testing.assert_array_equal(grid, expected)
  zoom = -(-vis.MIN_TILE // config.image_size)
  side = config.image_size * zoom
  assert grid.shape[0] == vis.GAP + 2 * (side + vis.GAP)
  margin = grid.shape[1] - (vis.GAP + 3 * (side + vis.GAP))
  assert margin > 0
  rows = [
    grid[vis.GAP + r * (side + vis.GAP) :][:side, margin + vis.GAP :][:, :side] for r in range(2)
  ]
  assert rows[0].std() > 0 and not np.array_equal(rows[0], rows[1])


def image_tags(workdir):
  """Tags of the image summaries in the events files of `workdir`."""
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(
        value.tag
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == 'images'
      )
  return tags


def test_write_pictures_writes_pngs_and_tensorboard_images(tmp_path):
  pictures = {
    'a': np.full((4, 6, 3), 200, np.uint8),
    'b': np.random.default_rng(0).integers(0, 256, (5, 3, 3)).astype(np.uint8),
  }
  paths = vis.write_pictures(pictures, str(tmp_path), step=7)
  for name, picture in pictures.items():
    np.testing.assert_array_equal(np.asarray(Image.open(paths[name])), picture)
  assert image_tags(tmp_path) == {'a', 'b'}


@pytest.mark.slow
def test_command_line_writes_the_pictures(tmp_path):
  command = [
    sys.executable,
    '-m',
    'msf_jax.visualize',
    f'--config={EVAL_CONFIG}:digits',
    '--config.checkpoint_format=random',
    '--config.model.width=8',
    f'--config.data.max_examples={NUM_EXAMPLES}',
    f'--config.batch_size={BATCH}',
    '--queries=3',
    '--neighbours=4',
    '--views=4',
    f'--workdir={tmp_path}',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  stride = 24 * 3 + 2 * vis.BORDER + vis.GAP  # 24-pixel digits, enlarged 3 times
  shapes = {
    name: np.asarray(Image.open(tmp_path / f'{name}.png')).shape
    for name in ('retrieval', 'tsne', 'views')
  }
  assert shapes['retrieval'] == (vis.GAP + 3 * stride, vis.GAP + 5 * stride, 3)
  assert shapes['tsne'] == (600, 600, 3)
  assert image_tags(tmp_path) == {'retrieval', 'tsne', 'views'}
