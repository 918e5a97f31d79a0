"""Export of any Flax model (lwc.export.export_model, lwc.sparse): params, masks and the
non-parameter collections (BatchNorm statistics, NNX rng state) come back bit for bit."""

import json

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import conftest
import pytest

from lwc import export as export_lib
from lwc import layers
from lwc import sparse
from lwc.errors import UserError

from test_any_model_neurons import fast_case


def leaf_bits(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes()
  x = np.asarray(x)
  return x.dtype.str, x.shape, x.tobytes()


def assert_bit_identical(want, got):
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert leaf_bits(a) == leaf_bits(b), jax.tree_util.keystr(path)


def pruned(case, density=0.3, seed=0):
  """(params, masks): every prunable leaf (lwc.layers) pruned at random to `density`."""
  rng = np.random.default_rng(seed)
  masks = layers.map_prunable(lambda name, w: rng.random(np.shape(w)) < density, case.params,
                              other=lambda w: np.ones(np.shape(w), bool))
  params = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(np.asarray(w).dtype),
                        case.params, masks)
  return params, masks


def predict(case, params, state):
  return np.asarray(jax.jit(lambda p, s, x: case.model_fn(p, s, x, train=False)[0])(
      params, state, case.inputs))


@pytest.mark.parametrize("name", ["linen_bn_cnn", "nnx_bn_cnn", "transformer", "residual"])
def test_round_trip_bit_identical_with_model_state(name, tmp_path):
  case = fast_case(name)
  params, masks = pruned(case)
  out = str(tmp_path / f"{name}.npz")
  report = export_lib.export_model(out, params, masks, case.model_state, info={"model": name})
  rt = report["round_trip"]
  assert rt["params_bit_identical"] and rt["masks_identical"] and rt["model_state_bit_identical"]
  assert report["format_version"] == 2
  got_params, got_masks, got_state = export_lib.load_model(out)
  assert_bit_identical(params, got_params)
  assert_bit_identical(jax.tree.map(lambda m: np.asarray(m, bool), masks), got_masks)
  assert_bit_identical(case.model_state, got_state)  # batch_stats, NNX rng count and key
  assert type(got_params) is type(params) and type(got_state) is type(case.model_state)
  np.testing.assert_array_equal(predict(case, got_params, got_state),
                                predict(case, params, case.model_state))
  # Sparse storage exactly for what lwc.layers calls prunable; biases, scales dense.
  manifest = sparse.load(out).manifest
  storage = {e["name"]: e["storage"] for e in manifest["leaves"]}
  prunable = {"/".join(layers.path_names(path)) for path, _ in
              layers.prunable_leaves(params).values()}
  assert {n for n, s in storage.items() if s == "sparse"} == prunable
  state_names = [e["name"] for e in manifest["state"]["leaves"]]
  if name in ("linen_bn_cnn", "residual"):
    bns = ("bn1", "bn2") if name == "linen_bn_cnn" else ("bn_a", "bn_b")
    assert state_names == [f"batch_stats/{bn}/{s}" for bn in bns for s in ("mean", "var")]
  if name == "nnx_bn_cnn":
    assert manifest["params_tree"] == "nnx.State" and manifest["state"]["tree"] == "nnx.State"
    assert {"bn1/mean", "dropout/rngs/key", "dropout/rngs/count"} <= set(state_names)
    nnx.merge(case.model_fn.graphdef, got_params, got_state)  # loads into the NNX model
  if name == "transformer":
    assert storage["embed/embedding"] == "sparse" and storage["ln1/scale"] == "dense"
    assert state_names == [] and got_state == {}


