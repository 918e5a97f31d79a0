"""One orbax checkpoint per pruning iteration, with the metadata needed to resume safely.

Layout: `workdir/checkpoints/<iteration>/{state,meta}`. `state` holds params, masks, optimiser
state, step and RNG key; `meta` (JSON) holds the model name, the params' shapes, the config and
the history of finished iterations. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so a checkpoint interrupted by `kill -9` is never seen as the latest;
leftover temporary directories are removed when the manager opens the workdir. Once committed,
the sha256 of every state and meta file is recorded next to it (`lwc_checksums.json`) and
checked before its metadata or state is read: a flipped bit in either is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lwc import faults
from lwc import files
from lwc.errors import UserError

PyTree = Any


CHECKSUMS = "lwc_checksums.json"


CHECKED = ("state", "meta")  # the folders of a checkpoint its checksums cover


def _file_digests(folder: str, subdirs=CHECKED) -> dict[str, str]:
  """{path relative to folder: sha256} of every file below `folder/<subdir>`."""
  out = {}
  for sub in subdirs:
    root = os.path.join(folder, sub)
    for dirpath, _, names in os.walk(root):
      for name in names:
        path = os.path.join(dirpath, name)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
          for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        out[os.path.relpath(path, folder)] = digest.hexdigest()
  return out


def write_checksums(folder: str) -> None:
  """Records the sha256 of a committed checkpoint's state and meta files (atomically: a kill
  leaves either no checksum file, and the checkpoint unverified, or a complete one)."""
  files.atomic_write_json(os.path.join(folder, CHECKSUMS), _file_digests(folder), indent=0,
                          sort_keys=True)


def has_checksums(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, CHECKSUMS))


def verify_checksums(folder: str) -> bool:
  """False if the state or meta files differ from the recorded checksums (True when none are
  recorded). Checksums written before meta/ was covered are checked for state/ only."""
  path = os.path.join(folder, CHECKSUMS)
  if not os.path.exists(path):
    return True
  try:
    with open(path, "rb") as f:
      want = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError):
    return False
  if not isinstance(want, dict) or not want:
    return False
  covered = sorted({k.split(os.sep, 1)[0] for k in want})
  if "state" not in covered:
    return False
  try:
    return _file_digests(folder, covered) == want
  except OSError:
    return False


def param_shapes(params: PyTree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(p): list(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _wait_for_temporary(directory: str, key: int, timeout: float = 30.0) -> None:
  """Fault injection only: waits until orbax (which may create it in a background thread) has
  made the temporary folder of checkpoint `key`."""
  import glob
  import time
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if glob.glob(os.path.join(directory, f"{key}.orbax-checkpoint-tmp*")):
      return
    time.sleep(0.01)


def _describe(e: BaseException) -> str:
  """The innermost cause of an orbax error, e.g. 'No space left on device'."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    seen = seen.__cause__ or seen.__context__
  text = str(e).splitlines()[0][:200] if str(e) else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpoints:
  """Save/restore of {'params', 'masks', 'opt_state', 'step', 'rng'} plus JSON metadata.

  `subdir='checkpoints'` holds one checkpoint per pruning iteration, keyed by iteration, all
  kept. `subdir='progress'` holds the mid-phase checkpoints, keyed by the global training step,
  only the newest kept (`keep_latest=1`).
  """

  def __init__(self, workdir: str, subdir: str = "checkpoints", keep_latest: int | None = None,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self._read_only = read_only
    policy = (None if keep_latest is None else
              ocp.checkpoint_managers.LatestN(keep_latest))
    # Read-only users (export, sensitivity, restore_iteration) leave another run's leftover
    # temporary checkpoints alone.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(create=False, read_only=read_only,
                                             cleanup_tmp_directories=not read_only,
                                             preservation_policy=policy))

  def latest_iteration(self) -> int | None:
    return self._manager.latest_step()

  def iterations(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, key: int, state: PyTree, meta: dict, fault_point: str = "save") -> None:
    """Saves and waits until the checkpoint is committed (renamed from its temporary name).

    A failed write (disk full, read-only folder) is a UserError; orbax's temporary folder is
    never seen as a checkpoint, so the last committed one stays the one a resume starts from."""
    try:
      self._manager.save(key, args=ocp.args.Composite(
          state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)),
          force=True)
      if faults.armed(fault_point, key):  # kill while orbax's temporary folder exists
        _wait_for_temporary(self.directory, key)
      faults.maybe_kill(fault_point, key)
      self._manager.wait_until_finished()
    except UserError:
      raise
    except Exception as e:  # orbax wraps the OSError of a full disk in its own errors
      raise UserError(f"cannot write checkpoint {self.directory}/{key}: {_describe(e)}; the "
                      "last complete checkpoint is kept") from None
    if jax.process_index() == 0:
      write_checksums(os.path.join(self.directory, str(key)))

  def delete(self, key: int) -> None:
    self._manager.delete(key)

  def _verify(self, key: int) -> None:
    """UserError unless the checkpoint's state and meta files match their checksums. One
    committed without them (a kill between orbax's commit and the checksum file) gets them
    now, when this is the run that writes the workdir."""
    folder = os.path.join(self.directory, str(key))
    if not verify_checksums(folder):
      raise UserError(f"checkpoint {self.directory}/{key} is corrupt: its files differ from "
                      "the checksums saved with it; move it away to resume from an earlier one")
    if not has_checksums(folder) and not self._read_only and jax.process_index() == 0:
      write_checksums(folder)

  def meta(self, iteration: int) -> dict:
    self._verify(iteration)
    try:
      meta = self._manager.restore(iteration, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise UserError(f"checkpoint {self.directory}/{iteration} is unreadable "
                      f"({type(e).__name__}); move it away to resume from an earlier one") from None
    if not isinstance(meta, dict):
      raise UserError(f"checkpoint {self.directory}/{iteration} is unreadable (its meta is not "
                      "an object); move it away to resume from an earlier one")
    return meta

  def check_compatible(self, iteration: int, model: str, params: PyTree) -> dict:
    """The checkpoint's metadata; UserError if it holds another model or other shapes."""
    meta = self.meta(iteration)
    if meta.get("model") != model:
      raise UserError(f"workdir holds checkpoints of model '{meta.get('model')}', this run is "
                      f"'{model}': use another --workdir ({self.directory})")
    want = param_shapes(params)
    if meta.get("param_shapes") != want:
      got = meta.get("param_shapes") if isinstance(meta.get("param_shapes"), dict) else {}
      diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      raise UserError(f"workdir holds checkpoints of '{model}' with other parameter shapes "
                      f"(first difference: {diff[0]}: {got.get(diff[0])} there, "
                      f"{want.get(diff[0])} here; other --widths?): use another --workdir or "
                      f"the run's own settings ({self.directory})")
    if "mask_shapes" in meta and meta["mask_shapes"] != want:
      raise UserError(f"workdir holds checkpoints of '{model}' whose masks do not match its "
                      f"parameters: use another --workdir ({self.directory})")
    return meta

  def restore(self, iteration: int, target: PyTree) -> PyTree:
    """The state saved at `iteration`, as NumPy arrays shaped like `target`.

    The files are first checked against the checksums written when the checkpoint was saved:
    a flipped or truncated byte is an error, never silently restored weights.
    """
    self._verify(iteration)
    abstract = jax.tree.map(np.asarray, jax.device_get(target))
    try:
      return self._manager.restore(iteration, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise UserError(f"checkpoint {self.directory}/{iteration} could not be restored "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                      ) from None

  def close(self) -> None:
    # Orbax removes leftover temporary checkpoints in a background future that close() does not
    # await; a quick exit would then race it at interpreter shutdown.
    pending = getattr(self._manager, "_cleanup_tmp_directory_future", None)
    if pending is not None:
      try:
        pending.result()
      except Exception:  # noqa: BLE001  (cleanup is best effort; the run's error matters more)
        pass
    self._manager.close()
