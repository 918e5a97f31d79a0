"""Accuracy against parameters pruned away (paper section 5, Figure 5): five trade-off lines.

  1. L1 regularisation, pruned without retraining;  2. L2, without retraining;
  3. L1, pruned and retrained;                       4. L2, pruned and retrained;
  5. L2, iterative pruning: prune + retrain repeatedly, one point per iteration.

Two dense models are trained with `lwc.pipeline.run` (iterations=0), one with L1 and one with L2
regularisation, everything else from the base Config. For each requested fraction f, every
prunable layer loses the round(f * n) smallest-|w| of its n weights (`prune_to_fraction`; the same
fraction per layer, so f is also the fraction of all weights removed). The cut is expressed as the
pipeline's rule, |w| < q * std(survivors), with q = (midpoint between the largest removed and the
smallest kept |w|) / std, and the pruned model is made by `lwc.masks.prune` at those q: the
no-retraining point is exactly the model that the retraining sub-run starts from.

Sub-runs, all under the workdir and each resumable (`run_or_reuse` skips a finished one):

  dense_l1/, dense_l2/                  iterations=0 (dense training only)
  retrain_l1_f0.5000/, retrain_l2_...   init_checkpoint=dense_*:0, dense_epochs=0, iterations=1,
                                        layer_qualities = the q above; regularisation as dense
  iterative_l2/                         init_checkpoint=dense_l2:0, dense_epochs=0, iterations=K,
                                        the base Config's qualities every iteration

"Pruned" counts prunable weights (kernels) only; biases are never pruned. Accuracy loss is the
test error minus the error of the line's own dense model, in percentage points (> 0 = worse).
Outputs: tradeoff.csv, tradeoff.json, tradeoff.md and tradeoff.png in the workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwc import checkpoints as ckpt_lib
from lwc import files
from lwc import masks as masks_lib
from lwc import pipeline, sensitivity
from lwc import train as train_lib
from lwc.data import load_dataset
from lwc.errors import UserError
from lwc.models import get_model

log = logging.getLogger("lwc")

PyTree = Any
REGULARIZERS = ("l1", "l2")
LINES = ("l1_no_retrain", "l2_no_retrain", "l1_retrain", "l2_retrain", "l2_iterative")
LABELS = {
    "l1_no_retrain": "L1 regularization w/o retrain",
    "l2_no_retrain": "L2 regularization w/o retrain",
    "l1_retrain": "L1 regularization w/ retrain",
    "l2_retrain": "L2 regularization w/ retrain",
    "l2_iterative": "L2 regularization w/ iterative prune and retrain",
}
# Paper Figure 5: dashed = no retraining, solid = retraining, red with filled circles = iterative.
_OPEN = {"markerfacecolor": "none"}
STYLES = {
    "l1_no_retrain": {"color": "tab:blue", "linestyle": "--", "marker": "s", **_OPEN},
    "l2_no_retrain": {"color": "tab:purple", "linestyle": "--", "marker": "^", **_OPEN},
    "l1_retrain": {"color": "goldenrod", "linestyle": "-", "marker": "s", **_OPEN},
    "l2_retrain": {"color": "tab:green", "linestyle": "-", "marker": "o", **_OPEN},
    "l2_iterative": {"color": "tab:red", "linestyle": "-", "marker": "o"},
}
DEFAULT_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97)
# Config fields that do not change what a sub-run computes (paths, logging, speed knobs).
_NOT_COMPARED = frozenset({"data_dir", "download", "init_checkpoint", "tensorboard",
                           "log_every_seconds", "checkpoint_every_steps", "eval_batch_size",
                           "steps_per_call"})
# Fields a dense-only sub-run (iterations=0) never uses: changing them keeps it reusable.
_RETRAIN_ONLY = frozenset({"retrain_epochs", "final_retrain_epochs", "retrain_lr_scale",
                           "retrain_lr_schedule", "retrain_regularization",
                           "retrain_reg_strength", "qualities",
                           "layer_qualities", "prune_groups", "probabilistic_pruning", "std_of",
                           "remove_dead_neurons"})


@dataclasses.dataclass(frozen=True)
class Strengths:
  """Penalty strengths of the two regularisers: dense training and retraining.

  L2: the LeNet flagfiles' 5e-4 and 1e-4. L1 (the paper gives none): 1e-4 dense, 2e-5 retrain
  (the same 5:1 ratio); docs/tradeoff.md has the dense errors of other L1 strengths.
  """

  l1: float = 1e-4
  l1_retrain: float = 2e-5
  l2: float = 5e-4
  l2_retrain: float = 1e-4

  def of(self, kind: str) -> tuple[float, float]:
    """(dense, retrain) strength of 'l1' or 'l2'."""
    return (self.l1, self.l1_retrain) if kind == "l1" else (self.l2, self.l2_retrain)

  def validate(self) -> None:
    for name, value in dataclasses.asdict(self).items():
      if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name} regularization strength must be a finite number >= 0, "
                        f"got {value}")


@dataclasses.dataclass(frozen=True)
class Pruned:
  """A model with every prunable layer cut to the same fraction. Dicts are keyed by layer.

  params, masks: NumPy pytrees as `lwc.masks.prune` returns them (pruned entries exactly 0.0).
  qualities: q per layer for the pipeline's |w| < q * std rule, realising the cut.
  weights: entries per layer; target: round(fraction * survivors) to remove; removed: removed
  by `lwc.masks.prune` at `qualities` (equal to target barring |w| ties at the cut or a
  float32 rounding of q * std onto a neighbour, i.e. within a weight or two).
  """

  fraction: float
  params: PyTree
  masks: PyTree
  qualities: dict[str, float]
  weights: dict[str, int]
  target: dict[str, int]
  removed: dict[str, int]

  @property
  def total(self) -> int:
    return sum(self.weights.values())

  @property
  def nonzero(self) -> int:
    return self.total - sum(self.removed.values())

  @property
  def pruned_fraction(self) -> float:
    """Removed / all prunable weights (the x axis)."""
    return sum(self.removed.values()) / max(self.total, 1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  """The fractions as sorted unique floats; UserError unless non-empty and each in [0, 1)."""
  out = []
  for f in fractions:
    try:
      f = float(f)
    except (TypeError, ValueError):
      raise UserError(f"fraction '{f}' is not a number") from None
    if not 0.0 <= f < 1.0:
      raise UserError(f"fractions must be in [0, 1), got {f}")
    out.append(f)
  if not out:
    raise UserError("no fraction to prune to")
  return tuple(sorted(set(out)))


def prune_to_fraction(params: PyTree, masks: PyTree, fraction: float,
                      std_of: str = "survivors") -> Pruned:
  """Removes round(fraction * n) of the n surviving weights of every prunable layer, smallest
  |w| first, through the pipeline's own rule (`lwc.masks.prune` at per-layer qualities).

  Args:
    params, masks: trained weights and bool masks (all True for a dense model).
    fraction: in [0, 1), of each layer's survivors.
    std_of: the std of the threshold rule, as `pipeline.Config.std_of`.

  Returns:
    Pruned; its masks are a subset of `masks`.
  """
  params, masks = jax.device_get((params, masks))
  stds = {k: float(v) for k, v in
          masks_lib.layer_thresholds(params, masks, 1.0, std_of).items()}
  qualities, weights, target = {}, {}, {}
  for name, (_, w, m) in sensitivity.prunable_with_masks(params, masks).items():
    k = sensitivity.removed_count(fraction, int(m.sum()))
    sorted_abs = np.sort(np.abs(np.asarray(w, np.float64)[m]))
    threshold = sensitivity._equivalent_threshold(sorted_abs, k)  # pylint: disable=protected-access
    qualities[name] = threshold / stds[name] if threshold > 0 and stds[name] > 0 else 0.0
    weights[name], target[name] = int(np.size(w)), k
  new_params, new_masks = masks_lib.prune(params, masks, qualities, std_of)
  new_params, new_masks = jax.device_get((new_params, new_masks))
  before = masks_lib.layer_counts(masks)
  after = masks_lib.layer_counts(new_masks)
  removed = {name: before[name]["nonzero"] - after[name]["nonzero"] for name in qualities}
  return Pruned(fraction=float(fraction), params=new_params, masks=new_masks,
                qualities=qualities, weights=weights, target=target, removed=removed)


def dense_config(base: pipeline.Config, kind: str, strengths: Strengths) -> pipeline.Config:
  """Dense training only, with regulariser `kind` ('l1' or 'l2')."""
  dense, retrain = strengths.of(kind)
  return base.replace(iterations=0, regularization=kind, reg_strength=dense,
                      retrain_regularization=kind, retrain_reg_strength=retrain,
                      remove_dead_neurons=False)


def retrain_config(base: pipeline.Config, kind: str, strengths: Strengths, dense_dir: str,
                   qualities: dict[str, float]) -> pipeline.Config:
  """One prune (at `qualities`, per layer) + retrain from the dense model of `dense_dir`."""
  dense, retrain = strengths.of(kind)
  return base.replace(init_checkpoint=f"{os.path.abspath(dense_dir)}:0", dense_epochs=0,
                      iterations=1, qualities=(1.0,),
                      layer_qualities={k: (float(v),) for k, v in qualities.items()},
                      prune_groups=("all",), probabilistic_pruning=False, regularization=kind,
                      reg_strength=dense, retrain_regularization=kind,
                      retrain_reg_strength=retrain, remove_dead_neurons=False)


def iterative_config(base: pipeline.Config, strengths: Strengths, dense_dir: str,
                     iterations: int) -> pipeline.Config:
  """`iterations` prune + retrain rounds at the base Config's qualities, from the L2 dense model."""
  dense, retrain = strengths.of("l2")
  return base.replace(init_checkpoint=f"{os.path.abspath(dense_dir)}:0", dense_epochs=0,
                      iterations=iterations, regularization="l2", reg_strength=dense,
                      retrain_regularization="l2", retrain_reg_strength=retrain,
                      remove_dead_neurons=False)


