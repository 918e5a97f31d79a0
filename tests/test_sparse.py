"""Relative-index encoding, the export file, size accounting, energy, sparse inference."""

import json
import math
import os
import pickle
import zipfile

from hypothesis import HealthCheck, given, settings, strategies as st
import jax
import numpy as np
import conftest
import pytest

from lwc import energy
from lwc import sparse
from lwc.errors import UserError

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def same_bits(a, b):
  a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ positions and bit packing


def test_worked_example_from_the_format_doc():
  # 3-bit indices: a skip holds 0..7; 35 pruned positions before position 40 -> 4 fillers.
  skips, real = sparse.encode_positions(np.array([1, 4, 40]), bits=3)
  assert skips.tolist() == [1, 2, 7, 7, 7, 7, 3]
  assert real.tolist() == [True, True, False, False, False, False, True]
  assert sparse.decode_positions(skips).tolist() == [1, 4, 12, 20, 28, 36, 40]


@st.composite
def positions_and_bits(draw):
  size = draw(st.integers(0, 3000))
  bits = draw(st.integers(1, 12))
  chosen = draw(st.sets(st.integers(0, max(size - 1, 0)), max_size=min(size, 200)))
  return np.array(sorted(chosen), np.int64), bits


@FAST
@given(positions_and_bits())
def test_positions_round_trip_with_fillers(case):
  positions, bits = case
  skips, real = sparse.encode_positions(positions, bits)
  assert skips.dtype == np.uint32 and np.all(skips <= (1 << bits) - 1)
  decoded = sparse.decode_positions(skips)
  np.testing.assert_array_equal(decoded[real], positions)
  assert np.all(skips[~real] == (1 << bits) - 1)
  gaps = np.diff(positions, prepend=-1) - 1
  assert (~real).sum() == int((gaps // (1 << bits)).sum())  # the minimum number of fillers
  assert len(set(decoded.tolist())) == len(decoded)  # fillers stand on distinct pruned positions
  assert not set(decoded[~real].tolist()) & set(positions.tolist())


@FAST
@given(st.integers(1, 16), st.data())
def test_pack_bits_round_trip(bits, data):
  values = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300)),
                    np.uint32)
  packed = sparse.pack_bits(values, bits)
  assert packed.dtype == np.uint8 and packed.size == sparse.packed_length(values.size, bits)
  np.testing.assert_array_equal(sparse.unpack_bits(packed, values.size, bits), values)


def test_pack_bits_layout_is_lsb_first():
  # 5-bit values 1, 2: bits 10000 01000 -> byte0 = 0b01000001, byte1 = 0b00000000.
  assert sparse.pack_bits(np.array([1, 2]), 5).tolist() == [0b01000001, 0]
  with pytest.raises(ValueError, match="does not fit"):
    sparse.pack_bits(np.array([32]), 5)


# ------------------------------------------------------------------ one leaf


@st.composite
def pruned_leaves(draw):
  """(weights, mask, bits): FC or conv shapes, densities from 0 to 1, empty rows, kept zeros."""
  shape = draw(st.sampled_from([(0, 5), (1, 1), (7, 3), (40, 30), (3, 3, 4, 5), (5, 5, 2, 8)]))
  size = math.prod(shape)
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  density = draw(st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]))
  mask = rng.random(shape) < density
  if len(shape) == 2 and shape[0] > 2 and draw(st.booleans()):
    mask[rng.integers(0, shape[0], 2)] = False  # empty rows
  values = rng.standard_normal(shape).astype(np.float32)
  if size and draw(st.booleans()):  # kept connections whose value is exactly +0.0 or -0.0
    flat = values.reshape(-1)
    flat[rng.integers(0, size, 3)] = 0.0
    flat[rng.integers(0, size, 2)] = -0.0
  weights = np.where(mask, values, np.float32(0.0))
  return weights, mask, draw(st.integers(1, 10))


@FAST
@given(pruned_leaves())
def test_leaf_round_trip_is_bit_identical(case):
  weights, mask, bits = case
  leaf = sparse.encode_leaf(weights, mask, bits)
  assert sparse.check_leaf(leaf) is None
  assert leaf.kept == mask.sum() and leaf.entries == leaf.values.size
  got_w, got_m = sparse.decode_leaf(leaf)
  assert same_bits(got_w, weights)
  np.testing.assert_array_equal(got_m, mask)


