"""lwc.experiments.seeds: the aggregation over seeds is exact (hand-made summaries and a small
real run of two seeds), a rerun reuses the finished seeds, the entry run by hand with one of the
seeds gives that seed's numbers, and bad input is one error line with exit status 2."""

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from lwc.errors import UserError
from lwc.experiments import seeds as seeds_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = "experiments/lenet_300_100.flags"
# The flagfile's network, narrower and much shorter: the same code paths in seconds.
TINY = ("--widths=32,16", "--dense_epochs=1", "--retrain_epochs=1", "--iterations=1",
        "--tensorboard=false", "--remove_dead_neurons=false", "--log_every_seconds=1e9")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LWC_FAULT", None)
  return env


def run_seeds(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "lwc.experiments.seeds", *args], cwd=REPO_ROOT,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- hand-made


def row(iteration, compression, test_error, nonzero, total=1000, **extra):
  return {"iteration": iteration, "compression": compression, "test_error": test_error,
          "params_nonzero": nonzero, "params_total": total, **extra}


def summary(seed, rows, model="lenet_300_100", widths=()):
  return {"model": model, "dataset": "mnist", "config": {"seed": seed, "widths": list(widths)},
          "iterations": rows, "final": rows[-1] if rows else None}


def independent(values):
  """mean, sample std, min, max computed without lwc (NumPy), for comparison."""
  a = np.asarray(values, np.float64)
  return (float(np.mean(a)), float(np.std(a, ddof=1)) if a.size > 1 else 0.0,
          float(np.min(a)), float(np.max(a)))


def assert_stats(got, values):
  mean, std, lo, hi = independent(values)
  assert got["n"] == len(values)
  assert got["min"] == lo and got["max"] == hi  # exact: one of the values
  assert got["mean"] == pytest.approx(mean, rel=1e-15, abs=0)
  assert got["mean"] == math.fsum(values) / len(values)  # one rounding, exactly
  assert got["std"] == pytest.approx(std, rel=1e-12, abs=0)
  assert got["std"] == (statistics.stdev(values) if len(values) > 1 else 0.0)


HAND = [
    summary(0, [row(0, 1.0, 0.0170, 1000), row(1, 5.0, 0.0160, 200),
                row(2, 10.0, 0.0150, 100, validation_error=0.0210)]),
    summary(1, [row(0, 1.0, 0.0180, 1000), row(1, 4.0, 0.0170, 250),
                row(2, 12.5, 0.0161, 80, validation_error=0.0190)]),
    summary(7, [row(0, 1.0, 0.0175, 1000), row(1, 5.0, 0.0155, 200)]),  # stopped earlier
]