def _compared(config_json: dict, dense_only: bool) -> dict:
  ignored = _NOT_COMPARED | (_RETRAIN_ONLY if dense_only else frozenset())
  return {k: v for k, v in config_json.items() if k not in ignored}


def _existing_config(workdir: str) -> dict | None:
  """The config a sub-run was started with: from summary.json, else its latest checkpoint."""
  summary = os.path.join(workdir, "summary.json")
  if os.path.isfile(summary):
    with open(summary) as f:
      return json.load(f)["config"]
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    latest = checkpoints.latest_iteration()
    return None if latest is None else checkpoints.meta(latest).get("config")
  finally:
    checkpoints.close()


def run_or_reuse(config: pipeline.Config, workdir: str, label: str) -> tuple[dict, bool]:
  """(summary, reused): the finished sub-run in `workdir` if it was made with `config`, else
  `pipeline.run` (which resumes a partial one).

  Raises UserError if `workdir` holds a run of other settings (those named in the message).
  """
  old = _existing_config(workdir)
  if old is not None:
    want = _compared(json.loads(json.dumps(config.to_json())), config.iterations == 0)
    have = _compared(old, config.iterations == 0)
    changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if changed:
      raise UserError(f"{workdir} holds a run with other settings ({', '.join(changed)}); "
                      "delete it or use another --workdir")
    path = os.path.join(workdir, "summary.json")
    if os.path.isfile(path):
      with open(path) as f:
        summary = json.load(f)
      if len(summary["iterations"]) == config.iterations + 1:
        log.info("%s: reusing the finished sub-run %s", label, workdir)
        return summary, True
  log.info("%s: running %s", label, workdir)
  return pipeline.run(config, workdir), False


