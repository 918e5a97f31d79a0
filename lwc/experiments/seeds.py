"""One flagfile over several seeds, and the spread of what it gives.

  python -m lwc.experiments.seeds --entry=lenet --flagfile=experiments/lenet_300_100.flags \
      --seeds=0,1,2 --workdir=DIR [--data_dir=../shared/data/mnist] [any flag of the entry]

Runs, one after the other, for every seed N

  python -m lwc.experiments.<entry> --flagfile=F [flags] --seed=N --workdir=DIR/seed_N

(every flag this program does not know, --data_dir included, goes to the entry unchanged, in
the order given, `{seed}` in it replaced by N; --seed and --workdir are set here). Then reads
each DIR/seed_N/summary.json and writes DIR/seeds.json, DIR/seeds.md (one row per seed, then
mean / std / min / max, and the 95% interval of the mean errors) and DIR/seeds.png (test error
against compression, every seed's iterations, the published points of the same network for
comparison). `aggregate` is the whole arithmetic; std is the sample
standard deviation (n - 1 in the denominator), 0 for a single seed.

Running the command again reuses what is done: a seed whose run finished with the same command
and the same flagfile contents (DIR/seed_N.command.json) is not run again, an unfinished one is
run again in its workdir, which the pipeline resumes. Each seed's output goes to stderr, prefixed
`seed N:`, and to DIR/seed_N.log. --norun only aggregates the seeds already finished (e.g. run by
separate commands on several machines, one --seeds value each).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags
import numpy as np
from scipy import stats as scipy_stats

from lwc import errors, files, report
from lwc.errors import UserError

FLAGS = flags.FLAGS

ENTRIES = ("lenet", "alexnet", "vgg16", "prune")
STD_NOTE = "std: sample standard deviation over seeds (n - 1 in the denominator); 0 for one seed"
# Fields of a summary's rows aggregated over seeds (those a row lacks are left out for it).
KEYS = ("compression", "test_error", "validation_error", "train_sample_error", "params_nonzero")


def define_flags() -> None:
  """This program's flags, defined only when it runs (`python -m lwc.experiments.seeds`): the
  module is also imported for `aggregate`, beside entry points that define --workdir too."""
  flags.DEFINE_enum("entry", None, list(ENTRIES), "Entry point run for every seed: "
                    "python -m lwc.experiments.ENTRY.", required=True)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, each run in WORKDIR/seed_N.")
  flags.DEFINE_string("workdir", None, "Folder of the seeds' workdirs and of seeds.json, .md, "
                      ".png.", required=True)
  flags.DEFINE_bool("run", True, "Run the seeds not finished yet; off: only aggregate, every "
                    "seed must be finished.")

# --flagfile is the entry's: taken out of the command line before absl reads it (absl would
# expand it into flags this program does not define). See parse_flags.
_FLAGFILES: list[str] = []

# The networks of the published points, and those points (compression = weights / nonzero
# weights; errors as fractions, like summary.json). A test error of None: the paper gives none.
PUBLISHED_WIDTHS = {"lenet_300_100": [300, 100], "lenet5": [20, 50, 500]}
PUBLISHED = {
    "lenet_300_100": [
        {"method": "Han et al. 2015", "compression": 12.0, "test_error": 0.0159,
         "dense_test_error": 0.0164},
        {"method": "DNS (Guo et al. 2016)", "compression": 56.0, "test_error": 0.0199,
         "dense_test_error": 0.0228},
        {"method": "Sparse VD (Molchanov et al. 2017)", "compression": 68.0,
         "test_error": 0.0192, "dense_test_error": 0.0164},
    ],
    "lenet5": [
        {"method": "Han et al. 2015", "compression": 12.0, "test_error": 0.0077,
         "dense_test_error": 0.0080},
        {"method": "DNS (Guo et al. 2016)", "compression": 111.0, "test_error": 0.0091,
         "dense_test_error": 0.0091},
        {"method": "Sparse VD (Molchanov et al. 2017)", "compression": 280.0,
         "test_error": 0.0075, "dense_test_error": 0.0080},
        {"method": "Progressive ADMM (Ye et al. 2019)", "compression": 246.0, "test_error": None,
         "dense_test_error": None, "note": "'almost no' accuracy loss; no error given"},
    ],
}


# ----------------------------------------------------------------------------- arithmetic


def stats(values: list[float]) -> dict:
  """{'n', 'mean', 'std', 'min', 'max'} of `values`: the mean with one rounding (math.fsum / n),
  the sample standard deviation (statistics.stdev, n - 1; 0.0 for one value)."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError("stats of no values")
  return {"n": len(values), "mean": math.fsum(values) / len(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "min": min(values), "max": max(values)}


def interval(values_stats: dict, confidence: float = 0.95):
  """[low, high]: the Student-t confidence interval of a mean over seeds, or None for one seed.

  values_stats is a `stats` dict (n, mean, std with n - 1). The seeds are taken as independent
  draws of the recipe's training noise: mean +- t * std / sqrt(n), t the (1 + confidence) / 2
  quantile of Student's t with n - 1 degrees of freedom. For paired differences of two recipes
  (lwc.experiments.compare) an interval that contains 0 does not separate them.
  """
  n = values_stats["n"]
  if n < 2:
    return None
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * values_stats["std"] / math.sqrt(n)
  return [values_stats["mean"] - half, values_stats["mean"] + half]


def _stats_of(rows: list[dict], keys=KEYS) -> dict:
  """stats per key over the rows that have it (keys no row has are left out)."""
  out = {}
  for key in keys:
    values = [row[key] for row in rows if row.get(key) is not None]
    if values:
      out[key] = stats(values)
  return out


def _seed_of(summary: dict, index: int):
  seed = (summary.get("config") or {}).get("seed")
  if seed is None:
    raise UserError(f"summary {index} has no config.seed")
  return seed


def aggregate(summaries: list[dict], seeds: list[int] | None = None) -> dict:
  """The spread over seeds of the runs' summaries (as summary.json holds them); `seeds` names
  them (default: each summary's config.seed).

  Returns {'model', 'dataset', 'seeds', 'std', 'per_seed', 'final', 'final_interval',
  'iterations'}: per_seed one row per summary (seed, params_nonzero, params_total, compression,
  test_error, validation_error and train_sample_error when the run has them,
  dense_test_error = iteration 0's, iterations = rows); final the stats (`stats`: n, mean,
  std, min, max) of the final rows' compression, test_error, validation_error and
  train_sample_error (over the seeds that have them), params_nonzero and dense_test_error;
  final_interval the 95% `interval` of the mean final test_error and
  validation_error (None for one seed; validation_error only when a run has it); iterations the
  same stats per iteration number, over the seeds that reached it. Errors are fractions, as in
  summary.json. Pure: reads nothing, writes nothing.
  """
  if not summaries:
    raise UserError("no summaries to aggregate")
  models = sorted({str(s.get("model")) for s in summaries})
  if len(models) > 1:
    raise UserError(f"the seeds' runs are of different models: {', '.join(models)}")
  if seeds is None:
    seeds = [_seed_of(s, i) for i, s in enumerate(summaries)]
  elif len(seeds) != len(summaries):
    raise ValueError(f"{len(seeds)} seeds for {len(summaries)} summaries")
  seeds = list(seeds)
  per_seed = []
  for seed, summary in zip(seeds, summaries):
    final = summary.get("final")
    if not final:
      raise UserError(f"seed {seed}: the summary has no final row (no iteration ran)")
    dense = next((h for h in summary.get("iterations") or [] if h.get("iteration") == 0), None)
    row = {"seed": seed, "params_nonzero": final["params_nonzero"],
           "params_total": final["params_total"], "compression": final["compression"],
           "test_error": final["test_error"]}
    for key in ("validation_error", "train_sample_error"):
      if final.get(key) is not None:
        row[key] = final[key]
    row["dense_test_error"] = None if dense is None else dense["test_error"]
    row["iterations"] = len(summary.get("iterations") or [])
    per_seed.append(row)
  by_iteration: dict[int, list[dict]] = {}
  for summary in summaries:
    for h in summary.get("iterations") or []:
      by_iteration.setdefault(h["iteration"], []).append(h)
  iterations = [{"iteration": it, "seeds": len(rows), **_stats_of(rows)}
                for it, rows in sorted(by_iteration.items())]
  final = _stats_of(per_seed, (*KEYS, "dense_test_error"))
  return {"model": models[0], "dataset": summaries[0].get("dataset"), "seeds": seeds,
          "std": STD_NOTE, "per_seed": per_seed, "final": final,
          "final_interval": {key: interval(final[key]) for key in ("test_error", "validation_error")
                             if key in final},
          "iterations": iterations}


def checkpoint_check(run_dir: str, final: dict) -> dict:
  """What the checkpoint of a seed's final iteration holds, checked against its summary row:
  {'iteration', 'checkpoint_nonzero', 'pruned_all_zero'}. UserError when the mask count is not
  the reported params_nonzero, or a pruned weight is not exactly 0.0."""
  from lwc import layers as layers_lib
  from lwc import masks as masks_lib
  from lwc import resume
  state = resume.restore_iteration(run_dir, iteration=final["iteration"])
  nonzero = masks_lib.total_counts(state["masks"])["nonzero"]
  kernels = layers_lib.prunable_leaves(state["params"])
  pruned_values = [np.asarray(kernels[name][1])[~np.asarray(mask, bool)]
                   for name, (_, mask) in layers_lib.prunable_leaves(state["masks"]).items()]
  all_zero = all(not np.any(v) for v in pruned_values)
  if nonzero != final["params_nonzero"] or not all_zero:
    raise UserError(f"{run_dir}: the checkpoint of iteration {final['iteration']} keeps "
                    f"{nonzero:,} weights (summary: {final['params_nonzero']:,})"
                    + ("" if all_zero else ", and some pruned weights are not 0.0"))
  return {"iteration": final["iteration"], "checkpoint_nonzero": nonzero,
          "pruned_all_zero": all_zero}


def published_points(summary: dict) -> tuple[list[dict], str]:
  """(points, why none) of the published results for the network of `summary`: none for another
  model, dataset or width."""
  model = summary.get("model")
  if model not in PUBLISHED:
    return [], f"no published points for {model}"
  if summary.get("dataset") not in (None, "mnist"):
    return [], f"published points are on MNIST, not {summary.get('dataset')}"
  widths = list((summary.get("config") or {}).get("widths") or [])
  if widths and widths != PUBLISHED_WIDTHS[model]:
    return [], (f"published points not drawn: widths {','.join(map(str, widths))} are not the "
                f"published {model}'s {','.join(map(str, PUBLISHED_WIDTHS[model]))}")
  return PUBLISHED[model], ""


# ----------------------------------------------------------------------------- outputs


def _pct(x, digits: int = 2) -> str:
  return "-" if x is None else f"{100 * x:.{digits}f}"


def markdown(result: dict) -> str:
  """seeds.md: the per-seed table with mean / std / min / max rows, per-iteration spread, the
  published points."""
  agg = result["aggregate"]
  has_val = any("validation_error" in r for r in agg["per_seed"])
  head = ["seed", "nonzero / total", "compression", "test error %"]
  head += ["validation error %"] if has_val else []
  has_train = any("train_sample_error" in r for r in agg["per_seed"])
  head += ["training-sample error %"] if has_train else []
  head += ["dense test error %"]
  lines = [f"# {agg['model']} over seeds {', '.join(map(str, agg['seeds']))}", "",
           f"`{result['command']}`", ""]
  if result.get("augmentation"):
    lines += [f"**Augmented training images** ({result['augmentation']}): the published points "
              "below trained without.", ""]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in agg["per_seed"]:
    cells = [str(r["seed"]), f"{r['params_nonzero']:,} / {r['params_total']:,}",
             f"{r['compression']:.2f}x", _pct(r["test_error"])]
    cells += [_pct(r.get("validation_error"))] if has_val else []
    cells += [_pct(r.get("train_sample_error"))] if has_train else []
    cells += [_pct(r["dense_test_error"])]
    lines.append("| " + " | ".join(cells) + " |")
  final = agg["final"]
  total = agg["per_seed"][0]["params_total"]
  for name in ("mean", "std", "min", "max"):
    digits = 3 if name in ("mean", "std") else 2
    nz = final["params_nonzero"][name]
    nz_text = f"{nz:,.0f}" if name in ("min", "max") else f"{nz:,.1f}"
    cells = [f"**{name}**", nz_text + (f" / {total:,}" if name != "std" else ""),
             f"{final['compression'][name]:.{digits}f}" + ("" if name == "std" else "x"),
             _pct(final["test_error"][name], digits)]
    if has_val:
      cells.append(_pct(final["validation_error"][name], digits))
    if has_train:
      cells.append(_pct(final["train_sample_error"][name], digits))
    cells.append(_pct(final["dense_test_error"][name], digits)
                 if "dense_test_error" in final else "-")
    lines.append("| " + " | ".join(cells) + " |")
  it_val = any("validation_error" in it for it in agg["iterations"])
  checks = result.get("checkpoints") or {}
  if checks:
    lines += ["", "Checked in each seed's checkpoint of its final iteration: " + "; ".join(
        f"seed {seed}, iteration {c['iteration']}: {c['checkpoint_nonzero']:,} weights kept, "
        f"every pruned weight 0.0" for seed, c in checks.items()) + "."]
  intervals = agg.get("final_interval") or {}
  if intervals.get("test_error") is not None:
    lines += ["", "95% interval of the mean final error (Student's t over the seeds): " + "; ".join(
        f"{name} {_pct(intervals[key][0])} - {_pct(intervals[key][1])}%"
        for key, name in (("test_error", "test"), ("validation_error", "validation"))
        if intervals.get(key) is not None) + "."]
  lines += ["", STD_NOTE + ".", "", "Per iteration (after retraining; mean ± std (min - max)):",
            "", "| iteration | seeds | compression | test error % |"
            + (" validation error % |" if it_val else ""),
            "|---|---|---|---|" + ("---|" if it_val else "")]

  def spread(e):
    return "-" if e is None else (f"{_pct(e['mean'], 3)} ± {_pct(e['std'], 3)} "
                                  f"({_pct(e['min'])} - {_pct(e['max'])})")

  for it in agg["iterations"]:
    c = it["compression"]
    lines.append(f"| {it['iteration']} | {it['seeds']} | {c['mean']:.2f}x ± {c['std']:.2f} "
                 f"({c['min']:.2f} - {c['max']:.2f}) | {spread(it['test_error'])} |"
                 + (f" {spread(it.get('validation_error'))} |" if it_val else ""))
  points, why = result["published"], result["published_note"]
  lines.append("")
  if points:
    lines += ["Published (drawn in seeds.png):", "",
              "| method | compression | test error % | dense test error % |",
              "|---|---|---|---|"]
    for p in points:
      error = _pct(p["test_error"]) if p["test_error"] is not None else p.get("note", "-")
      lines.append(f"| {p['method']} | {p['compression']:g}x | {error} "
                   f"| {_pct(p['dense_test_error'])} |")
  else:
    lines.append(why + ".")
  lines.append("")
  return "\n".join(lines)


def write_outputs(result: dict, workdir: str, histories: dict) -> dict:
  from lwc import plots
  paths = {"json": os.path.join(workdir, "seeds.json"), "md": os.path.join(workdir, "seeds.md"),
           "png": os.path.join(workdir, "seeds.png")}
  files.atomic_write_json(paths["json"], result, indent=1)
  files.atomic_write_text(paths["md"], markdown(result))
  agg = result["aggregate"]
  plots.seeds_error_vs_compression(
      histories, paths["png"], result["published"],
      f"{agg['model']}: {len(agg['seeds'])} seeds" +
      (", training images augmented" if result.get("augmentation") else "") +
      (f" ({result['published_note']})" if result["published_note"] else ""))
  return paths


# ----------------------------------------------------------------------------- running


def parse_seeds(values: list[str]) -> list[int]:
  if not values:
    raise UserError("--seeds is empty: give at least one seed, e.g. --seeds=0,1,2")
  seeds = []
  for v in values:
    try:
      seed = int(v)
    except ValueError:
      raise UserError(f"--seeds: '{v}' is not an integer") from None
    if seed < 0:
      raise UserError(f"--seeds: {seed} is negative")
    seeds.append(seed)
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise UserError(f"--seeds: {', '.join(map(str, repeated))} given more than once")
  return seeds


_OWN = ("seed", "workdir")


def check_passthrough(args: list[str]) -> list[str]:
  """The flags for the entry: refuses --seed and --workdir (set per seed here)."""
  for arg in args:
    name = arg.lstrip("-").partition("=")[0]
    if arg.startswith("-") and name in _OWN:
      raise UserError(f"{arg}: --{name} is set for every seed by this program "
                      f"({'--seeds' if name == 'seed' else 'WORKDIR/seed_N'})")
  return args


def _sha256(path: str) -> str:
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError as e:
    raise files.os_error(path, e, "cannot read flagfile") from None


def seed_command(entry: str, flagfiles: list[str], passthrough: list[str], seed: int | str,
                 workdir: str) -> list[str]:
  """The command of one seed's run (after the Python executable); `{seed}` in a passed-through
  flag becomes the seed, e.g. --init_checkpoint=DIR/seed_{seed}:0."""
  return ["-m", f"lwc.experiments.{entry}", *(f"--flagfile={f}" for f in flagfiles),
          *(arg.replace("{seed}", str(seed)) for arg in passthrough), f"--seed={seed}",
          f"--workdir={seed_dir(workdir, seed)}"]


def seed_dir(workdir: str, seed: int | str) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def included_flagfiles(flagfiles: list[str]) -> list[str]:
  """`flagfiles` and, depth first, every flagfile their `--flagfile=` lines include, each once.

  Paths are as absl reads them (relative to the working directory); a cycle is left where it
  closes, as absl would recurse into it and fail on its own.
  """
  seen: list[str] = []

  def visit(path: str) -> None:
    if path in seen:
      return
    seen.append(path)
    try:
      with open(path) as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise files.os_error(path, e, "cannot read flagfile") from None
    for line in lines:
      line = line.strip()
      if line.startswith("--flagfile="):
        visit(line.partition("=")[2])

  for path in flagfiles:
    visit(path)
  return seen


def _stamp(command: list[str], flagfiles: list[str]) -> dict:
  """What a finished seed is checked against: its command and the sha256 of every flagfile it
  reads, the included ones too (an edited included file must not let stale seeds be reused)."""
  return {"command": command,
          "flagfiles": {f: _sha256(f) for f in included_flagfiles(flagfiles)}}


def _read_json(path: str, what: str):
  try:
    return json.loads(files.read_text(path, what))
  except json.JSONDecodeError as e:
    raise UserError(f"cannot read {what} {path}: not JSON ({e.msg}, line {e.lineno})") from None


def read_summary(workdir: str, seed: int) -> dict:
  """WORKDIR/seed_N/summary.json; UserError when unreadable or the run of another seed."""
  summary = _read_json(os.path.join(seed_dir(workdir, seed), "summary.json"), "summary")
  got = (summary.get("config") or {}).get("seed")
  if got is not None and got != seed:
    raise UserError(f"{seed_dir(workdir, seed)}/summary.json is a run of seed {got}, not {seed}")
  return summary


def finished(workdir: str, seed: int, stamp: dict | None) -> bool:
  """Whether seed's run finished (its summary.json written) with `stamp` (None: any command)."""
  folder = seed_dir(workdir, seed)
  if not os.path.isfile(os.path.join(folder, "summary.json")):
    return False
  if stamp is None:
    return True
  path = folder + ".command.json"
  if not os.path.isfile(path):
    return False
  try:
    return _read_json(path, "seed command") == stamp
  except UserError:
    return False


class _Child:
  """One seed's run: its stderr echoed (prefixed) and logged, the last non-empty line kept;
  SIGTERM to this program is passed on (the pipeline checkpoints and stops)."""

  def __init__(self, argv: list[str], seed: int, log_path: str):
    self.seed, self.log_path, self.last = seed, log_path, ""
    lwc_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lwc_root, env.get("PYTHONPATH")) if p)
    files.append_line(log_path, f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}")
    self.proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, errors="replace")

  def _pump(self, stream, keep_last: bool, out) -> None:
    for line in stream:
      line = line.rstrip("\n")
      files.append_line(self.log_path, line)
      print(f"seed {self.seed}: {line}", file=out, flush=True)
      if keep_last and line.strip():
        self.last = line.strip()

  def wait(self) -> int:
    stdout = threading.Thread(target=self._pump, args=(self.proc.stdout, False, sys.stderr))
    stdout.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: self.proc.send_signal(signal.SIGTERM))
    try:
      self._pump(self.proc.stderr, True, sys.stderr)
      stdout.join()
      return self.proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT; let it stop
      self.proc.wait()
      raise
    finally:
      signal.signal(signal.SIGTERM, previous)


