"""Per-layer sensitivity sweep (Figure 6) and the qualities chosen from it."""

import csv
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import pipeline, sensitivity
from lwc import train as train_lib
from lwc.data import load_dataset
from lwc.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nn.Module):
  """8 inputs -> Dense a (6) -> ReLU -> Dense b (3)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = nn.relu(nn.Dense(6, name="a")(x.reshape((x.shape[0], -1))))
    return nn.Dense(3, name="b")(h)


def tiny_problem(n=2000):
  """Label = argmax of the first 3 inputs. Layer a carries x_i and -x_i through 6 of its 48
  weights, the other 42 are tiny noise (insensitive up to 42/48 = 87.5% pruned); layer b has only
  6 survivors (an existing mask), each needed (sensitive at once)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, 8)).astype(np.float32)
  labels = np.argmax(x[:, :3], axis=1).astype(np.int32)
  a = (1e-3 * rng.standard_normal((8, 6))).astype(np.float32)
  b = np.zeros((6, 3), np.float32)
  b_mask = np.zeros((6, 3), bool)
  for i in range(3):
    c = 1.0 + 0.01 * i
    a[i, i], a[i, i + 3] = c, -c
    b[i, i], b[i + 3, i] = c, -c
    b_mask[i, i] = b_mask[i + 3, i] = True
  params = {"a": {"kernel": a, "bias": np.zeros(6, np.float32)},
            "b": {"kernel": b, "bias": np.zeros(3, np.float32)}}
  masks = jax.tree.map(lambda w: np.ones(w.shape, bool), params)
  masks["b"]["kernel"] = b_mask
  return params, masks, x, labels


@pytest.fixture(scope="module")
def tiny_sweep():
  params, masks, x, labels = tiny_problem()
  return sensitivity.sweep(Tiny().apply, params, masks, x, labels,
                           fractions=np.linspace(0, 0.9, 10), batch_size=700)


def test_insensitive_layer_gets_the_higher_threshold(tiny_sweep):
  choice = sensitivity.choose_qualities(tiny_sweep, budget=0.01)
  assert tiny_sweep.layers["a"].removed.tolist() == [0, 5, 10, 14, 19, 24, 29, 34, 38, 43]
  assert choice.fractions == {"a": 0.8, "b": 0.0}
  assert choice.qualities["b"] == 0.0 < choice.qualities["a"]
  assert choice.densities["a"] == pytest.approx(10 / 48)
  assert choice.densities["b"] == pytest.approx(6 / 18)  # existing mask, nothing more removed
  # Pruning a alone at its chosen quality with the pipeline's own rule removes the same weights.
  params, masks, _, _ = tiny_problem()
  _, new_masks = masks_lib.prune(params, masks, choice.quality(), layers=["a"])
  assert int(np.asarray(new_masks["a"]["kernel"]).sum()) == 48 - 38
  # The most sensitive layer's first cut costs far more than the budget.
  assert tiny_sweep.layers["b"].errors[1, 0] - tiny_sweep.baseline[0] > 0.05
  a_flag = sensitivity._round_down(choice.qualities["a"])
  assert choice.flag_line() == f"--layer_quality=a={a_flag} --layer_quality=b=0"
  assert choice.layer_qualities()["a"] == (choice.qualities["a"],)


def test_budget_modes_and_bad_input(tiny_sweep):
  per_layer = sensitivity.choose_qualities(tiny_sweep, 0.02, "per_layer")
  total = sensitivity.choose_qualities(tiny_sweep, 0.02, "total")
  assert per_layer.per_layer_budget == 0.02 and total.per_layer_budget == 0.01
  assert total.total_density >= per_layer.total_density
  with pytest.raises(UserError, match="budget mode"):
    sensitivity.choose_qualities(tiny_sweep, 0.01, "both")
  with pytest.raises(UserError, match="budget must be"):
    sensitivity.choose_qualities(tiny_sweep, -1.0)
  with pytest.raises(UserError, match="points must be"):
    sensitivity.fraction_grid(1)
  assert sensitivity.fraction_grid(20, 0.95)[[0, 1, -1]].tolist() == [0.0, 0.05, 0.95]
  back = sensitivity.from_json(json.loads(json.dumps(sensitivity.to_json(tiny_sweep))))
  assert sensitivity.rows(back) == sensitivity.rows(tiny_sweep)


def random_masks(params, keep, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, w: (rng.random(w.shape) < keep) if p[-1].key == "kernel"
      else np.ones(w.shape, bool), params)


@pytest.mark.parametrize("fraction", [0.0, 0.35, 0.9, 1.0])
def test_prune_layer_removes_exactly_round_f_n(make_params, fraction):
  _, params = make_params("lenet_300_100", 0)
  masks = random_masks(params, 0.7)
  params = jax.tree.map(np.asarray, masks_lib.apply_masks(params, masks))
  new_params, new_masks = sensitivity.prune_layer(params, masks, "fc2", fraction)
  old_m, new_m = masks["fc2"]["kernel"], new_masks["fc2"]["kernel"]
  n = int(old_m.sum())
  assert int((old_m & ~new_m).sum()) == sensitivity.removed_count(fraction, n) == \
      int(np.floor(fraction * n + 0.5))
  assert not np.any(new_m & ~old_m)  # existing masks kept
  w = np.abs(params["fc2"]["kernel"])
  if 0 < fraction < 1:
    assert w[old_m & ~new_m].max() <= w[new_m].min()  # smallest |w| first
  assert np.all(new_params["fc2"]["kernel"][~new_m] == 0)
  assert np.array_equal(new_params["fc2"]["kernel"][new_m], params["fc2"]["kernel"][new_m])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(new_params)):
    if masks_lib.layer_name(path) != "fc2" or path[-1].key != "kernel":
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(masks),
                          jax.tree_util.tree_leaves(new_masks)):
    if masks_lib.layer_name(path) != "fc2" or path[-1].key != "kernel":
      assert np.array_equal(a, b)


