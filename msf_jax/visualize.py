"""Pictures of what an encoder learned, for judging a checkpoint by eye:

  python -m msf_jax.visualize --config=configs/eval.py:digits --config.checkpoint=WORKDIR \
      --workdir=OUT [--queries=8 --neighbours=8 --views=8 --tsne_points=2000]

  retrieval  test images (left, blue frame) and their nearest training images by cosine
             similarity of the backbone features, framed green when of the query's class and
             red when not
  tsne       a t-SNE map of the test features, one colour per class
  views      the training views of a few images, the target view over the online one (weak
             over strong in the paper's pairing), as the training step receives them

Each is written to OUT as a PNG file and as a TensorBoard image (CLU), at the checkpoint's
step. Features come from the centre crops of config.data.train_split and test_split, cut to
their first --config.data.max_examples when set (do set it for ImageNet: the retrieval
gallery is the whole train split otherwise), and are cached in OUT/features as the
evaluation program caches them, so that evaluating and drawing in one OUT computes them
once. The grids and the t-SNE plot are pure functions of arrays, for the training loop and
notebooks to reuse.
"""

import io
import os
from typing import Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import app, flags, logging
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags
from PIL import Image, ImageDraw, ImageFont
from sklearn.manifold import TSNE

from msf_jax import console, distributed
from msf_jax.data import color, pipeline, sources
from msf_jax.evaluate.features import cached_features, write_atomically
from msf_jax.evaluate.knn import nearest_neighbours
from msf_jax.evaluate.run import CACHE_DIR
from msf_jax.interop import backbones
from msf_jax.sharding import make_mesh

BACKGROUND = (255, 255, 255)
QUERY_COLOR = (30, 90, 200)
SAME_CLASS_COLOR = (40, 160, 60)
WRONG_CLASS_COLOR = (220, 30, 30)
MIN_TILE = 64  # small images (digits: 24 px) are enlarged to at least this many pixels
GAP = 4
BORDER = 3
TITLE_SIZE = 14
VIEW_KINDS = {'w': 'weak', 's': 'strong'}


