"""The offline demo: MSF on scikit-learn's digits, then the trained encoder's kNN and linear
probe next to a randomly initialized one's, so that a newcomer sees what training bought."""

import os

import ml_collections

from msf_jax import train_loop
from msf_jax.evaluate import run as evaluation

ENCODERS = {'trained': 'msf_jax', 'random': 'random'}  # name: checkpoint format


def comparison_table(results: dict[str, dict[str, float]]) -> str:
  """One row per metric, one column per encoder, accuracies in percent."""
  names = list(results)
  metrics = [m for m in results[names[0]] if not m.endswith('regularization')]
  width = max(len(m) for m in metrics)
  lines = [f'{"":{width}}  ' + '  '.join(f'{n:>8}' for n in names)]
  for metric in metrics:
    lines.append(
      f'{metric:{width}}  ' + '  '.join(f'{100 * results[n][metric]:7.1f}%' for n in names)
    )
  return '\n'.join(lines)


def settings_summary(config: ml_collections.ConfigDict) -> str:
  """The MSF settings a run trained with, in words, so that its table says what it measured."""
  msf = config.msf
  k = f'k = {msf.topk}'
  if msf.topk_ramp_epochs:
    k += f' (from k = 1, growing over the first {msf.topk_ramp_epochs} epochs)'
  return (
    f'MSF with {k}, a bank of {msf.bank_size:,} rows, lr {config.optim.base_lr:g} x '
    f'batch/256, target momentum {msf.ema_momentum:g}, {config.num_epochs} '
    f'epoch{"s" * (config.num_epochs != 1)}.'
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """Trains (or resumes) in `workdir`, then evaluates the trained encoder and a random one
  with `config.evaluation`; each evaluation writes its JSON to workdir/eval_<name>."""
  train_loop.train(config, workdir)
  results = {}
  for name, checkpoint_format in ENCODERS.items():
    eval_config = config.evaluation.copy_and_resolve_references()
    eval_config.checkpoint = workdir if checkpoint_format == 'msf_jax' else ''
    eval_config.checkpoint_format = checkpoint_format
    results[name] = evaluation.evaluate(eval_config, os.path.join(workdir, f'eval_{name}'))
  data = config.evaluation.data
  print(
    f'\nMSF on {evaluation.dataset_name(data)}, {data.test_split} split '
    f'({config.evaluation.encoder} backbone features):\n'
    f'{comparison_table(results)}\n{settings_summary(config)}\n{config.get("why", "")}',
    flush=True,
  )
  return results
