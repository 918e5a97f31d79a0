"""How much to prune per layer and iteration, beyond one fixed quality: per-layer density targets
and sensitivity-driven allocation toward a compression target.

Both end as the pipeline's per-layer qualities (threshold = quality * std of the layer's
survivors, `lwc.masks.prune`), computed so that the threshold falls between the last weight to
remove and the first to keep: the quality is *derived* from the wanted density, which q alone
does not fix (the same q removes different fractions of differently shaped distributions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lwc import layers as layers_lib
from lwc import sensitivity
from lwc.errors import UserError

PyTree = Any
Predicate = Callable[[Any, Any], bool]


def _kernels(params: PyTree, masks: PyTree, is_prunable: Predicate = layers_lib.DEFAULT
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{layer: (weights, mask)} as host arrays, prunable layers (`lwc.layers`) in params order."""
  return {name: (w, m) for name, (_, w, m) in
          sensitivity.prunable_with_masks(params, masks, is_prunable).items()}


def qualities_for_densities(params: PyTree, masks: PyTree, densities: Mapping[str, float],
                            std_of: str = "survivors",
                            is_prunable: Predicate = layers_lib.DEFAULT) -> dict[str, float]:
  """Per-layer quality that prunes each listed layer to `densities[layer]` of ALL its weights.

  Args:
    params, masks: the current weights and bool masks.
    densities: {layer: wanted surviving fraction of the layer's weights, in [0, 1]}. A density at
      or above the current one prunes nothing (quality 0): masks never regrow.
    std_of: the std the pipeline's threshold uses ('survivors' or 'all').
    is_prunable: which leaves are layers (`lwc.layers`; the default selection).

  Returns:
    {layer: quality} for the listed layers; `masks.prune` with these removes exactly the
    smallest-|w| survivors down to round(density * weights), barring ties in |w|.
  """
  kernels = _kernels(params, masks, is_prunable)
  unknown = sorted(set(densities) - set(kernels))
  if unknown:
    raise UserError(f"density given for unknown layer(s) {', '.join(unknown)}; prunable layers "
                    f"are {', '.join(kernels)}")
  out = {}
  for name, density in densities.items():
    if not 0.0 <= density <= 1.0:
      raise UserError(f"density for layer {name} must be in [0, 1], got {density}")
    w, m = kernels[name]
    surviving = int(m.sum())
    remove = surviving - int(np.floor(density * w.size + 0.5))
    if remove <= 0:
      out[name] = 0.0
      continue
    sorted_abs = np.sort(np.abs(w[m]))
    threshold = sensitivity._equivalent_threshold(sorted_abs, remove)
    std = sensitivity._surviving_std(w, m, std_of)
    out[name] = (_removing_at_least(w, m, threshold / std, remove, std_of) if std > 0 else 0.0)
  return out


def _removing_at_least(w: np.ndarray, m: np.ndarray, quality: float, remove: int, std_of: str
                       ) -> float:
  """`quality`, raised by float32 steps until the threshold `lwc.masks.prune` forms from it
  (float32 quality x std, on the device) removes at least `remove` survivors.

  Neighbouring float32 weights can lie closer together than that product's rounding, so the
  midpoint threshold alone may keep one weight too many, and a target of floor(weights / N) would
  be missed by one.
  """
  import jax.numpy as jnp
  from lwc import masks as masks_lib
  w32 = jnp.asarray(w, jnp.float32)
  std = jnp.std(w32) if std_of == "all" else masks_lib.survivor_std(w32, jnp.asarray(m, bool))
  alive = np.abs(np.asarray(w, np.float32)[np.asarray(m, bool)])
  for _ in range(64):
    threshold = np.float32(quality * std)  # the product masks.layer_thresholds forms
    if int((alive < threshold).sum()) >= remove:
      break
    quality = float(np.nextafter(np.float32(quality), np.float32(np.inf)))
  return quality


def geometric_density(final: float, done: int, total: int) -> float:
  """Density after the `done`-th of `total` prunings on the way to `final`: final ** (done/total).

  Each pruning then keeps the same fraction of the survivors, (final) ** (1 / total).
  """
  if total <= 0:
    return 1.0
  return float(final ** (min(done, total) / total))


