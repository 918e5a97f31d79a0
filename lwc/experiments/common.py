"""Flags shared by every experiment entry point, and the main wrapper that turns bad input into
one line on stderr and a non-zero exit."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import jax

from absl import flags
from absl import logging as absl_logging

from lwc import config as config_lib
from lwc import pipeline
from lwc.errors import UserError

FLAGS = flags.FLAGS


def define_flags(model_default: str, models: list[str] | None = None,
                 dataset_default: str = "mnist") -> None:
  """Defines every flag: one per `lwc.config.Config` field (its help, default and kind come from
  the field), plus the run's directory and the multi-host settings. `models`: the built-in
  names an entry point is for (None: any name or import path). Once per process: a second call,
  e.g. a test importing two entry points, keeps the first definitions."""
  if "workdir" in FLAGS:
    return
  global _ENTRY_MODELS
  _ENTRY_MODELS = tuple(models) if models else None
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, "
                      "summary.json. Running again with the same workdir resumes.", required=True)
  flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                      "(default: from the TPU/SLURM environment or LWC_COORDINATOR).")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
  defaults = {"model": model_default, "dataset": dataset_default}
  for field in dataclasses.fields(config_lib.Config):
    _define(field, defaults.get(field.name, config_lib.field_default(field)))


_ENTRY_MODELS: tuple[str, ...] | None = None


def _define(field: dataclasses.Field, default) -> None:
  """The flag of one Config field, its kind read from the default's type."""
  name, help_text = config_lib.flag_name(field), field.metadata["help"]
  choices = field.metadata.get("choices")
  if field.name in ("layer_qualities", "layer_densities"):
    flags.DEFINE_multi_string(name, [], help_text)
  elif field.name == "model_kwargs":
    flags.DEFINE_string(name, "", help_text)
  elif isinstance(default, tuple):
    flags.DEFINE_list(name, [str(v) for v in default], help_text)
  elif choices:
    flags.DEFINE_enum(name, default, list(choices), help_text)
  elif isinstance(default, bool):
    flags.DEFINE_bool(name, default, help_text)
  elif isinstance(default, int):
    low = config_lib.Config.INT_RANGES.get(field.name, (None,))[0]
    flags.DEFINE_integer(name, default, help_text, lower_bound=low)
  elif isinstance(default, float):
    low, _, inclusive, _ = config_lib.Config.FLOAT_RANGES.get(field.name,
                                                              (None, None, False, None))
    flags.DEFINE_float(name, default, help_text, lower_bound=low if inclusive else None)
  else:
    flags.DEFINE_string(name, default, help_text)


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


def parse_model_kwargs(text: str) -> dict:
  """--model_kwargs: a JSON object ('' = none)."""
  if not text.strip():
    return {}
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"--model_kwargs={text}: not JSON ({e.msg} at character {e.pos}); give an "
                    "object such as '{\"depth\": 3}'") from None
  if not isinstance(value, dict):
    raise UserError(f"--model_kwargs={text}: expected a JSON object, got a "
                    f"{type(value).__name__}")
  return value


def _field_value(field: dataclasses.Field, raw):
  """A flag's parsed value as the Config field holds it."""
  flag = f"--{config_lib.flag_name(field)}"
  if field.name == "layer_qualities":
    return parse_layer_qualities(raw)
  if field.name == "layer_densities":
    return parse_layer_densities(raw)
  if field.name == "model_kwargs":
    return parse_model_kwargs(raw)
  default = config_lib.field_default(field)
  if not isinstance(default, tuple):
    return raw
  if field.name == "widths":
    return _ints(raw, flag)
  if field.name == "qualities":
    return _floats(raw, flag)
  return tuple(raw)


def config_from_flags() -> config_lib.Config:
  """The Config of the parsed flags (one flag per field, see `define_flags`)."""
  values = {field.name: _field_value(field, FLAGS[config_lib.flag_name(field)].value)
            for field in dataclasses.fields(config_lib.Config)}
  if _ENTRY_MODELS and values["model"] not in _ENTRY_MODELS and ":" not in values["model"]:
    raise UserError(f"--model={values['model']}: this entry point runs "
                    f"{', '.join(_ENTRY_MODELS)}; any other network runs with "
                    "python -m lwc.experiments.prune")
  return config_lib.Config(**values)


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
          f": best within +{100 * target['max_error_increase']:.2f} points of "
          f"{target['chosen_on']} error is iteration "
          f"{target['best_iteration']}, {target['best_compression']:.1f}x at test error "
          f"{100 * target['best_test_error']:.2f}%")
  if final is not None and jax.process_index() == 0:
    validation = (f"validation error {100 * final['validation_error']:.2f}%, "
                  if "validation_error" in final else "decisions on the TEST split, ")
    print(f"done: {final['params_nonzero']}/{final['params_total']} weights "
          f"({final['compression']:.1f}x), {validation}test error "
          f"{100 * final['test_error']:.2f}%"
          + (f" (top-5 {100 * final['test_top5_error']:.2f}%)" if "test_top5_error" in final
             else "") + f" -> {FLAGS.workdir}/summary.json")
