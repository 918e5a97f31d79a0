"""lwc.experiments.compare: the seed-by-seed differences of two recipes are exact, runs at other
compressions are refused, the decision rule reads validation only and needs every measure
strictly lower, and the CLI prints (and writes) the table and decision or one error line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lwc.errors import UserError
from lwc.experiments import compare

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(seed, val, test, nonzero=2152, dense=(0.0098, 0.0068), model="lenet5", losses=None):
  rows = [{"iteration": 0, "params_nonzero": 430500, "compression": 1.0,
           "validation_error": dense[0], "test_error": dense[1]},
          {"iteration": 1, "params_nonzero": nonzero, "compression": 430500 / nonzero,
           "validation_error": val, "test_error": test}]
  if losses:
    rows[1]["validation_loss"], rows[1]["test_loss"] = losses
  return {"model": model, "config": {"seed": seed}, "iterations": rows, "final": rows[-1]}


BASE = {0: summary(0, 0.0116, 0.0108), 1: summary(1, 0.0126, 0.0115),
        2: summary(2, 0.0130, 0.0111)}
VARIANT = {0: summary(0, 0.0118, 0.0105), 1: summary(1, 0.0120, 0.0116),
           2: summary(2, 0.0124, 0.0104), 5: summary(5, 0.01, 0.01)}


def test_paired_differences_are_exact():
  result = compare.paired(BASE, VARIANT)
  assert result["seeds"] == [0, 1, 2]  # seed 5 has no baseline
  for key in ("validation_error", "test_error"):
    diffs = np.array([VARIANT[s]["final"][key] - BASE[s]["final"][key] for s in (0, 1, 2)])
    d = result["difference"][key]
    assert d["n"] == 3
    np.testing.assert_allclose(d["mean"], diffs.mean(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(d["std"], diffs.std(ddof=1), rtol=0, atol=1e-15)
    assert (d["min"], d["max"]) == (diffs.min(), diffs.max())
  assert result["variant_lower"] == {"validation_error": [1, 2], "test_error": [0, 2]}
  # Student's t, 2 degrees of freedom, 97.5% quantile (printed tables give 4.303).
  t_975 = 4.302652729749464
  for key in ("validation_error", "test_error"):
    diffs = np.array([VARIANT[s]["final"][key] - BASE[s]["final"][key] for s in (0, 1, 2)])
    half = t_975 * diffs.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(result["interval"][key], (diffs.mean() - half, diffs.mean() + half),
                               rtol=0, atol=1e-12)
  assert result["same_dense"] is True
  assert compare.paired(BASE, {**VARIANT, 1: summary(1, 0.012, 0.0116, dense=(0.01, 0.0068))}
                        )["same_dense"] is False


def test_losses_are_compared_when_every_run_has_them():
  base = {0: summary(0, 0.0116, 0.0108, losses=(0.0487, 0.0351)),
          1: summary(1, 0.0126, 0.0115, losses=(0.0480, 0.0395))}
  variant = {0: summary(0, 0.0126, 0.0103, losses=(0.0463, 0.0304)),
             1: summary(1, 0.0138, 0.0094, losses=(0.0468, 0.0313))}
  result = compare.paired(base, variant)
  assert result["measures"] == ("validation_error", "test_error", "validation_loss", "test_loss")
  for key in ("validation_loss", "test_loss"):
    diffs = np.array([variant[s]["final"][key] - base[s]["final"][key] for s in (0, 1)])
    np.testing.assert_allclose(result["difference"][key]["mean"], diffs.mean(), rtol=0,
                               atol=1e-15)
  assert result["variant_lower"]["validation_loss"] == [0, 1]
  text = compare.markdown(result, "a", "b")
  assert "| 0 | 0.0487 | 0.0463 | -0.0024 | 0.0351 | 0.0304 | -0.0047 |" in text
  assert "Variant lower on validation loss on 2 of 2 seeds, on test loss on 2 of 2." in text
  # One run without losses (an older summary): errors only, no loss table.
  result = compare.paired(base, {**variant, 1: summary(1, 0.0138, 0.0094)})
  assert result["measures"] == ("validation_error", "test_error")
  assert "loss" not in compare.markdown(result, "a", "b")
  assert ("No cross-entropy table: a summary here has no validation_ or test_ cross-entropy."
          in compare.markdown(result, "a", "b"))


@pytest.mark.parametrize("variant, message", [
    ({0: summary(0, 0.01, 0.01, nonzero=2153)},
     "seed 0: the baseline ends at 2,152 weights, the variant at 2,153; compare runs at the same "
     "compression"),
    ({7: summary(7, 0.01, 0.01)}, r"no seed finished in both runs \(baseline: \[0, 1, 2\], "
     r"variant: \[7\]\)"),
    ({0: summary(0, 0.01, 0.01, model="lenet_300_100")},
     r"seed 0: the runs are of other networks \(lenet5, lenet_300_100\)"),
    ({0: {**summary(0, 0.01, 0.01), "final": None}},
     r"variant seed 0: the summary has no final row"),
    ({0: {**summary(0, 0.01, 0.01), "final": {"params_nonzero": 2152, "compression": 200.05,
                                              "validation_error": 0.01}}},
     r"seed 0: a run reports no test_error"),
])
def test_refused(variant, message):
  with pytest.raises(UserError, match=message):
    compare.paired(BASE, variant)


def _write(workdir, summaries):
  for seed, s in summaries.items():
    os.makedirs(workdir / f"seed_{seed}")
    (workdir / f"seed_{seed}" / "summary.json").write_text(json.dumps(s))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lwc.experiments.compare", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_and_writes_the_table(tmp_path):
  _write(tmp_path / "a", BASE)
  _write(tmp_path / "b", VARIANT)
  (tmp_path / "b" / "seed_3").mkdir()  # unfinished: no summary.json, left out
  out = tmp_path / "cmp.md"
  proc = _cli(f"--baseline={tmp_path / 'a'}", f"--variant={tmp_path / 'b'}", f"--out={out}",
              "--rule=error")  # these summaries have no cross-entropy
  assert proc.returncode == 0, proc.stderr
  assert out.read_text() == proc.stdout
  assert "| 1 | 2,152 | 200.05x | 1.26 | 1.20 | -0.06 | 1.15 | 1.16 | +0.01 |" in proc.stdout
  assert "| **mean** | | | | | -0.03 | | | -0.03 |" in proc.stdout
  assert "Variant lower on validation on 2 of 3 seeds, on test on 2 of 3." in proc.stdout
  assert "Every seed's two runs start from the same dense network." in proc.stdout
  assert ("95% interval of the mean difference (Student's t over the seeds): validation "
          "[-0.15, +0.08], test [-0.13, +0.07]; an interval that contains 0 does not separate "
          "the recipes.") in proc.stdout


def test_one_seed_has_no_interval():
  result = compare.paired({0: BASE[0]}, {0: VARIANT[0]})
  assert result["interval"] == {"validation_error": None, "test_error": None}
  assert "One seed: no interval of the mean difference." in compare.markdown(result, "a", "b")


def test_cli_bad_input_is_one_error_line(tmp_path):
  proc = _cli(f"--baseline={tmp_path / 'missing'}", f"--variant={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such directory"
  (tmp_path / "a" / "seed_0").mkdir(parents=True)
  (tmp_path / "a" / "seed_0" / "summary.json").write_text("{not json")
  proc = _cli(f"--baseline={tmp_path / 'a'}", f"--variant={tmp_path}")
  assert proc.returncode == 2 and proc.stderr.startswith(
      f"error: cannot read summary {tmp_path / 'a' / 'seed_0' / 'summary.json'}: not JSON")


def _with_losses(base_val, var_val, base_loss, var_loss, test_losses=(0.03, 0.03)):
  """Two-seed runs whose seeds share the given validation errors and losses."""
  base = {s: summary(s, base_val, 0.011, losses=(base_loss, test_losses[0])) for s in (0, 1)}
  variant = {s: summary(s, var_val, 0.010, losses=(var_loss, test_losses[1])) for s in (0, 1)}
  return compare.paired(base, variant)


@pytest.mark.parametrize("val, loss, rule, adopted", [
    ((0.0120, 0.0110), (0.050, 0.049), "error_and_loss", True),
    ((0.0120, 0.0110), (0.050, 0.051), "error_and_loss", False),  # cross-entropy higher
    ((0.0120, 0.0110), (0.050, 0.051), "error", True),            # ... which `error` ignores
    ((0.0120, 0.0120), (0.050, 0.049), "error_and_loss", False),  # a tie keeps the baseline
    ((0.0120, 0.0125), (0.050, 0.049), "error", False),
])
def test_verdict_follows_the_rule(val, loss, rule, adopted):
  decision = compare.verdict(_with_losses(*val, *loss), rule)
  assert decision["adopted"] is adopted
  assert decision["seeds"] == [0, 1]
  assert list(decision["means"]) == list(compare.RULES[rule])
  np.testing.assert_allclose(decision["means"]["validation_error"], val[1] - val[0], rtol=0,
                             atol=1e-15)


def test_verdict_never_reads_the_test_split():
  # The same validation figures, opposite test figures: the same decision.
  low_test = _with_losses(0.0120, 0.0110, 0.050, 0.049, test_losses=(0.03, 0.02))
  high_test = _with_losses(0.0120, 0.0110, 0.050, 0.049, test_losses=(0.03, 0.09))
  assert compare.verdict(low_test) == compare.verdict(high_test)
  assert compare.verdict(high_test)["adopted"] is True


def test_verdict_text_and_refusals():
  text = compare.verdict_text(compare.verdict(_with_losses(0.0120, 0.0110, 0.050, 0.051)))
  assert text == ("**Rule `error_and_loss` over seeds 0, 1: not adopted.** Mean validation error "
                  "-0.10 points (lower); mean validation cross-entropy +0.0010 nats (not lower). "
                  "The rule needs every measure it reads strictly lower; the test split takes no "
                  "part.\n")
  no_losses = compare.paired(BASE, VARIANT)
  with pytest.raises(UserError, match="rule error_and_loss needs the validation_loss of every "
                     r"run, and a summary here has none \(an older run\)"):
    compare.verdict(no_losses)
  assert compare.verdict(no_losses, "error")["adopted"] is True  # mean -0.03 points
  with pytest.raises(UserError, match="unknown rule 'test'; one of error, error_and_loss"):
    compare.verdict(no_losses, "test")


def test_only_the_named_seeds_are_compared():
  result = compare.paired(BASE, VARIANT, only=[0, 2])
  assert result["seeds"] == [0, 2]
  assert result["variant_lower"]["validation_error"] == [2]
  with pytest.raises(UserError, match=r"seed 5 has not finished in the baseline \(finished: "
                     r"\[0, 1, 2\]\)"):
    compare.paired(BASE, VARIANT, only=[0, 5])


def test_cli_prints_the_decision_over_the_named_seeds(tmp_path):
  _write(tmp_path / "a", BASE)
  _write(tmp_path / "b", VARIANT)
  proc = _cli(f"--baseline={tmp_path / 'a'}", f"--variant={tmp_path / 'b'}", "--rule=error",
              "--seeds=1,2")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.endswith("**Rule `error` over seeds 1, 2: adopted.** Mean validation error "
                              "-0.06 points (lower). The rule needs every measure it reads "
                              "strictly lower; the test split takes no part.\n")
  assert "| 0 |" not in proc.stdout
  proc = _cli(f"--baseline={tmp_path / 'a'}", f"--variant={tmp_path / 'b'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: rule error_and_loss needs the validation_loss")
  proc = _cli(f"--baseline={tmp_path / 'a'}", f"--variant={tmp_path / 'b'}", "--seeds=0,x")
  assert (proc.returncode, proc.stderr.strip()) == (2, "error: --seeds: 'x' is not an integer")
