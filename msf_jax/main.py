"""python -m msf_jax.main --config=configs/imagenet_msf.py --workdir=DIR [--config.key=value]

Trains MSF, resuming from the latest checkpoint in DIR. A misspelt `--config.` key is an
error that names it (the config is locked). A config with `mode = 'evaluate'`
(configs/eval.py) evaluates a frozen encoder instead (msf_jax.evaluate.run); `mode = 'demo'`
(configs/demo.py) trains, then compares the trained encoder with a random one (msf_jax.demo).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from msf_jax import demo, distributed, train_loop
from msf_jax.data import pipeline
from msf_jax.evaluate import run as evaluation

MODES = {'train': train_loop.train, 'evaluate': evaluation.evaluate, 'demo': demo.run}

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
  # TensorFlow (tf.data on the host CPU) must not reserve accelerator memory JAX needs.
  pipeline.hide_accelerators_from_tensorflow()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  mode = _CONFIG.value.get('mode', 'train')
  if mode not in MODES:
    raise app.UsageError(f'config.mode must be one of {sorted(MODES)}, got {mode!r}.')
  logging.info('Config:\n%s', _CONFIG.value)
  MODES[mode](_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