def test_all_zero_layer_and_full_layer():
  empty = sparse.encode_leaf(np.zeros((30, 20), np.float32), np.zeros((30, 20), bool), 5)
  assert empty.entries == empty.fillers == 0 and empty.index.size == 0
  w, m = sparse.decode_leaf(empty)
  assert not m.any() and same_bits(w, np.zeros((30, 20)))
  full = np.arange(1, 601, dtype=np.float32).reshape(30, 20)
  leaf = sparse.encode_leaf(full, np.ones_like(full, bool), 1)
  assert leaf.fillers == 0 and not sparse.unpack_bits(leaf.index, leaf.entries, 1).any()
  assert same_bits(sparse.decode_leaf(leaf)[0], full)


def test_long_gaps_cost_fillers():
  w = np.zeros(1000, np.float32)
  w[[0, 999]] = [1.0, 2.0]
  leaf = sparse.encode_leaf(w, w != 0, 5)
  assert leaf.fillers == 998 // 32 == 31 and leaf.entries == 33
  sizes = sparse.leaf_sizes(leaf)
  assert sizes["value_bits"] == 33 * 32 and sizes["index_bits"] == 33 * 5
  assert sizes["filler_bits"] == 31 * 37
  assert sizes["sparse_bytes"] == 33 * 4 + math.ceil(33 * 5 / 8)
  assert sizes["index_overhead"] == pytest.approx(5 / 32)
  assert sizes["overhead"] == pytest.approx((33 * 37 - 2 * 32) / (2 * 32))


def test_float16_values_keep_the_mask_exact():
  w = np.array([[1e-9, 0.0, 3.0], [0.0, -2.5e-8, 0.0]], np.float32)  # underflow to 0 in float16
  m = np.array([[True, False, True], [False, True, True]])
  leaf = sparse.encode_leaf(w, m, 3, "float16")
  assert leaf.values.dtype == np.float16 and leaf.zero_kept.tolist() == [0, 5]
  got_w, got_m = sparse.decode_leaf(leaf)
  np.testing.assert_array_equal(got_m, m)
  assert same_bits(got_w, w.astype(np.float16).astype(np.float32))


def test_pruned_position_must_hold_plus_zero():
  w = np.array([1.0, -0.0, 0.5], np.float32)
  with pytest.raises(UserError, match="other than \\+0.0"):
    sparse.encode_leaf(w, np.array([True, False, False]), 5)


# ------------------------------------------------------------------ whole models and the file


def model_case(seed=0, density=0.08):
  rng = np.random.default_rng(seed)
  params, masks = {}, {}
  for name, shape in (("conv1", (5, 5, 1, 4)), ("fc1", (64, 30)), ("fc2", (30, 10))):
    m = rng.random(shape) < density
    params[name] = {"kernel": np.where(m, rng.standard_normal(shape), 0).astype(np.float32),
                    "bias": rng.standard_normal(shape[-1]).astype(np.float32)}
    masks[name] = {"kernel": m, "bias": np.ones(shape[-1], bool)}
  return params, masks


@pytest.fixture
def saved(tmp_path):
  params, masks = model_case()
  path = str(tmp_path / "model.npz")
  export = sparse.encode_model(params, masks, {"fc": 4, "conv": 6}, info={"model": "toy"})
  return params, masks, path, sparse.save(export, path)


def test_file_round_trip_and_plain_numpy_reading(saved):
  params, masks, path, file_bytes = saved
  loaded = sparse.load(path)
  got_p, got_m = loaded.decode()
  for layer in params:
    for leaf in ("kernel", "bias"):
      assert same_bits(got_p[layer][leaf], params[layer][leaf])
      np.testing.assert_array_equal(got_m[layer][leaf], masks[layer][leaf])
  manifest = loaded.manifest
  assert manifest["model"] == "toy" and manifest["order"] == "C"
  assert {e["name"]: e.get("index_bits") for e in manifest["leaves"]} == {
      "conv1/bias": None, "conv1/kernel": 6, "fc1/bias": None, "fc1/kernel": 4,
      "fc2/bias": None, "fc2/kernel": 4}
  assert os.path.getsize(path) == file_bytes
  # The decoding snippet of docs/sparse_format.md, run as written (plain NumPy only).
  with open(os.path.join(os.path.dirname(__file__), "..", "docs", "sparse_format.md")) as f:
    doc = f.read()
  snippet = doc.split("## Decoding with plain NumPy")[1].split("```python")[1].split("```")[0]
  scope = {}
  exec(snippet.replace('"model.npz"', repr(path)), scope)  # noqa: S102
  for layer in params:
    for leaf in ("kernel", "bias"):
      assert same_bits(scope["weights"][f"{layer}/{leaf}"], params[layer][leaf])


