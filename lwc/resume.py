"""Resuming a run: where it stopped, whether its settings may change now, and its saved states.

A workdir holds one checkpoint per finished iteration (checkpoints/N) and at most one mid-phase
checkpoint (progress/STEP). A run resumes after the latest iteration, or inside the next one when
the progress checkpoint belongs to it. The checkpoint's metadata records the network
(lwc.network), the settings and the history, so a workdir restores without the data.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import logging
import os

import jax
import numpy as np

from lwc import checkpoints as ckpt_lib
from lwc import config as config_lib
from lwc import masks as masks_lib
from lwc import network as network_lib
from lwc import regularization
from lwc.errors import UserError

log = logging.getLogger("lwc")


def state_template(config, params, model_state, iteration: int) -> dict:
  """The structure a checkpoint of `iteration` holds (opt_state depends on that phase's
  optimiser; `model_state` only when the model has one)."""
  template = {"params": params, "masks": masks_lib.init_masks(params),
              "opt_state": regularization.phase_optimizer(config, iteration, 1).init(params),
              "step": np.int32(0), "rng": jax.random.PRNGKey(0)}
  if model_state:
    template["model_state"] = model_state
  return template


def metadata(config, network, params, masks, history, **extra) -> dict:
  """A checkpoint's metadata: the network and settings to rebuild it, and the history so far."""
  return {"model": config.model, "network": network.to_json(),
          "param_shapes": ckpt_lib.param_shapes(params),
          "mask_shapes": ckpt_lib.param_shapes(masks), "config": config.to_json(),
          "history": history, **extra}


def _template_of(network, config, iteration: int) -> dict:
  built = network_lib.build(network, jax.random.PRNGKey(0), abstract=True)
  params = network_lib.zeros_like_abstract(built.params)
  model_state = network_lib.zeros_like_abstract(built.model_state)
  return state_template(config, params, model_state, iteration)


def restore_iteration(workdir: str, config=None, iteration: int | None = None) -> dict:
  """The state saved at `iteration` (default: the latest) as NumPy arrays: {'params', 'masks',
  'opt_state', 'step', 'rng'} (and 'model_state' for models with one), plus 'network' (the
  `lwc.network.Network` it was saved with) and 'config'. `config`: the run's settings (default:
  those the checkpoint records)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir}: no checkpoints/ folder (not a workdir of a run)")
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    iteration = checkpoints.latest_iteration() if iteration is None else iteration
    if iteration is None:
      raise UserError(f"no checkpoint in {checkpoints.directory}")
    have = checkpoints.iterations()
    if iteration not in have:
      raise UserError(f"no checkpoint of iteration {iteration} in {checkpoints.directory}; it "
                      f"has {', '.join(map(str, sorted(have))) or 'none'}")
    return restore_from(checkpoints, iteration, config)
  finally:
    checkpoints.close()


def restore_from(checkpoints: ckpt_lib.Checkpoints, iteration: int, config=None) -> dict:
  """`restore_iteration` from an open `Checkpoints`."""
  meta = checkpoints.meta(iteration)
  if config is None:
    config = config_lib.Config.from_json(dict(meta.get("config", {})))
  network = network_lib.from_meta(meta, config)
  template = _template_of(network, config, iteration)
  checkpoints.check_compatible(iteration, meta.get("model", config.model), template["params"])
  state = checkpoints.restore(iteration, template)
  return {**state, "network": network, "config": config}


def resume_point(checkpoints, progress, config, params) -> tuple[int | None, int | None]:
  """(latest iteration checkpoint, progress checkpoint to resume from or None).

  A progress checkpoint counts only if it belongs to the iteration after the latest complete one;
  older ones are left over from a kill between an iteration's save and their deletion.
  """
  latest = checkpoints.latest_iteration()
  if latest is not None:
    checkpoints.check_compatible(latest, config.model, params)
  key = progress.latest_iteration()
  if key is None:
    return latest, None
  meta = progress.check_compatible(key, config.model, params)
  if meta["iteration"] != (0 if latest is None else latest + 1):
    return latest, None
  return latest, key


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: the first iteration to run, the global step, the trees, the history
  so far, and for a mid-phase resume the progress checkpoint's meta and optimiser state."""

  iteration: int
  step: int
  params: object
  masks: object
  model_state: object
  history: list
  mid_meta: dict | None = None
  mid_opt_state: object = None