def denormalize(images: np.ndarray) -> np.ndarray:
  """uint8 RGB of ImageNet-normalized float images (what the pipeline feeds the network)."""
  pixels = np.asarray(images, np.float32) * np.asarray(color.IMAGENET_STD, np.float32) + np.asarray(
    color.IMAGENET_MEAN, np.float32
  )
  return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def _checked_images(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(
      f'{what} must be uint8 RGB [..., H, W, 3] (see denormalize); got '
      f'{images.dtype} {images.shape}.'
    )
  return images


def _default_zoom(images: np.ndarray, zoom: int | None) -> int:
  return zoom or max(1, -(-MIN_TILE // max(images.shape[-3:-1])))


def _enlarged(images: np.ndarray, zoom: int) -> np.ndarray:
  """Nearest-neighbour upscaling, so that tiny images stay sharp."""
  return np.repeat(np.repeat(images, zoom, axis=-3), zoom, axis=-2)


def _framed(image: np.ndarray, rgb: tuple[int, int, int], border: int) -> np.ndarray:
  height, width = image.shape[:2]
  tile = np.empty((height + 2 * border, width + 2 * border, 3), np.uint8)
  tile[...] = rgb
  tile[border : border + height, border : border + width] = image
  return tile


def _mosaic(tiles: np.ndarray, gap: int) -> np.ndarray:
  """Tiles [R, C, h, w, 3] on a background with `gap` pixels around each."""
  rows, columns, height, width, _ = tiles.shape
  out = np.empty((gap + rows * (height + gap), gap + columns * (width + gap), 3), np.uint8)
  out[...] = BACKGROUND
  for r in range(rows):
    for c in range(columns):
      top, left = gap + r * (height + gap), gap + c * (width + gap)
      out[top : top + height, left : left + width] = tiles[r, c]
  return out


def retrieval_grid(
  query_images: np.ndarray,
  query_labels: np.ndarray,
  neighbour_images: np.ndarray,
  neighbour_labels: np.ndarray,
  *,
  zoom: int | None = None,
  border: int = BORDER,
  gap: int = GAP,
) -> np.ndarray:
  """One row a query: the query [Q, H, W, 3] framed blue, then its k neighbours [Q, k, H, W, 3]
  framed green (same class) or red (another class), so that mistakes stand out."""
  query_images = _checked_images(query_images, 'query_images')
  neighbour_images = _checked_images(neighbour_images, 'neighbour_images')
  query_labels, neighbour_labels = np.asarray(query_labels), np.asarray(neighbour_labels)
  num_queries, k = neighbour_labels.shape
  if (query_images.shape[0], query_labels.shape) != (num_queries, (num_queries,)) or (
    neighbour_images.shape[:2] != (num_queries, k)
  ):
    raise ValueError(
      f'Shapes do not match: queries {query_images.shape}, labels '
      f'{query_labels.shape}; neighbours {neighbour_images.shape}, labels '
      f'{neighbour_labels.shape}.'
    )
  zoom = _default_zoom(query_images, zoom)
  rows = []
  for query, label, neighbours, labels in zip(
    _enlarged(query_images, zoom),
    query_labels,
    _enlarged(neighbour_images, zoom),
    neighbour_labels,
    strict=True,
  ):
    rows.append(
      [_framed(query, QUERY_COLOR, border)]
      + [
        _framed(image, SAME_CLASS_COLOR if other == label else WRONG_CLASS_COLOR, border)
        for image, other in zip(neighbours, labels, strict=True)
      ]
    )
  return _mosaic(np.asarray(rows), gap)


def _with_row_titles(
  grid: np.ndarray, titles: Sequence[str], row_height: int, gap: int
) -> np.ndarray:
  """The grid with a left margin naming each row, written at the row's middle."""
  font = ImageFont.load_default(TITLE_SIZE)
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  margin = int(max(measure.textlength(title, font=font) for title in titles)) + 2 * gap
  canvas = Image.new('RGB', (grid.shape[1] + margin, grid.shape[0]), BACKGROUND)
  canvas.paste(Image.fromarray(grid), (margin, 0))
  draw = ImageDraw.Draw(canvas)
  for row, title in enumerate(titles):
    middle = gap + row * (row_height + gap) + row_height // 2
    draw.text((gap, middle), title, fill=(0, 0, 0), font=font, anchor='lm')
  return np.asarray(canvas)


def views_grid(
  target_images: np.ndarray,
  online_images: np.ndarray,
  *,
  row_titles: Sequence[str] = (),
  zoom: int | None = None,
  gap: int = GAP,
) -> np.ndarray:
  """Two rows: the target views [B, H, W, 3] over the online views of the same images, with
  `row_titles` (two, or none) in a left margin."""
  target_images = _checked_images(target_images, 'target_images')
  online_images = _checked_images(online_images, 'online_images')
  if target_images.shape != online_images.shape:
    raise ValueError(
      f'Target views {target_images.shape} and online views {online_images.shape} differ in shape.'
    )
  zoom = _default_zoom(target_images, zoom)
  grid = _mosaic(_enlarged(np.stack([target_images, online_images]), zoom), gap)
  if not row_titles:
    return grid
  if len(row_titles) != 2:
    raise ValueError(f'row_titles names the two rows, got {row_titles!r}.')
  return _with_row_titles(grid, row_titles, target_images.shape[1] * zoom, gap)


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """[N, 2] t-SNE of the L2-normalized features (the cosine geometry kNN uses); the
  perplexity is lowered for small N, which t-SNE cannot take above N - 1."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 4:
    raise ValueError(f't-SNE needs [N, F] features with N >= 4, got {features.shape}.')
  features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  perplexity = min(perplexity, (len(features) - 1) / 3)
  return (
    TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed)
    .fit_transform(features)
    .astype(np.float32)
  )


def tsne_plot(
  embedding: np.ndarray,
  labels: np.ndarray,
  title: str = '',
  size_inches: float = 6.0,
  dpi: int = 100,
) -> np.ndarray:
  """A scatter plot of a 2-D embedding, one colour per class (a legend up to 20 classes), as
  an RGB uint8 image. Drawn on a private Agg canvas: no global pyplot state."""
  embedding, labels = np.asarray(embedding), np.asarray(labels)
  classes = np.unique(labels)
  figure = Figure(figsize=(size_inches, size_inches), dpi=dpi)
  canvas = FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  colours = matplotlib.colormaps['tab10' if len(classes) <= 10 else 'tab20']
  for i, label in enumerate(classes):
    chosen = labels == label
    x, y = embedding[chosen].T
    axes.scatter(x, y, s=8, color=colours(i % colours.N), label=str(label))
  if len(classes) <= 20:
    axes.legend(loc='best', fontsize='small', markerscale=2, title='class')
  axes.set_xticks([])
  axes.set_yticks([])
  axes.set_title(title)
  figure.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def spread_queries(labels: np.ndarray, count: int) -> np.ndarray:
  """Positions of `count` queries taking the classes in turn (the first of each class, then
  the second...), so that a grid shows many classes even when a split is sorted by class."""
  labels = np.asarray(labels)
  rank = np.empty(len(labels), np.int64)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  return np.lexsort((np.arange(len(labels)), rank))[:count]


def centre_crop_images(
  split: sources.Split, positions: np.ndarray, image_size: int, mesh: Mesh, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, labels) of the centre-crop views at `positions` of `extract_features`'s
  output for the same split, mesh and batch size: its batches hold every process's share
  of the batch in turn, so they are read here in that order too. Reads the split up to the
  last position; no accelerator and no other process is involved."""
  positions = np.asarray(positions, np.int64)
  wanted, inverse = np.unique(positions, return_inverse=True)
  devices, count = mesh.devices.size, jax.process_count()
  batch_size = max(batch_size // devices, 1) * devices  # as extract_features rounds it
  hosts = [
    pipeline.eval_batches(
      split, global_batch=batch_size, image_size=image_size, process_index=p, process_count=count
    )[0].as_numpy_iterator()
    for p in range(count)
  ]
  images, labels, seen = {}, {}, 0
  for batches in zip(*hosts, strict=True):
    batch = {
      key: np.concatenate([b[key][b['mask']] for b in batches]) for key in ('image', 'label')
    }
    for position in wanted[(wanted >= seen) & (wanted < seen + len(batch['label']))]:
      images[position] = batch['image'][position - seen]  # uint8 as they cross
      labels[position] = batch['label'][position - seen]
    seen += len(batch['label'])
    if len(images) == len(wanted):
      break
  if len(images) < len(wanted):
    raise ValueError(
      f'{split.name} has {seen} examples; positions up to {wanted[-1]} were asked for.'
    )
  return (
    np.stack([images[p] for p in wanted])[inverse],
    np.asarray([labels[p] for p in wanted])[inverse],
  )


def retrieval_grid_from_features(
  train_split: sources.Split,
  train: tuple[np.ndarray, np.ndarray],
  query_split: sources.Split,
  queries: tuple[np.ndarray, np.ndarray],
  image_size: int,
  mesh: Mesh,
  *,
  num_queries: int = 8,
  k: int = 8,
  batch_size: int = 256,
) -> np.ndarray:
  """The retrieval grid of `num_queries` queries spread over the classes of `query_split`,
  from (features, labels) of both splits as `extract_features` returned them with this
  mesh and batch size: only the few images shown are decoded again."""
  (train_features, train_labels), (query_features, query_labels) = train, queries
  chosen = spread_queries(query_labels, num_queries)
  _, neighbours = nearest_neighbours(
    train_features, query_features[chosen], min(k, len(train_features)), mesh=mesh
  )
  query_images, _ = centre_crop_images(query_split, chosen, image_size, mesh, batch_size)
  neighbour_images, _ = centre_crop_images(
    train_split, neighbours.ravel(), image_size, mesh, batch_size
  )
  return retrieval_grid(
    query_images,
    query_labels[chosen],
    neighbour_images.reshape(neighbours.shape + query_images.shape[1:]),
    np.asarray(train_labels)[neighbours],
  )


def views_grid_from_config(
  config: ml_collections.ConfigDict, mesh: Mesh, split: sources.Split | None = None, count: int = 8
) -> np.ndarray:
  """The views grid of the first `count` images of the training stream `config` describes
  (its data section's pairing, crop scale and flips, and its seed), coloured on the
  accelerator as in training. On one host these are the first images of the first training
  batch, augmented alike. Every process must call it (the views are gathered)."""
  if split is None:
    split = sources.build_split(config.data, 'train', config.image_size)
  batch = -(-count // mesh.devices.size) * mesh.devices.size
  stream = pipeline.train_stream(
    split,
    global_batch=batch,
    image_size=config.image_size,
    seed=config.seed,
    pairing=config.data.pairing,
    crop_scale=tuple(config.data.crop_scale),
    random_flip=config.data.flip,
    crops=config.data.crops,
  )
  views = color.finish_views(pipeline.to_global(next(stream), mesh), config.data.pairing)
  views = multihost_utils.process_allgather(
    {key: views[key] for key in ('target', 'online')}, tiled=True
  )
  target, online = (VIEW_KINDS[kind] for kind in config.data.pairing.split('/'))
  return views_grid(
    denormalize(views['target'][:count]),
    denormalize(views['online'][:count]),
    row_titles=(f'target ({target})', f'online ({online})'),
  )


def _evenly_spaced(total: int, count: int) -> np.ndarray:
  return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))


def write_pictures(
  pictures: dict[str, np.ndarray],
  workdir: str,
  step: int,
  writer: metric_writers.MetricWriter | None = None,
) -> dict[str, str]:
  """`workdir/<name>.png` and TensorBoard images at `step` (through `writer`, e.g. a training
  run's, else a writer of its own) from process 0; {name: path}."""
  paths = {name: os.path.join(workdir, f'{name}.png') for name in pictures}
  if jax.process_index() == 0:
    for name, picture in pictures.items():
      buffer = io.BytesIO()
      Image.fromarray(picture).save(buffer, format='PNG')
      write_atomically(paths[name], buffer.getvalue())
  own_writer = writer is None
  if writer is None:
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_images(step, {name: picture[None] for name, picture in pictures.items()})
  if own_writer:
    writer.flush()
    writer.close()
  return paths


def visualize(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  queries: int = 8,
  neighbours: int = 8,
  views: int = 8,
  tsne_points: int = 2000,
) -> dict[str, str]:
  """Loads the encoder an evaluation config names, draws the retrieval grid, the t-SNE of
  up to `tsne_points` test features and the views grid, and writes them to `workdir`
  (features cached in workdir/features as the evaluation program does); {name: PNG path}."""
  config = config.copy_and_resolve_references()
  if config.checkpoint_format == 'msf_jax':  # one step, recorded with the pictures
    config.step = backbones.msf_jax_step(config.checkpoint, config.get('step'))
  variables, model_config = backbones.load_encoder(config)
  with config.unlocked():
    config.model = model_config
  full_train = sources.build_split(config.data, config.data.train_split, config.image_size)
  splits = [full_train, sources.build_split(config.data, config.data.test_split, config.image_size)]
  if config.data.max_examples:
    splits = [sources.take(split, config.data.max_examples) for split in splits]
  mesh = make_mesh()
  train, test = (
    cached_features(
      variables, split, config, mesh, os.path.join(workdir, CACHE_DIR), config.batch_size
    )[:2]
    for split in splits
  )
  pictures = {'views': views_grid_from_config(config, mesh, full_train, views)}
  if jax.process_index() == 0:
    pictures['retrieval'] = retrieval_grid_from_features(
      splits[0],
      train,
      splits[1],
      test,
      config.image_size,
      mesh,
      num_queries=queries,
      k=neighbours,
      batch_size=config.batch_size,
    )
    shown = _evenly_spaced(len(test[1]), tsne_points)
    pictures['tsne'] = tsne_plot(
      tsne_embedding(test[0][shown], config.seed),
      test[1][shown],
      f't-SNE of {len(shown)} {splits[1].name} features',
    )
  paths = write_pictures(pictures, workdir, config.get('step') or 0)
  logging.info('Pictures written: %s', ', '.join(paths.values()))
  return paths


def define_flags() -> None:
  """The command line's flags, defined only when it runs: msf_jax.main defines --config and
  --workdir too, and both modules may be imported into one process."""
  config_flags.DEFINE_config_file(
    'config', None, 'Evaluation config, e.g. configs/eval.py:digits.', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Where the PNG files and TensorBoard images go.')
  flags.DEFINE_integer('queries', 8, 'Test images in the retrieval grid.')
  flags.DEFINE_integer('neighbours', 8, 'Training images shown for each query.')
  flags.DEFINE_integer('views', 8, 'Training images in the views grid.')
  flags.DEFINE_integer('tsne_points', 2000, 'Test features in the t-SNE (evenly spaced).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_console()
  pipeline.hide_accelerators_from_tensorflow()
  distributed.cpu_alone_without_accelerators()  # no libtpu errors on a CPU machine
  distributed.initialize()
  options = flags.FLAGS
  visualize(
    options.config,
    options.workdir,
    queries=options.queries,
    neighbours=options.neighbours,
    views=options.views,
    tsne_points=options.tsne_points,
  )


if __name__ == '__main__':
  define_flags()
  app.run(main)
