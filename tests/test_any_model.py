"""The library on the models researchers have: Linen and NNX BatchNorm CNNs, a residual block and
a transformer block (tests/model_zoo.py). What is prunable, exact zeros through both optimiser
APIs and through flax's and NNX's own loops, model state carried, BatchNorm re-estimation."""

import chex
from flax import nnx
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lwc
from lwc import batchnorm
from lwc import layers
from lwc.errors import UserError
import model_zoo

OPTIMISERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_weight_decay": lambda: optax.chain(optax.add_decayed_weights(1e-2),
                                            optax.sgd(0.05, momentum=0.9)),
}


def assert_pruned_zero(params, masks):
  """Every entry whose mask is False is exactly 0.0; returns how many there are."""
  count = 0
  for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    w, m = np.asarray(w), np.asarray(m)
    assert w.shape == m.shape
    assert np.all(w[~m] == 0.0)
    count += int((~m).sum())
  return count


# --- what is prunable ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(model_zoo.CASES))
def test_groups_of_every_zoo_model(name):
  case = model_zoo.CASES[name]()
  groups = lwc.layer_groups(case.params)
  assert {k: groups[k] for k in case.groups} == case.groups
  assert sorted(groups["all"]) == sorted(sum(case.groups.values(), []))
  # Biases (2-D for DenseGeneral), norm scales and statistics are never prunable.
  for path, _ in layers.prunable_leaves(case.params).values():
    assert layers.leaf_name(path) in ("kernel", "embedding")


def test_nnx_module_and_its_state_name_the_same_layers():
  module = model_zoo.NNXBNCNN(rngs=nnx.Rngs(0))
  state = nnx.state(module, nnx.Param)
  assert lwc.prunable_layers(module) == lwc.prunable_layers(state) == \
      lwc.prunable_layers(nnx.as_pure(state)) == ["conv1", "conv2", "head"]
  counts = lwc.total_counts(lwc.init_masks(state))
  assert counts["weights"] == 3 * 3 * 1 * 8 + 3 * 3 * 8 * 16 + 16 * 10
  assert counts["compression"] == 1.0


def test_selection_include_exclude_and_user_groups():
  case = model_zoo.make_transformer()
  only_attention = lwc.Selection(include=r"^attention/")
  assert lwc.prunable_layers(case.params, only_attention) == [
      "attention/key", "attention/out", "attention/query", "attention/value"]
  no_embed = lwc.Selection(exclude=r"embed|head")
  assert lwc.prunable_layers(case.params, no_embed) == [
      "attention/key", "attention/out", "attention/query", "attention/value", "mlp_in",
      "mlp_out"]
  mlp = lwc.Selection(groups={"mlp": r"^mlp_"})
  assert lwc.layer_groups(case.params, mlp)["mlp"] == ["mlp_in", "mlp_out"]
  # Pruning with a selection leaves the other layers' masks all True.
  params, masks = lwc.prune(case.params, lwc.init_masks(case.params), 1.0,
                            is_prunable=only_attention)
  counts = lwc.layer_counts(masks)
  assert counts["embed"]["density"] == 1.0 and counts["mlp_in"]["density"] == 1.0
  assert counts["attention/query"]["density"] < 0.9


