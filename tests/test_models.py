"""LeNet-300-100 and LeNet-5: weight counts of the paper's Tables 2 and 3, shapes, pooling."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import models
from lwc.errors import UserError
from lwc.models import lenet

# Han et al. 2015, Table 2 (LeNet-300-100) and Table 3 (LeNet-5): weights per layer, no biases.
PAPER_COUNTS = {
    "lenet_300_100": {"fc1": 235_200, "fc2": 30_000, "fc3": 1_000},
    "lenet5": {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000},
}
PAPER_TOTALS = {"lenet_300_100": 266_200, "lenet5": 430_500}
KERNEL_SHAPES = {
    "lenet_300_100": {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)},
    "lenet5": {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500),
               "fc2": (500, 10)},
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_kernel_counts_match_paper_tables(name):
  model = models.get_model(name)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
  assert list(params) == list(PAPER_COUNTS[name])  # layer names and order as in the tables
  counts = {layer: int(np.prod(params[layer]["kernel"].shape)) for layer in params}
  assert counts == PAPER_COUNTS[name]
  assert sum(counts.values()) == PAPER_TOTALS[name]
  shapes = {layer: tuple(params[layer]["kernel"].shape) for layer in params}
  assert shapes == KERNEL_SHAPES[name]
  # The masks module counts the same numbers (kernels only; biases are not prunable).
  per_layer = masks_lib.layer_counts(masks_lib.init_masks(params))
  assert {k: v["weights"] for k, v in per_layer.items()} == PAPER_COUNTS[name]
  totals = masks_lib.total_counts(masks_lib.init_masks(params))
  assert totals["weights"] == PAPER_TOTALS[name]
  assert totals["nonzero"] == PAPER_TOTALS[name]
  assert totals["compression"] == 1.0


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_output_shape(make_params, name):
  model, params = make_params(name)
  x = np.random.default_rng(1).random((3, 28, 28, 1), np.float32)
  apply = jax.jit(model.apply, static_argnames="train")
  for train in (False, True):
    logits = apply({"params": params}, x, train=train)
    chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
  # Examples are independent: one image alone gives the same logits as inside the batch.
  single = apply({"params": params}, x[1:2])
  chex.assert_trees_all_close(single[0], logits[1], rtol=1e-5, atol=1e-6)


def test_get_model_classes():
  assert isinstance(models.get_model("lenet_300_100"), lenet.LeNet300100)
  assert isinstance(models.get_model("lenet5"), lenet.LeNet5)


def test_unknown_model_lists_known_names():
  with pytest.raises(UserError) as e:
    models.get_model("resnet50")
  assert str(e.value) == ("unknown model 'resnet50', expected one of: "
                          + ", ".join(sorted(models.MODELS)))
  assert {"lenet5", "lenet_300_100"} <= set(models.MODELS)


@jax.jit
def _both_pools(x, cot):
  """(ours, flax's, grad of <ours, cot>, grad of <flax's, cot>) in one compiled call."""
  ours = lambda v: lenet.max_pool_2x2(v)  # noqa: E731
  ref = lambda v: nn.max_pool(v, window_shape=(2, 2), strides=(2, 2))  # noqa: E731
  g_ours = jax.grad(lambda v: jnp.sum(ours(v) * cot))(x)
  g_ref = jax.grad(lambda v: jnp.sum(ref(v) * cot))(x)
  return ours(x), ref(x), g_ours, g_ref


@pytest.mark.parametrize("shape", [(2, 24, 24, 20), (3, 8, 8, 50)])
def test_max_pool_2x2_equals_flax_max_pool(shape):
  rng = np.random.default_rng(2)
  x = (rng.standard_normal(shape) * 3.0 - 1.0).astype(np.float32)  # many negative values too
  out_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  cot = rng.standard_normal(out_shape).astype(np.float32)
  ours, ref, g_ours, g_ref = _both_pools(x, cot)
  chex.assert_shape(ours, out_shape)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  # And a hand-written reference: max over each 2x2 window.
  np.testing.assert_array_equal(
      np.asarray(ours),
      x.reshape(shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3]).max(axis=(2, 4)))
  # Gradients route to the same argmax entry (continuous random input: no ties).
  np.testing.assert_array_equal(np.asarray(g_ours), np.asarray(g_ref))


def test_conv_valid_matches_lax_values_and_gradients():
  """lenet.conv_valid (hand-written backward) = lax.conv_general_dilated, also inside lax.scan."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 12, 12, 20)).astype(np.float32)
  k = rng.standard_normal((5, 5, 20, 50)).astype(np.float32)
  cot = rng.standard_normal((4, 8, 8, 50)).astype(np.float32)

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.jit
  def both(x, k, cot):
    y_ref, vjp_ref = jax.vjp(ref, x, k)
    y, vjp = jax.vjp(lenet.conv_valid, x, k)
    return (y_ref, *vjp_ref(cot)), (y, *vjp(cot))

  for want, got in zip(*both(x, k, cot)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)

  @jax.jit
  def scanned_grads(x, k):  # a loop body is where XLA:CPU treats backward convolutions apart
    def body(k, _):
      return k, jax.grad(lambda k: jnp.sum(lenet.conv_valid(x, k) * cot))(k)
    return jax.lax.scan(body, k, None, length=2)[1][0]

  want = jax.grad(lambda k: jnp.sum(ref(x, k) * cot))(k)
  np.testing.assert_allclose(np.asarray(scanned_grads(x, k)), np.asarray(want), rtol=1e-5,
                             atol=1e-4)
