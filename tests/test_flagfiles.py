"""Every flagfile under experiments/ parses with the entry point its header names and gives a
valid Config: a flag renamed or a value out of range fails here, not an hour into a run."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(REPO, "experiments", "*.flags")))

# Run in a subprocess per entry point: each entry defines its flags on absl's global FLAGS.
_CHECK = """
import importlib, json, sys
from absl import flags
entry, paths = sys.argv[1], sys.argv[2:]
importlib.import_module("lwc.experiments." + entry)
from lwc.experiments import common
out = {}
for path in paths:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["check", "--flagfile=" + path, "--workdir=/nonexistent"])
  config = common.config_from_flags()
  config.validate()
  out[path] = {"model": config.model, "iterations": config.iterations,
               "target_compression": config.target_compression,
               "density_schedule": config.density_schedule, "admm_rho": config.admm_rho,
               "sweep_split": config.sweep_split, "dropout": config.dropout,
               "retrain_dropout": config.retrain_dropout,
               "dropout_layers": list(config.dropout_layers),
               "without_effect": common.config_lib.settings_without_effect(config)}
print(json.dumps(out))
"""


def entry_of(path: str) -> str:
  """The entry point a flagfile's header runs it with (`--entry=` for the seeds tool)."""
  with open(path) as f:
    header = f.read()
  entry = re.search(r"--entry=(\w+)", header) or re.search(r"lwc\.experiments\.(\w+)", header)
  assert entry, f"{path}: its header names no entry point"
  return entry.group(1)


def test_every_flagfile_parses_into_a_valid_config():
  assert len(FLAGFILES) >= 10
  by_entry: dict[str, list[str]] = {}
  for path in FLAGFILES:
    by_entry.setdefault(entry_of(path), []).append(os.path.relpath(path, REPO))
  assert set(by_entry) <= {"lenet", "alexnet", "vgg16", "prune"}, by_entry
  parsed = {}
  for entry, paths in by_entry.items():
    proc = subprocess.run([sys.executable, "-c", _CHECK, entry, *paths], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed.update(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert sorted(parsed) == sorted(os.path.relpath(p, REPO) for p in FLAGFILES)
  # Spot checks that the values are the flagfiles' own, includes resolved.
  assert parsed["experiments/lenet_300_100_68x.flags"]["target_compression"] == 68
  assert parsed["experiments/lenet_300_100_68x.flags"]["density_schedule"] == "cubic"
  assert parsed["experiments/lenet5_200x.flags"]["iterations"] == 12
  assert parsed["experiments/lenet5_200x_logpoly.flags"]["density_schedule"] == "log_polynomial"
  admm_recipe = parsed["experiments/lenet5_200x_admm.flags"]
  assert (admm_recipe["admm_rho"], admm_recipe["sweep_split"], admm_recipe["iterations"]) == (
      3e-3, "train", 6)
  assert (admm_recipe["dropout"], admm_recipe["retrain_dropout"],
          admm_recipe["dropout_layers"]) == (0.5, 0.5, ["fc1"])
  # The settings each file gives but its run never reads (lwc.config.settings_without_effect):
  # the paper's files none; the target recipes inherit the Table 1 files' qualities.
  for name in ("lenet_300_100", "lenet5", "alexnet", "vgg16"):
    assert parsed[f"experiments/{name}.flags"]["without_effect"] == [], name
  assert parsed["experiments/lenet5_200x.flags"]["without_effect"] == [
      "--quality, --layer_quality: no effect with --target_compression (its allocation "
      "chooses every layer's density; the threshold follows from the density)"]