def test_nothing_prunable_is_an_error_that_says_why():
  tree = {"norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
  for call in (lambda: lwc.prune(tree, lwc.init_masks(tree), 0.5),
               lambda: lwc.total_counts(lwc.init_masks(tree))):
    with pytest.raises(UserError, match=r"nothing to prune: no leaf of this tree is prunable.*"
                                        r"norm/scale \(4,\)"):
      call()
  with pytest.raises(UserError, match="nothing to prune"):
    lwc.prune(model_zoo.make_linen_bn_cnn().params, lwc.init_masks(
        model_zoo.make_linen_bn_cnn().params), 0.5, is_prunable=lwc.Selection(include="nope"))
  with pytest.raises(UserError, match="include pattern '\\(' is not a regular expression"):
    lwc.Selection(include="(")
  with pytest.raises(UserError, match="group name 'fc' is taken"):
    lwc.Selection(groups={"fc": "x"})


# --- exact zeros, masks in the optimiser state --------------------------------------------------

def _loss(model_fn, params, state, x, y):
  outputs, new_state = model_fn(params, state, x, train=True, rng=jax.random.key(1))
  return lwc.cross_entropy(outputs, y), new_state


@pytest.mark.parametrize("opt", sorted(OPTIMISERS))
@pytest.mark.parametrize("name", ["linen_bn_cnn", "residual", "transformer"])
def test_flax_train_state_apply_gradients_keeps_zeros(name, opt):
  case = model_zoo.CASES[name]()
  state = flax_train_state.TrainState.create(
      apply_fn=case.model_fn, params=case.params, tx=lwc.prunable(OPTIMISERS[opt]()))
  for _ in range(3):  # momentum and moments build up on every weight before pruning
    grads, _ = jax.grad(lambda p: _loss(case.model_fn, p, case.model_state, case.inputs,
                                        case.labels), has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
  state = lwc.prune_train_state(state, 0.8)
  masks = lwc.get_masks(state.opt_state)
  pruned = assert_pruned_zero(state.params, masks)
  assert pruned > 0

  @jax.jit
  def step(state, model_state):
    (_, model_state), grads = jax.value_and_grad(
        lambda p: _loss(case.model_fn, p, model_state, case.inputs, case.labels),
        has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), model_state

  model_state = case.model_state
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(8):
    state, model_state = step(state, model_state)
    assert assert_pruned_zero(state.params, lwc.get_masks(state.opt_state)) == pruned
  chex.assert_trees_all_equal(lwc.get_masks(state.opt_state), masks)  # never regrow
  moved = [not np.array_equal(a, np.asarray(b))
           for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
  assert all(moved)  # survivors keep training


@pytest.mark.parametrize("opt", sorted(OPTIMISERS))
def test_nnx_optimizer_update_keeps_zeros(opt):
  model = model_zoo.NNXBNCNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, lwc.prunable(OPTIMISERS[opt]()), wrt=nnx.Param)
  x, y = model_zoo._images(0)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: lwc.cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)

  model.train()
  for _ in range(3):
    step(model, optimizer)
  masks = lwc.prune_nnx(model, optimizer, 0.8)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  pruned = assert_pruned_zero(params, masks)
  assert pruned > 0
  stats_before = np.asarray(model.bn1.mean[...])
  for _ in range(8):
    step(model, optimizer)
    assert assert_pruned_zero(nnx.as_pure(nnx.state(model, nnx.Param)),
                              lwc.get_masks(optimizer)) == pruned
  chex.assert_trees_all_equal(lwc.get_masks(optimizer), masks)
  assert not np.array_equal(stats_before, np.asarray(model.bn1.mean[...]))  # BN state trained


def test_set_masks_checks_structure_and_finds_the_state():
  params = model_zoo.make_linen_bn_cnn().params
  opt_state = lwc.prunable(optax.sgd(0.1)).init(params)
  with pytest.raises(UserError, match="masks do not match the optimiser's"):
    lwc.set_masks(opt_state, {"head": {"kernel": jnp.ones((16, 10), bool)}})
  with pytest.raises(UserError, match=r"expected one lwc.prunable\(...\) state.*found 0"):
    lwc.get_masks(optax.sgd(0.1).init(params))
  # Nested in a chain, the held masks are found and replaced.
  chained = optax.chain(optax.clip_by_global_norm(1.0), lwc.prunable(optax.sgd(0.1)))
  state = chained.init(params)
  _, masks = lwc.prune(params, lwc.get_masks(state), 1.0)
  chex.assert_trees_all_equal(lwc.get_masks(lwc.set_masks(state, masks)), masks)


# --- explicit masks, model state, any loss ------------------------------------------------------

@pytest.mark.parametrize("name", ["linen_bn_cnn", "nnx_bn_cnn"])
def test_lwc_train_state_carries_batch_stats(name):
  case = model_zoo.CASES[name]()
  params, masks = lwc.prune(case.params, lwc.init_masks(case.params), 0.7)
  tx = lwc.masked(optax.adamw(1e-2, weight_decay=0.1), regularization="l2", strength=1e-3)
  state = lwc.TrainState.create(case.model_fn, params, masks, tx, model_state=case.model_state)
  step = jax.jit(lwc.train_step)
  for i in range(6):
    state, metrics = step(state, case.inputs, case.labels, jax.random.key(i))
    assert_pruned_zero(state.params, masks)
  assert set(metrics) == {"loss", "accuracy"}
  stats = batchnorm.statistic_names(state.model_state)
  assert len(stats) == 4
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), case.model_state,
                         state.model_state)
  assert any(jax.tree.leaves(changed))
  # Evaluation reads the trained statistics: other statistics, other outputs.
  trained = lwc.predict(case.model_fn, state.params, case.inputs, state.model_state)
  initial = lwc.predict(case.model_fn, state.params, case.inputs, case.model_state)
  assert not np.allclose(trained, initial)


