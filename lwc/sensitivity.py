"""Per-layer pruning sensitivity (paper section 5, Figure 6) and thresholds chosen from it.

`sweep` prunes ONE layer at a time, without retraining, removing a growing fraction of that
layer's surviving weights (smallest |w| first) while every other layer keeps its weights and
masks, and measures the top-k test error at each point. `choose_qualities` turns the curves into
one pruning quality per layer (threshold = quality * std of the layer's surviving weights, the
rule of `lwc.masks.prune`): the largest fraction whose error increase stays within a budget, so
that the most sensitive layer gets the smallest threshold, as the paper does for conv1 of AlexNet.

Removal order: the surviving weights of a layer are ranked by |w| (ascending, ties broken by flat
index); fraction f removes the `removed_count(f, n)` = round(f * n) lowest ranked of the n
survivors, exactly, whatever the ties. The equivalent threshold reported for a point is the
midpoint between the largest removed and the smallest kept |w|, so `|w| < threshold` selects the
same weights (unless the two are equal) and quality = threshold / std reproduces the point with
the pipeline's q * std rule.

Any model: `apply_fn` is a model function (`lwc.model_fn`: a Linen module's `apply`,
`lwc.linen_model(...)`, `lwc.nnx_model(...)[0]`), evaluated in eval mode with `model_state` (its
BatchNorm statistics, used as they are: pruning one layer does not recalibrate them). Layers are
the prunable leaves of `lwc.layers` (Dense, Conv, attention DenseGeneral kernels, embeddings).

Speed: every evaluation runs one jitted function per layer, with the layer's rank array, mask and
cut k as arguments (k traced, so one compilation serves every fraction). For a Linen model the
input of each swept layer is computed once, in the baseline pass, and fed to the layer's module
directly in every later pass (`flax.linen.intercept_methods`), so XLA drops the untouched layers
before it; any other model (NNX, a plain function), a weight not owned by a module of its name
(a raw `self.param`) or a module called more than once falls back to the whole forward pass. The
cached inputs of all swept layers are held on device at once.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lwc import files
from lwc import layers as layers_lib
from lwc import masks as masks_lib
from lwc import model_fn as model_fn_lib
from lwc.errors import UserError

PyTree = Any
BUDGET_MODES = ("per_layer", "total")


def fraction_grid(points: int = 20, max_fraction: float = 0.95) -> np.ndarray:
  """`points` evenly spaced fractions from 0 to `max_fraction`: float64 (points,)."""
  if points < 2:
    raise UserError(f"points must be >= 2, got {points}")
  if not 0.0 < max_fraction <= 1.0:
    raise UserError(f"max_fraction must be in (0, 1], got {max_fraction}")
  return np.round(np.linspace(0.0, max_fraction, points), 12)


def removed_count(fraction: float, surviving: int) -> int:
  """round(fraction * surviving), halves rounded up, clipped to [0, surviving]."""
  return int(min(max(math.floor(fraction * surviving + 0.5), 0), surviving))


def survivor_ranks(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Rank of each surviving weight by |w| (0 = smallest; ties by flat index); -1 where pruned.

  Shapes: w, mask (any shape, same); returns int32 of that shape. Removing the k smallest
  survivors keeps exactly `mask & (ranks >= k)`.
  """
  flat_w, flat_m = np.abs(np.ravel(w)), np.ravel(mask).astype(bool)
  idx = np.flatnonzero(flat_m)
  order = idx[np.argsort(flat_w[idx], kind="stable")]
  ranks = np.full(flat_w.shape, -1, np.int32)
  ranks[order] = np.arange(order.size, dtype=np.int32)
  return ranks.reshape(np.shape(w))


def _surviving_std(w: np.ndarray, mask: np.ndarray, std_of: str) -> float:
  """The std `lwc.masks.layer_thresholds` uses: of the survivors (default) or of every entry."""
  w = np.asarray(w, np.float64)
  if std_of == "all":
    return float(np.std(w))
  alive = w[np.asarray(mask, bool)]
  return float(np.std(alive)) if alive.size else 0.0


