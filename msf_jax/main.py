"""python -m msf_jax.main --config=configs/imagenet_msf.py --workdir=DIR [--config.key=value]

Trains MSF, resuming from the latest checkpoint in DIR. A misspelt `--config.` key is an
error that names it (the config is locked). A config with `mode = 'evaluate'`
(configs/eval.py) evaluates a frozen encoder instead (msf_jax.evaluate.run); `mode = 'demo'`
(configs/demo.py) trains, then compares the trained encoder with a random one (msf_jax.demo).
The console shows msf_jax's own lines and every warning; DIR/msf_jax.log has all of them.

Ctrl-C during training saves a checkpoint of the current step, prints the command that
resumes from it and exits with status 130; a second Ctrl-C stops at once, keeping the
previous checkpoint. A mistake of the user's (a setting, a config file that cannot be read,
a workdir that cannot be used or that another run holds, a checkpoint that does not fit the
config, a dataset that is not there) ends in one `error:` line, maybe a `hint:` line, and
status 1; its traceback goes to DIR/msf_jax.log, and to the console too with --verbosity=1
or MSF_JAX_TRACEBACK=1. Anything else is a bug in msf_jax and shows its traceback.
"""

import logging as python_logging
import os
import shlex
import sys
import tempfile

from msf_jax import cli

cli.quiet_tensorflow()  # before TensorFlow is first imported

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msf_jax import console, demo, distributed, train_loop  # noqa: E402
from msf_jax.checkpoint import CheckpointError  # noqa: E402
from msf_jax.config_utils import ConfigError  # noqa: E402
from msf_jax.data import pipeline  # noqa: E402
from msf_jax.data.sources import DatasetNotFoundError  # noqa: E402
from msf_jax.evaluate import run as evaluation  # noqa: E402
from msf_jax.workdir_lock import WorkdirBusyError  # noqa: E402

MODES = {'train': train_loop.train, 'evaluate': evaluation.evaluate, 'demo': demo.run}
# What each mode leaves in the workdir besides checkpoints, logs and TensorBoard metrics.
RESULTS = {
  'train': {},
  'evaluate': {'Results': evaluation.RESULTS_FILE},
  'demo': {
    f'Results ({name} encoder)': os.path.join(f'eval_{name}', evaluation.RESULTS_FILE)
    for name in demo.ENCODERS
  },
}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.mark_flag_as_required('config')
# required=True (rather than marking it after) types its value as a str, never None.
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Run directory: checkpoints and metrics.', required=True
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'Multi-process jobs: host:port of process 0. With '
  '--num_processes and --process_id; all three are detected on Cloud TPU pods and SLURM.',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')

FLAGS_HINT = 'python -m msf_jax.main --helpshort lists the flags.'


# Known to `run` once `main` has found it: which process this is (only process 0 prints).
_RUN = {'process_index': 0}


class WorkdirError(OSError):
  """--workdir cannot be created or written."""


# What a user causes and can fix from the message alone. FileNotFoundError: a file the user
# named (a checkpoint, an image folder) is not there.
USER_ERRORS = (
  ConfigError,
  CheckpointError,
  WorkdirError,
  WorkdirBusyError,
  DatasetNotFoundError,
  FileNotFoundError,
  train_loop.NonFiniteLossError,
)


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir and checks that it can be written, before anything is computed.
  A bucket (gs://) is left to the writes themselves."""
  if '://' in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise cli.hinted(
      WorkdirError(f'--workdir={workdir} cannot be used: {e.strerror or e}.'),
      'Give a folder this user can create and write, e.g. --workdir=runs/NAME.',
    ) from e


def _log_files() -> list[python_logging.FileHandler]:
  """The run's log files (console.log_to_file): none until the workdir is known."""
  return [
    h for h in python_logging.getLogger().handlers if isinstance(h, python_logging.FileHandler)
  ]


def _to_log_files(message: str, error: BaseException | None = None) -> None:
  """`message`, with the traceback of `error`, into the log files only, not the console."""
  record = python_logging.LogRecord(
    'msf_jax',
    python_logging.ERROR,
    __file__,
    0,
    message,
    (),
    (type(error), error, error.__traceback__) if error else None,
  )
  for handler in _log_files():
    handler.handle(record)


def _tell(lines: list[str], error: BaseException | None = None) -> None:
  """Prints `lines` on process 0's console (the traceback of `error` first where asked for)
  and writes both to this process's log file."""
  _to_log_files('\n'.join(lines), error)
  if _RUN['process_index'] == 0:
    cli.tell(lines, error)


def resume_command() -> str:
  """The command line of this run, which resumes it from its latest checkpoint."""
  return shlex.join(['python', '-m', 'msf_jax.main', *sys.argv[1:]])


def run(argv: list[str] | None = None) -> None:
  """The program: absl's flag parsing and `main`, with the user's mistakes and Ctrl-C as a
  few lines and an exit status; a bug propagates with its traceback."""
  try:
    cli.run(main, argv, FLAGS_HINT, USER_ERRORS, _tell)
  except train_loop.TrainingInterrupted as e:
    _tell([str(e), f'Resume with: {resume_command()}'])
    sys.exit(train_loop.EXIT_INTERRUPTED)
  except KeyboardInterrupt as e:
    _tell(['Interrupted (Ctrl-C).'], e)
    sys.exit(train_loop.EXIT_INTERRUPTED)


def main(argv) -> None:
  if len(argv) > 1:
    raise ConfigError(f'Unexpected arguments: {argv[1:]} (flags are written --name=value).')
  console.quiet_console()
  # TensorFlow (tf.data on the host CPU) must not reserve accelerator memory JAX needs.
  pipeline.hide_accelerators_from_tensorflow()
  distributed.cpu_alone_without_accelerators()  # no libtpu errors on a CPU machine
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:  # its own checks of the three flags
    raise cli.hinted(ConfigError(str(e)), FLAGS_HINT) from e
  _RUN['process_index'] = jax.process_index()
  workdir = _WORKDIR.value
  _prepare_workdir(workdir)
  log_path = console.log_to_file(workdir, jax.process_index())
  config = cli.read_config(_CONFIG)
  mode = config.get('mode', 'train')
  if mode not in MODES:
    raise ConfigError(f'config.mode must be one of {sorted(MODES)}, got {mode!r}.')
  MODES[mode](config, workdir)
  extra = {name: os.path.join(workdir, path) for name, path in RESULTS[mode].items()}
  logging.info(
    'Done.\n%s', console.where_results_are(workdir, log_path, extra, checkpoints=mode != 'evaluate')
  )


if __name__ == '__main__':
  run()