def polynomial_density(final: float, done: int, total: int, power: float = 3.0) -> float:
  """Zhu & Gupta's schedule with any exponent (TF-MOT's PolynomialDecay on the density):
  final + (1 - final) * (1 - done/total) ** power; power 3 is `cubic_density`."""
  if total <= 0:
    return 1.0
  return float(final + (1.0 - final) * (1.0 - min(done, total) / total) ** power)


def cubic_density(final: float, done: int, total: int) -> float:
  """Density after the `done`-th of `total` prunings on Zhu & Gupta's (2017) cubic schedule:
  final + (1 - final) * (1 - done/total) ** 3 (large cuts first, small ones at the end)."""
  return polynomial_density(final, done, total, 3.0)


def log_polynomial_density(final: float, done: int, total: int, power: float = 3.0) -> float:
  """The log of the density on a polynomial schedule: final ** (1 - (1 - done/total) ** power).

  Each pruning keeps a growing fraction of the survivors (the log-density steps shrink as
  (1 - t) ** (power - 1)): large relative cuts while the network is dense and has weights to
  spare, small ones near the end. Power 1 is `geometric_density`. Unlike `cubic_density`, whose
  last steps at a final density near 0 are large relative cuts (to 0.5% in 12 steps: 42% then
  10% of the survivors), the last cut here is the smallest: `1 - final ** (1 / total**power)`.

  >>> round(log_polynomial_density(0.01, 1, 2, power=1.0), 6)
  0.1
  >>> round(log_polynomial_density(0.01, 1, 2, power=2.0), 6)  # 1 - 1/4 of the log
  0.031623
  """
  if total <= 0:
    return 1.0
  return float(final ** (1.0 - (1.0 - min(done, total) / total) ** power))


def scheduled_density(kind: str, final: float, done: int, total: int, power: float = 3.0
                      ) -> float:
  """The density after the `done`-th of `total` prunings on schedule `kind`: 'geometric',
  'cubic', 'polynomial' or 'log_polynomial' (the last two with exponent `power`)."""
  if kind == "geometric":
    return geometric_density(final, done, total)
  if kind == "cubic":
    return cubic_density(final, done, total)
  if kind == "polynomial":
    return polynomial_density(final, done, total, power)
  if kind == "log_polynomial":
    return log_polynomial_density(final, done, total, power)
  raise ValueError(f"unknown density schedule {kind!r}: geometric, cubic, polynomial or "
                   "log_polynomial")


def allocate(result: sensitivity.SweepResult, remove: int, metric: str = "error"
             ) -> dict[str, float]:
  """Fractions of each layer's survivors to remove so that `remove` weights go in all, chosen
  greedily by sensitivity: the next cut always goes to the layer whose next grid step costs the
  least top-1 error (or mean cross-entropy) per weight removed (the most sensitive layer is cut
  least).

  Args:
    result: a sweep of the current network (`lwc.sensitivity.sweep`); the curves are made
      monotone in the fraction (running maximum) so that noise never looks like a gain.
    remove: weights to remove in total, 0 <= remove <= the survivors the grid can reach.
    metric: 'error' (top-1: on a few thousand examples small cuts often cost no example at all,
      and such ties go to the layer with the most survivors) or 'loss' (the mean cross-entropy,
      which every cut moves).

  Returns:
    {layer: fraction of its survivors}; the last cut is interpolated between grid points so the
    total removed is `remove` to within a weight per layer.
  """
  fractions = np.asarray(result.fractions, np.float64)
  layers = list(result.layers)
  errors = {name: np.maximum.accumulate(sweep_curve(result, name, metric)) for name in layers}
  surviving = {name: result.layers[name].surviving for name in layers}
  reachable = sum(int(fractions[-1] * surviving[name]) for name in layers)
  if remove > reachable:
    raise UserError(f"cannot remove {remove} weights in one iteration: the sweep reaches "
                    f"{reachable} (raise --iterations or the sweep's max fraction)")
  position = {name: 0 for name in layers}  # index into fractions
  removed = 0.0
  while removed < remove:
    best, best_cost = None, None
    for name in layers:
      j = position[name]
      if j + 1 >= len(fractions) or surviving[name] == 0:
        continue
      gain = (fractions[j + 1] - fractions[j]) * surviving[name]
      cost = (errors[name][j + 1] - errors[name][j]) / gain
      # Ties (no measurable cost) go to the layer with the most survivors.
      key = (cost, -surviving[name])
      if best_cost is None or key < best_cost:
        best, best_cost = name, key
    if best is None:
      break
    j = position[best]
    gain = (fractions[j + 1] - fractions[j]) * surviving[best]
    if removed + gain >= remove:
      part = (remove - removed) / gain
      out = {name: float(fractions[position[name]]) for name in layers}
      out[best] = float(fractions[j] + part * (fractions[j + 1] - fractions[j]))
      return out
    position[best] = j + 1
    removed += gain
  return {name: float(fractions[position[name]]) for name in layers}


