"""Section 3.4, iterative pruning: each iteration's pruning, planned as a value, then applied.

`plan_pruning` turns the configured schedule into a `PruningPlan` (which layers, at which
quality, with which thresholds): a fixed quality per iteration (the paper), per-layer final
densities reached geometrically (`--layer_density`), or a compression target whose per-layer
cuts a sensitivity sweep on the validation split allocates (`--target_compression`). The plan is
logged, recorded in the iteration's history row and saved with mid-phase checkpoints; `prune`
applies it. Masks only ever lose connections.

`target_stop` / `target_summary` are the compression target's stopping rule and its choice of the
best iteration: both read the validation error (the test error only with --decide_on_test; with
--refit no error is read: the run goes to the target and its last iteration is the result).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from lwc import faults
from lwc import local_retraining
from lwc import masks as masks_lib

log = logging.getLogger("lwc")


@dataclasses.dataclass(frozen=True)
class PruningPlan:
  """What iteration `iteration` >= 1 prunes: `group` ('all', 'fc', 'conv') and its `layers`
  (None = every prunable layer), `quality` and `thresholds` per layer, and how they were chosen
  (`densities_wanted` for --layer_density, `allocation` for --target_compression)."""

  iteration: int
  group: str
  layers: tuple[str, ...] | None
  quality: Mapping[str, float]
  thresholds: Mapping[str, float]
  densities_wanted: Mapping[str, float] | None = None
  allocation: Mapping[str, Any] | None = None

  def to_json(self) -> dict:
    """The history row's fields of the plan."""
    out = {"pruned_group": self.group, "quality": dict(self.quality),
           "thresholds": dict(self.thresholds)}
    if self.densities_wanted is not None:
      out["densities_wanted"] = dict(self.densities_wanted)
    if self.allocation is not None:
      out["allocation"] = dict(self.allocation)
    return out


def mask_std_of(config) -> str:
  """The std `lwc.masks` computes for a run: 'all', or 'survivors' (also for std_of='dense',
  whose qualities `plan_pruning` rescales to the dense std)."""
  return "all" if config.std_of == "all" else "survivors"


def layer_std(params, masks, std_of: str = "survivors") -> dict[str, float]:
  """{layer: std} of each prunable layer's surviving weights (or all entries)."""
  return {k: float(v) for k, v in masks_lib.layer_thresholds(params, masks, 1.0, std_of).items()}


def pooled_std(params, masks, std_of: str = "survivors") -> float:
  """The std of every prunable layer's surviving weights (or all entries) pooled together."""
  from lwc import layers as layers_lib
  mask_of = {p: m for p, m in layers_lib.leaves_with_path(masks)}
  values = []
  for _, (path, w) in layers_lib.prunable_leaves(params).items():
    w = np.asarray(w).ravel()
    values.append(w if std_of == "all" else w[np.asarray(mask_of[path]).ravel()])
  values = np.concatenate(values) if values else np.zeros(0)
  return float(values.std()) if values.size else 0.0


def dense_reference(params, masks) -> dict:
  """What --std_of=dense and --threshold_scope=global keep from the dense network (recorded in
  iteration 0's history row): each layer's std and the pooled std."""
  return {"layer_std": layer_std(params, masks), "pooled_std": pooled_std(params, masks)}


def _rescaled(config, quality: dict[str, float], params, masks, dense: Mapping | None) -> dict:
  """Per-layer qualities for `lwc.masks` (std `mask_std_of`) that put each threshold at
  quality x the reference std: the dense layer's (std_of='dense'), the pooled one
  (threshold_scope='global'), or both."""
  if config.std_of != "dense" and config.threshold_scope == "layer":
    return quality
  std_of = mask_std_of(config)
  now = layer_std(params, masks, std_of)
  if config.threshold_scope == "global":
    ref = (dense["pooled_std"] if config.std_of == "dense" else
           pooled_std(params, masks, std_of))
    reference = {k: ref for k in now}
  else:
    reference = dense["layer_std"]
  return {k: (q * reference[k] / now[k] if now[k] > 0 else q) for k, q in quality.items()}


