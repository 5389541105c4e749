"""The Colab demo and the project's home. The home is written once, as pyproject's Repository;
the README's and the notebook's "Open in Colab" badges, the clone commands, CITATION.cff and
the notebook's setup cell derive from it, so a move of the repository is a change of that line
(and Homepage beside it) plus the places these tests then point at. The setup cell's logic
runs here off Colab, and its install against a local clone of the home (slow)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types

import pytest

from helpers import REPO, code_sources, home, load_notebook, pyproject

NOTEBOOK_PATH = 'notebooks/msf_demo.ipynb'
BADGE_IMAGE = 'https://colab.research.google.com/assets/colab-badge.svg'
# The OWNER/NAME of a repository in a link to its page, to a Colab notebook of it or to a raw file.
REPOSITORY_LINK = re.compile(
  r'(?:github\.com|colab\.research\.google\.com/github|raw\.githubusercontent\.com)/'
  r'([\w.-]+/[\w-]+)'
)
LINKING_SUFFIXES = ('.md', '.cff', '.ipynb', '.toml', '.txt', '.py', '.sh', '.sbatch')
UNSCANNED = ('runs', 'build', 'msf_jax.egg-info', '__pycache__')  # outputs of runs and builds


def repository(url: str) -> str:
  """OWNER/NAME of a GitHub URL."""
  return REPOSITORY_LINK.search(url)[1]


def colab_link(url: str) -> str:
  """Where Colab opens the demo notebook of `main` of the repository at `url`."""
  return f'https://colab.research.google.com/github/{repository(url)}/blob/main/{NOTEBOOK_PATH}'


def badge(url: str) -> str:
  return f'[![Open in Colab]({BADGE_IMAGE})]({colab_link(url)})'


def linking_files() -> list[str]:
  """The repository's text files that could link to it (hidden folders, such as a venv, and
  run outputs left out)."""
  found = []
  for root, folders, files in os.walk(REPO):
    folders[:] = [name for name in folders if not name.startswith('.') and name not in UNSCANNED]
    found += [os.path.join(root, name) for name in files if name.endswith(LINKING_SUFFIXES)]
  return sorted(found)


def read(relative_path: str) -> str:
  with open(os.path.join(REPO, relative_path), encoding='utf-8') as f:
    return f.read()


def setup_cell() -> str:
  return code_sources(load_notebook())[0]


def setup_namespace() -> dict:
  """The setup cell's functions and form fields, as a run here (msf_jax installed) leaves them."""
  namespace = {}
  exec(setup_cell(), namespace)
  return namespace


def test_the_home_is_a_github_repository_written_as_repository_and_homepage():
  urls = pyproject()['project']['urls']
  assert re.fullmatch(r'https://github\.com/[\w.-]+/[\w-]+', urls['Repository'])
  assert urls['Homepage'] == urls['Repository']


def test_every_link_to_a_repository_is_the_home_or_another_pyproject_url():
  """A move of the home: each link left behind fails here, by file and line."""
  others = [url for key, url in pyproject()['project']['urls'].items() if key != 'Homepage']
  allowed = {repository(url) for url in others if REPOSITORY_LINK.search(url)}
  stale = []
  for path in linking_files():
    with open(path, encoding='utf-8', errors='replace') as f:
      for number, line in enumerate(f, 1):
        stale += [
          f'{os.path.relpath(path, REPO)}:{number}: {name}'
          for name in REPOSITORY_LINK.findall(line)
          if name not in allowed
        ]
  assert not stale, f"links to a repository that is not pyproject's {home()}: {stale}"


def test_the_repository_links_are_found():
  """The scan above sees the links of every kind that the README and the notebook hold."""
  readme = read('README.md')
  assert REPOSITORY_LINK.findall(readme).count(repository(home())) >= 3  # badge, home, clone
  assert repository(home()) in REPOSITORY_LINK.findall(read(NOTEBOOK_PATH))
  assert os.path.join(REPO, 'CITATION.cff') in linking_files()
  assert f'repository-code: "{home()}"' in read('CITATION.cff')


