"""README's "Prune your own model" programs, run exactly as printed (so the README cannot drift)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def readme_programs() -> dict[str, str]:
  """{name: code} of every ```python block preceded by `<!-- readme-test: name -->`."""
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    text = f.read()
  return dict(re.findall(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", text, re.S))


def test_readme_has_both_programs():
  assert sorted(readme_programs()) == ["linen", "nnx"]


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_readme_program_runs_as_printed(name, mnist_dir):
  if os.path.normpath(mnist_dir) != os.path.normpath(
      os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")):
    pytest.skip("the README programs read ../shared/data/mnist")
  code = readme_programs()[name]
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"dense error \d+\.\d\d%", lines[0]), lines
  match = re.fullmatch(r"(\d+\.\d)x fewer weights, error (\d+\.\d\d)%", lines[-1])
  assert match, lines
  dense = float(lines[0].split()[-1].rstrip("%"))
  compression, pruned = float(match.group(1)), float(match.group(2))
  assert compression > 5.0       # three prunings at quality 0.5, 0.8, 1.0
  assert pruned < dense + 1.0    # retrained and re-estimated: no collapse