def _equivalent_threshold(sorted_abs: np.ndarray, k: int) -> float:
  """A threshold t with exactly the k smallest of `sorted_abs` below it; when the k-th and the
  (k+1)-th smallest are equal, every value equal to them is below t too (more than k removed:
  a count such as floor(weights / N) is never exceeded because of a tie)."""
  n = sorted_abs.size
  if k == 0:
    return 0.0
  if k < n and sorted_abs[k] == sorted_abs[k - 1]:
    k = int(np.searchsorted(sorted_abs, sorted_abs[k], side="right"))
  if k >= n:
    return float(np.nextafter(np.float32(sorted_abs[-1]), np.float32(np.inf)))
  return float((np.float64(sorted_abs[k - 1]) + np.float64(sorted_abs[k])) / 2)


def prunable_with_masks(params: PyTree, masks: PyTree,
                        is_prunable: Callable[[Any, Any], bool] = layers_lib.DEFAULT
                        ) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
  """{layer: (keypath, weights, bool mask)} as host arrays, prunable layers in params order
  (`lwc.layers.prunable_leaves`; masks read at the same leaves by `layers.map_prunable`)."""
  params, masks = jax.device_get((layers_lib.as_params(params), layers_lib.as_params(masks)))
  mask_of = {}

  def read(name, w, m):
    mask_of[name] = np.asarray(m, bool)
    return w

  layers_lib.map_prunable(read, params, masks, is_prunable=is_prunable,
                          other=lambda w, m: w)
  return {name: (path, np.asarray(w), mask_of[name])
          for name, (path, w) in layers_lib.prunable_leaves(params, is_prunable).items()}


def _check_layers(layers: Sequence[str] | None, known: Sequence[str]) -> list[str]:
  if layers is None:
    return list(known)
  unknown = sorted(set(layers) - set(known))
  if unknown:
    raise UserError(f"unknown layer(s) {', '.join(unknown)}; prunable layers are "
                    f"{', '.join(known)}")
  if not layers:
    raise UserError("no layer to sweep")
  return [name for name in known if name in layers]


def prune_layer(params: PyTree, masks: PyTree, layer: str, fraction: float,
                is_prunable: Callable[[Any, Any], bool] = layers_lib.DEFAULT
                ) -> tuple[PyTree, PyTree]:
  """Removes the round(fraction * n) smallest-|w| survivors of `layer` only (a sweep point).

  Returns (params, masks) as NumPy pytrees: the layer's new mask is old mask AND (rank >= k);
  its pruned entries are exactly 0.0; every other leaf is returned unchanged (bit for bit).
  """
  kernels = prunable_with_masks(params, masks, is_prunable)
  _check_layers([layer], list(kernels))
  _, w, m = kernels[layer]
  ranks = survivor_ranks(w, m)
  keep = m & (ranks >= removed_count(fraction, int(m.sum())))
  params, masks = layers_lib.as_params(params), layers_lib.as_params(masks)
  new_masks = layers_lib.map_prunable(
      lambda name, _, leaf: keep if name == layer else np.asarray(leaf), params, masks,
      is_prunable=is_prunable, other=lambda _, leaf: np.asarray(leaf))
  new_params = layers_lib.map_prunable(
      lambda name, leaf: np.where(keep, w, np.zeros_like(w)) if name == layer
      else np.asarray(leaf), params, is_prunable=is_prunable, other=np.asarray)
  return new_params, new_masks


@dataclasses.dataclass(frozen=True)
class LayerSweep:
  """One layer's curve. F = number of fractions, K = len(ks).

  Attributes:
    group: the layer's kind in `lwc.layers`: 'conv', 'fc', 'attention' or 'embedding' ('other'
      in results written before those kinds existed).
    weights: entries of the kernel; surviving: its unpruned entries before the sweep.
    std: std of the surviving weights (or of all entries for std_of='all').
    removed: int (F,), survivors removed at each point, round(fraction * surviving).
    thresholds: float (F,), equivalent |w| threshold; qualities: thresholds / std.
    errors: float (F, K), top-k error with this layer pruned and the others untouched.
    losses: float (F,), mean cross-entropy at the same points (None in results written before
      it was measured): a smoother measure of the damage than the error, which moves in whole
      examples.
  """

  name: str
  group: str
  weights: int
  surviving: int
  std: float
  removed: np.ndarray
  thresholds: np.ndarray
  qualities: np.ndarray
  errors: np.ndarray
  losses: np.ndarray | None = None

  @property
  def densities(self) -> np.ndarray:
    """float (F,): surviving weights after each point / all weights of the layer."""
    return (self.surviving - self.removed) / max(self.weights, 1)


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """fractions (F,), ks (K,), baseline top-k errors (K,), one LayerSweep per layer (in order),
  and the baseline's mean cross-entropy (None in results written before it was measured)."""

  fractions: np.ndarray
  ks: tuple[int, ...]
  baseline: np.ndarray
  layers: dict[str, LayerSweep]
  num_examples: int
  std_of: str
  seconds: float
  baseline_loss: float | None = None

  def column(self, k: int) -> int:
    if k not in self.ks:
      raise UserError(f"top-{k} error was not measured (ks = {list(self.ks)})")
    return self.ks.index(k)


