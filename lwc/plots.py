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
  from lwc import layers as layers_lib
  out_dir = files.makedirs(os.path.join(workdir, "figures"))
  names = {path: name for name, (path, _) in layers_lib.prunable_leaves(dense_params).items()}
  leaf = lambda tree: {names[path]: np.asarray(x) for path, x in
                       layers_lib.leaves_with_path(tree) if path in names}
  kernels, first, final, trained = (leaf(t) for t in (dense_params, first_masks, final_masks,
                                                      final_params))
  layer = layer or max(kernels, key=lambda k: kernels[k].size)
  paths = []
  for name in kernels:
    mask = final[name]
    if mask.ndim == 2:
      stem = name.replace("/", "_")
      paths.append(sparsity_pattern(mask, os.path.join(out_dir, f"sparsity_{stem}.png"),
                                    f"{name}: non-zero weights after pruning, {mask.sum():,} of "
                                    f"{mask.size:,} ({100 * mask.mean():.1f}%)"))
  before = kernels[layer]
  after_prune = np.where(first[layer], before, 0.0)
  after_retrain = trained[layer]
  paths.append(weight_histograms(before, after_prune, after_retrain,
                                 os.path.join(out_dir, f"histogram_{layer.replace('/', '_')}.png"),
                                 layer))
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


def seeds_error_vs_compression(histories: dict, path: str, published: list[dict] = (),
                               title: str = "") -> str:
  """Test error against compression (log x) of several seeds of one run: each seed's iterations
  (after retraining) as a line with markers, and published results as labelled markers.

  `histories` maps a seed to its summary's iteration rows (compression, test_error as a
  fraction); `published` holds dicts of method, compression, test_error (a fraction, or None
  when the paper gives no number: drawn as a labelled vertical dotted line) and
  dense_test_error."""
  fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (seed, history) in enumerate(sorted(histories.items())):
    ax.plot([h["compression"] for h in history], [100 * h["test_error"] for h in history],
            "o-", ms=4, lw=1.2, color=colors[i % len(colors)], alpha=0.85, label=f"seed {seed}")
  shapes = "s^Dvp*"
  for j, p in enumerate(published):
    if p.get("test_error") is None:
      ax.axvline(p["compression"], ls=":", color="k", lw=1,
                 label=f"{p['method']}: {p['compression']:g}x ({p.get('note', 'no error given')})")
      continue
    dense = (f", dense {100 * p['dense_test_error']:.2f}%"
             if p.get("dense_test_error") is not None else "")
    ax.plot(p["compression"], 100 * p["test_error"], shapes[j % len(shapes)], ms=8,
            mfc="none", mew=1.5, color="k",
            label=f"{p['method']}: {p['compression']:g}x at {100 * p['test_error']:.2f}%{dense}")
  ax.set_xscale("log")
  from matplotlib import ticker
  xs = [h["compression"] for hs in histories.values() for h in hs]
  xs += [p["compression"] for p in published]
  narrow = bool(xs) and max(xs) < 10 * min(xs)  # under a decade: more labelled ticks
  subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("compression (weights / nonzero weights)")
  ax.set_ylabel("test error (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path
