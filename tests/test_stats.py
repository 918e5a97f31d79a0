"""FLOP, Act%, Weights% and FLOP% arithmetic: the paper's dense columns and a hand-checked net."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import stats


@pytest.mark.parametrize("name,weights,flop", [
    ("lenet_300_100", {"fc1": 235_200, "fc2": 30_000, "fc3": 1_000},
     {"fc1": 470_400, "fc2": 60_000, "fc3": 2_000}),
    ("lenet5", {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000},
     {"conv1": 576_000, "conv2": 3_200_000, "fc1": 800_000, "fc2": 10_000}),
])
def test_dense_columns_match_tables_2_and_3(name, weights, flop, make_params):
  model, params = make_params(name)
  images = jnp.asarray(np.random.default_rng(0).random((16, 28, 28, 1), np.float32))
  table = stats.layer_table(model.apply, params, masks_lib.init_masks(params), images)
  assert {k: r["weights"] for k, r in table.items() if k != "total"} == weights
  assert {k: r["flop"] for k, r in table.items() if k != "total"} == flop
  assert table["total"]["weights"] == sum(weights.values())
  assert table["total"]["flop"] == sum(flop.values())  # 532K and 4,586K as in the paper
  assert all(r["weights_frac"] == 1.0 for r in table.values())


class Tiny(nn.Module):
  """2 -> 2 (ReLU) -> 1, by hand."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(2, name="a")(x.reshape(x.shape[0], -1)))
    return nn.Dense(1, name="b")(x)


def test_hand_checked_tiny_net():
  params = {"a": {"kernel": jnp.array([[1.0, 0.0], [0.0, -1.0]]), "bias": jnp.zeros(2)},
            "b": {"kernel": jnp.array([[2.0], [3.0]]), "bias": jnp.zeros(1)}}
  masks = masks_lib.init_masks(params)
  masks["a"]["kernel"] = jnp.array([[True, False], [False, True]])  # a: 2 of 4 weights survive
  # Inputs (1, 1), (1, -1), (-1, 1), (2, -2): hidden = relu(x0, -x1) -> nonzero 1+2+0+2 = 5 of 8.
  x = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [2.0, -2.0]]).reshape(4, 2, 1, 1)
  table = stats.layer_table(Tiny().apply, params, masks, x)
  assert table["a"]["flop"] == 2 * 4 and table["b"]["flop"] == 2 * 2
  assert table["a"]["act"] == pytest.approx(5 / 8)
  assert table["b"]["act"] == 1.0
  assert table["a"]["weights_frac"] == 0.5 and table["b"]["weights_frac"] == 1.0
  assert table["a"]["flop_frac"] == 0.5             # first layer: input counted as dense
  assert table["b"]["flop_frac"] == pytest.approx(5 / 8)  # 100% weights x 62.5% input
  assert table["total"]["flop_frac"] == pytest.approx((8 * 0.5 + 4 * 5 / 8) / 12)
  assert table["total"]["weights_frac"] == pytest.approx(4 / 6)


def test_markdown_layout():
  table = {"fc1": {"weights": 235_200, "flop": 470_400, "act": 0.38, "weights_frac": 0.08,
                   "flop_frac": 0.08, "nonzero": 18_816}}
  assert stats.markdown(table).splitlines()[2] == "| fc1 | 235K | 470K | 38% | 8.0% | 8.0% |"
