"""Relative links in the project's Markdown point at files that exist, and at headings that exist.

The ledger docs/variants.md links every row to its section of RESULTS.md; a renamed heading or a
moved file would otherwise leave dead links that nothing reports. Anchors follow GitHub's rule:
the heading lowercased, every character but letters, digits, '_', '-' and spaces dropped, and
spaces turned into hyphens.
"""

import glob
import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = sorted(["README.md", "RESULTS.md", "benchmarks/RESULTS.md"]
                   + [os.path.relpath(p, REPO_ROOT)
                      for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))])
# [text](target): a target without a scheme is a path in the repository, maybe with #anchor.
LINK = re.compile(r"\]\(([^()\s]+)\)")


def github_anchor(heading: str) -> str:
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
  with open(path) as f:
    return {github_anchor(line.lstrip("#")) for line in f if re.match(r"#{1,6} ", line)}


def test_github_anchor_follows_githubs_rule():
  heading = " What a larger validation split costs: the 68x recipe with `--validation=10000`"
  assert github_anchor(heading) == (
      "what-a-larger-validation-split-costs-the-68x-recipe-with---validation10000")
  assert github_anchor("Session 12: the recipes on jax 0.12.1") == (
      "session-12-the-recipes-on-jax-0121")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document):
  path = os.path.join(REPO_ROOT, document)
  with open(path) as f:
    text = f.read()
  dead = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue  # http:, https:, mailto:
    file_part, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(linked):
      dead.append(f"{target} (no file {os.path.relpath(linked, REPO_ROOT)})")
    elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
      dead.append(f"{target} (no heading with anchor #{anchor})")
  assert not dead, f"{document}: dead links:\n" + "\n".join(dead)