def _scores(logits: jax.Array, labels: jax.Array, valid: jax.Array,
            ks: tuple[int, ...]) -> jax.Array:
  """float32 (K + 1,): per k the valid examples whose label is in the top k (top 1 by argmax,
  as lwc.train does; whole numbers, exact in float32 for any batch under 2^24), then their summed
  softmax cross-entropy."""
  true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  above = (logits > true[:, None]).sum(-1)
  hits = [(jnp.argmax(logits, -1) == labels) if k == 1 else (above < k) for k in ks]
  counts = [jnp.sum(h & valid, dtype=jnp.int32).astype(jnp.float32) for h in hits]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.stack([*counts, jnp.sum(jnp.where(valid, losses, 0.0))])


def _batches(images, labels, batch_size: int):
  """Device batches padded to one shape: [(x (B, ...), y (B,), valid (B,) bool)]."""
  n = int(np.shape(labels)[0])
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    x, y = np.asarray(images[start:start + size]), np.asarray(labels[start:start + size])
    valid = np.ones(size, bool)
    if len(y) < size:
      pad = size - len(y)
      valid[len(y):] = False
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    out.append((jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(valid)))
  return out


def _module_path(module) -> str:
  return "/".join(str(p) for p in getattr(module, "path", ()))


def _owned_by_module(path) -> bool:
  """Whether the leaf is a module's own weight (`fc1/kernel`), named by that module's path: only
  then can a Linen module call named like the layer stand for the layer."""
  names = layers_lib.path_names(path)
  return len(names) > 1 and layers_lib.layer_name(path) == "/".join(names[:-1])


def _make_baseline_fn(forward: Callable, layers: list[str], ks: tuple[int, ...], cache: bool):
  """jit (params, model_state, x, y, valid) -> (`_scores` (K + 1,), {layer: its input}) for the
  Linen modules of `layers` called once (none for other models)."""

  def fn(params, model_state, x, y, valid):
    seen: dict[str, list] = {name: [] for name in layers}

    def interceptor(next_fun, args, kwargs, context):
      name = _module_path(context.module)
      if cache and context.method_name == "__call__" and name in seen and args:
        seen[name].append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits, _ = forward(params, model_state, x, train=False)
    inputs = {name: v[0] for name, v in seen.items() if len(v) == 1}
    return _scores(logits, y, valid, ks), inputs

  return jax.jit(fn)


