"""lwc.admm: the projection, the ADMM recursion against a NumPy transcription, the pull that
drives exactly the weights of the next cut toward zero (pruned weights, Z and U exactly 0.0),
the next cut's keep counts, the flags, the cut that never keeps more than it should when
weights tie, and --admm_rho through the pipeline, resumed after kill -9 to the same bits."""

import doctest
import functools
import json
import os

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwc import admm
from lwc import config as config_lib
from lwc import optim
from lwc import pipeline
from lwc import schedule
from lwc import sensitivity
from lwc.errors import UserError
from test_train import assert_pruned_zero


def test_docstring_examples():
  failures, tried = doctest.testmod(admm, optionflags=doctest.NORMALIZE_WHITESPACE)[:2]
  assert tried > 0 and failures == 0


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"fc1": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
          "fc2": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                  "bias": jnp.zeros((3,), jnp.float32)}}


def _top_k(x, k):
  x = np.asarray(x, np.float64)
  kth = np.sort(np.abs(x).ravel())[x.size - k]
  return np.where(np.abs(x) >= kth, x, 0.0)


def test_projection_keeps_the_k_largest_magnitudes_of_named_layers_only():
  params = _params()
  z = admm.project(params, {"fc1": 7})
  np.testing.assert_array_equal(np.asarray(z["fc1"]["kernel"]),
                                _top_k(params["fc1"]["kernel"], 7).astype(np.float32))
  assert int((np.asarray(z["fc1"]["kernel"]) != 0).sum()) == 7
  for leaf in (z["fc1"]["bias"], z["fc2"]["kernel"], z["fc2"]["bias"]):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert int((np.asarray(admm.project(params, {"fc2": 0})["fc2"]["kernel"]) != 0).sum()) == 0
  full = admm.project(params, {"fc2": 15})["fc2"]["kernel"]
  np.testing.assert_array_equal(np.asarray(full), np.asarray(params["fc2"]["kernel"]))
  with pytest.raises(UserError, match="ADMM keep count for unknown layer.*fc9.*fc1, fc2"):
    admm.project(params, {"fc9": 1})


def test_updates_follow_the_admm_recursion():
  """chain(admm, sgd) against the recursion written out in NumPy: pull rho_k (W - Z + U), and
  Z <- top-k(W + U), U <- U + W - Z after every `every` steps, rho_k growing by `growth`."""
  params, keep, rho, every, growth, lr = _params(), {"fc1": 9}, 0.3, 2, 2.0, 0.1
  tx = optax.chain(admm.admm(keep, rho, every, growth), optax.sgd(lr))
  state = tx.init(params)
  rng = np.random.default_rng(1)
  w = np.asarray(params["fc1"]["kernel"], np.float64)
  z, u = _top_k(w, 9), np.zeros_like(w)
  for step in range(1, 8):
    grads = {k: {n: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in layer.items()}
             for k, layer in params.items()}
    updates, state = tx.update(grads, state, params)
    rho_k = rho * growth ** ((step - 1) // every)
    want = -lr * (np.asarray(grads["fc1"]["kernel"], np.float64) + rho_k * (w - z + u))
    np.testing.assert_allclose(np.asarray(updates["fc1"]["kernel"]), want, rtol=1e-5, atol=1e-6)
    for name in ("bias",):  # no pull on what `keep` does not name
      np.testing.assert_allclose(np.asarray(updates["fc1"][name]),
                                 -lr * np.asarray(grads["fc1"][name]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["fc2"]["kernel"]),
                               -lr * np.asarray(grads["fc2"]["kernel"]), rtol=1e-6)
    if step % every == 0:
      z = _top_k(w + u, 9)
      u = u + w - z
    np.testing.assert_allclose(np.asarray(state[0].z["fc1"]["kernel"]), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state[0].u["fc1"]["kernel"]), u, rtol=1e-5, atol=1e-6)
    params = optax.apply_updates(params, updates)
    w = np.asarray(params["fc1"]["kernel"], np.float64)
  assert int(state[0].count) == 7


