"""Per-layer pruning sensitivity of a trained checkpoint (paper Figure 6) and thresholds from it.

  python -m lwc.experiments.sensitivity --workdir=runs/lenet5 --data_dir=../shared/data/mnist \
      [--iteration=0] [--points=20] [--max_fraction=0.95] [--budget=0.001] \
      [--budget_mode=per_layer|total] [--out=DIR]

Restores iteration N (default 0, the dense model the paper measures) of a pipeline run, prunes
one layer at a time without retraining (`lwc.sensitivity.sweep`) on the run's validation split
(carved from the training set exactly as the run carved it; the test split only for a run made
with --decide_on_test, and then the output says so), and
writes sensitivity.csv, sensitivity.json and sensitivity.png into --out (default
WORKDIR/sensitivity). Prints the error table, the time taken, and the per-layer qualities that
keep each layer's top-1 error increase within --budget as a flag line for lwc.experiments.lenet.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from lwc import checkpoints as ckpt_lib
from lwc import errors
import jax

from lwc import network as network_lib
from lwc import pipeline, sensitivity
from lwc.data import resident
from lwc.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Workdir of a pipeline run (holds checkpoints/).",
                    required=True)
flags.DEFINE_integer("iteration", 0, "Checkpoint to measure: 0 = the dense model (what the paper "
                     "measures to choose thresholds); -1 = the latest.")
flags.DEFINE_string("data_dir", None, "Dataset folder; default: the run's own data_dir.")
flags.DEFINE_bool("download", False, "Let TFDS download the dataset if data_dir lacks it.")
flags.DEFINE_integer("points", 20, "Fractions per layer, evenly spaced from 0 to max_fraction.")
flags.DEFINE_float("max_fraction", 0.95, "Largest fraction of a layer's surviving weights "
                   "removed.")
flags.DEFINE_list("layers", [], "Layers to sweep (default: every prunable layer).")
flags.DEFINE_list("top_k", [], "Top-k errors to measure (default: 1, and 5 for > 10 classes).")
flags.DEFINE_float("budget", 0.001, "Allowed top-1 error increase (0.001 = 0.1 points) when "
                   "choosing each layer's quality.")
flags.DEFINE_enum("budget_mode", "per_layer", list(sensitivity.BUDGET_MODES), "per_layer: each "
                  "layer may add the whole budget; total: budget / number of layers each.")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/sensitivity).")
flags.DEFINE_integer("eval_batch_size", 500, "Examples per evaluation call (500: as fast as "
                     "2000 on a 2-core CPU, with less memory and system time).")


def config_from_meta(meta: dict) -> pipeline.Config:
  """The run's Config from a checkpoint's metadata."""
  config = pipeline.Config.from_json(meta.get("config", {}))
  return config.replace(model=meta["model"]) if meta.get("model") else config


def _ints(values: list[str], what: str) -> tuple[int, ...] | None:
  if not values:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UserError(f"{what}: expected integers, got {','.join(values)}") from None


def _checkpoint(workdir: str, iteration: int) -> tuple[int, pipeline.Config]:
  """(iteration, Config) of an existing checkpoint; UserError naming what is there otherwise."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir}: no checkpoints/ folder (not a workdir of a run)")
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    have = sorted(checkpoints.iterations())
    if not have:
      raise UserError(f"no checkpoint in {checkpoints.directory}")
    iteration = have[-1] if iteration == -1 else iteration
    if iteration not in have:
      raise UserError(f"no checkpoint of iteration {iteration} in {checkpoints.directory}; "
                      f"it has {', '.join(map(str, have))}")
    return iteration, config_from_meta(checkpoints.meta(iteration))
  finally:
    checkpoints.close()


def _check_out(out: str | None, workdir: str) -> str:
  """The output folder (--out, default WORKDIR/sensitivity), checked before the sweep: it (or its
  nearest existing parent) is a folder, and it is not inside the workdir's checkpoints/."""
  path = out or os.path.join(workdir, "sensitivity")
  name = f"--out={out}" if out else f"{path} (the default --out)"
  existing = path
  while not os.path.exists(existing) and os.path.dirname(existing) not in ("", existing):
    existing = os.path.dirname(existing)
  if os.path.exists(existing) and not os.path.isdir(existing):
    raise UserError(f"{name} is not a directory" if existing == path else
                    f"{name}: {existing} is not a directory")
  for sub in ("checkpoints", "progress"):
    guarded = os.path.join(workdir, sub)
    real = os.path.realpath(guarded)
    if os.path.commonpath([os.path.realpath(path), real]) == real:
      raise UserError(f"{name} is inside the workdir's {sub} ({guarded})")
  return path


