"""Two recipes over the same seeds, compared seed by seed (a paired comparison).

  python -m lwc.experiments.compare --baseline=DIR_A --variant=DIR_B [--seeds=0,1,2]
      [--rule=error_and_loss] [--out=FILE]

DIR_A and DIR_B are workdirs of `lwc.experiments.seeds` (each holds seed_N/summary.json). For
every seed both have finished, the variant's final validation and test errors are set against
the baseline's, and the differences (variant - baseline) are summarised: mean, sample standard
deviation, min, max, a 95% confidence interval of the mean difference (Student's t over the
seeds), and on how many seeds the variant's validation error is lower. Seed to seed
noise is shared by the two runs of one seed (the same initialisation and data order, and with
`--init_checkpoint=DIR_A/seed_{seed}:0` the very same dense network), so the paired differences
are what separates two recipes, not the two means side by side.

The mean cross-entropy of each split is compared the same way when the summaries have it (a
continuous measure, less noisy than a count of errors), and reported only. The validation
error difference is what chooses; the test difference is reported and chooses nothing. The
comparison is refused when a seed's two runs end at other numbers of weights (they would not be
the same point of the trade-off) or are of other networks. `paired` is the whole
arithmetic; the table goes to stdout (and to --out).

The table ends with the decision of a rule written down before the runs (`verdict`): with
`--rule=error_and_loss` (the default, issue 13's rule since session 13) the variant is adopted
only if its mean validation error and its mean validation cross-entropy are both strictly lower
than the baseline's; with `--rule=error` the mean validation error alone decides. No rule reads
the test split. `--seeds` names the seeds the rule is over; each must have finished in both runs.
"""

from __future__ import annotations

import os

from absl import app, flags

from lwc import errors, files
from lwc.errors import UserError
from lwc.experiments import seeds as seeds_lib

FLAGS = flags.FLAGS
ERRORS = ("validation_error", "test_error")
# Mean cross-entropy of each split: reported next to the errors (a continuous measure, less
# noisy than the count of errors on a few thousand images); the validation error chooses.
LOSSES = ("validation_loss", "test_loss")
# What each decision rule requires to be strictly lower, as a mean over the seeds.
RULES = {"error": ("validation_error",),
         "error_and_loss": ("validation_error", "validation_loss")}


def define_flags() -> None:
  flags.DEFINE_string("baseline", None, "Workdir of the baseline's seeds run.", required=True)
  flags.DEFINE_string("variant", None, "Workdir of the variant's seeds run.", required=True)
  flags.DEFINE_string("out", "", "Also write the table to this file.")
  flags.DEFINE_list("seeds", [], "Compare these seeds only (each must have finished in both "
                    "runs); default: every seed finished in both.")
  flags.DEFINE_enum("rule", "error_and_loss", list(RULES),
                    "The decision rule written down before the runs: error_and_loss adopts the "
                    "variant only if its mean validation error and mean validation cross-entropy "
                    "are both lower; error looks at the mean validation error alone.")


def _final(summary: dict, where: str) -> dict:
  final = summary.get("final")
  if not final:
    raise UserError(f"{where}: the summary has no final row (no iteration ran)")
  return final


