"""The validation split takes every decision; the test split only reports.

* the validation split is carved from the training split (seeded by --validation_seed): train
  and validation are disjoint and together exactly the source's training examples;
* a --target_compression run (sensitivity sweeps, per-layer allocation, stop, best iteration)
  decides the same with the test labels scrambled: no decision reads the test split;
* --validation=0 is refused unless --decide_on_test, and then the summary says so;
* with --sweep_split=train the sweeps read a fixed sample of training images and never the
  validation split;
* --validation=0 --refit trains on every training image and takes no decision (anything that
  would is refused);
* --train_eval_examples reports the error on a fixed training sample and changes nothing else.
"""

import json
import os

import chex
import jax
import numpy as np
import pytest

from lwc import network as network_lib
from lwc import pipeline
from lwc import train as train_lib
from lwc.data import mnist
from lwc.errors import UserError


@pytest.fixture(scope="module")
def npz_data(small_mnist_dir, tmp_path_factory):
  """(path of an .npz of the small MNIST slice, same with scrambled test labels and images)."""
  data = mnist.load_idx(small_mnist_dir)
  root = tmp_path_factory.mktemp("npz")
  arrays = {"x_train": data.train.images, "y_train": data.train.labels,
            "x_test": data.test.images, "y_test": data.test.labels}
  clean, scrambled = str(root / "clean.npz"), str(root / "scrambled.npz")
  np.savez(clean, **arrays)
  rng = np.random.default_rng(7)
  np.savez(scrambled, **{**arrays, "y_test": rng.permutation(arrays["y_test"]),
                         "x_test": rng.permutation(arrays["x_test"])})
  return clean, scrambled


def config(data_dir, **overrides):
  base = dict(model="lenet_300_100", widths=(32, 16), dataset="slice", data_dir=data_dir,
              batch_size=40, dense_epochs=1, retrain_epochs=1, iterations=2,
              target_compression=4.0, max_error_increase=1.0, sensitivity_examples=100,
              tensorboard=False, checkpoint_every_steps=0, log_every_seconds=100.0,
              remove_dead_neurons=False)
  base.update(overrides)
  return pipeline.Config(**base)


def test_validation_carved_from_train_disjoint_and_seeded(npz_data):
  clean, _ = npz_data
  parallel = train_lib.Parallel.over_all_devices()
  with np.load(clean) as f:
    x_train = f["x_train"]
  cfg = config(clean, validation=300, validation_seed=3)
  data = pipeline.open_data(cfg, parallel)
  assert (data.num_train, data.num_validation) == (len(x_train) - 300, 300)
  train = np.asarray(data.images).reshape(data.num_train, -1)
  val = np.asarray(data._eval["validation"][0]).reshape(300, -1)
  rows = lambda a: {r.tobytes() for r in a}
  assert rows(train).isdisjoint(rows(val))
  assert rows(train) | rows(val) == rows(x_train.reshape(len(x_train), -1))
  again = pipeline.open_data(cfg, parallel)  # what a resumed run reads
  np.testing.assert_array_equal(np.asarray(again._eval["validation"][1]),
                                np.asarray(data._eval["validation"][1]))
  other = pipeline.open_data(cfg.replace(validation_seed=4), parallel)
  assert not np.array_equal(np.asarray(other._eval["validation"][0]), val.reshape(-1, 28, 28, 1))
  auto = pipeline.open_data(cfg.replace(validation=-1), parallel)
  assert auto.num_validation == len(x_train) // 10  # a tenth below 50,000 examples


def test_decisions_never_read_the_test_split(npz_data, tmp_path):
  clean, scrambled = npz_data
  a = pipeline.run(config(clean), str(tmp_path / "clean"))
  b = pipeline.run(config(scrambled), str(tmp_path / "scrambled"))
  assert a["decisions"] == b["decisions"] == "validation"
  for ha, hb in zip(a["iterations"], b["iterations"], strict=True):
    assert ha["validation_error"] == hb["validation_error"]
    assert ha["params_nonzero"] == hb["params_nonzero"]
    if ha["iteration"]:
      assert ha["allocation"]["sweep_split"] == "validation"
      assert ha["allocation"]["fractions"] == hb["allocation"]["fractions"]
      assert ha["quality"] == hb["quality"]
  assert a["target"]["best_iteration"] == b["target"]["best_iteration"]
  assert a["target"]["chosen_on"] == "validation"
  assert [h["test_error"] for h in a["iterations"]] != [h["test_error"] for h in b["iterations"]]
  chex.assert_trees_all_equal(pipeline.restore_iteration(str(tmp_path / "clean"))["masks"],
                              pipeline.restore_iteration(str(tmp_path / "scrambled"))["masks"])


