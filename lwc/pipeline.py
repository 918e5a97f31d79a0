"""The three-step method: train dense -> (prune -> retrain) x N, resumable per iteration.

Iteration 0 is dense training. Iteration i >= 1 prunes every prunable layer at that iteration's
quality (threshold quality * std of the layer's surviving weights, `lwc.masks.prune`) and then
retrains the survivors, from their trained values, with a fresh optimiser at
`learning_rate * retrain_lr_scale` (1/10 for LeNet in the paper). After each iteration the state
is evaluated and checkpointed; running again with the same workdir resumes after the last
complete checkpoint. Every random choice (init, data order, dropout) is derived from `seed`,
the iteration and the epoch, so a resumed run ends exactly where an uninterrupted one does.

Workdir outputs: `checkpoints/`, `metrics.jsonl` (one line per evaluation), `summary.json`
and `summary.md` (per-iteration and per-layer tables),
and TensorBoard event files under `tensorboard/` when enabled.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwc import checkpoints as ckpt_lib
from lwc import faults
from lwc import masks as masks_lib
from lwc import neurons
from lwc import optim
from lwc import plots
from lwc import report
from lwc import stats
from lwc import train as train_lib
from lwc.data import load_dataset
from lwc.errors import UserError
from lwc.models import get_model

log = logging.getLogger("lwc")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every hyper-parameter of a run (the experiment flags map onto these fields one to one)."""

  model: str = "lenet_300_100"
  dataset: str = "mnist"
  data_dir: str | None = None
  download: bool = True
  seed: int = 0
  batch_size: int = 100
  optimizer: str = "sgd"
  momentum: float = 0.9
  learning_rate: float = 0.1
  lr_schedule: str = "constant"
  retrain_lr_schedule: str = ""  # "" = same as lr_schedule
  lr_decay_steps: int = 0
  lr_decay_factor: float = 0.1
  dense_epochs: int = 20
  retrain_epochs: int = 10
  retrain_lr_scale: float = 0.1
  iterations: int = 5
  # Quality per iteration; a single value is used for every iteration.
  qualities: tuple[float, ...] = (1.0,)
  # Per-layer overrides: {layer: (q per iteration,)}, a single value broadcasts likewise.
  layer_qualities: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  std_of: str = "survivors"
  # Local pruning (section 3.3): which layer group each iteration prunes and retrains, the other
  # group frozen: 'all', 'fc' or 'conv'; one value applies to every iteration.
  prune_groups: tuple[str, ...] = ("all",)
  probabilistic_pruning: bool = False
  # Dropout rate D_o on the outputs of these hidden layers in dense training; retraining uses
  # D_r = D_o * sqrt(C_ir / C_io) from each layer's surviving connections (equation 2).
  dropout: float = 0.0
  dropout_layers: tuple[str, ...] = ()
  # After the last iteration, write a physically smaller model without dead neurons.
  remove_dead_neurons: bool = True
  regularization: str = "l2"
  reg_strength: float = 1e-4
  retrain_regularization: str = "l2"
  retrain_reg_strength: float = 1e-4
  # Steps fused into one jitted call (lax.scan); 0 = a whole epoch (fastest on CPU for both
  # LeNets, benchmarks/RESULTS.md). Checkpoints and SIGTERM take effect between calls.
  steps_per_call: int = 0
  eval_batch_size: int = 2000
  tensorboard: bool = True
  log_every_seconds: float = 5.0

  def validate(self) -> None:
    def positive(name):
      if not getattr(self, name) > 0:
        raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
    for name in ("batch_size", "learning_rate", "retrain_lr_scale", "eval_batch_size"):
      positive(name)
    for name in ("dense_epochs", "retrain_epochs", "iterations", "steps_per_call"):
      if getattr(self, name) < 0:
        raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.iterations > 0 and len(self.qualities) not in (1, self.iterations):
      raise UserError(f"qualities has {len(self.qualities)} values; give 1 or iterations="
                      f"{self.iterations}")
    for layer, qs in self.layer_qualities.items():
      if len(qs) not in (1, self.iterations):
        raise UserError(f"layer quality for {layer} has {len(qs)} values; give 1 or "
                        f"iterations={self.iterations}")
    for q in list(self.qualities) + [q for qs in self.layer_qualities.values() for q in qs]:
      if not (isinstance(q, (int, float)) and math.isfinite(q) and q >= 0):
        raise UserError(f"quality must be a finite number >= 0, got {q}")
    if self.iterations > 0 and len(self.prune_groups) not in (1, self.iterations):
      raise UserError(f"prune_groups has {len(self.prune_groups)} values; give 1 or iterations="
                      f"{self.iterations}")
    for group in self.prune_groups:
      if group not in ("all", "fc", "conv"):
        raise UserError(f"prune group must be all, fc or conv, got '{group}'")
    for name in ("regularization", "retrain_regularization"):
      if getattr(self, name) not in ("none", "l1", "l2"):
        raise UserError(f"{name} must be none, l1 or l2, got '{getattr(self, name)}'")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.std_of not in ("survivors", "all"):
      raise UserError(f"std_of must be survivors or all, got '{self.std_of}'")

  def quality(self, iteration: int) -> dict[str, float] | float:
    """The quality argument of `masks.prune` for iteration >= 1."""
    def pick(qs):
      return float(qs[0] if len(qs) == 1 else qs[iteration - 1])
    if not self.layer_qualities:
      return pick(self.qualities)
    return {"default": pick(self.qualities),
            **{k: pick(v) for k, v in self.layer_qualities.items()}}

  def prune_group(self, iteration: int) -> str:
    """The layer group pruned and retrained at iteration >= 1 ('all', 'fc' or 'conv')."""
    groups = self.prune_groups
    return groups[0] if len(groups) == 1 else groups[iteration - 1]

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["dropout_layers"] = list(self.dropout_layers)
    d["qualities"] = list(self.qualities)
    d["prune_groups"] = list(self.prune_groups)
    d["layer_qualities"] = {k: list(v) for k, v in self.layer_qualities.items()}
    return d


