"""AlexNet and VGG-16: weights and FLOP per layer of the paper's Tables 4 and 5, forward, LRN.

Counts come from abstract shapes (jax.eval_shape): the 61M / 138M parameters are never built.
"""

from decimal import ROUND_HALF_UP, Decimal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import models, stats
from lwc.errors import UserError
from lwc.models import alexnet

# Exact counts at the paper's input sizes (kernel entries; FLOP = 2 * entries * output positions).
ALEXNET_WEIGHTS = {"conv1": 34_848, "conv2": 307_200, "conv3": 884_736, "conv4": 663_552,
                   "conv5": 442_368, "fc6": 37_748_736, "fc7": 16_777_216, "fc8": 4_096_000}
ALEXNET_FLOP = {"conv1": 210_830_400, "conv2": 447_897_600, "conv3": 299_040_768,
                "conv4": 224_280_576, "conv5": 149_520_384, "fc6": 75_497_472,
                "fc7": 33_554_432, "fc8": 8_192_000}
VGG_WEIGHTS = {"conv1_1": 1_728, "conv1_2": 36_864, "conv2_1": 73_728, "conv2_2": 147_456,
               "conv3_1": 294_912, "conv3_2": 589_824, "conv3_3": 589_824,
               "conv4_1": 1_179_648, "conv4_2": 2_359_296, "conv4_3": 2_359_296,
               "conv5_1": 2_359_296, "conv5_2": 2_359_296, "conv5_3": 2_359_296,
               "fc6": 102_760_448, "fc7": 16_777_216, "fc8": 4_096_000}
VGG_FLOP = {"conv1_1": 173_408_256, "conv1_2": 3_699_376_128, "conv2_1": 1_849_688_064,
            "conv2_2": 3_699_376_128, "conv3_1": 1_849_688_064, "conv3_2": 3_699_376_128,
            "conv3_3": 3_699_376_128, "conv4_1": 1_849_688_064, "conv4_2": 3_699_376_128,
            "conv4_3": 3_699_376_128, "conv5_1": 924_844_032, "conv5_2": 924_844_032,
            "conv5_3": 924_844_032, "fc6": 205_520_896, "fc7": 33_554_432, "fc8": 8_192_000}

# The paper's figures, as printed (Table 4 names fc6..fc8 fc1..fc3).
TABLE4_WEIGHTS = dict(zip(ALEXNET_WEIGHTS, ("35K", "307K", "885K", "663K", "442K", "38M", "17M",
                                            "4M")))
TABLE4_FLOP = dict(zip(ALEXNET_FLOP, ("211M", "448M", "299M", "224M", "150M", "75M", "34M",
                                      "8M")))
TABLE5_WEIGHTS = dict(zip(VGG_WEIGHTS, ("2K", "37K", "74K", "148K", "295K", "590K", "590K", "1M",
                                        "2M", "2M", "2M", "2M", "2M", "103M", "17M", "4M")))
TABLE5_FLOP = dict(zip(VGG_FLOP, ("0.2B", "3.7B", "1.8B", "3.7B", "1.8B", "3.7B", "3.7B", "1.8B",
                                  "3.7B", "3.7B", "925M", "925M", "925M", "206M", "34M", "8M")))

CASES = {"alexnet": (227, ALEXNET_WEIGHTS, ALEXNET_FLOP, TABLE4_WEIGHTS, TABLE4_FLOP),
         "vgg16": (224, VGG_WEIGHTS, VGG_FLOP, TABLE5_WEIGHTS, TABLE5_FLOP)}


def rounds_to(value: int, figure: str) -> bool:
  """Whether `value` printed at the precision of `figure` ('35K', '0.2B') is `figure` (half up)."""
  scale = {"K": 10**3, "M": 10**6, "B": 10**9}[figure[-1]]
  printed = Decimal(figure[:-1])
  return (Decimal(value) / scale).quantize(printed, rounding=ROUND_HALF_UP) == printed


def within_one_unit(value: int, figure: str) -> bool:
  """Whether `value` is within one unit of `figure`'s last printed digit (664K vs '663K')."""
  scale = {"K": 10**3, "M": 10**6, "B": 10**9}[figure[-1]]
  printed = Decimal(figure[:-1])
  unit = Decimal(1).scaleb(printed.as_tuple().exponent)
  return abs(Decimal(value) / scale - printed) <= unit


# The figures that the exact counts do not round to, one unit off in their last digit: Table 4
# prints conv4's 663,552 weights as 663K (664K rounded), Table 5 conv2_2's 147,456 as 148K
# (147K rounded; 147.5K rounded twice) and Table 4 the total 1,448,813,632 FLOP as 1.5B (1.4B
# rounded; 1.45B rounded twice). Every other figure is the exact count rounded half up.
OFF_BY_ONE = {("alexnet", "conv4", "weights"), ("vgg16", "conv2_2", "weights"),
              ("alexnet", "total", "flop")}


def matches_paper(model: str, layer: str, kind: str, value: int, figure: str) -> bool:
  if (model, layer, kind) in OFF_BY_ONE:
    return not rounds_to(value, figure) and within_one_unit(value, figure)
  return rounds_to(value, figure)


def test_rounds_to():
  assert rounds_to(34_848, "35K") and rounds_to(173_408_256, "0.2B")
  assert not rounds_to(34_400, "35K") and not rounds_to(1_448_813_632, "1.5B")
  assert within_one_unit(663_552, "663K") and not within_one_unit(661_900, "663K")
  assert within_one_unit(1_448_813_632, "1.5B") and not within_one_unit(1_390_000_000, "1.5B")


