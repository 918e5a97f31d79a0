"""The pipeline end to end at small scale: outputs, invariants, and resume after kill -9."""

import json
import os

import chex
import conftest
import jax
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import models
from lwc import pipeline
from lwc.errors import UserError



def small_config(data_dir, **overrides):
  base = dict(model="lenet_300_100", data_dir=data_dir, batch_size=80, learning_rate=0.05,
              dense_epochs=2, retrain_epochs=1, iterations=2, qualities=(0.8,),
              layer_qualities={"fc3": (0.4,)}, tensorboard=False, log_every_seconds=1e9)
  base.update(overrides)
  return pipeline.Config(**base)


@pytest.fixture(scope="module")
def finished_run(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = small_config(small_mnist_dir)
  summary = pipeline.run(config, workdir)
  return config, workdir, summary


def test_outputs_and_invariants(finished_run):
  config, workdir, summary = finished_run
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "1", "2"]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  history = summary["iterations"]
  assert [h["iteration"] for h in history] == [0, 1, 2]
  assert history[0]["params_nonzero"] == history[0]["params_total"] == 266200
  nonzero = [h["params_nonzero"] for h in history]
  assert nonzero[0] > nonzero[1] > nonzero[2] > 0
  for h in history:
    assert h["compression"] == pytest.approx(h["params_total"] / h["params_nonzero"])
    assert sum(layer["nonzero"] for layer in h["layers"].values()) == h["params_nonzero"]
    assert 0.0 <= h["test_error"] < 0.5
  assert history[1]["quality"] == {"fc1": 0.8, "fc2": 0.8, "fc3": 0.4}
  assert "test_error_after_prune" in history[1]

  # metrics.jsonl: one line per evaluation, the fields the issue names.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert {"iteration", "phase", "step", "loss", "test_error", "params_nonzero"} <= set(lines[0])
  phases = [(r["iteration"], r["phase"]) for r in lines]
  assert phases == [(0, "dense")] * 2 + [(1, "prune"), (1, "retrain"), (2, "prune"),
                                          (2, "retrain")]

  # The final checkpoint: pruned weights exactly zero, biases never pruned, masks as summarised.
  state = pipeline.restore_iteration(workdir, config)
  assert sorted(os.listdir(os.path.join(workdir, "figures"))) == [
      "histogram_fc1.png", "sparsity_fc1.png", "sparsity_fc2.png", "sparsity_fc3.png"]
  for (path, w), m in zip(jax.tree_util.tree_leaves_with_path(state["params"]),
                          jax.tree_util.tree_leaves(state["masks"])):
    np.testing.assert_array_equal(w[~m], 0.0)
    if masks_lib.path_names(path)[-1] == "bias":
      assert m.all()
  assert masks_lib.total_counts(state["masks"])["nonzero"] == history[-1]["params_nonzero"]


def test_masks_only_shrink_across_checkpoints(finished_run):
  config, workdir, _ = finished_run
  previous = None
  for it in range(config.iterations + 1):
    masks = pipeline.restore_iteration(workdir, config, it)["masks"]
    if previous is not None:
      for old, new in zip(jax.tree_util.tree_leaves(previous), jax.tree_util.tree_leaves(masks)):
        assert not np.any(new & ~old), "a pruned connection came back"
      assert masks_lib.total_counts(masks)["nonzero"] < masks_lib.total_counts(previous)["nonzero"]
    previous = masks


def test_rerun_of_finished_workdir_changes_nothing(finished_run):
  config, workdir, summary = finished_run
  again = pipeline.run(config, workdir)
  assert again["iterations"] == summary["iterations"]


