"""The three-step method: train dense -> (prune -> retrain) x N, resumable per iteration.

Read it top to bottom: `run` checks the settings, loads the data (lwc.data), builds the network
from them (lwc.network) and takes the workdir; `_run_iterations` runs iteration 0 (dense training)
and then, per iteration, plans and applies the pruning (lwc.iterative, section 3.4),
re-estimates BatchNorm statistics (lwc.batchnorm), sets the phase's optimiser and penalty
(lwc.regularization, 3.1), the dropout rates (lwc.dropout, 3.2) and the frozen group
(lwc.local_retraining, 3.3), retrains (lwc.loop) and checkpoints (lwc.resume); `_finish` writes
figures, the smaller model (lwc.neuron_removal, 3.5) and the summary (lwc.writers).

Every random choice (init, data order, dropout) is derived from `seed`, the iteration and the
epoch, so a resumed run ends exactly where an uninterrupted one does. Decisions (the compression
target's sweeps, stop and best iteration) read the validation split; the test split is reported.

Workdir outputs: `checkpoints/`, `metrics.jsonl` (one line per evaluation), `summary.json`
and `summary.md` (per-iteration and per-layer tables), `figures/`, `small_model/`,
and TensorBoard event files under `tensorboard/` when enabled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from lwc import admm
from lwc import batchnorm
from lwc import checkpoints as ckpt_lib
from lwc import config as config_lib
from lwc import distillation
from lwc import dropout as dropout_lib
from lwc import iterative
from lwc import local_retraining
from lwc import lock as lock_lib
from lwc import loop
from lwc import masks as masks_lib
from lwc import models
from lwc import network as network_lib
from lwc import neuron_removal
from lwc import regularization
from lwc import resume
from lwc import train as train_lib
from lwc import writers
from lwc.config import MAX_INT, Config  # noqa: F401  (the pipeline's public names)
from lwc.dropout import dropout_rates  # noqa: F401
from lwc.errors import UserError
from lwc.loop import NumericError, Preempted  # noqa: F401
from lwc.resume import check_resume_settings, iteration_settings, restore_iteration  # noqa: F401

log = logging.getLogger("lwc")
STREAMED_DATASETS = ("imagenet2012",)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every step of one run reads (nothing in it changes while the run goes on)."""

  config: Config
  workdir: str
  network: network_lib.Network
  model_fn: Any
  parallel: train_lib.Parallel
  data: Any
  sigterm: loop.Sigterm
  checkpoints: ckpt_lib.Checkpoints
  progress: ckpt_lib.Checkpoints
  writers: writers.Writers
  root: jax.Array
  dropout_key: jax.Array


def open_data(config: Config, parallel: train_lib.Parallel):
  """The run's data: ImageNet-like TFDS sets streamed, everything else resident on devices."""
  if config.dataset in STREAMED_DATASETS:
    from lwc.data import streamed
    return streamed.StreamedData(parallel, config)
  from lwc.data import resident, sources
  if config.data_dir and not config.data_dir.endswith(".npz") and not os.path.isdir(
      config.data_dir):
    raise UserError(f"--data_dir={config.data_dir}: no such directory")
  dataset = sources.load(config.dataset, config.data_dir or None, download=config.download,
                         train_split=config.train_split, test_split=config.test_split,
                         validation=0, allow_no_validation=True)
  return resident.ResidentData(parallel, config, dataset)


