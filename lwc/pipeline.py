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

from collections.abc import Callable, Mapping
import dataclasses
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lwc import checkpoints as ckpt_lib
from lwc import faults
from lwc import files
from lwc import lock as lock_lib
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


MAX_INT = 2**31 - 1  # steps and counts are saved as int32


@dataclasses.dataclass(frozen=True)
class Config:
  """Every hyper-parameter of a run (the experiment flags map onto these fields one to one)."""

  model: str = "lenet_300_100"
  # Layer widths of the model (its own defaults when empty), e.g. narrow nets for smoke runs.
  widths: tuple[int, ...] = ()
  # ImageNet models' classes (0 = the dataset's).
  num_classes: int = 0
  dataset: str = "mnist"
  data_dir: str | None = None
  download: bool = True
  # Streamed (ImageNet-like) datasets: another TFDS name with the same features (tests, smoke
  # runs), the crop size (0 = the model's: 227 AlexNet, 224 VGG-16) and the resize before it.
  tfds_name: str = ""
  image_size: int = 0
  resize_size: int = 256
  # Start from trained weights instead of a random init: an lwc workdir (DIR or DIR:ITERATION,
  # params and masks) or a pretrained weights file (.npz / .safetensors, lwc.pretrained).
  init_checkpoint: str = ""
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
  # Per-layer final densities (surviving fraction of the layer's weights), reached geometrically
  # over the iterations that prune the layer; they replace the quality for those layers, and the
  # quality that realises each step is derived and logged (lwc.schedule).
  layer_densities: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # Beyond the paper: > 0 drives the iterations toward this many times fewer weights, each
  # iteration's per-layer cut allocated by a sensitivity sweep of the current network (on
  # `sensitivity_examples` training images), the density stepping geometrically over the
  # iterations left; the run stops early once the target is reached, or when the test error
  # after retraining exceeds the dense model's by more than `max_error_increase`.
  target_compression: float = 0.0
  max_error_increase: float = 0.001
  sensitivity_examples: int = 10000
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
  # Within a phase, also save a checkpoint (workdir/progress, newest only) once this many steps
  # have run since the last one, at the next step boundary; 0 = only one per iteration.
  checkpoint_every_steps: int = 5000
  eval_batch_size: int = 2000
  tensorboard: bool = True
  log_every_seconds: float = 5.0

  # Every numeric field and its range, checked by `validate` before anything is read:
  # (low, high, low inclusive, high inclusive); integers must be ints, floats finite.
  INT_RANGES = {
      "num_classes": (0, MAX_INT), "image_size": (0, MAX_INT), "resize_size": (1, MAX_INT),
      "seed": (0, 2**32 - 1), "batch_size": (1, MAX_INT), "lr_decay_steps": (0, MAX_INT),
      "dense_epochs": (0, MAX_INT), "retrain_epochs": (0, MAX_INT), "iterations": (0, 10_000),
      "sensitivity_examples": (0, MAX_INT), "steps_per_call": (0, MAX_INT),
      "checkpoint_every_steps": (0, MAX_INT), "eval_batch_size": (1, MAX_INT)}
  FLOAT_RANGES = {
      "momentum": (0.0, 1.0, True, False), "learning_rate": (0.0, math.inf, False, False),
      "lr_decay_factor": (0.0, math.inf, False, False),
      "retrain_lr_scale": (0.0, math.inf, False, False),
      "target_compression": (0.0, math.inf, True, False),
      "max_error_increase": (0.0, 1.0, True, True), "dropout": (0.0, 1.0, True, False),
      "reg_strength": (0.0, math.inf, True, False),
      "retrain_reg_strength": (0.0, math.inf, True, False),
      "log_every_seconds": (0.0, math.inf, True, False)}

  def validate(self) -> None:
    for name, (low, high) in self.INT_RANGES.items():
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name} must be an integer, got {value!r}")
      if value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")
      if value > high:
        raise UserError(f"{name} must be <= {high}, got {value}")
    for name, (low, high, low_in, high_in) in self.FLOAT_RANGES.items():
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise UserError(f"{name} must be a number, got {value!r}")
      if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
      if not ((low <= value if low_in else low < value) and
              (value <= high if high_in else value < high)):
        span = (f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}")
        raise UserError(f"{name} must be in {span}, got {value:g}")
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
    schedules = [("lr_schedule", self.lr_schedule)]
    if self.iterations and self.retrain_lr_schedule:
      schedules.append(("retrain_lr_schedule", self.retrain_lr_schedule))
    for name, kind in schedules:
      if kind == "step" and self.lr_decay_steps <= 0:
        raise UserError(f"{name}=step needs lr_decay_steps > 0")
    for name in ("regularization", "retrain_regularization"):
      if getattr(self, name) not in ("none", "l1", "l2"):
        raise UserError(f"{name} must be none, l1 or l2, got '{getattr(self, name)}'")
    if self.target_compression and self.target_compression <= 1:
      raise UserError(f"target_compression must be > 1 (or 0: off), got "
                      f"{self.target_compression}")
    if self.target_compression and self.layer_densities:
      raise UserError("target_compression chooses every layer's density: drop layer_densities")
    if not self.max_error_increase >= 0:
      raise UserError(f"max_error_increase must be >= 0, got {self.max_error_increase}")
    for layer, d in self.layer_densities.items():
      if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d <= 1.0):
        raise UserError(f"density for layer {layer} must be in [0, 1], got {d}")
    if any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 1 <= w <= MAX_INT
           for w in self.widths):
      raise UserError(f"widths must be positive, got {list(self.widths)}")
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

  @classmethod
  def from_json(cls, d: Mapping) -> "Config":
    """The inverse of `to_json` (JSON lists back to tuples); keys this version does not know
    are dropped, missing ones take their defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
      if key not in known:
        continue
      if isinstance(value, list):
        value = tuple(value)
      elif isinstance(value, dict):
        value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
      kwargs[key] = value
    return cls(**kwargs)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["dropout_layers"] = list(self.dropout_layers)
    d["widths"] = list(self.widths)
    d["qualities"] = list(self.qualities)
    d["prune_groups"] = list(self.prune_groups)
    d["layer_qualities"] = {k: list(v) for k, v in self.layer_qualities.items()}
    d["layer_densities"] = dict(self.layer_densities)
    return d


class Preempted(Exception):
  """SIGTERM arrived: a checkpoint was written at the next step boundary; run again to resume."""


class NumericError(UserError):
  """A NaN or Inf in the loss or the parameters; nothing was saved after the last good step."""


class _Progress:
  """Console progress for a phase: step, loss, steps/s, ETA, at most every `every` seconds."""

  def __init__(self, label: str, total_steps: int, every: float, done: int = 0):
    self.label, self.total, self.every = label, total_steps, every
    self.start = self.last = time.perf_counter()
    self.done = self.first = done

  def update(self, steps: int, loss: float, force: bool = False) -> None:
    self.done += steps
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = (self.done - self.first) / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    log.info("%s step %d/%d loss %.4f %.0f steps/s ETA %.0fs", self.label, self.done,
             self.total, loss, rate, eta)


class _Writers:
  """metrics.jsonl and (optionally) TensorBoard scalars, from process 0 only.

  On resume, lines past the resume point (`keep(record)` false) are dropped: that work is about to
  be redone, and redoing it writes the same lines again.
  """

  def __init__(self, workdir: str, tensorboard: bool, keep: Callable[[dict], bool]):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      kept = []
      text = files.read_text(self.path, "metrics file")
      for line in text.splitlines(keepends=True):
        try:
          if keep(json.loads(line)):
            kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
          continue  # a line cut by kill -9
      if "".join(kept) != text:
        files.atomic_write_text(self.path, "".join(kept))  # a kill leaves the old or the new
    if tensorboard:
      from flax.metrics import tensorboard as tb  # imports TensorFlow
      self.tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    files.append_line(self.path, json.dumps(record))
    if self.tb is not None:
      prefix = f"{record['phase']}/"
      for key in ("loss", "test_error", "params_nonzero"):
        self.tb.scalar(prefix + key, record[key], record["step"])
      self.tb.flush()


class _Sigterm:
  """While active, SIGTERM only sets `received`; the run saves at the next step boundary."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self) -> "_Sigterm":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    if not self.received:
      log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
    self.received = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
  empty = [layer.name for layer in chain
           if layer.name in masks and not np.asarray(masks[layer.name]["kernel"]).any()]
  removed = None
  if not empty:
    small_params, small_masks, removed = neurons.remove_dead_units(params, masks, chain)
    widths = neurons.widths(small_params, chain)
    empty = [name for name, width in widths.items() if width == 0]
  if empty:  # no path from the input to the output is left: there is no smaller network
    log.warning("every unit of %s is dead: the pruned network computes a constant; no small "
                "model written", ", ".join(empty))
    files.recover_dir(os.path.abspath(os.path.join(workdir, "small_model")))
    return {"removed": removed, "empty_layers": empty}
  small_model = _build_model(config.replace(widths=tuple(widths[layer.name]
                                                         for layer in chain[:-1])))
  same = evaluate(small_model.apply, small_params)
  path = os.path.abspath(os.path.join(workdir, "small_model"))

  def write(folder):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder, {"params": small_params, "masks": small_masks}, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
  files.replace_dir(write, path)  # the old small model stays until the new one is complete
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
  model = _build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *_input_shape(config))))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
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
    checkpoints.check_compatible(iteration, config.model, params)
    return checkpoints.restore(iteration, _state_template(config, params, iteration))
  finally:
    checkpoints.close()


