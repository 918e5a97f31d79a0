"""lwc.averaging (--average_decay) and --label_smoothing: the moving average against its
definition, the iterates untouched by it, pruned weights exactly 0.0 in the average, and both
flags through the pipeline (the checkpoint holds the average; a kill -9 mid-retraining resumes
to the same bits)."""

import doctest
import json
import signal

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwc import averaging
from lwc import batchnorm
from lwc import network as network_lib
from lwc import optim
from lwc import pipeline
from lwc import train
from lwc.errors import UserError
from test_train import assert_pruned_zero, fake_data, pruned_state


def test_docstring_examples():
  assert doctest.testmod(averaging, raise_on_error=True).attempted >= 4


def test_average_follows_its_definition_and_leaves_the_iterates_alone(make_params):
  plain = pruned_state(make_params)
  tx = averaging.moving_average(plain.tx, decay=0.9)
  state = train.TrainState.create(plain.apply_fn, plain.params, plain.masks, tx)
  images, labels = fake_data(400)
  step = jax.jit(train.train_steps)
  want = jax.tree.map(lambda p: np.asarray(p, np.float64), plain.params)
  for t in range(20):
    batches = np.random.default_rng(t).permutation(400)[:40].astype(np.int32).reshape(1, 40)
    rng = jax.random.PRNGKey(t)
    plain, _ = step(plain, images, labels, batches, rng)
    state, _ = step(state, images, labels, batches, rng)
    # The wrapper passes the updates through: the iterates are the unwrapped ones, bit for bit.
    chex.assert_trees_all_equal(state.params, plain.params)
    d = min(0.9, (1 + t) / (10 + t))
    want = jax.tree.map(lambda a, p: d * a + (1 - d) * np.asarray(p, np.float64), want,
                        plain.params)
  got = averaging.averaged(state.opt_state)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-7),
               got, want)
  assert_pruned_zero(got, state.masks)
  assert int(state.opt_state.count) == 20
  # The average is not the last iterate.
  assert not np.array_equal(np.asarray(got["fc1"]["kernel"]),
                            np.asarray(state.params["fc1"]["kernel"]))


def test_pruned_entries_of_the_average_are_exactly_zero_after_a_cut(make_params):
  """Momentum carried over a cut moves nothing: the average starts at the pruned network and
  every iterate is 0.0 where the mask is False."""
  state = pruned_state(make_params)
  images, labels = fake_data(200)
  batches = np.arange(200, dtype=np.int32).reshape(5, 40)
  state, _ = jax.jit(train.train_steps)(state, images, labels, batches, jax.random.PRNGKey(0))
  from lwc import masks as masks_lib
  params, masks = masks_lib.prune(state.params, state.masks, 1.0)
  tx = averaging.moving_average(optim.masked(optax.sgd(0.05, momentum=0.9), "l2", 5e-4), 0.99)
  state = train.TrainState.create(state.apply_fn, params, masks, tx)
  state, _ = jax.jit(train.train_steps)(state, images, labels, batches, jax.random.PRNGKey(1))
  average = averaging.averaged(state.opt_state)
  for a, m in zip(jax.tree.leaves(average), jax.tree.leaves(masks)):
    assert np.all(np.asarray(a)[~np.asarray(m)] == 0.0)
    assert np.any(np.asarray(a)[np.asarray(m)] != 0.0)