def decision_error(record: Mapping) -> float:
  """The error a decision reads from a history row: validation, or test without one."""
  return record.get("validation_error", record["test_error"])


def _scheduled(config, iteration: int, counts: Mapping) -> tuple[float, int]:
  """(density wanted, weights kept) after iteration's cut toward --target_compression, from
  the current `masks_lib.total_counts`: the schedule's density (geometric: the same fraction of
  the survivors each iteration left), rounded to whole weights, floored at the last step."""
  from lwc import schedule
  current = counts["nonzero"] / counts["weights"]
  if config.density_schedule != "geometric":
    want = min(current, schedule.scheduled_density(
        config.density_schedule, 1.0 / config.target_compression, iteration, config.iterations,
        config.schedule_power))
  else:
    want = schedule.next_density(current, 1.0 / config.target_compression,
                                 config.iterations - iteration + 1)
  keep = int(np.floor(want * counts["weights"] + 0.5))
  if want <= (1.0 + 1e-9) / config.target_compression:  # the last step: floor, not rounding
    keep = target_nonzero(config, counts["weights"])
  return want, min(keep, counts["nonzero"])


def scheduled_keep(config, iteration: int, masks) -> int:
  """Weights the cut of `iteration` keeps toward --target_compression, given the masks it
  starts from (the total `_target_quality` allocates over the layers)."""
  return _scheduled(config, iteration, masks_lib.total_counts(masks))[1]


def _lookahead(config, iteration, result, counts, keep) -> dict[str, float] | None:
  """Each layer's density after the next iteration's cut, as this iteration's sweep would
  allocate it (the target ADMM prepares, lwc.admm); None when the sweep's grid cannot reach it."""
  from lwc import schedule
  from lwc.errors import UserError
  _, keep_next = _scheduled(config, iteration + 1, {"nonzero": keep, "weights": counts["weights"]})
  try:
    fractions = schedule.allocate(result, counts["nonzero"] - keep_next, config.allocation_metric)
  except UserError:
    return None
  return schedule.exact_densities(result, fractions, keep_next)


def _target_quality(config, iteration, params, masks, sweep_on, prepared=None
                    ) -> tuple[dict, dict]:
  """(quality per layer, allocation record) toward --target_compression: the cut of this
  iteration allocated over layers by a sensitivity sweep (lwc.schedule), or with --admm_rho the
  keep counts the last retraining prepared (`prepared`, lwc.admm), when they add up to this
  iteration's total; the sweep then allocates the next iteration's cut (`next_densities`)."""
  from lwc import schedule
  counts = masks_lib.total_counts(masks)
  current = counts["nonzero"] / counts["weights"]
  want, keep = _scheduled(config, iteration, counts)
  if config.allocation != "sensitivity":
    return _ranked_quality(config, iteration, params, masks, counts, want, keep, prepared)
  result = sweep_on(params, masks)
  sizes = {name: layer.weights for name, layer in result.layers.items()}
  if prepared and sum(prepared.values()) == keep and set(prepared) == set(sizes):
    densities = {name: prepared[name] / sizes[name] for name in sizes}
    fractions = {name: 1.0 - prepared[name] / max(result.layers[name].surviving, 1)
                 for name in sizes}
  else:
    if prepared:
      log.info("iteration %d: the counts ADMM prepared (%d weights) are not this cut's %d; the "
               "sweep allocates the cut afresh", iteration, sum(prepared.values()), keep)
    prepared = None
    fractions = schedule.allocate(result, counts["nonzero"] - keep, config.allocation_metric)
    densities = schedule.exact_densities(result, fractions, keep)
  allocation = {
      "density_before": current, "density_wanted": want, "sweep_seconds": result.seconds,
      "sweep_examples": result.num_examples, "sweep_split": config.sweep_split_name,
      "fractions": fractions, "densities": densities,
      "predicted_error": schedule.predicted_error(result, fractions),
      "baseline_error": float(np.asarray(result.baseline)[0]),
      "metric": config.allocation_metric, "rule": "sensitivity",
      **({"prepared_by_admm": True} if prepared else {})}
  if config.admm_rho and iteration < config.iterations:
    allocation["next_densities"] = _lookahead(config, iteration, result, counts, keep)
  log.info("iteration %d: density %.4f -> %.4f; sensitivity (%s split) allocates %s", iteration,
           current, want, config.sweep_split_name,
           ", ".join(f"{k} {100 * v:.1f}%" for k, v in densities.items()))
  return (schedule.qualities_for_densities(params, masks, densities, mask_std_of(config)),
          allocation)