def _write_figures(workdir: str, checkpoints: ckpt_lib.Checkpoints, config: Config,
                   params) -> dict:
  """Figures 4 and 7 from the dense, first-pruned and final checkpoints."""
  last = checkpoints.latest_iteration()
  if not last:
    return {}
  get = lambda it: checkpoints.restore(it, _state_template(config, params, it))
  have = checkpoints.iterations()
  missing = [it for it in sorted({0, 1, last}) if it not in have]
  try:
    if missing:
      raise UserError(f"checkpoint(s) {', '.join(map(str, missing))} of "
                      f"{checkpoints.directory} are missing")
    dense, first, final = get(0), get(1), get(last)
  except UserError as e:  # the work is done: a figure never costs the summary
    log.warning("figures skipped: %s", e)
    return {"skipped": str(e)}
  paths = plots.write_run_figures(workdir, dense["params"], first["masks"], final["params"],
                                  final["masks"])
  log.info("figures: %s", ", ".join(paths))
  return {"paths": [os.path.relpath(p, workdir) for p in paths]}


class _MnistData:
  """A whole dataset resident on the devices; each step gathers its batch on device by index.

  Batches of (iteration, epoch) come from a permutation seeded by (seed, iteration, epoch): the
  order never depends on where a run was interrupted.
  """

  num_classes = 10

  def __init__(self, parallel: train_lib.Parallel, config: Config):
    train_split, test_split = load_dataset(config.dataset, config.data_dir, config.download)
    if len(test_split) == 0:
      raise UserError(f"the test split of {config.data_dir or config.dataset} has no examples: "
                      "nothing to evaluate the network on")
    if config.batch_size > len(train_split):
      raise UserError(f"batch_size {config.batch_size} exceeds the {len(train_split)} training "
                      "examples")
    self.parallel, self.config = parallel, config
    self.num_train = len(train_split)
    self.image_shape = tuple(train_split.images.shape[1:])
    self.steps_per_epoch = self.num_train // config.batch_size
    self.per_call = config.steps_per_call or self.steps_per_epoch
    self.images = parallel.replicate(jnp.asarray(train_split.images))
    self.labels = parallel.replicate(jnp.asarray(train_split.labels))
    self.test_images = parallel.replicate(jnp.asarray(test_split.images))
    self.test_labels = parallel.replicate(jnp.asarray(test_split.labels))
    self._train_steps = parallel.train_steps_fn()
    self._data_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)[1]

  def chunks(self, iteration: int, epoch: int, start: int):
    """(first step of the chunk in the epoch, (K, B) batch indices), from step `start` on."""
    key = jax.random.fold_in(jax.random.fold_in(self._data_key, iteration), epoch)
    batches = train_lib.epoch_batches(key, self.num_train, self.config.batch_size)
    for first in range(start, len(batches), self.per_call):
      yield first, self.parallel.shard_indices(batches[first:first + self.per_call])

  def train(self, state, chunk, rng):
    return self._train_steps(state, self.images, self.labels, chunk, rng)

  def evaluate(self, apply_fn, params) -> dict[str, float]:
    return self.parallel.evaluate(apply_fn, params, self.test_images, self.test_labels,
                                  self.config.eval_batch_size)

  def layer_table(self, apply_fn, params, masks) -> dict:
    return stats.layer_table(apply_fn, params, masks, self.test_images)

  def sensitivity_set(self, n: int) -> tuple[jax.Array, jax.Array]:
    """n training examples (a fixed seeded choice) for sensitivity sweeps: choosing thresholds
    on the test set would leak it into the result."""
    key = jax.random.fold_in(self._data_key, 104_729)
    idx = np.sort(np.asarray(jax.random.permutation(key, self.num_train))[:n])
    return self.images[idx], self.labels[idx]