class Evaluator:
  """Top-1 test error of params on the whole test split, by the pipeline's own jitted
  evaluation (same function, devices and batch size, so the numbers match its records)."""

  def __init__(self, config: pipeline.Config):
    _, test = load_dataset(config.dataset, config.data_dir, config.download)
    self.parallel = train_lib.Parallel.over_all_devices()
    self.images = self.parallel.replicate(jnp.asarray(test.images))
    self.labels = self.parallel.replicate(jnp.asarray(test.labels))
    self.batch_size = config.eval_batch_size

  def error(self, params: PyTree, network) -> float:
    """Test error of `params` in the network a checkpoint records (`lwc.network.Network`)."""
    import jax

    from lwc import network as network_lib
    model_fn = network_lib.build(network, jax.random.PRNGKey(0), abstract=True).model_fn
    return self.parallel.evaluate(model_fn, self.parallel.replicate(params), self.images,
                                  self.labels, self.batch_size)["error"]


def _point(line: str, fraction: float | None, pruned: float, nonzero: int, total: int,
           error: float, dense_error: float, **extra) -> dict:
  return {"line": line, "fraction": fraction, "pruned": pruned, "nonzero": nonzero,
          "total": total, "test_error": error, "dense_error": dense_error,
          "loss_pp": 100 * (error - dense_error), **extra}