def measure(workdir: str, iteration: int = 0, data_dir: str | None = None,
            download: bool = False, points: int = 20, max_fraction: float = 0.95,
            layers: list[str] | None = None, ks: tuple[int, ...] | None = None,
            budget: float = 0.001, budget_mode: str = "per_layer", out: str | None = None,
            batch_size: int = 500) -> dict:
  """Sweeps a checkpoint, chooses qualities and writes the files.

  Returns {'result', 'choice', 'paths', 'iteration', 'config', 'seconds'}. Raises UserError for
  bad input before any file is written.
  """
  t0 = time.perf_counter()
  fractions = sensitivity.fraction_grid(points, max_fraction)
  if batch_size < 1:
    raise UserError(f"eval_batch_size must be >= 1, got {batch_size}")
  if budget_mode not in sensitivity.BUDGET_MODES:
    raise UserError(f"budget_mode must be per_layer or total, got '{budget_mode}'")
  if not (math.isfinite(budget) and budget >= 0):
    raise UserError(f"budget must be a finite number >= 0, got {budget}")
  out_dir = _check_out(out, workdir)
  iteration, config = _checkpoint(workdir, iteration)
  state = pipeline.restore_iteration(workdir, config, iteration)
  split, data = resident.decision_split(config, data_dir, download)
  model_fn = network_lib.build(state["network"], jax.random.PRNGKey(0), abstract=True).model_fn
  result = sensitivity.sweep(model_fn, state["params"], state["masks"], data.images, data.labels,
                             layers=layers or None, fractions=fractions, ks=ks,
                             batch_size=batch_size, std_of=config.std_of,
                             model_state=state.get("model_state") or None)
  choice = sensitivity.choose_qualities(result, budget, budget_mode)
  paths = sensitivity.write_all(result, out_dir, choice)
  return {"result": result, "choice": choice, "paths": paths, "iteration": iteration,
          "config": config, "split": split, "seconds": time.perf_counter() - t0}


def table(result: sensitivity.SweepResult, k: int = 1) -> str:
  """Top-k error (%) per fraction (rows) and layer (columns)."""
  col = result.column(k)
  names = list(result.layers)
  width = max(8, *(len(n) + 2 for n in names))
  lines = [f"{'pruned':>8}" + "".join(f"{n:>{width}}" for n in names) +
           f"   (top-{k} error %, baseline {100 * result.baseline[col]:.2f}%)"]
  for i, f in enumerate(result.fractions):
    lines.append(f"{100 * f:7.1f}%" + "".join(
        f"{100 * result.layers[n].errors[i, col]:>{width}.2f}" for n in names))
  return "\n".join(lines)


def choice_table(result: sensitivity.SweepResult, choice: sensitivity.Choice) -> str:
  header = (f"{'layer':<10}{'weights':>10}{'surviving':>11}{'pruned':>9}{'quality':>9}"
            f"{'density':>9}{'d_top1':>9}")
  lines = [header]
  for name, layer in result.layers.items():
    lines.append(f"{name:<10}{layer.weights:>10,}{layer.surviving:>11,}"
                 f"{100 * choice.fractions[name]:>8.1f}%{choice.qualities[name]:>9.3f}"
                 f"{100 * choice.densities[name]:>8.1f}%"
                 f"{100 * choice.error_increase[name]:>+8.2f}%")
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("lwc").setLevel(logging.WARNING)
  try:
    out = measure(FLAGS.workdir, FLAGS.iteration, FLAGS.data_dir, FLAGS.download, FLAGS.points,
                  FLAGS.max_fraction, FLAGS.layers, _ints(FLAGS.top_k, "--top_k"), FLAGS.budget,
                  FLAGS.budget_mode, FLAGS.out, FLAGS.eval_batch_size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  result, choice = out["result"], out["choice"]
  print(f"{out['config'].model} iteration {out['iteration']} of {FLAGS.workdir}, "
        f"{result.num_examples:,} {out['split']} images"
        + (" (the run had --decide_on_test: the TEST split chooses these qualities)"
           if out["split"] == "test" else ""))
  print(table(result))
  print(f"sweep: {len(result.layers)} layers x {len(result.fractions)} points in "
        f"{result.seconds:.1f} s (compilation included); {out['seconds']:.1f} s with restore "
        "and data loading")
  budget = (f"{100 * choice.budget:.3g} points of top-1 error per layer"
            if choice.mode == "per_layer" else
            f"{100 * choice.budget:.3g} points in total ({100 * choice.per_layer_budget:.3g} "
            "per layer)")
  print(f"largest fraction within {budget}: predicted density "
        f"{100 * choice.total_density:.1f}% after one pruning without retraining")
  print(choice_table(result, choice))
  print(choice.flag_line())
  print(f"wrote {', '.join(out['paths'].values())}")


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
