"""Markdown tables from a run's summary (the dict `pipeline.run` returns and writes)."""

from __future__ import annotations


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def iteration_table(summary: dict) -> str:
  """One row per iteration: quality, nonzero weights, compression, validation and test error
  after pruning and after retraining (validation columns when the run had a validation split)."""
  history = summary["iterations"]
  val = any("validation_error" in h for h in history)
  head = "| iteration | quality | nonzero / total | compression |"
  head += (" validation error after pruning | validation error after retraining |" if val
           else "")
  head += " test error after pruning | test error after retraining |"
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for h in history:
    quality = h.get("quality")
    q = "-" if not quality else ", ".join(f"{k} {v:g}" for k, v in quality.items())
    row = (f"| {h['iteration']} | {q} | {h['params_nonzero']:,} / {h['params_total']:,} "
           f"| {h['compression']:.1f}x |")
    if val:
      row += (f" {_pct(h.get('validation_error_after_prune'))} "
              f"| {_pct(h.get('validation_error'))} |")
    row += f" {_pct(h.get('test_error_after_prune'))} | {_pct(h['test_error'])} |"
    rows.append(row)
  return "\n".join(rows)


def decisions_note(summary: dict) -> str:
  """Which split took the decisions, said in every report."""
  if summary.get("decisions") == "test":
    return ("**Decisions on the TEST split** (--validation=0 --decide_on_test): the test error "
            "below took part in choosing, so it is not an unbiased measurement.\n\n")
  data = summary.get("data") or {}
  if summary.get("decisions") == "none":
    return (f"**Refit** on all {data.get('train', 0):,} training examples (--validation=0 "
            "--refit): no split took a decision in this run (every setting was fixed before "
            "it, on a validation split elsewhere); the test split only reports.\n\n")
  if data.get("validation"):
    return (f"Validation split: {data['validation']:,} training examples set apart; it takes "
            "every decision, the test split only reports.\n\n")
  return ""


def augmentation_text(summary: dict) -> str:
  """What --augment_shift / --augment_flip did to the run's training images, in words ('' when
  nothing, or on ImageNet, whose pipeline has crops of its own)."""
  config = summary.get("config") or {}
  shift, flip = config.get("augment_shift") or 0, config.get("augment_flip")
  if (not shift and not flip) or summary.get("dataset") == "imagenet2012":
    return ""
  return " and ".join(
      ([f"random shifts of up to {shift} pixel{'s' if shift > 1 else ''} along each axis"]
       if shift else []) + (["left-right mirror images"] if flip else []))


def augmentation_note(summary: dict) -> str:
  """With --augment_shift or --augment_flip, what the training images went through: a result
  trained on augmented images is not comparable with one trained without."""
  what = augmentation_text(summary)
  return (f"**Augmented training images** ({what}; --augment_shift/--augment_flip): compare "
          "with results trained the same way, not with results trained without.\n\n"
          if what else "")


def gap_note(summary: dict) -> str:
  """With --train_eval_examples: the final network's error on its training-image sample
  beside the test error (the generalisation gap); '' without it."""
  final = summary["iterations"][-1] if summary.get("iterations") else {}
  if final.get("train_sample_error") is None:
    return ""
  n = (summary.get("config") or {}).get("train_eval_examples")
  return (f"Generalisation gap after the last iteration: {_pct(final['train_sample_error'])} "
          f"error on a fixed sample of {n:,} training images (a report; no decision reads it) "
          f"against {_pct(final['test_error'])} on the test split.\n\n")


def unused_note(summary: dict) -> str:
  """The settings this run was given but never read (`config.settings_without_effect`)."""
  lines = summary.get("settings_without_effect") or []
  return "".join(f"Setting without effect: {line}.\n" for line in lines) + ("\n" if lines else "")


def layer_table(summary: dict) -> str:
  """Per-layer weights and surviving fraction after the last iteration."""
  final = summary["iterations"][-1]
  rows = ["| layer | weights | nonzero | Weights% |", "|---|---|---|---|"]
  for name, c in final["layers"].items():
    rows.append(f"| {name} | {c['weights']:,} | {c['nonzero']:,} | {100 * c['density']:.1f}% |")
  total = final["params_total"]
  rows.append(f"| total | {total:,} | {final['params_nonzero']:,} "
              f"| {100 * final['params_nonzero'] / total if total else 0.0:.1f}% |")
  return "\n".join(rows)


def markdown(summary: dict) -> str:
  from lwc import stats
  final = summary["iterations"][-1] if summary["iterations"] else None
  paper_table = (f"Per layer after the last iteration, as the paper's Tables 2-5:\n\n"
                 f"{stats.markdown(final['layer_table'])}\n\n"
                 if final and "layer_table" in final else "")
  small = summary.get("small_model") or {}
  if small.get("skipped"):
    small_text = f"No smaller model without dead neurons: {small['skipped']}\n\n"
  elif small.get("empty_layers"):
    small_text = (f"Every unit of {', '.join(small['empty_layers'])} is dead: the pruned network "
                  f"computes a constant, and no smaller model was written.\n\n")
  else:
    error = ("not measured: its module cannot be built at other widths; the removal was "
             "checked on the traced computation" if small.get("test_error") is None else
             f"{100 * small['test_error']:.2f}%" if small else "")
    small_text = (f"Dead neurons removed per layer: {small['removed']}; widths now "
                  f"{small['widths']}; test error of that smaller model {error}.\n\n"
                  if small else "")
  return (f"# {summary['model']} on {summary['dataset']}\n\n{decisions_note(summary)}"
          f"{augmentation_note(summary)}{unused_note(summary)}{iteration_table(summary)}\n\n"
          f"{gap_note(summary)}"
          f"{layer_table(summary)}\n\n{paper_table}{small_text}"
          f"wall time: {summary['wall_seconds']:.1f} s\n")