class Stopped(Exception):
  """A seed's run stopped on SIGTERM after its checkpoint; the same command resumes it."""


def run_seed(entry: str, flagfiles: list[str], passthrough: list[str], seed: int,
             workdir: str) -> bool:
  """Runs one seed unless it finished with the same command; True if it was reused."""
  command = seed_command(entry, flagfiles, passthrough, seed, workdir)
  stamp = _stamp(command, flagfiles)
  if finished(workdir, seed, stamp):
    print(f"seed {seed}: finished before, reused ({seed_dir(workdir, seed)}/summary.json)",
          file=sys.stderr)
    return True
  child = _Child(command, seed, seed_dir(workdir, seed) + ".log")
  rc = child.wait()
  if rc != 0:
    raise UserError(f"seed {seed}: python {' '.join(command)} failed (exit status {rc}): "
                    f"{child.last or 'no output on stderr'}")
  if not os.path.isfile(os.path.join(seed_dir(workdir, seed), "summary.json")):
    if child.last.startswith("stopped:"):
      raise Stopped(f"seed {seed}: {child.last}")
    raise UserError(f"seed {seed}: the run ended without writing summary.json: "
                    f"{child.last or 'no output on stderr'}")
  files.atomic_write_json(seed_dir(workdir, seed) + ".command.json", stamp, indent=1)
  return False