def test_float16_values_state_still_exact(tmp_path):
  case = fast_case("linen_bn_cnn", seed=1)
  params, masks = pruned(case, density=0.5)
  out = str(tmp_path / "half.npz")
  report = export_lib.export_model(out, params, masks, case.model_state, value_dtype="float16")
  assert report["round_trip"]["params_bit_identical"]
  got_params, _, got_state = export_lib.load_model(out)
  np.testing.assert_array_equal(got_params["conv2"]["kernel"],
                                params["conv2"]["kernel"].astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(got_params["bn1"]["scale"], params["bn1"]["scale"])
  assert_bit_identical(case.model_state, got_state)


def test_without_state_the_file_is_the_old_format(tmp_path):
  """No model_state: no state section, no new members; old readers read it as before."""
  case = fast_case("linen_bn_cnn")
  params, masks = pruned(case)
  path = str(tmp_path / "plain.npz")
  sparse.save(sparse.encode_model(params, masks, {"fc": 5, "conv": 8}, info={"model": "x"}),
              path)
  with np.load(path, allow_pickle=False) as f:
    assert not [k for k in f.files if k.endswith(".state")]
    manifest = json.loads(str(f["manifest"]))
  assert "state" not in manifest and "params_tree" not in manifest
  assert not any("path" in e for e in manifest["leaves"])
  loaded = sparse.load(path)
  assert loaded.decode_state() is None
  got_params, _, got_state = export_lib.load_model(path)
  assert got_state is None
  assert_bit_identical(params, got_params)


def test_int_keys_bfloat16_and_key_state(tmp_path):
  """An nnx.State with integer keys (nnx.List-like), state leaves of bfloat16, int32 and a PRNG
  key: all exact, keys keep their type."""
  rng = np.random.default_rng(0)
  params = nnx.State({"layers": {i: {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
                                     "bias": np.zeros(3, np.float32)} for i in range(2)}})
  state = {"stats": {"ema": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
                     "steps": np.array(7, np.int32), "seed": jax.random.key(3)}}
  out = str(tmp_path / "keys.npz")
  report = export_lib.export_model(out, params, None, state)
  assert report["round_trip"]["model_state_bit_identical"]
  got_params, got_masks, got_state = export_lib.load_model(out)
  assert isinstance(got_params, nnx.State) and 0 in got_params["layers"]
  assert_bit_identical(params, got_params)
  assert_bit_identical(state, got_state)
  assert got_state["stats"]["ema"].dtype == ml_dtypes.bfloat16
  assert all(np.all(m) for m in jax.tree.leaves(got_masks))
  entries = {e["name"]: e for e in sparse.load(out).manifest["leaves"]}
  assert entries["layers/0/kernel"]["path"] == ["layers", 0, "kernel"]


rewrite = conftest.rewrite_npz


def edit_state_entry(arrays, name, **fields):
  manifest = json.loads(str(arrays["manifest"]))
  entry = next(e for e in manifest["state"]["leaves"] if e["name"] == name)
  entry.update(fields)
  return {**arrays, "manifest": np.array(json.dumps(manifest))}


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "batch_stats/bn1/mean.state": a["batch_stats/bn1/mean.state"][:-1]},
     "state leaf batch_stats/bn1/mean: array float32 (7,), manifest says float32 (8,)"),
    (lambda a: {**a, "batch_stats/bn1/var.state":
                a["batch_stats/bn1/var.state"].astype(np.float64)}, "array float64"),
    (lambda a: {k: v for k, v in a.items() if k != "batch_stats/bn2/var.state"},
     "missing keys ['batch_stats/bn2/var.state']"),
    (lambda a: edit_state_entry(a, "batch_stats/bn1/mean", dtype="object"), "bad dtype"),
    (lambda a: edit_state_entry(a, "batch_stats/bn1/mean", path=["x"]), "bad path"),
])
def test_bad_state_sections_are_user_errors(tmp_path, change, message):
  case = fast_case("linen_bn_cnn")
  path = str(tmp_path / "good.npz")
  export_lib.export_model(path, case.params, None, case.model_state)
  bad = rewrite(path, str(tmp_path / "bad.npz"), change)
  with pytest.raises(UserError) as e:
    sparse.load(bad)
  assert str(e.value).startswith(bad + ": ") and message in str(e.value)


def test_unexportable_trees_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="only nested dicts"):
    export_lib.export_model(str(tmp_path / "x.npz"), {"layers": [np.ones((2, 2), np.float32)]})
  with pytest.raises(UserError, match="only numeric arrays and PRNG keys"):
    export_lib.export_model(str(tmp_path / "x.npz"), {"w": np.ones((2, 2), np.float32)}, None,
                            {"names": np.array(["a"])})
  with pytest.raises(UserError, match="does not exist"):
    export_lib.export_model(str(tmp_path / "no" / "x.npz"), {"w": np.ones((2, 2), np.float32)})