def test_pull_alone_drives_the_next_cut_to_zero_and_keeps_pruned_weights_exactly_zero():
  """No loss at all: inside `lwc.optim.masked` the pull takes the weights the next cut removes to
  zero and leaves the ones it keeps where they were; pruned weights, and their Z and U, stay
  exactly 0.0 at every step."""
  params = _params()
  masks = {"fc1": {"kernel": jnp.asarray(np.arange(30).reshape(6, 5) % 4 != 0),
                   "bias": jnp.ones((5,), bool)},
           "fc2": {"kernel": jnp.ones((5, 3), bool), "bias": jnp.ones((3,), bool)}}
  params = jax_tree_where(masks, params)
  keep = {"fc1": 10, "fc2": 6}
  tx = optim.masked(optax.chain(admm.admm(keep, 0.5, 5), optax.sgd(0.2)))
  state = tx.init(params)
  start = params
  before = admm.residual(params, keep)
  zero = {k: {n: jnp.zeros_like(v) for n, v in layer.items()} for k, layer in params.items()}
  update = jax.jit(functools.partial(tx.update, masks=masks))
  for _ in range(300):
    updates, state = update(zero, state, params)
    params = optax.apply_updates(params, updates)
    assert_pruned_zero(params, masks)
    inner = state.inner[0]
    assert_pruned_zero(inner.z, masks)
    assert_pruned_zero(inner.u, masks)
  after = admm.residual(params, keep)
  for name in keep:
    assert before[name] > 0.2
    assert after[name] < 1e-3, after
    kept = np.asarray(admm.project(start, keep)[name]["kernel"]) != 0
    np.testing.assert_allclose(np.asarray(params[name]["kernel"])[kept],
                               np.asarray(start[name]["kernel"])[kept], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(params["fc1"]["bias"]),
                                np.asarray(start["fc1"]["bias"]))


def jax_tree_where(masks, params):
  return {k: {n: jnp.where(masks[k][n], v, 0.0) for n, v in layer.items()}
          for k, layer in params.items()}


def test_an_empty_keep_is_the_plain_optimiser_bit_for_bit():
  params, rng = _params(), np.random.default_rng(2)
  with_admm = optax.chain(admm.admm({}, 0.5, 1), optax.sgd(0.1, momentum=0.9))
  plain = optax.sgd(0.1, momentum=0.9)
  states = [with_admm.init(params), plain.init(params)]
  for _ in range(3):
    grads = {k: {n: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in layer.items()}
             for k, layer in params.items()}
    a, states[0] = with_admm.update(grads, states[0], params)
    b, states[1] = plain.update(grads, states[1], params)
    chex.assert_trees_all_equal(a, b)
    params = optax.apply_updates(params, a)


def test_admm_settings_are_checked():
  with pytest.raises(UserError, match="ADMM rho must be a finite number >= 0"):
    admm.admm({}, -1.0, 1)
  with pytest.raises(UserError, match="ADMM rho growth must be a finite number >= 1"):
    admm.admm({}, 1.0, 1, rho_growth=0.5)
  with pytest.raises(UserError, match="at least one step per update"):
    admm.admm({}, 1.0, 0)
  with pytest.raises(UserError, match="--admm_rho pulls each layer toward the next cut's keep "
                     "count, which needs --target_compression or --layer_density"):
    pipeline.Config(admm_rho=1e-3).validate()
  with pytest.raises(UserError, match="admm_updates_per_epoch must be >= 1, got 0"):
    pipeline.Config(admm_updates_per_epoch=0).validate()
  lines = config_lib.settings_without_effect(pipeline.Config(admm_rho_growth=1.5))
  assert lines == ["--admm_rho_growth: no effect without --admm_rho"]
  lines = config_lib.settings_without_effect(
      pipeline.Config(admm_rho=1e-3, target_compression=10, iterations=1))
  assert "--admm_rho: no effect with fewer than 2 iterations" in " ".join(lines)


def _masks_with(counts, sizes):
  """Masks of layers fc1.. with the first counts[i] of sizes[i] entries kept."""
  return {name: {"kernel": jnp.asarray(np.arange(size) < count).reshape(size, 1)}
          for name, count, size in zip(counts, counts.values(), sizes)}


