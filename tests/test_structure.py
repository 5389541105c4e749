"""The package's shape: imports that run one way (no module imports one that imports it back,
directly or through a package), no private JAX module, a README layout that matches the
tree, and tests the READMEs name that exist."""

import ast
import os
import re

from helpers import REPO

PACKAGE = 'msf_jax'
PACKAGE_DIR = os.path.join(REPO, PACKAGE)


def package_modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the package (a package is its
  __init__)."""
  modules = {}
  for directory, _, files in os.walk(PACKAGE_DIR):
    for file in files:
      if file.endswith('.py'):
        parts = os.path.relpath(os.path.join(directory, file), REPO)[:-3].split(os.sep)
        modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = os.path.join(
          directory, file
        )
  return modules


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
  """Dotted names a module imports: `import a.b`, `from a import b` (as a.b, and a itself),
  relative imports resolved."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = module.split('.')[: len(module.split('.')) - node.level + is_package]
        base = '.'.join(anchor + ([base] if base else []))
      names.add(base)
      names.update(f'{base}.{alias.name}' for alias in node.names)
  return names


def dependencies(module: str, names: set[str], modules: dict[str, str]) -> set[str]:
  """The package modules that importing `names` runs: each named module, and the __init__ of
  every package entered on the way that does not already contain `module`."""
  found = set()
  for name in names:
    parts = name.split('.')
    for end in range(1, len(parts) + 1):
      prefix = '.'.join(parts[:end])
      inside = module == prefix or module.startswith(prefix + '.')
      if prefix in modules and prefix != module and not inside:
        found.add(prefix)
    # `from package import name` where name is no submodule: the package's own __init__.
    if name not in modules and '.'.join(parts[:-1]) in modules and name != module:
      owner = '.'.join(parts[:-1])
      if owner != module and not module.startswith(owner + '.'):
        found.add(owner)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    names = imported_names(tree, module, path.endswith('__init__.py'))
    graph[module] = dependencies(module, {n for n in names if n.split('.')[0] == PACKAGE}, modules)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of a directed graph as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for successor in sorted(graph.get(node, ())):
      if state.get(successor) == 'open':
        return stack[stack.index(successor) :] + [successor]
      if successor not in state and (cycle := visit(successor)):
        return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def component(module: str) -> str:
  """A subpackage (msf_jax.evaluate) or a top-level module (msf_jax.train)."""
  return '.'.join(module.split('.')[:2])


def test_the_import_walk_finds_known_edges():
  graph = import_graph()
  assert 'msf_jax.interop.backbones' in graph['msf_jax.evaluate.run']
  assert 'msf_jax.interop' in graph['msf_jax.evaluate.run']  # the package entered on the way
  assert 'msf_jax.checkpoint' in graph['msf_jax.train_loop']
  assert 'msf_jax.models' in graph['msf_jax.train_state']  # `from msf_jax.models import ...`
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_module_imports_one_that_imports_it_back():
  assert find_cycle(import_graph()) is None


def test_subpackages_and_top_level_modules_depend_one_way():
  graph = {}
  for module, targets in import_graph().items():
    graph.setdefault(component(module), set()).update(
      component(t) for t in targets if component(t) != component(module)
    )
  assert find_cycle(graph) is None
  assert 'msf_jax.evaluate' not in graph['msf_jax.interop']


def test_no_private_jax_module():
  for module, path in package_modules().items():
    with open(path) as f:
      assert '_src' not in f.read(), module


def readme_layout() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  return readme.split('## Layout', 1)[1].split('```')[1]


def test_readme_layout_matches_the_tree():
  layout = readme_layout()
  named = set(
    re.findall(
      r'\b((?:msf_jax|configs|launch|scripts|benchmarks|tests|notebooks|docs)'
      r'/[\w/]*(?:\.py)?)',
      layout,
    )
  )
  for path in named:
    assert os.path.exists(os.path.join(REPO, path)), f'README layout names {path}: not there'
  expected = {
    f'{PACKAGE}/{entry}' + ('/' if os.path.isdir(os.path.join(PACKAGE_DIR, entry)) else '')
    for entry in os.listdir(PACKAGE_DIR)
    if entry.endswith('.py')
    and entry not in ('__init__.py', '__main__.py')
    or os.path.isfile(os.path.join(PACKAGE_DIR, entry, '__init__.py'))
  }
  missing = expected - named
  assert not missing, f'README layout leaves out {sorted(missing)}'
  top_level = {
    entry + '/'
    for entry in os.listdir(REPO)
    if os.path.isdir(os.path.join(REPO, entry))
    and not entry.startswith('.')
    and entry not in ('runs', f'{PACKAGE}.egg-info', '__pycache__', 'build')
  }
  undescribed = top_level - {path.split('/')[0] + '/' for path in named} - {f'{PACKAGE}/'}
  assert not undescribed, f'the README layout does not describe {sorted(undescribed)}'


def test_every_test_the_readmes_name_exists():
  # `tests/a.py::test_x`, then `::test_y` for another test of the same file
  for readme in ('README.md', os.path.join('launch', 'README.md')):
    with open(os.path.join(REPO, readme)) as f:
      text = f.read()
    file = None
    for path, name in re.findall(r'`(tests/\w+\.py)?::(\w+)', text):
      file = path or file
      assert file, f'{readme} names ::{name} before naming its file'
      with open(os.path.join(REPO, file)) as f:
        defined = re.search(rf'^def {name}\b', f.read(), re.M) is not None
      assert defined, f'{readme}: {file}::{name} is gone'