def run(entry: str, flagfiles: list[str], passthrough: list[str], seeds: list[int],
        workdir: str, run_missing: bool = True) -> dict:
  """Runs (or reuses) every seed, aggregates, writes seeds.json / .md / .png into `workdir`."""
  t0 = time.perf_counter()
  if entry not in ENTRIES:
    raise UserError(f"unknown entry '{entry}', expected one of: {', '.join(ENTRIES)}")
  if importlib.util.find_spec(f"lwc.experiments.{entry}") is None:
    raise UserError(f"--entry={entry}: lwc.experiments.{entry} is not in this checkout")
  if not workdir or not workdir.strip():
    raise UserError("--workdir is empty: give the folder of the seeds' runs")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is not a directory")
  check_passthrough(passthrough)
  for f in flagfiles:
    _sha256(f)  # unreadable: fail before any run
  reused = {}
  if run_missing:
    files.makedirs(workdir)
    for seed in seeds:
      reused[seed] = run_seed(entry, flagfiles, passthrough, seed, workdir)
  else:
    missing = [s for s in seeds if not finished(workdir, s, None)]
    if missing:
      raise UserError(f"--norun: seed(s) {', '.join(map(str, missing))} have no "
                      f"{seed_dir(workdir, missing[0])}/summary.json yet")
    reused = {seed: True for seed in seeds}
  summaries = [read_summary(workdir, s) for s in seeds]
  agg = aggregate(summaries, seeds)
  checks = {str(seed): checkpoint_check(seed_dir(workdir, seed), summary["final"])
            for seed, summary in zip(seeds, summaries)}
  points, note = published_points(summaries[0])
  augmentation = report.augmentation_text(summaries[0])
  command = " ".join(["python", *seed_command(entry, flagfiles, passthrough, "N", workdir)])
  result = {"entry": entry, "flagfiles": flagfiles, "flags": passthrough, "command": command,
            "seeds": seeds, "reused": {str(k): v for k, v in reused.items()},
            "aggregate": agg, "checkpoints": checks, "published": points,
            "published_note": note, "augmentation": augmentation}
  histories = {s: summary.get("iterations") or [] for s, summary in zip(seeds, summaries)}
  paths = write_outputs(result, workdir, histories)
  return {**result, "paths": paths, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- command line


def _take_flagfiles(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without its --flagfile arguments, those flagfiles), up to a `--`."""
  rest, found, i = [argv[0]], [], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest += argv[i:]
      break
    name, sep, value = arg.partition("=")
    if name in ("--flagfile", "-flagfile"):
      if not sep:
        if i + 1 >= len(argv):
          raise UserError(f"{arg} needs a value")
        value, i = argv[i + 1], i + 1
      if not value:
        raise UserError("--flagfile is empty")
      found.append(value)
    else:
      rest.append(arg)
    i += 1
  return rest, found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing of this program's own flags (lwc's error convention: `error: ...`, exit 2);
  --flagfile and every flag it does not know are kept for the entry: returns [argv[0], *those]."""
  try:
    rest, flagfiles = _take_flagfiles(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    left = FLAGS(rest, known_only=True)
  except (flags.Error, UnicodeDecodeError, OSError) as e:
    print(f"error: {errors.flag_error(rest, e)}", file=sys.stderr)
    sys.exit(2)
  _FLAGFILES[:] = flagfiles
  return [argv[0], *(a for a in left[1:] if a != "--")]


def main(argv) -> None:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  passthrough = list(argv[1:])
  try:
    seeds = parse_seeds(FLAGS.seeds)
    result = run(FLAGS.entry, list(_FLAGFILES), passthrough, seeds, FLAGS.workdir, FLAGS.run)
  except Stopped as e:
    print(f"stopped: {e}; run the same command again to resume", file=sys.stderr)
    sys.exit(0)
  except KeyboardInterrupt:
    print("stopped: interrupted; run the same command again to resume", file=sys.stderr)
    sys.exit(130)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(markdown(result), end="")
  reused = sum(result["reused"].values())
  print(f"{len(seeds)} seeds ({reused} reused) in {result['seconds']:.1f} s; wrote "
        f"{', '.join(result['paths'].values())}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