def find_start(config, workdir, checkpoints, progress, params, masks, model_state) -> Start:
  """The `Start` of a run in `workdir` whose fresh trees are (params, masks, model_state)."""
  latest, progress_key = resume_point(checkpoints, progress, config, params)
  if latest is None and progress_key is None:
    if config.init_checkpoint:
      params, masks, model_state = initial_weights(config, params, masks, model_state)
    return Start(0, 0, params, masks, model_state, [])
  source, key = (progress, progress_key) if progress_key is not None else (checkpoints, latest)
  meta = source.meta(key)
  mid = progress_key is not None
  check_resume_settings(config, meta.get("config"), workdir,
                        pruned=meta["iteration"] if mid else latest,
                        mid_phase=meta["iteration"] if mid else None)
  iteration = meta["iteration"] if mid else latest
  restored = source.restore(key, state_template(config, params, model_state, iteration))
  if mid:
    log.info("resuming from %s/%d (iteration %d %s, epoch %d, step %d)", progress.directory,
             key, meta["iteration"], meta["phase"], meta["epoch"] + 1, int(restored["step"]))
  else:
    log.info("resuming from %s/%d (step %d)", checkpoints.directory, latest,
             int(restored["step"]))
  return Start(iteration=iteration if mid else latest + 1, step=int(restored["step"]),
               params=restored["params"], masks=restored["masks"],
               model_state=restored.get("model_state", model_state), history=meta["history"],
               mid_meta=meta if mid else None,
               mid_opt_state=restored["opt_state"] if mid else None)


def initial_weights(config, params, masks, model_state):
  """(params, masks, model_state) from --init_checkpoint: an lwc workdir (its latest iteration,
  or DIR:N), or a pretrained weights file (.npz / .safetensors, `lwc.pretrained`) with all-ones
  masks."""
  path = config.init_checkpoint
  if os.path.isfile(path):
    from lwc import pretrained
    loaded = pretrained.load_pretrained(path, config.model, jax.device_get(params))
    log.info("initial weights from %s", path)
    return loaded, masks, model_state
  folder, _, iteration = path.rpartition(":") if ":" in path else (path, "", "")
  if iteration and not iteration.isdigit():
    raise UserError(f"--init_checkpoint={path}: expected a weights file, DIR or DIR:ITERATION")
  if not os.path.isdir(os.path.join(folder, "checkpoints")):
    raise UserError(f"--init_checkpoint={path}: neither a weights file nor a workdir with "
                    "checkpoints/")
  try:
    state = restore_iteration(folder, None, int(iteration) if iteration else None)
  except UserError as e:
    raise UserError(f"--init_checkpoint={path}: {e}") from None
  want, got = ckpt_lib.param_shapes(params), ckpt_lib.param_shapes(state["params"])
  if want != got:
    raise UserError(f"--init_checkpoint={path}: its network ({state['network'].model}) has "
                    "other parameters than this run's; masks do not match its parameters")
  counts = masks_lib.total_counts(state["masks"])
  log.info("initial weights and masks from %s (%d of %d weights kept)", path, counts["nonzero"],
           counts["weights"])
  return state["params"], state["masks"], state.get("model_state", model_state)


# Settings a resumed run may change at any time: where files are and how it reports, never
# what it computes.
RESUME_FREE = frozenset({"data_dir", "download", "init_checkpoint", "tensorboard",
                         "log_every_seconds", "checkpoint_every_steps", "eval_batch_size",
                         "steps_per_call", "remove_dead_neurons", "iterations",
                         "train_eval_examples"})