def test_bad_config_is_user_error_before_touching_disk(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  for overrides, message in [
      (dict(qualities=(-1.0,)), "quality must be a finite number >= 0, got -1.0"),
      (dict(qualities=(float("nan"),)), "quality must be a finite number >= 0, got nan"),
      (dict(qualities=(1.0, 2.0, 3.0)), "qualities has 3 values; give 1 or iterations=2"),
      (dict(iterations=-1), "iterations must be >= 0, got -1"),
      (dict(layer_qualities={"fc9": (0.5,)}), "quality given for unknown layer(s) fc9; "
       "prunable layers are fc1, fc2, fc3"),
      (dict(model="resnet50"), "unknown model 'resnet50': expected a built-in name ("
       + ", ".join(sorted(models.MODELS))),
      (dict(dataset="imdb_reviews", data_dir=None, download=False),
       "'imdb_reviews' is not an image-classification dataset"),
      (dict(batch_size=7), "batch_size 7 is not divisible by the 8 devices"),
  ]:
    with pytest.raises(UserError) as e:
      overrides = dict(overrides)
      pipeline.run(small_config(overrides.pop("data_dir", small_mnist_dir), **overrides),
                   workdir)
    assert message in str(e.value)
    assert not os.path.exists(workdir)


def _run_cli(workdir, data_dir, fault=None, extra=()):
  flags = ["--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
           "--iterations=2", "--quality=0.8", "--layer_quality=fc3=0.4", "--tensorboard=false"]
  return conftest.lenet_cli(workdir, data_dir, [*flags, *extra], fault=fault)


@pytest.fixture(scope="module")
def uninterrupted(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = _run_cli(workdir, small_mnist_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


# 2000 training images less the 200 of the validation split, at batch 100: 18 steps an epoch,
# so step 30 is mid dense training and step 70 is mid retraining of iteration 1 (steps 37-72).
@pytest.mark.parametrize("fault", ["step:30", "save:1", "step:70", "save:2"])
def test_resume_after_kill_matches_uninterrupted(fault, uninterrupted, small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  killed = _run_cli(workdir, small_mnist_dir, fault=fault)
  assert killed.returncode == -9, killed.stderr[-3000:]
  if fault.startswith("save:"):
    # Killed mid-save: the checkpoint being written exists only as orbax's temporary directory.
    iteration = fault.split(":")[1]
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert iteration not in names
    assert any(n.startswith(iteration + ".") and "tmp" in n for n in names), names
  resumed = _run_cli(workdir, small_mnist_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  if fault.startswith("save:") or fault == "step:70":
    assert "resuming from" in resumed.stderr

  config = small_config(small_mnist_dir, batch_size=100, dense_epochs=2, retrain_epochs=2)
  conftest.assert_same_run(workdir, uninterrupted, config)


def test_local_retraining_freezes_the_other_group_bit_exactly(small_mnist_dir, tmp_path):
  """Iteration 1 prunes and retrains FC with conv frozen; iteration 2 the reverse (section 3.3)."""
  config = small_config(small_mnist_dir, model="lenet5", dense_epochs=1, retrain_epochs=1,
                        iterations=2, qualities=(0.5,), layer_qualities={},
                        prune_groups=("fc", "conv"))
  workdir = str(tmp_path / "w")
  summary = pipeline.run(config, workdir)
  states = [pipeline.restore_iteration(workdir, config, it) for it in range(3)]
  conv, fc = ("conv1", "conv2"), ("fc1", "fc2")
  for frozen, moved, (before, after) in ((conv, fc, states[0:2]), (fc, conv, states[1:3])):
    for layer in frozen:
      chex.assert_trees_all_equal(after["params"][layer], before["params"][layer])
      chex.assert_trees_all_equal(after["masks"][layer], before["masks"][layer])
    for layer in moved:
      assert after["masks"][layer]["kernel"].sum() < before["masks"][layer]["kernel"].sum()
      assert not np.array_equal(after["params"][layer]["bias"], before["params"][layer]["bias"])
  assert [h.get("pruned_group") for h in summary["iterations"]] == [None, "fc", "conv"]


def test_final_retraining_runs_its_own_epochs(small_mnist_dir, tmp_path):
  """--final_retrain_epochs: the last iteration retrains 3 epochs, the others 1, and its
  learning-rate schedule spans its own steps (cosine ends at 0 on its last step)."""
  config = small_config(small_mnist_dir, dense_epochs=1, retrain_epochs=1, iterations=2,
                        final_retrain_epochs=3, retrain_lr_schedule="cosine")
  assert [config.phase_epochs(i) for i in range(3)] == [1, 1, 3]
  summary = pipeline.run(config, str(tmp_path / "w"))
  steps = [h["step"] for h in summary["iterations"]]
  per_epoch = steps[0]
  assert per_epoch > 0 and np.diff(steps).tolist() == [per_epoch, 3 * per_epoch]
  assert pipeline.Config(iterations=2, retrain_epochs=4).phase_epochs(2) == 4  # 0: the same


def test_probabilistic_pruning_is_seeded_and_differs_from_hard(small_mnist_dir, tmp_path):
  runs = []
  for name, probabilistic in (("a", True), ("b", True), ("hard", False)):
    config = small_config(small_mnist_dir, dense_epochs=1, retrain_epochs=0, iterations=1,
                          probabilistic_pruning=probabilistic)
    pipeline.run(config, str(tmp_path / name))
    runs.append(pipeline.restore_iteration(str(tmp_path / name), config)["masks"])
  chex.assert_trees_all_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0]["fc1"]["kernel"], runs[2]["fc1"]["kernel"])


def test_dropout_rates_follow_equation_2():
  masks = {"fc1": {"kernel": np.zeros((10, 10), bool), "bias": np.ones(10, bool)},
           "fc2": {"kernel": np.ones((10, 4), bool), "bias": np.ones(4, bool)}}
  masks["fc1"]["kernel"][:, :4] = True  # C_ir / C_io = 40 / 100
  config = pipeline.Config(dropout=0.5, dropout_layers=("fc1", "fc2"))
  rates = pipeline.dropout_rates(config, masks, 1)
  assert rates["fc1"] == pytest.approx(0.5 * np.sqrt(0.4))
  assert rates["fc2"] == 0.5
  assert pipeline.dropout_rates(pipeline.Config(), masks, 1) == {}
  with pytest.raises(UserError, match="dropout on unknown layer"):
    pipeline.dropout_rates(pipeline.Config(dropout=0.5, dropout_layers=("fc7",)), masks, 1)


def test_dropout_rescale_none_keeps_the_rate():
  masks = {"fc1": {"kernel": np.zeros((10, 10), bool), "bias": np.ones(10, bool)}}
  masks["fc1"]["kernel"][:, :1] = True  # 10% of fc1 survives: equation 2 would give 0.5*sqrt(0.1)
  config = pipeline.Config(dropout=0.5, dropout_layers=("fc1",), dropout_rescale="none")
  assert pipeline.dropout_rates(config, masks, 1) == {"fc1": 0.5}


def test_retrain_dropout_sets_retraining_rate_only():
  masks = {"fc1": {"kernel": np.zeros((10, 10), bool), "bias": np.ones(10, bool)}}
  masks["fc1"]["kernel"][:, :4] = True  # C_ir / C_io = 40 / 100
  retraining_only = pipeline.Config(retrain_dropout=0.5, dropout_layers=("fc1",))
  assert pipeline.dropout_rates(retraining_only, masks, 0) == {}
  assert pipeline.dropout_rates(retraining_only, masks, 2) == {
      "fc1": pytest.approx(0.5 * np.sqrt(0.4))}
  dense_only = pipeline.Config(dropout=0.5, retrain_dropout=0.0, dropout_layers=("fc1",))
  assert pipeline.dropout_rates(dense_only, masks, 0) == {"fc1": pytest.approx(0.5 * np.sqrt(0.4))}
  assert pipeline.dropout_rates(dense_only, masks, 1) == {}
  both = pipeline.Config(dropout=0.5, retrain_dropout=0.3, dropout_layers=("fc1",),
                         dropout_rescale="none")
  assert [pipeline.dropout_rates(both, masks, i) for i in (0, 1)] == [{"fc1": 0.5}, {"fc1": 0.3}]


def test_retrain_dropout_equals_dropout_over_a_dense_network_without_it(small_mnist_dir,
                                                                         tmp_path):
  """--retrain_dropout=0.5 in one run is, bit for bit, --dropout=0.5 retraining a dense network
  trained without dropout (loaded with --init_checkpoint): dense training is untouched."""
  config = small_config(small_mnist_dir, dense_epochs=1, iterations=1, retrain_dropout=0.5,
                        dropout_layers=("fc1",))
  summary = pipeline.run(config, str(tmp_path / "one"))
  assert "dropout" not in summary["iterations"][0]
  fc1 = summary["iterations"][1]["layers"]["fc1"]
  assert summary["iterations"][1]["dropout"] == {
      "fc1": pytest.approx(0.5 * np.sqrt(fc1["nonzero"] / fc1["weights"]))}
  two = config.replace(retrain_dropout=-1.0, dropout=0.5,
                       init_checkpoint=str(tmp_path / "one") + ":0", dense_epochs=0)
  pipeline.run(two, str(tmp_path / "two"))
  one_final = pipeline.restore_iteration(str(tmp_path / "one"), config)
  two_final = pipeline.restore_iteration(str(tmp_path / "two"), two)
  chex.assert_trees_all_equal(one_final["masks"], two_final["masks"])
  chex.assert_trees_all_equal(one_final["params"], two_final["params"])


def test_retraining_runs_with_the_recorded_dropout(small_mnist_dir, tmp_path):
  """Each retraining records the rate it ran with, equation 2 over the pruned fc1, and the rate
  is applied: the run ends on other weights than the same run without dropout, with every pruned
  weight still 0.0. (`--dropout_rescale=none` changes the rate, not the path: see above.)"""
  config = small_config(small_mnist_dir, dense_epochs=1, iterations=1, dropout=0.5,
                        dropout_layers=("fc1",))
  summary = pipeline.run(config, str(tmp_path / "dropout"))
  fc1 = summary["iterations"][1]["layers"]["fc1"]
  assert fc1["nonzero"] < fc1["weights"]
  assert summary["iterations"][1]["dropout"] == {
      "fc1": pytest.approx(0.5 * np.sqrt(fc1["nonzero"] / fc1["weights"]))}
  assert summary["iterations"][0]["dropout"] == {"fc1": 0.5}  # dense training: D_o
  with_dropout = pipeline.restore_iteration(str(tmp_path / "dropout"), config)
  for mask, param in zip(jax.tree.leaves(with_dropout["masks"]),
                         jax.tree.leaves(with_dropout["params"])):
    assert np.all(np.asarray(param)[~np.asarray(mask)] == 0.0)
  # From the same dense network, the same retraining without dropout.
  plain = config.replace(dropout=0.0, dropout_layers=(),
                         init_checkpoint=str(tmp_path / "dropout") + ":0", dense_epochs=0)
  pipeline.run(plain, str(tmp_path / "plain"))
  without = pipeline.restore_iteration(str(tmp_path / "plain"), plain)
  chex.assert_trees_all_equal(without["masks"], with_dropout["masks"])
  assert not np.array_equal(without["params"]["fc1"]["kernel"],
                            with_dropout["params"]["fc1"]["kernel"])


def test_small_model_written_with_same_error(finished_run):
  _, workdir, summary = finished_run
  small = summary["small_model"]
  assert small["test_error"] == summary["final"]["test_error"]
  assert os.path.isdir(small["path"]) and small["path"].startswith(workdir)
  assert set(small["removed"]) == {"fc1", "fc2", "fc3"} and small["removed"]["fc3"] == 0


def test_init_checkpoint_starts_from_another_runs_weights_and_masks(finished_run, tmp_path):
  config, source, _ = finished_run
  want = pipeline.restore_iteration(source, config, 1)
  workdir = str(tmp_path / "w")
  summary = pipeline.run(config.replace(init_checkpoint=f"{source}:1", dense_epochs=0,
                                        iterations=0), workdir)
  got = pipeline.restore_iteration(workdir, config.replace(iterations=0), 0)
  chex.assert_trees_all_equal(got["params"], want["params"])
  chex.assert_trees_all_equal(got["masks"], want["masks"])
  assert summary["final"]["params_nonzero"] == masks_lib.total_counts(want["masks"])["nonzero"]
  with pytest.raises(UserError, match="neither a weights file nor a workdir"):
    pipeline.run(config.replace(init_checkpoint=str(tmp_path / "nowhere")), str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
