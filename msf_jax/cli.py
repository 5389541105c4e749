"""What msf_jax's command lines share: TensorFlow quiet on the console, absl's flag parsing
with its errors as one-line ConfigErrors, and a user's mistake told as an `error:` line, maybe
a `hint:` line, and exit status 1 (its traceback only with --verbosity=1 or
MSF_JAX_TRACEBACK=1). Nothing here imports TensorFlow."""

import os
import sys
import traceback
from typing import Callable, TypeVar

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from msf_jax.config_utils import ConfigError

TRACEBACK_VARIABLE = 'MSF_JAX_TRACEBACK'  # set (to anything but 0) to see tracebacks
EXIT_USER_ERROR = 1


def quiet_tensorflow() -> None:
  """TensorFlow's C++ INFO lines off the console; called before TensorFlow is first imported.
  TensorFlow 2.21 announces its oneDNN kernels whatever the log level; they serve its own
  matrix ops, which tf.data's decoding and cropping do not use, so they are switched off."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


HintedError = TypeVar('HintedError', bound=Exception)


def hinted(error: HintedError, hint: str) -> HintedError:
  """`error` with a `hint` line to print under it."""
  error.hint = hint  # type: ignore[attr-defined]  # any exception may carry one; read by getattr
  return error


def config_file_error(path: str) -> ConfigError:
  """What is wrong with the --config file that ml_collections could not load."""
  if not os.path.exists(path):
    problem = 'there is no such file'
  elif os.path.isdir(path):
    problem = 'it is a folder'
  else:
    problem = 'it cannot be read'
  where = '' if os.path.isabs(path) else f' (from {os.getcwd()})'
  return hinted(
    ConfigError(f'--config={path}: {problem}{where}.'),
    'Give the path of a config file, e.g. --config=configs/digits_msf.py.',
  )


def _config_path(argv: list[str]) -> str:
  """The file of the last --config=PATH[:ARG] in `argv` ('' without one)."""
  values = [arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')]
  return values[-1].split(':')[0] if values else ''


def read_config(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The config of a --config flag, read now: ml_collections defers the error of a file it
  could not load to the first use, as two chained tracebacks."""
  try:
    holder.value.get('mode')
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS[holder.name]).split(':')[0]
    raise config_file_error(path) from e
  return holder.value


def _unquoted(error: BaseException) -> str:
  """ml_collections' message inside an AttributeError(KeyError): without the quotes and
  escapes that each wrapping added."""
  text = str(error)
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1].encode().decode('unicode_escape')
  return text


def flags_parser(hint: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing with its errors as ConfigErrors hinted with `hint`: a bad flag (absl
  prints the usage and exits), an override of a setting the config has not or a config file
  that does not parse (ml_collections raises from inside absl)."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      raise hinted(ConfigError(str(e)), hint) from e
    except (AttributeError, KeyError) as e:
      raise hinted(
        ConfigError(
          f'A --config. override names a setting the config does not have: {_unquoted(e)}'
        ),
        hint,
      ) from e
    except SyntaxError as e:
      raise ConfigError(
        f'The config file {e.filename} does not parse: {e.msg} (line {e.lineno}).'
      ) from e
    except OSError as e:  # a --config.* override of a config file that could not be loaded
      raise config_file_error(_config_path(argv)) from e

  return parse


def one_line(message: str) -> str:
  """A message on one line: its lines joined; a traceback quoted inside it (ml_collections
  quotes one when a config file raises) reduced to its last line."""
  before, marker, after = message.partition('Traceback (most recent call last)')
  lines = [line.strip() for line in before.splitlines() if line.strip()]
  if marker:
    lines += [line.strip() for line in after.splitlines() if line.strip()][-1:]
  return ' '.join(lines)


def show_tracebacks() -> bool:
  """--verbosity=1 (absl's flag) or MSF_JAX_TRACEBACK=1."""
  if os.environ.get(TRACEBACK_VARIABLE, '0') not in ('', '0'):
    return True
  return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1


def tell(lines: list[str], error: BaseException | None = None) -> None:
  """Prints `lines` on the console, the traceback of `error` first where asked for."""
  if error is not None and show_tracebacks():
    traceback.print_exception(error, file=sys.stderr)
  print('\n'.join(lines), file=sys.stderr, flush=True)


def run(
  main: Callable[[list[str]], None],
  argv: list[str] | None,
  hint: str,
  user_errors: tuple[type[BaseException], ...],
  tell_user: Callable[[list[str], BaseException], None] = tell,
) -> None:
  """absl's `app.run(main)`, a user's mistake (one of `user_errors`) told in a line or two
  and exit status 1; anything else propagates with its traceback."""
  try:
    app.run(main, argv, flags_parser=flags_parser(hint))
  except user_errors as e:
    error_hint = getattr(e, 'hint', None)
    tell_user([f'error: {one_line(str(e))}', *([f'hint: {error_hint}'] if error_hint else [])], e)
    sys.exit(EXIT_USER_ERROR)