def test_next_keep_follows_the_density_schedule_or_the_sweeps_lookahead():
  params = {"fc1": {"kernel": jnp.ones((1000, 1))}, "fc2": {"kernel": jnp.ones((100, 1))}}
  masks = {"fc1": {"kernel": jnp.asarray(np.arange(1000) < 500).reshape(1000, 1)},
           "fc2": {"kernel": jnp.asarray(np.arange(100) < 80).reshape(100, 1)}}
  density = pipeline.Config(admm_rho=1e-3, iterations=3, layer_densities={"fc1": 0.125})
  # geometric to 0.125 over 3 prunings: 0.5, 0.25, 0.125; fc2 is not listed, so never pulled.
  assert admm.next_keep(density, 1, params, masks, {}) == {"fc1": 250}
  assert admm.next_keep(density, 2, params, masks, {}) == {"fc1": 125}
  assert admm.next_keep(density, 3, params, masks, {}) == {}
  assert admm.next_keep(pipeline.Config(iterations=3, layer_densities={"fc1": 0.125}), 1,
                        params, masks, {}) == {}
  target = pipeline.Config(admm_rho=1e-3, iterations=3, target_compression=10)
  plan = {"allocation": {"next_densities": {"fc1": 0.2, "fc2": 0.5}}}
  assert admm.next_keep(target, 1, params, masks, plan) == {"fc1": 200, "fc2": 50}
  # A lookahead above a layer's survivors after this cut (its sweep saw the network before the
  # cut): that layer keeps what it has, and the rest goes to the layer with the most room, so
  # the counts still add up to the next total.
  plan = {"allocation": {"next_densities": {"fc1": 0.3, "fc2": 0.95}}}
  assert admm.next_keep(target, 1, params, masks, plan) == {"fc1": 315, "fc2": 80}
  # Without a lookahead: the next total (geometric: 580 -> 110 in 2 cuts, 252.6 kept) split as
  # this cut split its survivors (fc1 kept all, fc2 kept half), scaled to that total.
  plan = {"allocation": {"fractions": {"fc1": 0.0, "fc2": 0.5}}}
  keep = admm.next_keep(target, 1, params, masks, plan)
  assert keep == {"fc1": int(np.floor(500 * 253 / 540 + 0.5)),
                  "fc2": int(np.floor(40 * 253 / 540 + 0.5))}


def test_a_tie_at_the_cut_removes_every_tied_weight():
  values = np.asarray([0.1, 0.2, 0.2, 0.3], np.float32)
  removed = [int((values < sensitivity._equivalent_threshold(values, k)).sum()) for k in range(5)]
  assert removed == [0, 1, 3, 3, 4]


def test_a_density_cut_never_keeps_more_than_wanted_between_neighbouring_floats():
  """Survivors that differ in the last bit of a float32: the quality derived from a density,
  turned back into a float32 threshold by `masks.prune`, removes at least the wanted count."""
  from lwc import masks as masks_lib
  rng = np.random.default_rng(0)
  base = np.float32(0.0467621)
  run = [base]
  for _ in range(40):
    run.append(np.nextafter(run[-1], np.float32(1)))
  values = np.concatenate([rng.normal(0, 0.05, 400).astype(np.float32),
                           np.asarray(run, np.float32)])
  rng.shuffle(values)
  params = {"fc": {"kernel": jnp.asarray(values.reshape(-1, 1))}}
  masks = {"fc": {"kernel": jnp.ones((values.size, 1), bool)}}
  kept_on_the_run = []
  below = int((np.abs(values) < base).sum())
  for keep in range(values.size - below - 40, values.size - below + 1):
    q = schedule.qualities_for_densities(params, masks, {"fc": keep / values.size})
    _, pruned = masks_lib.prune(params, masks, q)
    kept = int(np.asarray(pruned["fc"]["kernel"]).sum())
    assert kept <= keep
    kept_on_the_run.append(keep - kept)
  assert max(kept_on_the_run) <= 2  # at most the neighbours a float32 step cannot separate


# 2,000 MNIST images less a validation split of 200: 18 steps an epoch at batch 100. Dense
# training is steps 1-36, iteration 1 retrains (with ADMM toward iteration 2's cut) 37-72.
FLAGS = ["--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
         "--iterations=2", "--target_compression=8", "--sensitivity_examples=200",
         "--tensorboard=false", "--steps_per_call=6", "--checkpoint_every_steps=12",
         "--log_every_seconds=0", "--admm_rho=0.1", "--admm_updates_per_epoch=3",
         "--admm_rho_growth=1.5", "--remove_dead_neurons=false"]


