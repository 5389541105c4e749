"""The Colab demo notebook: a clean nbformat-4 file whose code cells run top to bottom."""

import ast
import base64
import os
import re
import sys

import pytest

from helpers import NOTEBOOK, REPO, code_sources, home, load_notebook

INSTALL = 'pip install -r requirements.txt && pip install --no-deps -e .'
EPOCHS_LINE = re.compile(r'^EPOCHS = \d+', re.MULTILINE)
KNN_METRICS = {'knn/majority/k=1', 'knn/majority/k=20', 'knn/weighted/k=1', 'knn/weighted/k=20'}
PROBE_METRICS = {'linear_probe/top1', 'linear_probe/top5'}


def test_notebook_is_clean_nbformat_4():
  notebook = load_notebook()
  assert (notebook['nbformat'], notebook['nbformat_minor']) >= (4, 5)
  assert notebook['metadata']['kernelspec']['language'] == 'python'
  cells = notebook['cells']
  assert len({cell['id'] for cell in cells}) == len(cells)  # nbformat 4.5: unique ids
  for cell in cells:
    assert cell['cell_type'] in ('markdown', 'code')
    assert isinstance(cell['source'], list) and all(isinstance(s, str) for s in cell['source'])


def test_notebook_is_committed_with_the_outputs_of_one_whole_run():
  """Readers on GitHub see what a run prints and draws without running it."""
  code = [cell for cell in load_notebook()['cells'] if cell['cell_type'] == 'code']
  assert [cell['execution_count'] for cell in code] == list(range(1, len(code) + 1))
  text = ''.join(
    line
    for cell in code
    for output in cell['outputs']
    if output['output_type'] == 'stream'
    for line in output['text']
  )
  assert 'epoch  60  loss' in text and 'epoch  61' not in text  # all of EPOCHS = 60
  assert re.search(r'knn/majority/k=1\s+9\d\.\d%\s+8\d\.\d%', text)  # trained, random
  pictures = [
    output for cell in code for output in cell['outputs'] if output['output_type'] == 'display_data'
  ]
  assert len(pictures) == 4  # views, curves, retrieval grid, t-SNE
  assert all(base64.b64decode(p['data']['image/png']).startswith(b'\x89PNG') for p in pictures)


def test_code_cells_are_plain_python():
  """No shell or magic lines: every cell runs in Colab, Jupyter and this test alike."""
  for source in code_sources(load_notebook()):
    ast.parse(source)
    assert not [line for line in source.splitlines() if line.lstrip().startswith(('!', '%'))]


def test_first_cell_says_how_to_install_off_colab(monkeypatch):
  """Without msf_jax and off Colab, the setup cell installs nothing: it names the clone and the
  README's install command."""
  assert INSTALL in open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  monkeypatch.setitem(sys.modules, 'msf_jax', None)  # makes `import msf_jax` fail
  with pytest.raises(ImportError) as raised:
    exec(code_sources(load_notebook())[0], {})
  assert f'`git clone {home()}`' in str(raised.value) and f'`{INSTALL}`' in str(raised.value)


@pytest.mark.slow
def test_notebook_trains_then_compares_with_a_random_encoder(capsys):
  sources = code_sources(load_notebook())
  assert sum(len(EPOCHS_LINE.findall(source)) for source in sources) == 1
  namespace = {}
  for source in sources:
    exec(compile(EPOCHS_LINE.sub('EPOCHS = 1', source), NOTEBOOK, 'exec'), namespace)
  output = capsys.readouterr().out
  assert 'epoch   1  loss' in output and 'epoch   2' not in output
  assert int(namespace['state'].step) == namespace['steps_per_epoch'] == 44
  results = namespace['results']
  assert set(results) == {'trained', 'random'}
  for accuracies in results.values():
    assert set(accuracies) == KNN_METRICS | PROBE_METRICS
    assert all(0 < value <= 1 for value in accuracies.values())
    assert accuracies['knn/majority/k=1'] > 0.5  # 10 classes: chance is 0.1
  lines = output.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split() == ['trained', 'random'])
  assert lines[header + 1].split()[0] == 'knn/majority/k=1'
  assert sum('picture' in line for line in lines) == 4  # views, curves, grid, t-SNE