def paired(baseline: dict[int, dict], variant: dict[int, dict],
           only: list[int] | None = None) -> dict:
  """The seed-by-seed comparison of two recipes' summaries ({seed: summary.json}).

  `only`, when given, names the seeds to compare; a seed missing from either run is refused.

  Returns {'seeds', 'per_seed', 'measures', 'difference', 'interval', 'variant_lower',
  'same_dense'}: measures the ERRORS, and the LOSSES when every final row of both runs has them;
  per_seed one row per common seed (seed, params_nonzero, compression, baseline_ and variant_
  value of each measure, and its difference, variant - baseline); difference per measure the
  `seeds.stats` of those differences; interval per measure the 95% `seeds.interval` of the mean
  difference (None for one seed); variant_lower per measure the seeds where the variant's is
  strictly lower; same_dense whether every seed's two runs start from the same dense network
  (equal iteration-0 rows). Errors are fractions. Pure: reads nothing, writes nothing.
  """
  for seed in only or ():
    for name, runs in (("baseline", baseline), ("variant", variant)):
      if seed not in runs:
        raise UserError(f"seed {seed} has not finished in the {name} "
                        f"(finished: {sorted(runs) or 'none'})")
  seeds = sorted(set(only) if only else set(baseline) & set(variant))
  if not seeds:
    raise UserError(f"no seed finished in both runs (baseline: {sorted(baseline) or 'none'}, "
                    f"variant: {sorted(variant) or 'none'})")
  rows = []
  same_dense = True
  finals = {seed: (_final(baseline[seed], f"baseline seed {seed}"),
                   _final(variant[seed], f"variant seed {seed}")) for seed in seeds}
  measures = ERRORS + (LOSSES if all(f.get(k) is not None for pair in finals.values()
                                     for f in pair for k in LOSSES) else ())
  for seed in seeds:
    a, b = baseline[seed], variant[seed]
    if a.get("model") != b.get("model"):
      raise UserError(f"seed {seed}: the runs are of other networks ({a.get('model')}, "
                      f"{b.get('model')})")
    fa, fb = finals[seed]
    if fa["params_nonzero"] != fb["params_nonzero"]:
      raise UserError(f"seed {seed}: the baseline ends at {fa['params_nonzero']:,} weights, the "
                      f"variant at {fb['params_nonzero']:,}; compare runs at the same "
                      "compression")
    row = {"seed": seed, "params_nonzero": fa["params_nonzero"],
           "compression": fa["compression"]}
    for key in measures:
      if fa.get(key) is None or fb.get(key) is None:  # only an error can be missing here
        raise UserError(f"seed {seed}: a run reports no {key}")
      row[f"baseline_{key}"], row[f"variant_{key}"] = fa[key], fb[key]
      row[f"{key}_difference"] = fb[key] - fa[key]
    rows.append(row)
    dense_a = (a.get("iterations") or [None])[0]
    dense_b = (b.get("iterations") or [None])[0]
    keys = ("params_nonzero", *ERRORS)
    same_dense &= (dense_a is not None and dense_b is not None and
                   all(dense_a.get(k) == dense_b.get(k) for k in keys))
  difference = {key: seeds_lib.stats([r[f"{key}_difference"] for r in rows])
                for key in measures}
  return {"seeds": seeds, "per_seed": rows, "measures": measures, "difference": difference,
          "interval": {key: seeds_lib.interval(difference[key]) for key in measures},
          "variant_lower": {key: [r["seed"] for r in rows if r[f"{key}_difference"] < 0]
                            for key in measures},
          "same_dense": same_dense, "std": seeds_lib.STD_NOTE}


def verdict(result: dict, rule: str = "error_and_loss") -> dict:
  """The decision of `rule` (a key of RULES) on a `paired` result.

  Returns {'rule', 'seeds', 'adopted', 'means'}: means maps each measure the rule reads to its
  mean difference (variant - baseline) over the seeds; adopted is True only if every one is
  strictly below 0 (a tie keeps the baseline). Reads validation measures only, never the test
  split. Raises UserError for an unknown rule or a measure the summaries do not have.
  """
  if rule not in RULES:
    raise UserError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
  missing = [key for key in RULES[rule] if key not in result["measures"]]
  if missing:
    raise UserError(f"rule {rule} needs the {', '.join(missing)} of every run, and a summary "
                    "here has none (an older run); decide with --rule=error, or rerun")
  means = {key: result["difference"][key]["mean"] for key in RULES[rule]}
  return {"rule": rule, "seeds": result["seeds"], "means": means,
          "adopted": all(mean < 0 for mean in means.values())}


def verdict_text(decision: dict) -> str:
  """One markdown paragraph: the rule, each mean difference it reads, and the decision."""
  parts = []
  for key, mean in decision["means"].items():
    shown = f"{_signed(mean)} points" if key.endswith("_error") else f"{mean:+.4f} nats"
    name = "validation error" if key.endswith("_error") else "validation cross-entropy"
    parts.append(f"mean {name} {shown} ({'lower' if mean < 0 else 'not lower'})")
  seeds = ", ".join(str(seed) for seed in decision["seeds"])
  reasons = "; ".join(parts)
  outcome = "adopted" if decision["adopted"] else "not adopted"
  return (f"**Rule `{decision['rule']}` over seeds {seeds}: {outcome}.** "
          f"{reasons[0].upper()}{reasons[1:]}. The rule needs every measure it reads strictly "
          "lower; the test split takes no part.\n")


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _signed(x: float) -> str:
  return f"{100 * x:+.2f}"


def _cells(row: dict, keys, value, diff) -> str:
  """'baseline | variant | difference' of each measure in keys, formatted."""
  return " | ".join(f"{value(row[f'baseline_{k}'])} | {value(row[f'variant_{k}'])} "
                    f"| {diff(row[f'{k}_difference'])}" for k in keys)