def _ranked_quality(config, iteration, params, masks, counts, want, keep, prepared
                    ) -> tuple[dict, dict]:
  """`_target_quality` for --allocation=global, lamp or uniform (lwc.allocation): the cut's
  total shared by one ranking of every survivor, no sweep; with --admm_rho the counts the last
  retraining prepared when they add up to this cut's total, and the same ranking looks ahead."""
  from lwc import allocation as allocation_lib
  from lwc import schedule
  before = {k: v["nonzero"] for k, v in masks_lib.layer_counts(masks).items()}
  if prepared and sum(prepared.values()) == keep and set(prepared) == set(before):
    kept = dict(prepared)
  else:
    prepared = None
    kept = allocation_lib.keep_counts(params, masks, keep, config.allocation)
  densities = allocation_lib.densities(params, masks, kept)
  record = {
      "rule": config.allocation, "density_before": counts["nonzero"] / counts["weights"],
      "density_wanted": want, "keep": kept, "densities": densities,
      "fractions": {k: 1.0 - kept[k] / before[k] if before[k] else 0.0 for k in kept},
      **({"prepared_by_admm": True} if prepared else {})}
  if config.admm_rho and iteration < config.iterations:
    _, keep_next = _scheduled(config, iteration + 1,
                              {"nonzero": keep, "weights": counts["weights"]})
    record["next_densities"] = allocation_lib.densities(
        params, masks, allocation_lib.keep_counts(params, masks, keep_next, config.allocation))
  log.info("iteration %d: density %.4f -> %.4f; %s allocation keeps %s", iteration,
           record["density_before"], want, config.allocation,
           ", ".join(f"{k} {100 * v:.2f}%" for k, v in densities.items()))
  return (schedule.qualities_for_densities(params, masks, densities, mask_std_of(config)),
          record)


def _density_quality(config, iteration, params, masks) -> tuple[dict, dict]:
  """(quality per layer, densities wanted) for --layer_density: each listed layer's density
  steps geometrically toward its final value over the iterations that prune it."""
  from lwc import schedule
  quality = config.quality(iteration)
  base = quality if isinstance(quality, dict) else {"default": quality}
  wanted = {}
  for layer, final in config.layer_densities.items():
    done, total = local_retraining.layer_prunings(config, params, layer, iteration)
    wanted[layer] = schedule.scheduled_density(config.density_schedule, final, done, total,
                                               config.schedule_power)
  derived = schedule.qualities_for_densities(params, masks, wanted, mask_std_of(config))
  return {**base, **derived}, wanted