def test_bad_settings_are_refused():
  with pytest.raises(UserError, match=r"averaging decay must be in \(0, 1\), got 1.0"):
    averaging.moving_average(optax.sgd(0.1), 1.0)
  with pytest.raises(UserError, match=r"holds no moving average"):
    averaging.averaged(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
  with pytest.raises(UserError, match=r"average_decay must be in \[0, 1\)"):
    pipeline.Config(average_decay=1.0).validate()
  with pytest.raises(UserError, match=r"label_smoothing must be in \[0, 1\)"):
    pipeline.Config(label_smoothing=-0.1).validate()
  with pytest.raises(UserError, match=r"retrain_label_smoothing must be in \[-1, 1\)"):
    pipeline.Config(retrain_label_smoothing=-2.0).validate()


def test_smoothed_cross_entropy_against_its_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  labels = rng.integers(0, 10, 6).astype(np.int32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.full((6, 10), 0.1 / 10)
  targets[np.arange(6), labels] += 0.9
  want = -(targets * log_p).sum(-1).mean()
  got = train.smoothed_cross_entropy(0.1)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert train.smoothed_cross_entropy(0.0) is train.cross_entropy


# 2,000 MNIST images less a validation split of 200: 18 steps an epoch at batch 100. Dense
# training is steps 1-36, iteration 1 retrains 37-72, iteration 2 73-108.
FLAGS = ["--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
         "--iterations=2", "--quality=0.8", "--layer_quality=fc3=0.4", "--tensorboard=false",
         "--steps_per_call=6", "--checkpoint_every_steps=12", "--log_every_seconds=0",
         "--average_decay=0.95", "--label_smoothing=0.1"]


def _config(data_dir, **changes):
  settings = dict(model="lenet_300_100", data_dir=data_dir, batch_size=100, learning_rate=0.05,
                  dense_epochs=2, retrain_epochs=2, iterations=2, qualities=(0.8,),
                  layer_qualities={"fc3": (0.4,)}, average_decay=0.95, label_smoothing=0.1)
  return pipeline.Config(**{**settings, **changes})


def test_pipeline_hands_on_the_average_and_resumes_after_kill_to_the_same_bits(
    small_mnist_dir, tmp_path):
  reference = str(tmp_path / "reference")
  proc = conftest.lenet_cli(reference, small_mnist_dir, FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("iteration 2: the moving average of the phase's iterates (decay 0.95) replaces its "
          "last iterate") in proc.stderr
  config = _config(small_mnist_dir)
  for iteration in (0, 1, 2):
    saved = pipeline.restore_iteration(reference, config, iteration=iteration)
    # The checkpoint's network is the average its optimiser state holds, with the same masks.
    chex.assert_trees_all_equal(saved["params"], averaging.averaged(saved["opt_state"]))
    assert_pruned_zero(saved["params"], saved["masks"])
  with open(f"{reference}/summary.json") as f:
    rows = json.load(f)["iterations"]
  for row in rows:
    assert row["average"]["decay"] == 0.95
    assert set(row["average"]) == {"decay", "validation_error_last_iterate",
                                   "test_error_last_iterate"}
  # Killed in iteration 2's retraining (after its progress checkpoint at step 84), resumed.
  workdir = str(tmp_path / "w")
  killed = conftest.lenet_cli(workdir, small_mnist_dir, FLAGS, fault="step:90")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = conftest.lenet_cli(workdir, small_mnist_dir, FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(iteration 2 retrain" in resumed.stderr
  conftest.assert_same_run(workdir, reference, config)


def test_label_smoothing_changes_training_and_not_evaluation(small_mnist_dir, tmp_path):
  """--label_smoothing trains other weights in every phase, --retrain_label_smoothing only in
  retraining; the reported cross-entropy is the true labels' (an independent evaluation of the
  checkpoint agrees)."""
  config = pipeline.Config(model="lenet_300_100", data_dir=small_mnist_dir, batch_size=80,
                           learning_rate=0.05, dense_epochs=1, retrain_epochs=1, iterations=1,
                           qualities=(0.8,), tensorboard=False)
  settings = {"plain": {}, "all": {"label_smoothing": 0.2},
              "retrain": {"retrain_label_smoothing": 0.2}}
  runs = {k: pipeline.run(config.replace(**v), str(tmp_path / k)) for k, v in settings.items()}
  kernel = lambda k, i: np.asarray(pipeline.restore_iteration(
      str(tmp_path / k), iteration=i)["params"]["fc1"]["kernel"])
  np.testing.assert_array_equal(kernel("retrain", 0), kernel("plain", 0))
  assert not np.array_equal(kernel("all", 0), kernel("plain", 0))
  assert not np.array_equal(kernel("retrain", 1), kernel("plain", 1))
  final = pipeline.restore_iteration(str(tmp_path / "all"))
  images, labels = pipeline.open_data(config, train.Parallel.over_all_devices())._eval["test"]
  model_fn = network_lib.build(final["network"], jax.random.PRNGKey(0), abstract=True).model_fn
  logits = train.predict(model_fn, final["params"], images)
  np.testing.assert_allclose(runs["all"]["final"]["test_loss"],
                             float(train.cross_entropy(logits, labels)), rtol=1e-5)


def test_retrain_average_decay_averages_retraining_only(small_mnist_dir, tmp_path):
  config = pipeline.Config(model="lenet_300_100", data_dir=small_mnist_dir, batch_size=80,
                           learning_rate=0.05, dense_epochs=1, retrain_epochs=1, iterations=1,
                           qualities=(0.8,), tensorboard=False)
  plain = pipeline.run(config, str(tmp_path / "plain"))
  averaged_run = pipeline.run(config.replace(retrain_average_decay=0.9), str(tmp_path / "avg"))
  dense, retrained = averaged_run["iterations"]
  assert "average" not in dense and retrained["average"]["decay"] == 0.9
  assert dense["validation_error"] == plain["iterations"][0]["validation_error"]
  saved = {i: pipeline.restore_iteration(str(tmp_path / "avg"), iteration=i) for i in (0, 1)}
  chex.assert_trees_all_equal(
      saved[0]["params"], pipeline.restore_iteration(str(tmp_path / "plain"), iteration=0)["params"])
  chex.assert_trees_all_equal(saved[1]["params"], averaging.averaged(saved[1]["opt_state"]))
  assert_pruned_zero(saved[1]["params"], saved[1]["masks"])


def test_averaged_batchnorm_network_gets_statistics_of_its_own(small_mnist_dir, tmp_path):
  """A BatchNorm network's running statistics belong to the last iterate, not to the average:
  they are re-estimated for the average (re-estimating them again from the saved network gives
  the saved statistics)."""
  config = pipeline.Config(model="user_models:BNNet", data_dir=small_mnist_dir, batch_size=80,
                           learning_rate=0.05, dense_epochs=1, retrain_epochs=1, iterations=1,
                           qualities=(0.7,), recalibration_batches=4, retrain_average_decay=0.9,
                           tensorboard=False)
  pipeline.run(config, str(tmp_path / "bn"))
  saved = pipeline.restore_iteration(str(tmp_path / "bn"))
  chex.assert_trees_all_equal(saved["params"], averaging.averaged(saved["opt_state"]))
  data = pipeline.open_data(config, train.Parallel.over_all_devices())
  model_fn = network_lib.build(saved["network"], jax.random.PRNGKey(0), abstract=True).model_fn
  again = batchnorm.recalibrate_batch_stats(model_fn, saved["params"], saved["model_state"],
                                            data.recalibration_batches(1, 4),
                                            jax.random.PRNGKey(0))
  chex.assert_trees_all_close(again, saved["model_state"], rtol=1e-5, atol=1e-7)