def _make_point_fn(forward: Callable, layer: str, path, ks: tuple[int, ...], use_input: bool):
  """jit (params, model_state, ranks, mask, k, layer_input, x, y, valid) -> `_scores` (K + 1,)
  with the k smallest survivors of `layer` removed (k traced: one compilation for every k).

  (vmapping over k, to stack the cut kernels, ran LeNet-5's conv sweeps 2-3x slower on XLA:CPU.)
  """
  # The leaf is found by its key path (chosen by lwc.layers outside), not re-judged under jit.
  target = jax.tree_util.keystr(path)

  def fn(params, model_state, ranks, mask, k, layer_input, x, y, valid):
    def cut(p, w):
      if jax.tree_util.keystr(p) != target:
        return w
      return jnp.where(mask & (ranks >= k), w, jnp.zeros_like(w))

    params = jax.tree_util.tree_map_with_path(cut, params)

    def interceptor(next_fun, args, kwargs, context):
      if (use_input and context.method_name == "__call__"
          and _module_path(context.module) == layer):
        args = (layer_input, *args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits, _ = forward(params, model_state, x, train=False)
    return _scores(logits, y, valid, ks)

  return jax.jit(fn)


def _check_sweep_args(images, labels, fractions: Sequence[float] | None, batch_size: int,
                      std_of: str) -> tuple[np.ndarray, int]:
  """(fractions as float64 (F,), N examples) of `sweep`'s arguments; UserError on bad ones."""
  if std_of not in ("survivors", "all"):
    raise UserError(f"std_of must be 'survivors' or 'all', got '{std_of}'")
  fractions = fraction_grid() if fractions is None else np.asarray(fractions, np.float64)
  if fractions.ndim != 1 or not fractions.size or np.any((fractions < 0) | (fractions > 1)):
    raise UserError("fractions must be a non-empty list of numbers in [0, 1]")
  n = int(np.shape(labels)[0])
  if not n:
    raise UserError("no examples to evaluate")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  if np.shape(images)[0] != n:
    raise UserError(f"{np.shape(images)[0]} images but {n} labels")
  return fractions, n


def _resolve_ks(forward: Callable, params: PyTree, model_state: PyTree, images,
                ks: Sequence[int] | None) -> tuple[int, ...]:
  """`sweep`'s ks (default (1,), or (1, 5) above 10 classes), each checked to be in 1..C, where
  the logits are (B, C); C is found by shape evaluation (traced, not run)."""
  example = jax.ShapeDtypeStruct((1, *np.shape(images)[1:]),
                                 jax.dtypes.canonicalize_dtype(np.asarray(images[:1]).dtype))
  num_classes = jax.eval_shape(lambda p, s, x: forward(p, s, x, train=False)[0], params,
                               model_state, example).shape[-1]
  ks = ((1, 5) if num_classes > 10 else (1,)) if ks is None else tuple(int(k) for k in ks)
  if not ks or any(k < 1 or k > num_classes for k in ks):
    raise UserError(f"ks must be in 1..{num_classes} (the number of classes), got {list(ks)}")
  return ks


def _error_rates(scores: list, n: int) -> tuple[np.ndarray, float]:
  """(top-k errors (K,), mean cross-entropy) over the n examples, from the per-batch `_scores`
  [(K + 1,)]."""
  totals = np.sum(np.asarray(jax.device_get(scores), np.float64), axis=0)
  return (n - totals[:-1]) / n, float(totals[-1]) / n


@dataclasses.dataclass(frozen=True)
class _Evaluation:
  """What every evaluation of one sweep shares. B = batch size, K = len(ks).

  params: masked, on device; batches: `_batches` [(x (B, ...), y (B,), valid (B,))]; n: the
  valid examples in them. inputs: per batch, {layer: its input in the baseline pass} for the
  layers whose input is cached (the same keys in every batch; empty dicts without a cache).
  """

  forward: Callable
  params: PyTree
  model_state: PyTree
  batches: list
  inputs: list[dict[str, jax.Array]]
  ks: tuple[int, ...]
  n: int


def _baseline_pass(forward: Callable, params: PyTree, model_state: PyTree, batches: list,
                   cacheable: list[str], ks: tuple[int, ...], cache: bool,
                   n: int) -> tuple[tuple[np.ndarray, float], list[dict[str, jax.Array]]]:
  """((baseline top-k errors (K,), mean loss), per batch {layer: its input}) from one pass over
  `batches`;
  the inputs are those of the `cacheable` layers called once (none unless `cache`)."""
  base = _make_baseline_fn(forward, cacheable, ks, cache)
  base_counts, inputs = [], []
  for x, y, valid in batches:
    counts, layer_inputs = base(params, model_state, x, y, valid)
    base_counts.append(counts)
    inputs.append(layer_inputs)
  return _error_rates(base_counts, n), inputs


def _cut_errors(ev: _Evaluation, name: str, path, w: np.ndarray, m: np.ndarray,
                cuts: set[int]) -> dict[int, tuple[np.ndarray, float]]:
  """{k: (top-k errors (K,), mean loss)} with the k smallest survivors of layer `name` removed,
  k in `cuts`.

  Every batch of every k is dispatched before any count is read back (no host round trip
  between the asynchronously dispatched calls).
  """
  use_input = name in ev.inputs[0]
  point = _make_point_fn(ev.forward, name, path, ev.ks, use_input)
  dev_ranks, dev_mask = jnp.asarray(survivor_ranks(w, m)), jnp.asarray(m)
  pending = {}
  for k in sorted(cuts):
    pending[k] = [point(ev.params, ev.model_state, dev_ranks, dev_mask, jnp.int32(k),
                        inp.get(name, x) if use_input else x, x, y, valid)
                  for (x, y, valid), inp in zip(ev.batches, ev.inputs)]
  return {k: _error_rates(v, ev.n) for k, v in pending.items()}


def _sweep_layer(ev: _Evaluation, baseline: tuple[np.ndarray, float], name: str,
                 kernel: tuple[Any, np.ndarray, np.ndarray], fractions: np.ndarray,
                 std_of: str) -> LayerSweep:
  """One layer's LayerSweep over `fractions` (F,); kernel = (keypath, weights, bool mask).

  A point removing no weight (k = 0) is `baseline`, not re-evaluated.
  """
  path, w, m = kernel
  surviving = int(m.sum())
  sorted_abs = np.sort(np.abs(np.asarray(w, np.float64)[m]))
  removed = np.asarray([removed_count(f, surviving) for f in fractions], np.int64)
  errors_at = _cut_errors(ev, name, path, w, m, set(removed.tolist()) - {0})
  errors_at[0] = baseline
  thresholds = np.asarray([_equivalent_threshold(sorted_abs, int(k)) for k in removed])
  std = _surviving_std(w, m, std_of)
  with np.errstate(divide="ignore", invalid="ignore"):
    qualities = np.where(thresholds == 0, 0.0, thresholds / std if std else np.inf)
  return LayerSweep(
      name=name, group=layers_lib.kind(path, w), weights=int(np.size(w)),
      surviving=surviving, std=std, removed=removed, thresholds=thresholds,
      qualities=np.asarray(qualities, np.float64),
      errors=np.stack([errors_at[int(k)][0] for k in removed]),
      losses=np.asarray([errors_at[int(k)][1] for k in removed], np.float64))


def sweep(apply_fn: Callable, params: PyTree, masks: PyTree, images, labels,
          layers: Sequence[str] | None = None, fractions: Sequence[float] | None = None,
          ks: Sequence[int] | None = None, batch_size: int = 500, std_of: str = "survivors",
          is_prunable: Callable[[Any, Any], bool] = layers_lib.DEFAULT,
          cache: bool = True, model_state: PyTree | None = None) -> SweepResult:
  """Top-k error with one layer at a time pruned to each fraction of its survivors, no retraining.

  Args:
    apply_fn: any model function (`lwc.model_fn`; a Linen `model.apply` works as it is), called
      in eval mode; its outputs are the logits, (B, C).
    params, masks: the trained weights and their bool masks (existing pruning is kept).
    images: (N, ...) inputs (images, token ids); labels: (N,) int. All N are evaluated.
    layers: layers to sweep (default: every prunable layer, in params order).
    fractions: fractions of each layer's surviving weights to remove (default fraction_grid()).
    ks: which top-k errors to measure (default: 1, and 5 when there are more than 10 classes);
      `choose_qualities` needs 1.
    batch_size: examples per evaluation call (the last batch is padded, not recompiled).
    std_of: 'survivors' or 'all', the std the pipeline's threshold uses.
    cache: reuse each layer's input from the baseline pass (see module docstring).
    model_state: the model's other collections (BatchNorm statistics), passed through unchanged
      to every evaluation; None for none.

  Returns:
    SweepResult; fraction 0 of every layer is the shared baseline (not re-evaluated).
  """
  t0 = time.perf_counter()
  fractions, n = _check_sweep_args(images, labels, fractions, batch_size, std_of)
  forward = model_fn_lib.as_model_fn(apply_fn)
  model_state = jax.device_put(model_state or {})
  params, masks = layers_lib.as_params(params), layers_lib.as_params(masks)
  layers_lib.require_prunable(params, is_prunable)
  kernels = prunable_with_masks(params, masks, is_prunable)
  layers = _check_layers(layers, list(kernels))
  ks = _resolve_ks(forward, params, model_state, images, ks)

  params = jax.device_put(masks_lib.apply_masks(params, masks))
  batches = _batches(images, labels, batch_size)
  cacheable = [name for name in layers if _owned_by_module(kernels[name][0])]
  baseline, inputs = _baseline_pass(forward, params, model_state, batches, cacheable, ks,
                                    cache, n)
  ev = _Evaluation(forward, params, model_state, batches, inputs, ks, n)
  out = {name: _sweep_layer(ev, baseline, name, kernels[name], fractions, std_of)
         for name in layers}
  return SweepResult(fractions=fractions, ks=ks, baseline=baseline[0], layers=out,
                     num_examples=n, std_of=std_of, seconds=time.perf_counter() - t0,
                     baseline_loss=baseline[1])


@dataclasses.dataclass(frozen=True)
class Choice:
  """Per-layer pick of `choose_qualities`; every dict is keyed by layer, in sweep order.

  qualities: q for the pipeline's threshold q * std; fractions: of the survivors removed;
  densities: predicted surviving / all weights of the layer after pruning at q (one shot, no
  retraining); error_increase: measured top-1 increase at that point; total_density: over the
  swept layers.
  """

  budget: float
  mode: str
  per_layer_budget: float
  fractions: dict[str, float]
  qualities: dict[str, float]
  densities: dict[str, float]
  error_increase: dict[str, float]
  total_density: float

  def quality(self, default: float | None = None) -> dict[str, float]:
    """`lwc.masks.resolve_qualities` format: {layer: q} plus 'default' when given."""
    return {**self.qualities, **({} if default is None else {"default": float(default)})}

  def layer_qualities(self) -> dict[str, tuple[float, ...]]:
    """`pipeline.Config.layer_qualities` format: {layer: (q,)} (same q every iteration)."""
    return {name: (q,) for name, q in self.qualities.items()}

  def flag_line(self) -> str:
    """'--layer_quality=conv1=0.3 ...' for the experiment entry points (4 significant digits,
    rounded down so the threshold never grows)."""
    return " ".join(f"--layer_quality={name}={_round_down(q)}"
                    for name, q in self.qualities.items())

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _round_down(q: float, digits: int = 4) -> str:
  if q <= 0 or not math.isfinite(q):
    return "0" if q <= 0 else repr(q)
  scale = 10 ** (digits - 1 - math.floor(math.log10(q)))
  return f"{math.floor(q * scale) / scale:.{digits}g}"


def choose_qualities(result: SweepResult, budget: float, mode: str = "per_layer") -> Choice:
  """Per layer, the largest swept fraction whose top-1 error increase stays within budget.

  "Stays": every fraction up to the chosen one is within budget too (the first point over the
  budget ends the search), so a noisy dip further out is not taken.

  Args:
    result: a sweep measuring top-1 (1 in ks).
    budget: allowed increase of the top-1 error, as a fraction (0.001 = 0.1 points).
    mode: 'per_layer' (each layer may add `budget`) or 'total' (budget / number of layers each,
      assuming the increases add up).

  Returns:
    Choice; a layer with no point within budget gets fraction 0 and quality 0 (no pruning).
  """
  if not (math.isfinite(budget) and budget >= 0):
    raise UserError(f"budget must be a finite number >= 0, got {budget}")
  if mode not in BUDGET_MODES:
    raise UserError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got '{mode}'")
  col = result.column(1)
  allowed = budget if mode == "per_layer" else budget / len(result.layers)
  fractions, qualities, densities, increase = {}, {}, {}, {}
  kept = total = 0
  for name, layer in result.layers.items():
    delta = layer.errors[:, col] - result.baseline[col]
    best = None
    for i in np.argsort(result.fractions, kind="stable"):
      if delta[i] > allowed + 1e-9:
        break
      best = int(i)
    if best is None:  # even the smallest fraction costs too much: leave the layer alone
      fractions[name], qualities[name], increase[name] = 0.0, 0.0, 0.0
      densities[name] = layer.surviving / max(layer.weights, 1)
      kept += layer.surviving
    else:
      fractions[name] = float(result.fractions[best])
      qualities[name] = float(layer.qualities[best])
      densities[name] = float(layer.densities[best])
      increase[name] = float(delta[best])
      kept += layer.surviving - int(layer.removed[best])
    total += layer.weights
  return Choice(budget=float(budget), mode=mode, per_layer_budget=float(allowed),
                fractions=fractions, qualities=qualities, densities=densities,
                error_increase=increase, total_density=kept / max(total, 1))


def _k_name(k: int) -> str:
  return f"top{k}"


def to_json(result: SweepResult) -> dict:
  """JSON-ready dict; `from_json` inverts it."""
  return {
      "fractions": result.fractions.tolist(), "ks": list(result.ks),
      "baseline_error": {_k_name(k): float(result.baseline[i]) for i, k in enumerate(result.ks)},
      "num_examples": result.num_examples, "std_of": result.std_of, "seconds": result.seconds,
      "layers": {name: {
          "group": layer.group, "weights": layer.weights, "surviving": layer.surviving,
          "std": layer.std, "removed": layer.removed.tolist(),
          "thresholds": layer.thresholds.tolist(), "qualities": layer.qualities.tolist(),
          "errors": {_k_name(k): layer.errors[:, i].tolist() for i, k in enumerate(result.ks)},
          **({"losses": layer.losses.tolist()} if layer.losses is not None else {})}
          for name, layer in result.layers.items()},
      **({"baseline_loss": result.baseline_loss} if result.baseline_loss is not None else {})}


def from_json(d: dict) -> SweepResult:
  ks = tuple(d["ks"])
  layers = {name: LayerSweep(
      name=name, group=v["group"], weights=v["weights"], surviving=v["surviving"], std=v["std"],
      removed=np.asarray(v["removed"], np.int64), thresholds=np.asarray(v["thresholds"]),
      qualities=np.asarray(v["qualities"], np.float64),
      errors=np.stack([np.asarray(v["errors"][_k_name(k)]) for k in ks], axis=1),
      losses=np.asarray(v["losses"], np.float64) if "losses" in v else None)
      for name, v in d["layers"].items()}
  return SweepResult(fractions=np.asarray(d["fractions"]), ks=ks,
                     baseline=np.asarray([d["baseline_error"][_k_name(k)] for k in ks]),
                     layers=layers, num_examples=d["num_examples"], std_of=d["std_of"],
                     seconds=d["seconds"], baseline_loss=d.get("baseline_loss"))


def rows(result: SweepResult) -> list[dict]:
  """One row per (layer, fraction): the CSV's content."""
  out = []
  for name, layer in result.layers.items():
    for i, f in enumerate(result.fractions):
      row = {"layer": name, "group": layer.group, "fraction": float(f),
             "removed": int(layer.removed[i]), "surviving_before": layer.surviving,
             "weights": layer.weights, "density_after": float(layer.densities[i]),
             "threshold": float(layer.thresholds[i]), "quality": float(layer.qualities[i])}
      for j, k in enumerate(result.ks):
        row[f"{_k_name(k)}_error"] = float(layer.errors[i, j])
        row[f"{_k_name(k)}_increase"] = float(layer.errors[i, j] - result.baseline[j])
      out.append(row)
  return out


def write_csv(result: SweepResult, path: str) -> str:
  table = rows(result)
  with files.atomic_open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  return path


def write_json(result: SweepResult, path: str, choice: Choice | None = None) -> str:
  d = to_json(result)
  if choice is not None:
    d["choice"] = choice.to_json()
  files.atomic_write_json(path, d, indent=1)
  return path


def plot(result: SweepResult, path: str, k: int = 1, choice: Choice | None = None) -> str:
  """Figure 6: top-k accuracy vs fraction of parameters pruned, one line per layer; a panel per
  group (conv, fc, attention, embedding, left to right; groups without a swept layer are left
  out). Chosen points, if given, are circled. Writes a PNG and returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  col = result.column(k)
  groups = [(g, [n for n, layer in result.layers.items() if layer.group == g])
            for g in ("conv", "fc", "attention", "embedding", "other")]
  groups = [(g, names) for g, names in groups if names]
  fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), dpi=120,
                           squeeze=False)
  x = 100 * result.fractions
  for ax, (group, names) in zip(axes[0], groups):
    for name in names:
      layer = result.layers[name]
      line, = ax.plot(x, 100 * (1 - layer.errors[:, col]), marker="o", markersize=3,
                      label=f"{name} ({layer.surviving:,})")
      if choice is not None and name in choice.fractions:
        i = int(np.argmin(np.abs(result.fractions - choice.fractions[name])))
        ax.plot(x[i], 100 * (1 - layer.errors[i, col]), marker="o", markersize=10,
                markerfacecolor="none", color=line.get_color())
    ax.axhline(100 * (1 - result.baseline[col]), color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"{group.upper() if group in ('conv', 'fc') else group} layers")
    ax.set_xlabel("parameters pruned away (% of the layer's survivors)")
    ax.set_ylabel(f"top-{k} accuracy (%), no retraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  files.savefig(fig, path)
  plt.close(fig)
  return path


def write_all(result: SweepResult, out_dir: str, choice: Choice | None = None
              ) -> dict[str, str]:
  """sensitivity.csv, sensitivity.json (with the choice) and sensitivity.png into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  return {"csv": write_csv(result, os.path.join(out_dir, "sensitivity.csv")),
          "json": write_json(result, os.path.join(out_dir, "sensitivity.json"), choice),
          "png": plot(result, os.path.join(out_dir, "sensitivity.png"), choice=choice)}