def _layer_nonzero(summary: dict, iteration: int) -> dict[str, int]:
  return {k: v["nonzero"] for k, v in summary["iterations"][iteration]["layers"].items()}


def _prepare_run(base: pipeline.Config, workdir: str, fractions: Sequence[float],
                 iterative_iterations: int, strengths: Strengths) -> tuple[float, ...]:
  """`run`'s checks, all before any training (UserError on bad settings); creates `workdir`.

  Returns the fractions, sorted and unique (`check_fractions`).
  """
  fractions = check_fractions(fractions)
  if iterative_iterations < 0:
    raise UserError(f"iterative_iterations must be >= 0, got {iterative_iterations}")
  strengths.validate()
  if base.dataset != "mnist":
    raise UserError(f"the trade-off experiment evaluates MNIST models only, got dataset "
                    f"'{base.dataset}'")
  configs = [dense_config(base, kind, strengths) for kind in REGULARIZERS]
  if iterative_iterations:
    configs.append(iterative_config(base, strengths, workdir, iterative_iterations))
  for config in configs:  # bad settings fail here, before any training
    config.validate()
  get_model(base.model)
  os.makedirs(workdir, exist_ok=True)
  return fractions


def _no_retrain_point(kind: str, f: float, state: dict, dense_error: float,
                      evaluator: Evaluator, std_of: str) -> tuple[Pruned, dict]:
  """(the pruned model, its '{kind}_no_retrain' point): the dense model of `state` (its params
  and masks) with every layer cut to fraction `f`, evaluated as it is."""
  label = f"{kind} f={f:g}"
  pruned = prune_to_fraction(state["params"], state["masks"], f, std_of)
  off = {k: pruned.removed[k] - pruned.target[k] for k in pruned.target
         if pruned.removed[k] != pruned.target[k]}
  if off:
    log.warning("%s: the threshold rule removes %s weights more than round(f*n)", label, off)
  error = evaluator.error(pruned.params, state["network"])
  point = _point(f"{kind}_no_retrain", f, pruned.pruned_fraction, pruned.nonzero, pruned.total,
                 error, dense_error, qualities=pruned.qualities,
                 target_pruned=sum(pruned.target.values()) / pruned.total)
  log.info("%s without retraining: %.2f%% pruned, test error %.2f%% (%+.2f points)", label,
           100 * pruned.pruned_fraction, 100 * error, 100 * (error - dense_error))
  return pruned, point


def _retrain_point(base: pipeline.Config, kind: str, strengths: Strengths, dense_dir: str,
                   sub: str, f: float, pruned: Pruned, dense_error: float) -> tuple[dict, bool]:
  """(the '{kind}_retrain' point, reused): the sub-run in `sub` that prunes the dense model of
  `dense_dir` at `pruned.qualities` and retrains it."""
  label = f"{kind} f={f:g}"
  summary, reused = run_or_reuse(
      retrain_config(base, kind, strengths, dense_dir, pruned.qualities), sub,
      f"{label} retrain")
  got = _layer_nonzero(summary, 1)
  want = {k: pruned.weights[k] - pruned.removed[k] for k in pruned.weights}
  if got != want:
    log.warning("%s: the sub-run kept %s weights per layer, the no-retraining point %s",
                label, got, want)
  final = summary["final"]
  point = _point(
      f"{kind}_retrain", f, 1 - final["params_nonzero"] / final["params_total"],
      final["params_nonzero"], final["params_total"], final["test_error"], dense_error,
      error_after_prune=final["test_error_after_prune"], layers_nonzero=got,
      seconds=summary["wall_seconds"], workdir=sub)
  log.info("%s with retraining: %.2f%% pruned, test error %.2f%% (%+.2f points)", label,
           100 * point["pruned"], 100 * final["test_error"], point["loss_pp"])
  return point, reused


