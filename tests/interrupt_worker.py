"""`python -m msf_jax.main` with Ctrl-C pressed (or SIGTERM sent) at chosen moments, for
tests/test_main.py and tests/test_distributed.py:

  python tests/interrupt_worker.py --config=... --workdir=... [flags of msf_jax.main]

Ctrl-C (a SIGINT to this process; $SIGNAL=SIGTERM sends that instead) comes right after the
checkpoint of step $SIGNAL_AFTER_STEP is saved. With CTRL_C_AGAIN=1 it comes again in the
save that follows, which is then kept from ending for ten minutes: the second Ctrl-C must not
wait for it. Sent by the run itself, a signal comes at the same step whatever the machine's
speed.
"""

import os
import signal
import time

from msf_jax import checkpoint, main

AFTER_STEP = int(os.environ['SIGNAL_AFTER_STEP'])
SIGNAL = signal.Signals[os.environ.get('SIGNAL', 'SIGINT')]
AGAIN = os.environ.get('CTRL_C_AGAIN') == '1'
_save = checkpoint.Checkpointer.save


def save(self, step, tree, force=False, metadata=None):
  saved = _save(self, step, tree, force=force, metadata=metadata)  # asynchronous: in flight
  if step == AFTER_STEP or (AGAIN and step > AFTER_STEP):
    os.kill(os.getpid(), SIGNAL)
  if AGAIN and step > AFTER_STEP:
    time.sleep(600)
  return saved


if __name__ == '__main__':
  checkpoint.Checkpointer.save = save
  main.run()