def test_stats_exact_values():
  # Values whose mean and sample std are exact in binary.
  got = seeds_lib.stats([10.0, 12.0, 14.0])
  assert got == {"n": 3, "mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0}
  assert seeds_lib.stats([3.5]) == {"n": 1, "mean": 3.5, "std": 0.0, "min": 3.5, "max": 3.5}
  for values in ([0.0159, 0.0161, 0.0164, 0.0158], [12.31, 11.87], [1e-3, 2e-3, 7e-3]):
    assert_stats(seeds_lib.stats(values), values)
  with pytest.raises(ValueError):
    seeds_lib.stats([])


def test_aggregate_final_rows():
  agg = seeds_lib.aggregate(HAND)
  assert agg["model"] == "lenet_300_100" and agg["seeds"] == [0, 1, 7]
  assert "n - 1" in agg["std"]
  assert [r["seed"] for r in agg["per_seed"]] == [0, 1, 7]
  for r, s in zip(agg["per_seed"], HAND):
    for key in ("compression", "test_error", "params_nonzero", "params_total"):
      assert r[key] == s["final"][key]
    assert r["dense_test_error"] == s["iterations"][0]["test_error"]
    assert r["iterations"] == len(s["iterations"])
    assert r.get("validation_error") == s["final"].get("validation_error")
  final = agg["final"]
  assert_stats(final["compression"], [10.0, 12.5, 5.0])
  assert_stats(final["test_error"], [0.0150, 0.0161, 0.0155])
  assert_stats(final["params_nonzero"], [100, 80, 200])
  assert_stats(final["dense_test_error"], [0.0170, 0.0180, 0.0175])
  assert_stats(final["validation_error"], [0.0210, 0.0190])  # the seeds that have it
  assert final["compression"]["mean"] == 27.5 / 3
  # 95% Student-t intervals of the means; t quantiles (97.5%) for 2 and 1 degrees of freedom.
  for key, values, t_975 in (("test_error", [0.0150, 0.0161, 0.0155], 4.302652729749464),
                             ("validation_error", [0.0210, 0.0190], 12.706204736174698)):
    half = t_975 * np.std(values, ddof=1) / np.sqrt(len(values))
    np.testing.assert_allclose(agg["final_interval"][key],
                               [np.mean(values) - half, np.mean(values) + half], rtol=0,
                               atol=1e-12)


def test_aggregate_per_iteration():
  agg = seeds_lib.aggregate(HAND)
  assert [it["iteration"] for it in agg["iterations"]] == [0, 1, 2]
  assert [it["seeds"] for it in agg["iterations"]] == [3, 3, 2]
  it0, it1, it2 = agg["iterations"]
  assert it0["compression"] == {"n": 3, "mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}
  assert_stats(it0["test_error"], [0.0170, 0.0180, 0.0175])
  assert_stats(it1["compression"], [5.0, 4.0, 5.0])
  assert_stats(it1["test_error"], [0.0160, 0.0170, 0.0155])
  assert_stats(it2["compression"], [10.0, 12.5])
  assert "validation_error" not in it1 and it2["validation_error"]["n"] == 2


def test_aggregate_one_seed_and_bad_summaries():
  agg = seeds_lib.aggregate(HAND[:1])
  assert agg["final"]["test_error"]["std"] == 0.0
  assert agg["final_interval"] == {"test_error": None, "validation_error": None}
  assert "95% interval" not in seeds_lib.markdown(
      {"aggregate": agg, "command": "c", "published": [], "published_note": "none"})
  assert agg["final"]["compression"] == {"n": 1, "mean": 10.0, "std": 0.0, "min": 10.0,
                                         "max": 10.0}
  assert seeds_lib.aggregate(HAND[:2], [5, 6])["seeds"] == [5, 6]
  with pytest.raises(UserError, match="no summaries"):
    seeds_lib.aggregate([])
  with pytest.raises(UserError, match="different models: lenet5, lenet_300_100"):
    seeds_lib.aggregate([HAND[0], summary(3, HAND[1]["iterations"], model="lenet5")])
  with pytest.raises(UserError, match="seed 4: the summary has no final row"):
    seeds_lib.aggregate([{**summary(4, []), "final": None}])


def test_markdown_table(tmp_path):
  agg = seeds_lib.aggregate(HAND)
  result = {"aggregate": agg, "command": "python -m lwc.experiments.lenet ...",
            "published": seeds_lib.PUBLISHED["lenet_300_100"], "published_note": ""}
  text = seeds_lib.markdown(result)
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| seed"))
  assert header == ("| seed | nonzero / total | compression | test error % | validation error % "
                    "| dense test error % |")
  table = lines[lines.index(header) + 2:]
  table = table[:next(i for i, line in enumerate(table) if not line.startswith("|"))]
  assert [line.split(" | ")[0] for line in table] == [
      "| 0", "| 1", "| 7", "| **mean**", "| **std**", "| **min**", "| **max**"]
  assert table[0] == "| 0 | 100 / 1,000 | 10.00x | 1.50 | 2.10 | 1.70 |"
  assert table[2] == "| 7 | 200 / 1,000 | 5.00x | 1.55 | - | 1.75 |"
  assert table[5] == "| **min** | 80 / 1,000 | 5.00x | 1.50 | 1.90 | 1.70 |"
  assert "Han et al. 2015 | 12x | 1.59 | 1.64" in text
  assert ("95% interval of the mean final error (Student's t over the seeds): test 1.42 - 1.69%; "
          "validation 0.73 - 3.27%.") in lines
  # The figure, published points drawn (ADMM has no error: a vertical line).
  from lwc import plots
  path = plots.seeds_error_vs_compression(
      {s["config"]["seed"]: s["iterations"] for s in HAND}, str(tmp_path / "s.png"),
      seeds_lib.PUBLISHED["lenet5"], "t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_published_points_by_network():
  points, note = seeds_lib.published_points(summary(0, HAND[0]["iterations"]))
  assert [p["compression"] for p in points] == [12.0, 56.0, 68.0] and not note
  points, _ = seeds_lib.published_points(summary(0, [], model="lenet5", widths=(20, 50, 500)))
  assert [p["method"].split()[0] for p in points] == ["Han", "DNS", "Sparse", "Progressive"]
  assert points[-1]["test_error"] is None  # "almost no" loss: no number is made up
  points, note = seeds_lib.published_points(summary(0, [], widths=(32, 16)))
  assert points == [] and "widths 32,16" in note
  points, note = seeds_lib.published_points(summary(0, [], model="alexnet"))
  assert points == [] and "alexnet" in note


def test_finished_needs_the_same_command(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(seeds_lib.seed_dir(workdir, 3))
  stamp = {"command": ["-m", "lwc.experiments.lenet", "--seed=3"], "flagfiles": {}}
  assert not seeds_lib.finished(workdir, 3, stamp)  # no summary.json
  with open(os.path.join(seeds_lib.seed_dir(workdir, 3), "summary.json"), "w") as f:
    f.write("{}")
  assert seeds_lib.finished(workdir, 3, None)
  assert not seeds_lib.finished(workdir, 3, stamp)  # no record of the command
  with open(seeds_lib.seed_dir(workdir, 3) + ".command.json", "w") as f:
    json.dump(stamp, f)
  assert seeds_lib.finished(workdir, 3, stamp)
  assert not seeds_lib.finished(workdir, 3, {**stamp, "flagfiles": {"f": "other sha"}})


def test_stamp_covers_included_flagfiles(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "base.flags").write_text("--model=lenet_300_100\n--dense_epochs=1\n")
  (tmp_path / "mid.flags").write_text("# comment\n--flagfile=base.flags\n--iterations=2\n")
  (tmp_path / "top.flags").write_text("--flagfile=mid.flags\n  --flagfile=base.flags\n")
  assert seeds_lib.included_flagfiles(["top.flags"]) == ["top.flags", "mid.flags", "base.flags"]
  before = seeds_lib._stamp(["cmd"], ["top.flags"])
  assert set(before["flagfiles"]) == {"top.flags", "mid.flags", "base.flags"}
  (tmp_path / "base.flags").write_text("--model=lenet_300_100\n--dense_epochs=2\n")
  after = seeds_lib._stamp(["cmd"], ["top.flags"])
  assert after["flagfiles"]["top.flags"] == before["flagfiles"]["top.flags"]
  assert after != before  # an edit two includes down makes finished seeds stale
  (tmp_path / "mid.flags").write_text("--flagfile=missing.flags\n")
  with pytest.raises(UserError, match="missing.flags"):
    seeds_lib._stamp(["cmd"], ["top.flags"])


# ----------------------------------------------------------------------------- a real run


def _digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def two_seeds(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("seeds"))
  args = (f"--flagfile={FLAGFILE}", "--entry=lenet", "--seeds=0,1", f"--workdir={workdir}",
          f"--data_dir={small_mnist_dir}", *TINY)
  proc = run_seeds(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, args, proc


def _summaries(workdir):
  out = {}
  for seed in (0, 1):
    with open(os.path.join(workdir, f"seed_{seed}", "summary.json")) as f:
      out[seed] = json.load(f)
  return out


def test_real_run_aggregates_exactly(two_seeds):
  workdir, _, proc = two_seeds
  for name in ("seeds.json", "seeds.md", "seeds.png", "seed_0.log", "seed_1.command.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "seeds.json")) as f:
    result = json.load(f)
  summaries = _summaries(workdir)
  assert [s["config"]["seed"] for s in summaries.values()] == [0, 1]
  agg = result["aggregate"]
  finals = [summaries[s]["final"] for s in (0, 1)]
  for r, final in zip(agg["per_seed"], finals):
    for key in ("compression", "test_error", "params_nonzero", "params_total"):
      assert r[key] == final[key]
  assert finals[0] != finals[1]  # the seeds really differ
  for key in ("compression", "test_error", "params_nonzero"):
    assert_stats(agg["final"][key], [f[key] for f in finals])
  if all("validation_error" in f for f in finals):
    assert_stats(agg["final"]["validation_error"], [f["validation_error"] for f in finals])
  for it in agg["iterations"]:
    rows = [s["iterations"][it["iteration"]] for s in summaries.values()]
    assert_stats(it["test_error"], [h["test_error"] for h in rows])
    assert_stats(it["compression"], [h["compression"] for h in rows])
  assert [it["iteration"] for it in agg["iterations"]] == [0, 1]
  assert result["reused"] == {"0": False, "1": False}
  assert "--seed=N --workdir=" in result["command"] and result["published"] == []
  # The table printed is seeds.md, with each seed's numbers as its summary has them.
  with open(os.path.join(workdir, "seeds.md")) as f:
    md = f.read()
  assert proc.stdout.startswith(md)
  for seed, final in zip((0, 1), finals):
    assert (f"| {seed} | {final['params_nonzero']:,} / {final['params_total']:,} | "
            f"{final['compression']:.2f}x | {100 * final['test_error']:.2f} |") in md
  assert "seed 0: done:" in proc.stderr and "seed 1: done:" in proc.stderr
  # Each seed's final checkpoint was read back: the reported count, every pruned weight 0.0.
  assert result["checkpoints"] == {
      str(s): {"iteration": finals[s]["iteration"], "checkpoint_nonzero":
               finals[s]["params_nonzero"], "pruned_all_zero": True} for s in (0, 1)}
  assert (f"seed 0, iteration 1: {finals[0]['params_nonzero']:,} weights kept, every pruned "
          "weight 0.0") in md


def test_checkpoint_check_refuses_a_disagreeing_summary(two_seeds):
  """A summary row whose count is not what the checkpoint keeps is an error, not a table row."""
  workdir, _, _ = two_seeds
  final = _summaries(workdir)[0]["final"]
  run_dir = os.path.join(workdir, "seed_0")
  assert seeds_lib.checkpoint_check(run_dir, final)["checkpoint_nonzero"] == \
      final["params_nonzero"]
  wrong = {**final, "params_nonzero": final["params_nonzero"] + 1}
  with pytest.raises(UserError, match=f"keeps {final['params_nonzero']:,} weights "
                     f"\\(summary: {final['params_nonzero'] + 1:,}\\)"):
    seeds_lib.checkpoint_check(run_dir, wrong)


def test_rerun_reuses_finished_seeds(two_seeds):
  workdir, args, _ = two_seeds
  before = {name: _digest(os.path.join(workdir, f"seed_{s}", name))
            for s in (0, 1) for name in ("summary.json", "metrics.jsonl")}
  t0 = time.perf_counter()
  proc = run_seeds(*args)
  seconds = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 seeds (2 reused)" in proc.stdout
  assert proc.stderr.count("finished before, reused") == 2 and "done:" not in proc.stderr
  after = {name: _digest(os.path.join(workdir, f"seed_{s}", name))
           for s in (0, 1) for name in ("summary.json", "metrics.jsonl")}
  assert after == before  # byte for byte, not even rewritten
  assert seconds < 30  # no JAX, no training: well under one seed's run
  # Aggregating only (--norun) gives the same numbers.
  proc = run_seeds(*args, "--norun")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, "seeds.json")) as f:
    again = json.load(f)["aggregate"]
  assert again == seeds_lib.aggregate(list(_summaries(workdir).values()))


def test_same_flagfile_by_hand_matches_its_seed(two_seeds, small_mnist_dir, tmp_path):
  """The entry point run directly with the flagfile and --seed=1 lands on seed 1's numbers,
  inside the reported min - max."""
  workdir, _, _ = two_seeds
  proc = subprocess.run([sys.executable, "-m", "lwc.experiments.lenet", f"--flagfile={FLAGFILE}",
                         f"--data_dir={small_mnist_dir}", *TINY, "--seed=1",
                         f"--workdir={tmp_path / 'by_hand'}"], cwd=REPO_ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "by_hand" / "summary.json") as f:
    by_hand = json.load(f)
  seed1 = _summaries(workdir)[1]
  strip = lambda rows: [{k: v for k, v in h.items() if k != "seconds"} for h in rows]
  assert strip(by_hand["iterations"]) == strip(seed1["iterations"])
  with open(os.path.join(workdir, "seeds.json")) as f:
    final = json.load(f)["aggregate"]["final"]
  for key in ("compression", "test_error"):
    assert final[key]["min"] <= by_hand["final"][key] <= final[key]["max"]


def test_seed_placeholder_in_passed_flags():
  command = seeds_lib.seed_command("lenet", ["f.flags"], ["--init_checkpoint=d/seed_{seed}:0",
                                                          "--dense_epochs=0"], 3, "w")
  assert command == ["-m", "lwc.experiments.lenet", "--flagfile=f.flags",
                     "--init_checkpoint=d/seed_3:0", "--dense_epochs=0", "--seed=3",
                     f"--workdir={os.path.join('w', 'seed_3')}"]


def test_variant_from_each_seeds_dense_network(two_seeds, tmp_path):
  """--init_checkpoint=DIR/seed_{seed}:0 --dense_epochs=0: each seed's variant starts from that
  seed's own dense network, and with nothing else changed lands on the very numbers of the run
  that trained it (the dense training is shared, not redone)."""
  workdir, args, _ = two_seeds
  variant = str(tmp_path / "variant")
  proc = run_seeds(*[a for a in args if not a.startswith("--workdir=")],
                   f"--init_checkpoint={workdir}/seed_{{seed}}:0", "--dense_epochs=0",
                   f"--workdir={variant}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(variant, "seeds.json")) as f:
    assert "--init_checkpoint=" + workdir + "/seed_N:0" in json.load(f)["command"]
  keys = ("iteration", "params_nonzero", "test_error", "validation_error")
  for seed, trained in _summaries(workdir).items():
    with open(os.path.join(variant, f"seed_{seed}", "summary.json")) as f:
      mine = json.load(f)
    assert mine["config"]["init_checkpoint"] == f"{workdir}/seed_{seed}:0"
    assert [[h[k] for k in keys] for h in mine["iterations"]] == \
        [[h[k] for k in keys] for h in trained["iterations"]]


# ----------------------------------------------------------------------------- bad input


BAD = {
    "unknown entry": (["--entry=resnet", "--seeds=0"],
                      "error: flag --entry=resnet: value should be one of "
                      "<lenet|alexnet|vgg16|prune>"),
    "no entry": (["--seeds=0"], "error: flag --entry=None: Flag --entry must have a value other "
                 "than None."),
    "empty seeds": (["--entry=lenet", "--seeds="],
                    "error: --seeds is empty: give at least one seed, e.g. --seeds=0,1,2"),
    "duplicate seeds": (["--entry=lenet", "--seeds=0,1,0,1"],
                        "error: --seeds: 0, 1 given more than once"),
    "not a seed": (["--entry=lenet", "--seeds=0,x"], "error: --seeds: 'x' is not an integer"),
    "negative seed": (["--entry=lenet", "--seeds=-1"], "error: --seeds: -1 is negative"),
    "seed passed through": (["--entry=lenet", "--seeds=0", "--seed=3"],
                            "error: --seed=3: --seed is set for every seed by this program "
                            "(--seeds)"),
    "missing flagfile": (["--entry=lenet", "--seeds=0", "--flagfile=nope.flags"],
                         "error: cannot read flagfile nope.flags: No such file or directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tmp_path):
  args, message = BAD[case]
  workdir = tmp_path / "w"
  proc = run_seeds(f"--workdir={workdir}", *args, timeout=60)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert error_lines(proc) == [message], proc.stderr[-2000:]
  assert not workdir.exists()


def test_failed_seed_reports_its_last_line(small_mnist_dir, tmp_path):
  workdir = tmp_path / "w"
  proc = run_seeds(f"--workdir={workdir}", "--entry=lenet", "--seeds=4,5",
                   f"--flagfile={FLAGFILE}", f"--data_dir={small_mnist_dir}",
                   "--widths=300,100,50")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  lines = error_lines(proc)
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: seed 4: python -m lwc.experiments.lenet ")
  assert lines[0].endswith("failed (exit status 2): error: --widths has 3 values; "
                           "lenet_300_100 takes 2 (its own: 300,100)")
  assert "seed 5" not in proc.stderr  # stops at the first failure
  assert not (workdir / "seed_4" / "summary.json").exists()
  assert not (workdir / "seeds.json").exists()


def test_norun_without_finished_seeds(tmp_path):
  proc = run_seeds(f"--workdir={tmp_path}", "--entry=lenet", "--seeds=0,2", "--norun",
                   timeout=60)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == [f"error: --norun: seed(s) 0, 2 have no {tmp_path}/seed_0/"
                               "summary.json yet"]


def test_aggregate_carries_the_training_sample_error():
  with_gap = [summary(0, [row(0, 1.0, 0.0170, 1000), row(1, 5.0, 0.0160, 200,
                                                          train_sample_error=0.0040)]),
              summary(1, [row(0, 1.0, 0.0180, 1000), row(1, 5.0, 0.0150, 200,
                                                          train_sample_error=0.0025)])]
  agg = seeds_lib.aggregate(with_gap)
  assert [r["train_sample_error"] for r in agg["per_seed"]] == [0.0040, 0.0025]
  assert_stats(agg["final"]["train_sample_error"], [0.0040, 0.0025])
  table = seeds_lib.markdown({"aggregate": agg, "command": "c", "published": [],
                              "published_note": "none"})
  assert ("| seed | nonzero / total | compression | test error % | training-sample error % |"
          in table)
  assert "| 0 | 200 / 1,000 | 5.00x | 1.60 | 0.40 | 1.70 |" in table
  assert "training-sample" not in seeds_lib.markdown(
      {"aggregate": seeds_lib.aggregate(HAND), "command": "c", "published": [],
       "published_note": "none"})