def test_the_readme_and_the_notebook_open_the_notebook_of_the_home_in_colab():
  demo_section = read('README.md').split('## Try it', 1)[1].split('\n## ', 1)[0]
  assert badge(home()) in demo_section
  first_cell = ''.join(load_notebook()['cells'][0]['source'])
  assert first_cell.startswith(badge(home()) + '\n')


def test_the_clone_commands_and_the_setup_form_name_the_home():
  assert f'git clone {home()} && cd {repository(home()).split("/")[1]}\n' in read('README.md')
  namespace = setup_namespace()
  assert (namespace['HOME'], namespace['BRANCH']) == (home(), 'main')
  for field in ('HOME', 'BRANCH'):  # Colab shows them as the cell's form
    assert re.search(rf"^{field} = '[^']*'  #@param {{type:\"string\"}}$", setup_cell(), re.M)


def test_the_setup_clones_the_branch_and_installs_the_pinned_stack_with_the_chips_jax():
  namespace = setup_namespace()
  assert namespace['clone_command'](home(), 'dev', '/content/msf_jax-dev') == [
    'git',
    'clone',
    '--quiet',
    '--depth',
    '1',
    '--branch',
    'dev',
    home(),
    '/content/msf_jax-dev',
  ]
  install = [
    sys.executable,
    '-m',
    'pip',
    'install',
    '--quiet',
    '-r',
    os.path.join(REPO, 'requirements.txt'),
    '-e',
    REPO,
  ]
  readme = read('README.md')
  assert namespace['pip_command'](REPO, 'cpu') == install
  for chip, jax in (('gpu', 'jax[cuda12]==0.10.2'), ('tpu', 'jax[tpu]==0.10.2')):
    assert namespace['pip_command'](REPO, chip) == install + [jax]
    assert f'`pip install "{jax}"`' in readme  # the README's accelerator builds