def run(config: Config, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline in `workdir`; returns the summary also written there.

  Raises UserError for bad configuration, data or workdir (nothing on disk is changed then),
  NumericError (a UserError) when the loss or the parameters stop being finite, and Preempted
  after SIGTERM once a checkpoint is saved.
  """
  config.validate()
  for line in config_lib.settings_without_effect(config):
    log.warning("%s", line)
  models.resolve_model(config.model)  # unknown model: fail before reading any data
  _check_widths(config)
  parallel = train_lib.Parallel.over_all_devices()
  parallel.check_batch_size(config.batch_size)
  _check_workdir(workdir)
  # SIGTERM from here on (data loading included) stops the run cleanly: before training starts
  # with nothing written, later with a checkpoint.
  with loop.Sigterm() as sigterm:
    data = open_data(config, parallel)
    network = network_lib.from_config(config, data.image_shape, data.num_classes)
    root = jax.random.PRNGKey(config.seed)
    init_key, _, dropout_key = jax.random.split(root, 3)
    built = network_lib.build(network, init_key, config.seed)
    _check_against_model(config, built.params)
    if sigterm.received:
      raise Preempted("SIGTERM while loading the data, before anything was written; run the "
                      "same command again to start")
    created = _make_dirs(workdir)
    try:
      with lock_lib.WorkdirLock(workdir):
        checkpoints = ckpt_lib.Checkpoints(workdir)
        progress = ckpt_lib.Checkpoints(workdir, "progress", keep_latest=1)
        try:
          start = resume.find_start(config, workdir, checkpoints, progress, built.params,
                                    masks_lib.init_masks(built.params), built.model_state)
          ctx = _Run(config, workdir, network, built.model_fn, parallel, data, sigterm,
                     checkpoints, progress, _writers(config, workdir, start), root, dropout_key)
          return _run_iterations(ctx, start)
        finally:
          checkpoints.close()
          progress.close()
    except (UserError, Preempted):
      for folder in created:  # innermost first; only folders this run made and left empty
        if os.path.isdir(folder) and not os.listdir(folder):
          os.rmdir(folder)
      raise


def _writers(config: Config, workdir: str, start: resume.Start) -> writers.Writers:
  """metrics.jsonl kept up to the resume point (the lines of redone work are dropped)."""
  mid = start.mid_meta is not None
  return writers.Writers(workdir, config.tensorboard,
                         lambda r: r["iteration"] < start.iteration or
                         (mid and r["iteration"] == start.iteration and r["step"] <= start.step))


def _run_iterations(ctx: _Run, start: resume.Start) -> dict:
  t_start = time.perf_counter()
  config, replicate = ctx.config, ctx.parallel.replicate
  history, step = list(start.history), start.step
  trees = replicate((start.params, start.masks, start.model_state))
  mid, teacher = start.mid_meta, None
  for iteration in range(start.iteration, config.iterations + 1):
    loop.check_preempted(ctx.sigterm, loop.Phase(iteration, "start", 0), step)
    if iteration > 0 and mid is None and (reason := iterative.target_stop(config, history)):
      log.info("stopping before iteration %d: %s", iteration, reason)
      break
    if iteration > 0 and config.distill_weight > 0 and teacher is None:
      teacher = _dense_teacher(ctx)
    state, step, row = _iteration(ctx, iteration, trees, step, history, mid,
                                  start.mid_opt_state, teacher)
    mid = None
    trees = (state.params, state.masks, state.model_state)
    history.append(row)
    log.info("iteration %d done: %d/%d weights (%.1fx), %s", iteration, row["params_nonzero"],
             row["params_total"], row["compression"], _errors_text(row))
    ctx.checkpoints.save(iteration, _state_tree(state, step, ctx.root),
                         resume.metadata(config, ctx.network, state.params, state.masks, history))
    for key in ctx.progress.iterations():
      ctx.progress.delete(key)
  return _finish(ctx, history, *trees, time.perf_counter() - t_start)


def _dense_teacher(ctx: _Run) -> distillation.Teacher:
  """The network after dense training (iteration 0's checkpoint, so a resumed run distils from
  the very same weights), the teacher of every retraining with --distill_weight."""
  dense = resume.restore_from(ctx.checkpoints, 0, ctx.config)
  params, model_state = ctx.parallel.replicate((dense["params"], dense.get("model_state", {})))
  log.info("retraining distils from the dense network (weight %g, temperature %g)",
           ctx.config.distill_weight, ctx.config.distill_temperature)
  return distillation.Teacher(params, model_state, weight=ctx.config.distill_weight,
                              temperature=ctx.config.distill_temperature)


def _state_tree(state, step: int, root) -> dict:
  """What a checkpoint holds of a TrainState (model_state only when the model has one)."""
  tree = {"params": state.params, "masks": state.masks, "opt_state": state.opt_state,
          "step": np.int32(step), "rng": root}
  if state.model_state:
    tree["model_state"] = state.model_state
  return tree


def _errors_text(result: dict, when: str = "") -> str:
  parts = [f"{split} error{when} {100 * result[f'{split}_error{when}']:.2f}%"
           for split in ("train_sample", "validation", "test") if f"{split}_error{when}" in result]
  return ", ".join(parts)


def _iteration(ctx: _Run, iteration: int, trees, step: int, history: list, mid, mid_opt_state,
               teacher: distillation.Teacher | None = None):
  """One iteration: pruning (iteration >= 1) and its phase of training; returns (state, step,
  history row). `mid`: the progress checkpoint's meta when resuming inside this iteration;
  `teacher`: the network a retraining distils from (None: none; the caller never passes one
  to dense training)."""
  config = ctx.config
  t_iter = time.perf_counter()
  params, masks, model_state = trees
  name = "dense" if iteration == 0 else "retrain"
  if mid is not None:
    plan, outcome, first_step = mid["plan"], mid["outcome"], mid["phase_start_step"]
  else:
    plan, outcome, first_step = {}, {}, step
    if iteration > 0:
      params, masks, model_state, plan, outcome = _prune_step(
          ctx, iteration, params, masks, model_state, step, history[0].get("dense_reference"),
          history[-1].get("admm_keep"))
  epochs = config.phase_epochs(iteration)
  if config.admm_rho and iteration > 0 and "admm_keep" not in outcome:
    keep = admm.next_keep(config, iteration, params, masks, plan)
    outcome = {**outcome, **({"admm_keep": keep} if keep else {})}
  tx = regularization.phase_optimizer(config, iteration, epochs * ctx.data.steps_per_epoch,
                                      local_retraining.frozen_layers(config, iteration, params),
                                      admm_keep=outcome.get("admm_keep"),
                                      steps_per_epoch=ctx.data.steps_per_epoch)
  rates = dropout_lib.dropout_rates(config, masks, iteration)
  if rates:
    log.info("iteration %d %s: dropout %s", iteration, name,
             ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
  train_fn = (network_lib.build(ctx.network, jax.random.PRNGKey(0), config.seed, dropout=rates,
                                abstract=True).model_fn if rates else ctx.model_fn)
  state = train_lib.TrainState.create(train_fn, params, masks, tx, step=step - first_step,
                                      model_state=model_state)
  phase = loop.Phase(iteration, name, epochs, first_step=first_step)
  if mid is not None:
    state = state.replace(opt_state=mid_opt_state)
    phase = dataclasses.replace(phase, start_epoch=mid["epoch"], start_batch=mid["batch"])

  def save_progress(state, step, epoch, batch):
    meta = resume.metadata(config, ctx.network, state.params, state.masks, history,
                           iteration=iteration, phase=name, epoch=epoch, batch=batch, plan=plan,
                           outcome=outcome, phase_start_step=first_step)
    ctx.progress.save(step, _state_tree(state, step, ctx.root), meta, fault_point="progress")
    log.info("checkpoint at step %d (iteration %d, epoch %d): %s/%d", step, iteration,
             epoch + 1, ctx.progress.directory, step)

  last_iterate = {}

  def end_of_epoch(state, step, epoch):
    result = _log_eval(ctx, iteration, name, step, state.params, state.masks, state.model_state)
    last_iterate.update(result)
    log.info("iteration %d %s epoch %d/%d: %s (test cross-entropy %.4f)", iteration, name,
             epoch + 1, epochs, _errors_text(result), result["test_loss"])

  state, step = loop.run_phase(
      phase, ctx.parallel.replicate(state), ctx.data, jax.random.fold_in(ctx.dropout_key,
                                                                         iteration),
      sigterm=ctx.sigterm, checkpoint_every_steps=config.checkpoint_every_steps,
      log_every_seconds=config.log_every_seconds, save_progress=save_progress,
      end_of_epoch=end_of_epoch, teacher=teacher,
      label_smoothing=regularization.label_smoothing(config, iteration))
  if (decay := regularization.average_decay(config, iteration)) and epochs:
    state = _use_average(ctx, iteration, state, decay)
    outcome = {**outcome, "average": {"decay": decay, **{
        f"{k}_last_iterate": v for k, v in last_iterate.items() if k.endswith("_error")}}}
  row = {"iteration": iteration, "phase": name, **plan, **outcome,
         **({"dropout": rates} if rates else {}), "settings": iteration_settings(config),
         **({"admm_residual": admm.residual(state.params, outcome["admm_keep"])}
            if outcome.get("admm_keep") else {}),
         "step": step, **_results(ctx, state.params, state.masks, state.model_state),
         "layer_table": ctx.data.layer_table(ctx.model_fn, state.params, state.masks,
                                             state.model_state),
         **({"dense_reference": iterative.dense_reference(state.params, state.masks)}
            if iteration == 0 else {}),
         "seconds": time.perf_counter() - t_iter}
  if "admm_residual" in row:
    log.info("iteration %d: ADMM pulled toward the next cut (%s); the share of each layer's norm "
             "that cut removes: %s", iteration,
             ", ".join(f"{k} {v}" for k, v in outcome["admm_keep"].items()),
             ", ".join(f"{k} {v:.3f}" for k, v in row["admm_residual"].items()))
  return state, step, row


def _use_average(ctx: _Run, iteration: int, state, decay: float):
  """The phase's result with an --average_decay: the moving average of its iterates in place of
  the last one (same masks; pruned weights exactly 0.0), with BatchNorm statistics re-estimated
  for it on --recalibration_batches training batches when the model has any."""
  from lwc import averaging
  state = state.replace(params=averaging.averaged(state.opt_state))
  config = ctx.config
  log.info("iteration %d: the moving average of the phase's iterates (decay %g) replaces its "
           "last iterate", iteration, decay)
  if config.recalibration_batches and batchnorm.statistic_names(state.model_state):
    model_state = batchnorm.recalibrate_batch_stats(
        ctx.model_fn, state.params, state.model_state,
        ctx.data.recalibration_batches(iteration, config.recalibration_batches),
        jax.random.fold_in(ctx.dropout_key, 2_000_003 + iteration))
    state = state.replace(model_state=ctx.parallel.replicate(model_state))
  return state


def _evaluate(ctx: _Run, params, model_state, model_fn=None) -> dict:
  """{split_error, split_loss[, split_top5_error]} on every evaluated split."""
  out = {}
  for split in ctx.data.splits:
    result = ctx.data.evaluate(model_fn or ctx.model_fn, params, model_state, split)
    out[f"{split}_error"], out[f"{split}_loss"] = result["error"], result["loss"]
    if "top5_error" in result:
      out[f"{split}_top5_error"] = result["top5_error"]
  return out


def _results(ctx: _Run, params, masks, model_state) -> dict:
  counts = masks_lib.total_counts(masks)
  return {**_evaluate(ctx, params, model_state), "params_total": counts["weights"],
          "params_nonzero": counts["nonzero"], "compression": counts["compression"],
          "layers": masks_lib.layer_counts(masks)}


def _log_eval(ctx: _Run, iteration: int, phase: str, step: int, params, masks,
              model_state) -> dict:
  """Evaluates every split and appends the metrics.jsonl line (and TensorBoard scalars)."""
  result = _evaluate(ctx, params, model_state)
  record = {"iteration": iteration, "phase": phase, "step": step, "loss": result["test_loss"],
            **{k: v for k, v in result.items() if k != "test_loss"},
            "params_nonzero": masks_lib.total_counts(masks)["nonzero"]}
  ctx.writers.write(record)
  return result


def _prune_step(ctx: _Run, iteration: int, params, masks, model_state, step: int, dense,
                prepared=None):
  """Section 3.4's pruning of `iteration`, then BatchNorm statistics re-estimated for the
  pruned weights; `prepared`: the keep counts the last retraining's ADMM pulled toward, if any.
  Returns (params, masks, model_state, plan record, outcome record)."""
  config = ctx.config

  def sweep_on(params, masks):
    from lwc import sensitivity
    images, labels = ctx.data.sweep_set(config.sensitivity_examples)
    return sensitivity.sweep(ctx.model_fn, params, masks, images, labels, ks=(1,),
                             std_of=iterative.mask_std_of(config),
                             model_state=model_state or None)

  plan = iterative.plan_pruning(config, iteration, params, masks, sweep_on, dense, prepared)
  params, masks = iterative.prune(plan, config, ctx.root, params, masks)
  outcome = iterative.pruning_outcome(iteration, masks)
  after = _log_eval(ctx, iteration, "prune", step, params, masks, model_state)
  outcome.update({f"{k}_after_prune": v for k, v in after.items() if k.endswith("_error")})
  counts = masks_lib.total_counts(masks)
  log.info("iteration %d: pruned to %d of %d weights (%.1fx), %s before retraining", iteration,
           counts["nonzero"], counts["weights"], counts["compression"], _errors_text(after))
  if config.recalibration_batches and batchnorm.statistic_names(model_state):
    model_state = batchnorm.recalibrate_batch_stats(
        ctx.model_fn, params, model_state,
        ctx.data.recalibration_batches(iteration, config.recalibration_batches),
        jax.random.fold_in(ctx.dropout_key, 1_000_003 + iteration))
    model_state = ctx.parallel.replicate(model_state)
    again = _log_eval(ctx, iteration, "recalibrate", step, params, masks, model_state)
    outcome["recalibration"] = {"batches": config.recalibration_batches,
                                **{f"{k}_before": v for k, v in after.items()
                                   if k.endswith("_error")},
                                **{f"{k}_after": v for k, v in again.items()
                                   if k.endswith("_error")}}
    log.info("iteration %d: BatchNorm statistics re-estimated on %d batches: %s", iteration,
             config.recalibration_batches, _errors_text(again))
  return params, masks, model_state, plan.to_json(), outcome


def _finish(ctx: _Run, history: list, params, masks, model_state, wall_seconds: float) -> dict:
  """Figures, the smaller model and the summary, once the iterations are done."""
  config = ctx.config
  small, figures = {}, {}
  if jax.process_index() == 0:
    figures = _write_figures(ctx) or {}
    if config.remove_dead_neurons and history:
      inputs = ctx.data.sample_images(64)
      small = neuron_removal.write_small_model(
          ctx.workdir, ctx.network, ctx.model_fn, params, masks, model_state, inputs,
          lambda fn, p, s: ctx.data.evaluate(fn, p, s, "test"))
  summary = {"model": config.model, "dataset": config.dataset, "network": ctx.network.to_json(),
             "data": {"source": ctx.data.description, "train": ctx.data.num_train,
                      "validation": ctx.data.num_validation},
             "decisions": config.decisions_split, "config": config.to_json(),
             "settings_without_effect": config_lib.settings_without_effect(config),
             "iterations": history, "final": history[-1] if history else None,
             "wall_seconds": wall_seconds}
  if config.target_compression and history:
    summary["target"] = iterative.target_summary(config, history)
    if jax.process_index() == 0:
      from lwc import plots  # matplotlib: imported only when a figure is drawn
      os.makedirs(os.path.join(ctx.workdir, "figures"), exist_ok=True)
      plots.error_vs_compression(
          history, os.path.join(ctx.workdir, "figures", "error_vs_compression.png"),
          history[0]["test_error"] + config.max_error_increase,
          f"{config.model}: toward {config.target_compression:g}x")
  summary["small_model"] = small
  if figures.get("skipped"):
    summary["figures_skipped"] = figures["skipped"]
  writers.write_summary(ctx.workdir, summary)
  return summary


def _write_figures(ctx: _Run) -> dict:
  """Figures 4 and 7 from the dense, first-pruned and final checkpoints."""
  checkpoints = ctx.checkpoints
  last = checkpoints.latest_iteration()
  if not last:
    return {}
  have = checkpoints.iterations()
  missing = [it for it in sorted({0, 1, last}) if it not in have]
  try:
    if missing:
      raise UserError(f"checkpoint(s) {', '.join(map(str, missing))} of "
                      f"{checkpoints.directory} are missing")
    dense, first, final = (resume.restore_from(checkpoints, it, ctx.config) for it in (0, 1, last))
  except UserError as e:  # the work is done: a figure never costs the summary
    log.warning("figures skipped: %s", e)
    return {"skipped": str(e)}
  from lwc import plots
  paths = plots.write_run_figures(ctx.workdir, dense["params"], first["masks"], final["params"],
                                  final["masks"])
  log.info("figures: %s", ", ".join(paths))
  return {"paths": [os.path.relpath(p, ctx.workdir) for p in paths]}


def _check_workdir(workdir: str) -> None:
  """The workdir's path, before any data is read: a UserError naming it and what is wrong."""
  if not workdir or not workdir.strip():
    raise UserError("--workdir is empty: give the run's directory")
  if "://" in workdir:
    raise UserError(f"--workdir={workdir}: lwc writes with POSIX file calls; mount the bucket "
                    "(e.g. gcsfuse at /gcs/BUCKET) and pass that path")
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise UserError(f"--workdir={workdir} is a dangling symbolic link (to "
                    f"{os.readlink(workdir)})")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is not a directory")
  # The nearest existing folder must be writable (the workdir itself, or where it is created).
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if os.path.lexists(path) or parent == path:
      break
    path = parent
  if not os.path.isdir(path):
    raise UserError(f"--workdir={workdir}: {path} is not a directory")
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir}: {path} is not writable (permission denied or a "
                    "read-only file system)")
  for sub in ("checkpoints", "progress", "figures", "metrics.jsonl", "summary.json"):
    child = os.path.join(workdir, sub)
    want_dir = sub in ("checkpoints", "progress", "figures")
    if os.path.lexists(child) and want_dir != os.path.isdir(child):
      raise UserError(f"--workdir={workdir}: {child} is "
                      f"{'not a directory' if want_dir else 'a directory'}; move it away")


