"""Every setting of a pipeline run, in one place: its default, its range, its flag and its help.

`Config` is a frozen dataclass. Each field's metadata holds the help text of its flag (and, where
the flag is named otherwise, the flag's name), so `lwc.experiments.common` defines every flag and
builds the `Config` from them by walking these fields: a new setting is one field here (and the
code that reads it), never a second list of flags.

Kinds of field and their flags: str, int, float, bool (one flag each; `choices` makes an enum),
tuple (a comma-separated list), and mappings: `layer_qualities` / `layer_densities` (a repeated
`--layer_quality=NAME=Q[:Q...]` / `--layer_density=NAME=D`) and `model_kwargs` (a JSON object).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import math
from typing import Any

import numpy as np

from lwc.errors import UserError

MAX_INT = 2**31 - 1  # steps and counts are saved as int32
AUTO_VALIDATION = -1


def _field(default, help: str, flag: str | None = None, choices: tuple | None = None):
  """A Config field with its flag's help text (and its name, when not the field's)."""
  meta = {"help": help, "flag": flag, "choices": choices}
  if isinstance(default, (dict, list)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
  """Every hyper-parameter of a run; `dataclasses.fields(Config)` is also the list of flags."""

  # --- the network (lwc.network) ---
  model: str = _field("lenet_300_100", "Network: a built-in name (lwc.models.MODELS) or an "
                      "import path package.module:factory (a Flax Linen or NNX module class, or "
                      "a callable returning one).")
  model_kwargs: Mapping[str, Any] = _field({}, "Keyword arguments of --model's factory, as a "
                                           "JSON object, e.g. '{\"depth\": 3}'.")
  widths: tuple[int, ...] = _field((), "Layer widths of a built-in model (empty: its own), "
                                   "e.g. narrow nets for smoke runs; see lwc/models.")
  num_classes: int = _field(0, "Classes of the network's output (0: the dataset's).")
  # --- the data (lwc.data) ---
  dataset: str = _field("mnist", "A TFDS image-classification name (mnist, fashion_mnist, "
                        "cifar10, ...), imagenet2012 (streamed), or a .npz file of x_train, "
                        "y_train, x_test, y_test.")
  data_dir: str | None = _field(None, "TFDS data_dir; a folder of MNIST-format IDX files, or a "
                                ".npz file, is read directly instead (reported under --dataset).")
  download: bool = _field(True, "Let TFDS download and prepare the dataset when data_dir does "
                          "not hold it yet (off: fail at once).")
  train_split: str = _field("train", "TFDS split to train on (the validation split is carved "
                            "from it).")
  test_split: str = _field("test", "TFDS split the test error is measured on (imagenet2012: "
                           "'validation' when left at 'test').")
  validation: int = _field(AUTO_VALIDATION, "Training examples set apart as the validation "
                           "split, which takes every decision (-1: 5,000, or a tenth of the "
                           "training set when smaller; 0 needs --decide_on_test or --refit).")
  validation_seed: int = _field(0, "Seed of the choice of validation examples (independent of "
                                "--seed, so every seed of a recipe validates on the same set).")
  decide_on_test: bool = _field(False, "With --validation=0: let the test split take the "
                                "decisions (every report then says so).")
  refit: bool = _field(False, "With --validation=0: train on every training image with every "
                       "decision fixed in advance, as when a recipe chosen on a validation "
                       "split by earlier runs is trained once more on all the data. No split "
                       "takes a decision: --target_compression's sweeps must read training "
                       "images (--sweep_split=train) or use a ranking --allocation, its error "
                       "stop is off, and the last iteration is the result.")
  train_eval_examples: int = _field(0, "Training images (a fixed seeded sample, the same at "
                                    "every epoch and on resume) evaluated like the validation "
                                    "and test splits, as train_sample_error / _loss in "
                                    "metrics.jsonl, summary.json and TensorBoard: the "
                                    "generalisation gap, reported; no decision reads it (0: off; "
                                    "in-memory datasets only).")
  augment_shift: int = _field(0, "Beyond the paper: each training image (dense training and "
                              "retraining) moved by a random whole number of pixels in [-N, N] "
                              "along each axis, drawn per image and step, the border it uncovers "
                              "0 (lwc.augmentation; 0: off). In-memory datasets only: ImageNet "
                              "has Caffe's crops. lwc's MNIST recipes use none, as the published "
                              "rows they are compared with.")
  augment_flip: bool = _field(False, "Beyond the paper: each training image mirrored left to "
                              "right with probability 1/2, drawn per image and step (CIFAR-style "
                              "photographs; not for digits). In-memory datasets only.")
  tfds_name: str = _field("", "For --dataset=imagenet2012: read this TFDS dataset instead (same "
                          "image/label features), e.g. a small one for smoke runs.")
  image_size: int = _field(0, "ImageNet crop size (0: 227 for AlexNet, 224 for VGG-16); "
                           "smaller sizes make CPU smoke runs possible.")
  resize_size: int = _field(256, "ImageNet images are resized to this square size before "
                            "cropping (Caffe: 256).")
  # --- training ---
  init_checkpoint: str = _field("", "Start from trained weights: an lwc workdir (DIR or "
                                "DIR:ITERATION, params and masks) or a pretrained "
                                ".npz/.safetensors file (see docs/pretrained.md).")
  seed: int = _field(0, "Seed of every random choice: init, data order, dropout.")
  batch_size: int = _field(100, "Global batch size (split over all devices).")
  optimizer: str = _field("sgd", "Inner optimiser.", choices=("sgd", "adam"))
  momentum: float = _field(0.9, "SGD momentum.")
  learning_rate: float = _field(0.1, "Learning rate of dense training.")
  lr_schedule: str = _field("constant", "Learning-rate schedule within each phase.",
                            choices=("constant", "inv", "step", "cosine"))
  retrain_lr_schedule: str = _field("", "Learning-rate schedule of retraining phases ('' = "
                                    "same as lr_schedule).",
                                    choices=("", "constant", "inv", "step", "cosine"))
  lr_decay_steps: int = _field(0, "For lr_schedule=step: steps between decays.")
  lr_decay_factor: float = _field(0.1, "For lr_schedule=step: factor per decay.")
  dense_epochs: int = _field(20, "Epochs of dense training (iteration 0).")
  retrain_epochs: int = _field(10, "Epochs of retraining after each pruning.")
  final_retrain_epochs: int = _field(0, "Epochs of the last iteration's retraining (iteration "
                                     "--iterations: the one that reaches a target), a longer "
                                     "fine-tune of the final sparse network (0: "
                                     "--retrain_epochs).")
  retrain_lr_scale: float = _field(0.1, "Retraining learning rate as a fraction of "
                                   "learning_rate (the paper: 1/10 for LeNet, 1/100 for AlexNet).")
  # --- pruning (lwc.iterative) ---
  iterations: int = _field(5, "Prune/retrain iterations after dense training.")
  qualities: tuple[float, ...] = _field((1.0,), "Pruning quality per iteration (threshold = "
                                        "quality x std of the layer's surviving weights); one "
                                        "value applies to every iteration.", flag="quality")
  layer_qualities: Mapping[str, tuple[float, ...]] = _field(
      {}, "Per-layer override NAME=Q[:Q...] (one Q or one per iteration), e.g. fc3=0.5. Repeat "
      "for several layers.", flag="layer_quality")
  layer_densities: Mapping[str, float] = _field(
      {}, "Per-layer final density NAME=D (surviving fraction of its weights, e.g. fc6=0.09), "
      "reached geometrically over the iterations that prune the layer; replaces its quality.",
      flag="layer_density")
  target_compression: float = _field(0.0, "Beyond the paper: prune toward this many times fewer "
                                     "weights, each iteration's per-layer cut chosen by "
                                     "--allocation (by default a sensitivity sweep on the "
                                     "validation split; 0: off; "
                                     "--iterations is the most iterations).")
  max_error_increase: float = _field(0.001, "With --target_compression: stop when the "
                                     "validation error after retraining exceeds the dense one "
                                     "by more than this (0.001 = 0.1 points).")
  sensitivity_examples: int = _field(10000, "Images each sensitivity sweep of "
                                     "--target_compression evaluates, from --sweep_split's "
                                     "split (at most the split).")
  sweep_split: str = _field("validation", "Which images --target_compression's sensitivity "
                            "sweeps evaluate: the validation split, or a fixed seeded sample of "
                            "--sensitivity_examples training images (train), which leaves the "
                            "validation split untouched by the run's allocations, for comparing "
                            "recipes and for the target stop.", choices=("validation", "train"))
  allocation: str = _field("sensitivity", "How --target_compression shares each cut among the "
                           "layers: a sensitivity sweep (sensitivity), or one ranking of every "
                           "surviving weight with no sweep: by |w| (global: one magnitude "
                           "threshold for the network), by Lee et al.'s layer-adaptive score "
                           "(lamp), or the same fraction of every layer's survivors (uniform). "
                           "Within a layer the cut is always by magnitude.",
                           choices=("sensitivity", "global", "lamp", "uniform"))
  allocation_metric: str = _field("error", "What --target_compression's allocation minimises "
                                  "per weight removed, measured by the sensitivity sweep on the "
                                  "validation split: the top-1 error, or the mean cross-entropy "
                                  "(loss: a smoother measure, moved by every cut).",
                                  choices=("error", "loss"))
  std_of: str = _field("survivors", "Which weights' standard deviation sets the threshold: "
                       "the layer's surviving weights (default), all its entries (zeros "
                       "included), or its dense weights, measured after dense training and "
                       "kept (Distiller's semantics).", choices=("survivors", "all", "dense"))
  threshold_scope: str = _field("layer", "With fixed qualities: one threshold per layer "
                                "(the paper) or one for the whole network (global: quality x "
                                "the std of every prunable weight pooled).",
                                choices=("layer", "global"))
  density_schedule: str = _field("geometric", "How --target_compression and --layer_density "
                                 "step toward the final density: geometric (the same fraction "
                                 "of survivors each iteration), cubic (Zhu & Gupta 2017: "
                                 "large cuts first, small ones at the end), polynomial (the "
                                 "same with --schedule_power for 3, as TF-MOT's "
                                 "PolynomialDecay) or log_polynomial (the log of the density "
                                 "follows that polynomial: a cut of a shrinking fraction of the "
                                 "survivors each iteration, 1 being geometric).",
                                 choices=("geometric", "cubic", "polynomial", "log_polynomial"))
  schedule_power: float = _field(3.0, "Exponent of --density_schedule=polynomial and "
                                 "log_polynomial.")
  lr_rewind: bool = _field(False, "Learning-rate rewinding (Renda et al. 2020): each "
                           "retraining rewinds to dense training's learning rate and schedule "
                           "(over the retraining's steps) instead of --retrain_lr_scale and "
                           "--retrain_lr_schedule.")
  prune_groups: tuple[str, ...] = _field(("all",), "Per iteration, the layer group pruned and "
                                         "retrained with the other frozen (section 3.3): all, "
                                         "fc or conv; one value applies to every iteration.")
  probabilistic_pruning: bool = _field(False, "Prune with a probability falling with |w| "
                                       "(section 3.4's ablation) instead of a hard threshold.")
  dropout: float = _field(0.0, "Dropout rate D_o on the outputs of --dropout_layers in dense "
                          "training; retraining rescales it per layer to D_o*sqrt(C_ir/C_io).")
  dropout_layers: tuple[str, ...] = _field((), "Hidden layers whose outputs get dropout, e.g. "
                                           "fc1,fc2 (LeNet-300-100) or fc1 (LeNet-5).")
  dropout_rescale: str = _field("sqrt", "Dropout in retraining: sqrt is section 3.2's "
                                "D_o*sqrt(C_ir/C_io); none keeps D_o at every iteration.",
                                choices=("sqrt", "none"))
  retrain_dropout: float = _field(-1.0, "D_o of every retraining, before --dropout_rescale "
                                  "(-1: --dropout, the rate of dense training; e.g. 0.5 with "
                                  "--dropout=0 adds dropout to retraining only).")
  recalibration_batches: int = _field(50, "Models with BatchNorm: after each pruning, "
                                      "re-estimate the running statistics on this many "
                                      "training batches before retraining (0: off).")
  remove_dead_neurons: bool = _field(True, "After the last iteration, write "
                                     "workdir/small_model: the network without dead neurons "
                                     "(same function).")
  regularization: str = _field("l2", "Penalty in dense training.", choices=("none", "l1", "l2"))
  reg_strength: float = _field(1e-4, "Penalty strength in dense training.")
  retrain_regularization: str = _field("l2", "Penalty in retraining.",
                                       choices=("none", "l1", "l2"))
  retrain_reg_strength: float = _field(1e-4, "Penalty strength in retraining.")
  distill_weight: float = _field(0.0, "Beyond the paper: each retraining also learns from the "
                                 "dense network's outputs (knowledge distillation, "
                                 "lwc.distillation); the loss is (1 - w) x cross-entropy + w x "
                                 "T^2 x KL(teacher || student) at temperature T (0: off).")
  distill_temperature: float = _field(4.0, "Temperature T of --distill_weight's soft targets.")
  label_smoothing: float = _field(0.0, "Beyond the paper: training's cross-entropy is taken "
                                  "against labels smoothed toward uniform by this much "
                                  "(optax.smooth_labels; 0: off) in dense training, and in "
                                  "retraining unless --retrain_label_smoothing says otherwise. "
                                  "Evaluation's cross-entropy stays on the true labels.")
  retrain_label_smoothing: float = _field(-1.0, "--label_smoothing of every retraining (-1: "
                                          "the same as dense training's).")
  average_decay: float = _field(0.0, "Beyond the paper: the network dense training (and every "
                                "retraining, unless --retrain_average_decay says otherwise) "
                                "hands on is the exponential moving average of its iterates "
                                "with this decay, not the last iterate (lwc.averaging; masks "
                                "unchanged, pruned weights stay 0.0; 0: off).")
  retrain_average_decay: float = _field(-1.0, "--average_decay of every retraining (-1: the "
                                        "same as dense training's).")
  admm_rho: float = _field(0.0, "Beyond the paper: ADMM-regularised retraining (Zhang et al. "
                           "2018, progressive as Ye et al. 2019; lwc.admm): each retraining but "
                           "the last also pulls every layer's weights toward their projection "
                           "onto the next cut's keep count, with strength rho (0: off). Needs "
                           "--target_compression or --layer_density.")
  admm_updates_per_epoch: int = _field(1, "Updates of ADMM's projection Z and dual U per "
                                       "epoch of retraining.")
  admm_rho_growth: float = _field(1.0, "ADMM's rho is multiplied by this after each update of "
                                  "Z and U (1: constant).")
  # --- running ---
  steps_per_call: int = _field(0, "Train steps fused in one jitted call (0 = one epoch, the "
                               "fastest on CPU for both LeNets).")
  checkpoint_every_steps: int = _field(5000, "Within a phase, also checkpoint (to "
                                       "workdir/progress, newest only) every this many steps; "
                                       "0 = only at the end of each iteration. SIGTERM always "
                                       "saves at the next step boundary.")
  eval_batch_size: int = _field(2000, "Batch size of evaluation.")
  tensorboard: bool = _field(True, "Also write TensorBoard scalars to workdir/tensorboard.")
  log_every_seconds: float = _field(5.0, "Seconds between progress lines.")

  # Every numeric field and its range, checked by `validate` before anything is read:
  # (low, high) for integers; (low, high, low inclusive, high inclusive) for floats.
  INT_RANGES = {
      "num_classes": (0, MAX_INT), "image_size": (0, MAX_INT), "resize_size": (1, MAX_INT),
      "seed": (0, 2**32 - 1), "batch_size": (1, MAX_INT), "lr_decay_steps": (0, MAX_INT),
      "dense_epochs": (0, MAX_INT), "retrain_epochs": (0, MAX_INT),
      "final_retrain_epochs": (0, MAX_INT), "iterations": (0, 10_000),
      "sensitivity_examples": (0, MAX_INT), "steps_per_call": (0, MAX_INT),
      "train_eval_examples": (0, MAX_INT), "augment_shift": (0, MAX_INT),
      "checkpoint_every_steps": (0, MAX_INT), "eval_batch_size": (1, MAX_INT),
      "validation": (AUTO_VALIDATION, MAX_INT), "validation_seed": (0, 2**32 - 1),
      "recalibration_batches": (0, MAX_INT), "admm_updates_per_epoch": (1, MAX_INT)}
  FLOAT_RANGES = {
      "momentum": (0.0, 1.0, True, False), "learning_rate": (0.0, math.inf, False, False),
      "lr_decay_factor": (0.0, math.inf, False, False),
      "retrain_lr_scale": (0.0, math.inf, False, False),
      "target_compression": (0.0, math.inf, True, False),
      "max_error_increase": (0.0, 1.0, True, True), "dropout": (0.0, 1.0, True, False),
      "schedule_power": (0.0, math.inf, False, False),
      "reg_strength": (0.0, math.inf, True, False),
      "retrain_reg_strength": (0.0, math.inf, True, False),
      "distill_weight": (0.0, 1.0, True, True),
      "distill_temperature": (0.0, math.inf, False, False),
      "label_smoothing": (0.0, 1.0, True, False), "average_decay": (0.0, 1.0, True, False),
      "retrain_label_smoothing": (-1.0, 1.0, True, False),
      "retrain_average_decay": (-1.0, 1.0, True, False),
      "retrain_dropout": (-1.0, 1.0, True, False),
      "admm_rho": (0.0, math.inf, True, False), "admm_rho_growth": (1.0, math.inf, True, False),
      "log_every_seconds": (0.0, math.inf, True, False)}

  def validate(self) -> None:
    """UserError naming the first setting out of its range or inconsistent with another."""
    _check_ranges(self)
    _check_choices(self)
    _check_schedules(self)
    _check_pruning(self)
    if self.validation == 0 and not (self.decide_on_test or self.refit):
      raise UserError("--validation=0 leaves no validation split: the test split would take the "
                      "decisions and no longer measure the result; set --validation, add "
                      "--decide_on_test to accept it (every report then says so), or add "
                      "--refit when every decision is fixed in advance")
    _check_refit(self)
    if not isinstance(self.model_kwargs, Mapping):
      raise UserError(f"model_kwargs must be a mapping, got {self.model_kwargs!r}")

  def quality(self, iteration: int) -> dict[str, float] | float:
    """The quality argument of `masks.prune` for iteration >= 1."""
    def pick(qs):
      return float(qs[0] if len(qs) == 1 else qs[iteration - 1])
    if not self.layer_qualities:
      return pick(self.qualities)
    return {"default": pick(self.qualities),
            **{k: pick(v) for k, v in self.layer_qualities.items()}}

  def phase_epochs(self, iteration: int) -> int:
    """Epochs of iteration's training phase: dense training (0), retraining (1 ..), and the
    last iteration's retraining with --final_retrain_epochs."""
    if iteration == 0:
      return self.dense_epochs
    if iteration == self.iterations and self.final_retrain_epochs:
      return self.final_retrain_epochs
    return self.retrain_epochs

  def prune_group(self, iteration: int) -> str:
    """The layer group pruned and retrained at iteration >= 1 ('all', 'fc' or 'conv')."""
    groups = self.prune_groups
    return groups[0] if len(groups) == 1 else groups[iteration - 1]

  @property
  def decisions_split(self) -> str:
    """The split that takes every decision: 'validation', 'test' with --decide_on_test, or
    'none' with --refit (no decision is taken during the run)."""
    if self.validation != 0:
      return "validation"
    return "none" if self.refit else "test"

  @property
  def sweep_split_name(self) -> str:
    """The split --target_compression's sweeps evaluate: 'train' with --sweep_split=train,
    otherwise the decisions split."""
    return "train" if self.sweep_split == "train" else self.decisions_split

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
      elif isinstance(value, dict) and key != "model_kwargs":
        value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
      kwargs[key] = value
    return cls(**kwargs)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    """Plain JSON types (tuples as lists, mappings as dicts); `from_json` inverts it."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_ranges(config: Config) -> None:
  for name, (low, high) in Config.INT_RANGES.items():
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise UserError(f"{name} must be an integer, got {value!r}")
    if value < low:
      raise UserError(f"{name} must be >= {low}, got {value}")
    if value > high:
      raise UserError(f"{name} must be <= {high}, got {value}")
  for name, (low, high, low_in, high_in) in Config.FLOAT_RANGES.items():
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      raise UserError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
      raise UserError(f"{name} must be a finite number, got {value}")
    if not ((low <= value if low_in else low < value) and
            (value <= high if high_in else value < high)):
      span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
      raise UserError(f"{name} must be in {span}, got {value:g}")
  if any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 1 <= w <= MAX_INT
         for w in config.widths):
    raise UserError(f"widths must be positive, got {list(config.widths)}")


def _check_choices(config: Config) -> None:
  for field in dataclasses.fields(Config):
    choices = field.metadata.get("choices")
    value = getattr(config, field.name)
    if choices and value not in choices:
      shown = ", ".join(c or "''" for c in choices)
      raise UserError(f"{field.name} must be one of {shown}, got '{value}'")


def _check_schedules(config: Config) -> None:
  schedules = [("lr_schedule", config.lr_schedule)]
  if config.iterations and config.retrain_lr_schedule:
    schedules.append(("retrain_lr_schedule", config.retrain_lr_schedule))
  for name, kind in schedules:
    if kind == "step" and config.lr_decay_steps <= 0:
      raise UserError(f"{name}=step needs lr_decay_steps > 0")


def _check_refit(config) -> None:
  """UserError when --refit is asked of a run that would still take a decision."""
  if not config.refit:
    return
  if config.validation != 0:
    raise UserError("--refit trains on every training image: it needs --validation=0 (a "
                    f"validation split of {config.validation} would be carved and never used)")
  if config.decide_on_test:
    raise UserError("--refit and --decide_on_test contradict each other: a refit takes no "
                    "decision, --decide_on_test lets the test split take them; choose one")
  if (config.target_compression and config.allocation == "sensitivity"
      and config.sweep_split != "train"):
    raise UserError("--refit with --target_compression: the sensitivity sweeps that share each "
                    "cut among the layers would read the test split; add --sweep_split=train, "
                    "or share the cuts by a ranking (--allocation=global, lamp or uniform)")


def _check_pruning(config: Config) -> None:
  n = config.iterations
  if n > 0 and len(config.qualities) not in (1, n):
    raise UserError(f"qualities has {len(config.qualities)} values; give 1 or iterations={n}")
  for layer, qs in config.layer_qualities.items():
    if len(qs) not in (1, n):
      raise UserError(f"layer quality for {layer} has {len(qs)} values; give 1 or "
                      f"iterations={n}")
  for q in list(config.qualities) + [q for qs in config.layer_qualities.values() for q in qs]:
    if not (isinstance(q, (int, float)) and math.isfinite(q) and q >= 0):
      raise UserError(f"quality must be a finite number >= 0, got {q}")
  if n > 0 and len(config.prune_groups) not in (1, n):
    raise UserError(f"prune_groups has {len(config.prune_groups)} values; give 1 or "
                    f"iterations={n}")
  for group in config.prune_groups:
    if group not in ("all", "fc", "conv"):
      raise UserError(f"prune group must be all, fc or conv, got '{group}'")
  if config.target_compression and config.target_compression <= 1:
    raise UserError(f"target_compression must be > 1 (or 0: off), got "
                    f"{config.target_compression}")
  if config.target_compression and config.layer_densities:
    raise UserError("target_compression chooses every layer's density: drop layer_densities")
  if config.admm_rho and not (config.target_compression or config.layer_densities):
    raise UserError("--admm_rho pulls each layer toward the next cut's keep count, which needs "
                    "--target_compression or --layer_density (fixed qualities do not say it "
                    "before the cut)")
  for layer, d in config.layer_densities.items():
    if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d <= 1.0):
      raise UserError(f"density for layer {layer} must be in [0, 1], got {d}")


def settings_without_effect(config: Config) -> list[str]:
  """One line per setting given a value other than its default that this configuration never
  reads (e.g. --allocation_metric without --target_compression), naming the flag and why.

  Not an error: a flagfile often inherits settings another one uses (a target recipe includes
  the Table 1 file's qualities), but a run never drops a setting silently; the pipeline logs
  these lines and keeps them in summary.json.
  """
  fields = {f.name: f for f in dataclasses.fields(Config)}
  from lwc import dropout as dropout_lib  # imports JAX (through lwc.masks); config stays light

  lines = []

  def unused(when: bool, why: str, *names: str) -> None:
    changed = [n for n in names if getattr(config, n) != field_default(fields[n])]
    if when and changed:
      lines.append(f"{', '.join('--' + flag_name(fields[n]) for n in changed)}: no effect {why}")

  target = bool(config.target_compression)
  unused(not target, "without --target_compression",
         "allocation_metric", "sensitivity_examples", "max_error_increase", "sweep_split")
  unused(not target, "without --target_compression", "allocation")
  unused(target and config.allocation != "sensitivity",
         f"with --allocation={config.allocation} (no sensitivity sweep)",
         "allocation_metric", "sensitivity_examples", "sweep_split")
  unused(target, "with --target_compression (its allocation chooses every layer's "
         "density; the threshold follows from the density)",
         "qualities", "layer_qualities", "threshold_scope", "std_of")
  both = sorted(set(config.layer_qualities) & set(config.layer_densities))
  if both:
    lines.append(f"--layer_quality for {', '.join(both)}: no effect (--layer_density sets those "
                 "layers)")
  densities = target or bool(config.layer_densities)
  unused(not densities, "without --target_compression or --layer_density", "density_schedule")
  unused(densities and config.density_schedule not in ("polynomial", "log_polynomial"),
         f"with --density_schedule={config.density_schedule} (only polynomial and "
         "log_polynomial read it)", "schedule_power")
  unused(config.iterations == 0, "with --iterations=0 (no retraining)",
         "distill_weight", "final_retrain_epochs", "lr_rewind", "retrain_label_smoothing",
         "retrain_average_decay")
  unused(not config.distill_weight, "without --distill_weight", "distill_temperature")
  unused(not config.admm_rho, "without --admm_rho", "admm_updates_per_epoch", "admm_rho_growth")
  unused(config.iterations < 2, "with fewer than 2 iterations (the last retraining has no next "
         "cut to prepare)", "admm_rho")
  unused(config.lr_rewind, "with --lr_rewind (retraining rewinds to dense training's learning "
         "rate and schedule)", "retrain_lr_scale", "retrain_lr_schedule")
  schedules = {config.lr_schedule}
  if config.iterations and not config.lr_rewind:
    schedules.add(config.retrain_lr_schedule or config.lr_schedule)
  unused("step" not in schedules, "without a step learning-rate schedule",
         "lr_decay_steps", "lr_decay_factor")
  unused(config.optimizer != "sgd", f"with --optimizer={config.optimizer}", "momentum")
  unused(not dropout_lib.drops_anywhere(config), "with --dropout=0 and --retrain_dropout 0 or "
         "unset", "dropout_layers")
  unused(not config.dropout_layers, "without --dropout_layers", "dropout", "retrain_dropout")
  unused(not (dropout_lib.original_rate(config, 1) and config.dropout_layers),
         "without dropout in retraining "
         "(--dropout or --retrain_dropout, and --dropout_layers)", "dropout_rescale")
  unused(config.iterations == 0, "with --iterations=0 (no retraining)", "dropout_rescale",
         "retrain_dropout")
  unused(config.validation != 0, "with a validation split (--validation is not 0)",
         "decide_on_test")
  unused(bool(config.target_compression) and config.refit,
         "with --refit (no split decides, so nothing stops the run before the target)",
         "max_error_increase")
  unused(config.dataset != "imagenet2012", f"with --dataset={config.dataset}",
         "tfds_name", "image_size", "resize_size")
  unused(config.dataset == "imagenet2012", "with --dataset=imagenet2012 (its streamed pipeline "
         "has Caffe's random crops and mirrors)", "augment_shift", "augment_flip")
  return lines


def field_default(field: dataclasses.Field):
  """The default value of a Config field (a fresh one for mutable defaults)."""
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()


def flag_name(field: dataclasses.Field) -> str:
  """The command-line flag of a Config field."""
  return field.metadata.get("flag") or field.name


def resolved_validation(config: Config, num_train: int) -> int:
  """Validation examples of a run on `num_train` training examples (-1: 5,000, or a tenth of
  the training set when that is smaller)."""
  if config.validation != AUTO_VALIDATION:
    return config.validation
  return min(5000, num_train // 10)
