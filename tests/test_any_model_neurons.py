"""Dead-channel removal on any Flax model (lwc.neurons.remove_dead_channels): BatchNorm CNNs in
Linen and NNX get smaller and compute the same outputs; couplings it cannot follow are refused."""

from flax import linen as nn
from flax import nnx
import jax
import numpy as np
import pytest

import lwc
from lwc import layers
from lwc import neurons
from lwc.errors import UserError

import model_zoo


class LinenBNCNNAt(nn.Module):
  """model_zoo.LinenBNCNN with its two conv widths as fields (the model "built at a width")."""
  c1: int = 8
  c2: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.c1, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(self.c2, (3, 3), strides=2, name="conv2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2)))
    return nn.Dense(10, name="head")(x)


class NNXBNCNNAt(nnx.Module):
  """model_zoo.NNXBNCNN with its two conv widths as arguments."""

  def __init__(self, c1: int = 8, c2: int = 16, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(c1, rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c2, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(c2, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(self.dropout(x.mean((1, 2))))


def filler(seed: int = 0):
  """A `tree_map_with_path` function drawing a leaf of the given shape with NumPy: kernels
  N(0, 1/fan_in), vectors N(0, 1), variances U(0.5, 2), integers 0, PRNG keys key(seed)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not np.issubdtype(s.dtype, np.floating):
      return np.zeros(s.shape, s.dtype)
    if layers.leaf_name(path) == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return fill


def linen_variables(module, x, seed=0):
  """(params, model_state) of a Linen module, drawn with NumPy (see fast_case)."""
  shapes = jax.eval_shape(module.init, jax.random.key(seed), x[:1])
  return lwc.split_variables(jax.tree_util.tree_map_with_path(filler(seed), shapes))


def fast_case(name: str, seed: int = 0) -> model_zoo.Case:
  """model_zoo's case `name` (its modules, inputs and labels) with NumPy-drawn weights and
  statistics: shapes from eval_shape, so no Flax initialiser is compiled (that costs seconds
  per model on the 2 CI cores, see conftest.make_params)."""
  if name == "nnx_bn_cnn":
    x, y = model_zoo._images(seed)
    module = nnx.eval_shape(lambda: model_zoo.NNXBNCNN(rngs=nnx.Rngs(seed)))
    model_fn, params, state = lwc.nnx_model(module)
    fill = filler(seed)
    params = jax.tree_util.tree_map_with_path(fill, params)
    state = jax.tree_util.tree_map_with_path(fill, state)
    return model_zoo.Case(name, model_fn, params, state, x, y, {})
  module = {"linen_bn_cnn": model_zoo.LinenBNCNN, "residual": model_zoo.ResidualBlock,
            "transformer": model_zoo.TransformerBlock}[name]()
  if name == "transformer":
    r = np.random.default_rng(seed)
    x = r.integers(0, 32, (16, 6)).astype(np.int32)
    y = r.integers(0, 10, 16).astype(np.int32)
  else:
    x, y = model_zoo._images(seed)
  params, state = linen_variables(module, x, seed)
  return model_zoo.Case(name, lwc.linen_model(module), params, state, x, y, {})


def np_tree(tree):
  """NumPy copies of the array leaves (PRNG keys, e.g. NNX rng state, stay as they are)."""
  def copy_leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return x
    return np.array(x, copy=True)
  return jax.tree.map(copy_leaf, tree)


def bn_stats(state, bn):
  """The statistics dict of BatchNorm `bn` (Linen batch_stats or the NNX state)."""
  return state["batch_stats"][bn] if "batch_stats" in state else state[bn]


def trained_looking(case, seed=0):
  """Params and state with nonzero biases, BN scales/offsets and running statistics, so that a
  channel with no inputs outputs a nonzero constant (as after training)."""
  rng = np.random.default_rng(seed)
  params, state = np_tree(case.params), np_tree(case.model_state)
  for bn in ("bn1", "bn2"):
    n = params[bn]["scale"].shape[0]
    params[bn]["scale"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    params[bn]["bias"] = rng.normal(size=n).astype(np.float32)
    bn_stats(state, bn)["mean"] = rng.normal(size=n).astype(np.float32)
    bn_stats(state, bn)["var"] = rng.uniform(0.5, 2.0, n).astype(np.float32)
  for layer in ("conv1", "conv2", "head"):
    params[layer]["bias"] = rng.normal(size=params[layer]["bias"].shape).astype(np.float32)
  return params, state


def make_dead(params, state):
  """conv1: channel 0 has no inputs and a zero constant (ReLU of a negative value), channel 3 no
  inputs and a positive constant, channel 5 no outputs; conv2: channels 1, 2, 7 no inputs."""
  masks = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  masks["conv1"]["kernel"][..., [0, 3]] = False
  masks["conv2"]["kernel"][:, :, 5, :] = False
  masks["conv2"]["kernel"][..., [1, 2, 7]] = False
  stats = bn_stats(state, "bn1")
  for channel, target in ((0, -3.0), (3, 2.0)):  # BN output of the constant conv bias
    gain = params["bn1"]["scale"][channel] / np.sqrt(stats["var"][channel] + 1e-5)
    params["bn1"]["bias"][channel] = target - gain * (params["conv1"]["bias"][channel]
                                                      - stats["mean"][channel])
  params = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
  return params, masks


def outputs(case, params, state):
  return np.asarray(jax.jit(lambda p, s, x: case.model_fn(p, s, x, train=False)[0])(
      params, state, case.inputs))


def check_smaller(case, params, state, masks, result):
  """Widths, BN widths, masks, surviving weights of the result of make_dead's model."""
  assert result.removed == {"conv1": 2, "conv2": 3, "head": 0}
  assert result.kept == {"conv1": 1, "conv2": 0, "head": 0}  # conv1/3: constant into SAME conv
  assert result.widths == {"conv1": 6, "conv2": 13, "head": 10}
  small, small_state = result.params, result.model_state
  keep1 = [1, 2, 3, 4, 6, 7]
  keep2 = [c for c in range(16) if c not in (1, 2, 7)]
  for bn, keep in (("bn1", keep1), ("bn2", keep2)):
    for leaf in ("scale", "bias"):
      np.testing.assert_array_equal(small[bn][leaf], params[bn][leaf][keep])
    for leaf in ("mean", "var"):
      np.testing.assert_array_equal(bn_stats(small_state, bn)[leaf],
                                    bn_stats(state, bn)[leaf][keep])
  np.testing.assert_array_equal(small["conv1"]["kernel"], params["conv1"]["kernel"][..., keep1])
  np.testing.assert_array_equal(small["conv2"]["kernel"],
                                params["conv2"]["kernel"][:, :, keep1][..., keep2])
  np.testing.assert_array_equal(small["head"]["kernel"], params["head"]["kernel"][keep2])
  assert not np.array_equal(small["head"]["bias"], params["head"]["bias"])  # constants folded
  np.testing.assert_array_equal(small["conv2"]["bias"], params["conv2"]["bias"][keep2])
  jax.tree.map(lambda p, m: np.testing.assert_equal(np.shape(p), np.shape(m)), small,
               result.masks)
  np.testing.assert_array_equal(result.masks["conv2"]["kernel"],  # masks follow the weights
                                masks["conv2"]["kernel"][:, :, keep1][..., keep2])
  checks = result.checks
  assert checks["zeroed_max_abs_diff"] <= checks["bound"]
  assert checks["probe_max_abs_diff"] <= checks["bound"]
  assert checks["small_model_max_abs_diff"] <= checks["bound"]


def test_linen_bn_cnn_smaller_same_predictions():
  case = fast_case("linen_bn_cnn")
  # The width-parameterised copy is the zoo's network.
  same = jax.jit(lambda p, s, x: lwc.linen_model(LinenBNCNNAt())(p, s, x, train=False)[0])
  np.testing.assert_array_equal(outputs(case, case.params, case.model_state),
                                np.asarray(same(case.params, case.model_state, case.inputs)))
  params, state = trained_looking(case)
  params, masks = make_dead(params, state)
  before = np_tree((params, masks, state))
  result = neurons.remove_dead_channels(
      case.model_fn, params, masks, case.inputs, state,
      chain=[("conv1", "bn1"), ("conv2", "bn2"), ("head", None)],
      build=lambda w: LinenBNCNNAt(w["conv1"], w["conv2"]))
  jax.tree.map(np.testing.assert_array_equal, (params, masks, state), before)  # inputs untouched
  check_smaller(case, params, state, masks, result)
  assert result.checks["small_model"] == "ran (build)"
  # Loads into the model built at the new width (Linen checks every parameter shape) ...
  small_module = LinenBNCNNAt(6, 13)
  shapes = jax.eval_shape(small_module.init, jax.random.key(0), case.inputs[:1])
  want = jax.tree.map(lambda s: s.shape, {"params": result.params, **result.model_state})
  assert jax.tree.map(lambda s: s.shape, shapes) == want
  variables = {"params": result.params, **result.model_state}
  small_out = np.asarray(jax.jit(small_module.apply)(variables, case.inputs))
  # ... and predicts what the original predicts.
  np.testing.assert_allclose(small_out, outputs(case, params, state), rtol=1e-5, atol=1e-5)


def test_nnx_bn_cnn_smaller_same_predictions():
  case = fast_case("nnx_bn_cnn")
  params, state = trained_looking(case)
  params, masks = make_dead(params, state)
  result = neurons.remove_dead_channels(case.model_fn, params, masks, case.inputs, state)
  check_smaller(case, params, state, masks, result)
  assert result.checks["small_model"] == "ran (model_fn)"  # the graphdef takes the new arrays
  assert isinstance(result.params, nnx.State) and isinstance(result.model_state, nnx.State)
  # Loads into the NNX model built at the new width.
  model = nnx.eval_shape(lambda: NNXBNCNNAt(6, 13, rngs=nnx.Rngs(5)))  # shapes only
  _, fresh_params, fresh_state = nnx.split(model, nnx.Param, ...)
  assert (jax.tree.map(np.shape, nnx.as_pure(fresh_params)) ==
          jax.tree.map(np.shape, result.params))
  assert (jax.tree.map(np.shape, nnx.as_pure(fresh_state)) ==
          jax.tree.map(np.shape, result.model_state))
  nnx.update(model, result.params, result.model_state)
  model.eval()
  small_out = nnx.jit(lambda m, x: m(x))(model, case.inputs)
  np.testing.assert_allclose(np.asarray(small_out), outputs(case, params, state),
                             rtol=1e-5, atol=1e-5)


def test_residual_add_is_refused_before_anything_is_written():
  case = fast_case("residual")
  params = np_tree(case.params)
  masks = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  masks["conv_b"]["kernel"][..., [1, 6]] = False
  params = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
  before = np_tree((params, masks))
  calls = []
  for chain in (None, [("stem", None), ("conv_a", "bn_a"), ("conv_b", "bn_b"), ("head", None)]):
    with pytest.raises(UserError, match=r"conv_b's outputs are added to stem's outputs "
                                        r"\(residual\): removing its channels would break the add"):
      neurons.remove_dead_channels(case.model_fn, params, masks, case.inputs, case.model_state,
                                   chain=chain, build=lambda w: calls.append(w))
  assert not calls  # refused from the trace, before any smaller model was made
  jax.tree.map(np.testing.assert_array_equal, (params, masks), before)
  # Leaving conv_b out of the chain keeps its channels: nothing else is dead, nothing removed.
  result = neurons.remove_dead_channels(case.model_fn, params, masks, case.inputs,
                                        case.model_state, chain=["stem", "conv_a"])
  assert result.removed["conv_b"] == 0 and result.widths["conv_b"] == 8


def test_residual_stem_refused_conv_a_inside_the_block_removed():
  case = fast_case("residual")
  params = np_tree(case.params)
  masks = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  masks["stem"]["kernel"][..., 2] = False
  dead = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
  with pytest.raises(UserError, match="stem's outputs are added to conv_b's outputs"):
    neurons.remove_dead_channels(case.model_fn, dead, masks, case.inputs, case.model_state)
  # conv_a -> bn_a -> relu -> conv_b is a linear link: its dead channels go.
  masks = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  masks["conv_a"]["kernel"][..., [0, 5]] = False
  stats = case.model_state["batch_stats"]["bn_a"]
  for c in (0, 5):  # BN output -1 for the constant conv bias: ReLU makes it 0, removable
    gain = params["bn_a"]["scale"][c] / np.sqrt(stats["var"][c] + 1e-6)
    params["bn_a"]["bias"][c] = -1 - gain * (params["conv_a"]["bias"][c] - stats["mean"][c])
  dead = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
  result = neurons.remove_dead_channels(case.model_fn, dead, masks, case.inputs,
                                        case.model_state)
  assert result.removed["conv_a"] == 2 and result.widths["conv_a"] == 6
  assert result.model_state["batch_stats"]["bn_a"]["mean"].shape == (6,)
  assert result.params["conv_b"]["kernel"].shape == (3, 3, 6, 8)
  assert result.checks["small_model"].startswith("not run")  # Linen without build


class LayerNormCNN(nn.Module):
  """A LayerNorm over channels between two convs: channels are not independent."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding="VALID", name="conv1")(x)
    x = nn.relu(nn.LayerNorm(name="ln")(x))
    x = nn.Conv(8, (3, 3), padding="VALID", name="conv2")(x)
    return nn.Dense(10, name="head")(x.mean((1, 2)))


def test_mixing_across_channels_is_refused_and_wrong_norm_named():
  x = np.random.default_rng(0).standard_normal((8, 10, 10, 1)).astype(np.float32)
  module = LayerNormCNN()
  params, _ = linen_variables(module, x)
  masks = jax.tree.map(lambda a: np.ones(a.shape, bool), params)
  masks["conv2"]["kernel"][:, :, 2, :] = False  # conv1 channel 2: no outputs
  params = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
  with pytest.raises(UserError, match=r"conv1 -> conv2 changes the model's outputs when their "
                                      r"weights and normalisation are randomised"):
    neurons.remove_dead_channels(lwc.linen_model(module), params, masks, x)
  with pytest.raises(UserError, match="chain says conv1's outputs are normalised by bn1, but the "
                                      "model applies ln to them"):
    neurons.remove_dead_channels(lwc.linen_model(module), params, masks, x,
                                 chain=[("conv1", "bn1")])
  with pytest.raises(UserError, match="chain names layer 'conv9'"):
    neurons.remove_dead_channels(lwc.linen_model(module), params, masks, x, chain=["conv9"])


def test_lenet5_same_as_the_built_in_chain(make_params):
  """The trace-based removal finds what the hand-written LeNet-5 chain finds (VALID convs, max
  pooling, flatten into fc1), and the smaller model is the built-in model at those widths."""
  from lwc.models import get_model

  model, params = make_params("lenet5", 3)
  rng = np.random.default_rng(3)
  masks = {layer: {"kernel": rng.random(p["kernel"].shape) < 0.1,
                   "bias": np.ones(p["bias"].shape, bool)} for layer, p in params.items()}
  masks["conv1"]["kernel"][..., :4] = False
  masks["conv2"]["kernel"][..., -3:] = False
  params = {layer: {"kernel": np.where(masks[layer]["kernel"], p["kernel"], 0).astype(np.float32),
                    "bias": rng.normal(size=p["bias"].shape).astype(np.float32)}
            for layer, p in params.items()}
  chain = neurons.CHAINS["lenet5"]
  want_params, _, want_removed = neurons.remove_dead_units(params, masks, chain)
  x = rng.random((8, 28, 28, 1)).astype(np.float32)
  result = neurons.remove_dead_channels(
      lwc.linen_model(model), params, masks, x,
      build=lambda w: get_model("lenet5", widths=(w["conv1"], w["conv2"], w["fc1"])))
  assert result.removed == want_removed
  assert result.checks["small_model"] == "ran (build)"
  for layer in want_params:
    np.testing.assert_array_equal(result.params[layer]["kernel"], want_params[layer]["kernel"])
    np.testing.assert_allclose(result.params[layer]["bias"], want_params[layer]["bias"],
                               rtol=1e-5, atol=1e-6)


def test_folded_constant_keeps_its_bias_mask_true():
  """A dead unit's constant folded into a bias whose mask was False (masks=None: 'nonzero'):
  the bias must come back unmasked, or re-applying the masks wipes the constant out."""
  from lwc.models import get_model
  model = get_model("lenet_300_100")
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1, 28, 28, 1), np.float32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32), shapes)
  params["fc1"]["kernel"][:, :5] = 0.0   # fc1 units 0-4: no inputs
  params["fc1"]["bias"][:5] = 1.0        # relu(1) = 1: a nonzero constant into fc2
  params["fc2"]["bias"][:] = 0.0         # fc2's bias still 0, so its 'nonzero' mask is False
  x = rng.random((16, 28, 28, 1)).astype(np.float32)
  build = lambda w: get_model("lenet_300_100", widths=(w["fc1"], w["fc2"]))
  result = neurons.remove_dead_channels(lwc.linen_model(model), params, None, x, build=build)
  assert result.removed["fc1"] == 5
  small = build(result.widths)
  want = model.apply({"params": params}, x)
  got = small.apply({"params": lwc.apply_masks(result.params, result.masks)}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
