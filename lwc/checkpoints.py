"""One orbax checkpoint per pruning iteration, with the metadata needed to resume safely.

Layout: `workdir/checkpoints/<iteration>/{state,meta}`. `state` holds params, masks, optimiser
state, step and RNG key; `meta` (JSON) holds the model name, the params' shapes, the config and
the history of finished iterations. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so a checkpoint interrupted by `kill -9` is never seen as the latest;
leftover temporary directories are removed when the manager opens the workdir.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lwc import faults
from lwc.errors import UserError

PyTree = Any


def param_shapes(params: PyTree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(p): list(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


class Checkpoints:
  """Save/restore of {'params', 'masks', 'opt_state', 'step', 'rng'} plus JSON metadata.

  `subdir='checkpoints'` holds one checkpoint per pruning iteration, keyed by iteration, all
  kept. `subdir='progress'` holds the mid-phase checkpoints, keyed by the global training step,
  only the newest kept (`keep_latest=1`).
  """

  def __init__(self, workdir: str, subdir: str = "checkpoints", keep_latest: int | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    policy = (None if keep_latest is None else
              ocp.checkpoint_managers.LatestN(keep_latest))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=True,
                                             preservation_policy=policy))

  def latest_iteration(self) -> int | None:
    return self._manager.latest_step()

  def iterations(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, key: int, state: PyTree, meta: dict, fault_point: str = "save") -> None:
    """Saves and waits until the checkpoint is committed (renamed from its temporary name)."""
    self._manager.save(key, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)),
        force=True)
    faults.maybe_kill(fault_point, key)
    self._manager.wait_until_finished()

  def delete(self, key: int) -> None:
    self._manager.delete(key)

  def meta(self, iteration: int) -> dict:
    try:
      return self._manager.restore(iteration, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise UserError(f"checkpoint {self.directory}/{iteration} is unreadable "
                      f"({type(e).__name__}); move it away to resume from an earlier one") from None

  def check_compatible(self, iteration: int, model: str, params: PyTree) -> dict:
    """The checkpoint's metadata; UserError if it holds another model or other shapes."""
    meta = self.meta(iteration)
    if meta.get("model") != model:
      raise UserError(f"workdir holds checkpoints of model '{meta.get('model')}', this run is "
                      f"'{model}': use another --workdir ({self.directory})")
    want = param_shapes(params)
    if "mask_shapes" in meta and meta["mask_shapes"] != want:
      raise UserError(f"workdir holds checkpoints of '{model}' whose masks do not match its "
                      f"parameters: use another --workdir ({self.directory})")
    if meta.get("param_shapes") != want:
      diff = sorted(k for k in set(want) | set(meta.get("param_shapes", {}))
                    if want.get(k) != meta.get("param_shapes", {}).get(k))
      raise UserError(f"workdir holds checkpoints of '{model}' with other parameter shapes "
                      f"(first difference: {diff[0]}): use another --workdir ({self.directory})")
    return meta

  def restore(self, iteration: int, target: PyTree) -> PyTree:
    """The state saved at `iteration`, as NumPy arrays shaped like `target`."""
    abstract = jax.tree.map(np.asarray, jax.device_get(target))
    try:
      return self._manager.restore(iteration, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise UserError(f"checkpoint {self.directory}/{iteration} could not be restored "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                      ) from None

  def close(self) -> None:
    self._manager.close()