rewrite = conftest.rewrite_npz


def set_manifest(arrays, edit):
  manifest = json.loads(str(arrays["manifest"]))
  edit(manifest)
  arrays["manifest"] = np.array(json.dumps(manifest))
  return arrays


def fc1_entry(manifest):
  return next(e for e in manifest["leaves"] if e["name"] == "fc1/kernel")


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "extra": np.zeros(3)}, "unexpected keys ['extra']"),
    (lambda a: {k: v for k, v in a.items() if k != "fc1/kernel.index"},
     "missing keys ['fc1/kernel.index']"),
    (lambda a: {**a, "format_version": np.array(2)}, "format_version"),
    (lambda a: {**a, "fc1/kernel.values": a["fc1/kernel.values"][:-1]}, "values for"),
    (lambda a: {**a, "fc1/kernel.index": np.append(a["fc1/kernel.index"], np.uint8(0))},
     "index has"),
    (lambda a: {**a, "fc1/kernel.values": a["fc1/kernel.values"].astype(np.float64)},
     "values are float64"),
    (lambda a: set_manifest(a, lambda m: fc1_entry(m).update(fillers=fc1_entry(m)["fillers"] + 1)),
     "filler entries"),
    (lambda a: set_manifest(a, lambda m: fc1_entry(m).update(shape=[2, 3])), "beyond the 6"),
    (lambda a: {**a, "fc2/bias.dense": np.zeros(3, np.float32)}, "dense array"),
    (lambda a: {**a, "manifest": np.array("{not json")}, "bad manifest"),
])
def test_inconsistent_files_are_user_errors(saved, tmp_path, change, message):
  _, _, path, _ = saved
  bad = rewrite(path, str(tmp_path / "bad.npz"), change)
  with pytest.raises(UserError) as e:
    sparse.load(bad)
  text = str(e.value)
  assert text.startswith(bad + ": ") and message in text and "\n" not in text