def test_sweep_split_train_samples_training_images_only(npz_data):
  clean, _ = npz_data
  parallel = train_lib.Parallel.over_all_devices()
  cfg = config(clean, validation=300, sweep_split="train")
  data = pipeline.open_data(cfg, parallel)
  images, labels = data.sweep_set(100)
  chex.assert_shape(images, (100, 28, 28, 1))
  rows = lambda a: {r.tobytes() for r in np.asarray(a).reshape(len(a), -1)}
  assert rows(images) <= rows(data.images)
  assert not rows(images) & rows(data._eval["validation"][0])
  again = pipeline.open_data(cfg, parallel).sweep_set(100)  # a resumed run's sample
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(images))
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(labels))
  everything = data.sweep_set(10 ** 6)
  assert len(everything[1]) == data.num_train
  default = pipeline.open_data(cfg.replace(sweep_split="validation"), parallel).sweep_set(100)
  assert rows(default[0]) <= rows(data._eval["validation"][0])


def test_sweep_split_train_never_reads_validation_in_a_run(npz_data, tmp_path, monkeypatch):
  from lwc.data import resident

  def refuse(self, n):
    raise AssertionError("a sweep read the validation split")

  monkeypatch.setattr(resident.ResidentData, "decision_set", refuse)
  clean, _ = npz_data
  summary = pipeline.run(config(clean, sweep_split="train"), str(tmp_path / "w"))
  pruned = [h for h in summary["iterations"] if h["iteration"]]
  assert pruned and all(h["allocation"]["sweep_split"] == "train" for h in pruned)
  assert all(h["allocation"]["sweep_examples"] == 100 for h in pruned)
  assert "validation_error" in summary["final"] and summary["target"]["chosen_on"] == "validation"
  with pytest.raises(AssertionError, match="a sweep read the validation split"):
    pipeline.run(config(clean), str(tmp_path / "v"))