def sweep_curve(result: sensitivity.SweepResult, layer: str, metric: str) -> np.ndarray:
  """float (F,): `layer`'s top-1 error ('error') or mean cross-entropy ('loss') over the sweep's
  fractions; UserError for another metric or a sweep that did not measure the loss."""
  if metric == "error":
    return np.asarray(result.layers[layer].errors, np.float64)[:, 0]
  if metric != "loss":
    raise UserError(f"allocation metric must be 'error' or 'loss', got '{metric}'")
  losses = result.layers[layer].losses
  if losses is None:
    raise UserError(f"the sweep of layer {layer} did not measure the loss (written by an older "
                    "version): allocate on 'error'")
  return np.asarray(losses, np.float64)


def densities_after(result: sensitivity.SweepResult, fractions: Mapping[str, float]
                    ) -> dict[str, float]:
  """Each layer's density (of all its weights) after removing `fractions` of its survivors."""
  return {name: result.layers[name].surviving * (1.0 - fractions[name]) /
          result.layers[name].weights for name in fractions}


def exact_densities(result: sensitivity.SweepResult, fractions: Mapping[str, float],
                    keep: int) -> dict[str, float]:
  """`densities_after`, rounded to whole weights so that exactly `keep` survive in total:
  each layer keeps floor(its share), and the weights left over go to the layers with the largest
  remainders (so a target of N x can land on floor(weights / N), not one weight over)."""
  layers = result.layers
  share = {name: layers[name].surviving * (1.0 - fractions[name]) for name in fractions}
  kept = largest_remainders(share, {name: layers[name].surviving for name in fractions}, keep)
  return {name: kept[name] / layers[name].weights for name in fractions}


def largest_remainders(shares: Mapping[str, float], room: Mapping[str, int], keep: int
                       ) -> dict[str, int]:
  """Whole counts adding up to `keep`: each floor(share) (at most its room), then one more for
  the largest remainders that have room; when the floors already exceed `keep`, one less from
  the largest counts."""
  kept = {name: min(int(np.floor(v)), room[name]) for name, v in shares.items()}
  left = keep - sum(kept.values())
  for name in sorted(shares, key=lambda n: shares[n] - kept[n], reverse=True):
    if left <= 0:
      break
    if kept[name] < room[name]:
      kept[name] += 1
      left -= 1
  while left < 0:
    name = max(kept, key=kept.get)
    kept[name] -= 1
    left += 1
  return kept


def predicted_error(result: sensitivity.SweepResult, fractions: Mapping[str, float]
                    ) -> dict[str, float]:
  """Per layer, the sweep's top-1 error at the chosen fraction (that layer alone pruned)."""
  grid = np.asarray(result.fractions, np.float64)
  return {name: float(np.interp(f, grid, np.asarray(result.layers[name].errors)[:, 0]))
          for name, f in fractions.items()}


def next_density(current: float, target: float, iterations_left: int) -> float:
  """Geometric step from `current` toward `target` density over the iterations left."""
  if iterations_left <= 0 or current <= target:
    return current
  return max(target, current * (target / current) ** (1.0 / iterations_left))


def validate_densities(densities: Mapping[str, Sequence[float] | float]) -> None:
  for name, d in densities.items():
    values = d if isinstance(d, Sequence) else (d,)
    for v in values:
      if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise UserError(f"density for layer {name} must be in [0, 1], got {v}")