class _StreamedData:
  """An ImageNet-like TFDS dataset (`lwc.data.imagenet`) streamed through tf.data: each process
  reads its own shard and the chunks reach the devices as global arrays, two in flight.

  The order and augmentation of (iteration, epoch) depend only on (seed, iteration, epoch);
  `start` skips batches inside tf.data, so a resumed epoch continues with the same batches.
  Evaluation is top-1 and top-5 over the whole eval split, every example counted once.
  """

  STATS_IMAGES = 256  # eval images whose activations give the Act% column

  def __init__(self, parallel: train_lib.Parallel, config: Config):
    from lwc.data import imagenet
    self.parallel, self.config = parallel, config
    self.source = imagenet.ImageNet(
        config.data_dir, image_size=_image_size(config), resize_size=config.resize_size,
        download=config.download, tfds_name=config.tfds_name or config.dataset)
    self.num_classes = self.source.num_classes
    self.num_train = self.source.num_train
    self.image_shape = self.source.image_shape
    self.steps_per_epoch = self.source.steps_per_epoch(config.batch_size)
    if self.source.num_eval == 0:
      raise UserError(f"the eval split of {config.tfds_name or config.dataset} has no "
                      "examples: nothing to evaluate the network on")
    if self.steps_per_epoch < 1:
      raise UserError(f"batch_size {config.batch_size} exceeds the {self.num_train} training "
                      "examples")
    self.per_call = config.steps_per_call or 1
    self._train_steps = parallel.train_batches_fn()
    self._chunk_sharding = NamedSharding(parallel.mesh, P(None, "data"))
    self._prefetch = imagenet.prefetch_to_device

  def chunks(self, iteration: int, epoch: int, start: int):
    """(first step of the chunk in the epoch, (images (K, B, H, W, 3), labels (K, B)))."""
    batches = self.source.train_batches(self.config.seed * 100_003 + iteration, epoch,
                                        self.config.batch_size, start_batch=start,
                                        steps_per_chunk=self.per_call)
    first = start
    for chunk in self._prefetch(batches, 2, self._chunk_sharding):
      yield first, chunk
      first += chunk[0].shape[0]

  def train(self, state, chunk, rng):
    return self._train_steps(state, chunk[0], chunk[1], rng)

  def evaluate(self, apply_fn, params) -> dict[str, float]:
    step = train_lib._jitted_eval_topk(apply_fn)
    totals = None
    batches = self.source.eval_batches(self.config.eval_batch_size)
    for images, labels, valid in self._prefetch(batches, 2, self.parallel.batch):
      out = step(params, images, labels, valid)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "error": int(totals["top1"]) / count,
            "top5_error": int(totals["top5"]) / count}

  def sensitivity_set(self, n: int):
    raise UserError("target_compression needs an in-memory dataset (MNIST) for its sensitivity "
                    "sweeps; for ImageNet give per-layer densities (layer_densities) instead")

  def layer_table(self, apply_fn, params, masks) -> dict:
    images = []
    for batch, _, valid in self.source.eval_batches(self.config.eval_batch_size):
      images.append(batch[valid])
      if sum(len(x) for x in images) >= self.STATS_IMAGES:
        break
    images = np.concatenate(images)[:self.STATS_IMAGES]
    return stats.layer_table(apply_fn, jax.device_get(params), jax.device_get(masks), images)