class _Progress:
  """Console progress for a phase: step, loss, steps/s, ETA, at most every `every` seconds."""

  def __init__(self, label: str, total_steps: int, every: float):
    self.label, self.total, self.every = label, total_steps, every
    self.start = self.last = time.perf_counter()
    self.done = 0

  def update(self, steps: int, loss: float, force: bool = False) -> None:
    self.done += steps
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    log.info("%s step %d/%d loss %.4f %.0f steps/s ETA %.0fs", self.label, self.done,
                 self.total, loss, rate, eta)


class _Writers:
  """metrics.jsonl and (optionally) TensorBoard scalars, from process 0 only."""

  def __init__(self, workdir: str, tensorboard: bool, resume_after: int | None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      # Drop lines of an iteration that was not checkpointed: it is about to be redone.
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            if resume_after is not None and json.loads(line)["iteration"] <= resume_after:
              keep.append(line)
          except (json.JSONDecodeError, KeyError):
            continue
      with open(self.path, "w") as f:
        f.writelines(keep)
    if tensorboard:
      from flax.metrics import tensorboard as tb  # imports TensorFlow
      self.tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      prefix = f"{record['phase']}/"
      for key in ("loss", "test_error", "params_nonzero"):
        self.tb.scalar(prefix + key, record[key], record["step"])
      self.tb.flush()


def _lr(config: Config, iteration: int, total_steps: int):
  base = config.learning_rate * (1.0 if iteration == 0 else config.retrain_lr_scale)
  kind = config.lr_schedule if iteration == 0 else (config.retrain_lr_schedule or
                                                    config.lr_schedule)
  return optim.learning_rate_schedule(kind, base, total_steps,
                                      decay_steps=config.lr_decay_steps,
                                      decay_factor=config.lr_decay_factor)


def dropout_rates(config: Config, masks) -> dict[str, float]:
  """Equation 2: D_r = D_o * sqrt(C_ir / C_io) per dropout layer, from its kernel's counts."""
  if config.dropout == 0.0 or not config.dropout_layers:
    return {}
  counts = masks_lib.layer_counts(masks)
  unknown = sorted(set(config.dropout_layers) - set(counts))
  if unknown:
    raise UserError(f"dropout on unknown layer(s) {', '.join(unknown)}; layers are "
                    f"{', '.join(counts)}")
  return {name: config.dropout * math.sqrt(counts[name]["nonzero"] / counts[name]["weights"])
          for name in config.dropout_layers}


def _write_small_model(workdir: str, config: Config, params, masks, evaluate) -> dict:
  """Removes dead neurons (section 3.5), checks the smaller model's predictions, saves it."""
  import orbax.checkpoint as ocp
  chain = neurons.CHAINS.get(config.model)
  if chain is None:
    return {}
  params, masks = jax.device_get((params, masks))
  small_params, small_masks, removed = neurons.remove_dead_units(params, masks, chain)
  widths = neurons.widths(small_params, chain)
  small_model = get_model(config.model, widths=tuple(widths[layer.name] for layer in chain[:-1]))
  same = evaluate(small_model.apply, small_params)
  path = os.path.abspath(os.path.join(workdir, "small_model"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": small_params, "masks": small_masks}, force=True)
  checkpointer.wait_until_finished()
  log.info("dead neurons removed: %s; widths now %s; test error of the smaller model %.2f%%",
           removed, widths, 100 * same["error"])
  return {"removed": removed, "widths": widths, "test_error": same["error"], "path": path}


def _group_layers(config: Config, iteration: int, params) -> list[str] | None:
  """Layers pruned and retrained at `iteration` (None = all; dense training trains all)."""
  if iteration == 0 or config.prune_group(iteration) == "all":
    return None
  layers = masks_lib.layer_groups(params)[config.prune_group(iteration)]
  if not layers:
    raise UserError(f"iteration {iteration} prunes group '{config.prune_group(iteration)}' but "
                    f"{config.model} has no such layer")
  return layers


def _make_tx(config: Config, iteration: int, total_steps: int, params=None):
  reg, strength = ((config.regularization, config.reg_strength) if iteration == 0 else
                   (config.retrain_regularization, config.retrain_reg_strength))
  inner = optim.make_optimizer(config.optimizer, _lr(config, iteration, total_steps),
                               config.momentum)
  frozen = ()
  if params is not None and (layers := _group_layers(config, iteration, params)) is not None:
    frozen = [name for name in masks_lib.prunable_layers(params) if name not in layers]
  return optim.masked(inner, reg, strength, frozen_layers=frozen)


def _history_summary(config: Config, history: list[dict], wall_seconds: float) -> dict:
  return {"model": config.model, "dataset": config.dataset, "config": config.to_json(),
          "iterations": history, "final": history[-1] if history else None,
          "wall_seconds": wall_seconds}


def _state_template(config: Config, params, iteration: int) -> dict:
  """The structure a checkpoint of `iteration` holds (opt_state depends on that phase's optimiser)."""
  return {"params": params, "masks": masks_lib.init_masks(params),
          "opt_state": _make_tx(config, iteration, 1).init(params), "step": np.int32(0),
          "rng": jax.random.PRNGKey(0)}


def restore_iteration(workdir: str, config: Config, iteration: int | None = None) -> dict:
  """The state saved at `iteration` (default: the latest) as NumPy arrays:
  {'params', 'masks', 'opt_state', 'step', 'rng'}."""
  model = get_model(config.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 1)))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir}: no checkpoints/ folder (not a workdir of a run)")
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    iteration = checkpoints.latest_iteration() if iteration is None else iteration
    if iteration is None:
      raise UserError(f"no checkpoint in {checkpoints.directory}")
    checkpoints.check_compatible(iteration, config.model, params)
    return checkpoints.restore(iteration, _state_template(config, params, iteration))
  finally:
    checkpoints.close()


