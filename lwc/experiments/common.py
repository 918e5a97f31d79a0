"""Flags shared by every experiment entry point, and the main wrapper that turns bad input into
one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys

import jax

from absl import flags
from absl import logging as absl_logging

from lwc import pipeline
from lwc.errors import UserError

FLAGS = flags.FLAGS


def define_flags(model_default: str, models: list[str], dataset_default: str = "mnist") -> None:
  """Defines every flag (once per process: a second call, e.g. a test importing two entry
  points, keeps the first definitions)."""
  if "workdir" in FLAGS:
    return
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, "
                      "summary.json. Running again with the same workdir resumes.", required=True)
  flags.DEFINE_enum("model", model_default, models, "Network to train and prune.")
  flags.DEFINE_list("widths", [], "Layer widths of the model (empty: the paper's), e.g. "
                    "narrow AlexNets for smoke runs; see lwc/models.")
  flags.DEFINE_integer("num_classes", 0, "Classes of ImageNet models (0: the dataset's).",
                       lower_bound=0)
  flags.DEFINE_string("dataset", dataset_default, "mnist or imagenet2012.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir; a folder holding the MNIST IDX files "
                      "(as ../shared/data/mnist) is read directly instead.")
  flags.DEFINE_string("tfds_name", "", "For --dataset=imagenet2012: read this TFDS dataset "
                      "instead (same image/label features), e.g. a small one for smoke runs.")
  flags.DEFINE_integer("image_size", 0, "ImageNet crop size (0: 227 for AlexNet, 224 for "
                       "VGG-16); smaller sizes make CPU smoke runs possible.", lower_bound=0)
  flags.DEFINE_integer("resize_size", 256, "ImageNet images are resized to this square size "
                       "before cropping (Caffe: 256).", lower_bound=1)
  flags.DEFINE_string("init_checkpoint", "", "Start from trained weights: an lwc workdir (DIR "
                      "or DIR:ITERATION, params and masks) or a pretrained .npz/.safetensors "
                      "file (see docs/pretrained.md).")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                      "(default: from the TPU/SLURM environment or LWC_COORDINATOR).")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
  flags.DEFINE_bool("download", True, "Let TFDS download and prepare the dataset when data_dir "
                    "does not hold it yet (off: fail at once).")
  flags.DEFINE_integer("seed", 0, "Seed of every random choice: init, data order, dropout.")
  flags.DEFINE_integer("batch_size", 100, "Global batch size (split over all devices).",
                       lower_bound=1)
  flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Inner optimiser.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0)
  flags.DEFINE_float("learning_rate", 0.1, "Learning rate of dense training.")
  flags.DEFINE_enum("lr_schedule", "constant", ["constant", "inv", "step", "cosine"],
                    "Learning-rate schedule within each phase.")
  flags.DEFINE_enum("retrain_lr_schedule", "", ["", "constant", "inv", "step", "cosine"],
                    "Learning-rate schedule of retraining phases ('' = same as lr_schedule).")
  flags.DEFINE_integer("lr_decay_steps", 0, "For lr_schedule=step: steps between decays.")
  flags.DEFINE_float("lr_decay_factor", 0.1, "For lr_schedule=step: factor per decay.")
  flags.DEFINE_integer("dense_epochs", 20, "Epochs of dense training (iteration 0).",
                       lower_bound=0)
  flags.DEFINE_integer("retrain_epochs", 10, "Epochs of retraining after each pruning.",
                       lower_bound=0)
  flags.DEFINE_float("retrain_lr_scale", 0.1, "Retraining learning rate as a fraction of "
                     "learning_rate (the paper: 1/10 for LeNet, 1/100 for AlexNet).")
  flags.DEFINE_integer("iterations", 5, "Prune/retrain iterations after dense training.",
                       lower_bound=0)
  flags.DEFINE_list("quality", ["1.0"], "Pruning quality per iteration (threshold = quality x "
                    "std of the layer's surviving weights); one value applies to every iteration.")
  flags.DEFINE_multi_string("layer_quality", [], "Per-layer override NAME=Q[:Q...] (one Q or one "
                            "per iteration), e.g. fc3=0.5. Repeat for several layers.")
  flags.DEFINE_multi_string("layer_density", [], "Per-layer final density NAME=D (surviving "
                            "fraction of its weights, e.g. fc6=0.09), reached geometrically over "
                            "the iterations that prune the layer; replaces its quality.")
  flags.DEFINE_float("target_compression", 0.0, "Beyond the paper: prune toward this many times "
                     "fewer weights, each iteration's per-layer cut chosen by a sensitivity sweep "
                     "of the current network (0: off; --iterations is the most iterations).")
  flags.DEFINE_float("max_error_increase", 0.001, "With --target_compression: stop when the test "
                     "error after retraining exceeds the dense one by more than this (0.001 = "
                     "0.1 points).", lower_bound=0.0)
  flags.DEFINE_integer("sensitivity_examples", 10000, "Training images each sensitivity sweep "
                       "of --target_compression evaluates.", lower_bound=1)
  flags.DEFINE_enum("std_of", "survivors", ["survivors", "all"], "Which weights' standard "
                    "deviation sets the threshold.")
  flags.DEFINE_list("prune_groups", ["all"], "Per iteration, the layer group pruned and "
                    "retrained with the other frozen (section 3.3): all, fc or conv; one value "
                    "applies to every iteration.")
  flags.DEFINE_bool("probabilistic_pruning", False, "Prune with a probability falling with |w| "
                    "(section 3.4's ablation) instead of a hard threshold.")
  flags.DEFINE_float("dropout", 0.0, "Dropout rate D_o on the outputs of --dropout_layers in "
                     "dense training; retraining rescales it per layer to D_o*sqrt(C_ir/C_io).")
  flags.DEFINE_list("dropout_layers", [], "Hidden layers whose outputs get dropout, e.g. "
                    "fc1,fc2 (LeNet-300-100) or fc1 (LeNet-5).")
  flags.DEFINE_bool("remove_dead_neurons", True, "After the last iteration, write "
                    "workdir/small_model: the network without dead neurons (same function).")
  flags.DEFINE_enum("regularization", "l2", ["none", "l1", "l2"], "Penalty in dense training.")
  flags.DEFINE_float("reg_strength", 1e-4, "Penalty strength in dense training.", lower_bound=0)
  flags.DEFINE_enum("retrain_regularization", "l2", ["none", "l1", "l2"],
                    "Penalty in retraining.")
  flags.DEFINE_float("retrain_reg_strength", 1e-4, "Penalty strength in retraining.",
                     lower_bound=0)
  flags.DEFINE_integer("steps_per_call", 0, "Train steps fused in one jitted call (0 = one "
                       "epoch, the fastest on CPU for both LeNets).", lower_bound=0)
  flags.DEFINE_integer("checkpoint_every_steps", 5000, "Within a phase, also checkpoint (to "
                       "workdir/progress, newest only) every this many steps; 0 = only at the end "
                       "of each iteration. SIGTERM always saves at the next step boundary.",
                       lower_bound=0)
  flags.DEFINE_integer("eval_batch_size", 2000, "Batch size of evaluation.", lower_bound=1)
  flags.DEFINE_bool("tensorboard", True, "Also write TensorBoard scalars to workdir/tensorboard.")
  flags.DEFINE_float("log_every_seconds", 5.0, "Seconds between progress lines.")


def _floats(values, what: str) -> tuple[float, ...]:
  out = []
  for v in values:
    try:
      out.append(float(v))
    except ValueError:
      raise UserError(f"{what}: '{v}' is not a number") from None
  return tuple(out)


def _ints(values, what: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UserError(f"{what}: expected integers, got {','.join(values)}") from None


def parse_layer_densities(items: list[str]) -> dict[str, float]:
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
      raise UserError(f"--layer_density={item}: expected NAME=D")
    out[name] = _floats([value], f"--layer_density={item}")[0]
  return out


def parse_layer_qualities(items: list[str]) -> dict[str, tuple[float, ...]]:
  out = {}
  for item in items:
    name, sep, values = item.partition("=")
    if not sep or not name or not values:
      raise UserError(f"--layer_quality={item}: expected NAME=Q or NAME=Q:Q:...")
    out[name] = _floats(values.split(":"), f"--layer_quality={item}")
  return out


def config_from_flags() -> pipeline.Config:
  return pipeline.Config(
      model=FLAGS.model, widths=_ints(FLAGS.widths, "--widths"), num_classes=FLAGS.num_classes,
      tfds_name=FLAGS.tfds_name, image_size=FLAGS.image_size, resize_size=FLAGS.resize_size,
      init_checkpoint=FLAGS.init_checkpoint, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      download=FLAGS.download, seed=FLAGS.seed,
      batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, momentum=FLAGS.momentum,
      learning_rate=FLAGS.learning_rate, lr_schedule=FLAGS.lr_schedule,
      retrain_lr_schedule=FLAGS.retrain_lr_schedule,
      lr_decay_steps=FLAGS.lr_decay_steps, lr_decay_factor=FLAGS.lr_decay_factor,
      dense_epochs=FLAGS.dense_epochs, retrain_epochs=FLAGS.retrain_epochs,
      retrain_lr_scale=FLAGS.retrain_lr_scale, iterations=FLAGS.iterations,
      qualities=_floats(FLAGS.quality, "--quality"),
      layer_qualities=parse_layer_qualities(FLAGS.layer_quality), std_of=FLAGS.std_of,
      layer_densities=parse_layer_densities(FLAGS.layer_density),
      target_compression=FLAGS.target_compression, max_error_increase=FLAGS.max_error_increase,
      sensitivity_examples=FLAGS.sensitivity_examples,
      prune_groups=tuple(FLAGS.prune_groups), probabilistic_pruning=FLAGS.probabilistic_pruning,
      dropout=FLAGS.dropout, dropout_layers=tuple(FLAGS.dropout_layers),
      remove_dead_neurons=FLAGS.remove_dead_neurons,
      regularization=FLAGS.regularization, reg_strength=FLAGS.reg_strength,
      retrain_regularization=FLAGS.retrain_regularization,
      retrain_reg_strength=FLAGS.retrain_reg_strength, steps_per_call=FLAGS.steps_per_call,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      eval_batch_size=FLAGS.eval_batch_size, tensorboard=FLAGS.tensorboard,
      log_every_seconds=FLAGS.log_every_seconds)


def start(argv) -> logging.Logger:
  """What every entry point does first: refuse stray arguments, log lwc's progress to stderr
  (orbax's per-file INFO lines silenced). Returns the 'lwc' logger."""
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  lwc_log = logging.getLogger("lwc")
  lwc_log.addHandler(handler)
  lwc_log.setLevel(logging.INFO)
  lwc_log.propagate = False
  return lwc_log


def run_or_exit(fn):
  """fn()'s result; on SIGTERM's Preempted `stopped: ...` and exit 0, on a NaN/Inf `error: ...`
  and exit 3, on any other bad input `error: ...` and exit 2 (one line, no traceback)."""
  try:
    return fn()
  except pipeline.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(0)
  except pipeline.NumericError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> None:
  lwc_log = start(argv)

  def run():
    from lwc import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if jax.process_index() != 0:
      lwc_log.setLevel(logging.WARNING)  # process 0 reports; the others only warn
    return pipeline.run(config_from_flags(), FLAGS.workdir)

  summary = run_or_exit(run)
  final = summary["final"]
  target = summary.get("target")
  if target and jax.process_index() == 0:
    print(f"target {target['compression']:g}x {'reached' if target['reached'] else 'NOT reached'}"
          f": best within +{100 * target['max_error_increase']:.2f} points is iteration "
          f"{target['best_iteration']}, {target['best_compression']:.1f}x at test error "
          f"{100 * target['best_test_error']:.2f}%")
  if final is not None and jax.process_index() == 0:
    print(f"done: {final['params_nonzero']}/{final['params_total']} weights "
          f"({final['compression']:.1f}x), test error {100 * final['test_error']:.2f}%"
          + (f" (top-5 {100 * final['test_top5_error']:.2f}%)" if "test_top5_error" in final
             else "") + f" -> {FLAGS.workdir}/summary.json")