def _intervals(result: dict, keys, diff) -> str:
  """'validation [low, high], test [low, high]' of the mean differences of keys."""
  return "validation " + ", test ".join(
      f"[{diff(result['interval'][k][0])}, {diff(result['interval'][k][1])}]" for k in keys)


def markdown(result: dict, baseline: str, variant: str) -> str:
  rows = ["| seed | nonzero | compression | validation: baseline | variant | difference "
          "| test: baseline | variant | difference |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["per_seed"]:
    rows.append(f"| {r['seed']} | {r['params_nonzero']:,} | {r['compression']:.2f}x "
                f"| {_cells(r, ERRORS, _pct, _signed)} |")
  d = result["difference"]
  for stat in ("mean", "std", "min", "max"):
    sign = _signed if stat != "std" else _pct
    rows.append(f"| **{stat}** | | | | | {sign(d['validation_error'][stat])} | | "
                f"| {sign(d['test_error'][stat])} |")
  one_seed = result["interval"]["validation_error"] is None
  spread = ("One seed: no interval of the mean difference." if one_seed else
            "95% interval of the mean difference (Student's t over the seeds): "
            f"{_intervals(result, ERRORS, _signed)}; an interval that contains 0 does not "
            "separate the recipes.")
  n = len(result["seeds"])
  lower = result["variant_lower"]
  if LOSSES[0] in result["measures"]:
    nats, signed_nats = (lambda x: f"{x:.4f}"), (lambda x: f"{x:+.4f}")
    loss_rows = ["| seed | validation loss: baseline | variant | difference | test loss: baseline "
                 "| variant | difference |", "|---|---|---|---|---|---|---|"]
    loss_rows += [f"| {r['seed']} | {_cells(r, LOSSES, nats, signed_nats)} |"
                  for r in result["per_seed"]]
    loss_rows += [f"| **mean** | | | {signed_nats(d['validation_loss']['mean'])} | | "
                  f"| {signed_nats(d['test_loss']['mean'])} |",
                  f"| **std** | | | {nats(d['validation_loss']['std'])} | | "
                  f"| {nats(d['test_loss']['std'])} |"]
    losses = ("\nMean cross-entropy of each split, reported next to the errors (a continuous "
              "measure, less noisy than a count of errors); it chooses nothing.\n\n"
              + "\n".join(loss_rows) + "\n\n"
              f"Variant lower on validation loss on {len(lower['validation_loss'])} of {n} seeds, "
              f"on test loss on {len(lower['test_loss'])} of {n}."
              + ("" if one_seed else " 95% interval of the mean difference: "
                 f"{_intervals(result, LOSSES, signed_nats)}.") + "\n")
  else:
    losses = "\nNo cross-entropy table: a summary here has no validation_ or test_ cross-entropy.\n"
  dense = ("Every seed's two runs start from the same dense network." if result["same_dense"]
           else "The two runs of a seed start from different dense networks.")
  return (f"# {variant} against {baseline}, seed by seed\n\n"
          f"Errors in %; difference = variant - baseline (negative: the variant is better). "
          f"{dense} The validation difference chooses; the test difference is reported and "
          f"chooses nothing.\n\n" + "\n".join(rows) + "\n\n"
          f"Variant lower on validation on {len(lower['validation_error'])} of {n} seeds, on "
          f"test on {len(lower['test_error'])} of {n}. {spread} {result['std']}.\n" + losses)


def read_seed_summaries(workdir: str) -> dict[int, dict]:
  """{seed: summary} of every seed_N/summary.json in a seeds workdir."""
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir}: no such directory")
  seeds = [int(name.removeprefix("seed_")) for name in os.listdir(workdir)
           if name.startswith("seed_") and name.removeprefix("seed_").isdigit()]
  return {seed: seeds_lib.read_summary(workdir, seed) for seed in sorted(seeds)
          if seeds_lib.finished(workdir, seed, None)}


def compare(baseline: str, variant: str, out: str = "", seeds: list[int] | None = None,
            rule: str = "error_and_loss") -> str:
  result = paired(read_seed_summaries(baseline), read_seed_summaries(variant), seeds)
  text = markdown(result, baseline, variant) + "\n" + verdict_text(verdict(result, rule))
  if out:
    files.atomic_write_text(out, text)
  return text


def main(argv) -> None:
  def run() -> str:
    seeds = seeds_lib.parse_seeds(FLAGS.seeds) if FLAGS.seeds else None
    return compare(FLAGS.baseline, FLAGS.variant, FLAGS.out, seeds, FLAGS.rule)

  print(errors.run_cli(argv, run), end="")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
