"""stats.layer_table on any Flax model: BatchNorm CNNs (Linen and NNX), a residual block, a
transformer block (attention DenseGeneral kernels, an embedding), raw and shared weights."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lwc
import model_zoo
from lwc import layers, stats

# FLOP per example by hand: 2 * kernel entries * output positions.
#   12x12 images, SAME padding: conv1 3x3x1x8 at 12*12; conv2 3x3x8x16 stride 2 at 6*6;
#   residual: stem 3x3x1x8, conv_a/conv_b 3x3x8x8, all at 12*12; transformer: 6 tokens, width 16,
#   2 heads of 8: q/k/v/out 16x2x8 = 256 entries at 6 positions, mlp 16x32 at 6, head 16x10 once.
EXPECTED_FLOP = {
    "linen_bn_cnn": {"conv1": 2 * 72 * 144, "conv2": 2 * 1152 * 36, "head": 2 * 160},
    "nnx_bn_cnn": {"conv1": 2 * 72 * 144, "conv2": 2 * 1152 * 36, "head": 2 * 160},
    "residual": {"stem": 2 * 72 * 144, "conv_a": 2 * 576 * 144, "conv_b": 2 * 576 * 144,
                 "head": 2 * 80},
    "transformer": {"embed": 0, "attention/query": 2 * 256 * 6, "attention/key": 2 * 256 * 6,
                    "attention/value": 2 * 256 * 6, "attention/out": 2 * 256 * 6,
                    "mlp_in": 2 * 512 * 6, "mlp_out": 2 * 512 * 6, "head": 2 * 160},
}
CALL_ORDER = {"residual": ["stem", "conv_a", "conv_b", "head"],
              "transformer": ["embed", "attention/query", "attention/key", "attention/value",
                              "attention/out", "mlp_in", "mlp_out", "head"]}


@pytest.fixture(scope="module", params=sorted(model_zoo.CASES))
def case(request):
  return model_zoo.CASES[request.param]()


def test_table_rows_counts_flops_and_densities(case):
  masks = lwc.init_masks(case.params)
  params, masks = lwc.prune(case.params, masks, 0.6)
  table = stats.layer_table(case.model_fn, params, masks, case.inputs, case.model_state)
  rows = {k: r for k, r in table.items() if k != "total"}
  assert sorted(rows) == sorted(lwc.prunable_layers(case.params))
  assert list(rows) == CALL_ORDER.get(case.name, list(rows))
  counts = lwc.layer_counts(masks)
  for name, r in rows.items():
    assert (r["weights"], r["nonzero"]) == (counts[name]["weights"], counts[name]["nonzero"])
    assert r["weights_frac"] == counts[name]["density"] < 1.0
    assert 0.0 <= r["act"] <= 1.0 and 0.0 <= r["flop_frac"] <= r["weights_frac"] + 1e-12
  assert {k: r["flop"] for k, r in rows.items()} == EXPECTED_FLOP[case.name]
  for group in ("conv", "fc", "attention"):
    assert all(rows[name]["flop"] > 0 for name in case.groups[group])
  assert all(rows[name]["flop"] == 0 for name in case.groups["embedding"])  # a lookup
  total = table["total"]
  assert total["weights"] == sum(c["weights"] for c in counts.values())
  assert total["nonzero"] == sum(c["nonzero"] for c in counts.values())
  assert total["flop"] == sum(EXPECTED_FLOP[case.name].values())
  assert 0.0 <= total["act"] <= 1.0 and 0.0 <= total["flop_frac"] <= 1.0
  assert "| total |" in stats.markdown(table)


def _relu_density(h) -> float:
  return float(np.count_nonzero(np.maximum(np.asarray(h), 0.0))) / np.size(h)


_bn_state = model_zoo.trained_looking_bn_state


@pytest.mark.parametrize("name", ["linen_bn_cnn", "nnx_bn_cnn"])
def test_act_is_the_next_layers_input_density_with_the_given_batch_stats(name):
  """conv1's Act% = density of relu(bn1(conv1(x))), bn1 in eval mode with *these* statistics."""
  case = model_zoo.CASES[name]()
  state = _bn_state(case.model_state, 3)
  x = case.inputs
  if name == "linen_bn_cnn":
    variables = {"params": case.params, **state}
    _, inter = case.model_fn.apply(variables, x, train=False, capture_intermediates=True)
    hidden = inter["intermediates"]["bn1"]["__call__"][0]
  else:
    model = nnx.merge(case.model_fn.graphdef, case.params, state)
    model.eval()
    hidden = model.bn1(model.conv1(x))
  acts = stats.activation_density(case.model_fn, case.params, x, batch_size=5,
                                  model_state=state)
  assert acts["conv1"] == pytest.approx(_relu_density(hidden), abs=1e-12)
  assert acts["head"] == 1.0
  # The statistics really are used: shifting bn1's means far up switches every unit off.
  shifted = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 1e3 if "bn1" in jax.tree_util.keystr(p) and layers.leaf_name(p) == "mean"
      else v, state)
  assert stats.activation_density(case.model_fn, case.params, x, model_state=shifted)[
      "conv1"] == 0.0


class RawShared(nn.Module):
  """A raw weight (`self.param`), a Dense layer called twice, a tied embedding (`attend`)."""

  @nn.compact
  def __call__(self, x, train=False):
    w = self.param("w1", nn.initializers.lecun_normal(), (4, 5))
    h = nn.relu(x @ w)
    shared = nn.Dense(5, name="shared")
    h = nn.relu(shared(nn.relu(shared(h))))
    return nn.Embed(7, 5, name="emb").attend(h)


def test_raw_shared_and_tied_weights():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
  module = RawShared()
  rng = np.random.default_rng(1)  # NumPy values: compiling Flax's initialisers costs seconds
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  table = stats.layer_table(module.apply, params, lwc.init_masks(params), x)
  assert [k for k in table if k != "total"] == ["w1", "shared", "emb"]
  assert table["w1"]["flop"] == 2 * 20
  assert table["shared"]["flop"] == 2 * 2 * 25  # called twice
  assert table["emb"]["flop"] == 2 * 35  # used as the output projection
  h = np.maximum(np.asarray(x @ params["w1"]), 0)
  h2 = np.maximum(h @ np.asarray(params["shared"]["kernel"]) + params["shared"]["bias"], 0)
  expected = (np.count_nonzero(h) + np.count_nonzero(h2)) / (h.size + h2.size)
  assert table["w1"]["act"] == pytest.approx(expected)  # shared's two inputs pooled


def test_abstract_params_and_nnx_module_give_flops():
  model = model_zoo.NNXBNCNN(rngs=nnx.Rngs(0))
  fn, params, state = lwc.nnx_model(model)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  x = jnp.zeros((1, 12, 12, 1), jnp.float32)
  assert stats.layer_flops(fn, abstract, x, state) == EXPECTED_FLOP["nnx_bn_cnn"]
