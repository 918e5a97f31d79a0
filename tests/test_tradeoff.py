"""Figure 5 trade-off lines (lwc.tradeoff) at small scale: outputs, realised fractions, the
no-retraining error, masks that never regrow, reuse of finished sub-runs, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lwc import pipeline, tradeoff
from lwc.data import load_dataset
from lwc.models import get_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = (0.5, 0.9)
WIDTHS = (64, 32)  # a narrower LeNet-300-100: the same code paths, less compute


def base_config(data_dir):
  return pipeline.Config(model="lenet_300_100", widths=WIDTHS, data_dir=data_dir, batch_size=80,
                         learning_rate=0.05, lr_schedule="cosine", dense_epochs=1,
                         retrain_epochs=1, qualities=(0.7,), layer_qualities={"fc3": (0.4,)},
                         tensorboard=False, log_every_seconds=1e9)


@pytest.fixture(scope="module")
def finished(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tradeoff"))
  base = base_config(small_mnist_dir)
  with pytest.MonkeyPatch.context() as mp:
    # Each sub-run's Figure 4/7 PNGs (tested in test_pipeline) cost seconds apiece here.
    mp.setattr(pipeline, "_write_figures", lambda *args, **kwargs: None)
    result = tradeoff.run(base, workdir, FRACTIONS, iterative_iterations=2,
                          strengths=tradeoff.Strengths(l1=1e-4, l1_retrain=1e-4))
  return base, workdir, result


def points(result, line):
  return [p for p in result["points"] if p["line"] == line]


def test_files_and_lines(finished):
  _, workdir, result = finished
  for name in ("tradeoff.csv", "tradeoff.json", "tradeoff.md", "tradeoff.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  for line in tradeoff.LINES[:4]:
    assert [p["fraction"] for p in points(result, line)] == list(FRACTIONS)
  assert [p["iteration"] for p in points(result, "l2_iterative")] == [1, 2]
  with open(os.path.join(workdir, "tradeoff.json")) as f:
    assert len(json.load(f)["points"]) == 4 * len(FRACTIONS) + 2
  with open(os.path.join(workdir, "tradeoff.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 4 * len(FRACTIONS) + 2
  # Iterative pruning only ever removes more.
  pruned = [p["pruned"] for p in points(result, "l2_iterative")]
  assert 0 < pruned[0] < pruned[1] < 1


def test_realised_fraction_and_no_retrain_error(finished, small_mnist_dir):
  base, workdir, result = finished
  _, test = load_dataset("mnist", small_mnist_dir, False)
  apply = get_model("lenet_300_100", widths=WIDTHS).apply
  for kind in tradeoff.REGULARIZERS:
    state = pipeline.restore_iteration(os.path.join(workdir, f"dense_{kind}"),
                                       tradeoff.dense_config(base, kind, tradeoff.Strengths()),
                                       0)
    for f, no, re in zip(FRACTIONS, points(result, f"{kind}_no_retrain"),
                         points(result, f"{kind}_retrain")):
      pruned = tradeoff.prune_to_fraction(state["params"], state["masks"], f)
      # Every layer loses round(f * n) weights, up to a weight at a |w| tie or float rounding.
      for name, n in pruned.weights.items():
        assert abs(pruned.removed[name] - round(f * n)) <= 1, (kind, f, name)
      assert no["pruned"] == pytest.approx(f, abs=1e-4)
      assert re["pruned"] == pytest.approx(no["pruned"], abs=0)  # the sub-run pruned the same
      # The no-retraining error is a direct evaluation of the pruned weights, and what the
      # retraining sub-run measured right after its own pruning.
      logits = np.asarray(apply({"params": pruned.params}, test.images, train=False))
      direct = float(np.mean(np.argmax(logits, -1) != test.labels))
      assert no["test_error"] == pytest.approx(direct, abs=1.5 / len(test.labels))
      assert re["error_after_prune"] == no["test_error"]
      assert no["loss_pp"] == pytest.approx(100 * (no["test_error"] - no["dense_error"]))


def test_retraining_never_regrows_pruned_weights(finished):
  base, workdir, result = finished
  for kind in tradeoff.REGULARIZERS:
    dense_dir = os.path.join(workdir, f"dense_{kind}")
    config = tradeoff.dense_config(base, kind, tradeoff.Strengths())
    state = pipeline.restore_iteration(dense_dir, config, 0)
    for f, re in zip(FRACTIONS, points(result, f"{kind}_retrain")):
      pruned = tradeoff.prune_to_fraction(state["params"], state["masks"], f)
      final = pipeline.restore_iteration(re["workdir"], config.replace(iterations=1), 1)
      for (m_no, m_re, w_re) in zip(*(jax.tree.leaves(t) for t in
                                      (pruned.masks, final["masks"], final["params"]))):
        m_no, m_re = np.asarray(m_no, bool), np.asarray(m_re, bool)
        assert not np.any(m_re & ~m_no)
        assert np.all(np.asarray(w_re)[~m_re] == 0.0)
      # Retraining changed the survivors (it did train).
      assert not np.array_equal(np.asarray(final["params"]["fc1"]["kernel"]),
                                pruned.params["fc1"]["kernel"])


def test_rerun_reuses_every_sub_run(finished):
  base, workdir, result = finished
  assert not any(result["subruns"].values())
  stamps = {d: os.stat(os.path.join(d, "summary.json")).st_mtime_ns for d in result["subruns"]}
  again = tradeoff.run(base, workdir, FRACTIONS, iterative_iterations=2,
                       strengths=tradeoff.Strengths(l1=1e-4, l1_retrain=1e-4))
  assert again["subruns"] and all(again["subruns"].values())
  assert stamps == {d: os.stat(os.path.join(d, "summary.json")).st_mtime_ns for d in stamps}
  assert [p["test_error"] for p in again["points"]] == [p["test_error"] for p in
                                                         result["points"]]
  # Other retraining settings: the dense sub-runs are still reused (they do not depend on
  # them), the first retraining sub-run is refused, and nothing is run.
  refused = r"retrain_l1_f0.5000 holds a run with other settings \(retrain_epochs\)"
  with pytest.raises(tradeoff.UserError, match=refused):
    tradeoff.run(base.replace(retrain_epochs=2), workdir, FRACTIONS, iterative_iterations=2,
                 strengths=tradeoff.Strengths(l1=1e-4, l1_retrain=1e-4))


def test_bad_fraction_is_one_error_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "lwc.experiments.tradeoff", f"--workdir={tmp_path / 'w'}",
       "--fractions=0.5,1.2"], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: fractions must be in [0, 1), got 1.2"
  assert not os.path.exists(tmp_path / "w")