def test_validation_zero_needs_decide_on_test(npz_data, tmp_path):
  clean, _ = npz_data
  with pytest.raises(UserError, match="--validation=0 leaves no validation split"):
    pipeline.run(config(clean, validation=0), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  summary = pipeline.run(config(clean, validation=0, decide_on_test=True, iterations=1),
                         str(tmp_path / "t"))
  assert summary["decisions"] == "test"
  assert summary["target"]["chosen_on"] == "test"
  assert "validation_error" not in summary["final"]
  with open(tmp_path / "t" / "summary.md") as f:
    assert "TEST split" in f.read()
  with open(tmp_path / "t" / "metrics.jsonl") as f:
    assert all("validation_error" not in json.loads(line) for line in f)


def test_refit_trains_on_every_image_and_takes_no_decision(npz_data, tmp_path, monkeypatch):
  """--validation=0 --refit: all training images, no split decides, the test only reports."""
  from lwc.data import resident
  clean, scrambled = npz_data
  with np.load(clean) as f:
    num_train = len(f["y_train"])
  refit = dict(validation=0, refit=True, sweep_split="train", target_compression=8.0,
               iterations=3, max_error_increase=0.0)
  # A decision would read held-out images through decision_set: under --refit it raises.
  parallel = train_lib.Parallel.over_all_devices()
  data = pipeline.open_data(config(clean, **refit), parallel)
  assert (data.num_train, data.num_validation) == (num_train, 0)
  with pytest.raises(UserError, match="a --refit run takes no decision"):
    data.decision_set(10)
  with pytest.raises(UserError, match="that run was a --refit on every training image"):
    resident.decision_split(config(clean, **refit))  # what lwc.experiments.sensitivity sweeps
  monkeypatch.setattr(resident.ResidentData, "decision_set",
                      lambda self, n: pytest.fail("a refit read held-out images for a decision"))
  a = pipeline.run(config(clean, **refit), str(tmp_path / "clean"))
  b = pipeline.run(config(scrambled, **refit), str(tmp_path / "scrambled"))
  assert a["decisions"] == "none" and a["data"] == {"source": a["data"]["source"],
                                                    "train": num_train, "validation": 0}
  # max_error_increase=0 would stop any run that reads an error; a refit goes to the target.
  assert [h["iteration"] for h in a["iterations"]] == [0, 1, 2, 3]
  assert a["target"]["chosen_on"] == "none" and a["target"]["best_iteration"] == 3
  assert a["target"]["reached"] and a["final"]["params_nonzero"] <= a["final"]["params_total"] // 8
  assert "validation_error" not in a["final"]
  assert any("--max_error_increase: no effect with --refit" in line
             for line in a["settings_without_effect"])
  # Nothing the run did depended on the test split: scrambled test labels, same networks.
  assert [h["params_nonzero"] for h in a["iterations"]] == [h["params_nonzero"]
                                                            for h in b["iterations"]]
  assert [h["test_error"] for h in a["iterations"]] != [h["test_error"] for h in b["iterations"]]
  chex.assert_trees_all_equal(pipeline.restore_iteration(str(tmp_path / "clean"))["params"],
                              pipeline.restore_iteration(str(tmp_path / "scrambled"))["params"])
  with open(tmp_path / "clean" / "summary.md") as f:
    assert f"**Refit** on all {num_train:,} training examples" in f.read()


@pytest.mark.parametrize("overrides, message", [
    (dict(validation=300, refit=True), "--refit trains on every training image: it needs "
     "--validation=0"),
    (dict(validation=0, refit=True, decide_on_test=True), "--refit and --decide_on_test "
     "contradict each other"),
    (dict(validation=0, refit=True), "the sensitivity sweeps that share each cut among the "
     "layers would read the test split; add --sweep_split=train"),
])
def test_refit_refuses_a_run_that_would_still_decide(npz_data, tmp_path, overrides, message):
  clean, _ = npz_data
  with pytest.raises(UserError, match=message.replace("-", r"\-")):
    pipeline.run(config(clean, **overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  # a ranking allocation reads no images, so a refit may use it without --sweep_split=train
  config(clean, validation=0, refit=True, allocation="global").validate()


def test_train_eval_examples_reports_the_gap_and_decides_nothing(npz_data, tmp_path):
  """--train_eval_examples: a fixed sample of training images, evaluated and reported only."""
  clean, _ = npz_data
  parallel = train_lib.Parallel.over_all_devices()
  cfg = config(clean, validation=300, train_eval_examples=200)
  data = pipeline.open_data(cfg, parallel)
  assert data.splits == ("train_sample", "validation", "test")
  images, labels = data._eval["train_sample"]
  chex.assert_shape(images, (200, 28, 28, 1))
  rows = lambda a: {r.tobytes() for r in np.asarray(a).reshape(len(a), -1)}
  assert rows(images) <= rows(data.images)
  assert not rows(images) & rows(data._eval["validation"][0])
  again = pipeline.open_data(cfg, parallel)._eval["train_sample"]  # a resumed run's sample
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(images))
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(labels))

  with_gap = pipeline.run(cfg, str(tmp_path / "gap"))
  without = pipeline.run(cfg.replace(train_eval_examples=0), str(tmp_path / "plain"))
  for a, b in zip(with_gap["iterations"], without["iterations"], strict=True):
    assert "train_sample_error" in a and "train_sample_error" not in b
    assert (a["validation_error"], a["test_error"], a["params_nonzero"]) == (
        b["validation_error"], b["test_error"], b["params_nonzero"])
  final = pipeline.restore_iteration(str(tmp_path / "gap"))
  chex.assert_trees_all_equal(final["params"],
                              pipeline.restore_iteration(str(tmp_path / "plain"))["params"])
  model_fn = network_lib.build(final["network"], jax.random.PRNGKey(0), abstract=True).model_fn
  logits = train_lib.predict(model_fn, final["params"], images)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) != np.asarray(labels)))
  np.testing.assert_allclose(with_gap["final"]["train_sample_error"], expected, atol=1e-9)
  with open(tmp_path / "gap" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records and all("train_sample_error" in r for r in records if "test_error" in r)
  with open(tmp_path / "gap" / "summary.md") as f:
    assert "error on a fixed sample of 200 training images" in f.read()


def test_train_eval_examples_may_change_on_resume_refit_may_not():
  from lwc import resume
  saved = config("d").to_json()
  for mid_phase in (None, 2):
    resume.check_resume_settings(config("d", train_eval_examples=500), saved, "w", 1, mid_phase)
  with pytest.raises(UserError, match="--refit=false"):
    resume.check_resume_settings(config("d", validation=0, refit=True), saved, "w", 1, None)


def test_train_eval_examples_refused_for_a_streamed_dataset(tmp_path):
  cfg = pipeline.Config(dataset="imagenet2012", model="alexnet", data_dir=str(tmp_path / "none"),
                        train_eval_examples=100, batch_size=64, tensorboard=False)
  with pytest.raises(UserError, match="--train_eval_examples evaluates a sample held on the "
                     "devices: it needs an in-memory dataset, not the streamed imagenet2012"):
    pipeline.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
