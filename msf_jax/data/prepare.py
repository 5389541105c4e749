"""Builds a TFDS dataset once, where training will read it:

  python -m msf_jax.data.prepare NAME --data_dir=DIR [--manual_dir=DIR/downloads/manual]
      [--file_format=array_record|tfrecord]

What `tfds build NAME --data_dir=DIR` does; that command line of TFDS 4.9.10 imports
apache_beam, which msf_jax does not install, and this one needs nothing more than training.
Datasets without a public download (ImageNet) read their archives from the manual folder;
a missing archive is named before any work starts, not after minutes of building.

The files are `array_record` by default: training reads them by index, so that every epoch
is a fresh permutation of the whole split (as the official PyTorch DataLoader reads) and a
resumed run starts where it stopped without reading anything again. TFRecord files can
only be read in sequence: msf_jax then shuffles their order and mixes several through a
buffer, which leaves images stored close together likelier to meet in a batch.
"""

import argparse
import os
import sys

import tensorflow as tf

# Archives a dataset's builder expects in the manual folder, unopened.
MANUAL_ARCHIVES = {'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')}
FILE_FORMATS = ('array_record', 'tfrecord')


def command(name: str, data_dir: str) -> str:
  """The command that prepares `name` in `data_dir`, for error messages."""
  return f'python -m msf_jax.data.prepare {name} --data_dir={data_dir}'


def missing_archives(name: str, manual_dir: str) -> list[str]:
  return [
    archive
    for archive in MANUAL_ARCHIVES.get(name.split(':')[0].split('/')[0], ())
    if not tf.io.gfile.exists(os.path.join(manual_dir, archive))
  ]


def prepare(
  name: str, data_dir: str, manual_dir: str | None = None, file_format: str = 'array_record'
) -> dict[str, int]:
  """Downloads (or reads from `manual_dir`) and writes the dataset's files in `file_format`;
  returns {split: number of examples}."""
  import tensorflow_datasets as tfds

  manual_dir = manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  if missing := missing_archives(name, manual_dir):
    raise FileNotFoundError(
      f'Missing in {manual_dir}: {", ".join(missing)}. {name} has no '
      'public download: get the archives from its site (ImageNet: '
      'image-net.org, after registering) and copy them there unopened.'
    )
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m msf_jax.data.prepare',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('name', help='TFDS name, e.g. imagenet2012 or cifar10')
  parser.add_argument('--data_dir', required=True, help='a local folder or gs:// path')
  parser.add_argument(
    '--manual_dir',
    default=None,
    help='where manual archives are (default DATA_DIR/downloads/manual)',
  )
  parser.add_argument(
    '--file_format',
    default='array_record',
    choices=FILE_FORMATS,
    help='array_record (default): read by index, a fresh order every epoch',
  )
  args = parser.parse_args(argv)
  try:
    splits = prepare(args.name, args.data_dir, args.manual_dir, args.file_format)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.name} is in {args.data_dir}: {splits}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