def _config(data_dir):
  return pipeline.Config(model="lenet_300_100", data_dir=data_dir, batch_size=100,
                         learning_rate=0.05, dense_epochs=2, retrain_epochs=2, iterations=2,
                         target_compression=8.0, sensitivity_examples=200, admm_rho=0.1,
                         admm_updates_per_epoch=3, admm_rho_growth=1.5)


def test_pipeline_admm_prepares_the_next_cut_and_resumes_after_kill_to_the_same_bits(
    small_mnist_dir, tmp_path):
  reference = str(tmp_path / "reference")
  proc = conftest.lenet_cli(reference, small_mnist_dir, FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Killed inside iteration 1's retraining, after its progress checkpoint at step 48: the
  # resume restores Z, U and their step count from the optimiser state.
  workdir = str(tmp_path / "w")
  killed = conftest.lenet_cli(workdir, small_mnist_dir, FLAGS, fault="step:54")
  assert killed.returncode != 0
  resumed = conftest.lenet_cli(workdir, small_mnist_dir, FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(iteration 1 retrain" in resumed.stderr
  conftest.assert_same_run(workdir, reference, _config(small_mnist_dir))
  with open(os.path.join(reference, "summary.json")) as f:
    history = json.load(f)["iterations"]
  keep = history[1]["admm_keep"]
  assert keep == {k: int(np.floor(d * history[1]["layers"][k]["weights"] + 0.5))
                  for k, d in history[1]["allocation"]["next_densities"].items()}
  # Iteration 2 cuts what iteration 1's retraining prepared, to the target's floor.
  assert history[2]["allocation"]["prepared_by_admm"]
  assert {k: v["nonzero"] for k, v in history[2]["layers"].items()} == keep
  assert sum(keep.values()) == history[2]["params_nonzero"] == 266200 // 8
  assert "prepared_by_admm" not in history[1]["allocation"]
  assert "admm_keep" not in history[2] and "admm_residual" not in history[2]
  # Iteration 1's retraining drove the weights of the next cut toward zero: their share of each
  # layer's norm fell from what it was right after iteration 1's cut.
  dense = pipeline.restore_iteration(reference, _config(small_mnist_dir), iteration=0)
  first = pipeline.restore_iteration(reference, _config(small_mnist_dir), iteration=1)
  cut = {k: {n: np.where(first["masks"][k][n], v, 0.0) for n, v in layer.items()}
         for k, layer in dense["params"].items()}
  before = admm.residual(cut, keep)
  after = history[1]["admm_residual"]
  assert after == pytest.approx(admm.residual(first["params"], keep))
  cut_layers = [name for name in keep if keep[name] < history[1]["layers"][name]["nonzero"]]
  assert cut_layers
  for name in cut_layers:
    assert after[name] < 0.85 * before[name], (name, before, after)
  assert_pruned_zero(first["params"], first["masks"])


def test_admm_in_an_nnx_optimizer_pulls_the_named_layer():
  """The transform in a user's own NNX loop (`nnx.Optimizer(model, chain(admm, sgd))`): the
  weights of fc1's next cut go to zero; with plain SGD they do not."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(20, 10, rngs=rngs)
      self.fc2 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 20)), jnp.float32)
  y = jnp.asarray(np.arange(16) % 3, jnp.int32)

  def loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  models = []
  for tx in (optax.chain(admm.admm({"fc1": 50}, 1.0, 1), optax.sgd(0.1)), optax.sgd(0.1)):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = admm.residual(nnx.state(model, nnx.Param), {"fc1": 50})
    step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss)(m)))
    for _ in range(200):
      step(model, optimizer)
    models.append(model)
  pulled, plain = (admm.residual(nnx.state(m, nnx.Param), {"fc1": 50}) for m in models)
  assert before["fc1"] > 0.3
  assert pulled["fc1"] < 0.02 and plain["fc1"] > 0.3, (pulled, plain)
