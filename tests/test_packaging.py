"""What `pip install` gives: pyproject.toml names every third-party module msf_jax imports (torch
as the optional extra), the pinned stack satisfies those ranges, and the wheel holds every
module and imports from where it is installed. The wheel is built offline from a copy of the
sources (setuptools from the venv, no build isolation), so that the checkout stays clean."""

import ast
import email
import functools
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO, pyproject

PACKAGE = 'msf_jax'
OPTIONAL = {'torch': 'torch'}  # module: the extra that installs it
TEST_ONLY = os.path.join(PACKAGE, 'testing')  # its reference implementations need torch
BUILD_FILES = ('pyproject.toml', 'README.md', 'LICENSE')


def package_files() -> list[str]:
  """Paths of the package's modules, relative to the repository."""
  return sorted(
    os.path.relpath(path, REPO)
    for path in glob.glob(os.path.join(REPO, PACKAGE, '**', '*.py'), recursive=True)
  )


def third_party_imports(skip: str = TEST_ONLY) -> set[str]:
  """Top-level names of the non-stdlib modules the package imports anywhere in its code
  (lazy imports in functions too), leaving out files under `skip`."""
  names = set()
  for path in package_files():
    if path.startswith(skip + os.sep):
      continue
    with open(os.path.join(REPO, path)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names.update(alias.name.split('.')[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names.add(node.module.split('.')[0])
  return names - set(sys.stdlib_module_names) - {PACKAGE, '__future__'}


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
  """Installed distributions providing a top-level module (itself if none is installed)."""
  found = installed_distributions().get(module, [module])
  return {canonicalize_name(name) for name in found}


def required(requirements: list[str], extra: str = '') -> set[str]:
  """Names of the requirements that apply on this platform (with `extra`, or without any)."""
  names = set()
  for text in requirements:
    requirement = Requirement(text)
    if not requirement.marker or requirement.marker.evaluate({'extra': extra}):
      names.add(canonicalize_name(requirement.name))
  return names


def unrequired_imports(requirements: list[str]) -> dict[str, set[str]]:
  """{module: its distributions} of the imports no requirement provides; torch must be in
  its extra instead."""
  missing = {}
  for module in sorted(third_party_imports()):
    names = required(requirements, OPTIONAL.get(module, ''))
    if module in OPTIONAL:
      names -= required(requirements)  # an optional module must not be a plain requirement
    if not distributions_of(module) & names:
      missing[module] = distributions_of(module)
  return missing


def with_extra(text: str, extra: str) -> str:
  """An optional dependency as wheel metadata writes it: under an `extra ==` marker."""
  requirement = Requirement(text)
  marker = f'({requirement.marker}) and ' if requirement.marker else ''
  requirement.marker = None
  return f'{requirement}; {marker}extra == "{extra}"'


def pyproject_requirements() -> list[str]:
  project = pyproject()['project']
  return project['dependencies'] + [
    with_extra(text, extra)
    for extra, texts in project['optional-dependencies'].items()
    for text in texts
  ]


def test_the_import_scan_finds_lazy_and_optional_imports():
  found = third_party_imports()
  assert {'jax', 'PIL', 'sklearn', 'orbax', 'matplotlib', 'torch'} <= found
  assert 'os' not in found and PACKAGE not in found
  assert distributions_of('sklearn') == {'scikit-learn'}
  assert unrequired_imports(['jax']).keys() == found - {'jax'}


def test_pyproject_requires_every_imported_module_and_torch_as_an_extra():
  assert unrequired_imports(pyproject_requirements()) == {}
  assert 'torch' not in required(pyproject()['project']['dependencies'])


def test_the_pinned_stack_satisfies_the_pyproject_ranges():
  """requirements.txt (installed here) and pyproject's ranges agree; an extra only if
  installed."""
  project = pyproject()['project']
  for extra, texts in [('', project['dependencies']), *project['optional-dependencies'].items()]:
    for requirement in map(Requirement, texts):
      if requirement.marker and not requirement.marker.evaluate({'extra': extra}):
        continue
      try:
        installed = importlib.metadata.version(requirement.name)
      except importlib.metadata.PackageNotFoundError:
        assert extra, f'{requirement} is not installed'
        continue
      assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)


def build_wheel(directory) -> str:
  """The wheel of a copy of the sources, built offline with the venv's setuptools."""
  source = directory / 'source'
  shutil.copytree(
    os.path.join(REPO, PACKAGE), source / PACKAGE, ignore=shutil.ignore_patterns('__pycache__')
  )
  for name in BUILD_FILES:
    shutil.copy(os.path.join(REPO, name), source / name)
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '--no-index',
      '--quiet',
      '-w',
      str(directory / 'dist'),
      str(source),
    ],
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  )
  (wheel,) = glob.glob(str(directory / 'dist' / '*.whl'))
  return wheel


@pytest.mark.slow
def test_the_wheel_declares_its_requirements_and_imports_installed(tmp_path):
  wheel = build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    (metadata,) = [name for name in names if name.endswith('.dist-info/METADATA')]
    metadata = email.message_from_bytes(archive.read(metadata))
  assert set(package_files()) <= {name for name in names if name.endswith('.py')}
  assert any(name.endswith('.dist-info/licenses/LICENSE') for name in names)
  assert metadata['License-Expression'] == pyproject()['project']['license']
  assert unrequired_imports(metadata.get_all('Requires-Dist')) == {}

  # Installed without dependencies next to the venv's: every module imports from there.
  target = tmp_path / 'site'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '--no-deps',
      '--no-index',
      '--quiet',
      '--target',
      str(target),
      wheel,
    ],
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  )
  modules = [path[:-3].replace(os.sep, '.').removesuffix('.__init__') for path in package_files()]
  if importlib.util.find_spec('torch') is None:
    modules.remove(f'{PACKAGE}.testing.torch_reference')
  # The planner's command line defines absl flags of the same names as msf_jax.main's (both
  # take --config): each is a program of its own, so it is imported in a process of its own.
  planner_cli = f'{PACKAGE}.plan.__main__'
  modules.remove(planner_cli)
  for group in (modules, [planner_cli]):
    script = (
      'import importlib, sys\n'
      f'for name in {group!r}:\n'
      '  importlib.import_module(name)\n'
      f'print(sys.modules[{PACKAGE!r}].__file__)\n'
    )
    env = {**os.environ, 'PYTHONPATH': str(target), 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
    result = subprocess.run(
      [sys.executable, '-c', script],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(target)), result.stdout