def write(path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_the_setup_tells_the_chip_from_the_device_files(tmp_path):
  chip = setup_namespace()['chip']
  assert chip(str(tmp_path)) == 'cpu'
  pci = tmp_path / 'sys' / 'bus' / 'pci' / 'devices'
  write(pci / '0000:00:04.0' / 'vendor', '0x1ae0\n')  # Google's gVNIC network card
  write(pci / '0000:00:04.0' / 'device', '0x0042\n')
  assert chip(str(tmp_path)) == 'cpu'
  write(pci / '0000:00:05.0' / 'vendor', '0x1ae0\n')  # a TPU v5e chip
  write(pci / '0000:00:05.0' / 'device', '0x0063\n')
  assert chip(str(tmp_path)) == 'tpu'
  write(tmp_path / 'dev' / 'nvidiactl', '')
  assert chip(str(tmp_path)) == 'gpu'


def test_the_setup_asks_for_a_restart_only_for_modules_imported_at_another_version(monkeypatch):
  stale_modules = setup_namespace()['stale_modules']
  assert 'numpy' in sys.modules and stale_modules() == []  # imported here at the pinned version
  monkeypatch.setitem(sys.modules, 'numpy', types.SimpleNamespace(__version__='1.0.0'))
  assert stale_modules() == ['numpy']


def test_off_colab_the_setup_installs_nothing(monkeypatch, capsys):
  def refuse(*args, **kwargs):
    raise AssertionError(f'the setup ran {args} off Colab')

  monkeypatch.setattr(subprocess, 'run', refuse)
  setup_namespace()
  assert capsys.readouterr().out == 'msf_jax is installed: nothing to set up.\n'
  monkeypatch.setitem(sys.modules, 'msf_jax', None)  # makes `import msf_jax` fail
  with pytest.raises(ImportError, match='msf_jax is not installed'):
    exec(setup_cell(), {})


def make_home(directory) -> str:
  """A git repository of this checkout's files with the branch main: the home, as a path."""
  home_path = directory / 'msf_jax'
  shutil.copytree(REPO, home_path, ignore=shutil.ignore_patterns('.*', *UNSCANNED))
  identity = ['-c', 'user.name=test', '-c', 'user.email=test@msf-jax.invalid']
  for command in (
    ['init', '--quiet', '--initial-branch=main'],
    ['add', '--all'],
    [*identity, 'commit', '--quiet', '--message=home'],
  ):
    subprocess.run(['git', *command], cwd=home_path, check=True, capture_output=True, timeout=120)
  return str(home_path)


def make_venv(directory) -> str:
  """A new venv that sees this venv's packages (a .pth file) without holding them, and no
  msf_jax: that one only imports through its own editable-install hook, which the .pth skips."""
  subprocess.run(
    [sys.executable, '-m', 'venv', '--without-pip', str(directory)], check=True, timeout=120
  )
  python = directory / 'bin' / 'python'
  purelib = subprocess.run(
    [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  (directory / purelib.strip() / 'stack.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
  return str(python)


SETUP_ON_COLAB = """
import sys, types
namespace = {}
try:
  exec(open(sys.argv[1]).read(), namespace)
except ImportError as error:
  print('off Colab:', error)
sys.modules['google.colab'] = types.ModuleType('google.colab')
namespace['setup'](sys.argv[2], 'main', 'cpu')
del sys.modules['google.colab']  # jax would take it for Colab's and import its debugger
import msf_jax
print('imported from', msf_jax.__file__)
"""


@pytest.mark.slow
def test_on_colab_the_setup_installs_from_a_clone_of_the_home(tmp_path):
  """The setup cell's clone and pip commands, run on a Colab-like Python without msf_jax
  against a local home. Installing the pinned stack itself is left out: its wheels (TensorFlow
  alone unpacks to 1.3 GB, jaxlib to 350 MB) come only from the index (pip's cache cannot
  resolve without it, and tests never download), and unpacking them would take minutes of
  CI's 2 cores.
  The new venv therefore sees this venv's stack, pinned by the same requirements.txt, and pip
  runs offline: it finds the pins satisfied, builds msf_jax from the clone (no build
  isolation: setuptools is the stack's) and installs it in editable mode."""
  home_path = make_home(tmp_path / 'remote')  # no msf_jax folder where Python looks first
  python = make_venv(tmp_path / 'venv')
  (tmp_path / 'setup_cell.py').write_text(setup_cell())
  content = tmp_path / 'content'  # Colab's working directory
  content.mkdir()
  env = {name: value for name, value in os.environ.items() if not name.startswith('PIP_')}
  env.pop('PYTHONPATH', None)
  # PIP_NO_BUILD_ISOLATION is read inverted: 0 turns build isolation off.
  env.update(PIP_NO_INDEX='1', PIP_NO_BUILD_ISOLATION='0', PIP_DISABLE_PIP_VERSION_CHECK='1')
  result = subprocess.run(
    [python, '-c', SETUP_ON_COLAB, str(tmp_path / 'setup_cell.py'), home_path],
    cwd=content,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  clone = content / 'msf_jax-main'
  assert 'off Colab: msf_jax is not installed' in result.stdout
  assert re.search(
    rf'Installing msf_jax from {re.escape(home_path)} \(main\), its pinned stack '
    r'and JAX for the cpu\.\.\. done in \d+ s\.\n',
    result.stdout,
  ), result.stdout
  assert f'imported from {clone / "msf_jax" / "__init__.py"}' in result.stdout

  # A new session (after a restart) imports it through the editable install: nothing to set up.
  restarted = subprocess.run(
    [python, str(tmp_path / 'setup_cell.py')],
    cwd=content,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert restarted.stdout == 'msf_jax is installed: nothing to set up.\n', restarted.stderr
  found = subprocess.run(
    [python, '-c', 'import msf_jax; print(msf_jax.__file__)'],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert found.stdout.strip() == str(clone / 'msf_jax' / '__init__.py'), found.stderr
  assert (clone / 'configs' / 'demo.py').is_file()  # what the notebook reads from the clone