# Settings of pruning and retraining: they may change between iterations (each iteration records
# what it ran with), not in the middle of a retraining phase.
RESUME_BETWEEN_ITERATIONS = frozenset({
    "retrain_epochs", "final_retrain_epochs", "retrain_lr_scale", "retrain_lr_schedule",
    "retrain_regularization", "retrain_reg_strength", "std_of", "probabilistic_pruning",
    "target_compression", "max_error_increase", "sensitivity_examples", "layer_densities",
    "recalibration_batches", "threshold_scope", "density_schedule", "schedule_power",
    "lr_rewind", "distill_weight", "distill_temperature", "allocation_metric",
    "sweep_split", "retrain_label_smoothing", "retrain_average_decay",
    "dropout_rescale", "retrain_dropout"})
# Per-iteration lists: the values of iterations already pruned must stay.
RESUME_PER_ITERATION = frozenset({"qualities", "layer_qualities", "prune_groups"})
_FLAG_NAMES = {"qualities": "quality", "layer_qualities": "layer_quality",
               "layer_densities": "layer_density"}
# Pure I/O settings, left out of each iteration's record of the settings it ran with.
_NOT_RECORDED = ("data_dir", "download", "tensorboard", "log_every_seconds",
                 "checkpoint_every_steps", "remove_dead_neurons")


def iteration_settings(config: config_lib.Config) -> dict:
  """The settings an iteration ran with, as recorded in its history entry."""
  return {k: v for k, v in config.to_json().items() if k not in _NOT_RECORDED}


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if value is None:
    return "''"
  if isinstance(value, (list, tuple)):
    return ",".join(_flag_value(v) for v in value) or "''"
  if isinstance(value, dict):
    return " ".join(f"{k}={':'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in value.items()) or "''"
  if isinstance(value, float):
    return f"{value:g}"
  return str(value) if value != "" else "''"


def check_resume_settings(config: config_lib.Config, saved: Mapping | None, workdir: str,
                          pruned: int, mid_phase: int | None) -> None:
  """UserError naming every flag whose value differs from the run being resumed, among those
  that may not change now (`RESUME_*` above say which may). `pruned`: the last iteration whose
  pruning is done; `mid_phase`: the iteration a mid-phase resume continues, else None."""
  if not isinstance(saved, Mapping):
    return  # a checkpoint of a version that did not save its settings
  new = json.loads(json.dumps(config.to_json()))
  # A setting added after the run was saved: the run computed what its default computes (every
  # new setting's default keeps the behaviour from before it existed).
  old = {**json.loads(json.dumps(config_lib.Config().to_json())),
         **json.loads(json.dumps(dict(saved)))}
  problems = []

  def differs(key, before, after):
    flag = _FLAG_NAMES.get(key, key)
    problems.append(f"--{flag}={_flag_value(before)} (now {_flag_value(after)})")

  in_retraining = mid_phase is not None and mid_phase > 0
  for key in sorted(new):
    if key in RESUME_FREE or key in RESUME_PER_ITERATION:
      continue
    if key in RESUME_BETWEEN_ITERATIONS and not in_retraining:
      continue
    if old[key] != new[key]:
      differs(key, old[key], new[key])
  try:
    before = config_lib.Config.from_json(old)
  except (TypeError, ValueError):
    before = None
  for it in range(1, pruned + 1) if before is not None else ():
    try:
      pairs = [("qualities", before.quality(it), config.quality(it)),
               ("prune_groups", before.prune_group(it), config.prune_group(it))]
    except IndexError:  # fewer iterations now: those past the end will not run
      continue
    for key, a, b in pairs:
      if a != b:
        flag = "quality" if key == "qualities" else key
        what = (" ".join(f"{k}={v:g}" for k, v in a.items()) if isinstance(a, dict) else a,
                " ".join(f"{k}={v:g}" for k, v in b.items()) if isinstance(b, dict) else b)
        problems.append(f"--{flag} of iteration {it}: {_flag_value(what[0])} (now "
                        f"{_flag_value(what[1])})")
  if problems:
    where = (f"in the middle of iteration {mid_phase}" if mid_phase is not None else
             f"after iteration {pruned}")
    raise UserError(f"{workdir} holds a run with other settings, which cannot change when "
                    f"resuming {where}: {', '.join(problems)}; rerun with the old values or "
                    "use another --workdir")