def _regularizer_lines(base: pipeline.Config, kind: str, strengths: Strengths, workdir: str,
                       fractions: tuple[float, ...], evaluator: Evaluator
                       ) -> tuple[float, list[dict], dict[str, bool]]:
  """Lines '{kind}_no_retrain' and '{kind}_retrain' from the dense model of regulariser `kind`.

  Returns (the dense test error, the points: per fraction the no-retraining one then the
  retraining one, {sub-run dir: reused} in the order they ran, the dense one first).
  """
  dense_dir = os.path.join(workdir, f"dense_{kind}")
  config = dense_config(base, kind, strengths)
  subruns = {}
  summary, subruns[dense_dir] = run_or_reuse(config, dense_dir, f"dense {kind}")
  dense_error = summary["final"]["test_error"]
  log.info("dense %s: test error %.2f%%", kind, 100 * dense_error)
  state = pipeline.restore_iteration(dense_dir, config, 0)
  points = []
  for f in fractions:
    pruned, point = _no_retrain_point(kind, f, state, dense_error, evaluator, base.std_of)
    points.append(point)
    sub = os.path.join(workdir, f"retrain_{kind}_f{f:.4f}")
    point, subruns[sub] = _retrain_point(base, kind, strengths, dense_dir, sub, f, pruned,
                                         dense_error)
    points.append(point)
  return dense_error, points, subruns


def _iterative_line(base: pipeline.Config, strengths: Strengths, workdir: str, iterations: int,
                    dense_error: float) -> tuple[list[dict], dict[str, bool]]:
  """Line 'l2_iterative': ([a point per prune + retrain iteration, 1..iterations], {sub-run dir:
  reused}), from the L2 dense model, whose test error is `dense_error`."""
  sub = os.path.join(workdir, "iterative_l2")
  summary, reused = run_or_reuse(
      iterative_config(base, strengths, os.path.join(workdir, "dense_l2"), iterations), sub,
      "iterative l2")
  points = []
  for record in summary["iterations"][1:]:
    point = _point(
        "l2_iterative", None, 1 - record["params_nonzero"] / record["params_total"],
        record["params_nonzero"], record["params_total"], record["test_error"], dense_error,
        iteration=record["iteration"], error_after_prune=record["test_error_after_prune"],
        quality=record["quality"], seconds=record["seconds"])
    points.append(point)
    log.info("iterative l2 iteration %d: %.2f%% pruned, test error %.2f%% (%+.2f points)",
             record["iteration"], 100 * point["pruned"], 100 * record["test_error"],
             point["loss_pp"])
  return points, {sub: reused}


def run(base: pipeline.Config, workdir: str, fractions: Sequence[float] = DEFAULT_FRACTIONS,
        iterative_iterations: int = 6, strengths: Strengths = Strengths()) -> dict:
  """Runs (or resumes, reusing finished sub-runs) every sub-run and writes the table and plot.

  Args:
    base: the experiment's Config (flagfile); its regularisation fields are replaced per line.
    workdir: the folder of the sub-runs and outputs.
    fractions: per-layer fractions pruned for lines 1-4, each in [0, 1).
    iterative_iterations: K, the prune + retrain rounds (points) of line 5; 0 leaves it out.
    strengths: regularisation strengths of the L1 and L2 lines.

  Returns:
    {'points': [row dicts, see `_point`], 'dense': {kind: error}, 'subruns': {dir: reused},
     'paths': {csv, json, md, png}, 'seconds': wall time of this call, ...}.
  """
  t0 = time.perf_counter()
  fractions = _prepare_run(base, workdir, fractions, iterative_iterations, strengths)
  evaluator = Evaluator(base)
  points, dense, subruns = [], {}, {}
  for kind in REGULARIZERS:
    dense[kind], line_points, line_subruns = _regularizer_lines(base, kind, strengths, workdir,
                                                                fractions, evaluator)
    points += line_points
    subruns.update(line_subruns)
  if iterative_iterations:
    line_points, line_subruns = _iterative_line(base, strengths, workdir, iterative_iterations,
                                                dense["l2"])
    points += line_points
    subruns.update(line_subruns)

  result = {"model": base.model, "fractions": list(fractions),
            "iterative_iterations": iterative_iterations,
            "strengths": dataclasses.asdict(strengths), "config": base.to_json(),
            "dense": dense, "points": points, "subruns": subruns,
            "seconds": time.perf_counter() - t0}
  result["paths"] = write_all(result, workdir)
  return result