MNIST_DATASETS = ("mnist",)
STREAMED_DATASETS = ("imagenet2012",)
DEFAULT_IMAGE_SIZE = {"alexnet": 227, "vgg16": 224}


def _image_size(config: Config) -> int:
  return config.image_size or DEFAULT_IMAGE_SIZE.get(config.model, 224)


def _make_data(config: Config, parallel: train_lib.Parallel):
  known = sorted(MNIST_DATASETS + STREAMED_DATASETS)
  if config.dataset not in known:
    raise UserError(f"unknown dataset '{config.dataset}', expected one of: {', '.join(known)}")
  if config.dataset in STREAMED_DATASETS:
    return _StreamedData(parallel, config)
  return _MnistData(parallel, config)


def _input_shape(config: Config) -> tuple[int, ...]:
  """One example's (H, W, C), known from the config alone (for restoring without data)."""
  if config.dataset in STREAMED_DATASETS:
    size = _image_size(config)
    return (size, size, 3)
  return (28, 28, 1)


def _build_model(config: Config, num_classes: int | None = None, dropout=()):
  """The network of `config`: its widths if given, the dataset's classes for ImageNet models."""
  kwargs: dict = {"dropout": tuple(dropout)}
  if config.widths:
    kwargs["widths"] = tuple(config.widths)
  if config.model in DEFAULT_IMAGE_SIZE:
    kwargs["num_classes"] = num_classes or config.num_classes or 1000
  return get_model(config.model, **kwargs)


def _first_bad_leaf(tree) -> str | None:
  """The path of the first leaf holding a NaN or Inf, or None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    if not np.all(np.isfinite(leaf)):
      return jax.tree_util.keystr(path)
  return None


def _resume_point(checkpoints: ckpt_lib.Checkpoints, progress: ckpt_lib.Checkpoints,
                  config: Config, params) -> tuple[int | None, int | None]:
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


def _metadata(config: Config, params, masks, history, **extra) -> dict:
  return {"model": config.model, "param_shapes": ckpt_lib.param_shapes(params),
          "mask_shapes": ckpt_lib.param_shapes(masks), "config": config.to_json(),
          "history": history, **extra}


def run(config: Config, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline in `workdir`; returns the summary also written there.

  Raises UserError for bad configuration, data or workdir (nothing on disk is changed then),
  NumericError (a UserError) when the loss or the parameters stop being finite, and Preempted
  after SIGTERM once a checkpoint is saved.
  """
  config.validate()
  get_model(config.model)  # unknown model: fail before reading any data
  parallel = train_lib.Parallel.over_all_devices()
  parallel.check_batch_size(config.batch_size)
  _check_workdir(workdir)
  # SIGTERM from here on (data loading included) stops the run cleanly: before training starts
  # with nothing written, later with a checkpoint.
  with _Sigterm() as sigterm:
    _check_widths(config)
    data = _make_data(config, parallel)
    model = _build_model(config, data.num_classes)
    _check_against_model(config, model, data.image_shape)
    if sigterm.received:
      raise Preempted("SIGTERM while loading the data, before anything was written; run the "
                      "same command again to start")
    created = _make_dirs(workdir)
    try:
      with lock_lib.WorkdirLock(workdir):
        return _run_locked(config, workdir, model, parallel, data, sigterm)
    except (UserError, Preempted):
      for folder in created:  # innermost first; only folders this run made and left empty
        if os.path.isdir(folder) and not os.listdir(folder):
          os.rmdir(folder)
      raise


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
  """--widths against the model's own number of widths (before any data is read)."""
  if not config.widths:
    return
  default = getattr(get_model(config.model), "widths", None)
  if isinstance(default, (tuple, list)) and len(config.widths) != len(default):
    raise UserError(f"--widths has {len(config.widths)} values; {config.model} takes "
                    f"{len(default)} (its own: {','.join(map(str, default))})")


