"""A researcher's own networks (tests/user_models.py, outside the package) through the generic
entry point: `python -m lwc.experiments.prune --model=user_models:BNNet` (Linen with BatchNorm)
and `--model=user_models:NNXNet` (NNX with BatchNorm), on a slice of MNIST; killed with SIGKILL in
the middle of retraining and resumed, ending bit for bit where an uninterrupted run ends; then
exported and swept by the other tools, which rebuild the network from the checkpoint alone.
"""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from lwc import pipeline

TESTS = os.path.dirname(os.path.abspath(__file__))
MODELS = ["user_models:BNNet", "user_models:NNXNet"]
FLAGS = ["--dense_epochs=1", "--retrain_epochs=2", "--iterations=2", "--quality=0.7",
         "--batch_size=50", "--tensorboard=false", "--recalibration_batches=4",
         "--checkpoint_every_steps=10", "--log_every_seconds=100"]


def run(module, *args, fault=None):
  env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("LWC_FAULT", None)
  if fault:
    env["LWC_FAULT"] = fault
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, timeout=600)


def prune(model, workdir, data_dir, fault=None):
  return run("lwc.experiments.prune", f"--model={model}", f"--workdir={workdir}",
             f"--data_dir={data_dir}", "--dataset=mnist_slice", *FLAGS, fault=fault)


@pytest.fixture(scope="module", params=MODELS)
def runs(request, small_mnist_dir, tmp_path_factory):
  """(model, uninterrupted workdir, workdir killed twice and resumed)."""
  model = request.param
  root = tmp_path_factory.mktemp(model.split(":")[1])
  reference, killed = str(root / "reference"), str(root / "killed")
  proc = prune(model, reference, small_mnist_dir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # 2,000 examples - 200 validation = 36 steps per epoch: step 50 is inside iteration 1's
  # retraining, step 95 inside iteration 2's (after its pruning and recalibration).
  for fault in ("step:50", "step:95"):
    proc = prune(model, killed, small_mnist_dir, fault=fault)
    assert proc.returncode == -9, proc.stderr[-2000:]
  proc = prune(model, killed, small_mnist_dir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resuming from" in proc.stderr
  return model, reference, killed


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def test_runs_prune_and_recalibrate_batchnorm(runs):
  model, reference, _ = runs
  summary = _summary(reference)
  assert summary["model"] == model
  assert summary["dataset"] == "mnist_slice"
  assert summary["network"]["input_shape"] == [28, 28, 1]
  assert summary["network"]["num_classes"] == 10
  assert summary["data"] == {"source": summary["data"]["source"], "train": 1800,
                             "validation": 200}
  history = summary["iterations"]
  assert [h["iteration"] for h in history] == [0, 1, 2]
  for before, after in zip(history, history[1:]):
    assert after["params_nonzero"] < before["params_nonzero"]
  for h in history[1:]:
    recal = h["recalibration"]
    assert recal["batches"] == 4
    assert set(recal) >= {"validation_error_before", "validation_error_after",
                          "test_error_before", "test_error_after"}
    assert "validation_error" in h and "test_error" in h


def test_checkpoint_holds_exact_zeros_and_batch_stats(runs):
  _, reference, _ = runs
  state = pipeline.restore_iteration(reference)
  assert state["model_state"], "BatchNorm statistics are saved with the checkpoint"
  pruned = 0
  for w, m in zip(_leaves(state["params"]), _leaves(state["masks"])):
    assert np.all(w[~m] == 0.0)
    pruned += int((~m).sum())
  assert pruned > 0
  assert state["network"].model == _summary(reference)["model"]


def _flat(tree):
  from lwc import layers
  return {"/".join(layers.path_names(p)): np.asarray(x) for p, x in layers.leaves_with_path(tree)}


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_killed_run_ends_bit_identical(runs):
  _, reference, killed = runs
  got, want = (pipeline.restore_iteration(w) for w in (killed, reference))
  for key in ("params", "masks", "opt_state", "model_state"):
    chex.assert_trees_all_equal(got[key], want[key])
  strip = lambda s: [{k: v for k, v in h.items() if k != "seconds"} for h in s["iterations"]]
  assert strip(_summary(killed)) == strip(_summary(reference))


def test_export_and_sweep_rebuild_the_network_from_the_checkpoint(runs, tmp_path):
  _, reference, _ = runs
  out = str(tmp_path / "model.npz")
  proc = run("lwc.export", f"--workdir={reference}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out[:-4] + ".json") as f:
    report = json.load(f)
  assert report["round_trip"]["params_bit_identical"] and report["round_trip"]["masks_identical"]
  from lwc import export
  params, masks, model_state = export.load_model(out)
  state = pipeline.restore_iteration(reference)
  for got, want in ((masks, state["masks"]), (model_state, state["model_state"]),
                    (params, state["params"])):
    got, want = _flat(got), _flat(want)  # an NNX export reads back as nnx.State, orbax as dicts
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  sweep_dir = str(tmp_path / "sweep")
  proc = run("lwc.experiments.sensitivity", f"--workdir={reference}", "--points=3",
             f"--out={sweep_dir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "200 validation images" in proc.stdout
  assert os.path.exists(os.path.join(sweep_dir, "sensitivity.json"))