# ---------------------------------------------------------------------------------------------
# Outputs.

CSV_FIELDS = ("line", "fraction", "iteration", "pruned", "nonzero", "total", "test_error",
              "dense_error", "loss_pp", "error_after_prune")


def write_csv(result: dict, path: str) -> str:
  with files.atomic_open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for p in result["points"]:
      writer.writerow({k: p.get(k, "") if p.get(k) is not None else "" for k in CSV_FIELDS})
  return path


def markdown(result: dict) -> str:
  """Two tables: lines 1-4 by requested fraction, and the iterative line by iteration."""
  by = {(p["line"], p["fraction"]): p for p in result["points"]}
  dense = result["dense"]
  lines = [(f"Dense test error: L1 {100 * dense['l1']:.2f}%, L2 {100 * dense['l2']:.2f}%. "
            "Cells: accuracy loss = test error minus the dense model's, in percentage points "
            "(test error in brackets)."), "",
           "| pruned | " + " | ".join(LABELS[k] for k in LINES[:4]) + " |",
           "|---|" + "---|" * 4]
  for f in result["fractions"]:
    realised = by[("l2_retrain", f)]["pruned"]
    cells = []
    for line in LINES[:4]:
      p = by.get((line, f))
      cells.append("-" if p is None else f"{p['loss_pp']:+.2f} ({100 * p['test_error']:.2f}%)")
    lines.append(f"| {100 * realised:.2f}% | " + " | ".join(cells) + " |")
  iterative = [p for p in result["points"] if p["line"] == "l2_iterative"]
  if iterative:
    lines += ["", f"{LABELS['l2_iterative']}:", "",
              ("| iteration | pruned | nonzero / total | error after pruning | test error | "
               "accuracy loss |"), "|---|---|---|---|---|---|"]
    for p in iterative:
      lines.append(f"| {p['iteration']} | {100 * p['pruned']:.2f}% | {p['nonzero']:,} / "
                   f"{p['total']:,} | {100 * p['error_after_prune']:.2f}% | "
                   f"{100 * p['test_error']:.2f}% | {p['loss_pp']:+.2f} |")
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
  """Figure 5: accuracy loss (points, worse downwards as in the paper) against parameters pruned
  away (%): left the paper's range (loss <= 4.5 points), right every point (symlog scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120)
  losses = [p["loss_pp"] for p in result["points"]]
  for ax, zoom in zip(axes, (True, False)):
    for line in LINES:
      pts = sorted((p for p in result["points"] if p["line"] == line), key=lambda p: p["pruned"])
      if pts:
        ax.plot([100 * p["pruned"] for p in pts], [p["loss_pp"] for p in pts],
                label=LABELS[line], linewidth=1.5, markersize=5, **STYLES[line])
    ax.axhline(0, color="gray", linewidth=0.8, linestyle=":")
    if zoom:
      ax.set_ylim(4.5, min(-0.5, min(losses, default=0.0) - 0.1))  # inverted: worse is down
      ax.set_title(f"{result['model']}: accuracy loss up to 4.5 points (paper's range)")
    else:
      ax.set_yscale("symlog", linthresh=1.0)
      ax.set_ylim(max(1.0, 1.5 * max(losses, default=0.0)),
                  min(-0.3, min(losses, default=0.0) - 0.1))
      ax.set_title(f"{result['model']}: every point (symlog)")
    ax.set_xlabel("parameters pruned away (%)")
    ax.set_ylabel("accuracy loss (percentage points, worse downwards)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path


def write_all(result: dict, out_dir: str) -> dict[str, str]:
  """tradeoff.csv, tradeoff.json, tradeoff.md and tradeoff.png into out_dir."""
  paths = {"csv": os.path.join(out_dir, "tradeoff.csv"),
           "json": os.path.join(out_dir, "tradeoff.json"),
           "md": os.path.join(out_dir, "tradeoff.md"),
           "png": os.path.join(out_dir, "tradeoff.png")}
  write_csv(result, paths["csv"])
  files.atomic_write_json(paths["json"], {**result, "paths": paths}, indent=1)
  files.atomic_write_text(paths["md"], markdown(result))
  plot(result, paths["png"])
  return paths