def _make_dirs(path: str) -> list[str]:
  """os.makedirs(path), returning the folders it created, innermost first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  for folder in reversed(missing):
    os.mkdir(folder)
  return missing




def _check_widths(config: Config) -> None:
  """--widths against the built-in model's own number of widths (before any data is read)."""
  if not config.widths:
    return
  default = getattr(models.resolve_model(config.model), "widths", None)
  if isinstance(default, (tuple, list)) and len(config.widths) != len(default):
    raise UserError(f"--widths has {len(config.widths)} values; {config.model} takes "
                    f"{len(default)} (its own: {','.join(map(str, default))})")


def _check_against_model(config: Config, params) -> None:
  """Everything in `config` that names layers, checked on the model's params before any file
  is written: qualities, densities, prune groups, dropout layers."""
  for iteration in range(1, config.iterations + 1):
    masks_lib.resolve_qualities(params, config.quality(iteration))
    local_retraining.group_layers(config, iteration, params)
  layers = masks_lib.prunable_layers(params)
  unknown = sorted(set(config.layer_densities) - set(layers))
  if unknown:
    raise UserError(f"density given for unknown layer(s) {', '.join(unknown)}; prunable layers "
                    f"are {', '.join(layers)}")
  every_weight = jax.tree.map(lambda s: np.ones(np.shape(s), bool), params)
  for iteration in (0, 1) if config.iterations else (0,):
    dropout_lib.dropout_rates(config, every_weight, iteration)