class _Boom:
  """Unpickling this creates the folder `sentinel` (stands in for arbitrary code)."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.mkdir, (self.sentinel,))


def test_pickles_are_refused_without_running_them(saved, tmp_path):
  _, _, path, _ = saved
  sentinel = str(tmp_path / "pwned")
  payload = np.array([_Boom(sentinel)], dtype=object)
  # 1. An export whose manifest member is an object (pickled) array.
  npz = rewrite(path, str(tmp_path / "pickled.npz"), lambda a: {**a, "manifest": payload})
  # 2. A bare .npy holding a pickled object array.
  npy = str(tmp_path / "pickled.npy")
  np.save(npy, payload, allow_pickle=True)
  # 3. A plain pickle file with an .npz name.
  raw = str(tmp_path / "raw.npz")
  with open(raw, "wb") as f:
    pickle.dump(payload, f)
  # 4. A zip whose members are valid except one pickled values array.
  member = str(tmp_path / "member.npz")
  rewrite(path, member, lambda a: {**a, "fc1/kernel.values": payload})
  for bad in (npz, npy, raw, member):
    with pytest.raises(UserError) as e:
      sparse.load(bad)
    assert str(e.value).startswith(bad + ": ")
    assert not os.path.exists(sentinel), f"loading {bad} ran pickled code"
  assert zipfile.is_zipfile(npz)


def test_not_a_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="not a readable .npz export"):
    sparse.load(str(tmp_path / "missing.npz"))


def test_size_report_totals(saved):
  _, _, path, file_bytes = saved
  report = sparse.size_report(sparse.load(path), file_bytes)
  leaves = report["leaves"]
  pruned = report["pruned_layers"]
  assert pruned["weights"] == 5 * 5 * 4 + 64 * 30 + 30 * 10
  assert pruned["sparse_bytes"] == sum(r["sparse_bytes"] for r in leaves.values()
                                       if r["storage"] == "sparse")
  assert report["all_leaves"]["dense_bytes"] == pruned["dense_bytes"] + 4 * (4 + 30 + 10)
  assert report["payload_bytes"] + report["container_bytes"] == file_bytes
  assert pruned["compression_by_size"] == pytest.approx(pruned["dense_bytes"] /
                                                        pruned["sparse_bytes"])
  table = sparse.format_size_table(report)
  assert "| fc1 |" in table and "total (pruned layers)" in table


# ------------------------------------------------------------------ energy


def test_energy_hand_computed():
  layer = energy.LayerWork("fc", weights=100, entries=10, uses=1, outputs=5, sparse_bits=370)
  pj = energy.ENERGY_PJ
  all_sram = energy.estimate([layer], math.inf)
  assert all_sram["dense"]["total"]["total_pj"] == pytest.approx(
      105 * pj["sram_read"] + 100 * (pj["fmul"] + pj["fadd"]) + 5 * pj["fadd"])
  assert all_sram["pruned"]["total"]["total_pj"] == pytest.approx(
      (12 + 5) * pj["sram_read"] + 10 * (pj["fmul"] + pj["fadd"]) + 5 * pj["fadd"])
  # 80 bytes of SRAM = 20 words: the pruned layer (17 words) fits, the dense one spills 85.
  part = energy.estimate([layer], 80)
  assert part["dense"]["total"]["dram_words"] == 85
  assert part["pruned"]["total"]["dram_words"] == 0
  none = energy.estimate([layer], 0)
  assert none["ratio"] > 5
  assert "| fc |" in energy.format_energy_table(part)
  sweep = energy.sram_sweep([layer], [0, 80 / 1024, math.inf])
  assert [r["ratio"] for r in sweep] == pytest.approx([none["ratio"], part["ratio"],
                                                       all_sram["ratio"]])
  assert "| unlimited |" in energy.format_sram_sweep(sweep)


# ------------------------------------------------------------------ sparse inference


@pytest.mark.parametrize("model_name", ["lenet_300_100", "lenet5"])
def test_numpy_forward_matches_flax_model(model_name, make_params):
  model, params = make_params(model_name, seed=1)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda w: np.where(rng.random(w.shape) < 0.2, w, 0).astype(np.float32)
                        if w.ndim > 1 else w + 0.01, params)
  images = rng.random((33, 28, 28, 1)).astype(np.float32)
  want = np.asarray(jax.jit(model.apply)({"params": params}, images))
  for backend in ("csr", "dense"):
    numpy_model = sparse.NumpyModel(model_name, params, backend)
    got = numpy_model(images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(sparse.predict(numpy_model, images, 10), want.argmax(-1))
    np.testing.assert_allclose(numpy_model(images[:1]), want[:1], rtol=1e-4, atol=1e-4)
    inputs = numpy_model.layer_inputs(images[:2])
    assert list(inputs) == list(params) and all(v.shape[1] == 2 for v in inputs.values())


def test_csr_matrix_matches_dense_product():
  rng = np.random.default_rng(3)
  kernel = np.where(rng.random((50, 20)) < 0.1, rng.standard_normal((50, 20)), 0)
  kernel[:, 4] = 0  # an output with no inputs
  kernel = kernel.astype(np.float32)
  bias = rng.standard_normal(20).astype(np.float32)
  single = sparse.CsrMatrix(kernel, bias)
  blocks = sparse.CsrMatrix(kernel, bias, threads=3, min_parallel_nnz=0)
  assert single.threads == 1 and blocks.threads == 3 and len(blocks._blocks) == 3
  dense = sparse.DenseMatrix(kernel, bias)
  for batch in (1, 2, 64):
    x = rng.standard_normal((50, batch)).astype(np.float32)  # feature-major
    want = (x.T @ kernel + bias).T
    for matrix in (single, blocks, dense):
      np.testing.assert_allclose(matrix(x), want, rtol=1e-5, atol=1e-5)


def test_im2col_t_matches_flax_conv_layout():
  rng = np.random.default_rng(0)
  x = rng.random((2, 6, 7, 3)).astype(np.float32)  # NHWC
  kernel = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
  patches_t = sparse.im2col_t(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), 3, 2)
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = (kernel.reshape(-1, 4).T @ patches_t).reshape(4, 2, 4, 6).transpose(1, 2, 3, 0)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unknown_model_or_backend():
  with pytest.raises(UserError, match="no NumPy forward pass"):
    sparse.NumpyModel("resnet", {})
  with pytest.raises(UserError, match="backend must be"):
    sparse.NumpyModel("lenet5", {}, backend="bcoo")