def plan_pruning(config, iteration: int, params, masks, sweep_on=None,
                 dense: Mapping | None = None, prepared: Mapping | None = None) -> PruningPlan:
  """The plan of `iteration` >= 1 (see the module docstring). `sweep_on(params, masks)` runs
  the sensitivity sweep of --target_compression (on the decisions split); `dense` is
  `dense_reference` of the dense network (for std_of='dense' and global thresholds);
  `prepared` the keep counts the last retraining's ADMM pulled toward (None: none)."""
  wanted = allocation = None
  if config.target_compression:
    quality, allocation = _target_quality(config, iteration, params, masks, sweep_on, prepared)
  elif config.layer_densities:
    quality, wanted = _density_quality(config, iteration, params, masks)
  else:
    quality = _rescaled(config, masks_lib.resolve_qualities(params, config.quality(iteration)),
                        params, masks, dense)
  thresholds = masks_lib.layer_thresholds(params, masks, quality, mask_std_of(config))
  layers = local_retraining.group_layers(config, iteration, params)
  return PruningPlan(iteration=iteration, group=config.prune_group(iteration),
                     layers=None if layers is None else tuple(layers),
                     quality=masks_lib.resolve_qualities(params, quality),
                     thresholds={k: float(v) for k, v in thresholds.items()},
                     densities_wanted=wanted, allocation=allocation)


def prune(plan: PruningPlan, config, root: jax.Array, params, masks):
  """(params, masks) after applying `plan`: every surviving weight of the planned layers with
  |w| below its layer's threshold set to 0.0 and its mask to False (probabilistically, seeded by
  (seed, iteration), with --probabilistic_pruning)."""
  rng = (jax.random.fold_in(jax.random.fold_in(root, 7919), plan.iteration)
         if config.probabilistic_pruning else None)
  params, masks = masks_lib.prune(params, masks, dict(plan.quality), mask_std_of(config),
                                  layers=plan.layers, rng=rng)
  faults.maybe_kill("prune", plan.iteration)
  return params, masks


def pruning_outcome(iteration: int, masks) -> dict:
  """What the pruning left, per layer (density; layers left with no weight at all)."""
  counts = masks_lib.layer_counts(masks)
  out = {"density_after_prune": {k: v["density"] for k, v in counts.items()}}
  empty = [k for k, v in counts.items() if v["nonzero"] == 0]
  if empty:  # a legitimate, if useless, result: reported, never a crash later
    out["empty_layers"] = empty
    log.warning("iteration %d pruned every weight of %s: the network now computes a constant",
                iteration, ", ".join(empty))
  return out


def target_stop(config, history: list[dict]) -> str | None:
  """Why a --target_compression run stops before the next iteration (None: it goes on)."""
  if not config.target_compression or not history:
    return None
  dense, last = history[0], history[-1]
  split = config.decisions_split
  if split != "none" and (decision_error(last)
                          > decision_error(dense) + config.max_error_increase + 1e-12):
    return (f"{split} error {100 * decision_error(last):.2f}% exceeds the dense "
            f"{100 * decision_error(dense):.2f}% + {100 * config.max_error_increase:.2f} points")
  if last["params_nonzero"] <= target_nonzero(config, last["params_total"]):
    return f"target {config.target_compression:g}x reached ({last['compression']:.1f}x)"
  return None


def target_nonzero(config, total: int) -> int:
  """The most nonzero weights a target of N x allows: floor(total / N)."""
  return int(np.floor(total / config.target_compression + 1e-9))


def target_summary(config, history: list[dict]) -> dict:
  """The best iteration within the error budget (on the decisions split; with --refit, which
  reads no error, the last iteration), and whether it reached the target (at most
  floor(weights / target) nonzero weights)."""
  if config.decisions_split == "none":
    best = history[-1]
  else:
    budget = decision_error(history[0]) + config.max_error_increase + 1e-12
    within = [h for h in history if decision_error(h) <= budget]
    best = max(within, key=lambda h: h["compression"])
  return {"compression": config.target_compression,
          "max_error_increase": config.max_error_increase,
          "chosen_on": config.decisions_split,
          "best_iteration": best["iteration"], "best_compression": best["compression"],
          "best_test_error": best["test_error"],
          "best_validation_error": best.get("validation_error"),
          "reached": best["params_nonzero"] <= target_nonzero(config, best["params_total"]),
          "curve": [(h["compression"], h["test_error"]) for h in history]}