def test_ties_still_remove_exactly_k():
  w = np.asarray([[0.5, -0.5, 0.5], [0.1, 0.5, -0.1]], np.float32)
  m = np.asarray([[True, True, True], [True, True, False]])
  ranks = sensitivity.survivor_ranks(w, m)
  assert ranks.tolist() == [[1, 2, 3], [0, 4, -1]]
  for k in range(6):
    assert int((m & (ranks >= k)).sum()) == 5 - k


@pytest.mark.parametrize("model_name,n_images", [("lenet_300_100", 1000), ("lenet5", 160)])
def test_sweep_matches_explicitly_pruned_evaluation(make_params, small_mnist_dir, model_name,
                                                    n_images):
  model, params = make_params(model_name, 3)
  masks = random_masks(params, 0.8, seed=2)
  params = jax.tree.map(np.asarray, masks_lib.apply_masks(params, masks))
  _, test = load_dataset("mnist", small_mnist_dir, False)
  images, labels = test.images[:n_images], test.labels[:n_images]
  fractions = [0.0, 0.5, 0.9]
  kwargs = {"fractions": fractions, "batch_size": 384 if n_images > 384 else 64}
  result = sensitivity.sweep(model.apply, params, masks, images, labels, **kwargs)
  uncached = sensitivity.sweep(model.apply, params, masks, images, labels, cache=False, **kwargs)
  parallel = train_lib.Parallel.over_local_devices()
  x, y = jax.numpy.asarray(images), jax.numpy.asarray(labels)
  for name, layer in result.layers.items():
    assert layer.group == ("conv" if name.startswith("conv") else "fc")
    np.testing.assert_array_equal(layer.errors, uncached.layers[name].errors)
    for i, f in enumerate(fractions):
      pruned, pruned_masks = sensitivity.prune_layer(params, masks, name, f)
      expected = parallel.evaluate(model.apply, pruned, x, y, batch_size=500)
      assert layer.errors[i, 0] == pytest.approx(expected["error"], abs=1e-9), (name, f)
      assert layer.losses[i] == pytest.approx(expected["loss"], rel=1e-5), (name, f)
      surviving = int(np.asarray(masks[name]["kernel"]).sum())
      assert layer.removed[i] == surviving - int(np.asarray(pruned_masks[name]["kernel"]).sum())
      # The reported quality reproduces the point with the pipeline's q * std rule.
      _, by_quality = masks_lib.prune(params, masks, {name: layer.qualities[i], "default": 0.0})
      assert np.array_equal(by_quality[name]["kernel"], pruned_masks[name]["kernel"])
  baseline = parallel.evaluate(model.apply, params, x, y, batch_size=500)
  assert result.baseline_loss == pytest.approx(baseline["loss"], rel=1e-5)
  # The JSON form keeps the losses; a result written without them reads back as None.
  again = sensitivity.from_json(json.loads(json.dumps(sensitivity.to_json(result))))
  for name in result.layers:
    np.testing.assert_array_equal(again.layers[name].losses, result.layers[name].losses)
  assert again.baseline_loss == result.baseline_loss
  old = sensitivity.to_json(result)
  del old["baseline_loss"]
  for layer in old["layers"].values():
    del layer["losses"]
  assert sensitivity.from_json(old).layers[name].losses is None


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "lwc.experiments.sensitivity", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.fixture(scope="module")
def trained_workdir(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sens_run"))
  pipeline.run(pipeline.Config(model="lenet_300_100", data_dir=small_mnist_dir, dense_epochs=1,
                               iterations=0, batch_size=64, tensorboard=False,
                               remove_dead_neurons=False),
               workdir)
  return workdir


def test_cli_end_to_end(trained_workdir, small_mnist_dir, tmp_path):
  out = str(tmp_path / "out")
  proc = run_cli(f"--workdir={trained_workdir}", f"--data_dir={small_mnist_dir}", "--points=5",
                 "--max_fraction=0.8", "--budget=0.01", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["sensitivity.csv", "sensitivity.json", "sensitivity.png"]
  with open(os.path.join(out, "sensitivity.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["layer"] for r in table] == ["fc1"] * 5 + ["fc2"] * 5 + ["fc3"] * 5
  assert [float(r["fraction"]) for r in table[:5]] == [0.0, 0.2, 0.4, 0.6, 0.8]
  with open(os.path.join(out, "sensitivity.json")) as f:
    saved = json.load(f)
  # The run's validation split (a tenth of the 2,000 training images), never the test set.
  assert saved["num_examples"] == 200 and set(saved["choice"]["qualities"]) == {"fc1", "fc2",
                                                                                "fc3"}
  flag_line = [line for line in proc.stdout.splitlines() if line.startswith("--layer_quality=")]
  assert len(flag_line) == 1 and flag_line[0].count("--layer_quality=") == 3
  assert "sweep: 3 layers x 5 points in" in proc.stdout


def test_cli_bad_input(trained_workdir, small_mnist_dir, tmp_path):
  proc = run_cli(f"--workdir={trained_workdir}", "--iteration=3",
                 f"--data_dir={small_mnist_dir}", f"--out={tmp_path}/o")
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "no checkpoint of iteration 3" in lines[0] and "it has 0" in lines[0]
  assert "Traceback" not in proc.stderr and not os.path.exists(f"{tmp_path}/o")
