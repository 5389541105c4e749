"""python -m msf_jax.main --config=configs/imagenet_msf.py --workdir=DIR [--config.key=value]

Trains MSF, resuming from the latest checkpoint in DIR. A misspelt `--config.` key is an
error that names it (the config is locked). A config with `mode = 'evaluate'`
(configs/eval.py) evaluates a frozen encoder instead (msf_jax.evaluate.run); `mode = 'demo'`
(configs/demo.py) trains, then compares the trained encoder with a random one (msf_jax.demo).
The console shows msf_jax's own lines and every warning; DIR/msf_jax.log has all of them.
"""

import os

# TensorFlow's C++ INFO lines stay off the console; set before TensorFlow is first imported.
# TensorFlow 2.21 announces its oneDNN kernels whatever the log level; they serve its own
# matrix ops, which tf.data's decoding and cropping do not use, so they are switched off.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msf_jax import console, demo, distributed, train_loop  # noqa: E402
from msf_jax.data import pipeline  # noqa: E402
from msf_jax.evaluate import run as evaluation  # noqa: E402

MODES = {'train': train_loop.train, 'evaluate': evaluation.evaluate, 'demo': demo.run}
# What each mode leaves in the workdir besides checkpoints, logs and TensorBoard metrics.
RESULTS = {'train': {}, 'evaluate': {'Results': evaluation.RESULTS_FILE},
           'demo': {f'Results ({name} encoder)': os.path.join(f'eval_{name}',
                                                             evaluation.RESULTS_FILE)
                    for name in demo.ENCODERS}}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process jobs: host:port of process 0. With '
    '--num_processes and --process_id; all three are detected on Cloud TPU pods and SLURM.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_console()
  # TensorFlow (tf.data on the host CPU) must not reserve accelerator memory JAX needs.
  pipeline.hide_accelerators_from_tensorflow()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  mode = _CONFIG.value.get('mode', 'train')
  if mode not in MODES:
    raise app.UsageError(f'config.mode must be one of {sorted(MODES)}, got {mode!r}.')
  workdir = _WORKDIR.value
  log_path = console.log_to_file(workdir, jax.process_index())
  MODES[mode](_CONFIG.value, workdir)
  extra = {name: os.path.join(workdir, path) for name, path in RESULTS[mode].items()}
  logging.info('Done.\n%s', console.where_results_are(workdir, log_path, extra,
                                                      checkpoints=mode != 'evaluate'))


if __name__ == '__main__':
  app.run(main)
