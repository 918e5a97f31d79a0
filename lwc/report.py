"""Markdown tables from a run's summary (the dict `pipeline.run` returns and writes)."""

from __future__ import annotations


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def iteration_table(summary: dict) -> str:
  """One row per iteration: quality, nonzero weights, compression, error before/after retraining."""
  rows = ["| iteration | quality | nonzero / total | compression | error after pruning "
          "| error after retraining |", "|---|---|---|---|---|---|"]
  for h in summary["iterations"]:
    quality = h.get("quality")
    q = "-" if not quality else ", ".join(f"{k} {v:g}" for k, v in quality.items())
    rows.append(f"| {h['iteration']} | {q} | {h['params_nonzero']:,} / {h['params_total']:,} "
                f"| {h['compression']:.1f}x | {_pct(h.get('test_error_after_prune'))} "
                f"| {_pct(h['test_error'])} |")
  return "\n".join(rows)


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
  if small.get("empty_layers"):
    small_text = (f"Every unit of {', '.join(small['empty_layers'])} is dead: the pruned network "
                  f"computes a constant, and no smaller model was written.\n\n")
  else:
    small_text = (f"Dead neurons removed per layer: {small['removed']}; widths now "
                  f"{small['widths']}; test error of that smaller model "
                  f"{100 * small['test_error']:.2f}%.\n\n" if small else "")
  return (f"# {summary['model']} on {summary['dataset']}\n\n{iteration_table(summary)}\n\n"
          f"{layer_table(summary)}\n\n{paper_table}{small_text}"
          f"wall time: {summary['wall_seconds']:.1f} s\n")
