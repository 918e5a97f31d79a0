"""Section 3.3, local pruning and parameter co-adaptation: conv and FC layers are pruned and
retrained in turn, the other group frozen (--prune_groups=fc,conv,...), so a retraining phase
adapts the layers it just pruned to the untouched rest of the network.
"""

from __future__ import annotations

from lwc import masks as masks_lib
from lwc.errors import UserError


def group_layers(config, iteration: int, params) -> list[str] | None:
  """Layers pruned and retrained at `iteration` (None = all; dense training trains all)."""
  if iteration == 0 or config.prune_group(iteration) == "all":
    return None
  group = config.prune_group(iteration)
  layers = masks_lib.layer_groups(params)[group]
  if not layers:
    raise UserError(f"iteration {iteration} prunes group '{group}' but {config.model} has no "
                    "such layer")
  return layers


def frozen_layers(config, iteration: int, params) -> list[str]:
  """Layers held fixed while `iteration` retrains (the other group; none for 'all')."""
  layers = group_layers(config, iteration, params)
  if layers is None:
    return []
  return [name for name in masks_lib.prunable_layers(params) if name not in layers]


def layer_prunings(config, params, layer: str, iteration: int) -> tuple[int, int]:
  """(prunings of `layer` up to and including `iteration`, prunings in the whole run)."""
  done = total = 0
  for it in range(1, config.iterations + 1):
    group = group_layers(config, it, params)
    if group is None or layer in group:
      total += 1
      done += it <= iteration
  return done, total