def _write_figures(workdir: str, checkpoints: ckpt_lib.Checkpoints, config: Config,
                   params) -> None:
  """Figures 4 and 7 from the dense, first-pruned and final checkpoints."""
  last = checkpoints.latest_iteration()
  if not last:
    return
  get = lambda it: checkpoints.restore(it, _state_template(config, params, it))
  dense, first, final = get(0), get(1), get(last)
  paths = plots.write_run_figures(workdir, dense["params"], first["masks"], final["params"],
                                  final["masks"])
  log.info("figures: %s", ", ".join(paths))


def run(config: Config, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline in `workdir`; returns the summary also written there.

  Raises UserError for bad configuration, data or workdir; nothing on disk is changed then.
  """
  config.validate()
  t_start = time.perf_counter()
  model = get_model(config.model)
  parallel = train_lib.Parallel.over_local_devices()
  parallel.check_batch_size(config.batch_size)
  train_split, test_split = load_dataset(config.dataset, config.data_dir, config.download)
  if config.batch_size > len(train_split):
    raise UserError(f"batch_size {config.batch_size} exceeds the {len(train_split)} training "
                    "examples")

  root = jax.random.PRNGKey(config.seed)
  init_key, data_key, dropout_key = jax.random.split(root, 3)
  params = model.init(init_key, jnp.zeros((1, *train_split.images.shape[1:])))["params"]
  masks = masks_lib.init_masks(params)
  masks_lib.resolve_qualities(params, config.quality(1) if config.iterations else 0.0)

  os.makedirs(workdir, exist_ok=True)
  checkpoints = ckpt_lib.Checkpoints(workdir)
  latest = checkpoints.latest_iteration()
  history: list[dict] = []
  start_iteration, step = 0, 0
  if latest is not None:
    meta = checkpoints.check_compatible(latest, config.model, params)
    old = meta.get("config", {})
    changed = sorted(k for k, v in config.to_json().items() if old.get(k, v) != v)
    if changed:
      log.warning("resuming with changed settings: %s", ", ".join(changed))
    restored = checkpoints.restore(latest, _state_template(config, params, latest))
    params, masks = restored["params"], restored["masks"]
    step = int(restored["step"])
    history = meta["history"]
    start_iteration = latest + 1
    log.info("resuming from %s/%d (step %d)", checkpoints.directory, latest, step)

  writers = _Writers(workdir, config.tensorboard, latest)
  images = parallel.replicate(jnp.asarray(train_split.images))
  labels = parallel.replicate(jnp.asarray(train_split.labels))
  test_images = parallel.replicate(jnp.asarray(test_split.images))
  test_labels = parallel.replicate(jnp.asarray(test_split.labels))
  params, masks = parallel.replicate(params), parallel.replicate(masks)
  train_steps = parallel.train_steps_fn()
  steps_per_epoch = len(train_split) // config.batch_size
  per_call = config.steps_per_call or steps_per_epoch

  def evaluate(params, apply_fn=None):
    return parallel.evaluate(apply_fn or model.apply, params, test_images, test_labels,
                             config.eval_batch_size)

  def log_eval(iteration, phase, step, params, masks):
    result = evaluate(params)
    counts = masks_lib.total_counts(masks)
    record = {"iteration": iteration, "phase": phase, "step": step, "loss": result["loss"],
              "test_error": result["error"], "params_nonzero": counts["nonzero"]}
    writers.write(record)
    return result

  for iteration in range(start_iteration, config.iterations + 1):
    t_iter = time.perf_counter()
    record: dict[str, Any] = {"iteration": iteration}
    if iteration == 0:
      phase, epochs = "dense", config.dense_epochs
    else:
      phase, epochs = "retrain", config.retrain_epochs
      quality = config.quality(iteration)
      thresholds = masks_lib.layer_thresholds(params, masks, quality, config.std_of)
      group = _group_layers(config, iteration, params)
      prune_rng = (jax.random.fold_in(jax.random.fold_in(root, 7919), iteration)
                   if config.probabilistic_pruning else None)
      params, masks = masks_lib.prune(params, masks, quality, config.std_of, layers=group,
                                      rng=prune_rng)
      record["pruned_group"] = config.prune_group(iteration)
      after_prune = log_eval(iteration, "prune", step, params, masks)
      record["quality"] = masks_lib.resolve_qualities(params, quality)
      record["thresholds"] = {k: float(v) for k, v in thresholds.items()}
      record["test_error_after_prune"] = after_prune["error"]
      counts = masks_lib.total_counts(masks)
      log.info("iteration %d: pruned to %d of %d weights (%.1fx), test error %.2f%% before "
                   "retraining", iteration, counts["nonzero"], counts["weights"],
                   counts["compression"], 100 * after_prune["error"])

    total_steps = epochs * steps_per_epoch
    tx = _make_tx(config, iteration, total_steps, params)
    rates = dropout_rates(config, masks)
    if rates:
      record["dropout"] = rates
      log.info("iteration %d %s: dropout %s", iteration, phase,
               ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    train_model = get_model(config.model, dropout=tuple(rates.items())) if rates else model
    state = train_lib.TrainState.create(train_model.apply, params, masks, tx)
    state = parallel.replicate(state)
    progress = _Progress(f"iteration {iteration} {phase}", total_steps, config.log_every_seconds)
    dropout_rng = jax.random.fold_in(dropout_key, iteration)
    for epoch in range(epochs):
      epoch_key = jax.random.fold_in(jax.random.fold_in(data_key, iteration), epoch)
      batches = train_lib.epoch_batches(epoch_key, len(train_split), config.batch_size)
      for start in range(0, len(batches), per_call):
        chunk = parallel.shard_indices(batches[start:start + per_call])
        state, metrics = train_steps(state, images, labels, chunk, dropout_rng)
        progress.update(chunk.shape[0], float(metrics["loss"]))
        faults.maybe_kill("step", step + start + chunk.shape[0], at_least=True)
      step += len(batches)
      result = log_eval(iteration, phase, step, state.params, state.masks)
      if not math.isfinite(result["loss"]):
        raise FloatingPointError(f"test loss is {result['loss']} at iteration {iteration} "
                                 f"({phase}) epoch {epoch + 1}, step {step}")
      log.info("iteration %d %s epoch %d/%d: test error %.2f%% (loss %.4f)", iteration,
                   phase, epoch + 1, epochs, 100 * result["error"], result["loss"])
    params, masks = state.params, state.masks
    result = evaluate(params)
    counts = masks_lib.total_counts(masks)
    record.update({
        "phase": phase, "step": step, "test_error": result["error"],
        "test_loss": result["loss"], "params_total": counts["weights"],
        "params_nonzero": counts["nonzero"], "compression": counts["compression"],
        "layers": masks_lib.layer_counts(masks),
        "layer_table": stats.layer_table(model.apply, params, masks, test_images),
        "seconds": time.perf_counter() - t_iter})
    history.append(record)
    log.info("iteration %d done: %d/%d weights (%.1fx), test error %.2f%%", iteration,
                 counts["nonzero"], counts["weights"], counts["compression"],
                 100 * result["error"])
    checkpoints.save(iteration, {"params": params, "masks": masks, "opt_state": state.opt_state,
                                 "step": np.int32(step), "rng": root},
                     {"model": config.model, "param_shapes": ckpt_lib.param_shapes(params),
                      "config": config.to_json(), "history": history})

  small = {}
  if jax.process_index() == 0:
    _write_figures(workdir, checkpoints, config, jax.device_get(params))
    if config.remove_dead_neurons and history:
      small = _write_small_model(workdir, config, params, masks,
                                 lambda apply_fn, p: evaluate(p, apply_fn))
  checkpoints.close()
  summary = _history_summary(config, history, time.perf_counter() - t_start)
  summary["small_model"] = small
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(report.markdown(summary))
  return summary
