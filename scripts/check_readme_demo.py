"""Checks that the demo's results table, as a run printed it, is README's.

  python scripts/check_readme_demo.py DEMO_OUTPUT [--tolerance=POINTS]

DEMO_OUTPUT is the console output of `bash scripts/demo.sh` (CI runs it after the tests).
README's table is the one in the demo section's first fenced block, from its title line to the
last row of percentages. Exit status 0 when every row names the same metric and each
percentage is within POINTS of README's (0: to the digit); otherwise 1, with a diff of the two
tables.
"""

import argparse
import difflib
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = re.compile(r'^MSF on \S+, \S+ split')
ROW = re.compile(r'^(\S+)\s+(\d+\.\d)%\s+(\d+\.\d)%$')
SECTION = '## Try it: the offline demo'


def table(lines: list[str]) -> list[str]:
  """The first results table in `lines`: its title, its column header and its rows."""
  starts = [i for i, line in enumerate(lines) if TITLE.match(line)]
  if not starts:
    return []
  start = starts[0]
  end = start + 2
  while end < len(lines) and ROW.match(lines[end].rstrip()):
    end += 1
  return [line.rstrip() for line in lines[start:end]]


def readme_table(readme: str) -> list[str]:
  """The table in the first fenced block of README's demo section that holds one."""
  section = readme.split(SECTION, 1)[1]
  blocks = section.split('```')[1::2]
  for block in blocks:
    found = table(block.splitlines())
    if found:
      return found
  return []


def cells(rows: list[str]) -> list[tuple[str, float, float]]:
  return [(m[1], float(m[2]), float(m[3])) for m in map(ROW.match, rows[2:])]


def within(expected: list[str], actual: list[str], tolerance: float) -> bool:
  """The same title, header and metrics, each percentage within `tolerance` points."""
  if expected[:2] != actual[:2] or len(expected) != len(actual):
    return False
  return all(
    e[0] == a[0] and abs(e[1] - a[1]) <= tolerance + 1e-9 and abs(e[2] - a[2]) <= tolerance + 1e-9
    for e, a in zip(cells(expected), cells(actual), strict=True)
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help="the demo's console output")
  parser.add_argument(
    '--tolerance',
    type=float,
    default=0.0,
    help='points each percentage may differ by (default 0: to the digit)',
  )
  args = parser.parse_args(argv)
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    expected = readme_table(f.read())
  with open(args.output, encoding='utf-8', errors='replace') as f:
    actual = table(f.read().splitlines())
  if not expected:
    print('README.md: no results table in the demo section.', file=sys.stderr)
    return 1
  if not actual:
    print(f'{args.output}: the demo printed no results table.', file=sys.stderr)
    return 1
  if within(expected, actual, args.tolerance):
    print(f"The demo printed README's table (within {args.tolerance:g} points).")
    return 0
  diff = difflib.unified_diff(expected, actual, 'README.md', args.output, lineterm='')
  print(
    f"The demo's table is not README's (tolerance {args.tolerance:g} points):",
    *diff,
    sep='\n',
    file=sys.stderr,
  )
  return 1


if __name__ == '__main__':
  sys.exit(main())