def _check_against_model(config: Config, model, image_shape) -> None:
  """Everything in `config` that names layers, checked on the model's shapes before any file is
  written: widths, qualities, densities, prune groups, dropout layers."""
  _check_widths(config)
  try:
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *image_shape)))["params"]
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (flax reports a shape that does not fit in many ways)
    what = f"--widths={','.join(map(str, config.widths))}" if config.widths else "the settings"
    raise UserError(f"{what} do not fit {config.model} on {'x'.join(map(str, image_shape))} "
                    f"inputs ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if config.iterations:
    for iteration in range(1, config.iterations + 1):
      masks_lib.resolve_qualities(params, config.quality(iteration))
      _group_layers(config, iteration, params)
  layers = masks_lib.prunable_layers(params)
  unknown = sorted(set(config.layer_densities) - set(layers))
  if unknown:
    raise UserError(f"density given for unknown layer(s) {', '.join(unknown)}; prunable layers "
                    f"are {', '.join(layers)}")
  dropout_rates(config, jax.tree.map(lambda s: np.ones(s.shape, bool), params))


def _run_locked(config: Config, workdir: str, model, parallel, data, sigterm: _Sigterm) -> dict:
  t_start = time.perf_counter()
  root = jax.random.PRNGKey(config.seed)
  init_key, _, dropout_key = jax.random.split(root, 3)
  params = model.init(init_key, jnp.zeros((1, *data.image_shape)))["params"]
  masks = masks_lib.init_masks(params)

  checkpoints = ckpt_lib.Checkpoints(workdir)
  progress = ckpt_lib.Checkpoints(workdir, "progress", keep_latest=1)
  try:
    return _run_iterations(config, workdir, model, parallel, data, sigterm, params, masks, root,
                           dropout_key, checkpoints, progress, t_start)
  finally:
    checkpoints.close()
    progress.close()


def _initial_weights(config: Config, params, masks):
  """(params, masks) from --init_checkpoint: an lwc workdir (its latest iteration, or DIR:N), or
  a pretrained weights file (.npz / .safetensors, `lwc.pretrained`) with all-ones masks."""
  path = config.init_checkpoint
  if os.path.isfile(path):
    from lwc import pretrained
    loaded = pretrained.load_pretrained(path, config.model, jax.device_get(params))
    log.info("initial weights from %s", path)
    return loaded, masks
  folder, _, iteration = path.rpartition(":") if ":" in path else (path, "", "")
  if iteration and not iteration.isdigit():
    raise UserError(f"--init_checkpoint={path}: expected a weights file, DIR or DIR:ITERATION")
  if not os.path.isdir(os.path.join(folder, "checkpoints")):
    raise UserError(f"--init_checkpoint={path}: neither a weights file nor a workdir with "
                    "checkpoints/")
  try:
    state = restore_iteration(folder, config, int(iteration) if iteration else None)
  except UserError as e:
    raise UserError(f"--init_checkpoint={path}: {e}") from None
  log.info("initial weights and masks from %s (%d of %d weights kept)", path,
           masks_lib.total_counts(state["masks"])["nonzero"],
           masks_lib.total_counts(state["masks"])["weights"])
  return state["params"], state["masks"]


# Settings a resumed run may change at any time: where files are and how it reports, never
# what it computes.
RESUME_FREE = frozenset({"data_dir", "download", "init_checkpoint", "tensorboard",
                         "log_every_seconds", "checkpoint_every_steps", "eval_batch_size",
                         "steps_per_call", "remove_dead_neurons", "iterations"})
# Settings of pruning and retraining: they may change between iterations (each iteration records
# what it ran with), not in the middle of a retraining phase.
RESUME_BETWEEN_ITERATIONS = frozenset({
    "retrain_epochs", "retrain_lr_scale", "retrain_lr_schedule", "retrain_regularization",
    "retrain_reg_strength", "std_of", "probabilistic_pruning", "target_compression",
    "max_error_increase", "sensitivity_examples", "layer_densities"})
# Per-iteration lists: the values of iterations already pruned must stay.
RESUME_PER_ITERATION = frozenset({"qualities", "layer_qualities", "prune_groups"})
_FLAG_NAMES = {"qualities": "quality", "layer_qualities": "layer_quality",
               "layer_densities": "layer_density"}
# Pure I/O settings, left out of each iteration's record of the settings it ran with.
_NOT_RECORDED = ("data_dir", "download", "tensorboard", "log_every_seconds",
                 "checkpoint_every_steps", "remove_dead_neurons")


def iteration_settings(config: Config) -> dict:
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


def check_resume_settings(config: Config, saved: Mapping | None, workdir: str, pruned: int,
                          mid_phase: int | None) -> None:
  """UserError naming every flag whose value differs from the run being resumed, among those
  that may not change now (`RESUME_*` above say which may). `pruned`: the last iteration whose
  pruning is done; `mid_phase`: the iteration a mid-phase resume continues, else None."""
  if not isinstance(saved, Mapping):
    return  # a checkpoint of a version that did not save its settings
  new = json.loads(json.dumps(config.to_json()))
  old = json.loads(json.dumps(dict(saved)))
  problems = []

  def differs(key, before, after):
    flag = _FLAG_NAMES.get(key, key)
    problems.append(f"--{flag}={_flag_value(before)} (now {_flag_value(after)})")

  in_retraining = mid_phase is not None and mid_phase > 0
  for key in sorted(new):
    if key in RESUME_FREE or key in RESUME_PER_ITERATION or key not in old:
      continue
    if key in RESUME_BETWEEN_ITERATIONS and not in_retraining:
      continue
    if old[key] != new[key]:
      differs(key, old[key], new[key])
  try:
    before = Config.from_json(old)
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


def _run_iterations(config, workdir, model, parallel, data, sigterm, params, masks, root,
                    dropout_key, checkpoints, progress, t_start) -> dict:
  latest, progress_key = _resume_point(checkpoints, progress, config, params)
  history: list[dict] = []
  start_iteration, step = 0, 0
  mid: dict | None = None  # the progress checkpoint's meta and state when resuming mid-phase
  if latest is None and progress_key is None and config.init_checkpoint:
    params, masks = _initial_weights(config, params, masks)
  if latest is not None or progress_key is not None:
    saved = (progress.meta(progress_key) if progress_key is not None else
             checkpoints.meta(latest))
    check_resume_settings(config, saved.get("config"), workdir,
                          pruned=saved["iteration"] if progress_key is not None else latest,
                          mid_phase=saved["iteration"] if progress_key is not None else None)
  if latest is not None:
    meta = checkpoints.meta(latest)
    restored = checkpoints.restore(latest, _state_template(config, params, latest))
    params, masks = restored["params"], restored["masks"]
    step = int(restored["step"])
    history = meta["history"]
    start_iteration = latest + 1
    log.info("resuming from %s/%d (step %d)", checkpoints.directory, latest, step)
  if progress_key is not None:
    meta = progress.meta(progress_key)
    restored = progress.restore(progress_key,
                                _state_template(config, params, meta["iteration"]))
    mid = {"meta": meta, "state": restored}
    params, masks = restored["params"], restored["masks"]
    step = int(restored["step"])
    history = meta["history"]
    start_iteration = meta["iteration"]
    log.info("resuming from %s/%d (iteration %d %s, epoch %d, step %d)", progress.directory,
             progress_key, meta["iteration"], meta["record"]["phase"], meta["epoch"] + 1, step)

  resume_iteration, resume_step = start_iteration, step
  writers = _Writers(workdir, config.tensorboard,
                     lambda r: r["iteration"] < resume_iteration or
                     (mid is not None and r["iteration"] == resume_iteration and
                      r["step"] <= resume_step))
  params, masks = parallel.replicate(params), parallel.replicate(masks)

  def evaluate(params, apply_fn=None):
    return data.evaluate(apply_fn or model.apply, params)

  def log_eval(iteration, phase, step, params, masks):
    result = evaluate(params)
    counts = masks_lib.total_counts(masks)
    record = {"iteration": iteration, "phase": phase, "step": step, "loss": result["loss"],
              "test_error": result["error"], "params_nonzero": counts["nonzero"]}
    if "top5_error" in result:
      record["test_top5_error"] = result["top5_error"]
    writers.write(record)
    return result

  def check_preempted(iteration, phase, step):
    if sigterm.received:
      message = (f"preempted at step {step} (iteration {iteration}, {phase}); checkpoint saved, "
                 "run the same command again to resume")
      log.warning(message)
      raise Preempted(message)

  for iteration in range(start_iteration, config.iterations + 1):
    check_preempted(iteration, "start", step)
    if iteration > 0 and mid is None and (reason := _target_stop(config, history)):
      log.info("stopping before iteration %d: %s", iteration, reason)
      break
    t_iter = time.perf_counter()
    phase = "dense" if iteration == 0 else "retrain"
    epochs = config.dense_epochs if iteration == 0 else config.retrain_epochs
    if mid is not None:
      record = dict(mid["meta"]["record"])
    else:
      record = {"iteration": iteration, "phase": phase}
      if iteration > 0:
        params, masks = _prune(config, iteration, root, params, masks, record, log_eval, step,
                               data, model)
    phase_start_step = record.setdefault("phase_start_step", step)

    total_steps = epochs * data.steps_per_epoch
    tx = _make_tx(config, iteration, total_steps, params)
    rates = dropout_rates(config, masks)
    if rates:
      record["dropout"] = rates
      log.info("iteration %d %s: dropout %s", iteration, phase,
               ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    train_model = _build_model(config, data.num_classes, dropout=rates.items())
    state = train_lib.TrainState.create(train_model.apply, params, masks, tx,
                                        step=step - phase_start_step)
    start_epoch, start_batch = 0, 0
    if mid is not None:
      state = state.replace(opt_state=mid["state"]["opt_state"])
      start_epoch, start_batch = mid["meta"]["epoch"], mid["meta"]["batch"]
      mid = None
    state = parallel.replicate(state)
    progress_bar = _Progress(f"iteration {iteration} {phase}", total_steps,
                             config.log_every_seconds, done=step - phase_start_step)
    dropout_rng = jax.random.fold_in(dropout_key, iteration)
    last_save = step
    for epoch in range(start_epoch, epochs):
      for first, chunk in data.chunks(iteration, epoch,
                                      start_batch if epoch == start_epoch else 0):
        state, metrics = data.train(state, chunk, dropout_rng)
        loss = float(metrics["loss"])
        steps = jax.tree.leaves(chunk)[0].shape[0]
        step += steps
        if not (math.isfinite(loss) and bool(metrics["params_finite"])):
          what = (f"loss is {loss}" if not math.isfinite(loss) else
                  f"parameter {_first_bad_leaf(state.params)} is not finite")
          raise NumericError(
              f"{what} at step {step} (iteration {iteration}, {phase}, epoch {epoch + 1}); "
              f"stopped without saving: the last good checkpoint is kept (lower the learning "
              f"rate or check the data)")
        progress_bar.update(steps, loss)
        faults.maybe_kill("step", step, at_least=True)
        end_of_epoch = first + steps == data.steps_per_epoch
        if not end_of_epoch and (sigterm.received or (
            config.checkpoint_every_steps and step - last_save >= config.checkpoint_every_steps)):
          _save_progress(progress, config, state, step, root, history, record, iteration, epoch,
                         first + steps)
          last_save = step
          check_preempted(iteration, phase, step)
      result = log_eval(iteration, phase, step, state.params, state.masks)
      log.info("iteration %d %s epoch %d/%d: test error %.2f%% (loss %.4f)", iteration,
               phase, epoch + 1, epochs, 100 * result["error"], result["loss"])
      if epoch + 1 < epochs and (sigterm.received or (
          config.checkpoint_every_steps and step - last_save >= config.checkpoint_every_steps)):
        _save_progress(progress, config, state, step, root, history, record, iteration,
                       epoch + 1, 0)
        last_save = step
        check_preempted(iteration, phase, step)

    params, masks = state.params, state.masks
    result = evaluate(params)
    counts = masks_lib.total_counts(masks)
    record.pop("phase_start_step", None)
    record["settings"] = iteration_settings(config)
    if "top5_error" in result:
      record["test_top5_error"] = result["top5_error"]
    record.update({
        "phase": phase, "step": step, "test_error": result["error"],
        "test_loss": result["loss"], "params_total": counts["weights"],
        "params_nonzero": counts["nonzero"], "compression": counts["compression"],
        "layers": masks_lib.layer_counts(masks),
        "layer_table": data.layer_table(model.apply, params, masks),
        "seconds": time.perf_counter() - t_iter})
    history.append(record)
    log.info("iteration %d done: %d/%d weights (%.1fx), test error %.2f%%", iteration,
             counts["nonzero"], counts["weights"], counts["compression"],
             100 * result["error"])
    checkpoints.save(iteration, {"params": params, "masks": masks, "opt_state": state.opt_state,
                                 "step": np.int32(step), "rng": root},
                     _metadata(config, params, masks, history))
    for key in progress.iterations():
      progress.delete(key)

  small, figures = {}, {}
  if jax.process_index() == 0:
    figures = _write_figures(workdir, checkpoints, config, jax.device_get(params)) or {}
    if config.remove_dead_neurons and history:
      small = _write_small_model(workdir, config, params, masks,
                                 lambda apply_fn, p: evaluate(p, apply_fn))
  summary = _history_summary(config, history, time.perf_counter() - t_start)
  if config.target_compression:
    summary["target"] = _target_summary(config, history)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
      plots.error_vs_compression(
          history, os.path.join(workdir, "figures", "error_vs_compression.png"),
          history[0]["test_error"] + config.max_error_increase,
          f"{config.model}: toward {config.target_compression:g}x")
  summary["small_model"] = small
  if figures.get("skipped"):
    summary["figures_skipped"] = figures["skipped"]
  if jax.process_index() == 0:
    files.atomic_write_json(os.path.join(workdir, "summary.json"), summary, indent=1)
    files.atomic_write_text(os.path.join(workdir, "summary.md"), report.markdown(summary))
  return summary


def _save_progress(progress: ckpt_lib.Checkpoints, config: Config, state, step: int, root,
                   history: list[dict], record: dict, iteration: int, epoch: int,
                   batch: int) -> None:
  """A mid-phase checkpoint: the state after `step` steps, resuming at (epoch, batch)."""
  progress.save(step, {"params": state.params, "masks": state.masks,
                       "opt_state": state.opt_state, "step": np.int32(step), "rng": root},
                _metadata(config, state.params, state.masks, history, iteration=iteration,
                          epoch=epoch, batch=batch, record=record),
                fault_point="progress")
  log.info("checkpoint at step %d (iteration %d, epoch %d): %s/%d", step, iteration, epoch + 1,
           progress.directory, step)


def _target_stop(config: Config, history: list[dict]) -> str | None:
  """Why a --target_compression run stops before the next iteration (None: it goes on)."""
  if not config.target_compression or not history:
    return None
  dense, last = history[0], history[-1]
  if last["test_error"] > dense["test_error"] + config.max_error_increase + 1e-12:
    return (f"test error {100 * last['test_error']:.2f}% exceeds the dense "
            f"{100 * dense['test_error']:.2f}% + {100 * config.max_error_increase:.2f} points")
  if last["compression"] >= config.target_compression * (1 - 1e-9):
    return f"target {config.target_compression:g}x reached ({last['compression']:.1f}x)"
  return None


def _target_summary(config: Config, history: list[dict]) -> dict:
  """The best iteration within the error budget, and whether it reached the target."""
  dense = history[0]
  within = [h for h in history
            if h["test_error"] <= dense["test_error"] + config.max_error_increase + 1e-12]
  best = max(within, key=lambda h: h["compression"])
  return {"compression": config.target_compression,
          "max_error_increase": config.max_error_increase,
          "best_iteration": best["iteration"], "best_compression": best["compression"],
          "best_test_error": best["test_error"],
          "reached": best["compression"] >= config.target_compression * (1 - 1e-9),
          "curve": [(h["compression"], h["test_error"]) for h in history]}


def _layer_prunings(config: Config, params, layer: str, iteration: int) -> tuple[int, int]:
  """(prunings of `layer` up to and including `iteration`, prunings in the whole run)."""
  done = total = 0
  for it in range(1, config.iterations + 1):
    group = _group_layers(config, it, params)
    if group is None or layer in group:
      total += 1
      done += it <= iteration
  return done, total


def _iteration_quality(config: Config, iteration: int, params, masks, record: dict, data, model):
  """The quality argument of `masks.prune` for `iteration`: the configured schedule, with
  density targets and the compression target turned into per-layer qualities (lwc.schedule)."""
  from lwc import schedule
  if config.target_compression:
    from lwc import sensitivity
    counts = masks_lib.total_counts(masks)
    current = counts["nonzero"] / counts["weights"]
    want = schedule.next_density(current, 1.0 / config.target_compression,
                                 config.iterations - iteration + 1)
    remove = counts["nonzero"] - int(np.floor(want * counts["weights"] + 0.5))
    images, labels = data.sensitivity_set(config.sensitivity_examples)
    result = sensitivity.sweep(model.apply, params, masks, images, labels, ks=(1,),
                               std_of=config.std_of)
    fractions = schedule.allocate(result, max(remove, 0))
    densities = schedule.densities_after(result, fractions)
    record["allocation"] = {
        "density_before": current, "density_wanted": want, "sweep_seconds": result.seconds,
        "sweep_examples": result.num_examples, "fractions": fractions,
        "densities": densities, "predicted_error": schedule.predicted_error(result, fractions),
        "baseline_error": float(np.asarray(result.baseline)[0])}
    log.info("iteration %d: density %.4f -> %.4f; sensitivity allocates %s", iteration, current,
             want, ", ".join(f"{k} {100 * v:.1f}%" for k, v in densities.items()))
    return schedule.qualities_for_densities(params, masks, densities, config.std_of)
  quality = config.quality(iteration)
  if not config.layer_densities:
    return quality
  base = quality if isinstance(quality, dict) else {"default": quality}
  wanted = {}
  for layer, final in config.layer_densities.items():
    done, total = _layer_prunings(config, params, layer, iteration)
    wanted[layer] = schedule.geometric_density(final, done, total)
  record["densities_wanted"] = wanted
  return {**base, **schedule.qualities_for_densities(params, masks, wanted, config.std_of)}


def _prune(config: Config, iteration: int, root, params, masks, record: dict, log_eval,
           step: int, data, model):
  """Prunes for `iteration` >= 1, fills `record` with what was done, returns (params, masks)."""
  quality = _iteration_quality(config, iteration, params, masks, record, data, model)
  thresholds = masks_lib.layer_thresholds(params, masks, quality, config.std_of)
  group = _group_layers(config, iteration, params)
  prune_rng = (jax.random.fold_in(jax.random.fold_in(root, 7919), iteration)
               if config.probabilistic_pruning else None)
  params, masks = masks_lib.prune(params, masks, quality, config.std_of, layers=group,
                                  rng=prune_rng)
  faults.maybe_kill("prune", iteration)
  after_prune = log_eval(iteration, "prune", step, params, masks)
  record["pruned_group"] = config.prune_group(iteration)
  record["quality"] = masks_lib.resolve_qualities(params, quality)
  record["thresholds"] = {k: float(v) for k, v in thresholds.items()}
  record["test_error_after_prune"] = after_prune["error"]
  record["density_after_prune"] = {k: v["density"]
                                   for k, v in masks_lib.layer_counts(masks).items()}
  empty = [k for k, v in masks_lib.layer_counts(masks).items() if v["nonzero"] == 0]
  if empty:  # a legitimate, if useless, result: reported, never a crash later
    record["empty_layers"] = empty
    log.warning("iteration %d pruned every weight of %s: the network now computes a constant",
                iteration, ", ".join(empty))
  counts = masks_lib.total_counts(masks)
  log.info("iteration %d: pruned to %d of %d weights (%.1fx), test error %.2f%% before "
           "retraining", iteration, counts["nonzero"], counts["weights"],
           counts["compression"], 100 * after_prune["error"])
  return params, masks
