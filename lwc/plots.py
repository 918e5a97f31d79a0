"""Figures people look at: sparsity pattern (paper Figure 4) and weight histograms (Figure 7).

Matplotlib with the headless Agg backend; every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lwc import files  # noqa: E402


def sparsity_pattern(mask: np.ndarray, path: str, title: str = "") -> str:
  """Figure 4: non-zero entries of a (inputs, outputs) kernel, inputs along the x axis.

  For LeNet-300-100's fc1 (784 x 300) the 28 bands of 28 pixels show which image rows survive.
  """
  mask = np.asarray(mask).reshape(-1, np.shape(mask)[-1])
  fig, ax = plt.subplots(figsize=(10, 4), dpi=120)
  ax.imshow(mask.T, aspect="auto", cmap="Blues", interpolation="nearest")
  ax.set_xlabel(f"input index ({mask.shape[0]})")
  ax.set_ylabel(f"output unit ({mask.shape[1]})")
  ax.set_title(title or f"non-zero weights: {mask.sum():,} of {mask.size:,} "
               f"({100 * mask.mean():.1f}%)")
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path


def weight_histograms(before: np.ndarray, after_prune: np.ndarray, after_retrain: np.ndarray,
                      path: str, layer: str = "", bins: int = 200) -> str:
  """Figure 7: a layer's weights before pruning, after pruning, after retraining.

  Pruned (zero) weights are left out of the last two panels, as in the paper.
  """
  panels = [("before pruning", np.ravel(before)),
            ("after the first pruning", np.ravel(after_prune)[np.ravel(after_prune) != 0]),
            ("after the last retraining", np.ravel(after_retrain)[np.ravel(after_retrain) != 0])]
  # Any panel may be empty (a layer pruned away entirely): the range comes from those that
  # are not, and is never empty itself.
  lim = max([float(np.max(np.abs(p))) for _, p in panels if p.size], default=0.0) or 1.0
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), dpi=120)
  for ax, (name, w) in zip(axes, panels):
    ax.hist(w, bins=bins, range=(-lim, lim), color="tab:blue")
    ax.set_title(f"{layer} {name} ({w.size:,} weights)".strip())
    ax.set_xlabel("weight value")
  axes[0].set_ylabel("count")
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path


def write_run_figures(workdir: str, dense_params: dict, first_masks: dict, final_params: dict,
                      final_masks: dict, layer: str | None = None) -> list[str]:
  """Figure 4 for every 2-D kernel of the final masks and Figure 7 for `layer` (default: the
  largest layer), into `workdir/figures/`."""
  out_dir = files.makedirs(os.path.join(workdir, "figures"))
  kernels = {name: np.asarray(p["kernel"]) for name, p in dense_params.items() if "kernel" in p}
  layer = layer or max(kernels, key=lambda k: kernels[k].size)
  paths = []
  for name in kernels:
    mask = np.asarray(final_masks[name]["kernel"])
    if mask.ndim == 2:
      paths.append(sparsity_pattern(mask, os.path.join(out_dir, f"sparsity_{name}.png"),
                                    f"{name}: non-zero weights after pruning, {mask.sum():,} of "
                                    f"{mask.size:,} ({100 * mask.mean():.1f}%)"))
  before = kernels[layer]
  after_prune = np.where(np.asarray(first_masks[layer]["kernel"]), before, 0.0)
  after_retrain = np.asarray(final_params[layer]["kernel"])
  paths.append(weight_histograms(before, after_prune, after_retrain,
                                 os.path.join(out_dir, f"histogram_{layer}.png"), layer))
  return paths


def error_vs_compression(history: list[dict], path: str, dense_budget: float | None = None,
                         title: str = "") -> str:
  """Test error against compression, one point per iteration (after pruning: open circles,
  after retraining: filled), with the error budget as a dashed line when given."""
  compression = [h["compression"] for h in history]
  error = [100 * h["test_error"] for h in history]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  pruned = [(h["compression"], 100 * h["test_error_after_prune"]) for h in history
            if "test_error_after_prune" in h]
  if pruned:
    ax.plot(*zip(*pruned), "o", mfc="none", color="tab:gray", label="after pruning")
  ax.plot(compression, error, "o-", color="tab:red", label="after retraining")
  if dense_budget is not None:
    ax.axhline(100 * dense_budget, ls="--", color="k", lw=1, label="error budget")
  ax.set_xscale("log")
  ax.set_xlabel("compression (weights before / nonzero weights after)")
  ax.set_ylabel("test error (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path
