"""lwc.optim: masked optimisers keep pruned weights at exactly 0.0; regularisers; schedules."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwc import masks as masks_lib
from lwc import optim
from lwc.errors import UserError


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"fc1": {"kernel": rng.standard_normal((8, 6)).astype(np.float32),
                  "bias": rng.standard_normal(6).astype(np.float32)},
          "fc2": {"kernel": rng.standard_normal((6, 4)).astype(np.float32),
                  "bias": rng.standard_normal(4).astype(np.float32)}}


def half_pruned_masks(params, seed=1):
  """Exactly half of every kernel pruned (random positions); biases all True."""
  rng = np.random.default_rng(seed)

  def one(path, w):
    if path[-1].key != "kernel":
      return np.ones(w.shape, bool)
    flat = np.zeros(w.size, bool)
    flat[rng.permutation(w.size)[: w.size // 2]] = True
    return flat.reshape(w.shape)

  return jax.tree_util.tree_map_with_path(one, params)


def random_grads(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(w))
                                      for k, w in zip(keys, leaves)])


@functools.partial(jax.jit, static_argnums=0)
def _step(tx, params, opt_state, masks, key):
  grads = random_grads(params, key)
  updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
  return optax.apply_updates(params, updates), opt_state


OPTIMIZERS = {
    "sgd_momentum_l2": lambda: optim.masked(optax.sgd(0.05, momentum=0.9), "l2", 5e-4),
    "adam_l1": lambda: optim.masked(optax.adam(1e-2), "l1", 1e-4),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(name):
  tx = OPTIMIZERS[name]()
  params = make_params()
  all_true = masks_lib.init_masks(params)
  opt_state = tx.init(params)
  key = jax.random.key(0)
  # Unmasked warm-up fills the momentum / Adam moments on every entry.
  for i in range(5):
    params, opt_state = _step(tx, params, opt_state, all_true, jax.random.fold_in(key, i))
  inner_stats = [np.asarray(x) for x in jax.tree.leaves(opt_state)
                 if np.ndim(x) == 2]  # the kernels' momentum / moments
  assert inner_stats and all(np.all(x != 0) for x in inner_stats)

  masks = half_pruned_masks(params)
  params = masks_lib.apply_masks(params, masks)
  at_prune = jax.tree.map(np.asarray, params)
  np_masks = jax.tree.map(np.asarray, masks)
  for i in range(50):
    params, opt_state = _step(tx, params, opt_state, masks, jax.random.fold_in(key, 100 + i))
    for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(np_masks)):
      np.testing.assert_array_equal(np.asarray(w)[~m], 0.0)
  chex.assert_tree_all_finite(params)
  for w, w0, m in zip(jax.tree.leaves(params), jax.tree.leaves(at_prune),
                      jax.tree.leaves(np_masks)):
    w = np.asarray(w)
    assert np.all(w[m] != w0[m]), "every surviving weight (and bias) must have been trained"


def test_plain_momentum_would_move_pruned_weights():
  """Control for the test above: the pre-filled momentum really does push pruned entries."""
  tx = optax.sgd(0.05, momentum=0.9)
  params = make_params()
  opt_state = tx.init(params)
  grads = random_grads(params, jax.random.key(0))
  _, opt_state = tx.update(grads, opt_state, params)
  masks = half_pruned_masks(params)
  zero_grads = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(optim._zero_pruned(zero_grads, masks), opt_state, params)
  kernel_update = np.asarray(updates["fc1"]["kernel"])
  assert np.all(kernel_update[~masks["fc1"]["kernel"]] != 0)
  # ... while the masked version of the same optimiser gives exactly zero there.
  mtx = optim.masked(optax.sgd(0.05, momentum=0.9))
  mstate = mtx.init(params)
  _, mstate = mtx.update(grads, mstate, params, masks=masks_lib.init_masks(params))
  mupdates, _ = mtx.update(zero_grads, mstate, params, masks=masks)
  np.testing.assert_array_equal(np.asarray(mupdates["fc1"]["kernel"])[~masks["fc1"]["kernel"]],
                                0.0)


def _reg_tree():
  params = {"fc": {"kernel": np.array([[0.5, -2.0, 0.0], [3.0, -0.25, 1.0]], np.float32),
                   "bias": np.array([-1.5, 0.0, 4.0], np.float32)}}
  masks = {"fc": {"kernel": np.array([[True, False, True], [False, True, True]]),
                  "bias": np.array([True, True, False])}}
  return params, masks


def test_l2_regularization_grad():
  params, masks = _reg_tree()
  g = optim.regularization_grad(params, masks, "l2", 5e-4)
  for name in ("kernel", "bias"):
    w, m, got = params["fc"][name], masks["fc"][name], np.asarray(g["fc"][name])
    np.testing.assert_allclose(got[m], 5e-4 * w[m], rtol=1e-7)
    np.testing.assert_array_equal(got[~m], 0.0)
  np.testing.assert_allclose(np.asarray(g["fc"]["kernel"]),
                             [[2.5e-4, 0.0, 0.0], [0.0, -1.25e-4, 5e-4]], rtol=1e-7)


def test_l1_regularization_grad():
  params, masks = _reg_tree()
  g = optim.regularization_grad(params, masks, "l1", 1e-4)
  np.testing.assert_allclose(np.asarray(g["fc"]["kernel"]),
                             [[1e-4, 0.0, 0.0], [0.0, -1e-4, 1e-4]], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(g["fc"]["bias"]), [-1e-4, 0.0, 0.0], rtol=1e-7)
  for name in ("kernel", "bias"):
    w, m, got = params["fc"][name], masks["fc"][name], np.asarray(g["fc"][name])
    np.testing.assert_allclose(got[m], 1e-4 * np.sign(w[m]), rtol=1e-7)
    np.testing.assert_array_equal(got[~m], 0.0)


@pytest.mark.parametrize("kind, strength", [("none", 0.1), ("l2", 0.0), ("l1", 0.0)])
def test_no_regularization_is_zero(kind, strength):
  params, masks = _reg_tree()
  g = optim.regularization_grad(params, masks, kind, strength)
  for leaf in jax.tree.leaves(g):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize("kind, strength, expected_fn", [
    ("l2", 0.1, lambda w: -0.5 * 0.1 * w),
    ("l1", 0.1, lambda w: -0.5 * 0.1 * np.sign(w)),
])
def test_masked_update_applies_regularizer_on_survivors(kind, strength, expected_fn):
  """Zero data gradient, plain SGD lr 0.5: the update is -lr * reg grad, weights and biases."""
  params, masks = _reg_tree()
  tx = optim.masked(optax.sgd(0.5), kind, strength)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params, masks=masks)
  for name in ("kernel", "bias"):
    w, m, u = params["fc"][name], masks["fc"][name], np.asarray(updates["fc"][name])
    np.testing.assert_allclose(u[m], expected_fn(w[m]), rtol=1e-6)
    np.testing.assert_array_equal(u[~m], 0.0)


def test_masked_update_needs_params():
  params, masks = _reg_tree()
  tx = optim.masked(optax.sgd(0.1))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params), None, masks=masks)


@pytest.mark.parametrize("kind, strength, message", [
    ("l3", 1e-4, "regularization must be none, l1 or l2, got 'l3'"),
    ("L2", 1e-4, "regularization must be none, l1 or l2, got 'L2'"),
    ("l2", -1e-4, "regularization strength must be >= 0, got -0.0001"),
    ("l1", float("nan"), "regularization strength must be >= 0, got nan"),
])
def test_bad_regularization_raises(kind, strength, message):
  with pytest.raises(UserError) as e:
    optim.masked(optax.sgd(0.1), kind, strength)
  assert str(e.value) == message


def test_regularization_grad_bad_kind_raises():
  params, masks = _reg_tree()
  with pytest.raises(UserError, match="regularization must be none, l1 or l2, got 'l0'"):
    optim.regularization_grad(params, masks, "l0", 0.1)


@pytest.mark.parametrize("kind, kwargs, expected", [
    ("constant", {}, {0: 0.01, 1: 0.01, 1000: 0.01, 10**6: 0.01}),
    ("inv", {}, {0: 0.01, 1000: 0.01 * 1.1 ** -0.75, 10000: 0.01 * 2.0 ** -0.75,
                 30000: 0.01 * 4.0 ** -0.75}),
    ("inv", {"gamma": 1e-3, "power": 0.5}, {0: 0.01, 3000: 0.01 * 0.5}),
    ("step", {"decay_steps": 100, "decay_factor": 0.1},
     {0: 0.01, 99: 0.01, 100: 0.001, 199: 0.001, 250: 1e-4}),
    ("step", {"decay_steps": 30, "decay_factor": 0.5}, {29: 0.01, 30: 0.005, 95: 0.00125}),
    ("cosine", {}, {0: 0.01, 250: 0.01 * 0.5 * (1 + math.cos(math.pi / 4)), 500: 0.005,
                    1000: 0.0}),
])
def test_learning_rate_schedule_values(kind, kwargs, expected):
  schedule = optim.learning_rate_schedule(kind, 0.01, 1000, **kwargs)
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-12,
                               err_msg=f"{kind} at step {step}")


@pytest.mark.parametrize("kind, base, kwargs, message", [
    ("linear", 0.1, {}, "unknown lr_schedule 'linear', expected constant, inv, step or cosine"),
    ("step", 0.1, {}, "lr_schedule=step needs lr_decay_steps > 0"),
    ("step", 0.1, {"decay_steps": -5}, "lr_schedule=step needs lr_decay_steps > 0"),
    ("constant", 0.0, {}, "learning rate must be > 0, got 0.0"),
    ("inv", -0.1, {}, "learning rate must be > 0, got -0.1"),
])
def test_learning_rate_schedule_errors(kind, base, kwargs, message):
  with pytest.raises(UserError) as e:
    optim.learning_rate_schedule(kind, base, 1000, **kwargs)
  assert str(e.value) == message


def test_make_optimizer():
  params = {"w": np.array([1.0, -2.0], np.float32)}
  g = {"w": np.array([0.5, 1.0], np.float32)}
  sgd = optim.make_optimizer("sgd", 0.1, momentum=0.9)
  state = sgd.init(params)
  u1, state = sgd.update(g, state, params)
  u2, _ = sgd.update(g, state, params)
  np.testing.assert_allclose(np.asarray(u1["w"]), [-0.05, -0.1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u2["w"]), [-0.095, -0.19], rtol=1e-6)  # momentum
  plain = optim.make_optimizer("sgd", 0.1, momentum=0.0)
  state = plain.init(params)
  _, state = plain.update(g, state, params)
  u2, _ = plain.update(g, state, params)
  np.testing.assert_allclose(np.asarray(u2["w"]), [-0.05, -0.1], rtol=1e-6)  # no momentum
  adam = optim.make_optimizer("adam", 1e-3)
  u, _ = adam.update(g, adam.init(params), params)
  np.testing.assert_allclose(np.asarray(u["w"]), [-1e-3, -1e-3], rtol=1e-4)


def test_make_optimizer_unknown_name():
  with pytest.raises(UserError) as e:
    optim.make_optimizer("rmsprop", 0.1)
  assert str(e.value) == "unknown optimizer 'rmsprop', expected sgd or adam"


def test_frozen_layers_get_exactly_zero_updates():
  params = {"a": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "b": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}
  masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  tx = optim.masked(optax.sgd(0.1, momentum=0.9), "l2", 1e-2, frozen_layers=["a"])
  state = tx.init(params)
  for i in range(5):
    grads = jax.tree.map(lambda x: jnp.full(x.shape, float(i + 1)), params)
    updates, state = tx.update(grads, state, params, masks=masks)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["a"]["kernel"], np.ones((3, 2)))
  np.testing.assert_array_equal(params["a"]["bias"], np.ones(2))
  assert np.all(params["b"]["kernel"] < 1.0)
