"""How many weights each layer keeps when a compression target's cut is shared without a
sensitivity sweep: one magnitude ranking over the whole network.

`--target_compression` fixes only the network's total after each cut (`lwc.iterative`); the
default shares it by a sensitivity sweep (`lwc.schedule.allocate`). The rules here rank every
surviving weight of every prunable layer by one score and keep the `keep` best:

- 'global': |w| itself, one magnitude threshold for the whole network (e.g. Frankle & Carbin
  2019's global pruning; layers with small weights, typically the widest, lose the most);
- 'lamp': the layer-adaptive magnitude score of Lee et al. (2021), w_u^2 / sum of w_v^2 over the
  layer's survivors with |w_v| >= |w_u|, which puts every layer's largest weight at 1 and so never
  empties a layer;
- 'uniform': no ranking across layers: every layer keeps the same fraction of its survivors.

Within a layer each score is non-decreasing in |w|, so every rule keeps a layer's largest
weights: the cut stays the paper's magnitude cut (`lwc.schedule.qualities_for_densities` turns
the counts into thresholds); only how much each layer keeps changes. Masks never regrow: a
layer keeps at most its survivors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lwc import layers as layers_lib
from lwc import schedule
from lwc import sensitivity
from lwc.errors import UserError

RULES = ("sensitivity", "global", "lamp", "uniform")


def lamp_scores(weights: np.ndarray) -> np.ndarray:
  """float64 (n,): LAMP score of each of a layer's n surviving weights (any order).

  score(u) = w_u^2 / sum over v with |w_v| >= |w_u| of w_v^2; tied magnitudes share a score.
  The largest weight scores 1; scores are non-decreasing in |w|.

  >>> lamp_scores(np.array([1.0, -2.0, 2.0])).round(3).tolist()
  [0.111, 0.5, 0.5]
  """
  squares = np.square(np.asarray(weights, np.float64).ravel())
  if squares.size == 0:
    return squares
  ordered = np.sort(squares)
  # tail[i] = the sum of ordered[i:]; a weight's denominator starts at its first tie.
  tail = np.cumsum(ordered[::-1])[::-1]
  first = np.searchsorted(ordered, squares, side="left")
  return squares / tail[first]


def _scores(weights: np.ndarray, rule: str) -> np.ndarray:
  """float64 (n,): the rule's score of each survivor of one layer."""
  if rule == "global":
    return np.abs(np.asarray(weights, np.float64).ravel())
  if rule == "lamp":
    return lamp_scores(weights)
  raise UserError(f"unknown allocation rule '{rule}': one of {', '.join(RULES)}")


def keep_counts(params: Any, masks: Any, keep: int, rule: str,
                is_prunable=layers_lib.DEFAULT) -> dict[str, int]:
  """{layer: weights it keeps} so that exactly `keep` survive over all prunable layers.

  Args:
    params, masks: the current weights and bool masks (a pytree each, any Flax layout).
    keep: the network's total after the cut, 0 <= keep <= its survivors.
    rule: 'global', 'lamp' or 'uniform' (see the module docstring).
    is_prunable: which leaves are layers (`lwc.layers`).

  Returns:
    Counts in params order; each at most the layer's survivors, summing to `keep`. Ties in the
    score across layers go to the layer that comes first, then to the larger weight's position,
    so the same weights always give the same counts.
  """
  kernels = sensitivity.prunable_with_masks(params, masks, is_prunable)
  alive = {name: w[m] for name, (_, w, m) in kernels.items()}
  surviving = {name: int(v.size) for name, v in alive.items()}
  total = sum(surviving.values())
  if not 0 <= keep <= total:
    raise UserError(f"cannot keep {keep} weights: the network has {total} survivors")
  if rule == "uniform":
    return schedule.largest_remainders(
        {n: keep * s / max(total, 1) for n, s in surviving.items()}, surviving, keep)
  scores = [_scores(v, rule) for v in alive.values()]
  names = list(alive)
  flat = np.concatenate(scores) if scores else np.zeros(0)
  layer_of = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)]) if scores else (
      np.zeros(0, int))
  # Highest score first; ties to the earlier layer, then the earlier position (a stable sort).
  order = np.lexsort((np.arange(flat.size), layer_of, -flat))[:keep]
  counts = np.bincount(layer_of[order], minlength=len(names))
  return {name: int(counts[i]) for i, name in enumerate(names)}


def densities(params: Any, masks: Any, counts: Mapping[str, int],
              is_prunable=layers_lib.DEFAULT) -> dict[str, float]:
  """{layer: counts[layer] / its weights}: the densities `schedule.qualities_for_densities`
  cuts to (it rounds density x weights back to exactly the count)."""
  sizes = {name: int(w.size) for name, (_, w) in
           layers_lib.prunable_leaves(params, is_prunable).items()}
  return {name: counts[name] / sizes[name] for name in counts}