def _abstract_params(name: str, size: int):
  model = models.get_model(name)
  example = jnp.zeros((1, size, size, 3), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), example)["params"], example


@pytest.mark.parametrize("name", sorted(CASES))
def test_counts_match_paper_tables(name):
  size, weights, flop, paper_weights, paper_flop = CASES[name]
  model, params, example = _abstract_params(name, size)
  assert list(params) == list(weights)  # names and order as in the tables
  counts = {k: v["weights"] for k, v in masks_lib.layer_counts(masks_lib.init_masks(params)).items()}
  assert counts == weights
  assert stats.layer_flops(model.apply, params, example) == flop
  for layer in weights:
    assert matches_paper(name, layer, "weights", weights[layer], paper_weights[layer]), layer
    assert matches_paper(name, layer, "flop", flop[layer], paper_flop[layer]), layer
  groups = masks_lib.layer_groups(params)
  assert groups["fc"] == ["fc6", "fc7", "fc8"]
  assert groups["conv"] == [k for k in weights if k.startswith("conv")]


def test_totals_match_paper_tables():
  assert sum(ALEXNET_WEIGHTS.values()) == 60_954_656
  assert matches_paper("alexnet", "total", "weights", 60_954_656, "61M")
  assert rounds_to(60_954_656, "61.0M")  # Table 6's baseline
  assert sum(ALEXNET_FLOP.values()) == 1_448_813_632
  assert matches_paper("alexnet", "total", "flop", 1_448_813_632, "1.5B")
  assert rounds_to(1_448_813_632, "1.45B")
  assert sum(VGG_WEIGHTS.values()) == 138_344_128
  assert matches_paper("vgg16", "total", "weights", 138_344_128, "138M")
  assert sum(VGG_FLOP.values()) == 30_940_528_640
  assert matches_paper("vgg16", "total", "flop", 30_940_528_640, "30.9B")


def test_kernel_shapes_of_grouped_convolutions():
  _, params, _ = _abstract_params("alexnet", 227)
  shapes = {k: tuple(v["kernel"].shape) for k, v in params.items()}
  assert shapes == {"conv1": (11, 11, 3, 96), "conv2": (5, 5, 48, 256),
                    "conv3": (3, 3, 256, 384), "conv4": (3, 3, 192, 384),
                    "conv5": (3, 3, 192, 256), "fc6": (9216, 4096), "fc7": (4096, 4096),
                    "fc8": (4096, 1000)}


@pytest.mark.parametrize("name,size,fc6_inputs", [("alexnet", 67, 256), ("alexnet", 99, 1024),
                                                  ("vgg16", 32, 512), ("vgg16", 64, 2048)])
def test_small_inputs_set_fc6_size(name, size, fc6_inputs):
  _, params, _ = _abstract_params(name, size)
  assert params["fc6"]["kernel"].shape == (fc6_inputs, 4096)


@pytest.mark.parametrize("name,size", [("alexnet", 66), ("vgg16", 31)])
def test_too_small_input_is_refused(name, size):
  with pytest.raises(UserError, match="at least"):
    _abstract_params(name, size)


def _numpy_params(shapes, seed: int = 0):
  """LeCun-normal kernels and small biases drawn with NumPy (no compiled initialisers)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1].key == "bias":
      return (0.01 * rng.standard_normal(s.shape)).astype(np.float32)
    return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name,size", [("alexnet", 67), ("vgg16", 32)])
def test_forward_and_gradient_are_finite(name, size):
  model, shapes, _ = _abstract_params(name, size)
  params = _numpy_params(shapes)
  images = np.random.default_rng(1).random((2, size, size, 3), np.float32)
  labels = jnp.array([3, 997])
  logits = jax.jit(model.apply)({"params": params}, images)
  chex.assert_shape(logits, (2, 1000))
  chex.assert_tree_all_finite(logits)

  @jax.jit
  def grad(p):
    def loss(p):
      out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(2)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1))
    return jax.value_and_grad(loss)(p)

  value, grads = grad(params)
  chex.assert_tree_all_finite((value, grads))
  chex.assert_trees_all_equal_shapes(grads, params)
  assert float(jnp.abs(grads["conv1" if name == "alexnet" else "conv1_1"]["kernel"]).sum()) > 0


def _lrn_loop(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
  """Caffe's formula, one output entry at a time."""
  out = np.empty_like(x, dtype=np.float64)
  channels = x.shape[-1]
  for index in np.ndindex(x.shape[:-1]):
    for c in range(channels):
      lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
      total = sum(float(x[index + (j,)]) ** 2 for j in range(lo, hi + 1))
      out[index + (c,)] = x[index + (c,)] / (k + alpha / size * total) ** beta
  return out


@pytest.mark.parametrize("size,alpha", [(5, 1e-4), (3, 0.5)])
def test_lrn_matches_caffe_formula(size, alpha):
  # Values of order 10-100 so that the normalisation is far from the identity.
  x = (50 * np.random.default_rng(0).standard_normal((2, 3, 2, 7))).astype(np.float32)
  got = alexnet.local_response_norm(jnp.asarray(x), size=size, alpha=alpha)
  expected = _lrn_loop(x, size=size, alpha=alpha)
  assert not np.allclose(expected, x, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