def test_train_step_takes_any_loss_and_output_shape():
  case = model_zoo.make_linen_bn_cnn()
  targets = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
  mse = lambda outputs, y: jnp.mean((outputs - y) ** 2)
  state = lwc.TrainState.create(case.model_fn, case.params, None,
                                lwc.prunable(optax.sgd(0.05)), model_state=case.model_state)
  state = state.replace(**{"params": lwc.prune(case.params, lwc.get_masks(state.opt_state),
                                               0.5)[0]})
  losses = []
  for i in range(5):
    state, metrics = lwc.train_step(state, case.inputs, targets, jax.random.key(i), loss_fn=mse,
                                    metrics_fn=None)
    losses.append(float(metrics["loss"]))
  assert set(metrics) == {"loss"}
  assert losses[-1] < losses[0]


# --- BatchNorm statistics re-estimated ----------------------------------------------------------

def test_recalibration_gives_the_batch_statistics_exactly():
  model = model_zoo.NNXBNCNN(rngs=nnx.Rngs(0))
  model_fn, params, model_state = lwc.nnx_model(model)
  x1, _ = model_zoo._images(1)
  x2, _ = model_zoo._images(2)
  new_state = lwc.recalibrate_batch_stats(model_fn, params, model_state, [x1, x2])
  conv1 = lambda x: np.asarray(model.conv1(x)).reshape(-1, 8)
  mean = (conv1(x1).mean(0) + conv1(x2).mean(0)) / 2
  var = (conv1(x1).var(0) + conv1(x2).var(0)) / 2
  np.testing.assert_allclose(new_state["bn1"]["mean"], mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_state["bn1"]["var"], var, rtol=1e-4, atol=1e-6)
  # Non-statistics (NNX rng streams) are returned untouched.
  chex.assert_trees_all_equal(new_state["dropout"], model_state["dropout"])


def test_recalibration_on_linen_and_without_statistics():
  case = model_zoo.make_linen_bn_cnn()
  module = case.model_fn.apply.__self__
  new_state = lwc.recalibrate_batch_stats(case.model_fn, case.params, case.model_state,
                                          [(case.inputs, case.labels)])
  _, inter = module.apply({"params": case.params, **case.model_state}, case.inputs,
                          capture_intermediates=True, mutable=["intermediates"])
  conv1 = np.asarray(inter["intermediates"]["conv1"]["__call__"][0]).reshape(-1, 8)
  np.testing.assert_allclose(new_state["batch_stats"]["bn1"]["mean"], conv1.mean(0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_state["batch_stats"]["bn1"]["var"], conv1.var(0),
                             rtol=1e-4, atol=1e-5)
  transformer = model_zoo.make_transformer()
  assert lwc.recalibrate_batch_stats(transformer.model_fn, transformer.params, {},
                                     [transformer.inputs]) == {}
  with pytest.raises(UserError, match="at least one batch"):
    lwc.recalibrate_batch_stats(case.model_fn, case.params, case.model_state, [])


def test_recalibration_refuses_a_state_that_is_not_a_running_average():
  def counting(params, state, x, *, train, rng=None):
    del rng
    new = {"mean": state["mean"] * 2.0 + 1.0} if train else state  # not m*old + (1-m)*b
    return x @ params["w"], new
  params = {"w": jnp.ones((3, 2))}
  with pytest.raises(UserError, match="mean is not an exponential running average"):
    lwc.recalibrate_batch_stats(counting, params, {"mean": jnp.zeros(2)}, [jnp.ones((4, 3))])


def test_public_surface_is_flat_documented_and_light():
  for name in lwc.__all__:
    value = getattr(lwc, name)
    assert value.__doc__, f"lwc.{name} has no docstring"
  # The entry points import lwc.errors first: that must not pull in JAX (fast flag errors).
  import subprocess
  import sys
  code = "import sys, lwc.errors; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
