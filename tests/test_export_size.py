"""Smaller exports (issue 15.2): per-layer encoding and index width chosen by bytes, escape codes,
the format-2 container, format-1 files still read, the size table next to the paper's 15.6%."""

import io
import json
import math
import os
import zipfile

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest

from lwc import export as export_lib
from lwc import sparse
from lwc.errors import UserError

SOME = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "sparse_format.md")
# Every (encoding, width) a leaf can be stored in.
ALL_CHOICES = [("filler", b) for b in range(0, sparse.MAX_INDEX_BITS + 1)] + [
    ("escape", b) for b in range(1, sparse.MAX_INDEX_BITS + 1)]


def same_bits(a, b):
  a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def masked(shape, density, seed=0, structure=False, kept_zeros=False):
  """(weights, mask) with i.i.d. kept connections at `density`; `structure`: also whole pruned
  rows and a long pruned run (as MNIST's border pixels give fc1); `kept_zeros`: some kept
  connections stored as +0.0 / -0.0."""
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < density
  if structure and mask.size:
    flat = mask.reshape(-1)
    flat[: flat.size // 5] = False
    if len(shape) == 2 and shape[0] > 4:
      mask[rng.integers(0, shape[0], 3)] = False
  values = rng.standard_normal(shape).astype(np.float32)
  if kept_zeros and values.size:
    flat = values.reshape(-1)
    flat[rng.integers(0, values.size, 3)] = 0.0
    flat[rng.integers(0, values.size, 2)] = -0.0
  return np.where(mask, values, np.float32(0.0)), mask


CASES = [((300, 100), d, s) for d, s in ((0.0, False), (0.001, False), (0.01, True),
                                         (0.05, False), (0.08, True), (0.3, False),
                                         (0.7, True), (0.97, False), (1.0, False))]
CASES += [((5, 5, 20, 50), 0.02, True), ((5, 5, 1, 20), 0.66, False), ((1, 1), 1.0, False),
          ((0, 7), 0.5, False), ((4000,), 0.0005, True)]


# ------------------------------------------------------------------ escape codes


def test_escape_worked_example_from_the_format_doc():
  codes = sparse.encode_escapes(np.array([1, 4, 40]), 3)
  assert codes.tolist() == [1, 2, 7, 7, 7, 7, 7, 0]
  assert sparse.decode_escapes(codes, 3).tolist() == [1, 4, 40]
  w = np.zeros(41, np.float32)
  w[[1, 4, 40]] = [1.0, 2.0, 3.0]
  filler, escape = (sparse.encode_leaf(w, w != 0, 3, encoding=e) for e in ("filler", "escape"))
  assert 8 * filler.nbytes >= 7 * 32 + 7 * 3 and 8 * escape.nbytes >= 3 * 32 + 8 * 3
  assert escape.values.tolist() == [1.0, 2.0, 3.0] and escape.fillers == 5
  assert "1, 2, 7, 7, 7, 7, 7, 0" in open(DOC).read()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3000), st.integers(1, 16), st.data())
def test_escape_positions_round_trip(size, bits, data):
  positions = np.array(sorted(data.draw(st.sets(st.integers(0, max(size - 1, 0)),
                                                max_size=min(size, 200)))), np.int64)
  codes = sparse.encode_escapes(positions, bits)
  escape = (1 << bits) - 1
  np.testing.assert_array_equal(sparse.decode_escapes(codes, bits), positions)
  gaps = np.diff(positions, prepend=-1) - 1
  assert int((codes == escape).sum()) == int((gaps // escape).sum())  # the fewest escapes
  assert codes.size == 0 or codes[-1] != escape


def test_one_bit_escapes_are_a_bitmask():
  w, m = masked((40, 30), 0.3, seed=4)
  leaf = sparse.encode_leaf(w, m, 1, encoding="escape")
  last = int(np.flatnonzero(m.ravel())[-1])
  bitmask = ~m.ravel()[:last + 1]  # 1 = pruned, up to the last kept position
  np.testing.assert_array_equal(sparse.unpack_bits(leaf.index, leaf.entries, 1), bitmask)


# ------------------------------------------------------------------ the choice by bytes


@pytest.mark.parametrize("shape, density, structure", CASES)
@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_auto_never_more_bytes_than_any_fixed_choice(shape, density, structure, value_dtype):
  w, m = masked(shape, density, seed=int(1000 * density) + len(shape), structure=structure,
                kept_zeros=density in (0.3, 1.0))
  fixed = {}
  for encoding, bits in ALL_CHOICES:
    leaf = sparse.encode_leaf(w, m, bits, value_dtype, encoding)
    fixed[encoding, bits] = leaf.nbytes
    # The byte count the choice is made from is the real one.
    assert sparse.encoded_bytes(np.flatnonzero(m.ravel()), encoding, bits,
                                np.dtype(value_dtype).itemsize,
                                int(np.count_nonzero(
                                    (w.ravel()[m.ravel()].astype(value_dtype) == 0)
                                    & ~np.signbit(w.ravel()[m.ravel()])))
                                ) == leaf.nbytes, (encoding, bits)
  auto = sparse.encode_leaf(w, m, "auto", value_dtype, "auto")
  assert auto.nbytes == min(fixed.values())
  assert all(auto.nbytes <= n for n in fixed.values())
  assert fixed[auto.encoding, auto.bits] == auto.nbytes
  # Width auto for one encoding: the best of that encoding; encoding auto at one width: the
  # best at that width.
  for encoding in sparse.ENCODINGS:
    leaf = sparse.encode_leaf(w, m, "auto", value_dtype, encoding)
    assert leaf.encoding == encoding
    assert leaf.nbytes == min(n for (e, _), n in fixed.items() if e == encoding)
  for bits in (1, 5, 8, 16):
    leaf = sparse.encode_leaf(w, m, bits, value_dtype, "auto")
    assert leaf.bits == bits
    assert leaf.nbytes == min(fixed["filler", bits], fixed["escape", bits])
  got_w, got_m = sparse.decode_leaf(auto)
  np.testing.assert_array_equal(got_m, m)
  assert same_bits(got_w, w.astype(value_dtype).astype(np.float32))


def test_ties_go_to_fillers_then_narrower_widths():
  empty = sparse.encode_leaf(np.zeros((30, 20), np.float32), np.zeros((30, 20), bool), "auto",
                             encoding="auto")
  assert (empty.encoding, empty.bits, empty.nbytes) == ("filler", 0, 0)
  full = np.arange(1, 601, dtype=np.float32).reshape(30, 20)
  dense = sparse.encode_leaf(full, np.ones_like(full, bool), "auto", encoding="auto")
  assert (dense.encoding, dense.bits, dense.nbytes) == ("filler", 0, 4 * 600)  # dense storage
  assert dense.fillers == 0 and dense.index.size == 0
  assert sparse.best_encoding(np.array([0, 1, 2]), widths=(5,)) == ("filler", 5, 14)


@SOME
@given(st.sampled_from([(0, 5), (1, 1), (7, 3), (40, 30), (3, 3, 4, 5)]),
       st.sampled_from([0.0, 0.01, 0.05, 0.3, 0.9, 1.0]), st.integers(0, 2**32 - 1),
       st.booleans(), st.sampled_from(["float32", "float16"]))
def test_round_trip_bit_identical_for_every_choice(shape, density, seed, zeros, value_dtype):
  w, m = masked(shape, density, seed, structure=seed % 2 == 0, kept_zeros=zeros)
  want_w = w.astype(value_dtype).astype(np.float32)
  for encoding, bits in ALL_CHOICES + [("auto", "auto")]:
    leaf = sparse.encode_leaf(w, m, bits, value_dtype, encoding)
    assert sparse.check_leaf(leaf) is None, (encoding, bits)
    assert leaf.kept == m.sum()
    got_w, got_m = sparse.decode_leaf(leaf)
    np.testing.assert_array_equal(got_m, m)
    assert same_bits(got_w, want_w), (encoding, bits)
    np.testing.assert_array_equal(sparse.leaf_positions(leaf), np.flatnonzero(m.ravel()))


def test_bad_widths_and_encodings_are_user_errors():
  w, m = masked((10, 10), 0.2)
  for bits, encoding in ((0, "escape"), (17, "filler"), (-1, "auto"), (True, "filler")):
    with pytest.raises(UserError, match="index width"):
      sparse.encode_leaf(w, m, bits, encoding=encoding)
  with pytest.raises(UserError, match="encoding must be one of"):
    sparse.encode_leaf(w, m, 5, encoding="huffman")


# ------------------------------------------------------------------ whole models, files


def toy_model(seed=0):
  """Layers whose best choices differ: sparse FC (escape), conv, a dense-ish FC, an empty FC."""
  params, masks = {}, {}
  for name, shape, density in (("conv1", (5, 5, 1, 8), 0.6), ("fc1", (400, 120), 0.06),
                               ("fc2", (120, 84), 0.99), ("fc3", (84, 10), 0.0)):
    w, m = masked(shape, density, seed=seed + len(name) + shape[-1], structure=name == "fc1")
    params[name] = {"kernel": w, "bias": np.linspace(-1, 1, shape[-1]).astype(np.float32)}
    masks[name] = {"kernel": m, "bias": np.ones(shape[-1], bool)}
  return params, masks


def decoded_equal(export, params, masks, value_dtype="float32"):
  got_p, got_m = export.decode()
  for layer in params:
    np.testing.assert_array_equal(got_m[layer]["kernel"], masks[layer]["kernel"])
    assert same_bits(got_p[layer]["kernel"],
                     params[layer]["kernel"].astype(value_dtype).astype(np.float32))
    assert same_bits(got_p[layer]["bias"], params[layer]["bias"])


def file_manifest(path):
  with np.load(path, allow_pickle=False) as f:
    return int(f["format_version"]), json.loads(str(f["manifest"])), sorted(f.files)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
@pytest.mark.parametrize("compression", ["stored", "deflated"])
def test_format_2_round_trip_and_manifest_records_the_choice(tmp_path, value_dtype, compression):
  params, masks = toy_model()
  export = sparse.encode_model(params, masks, "auto", value_dtype, {"model": "toy"},
                               encoding="auto")
  path = str(tmp_path / "auto.npz")
  size = sparse.save(export, path, 2, compression)
  assert size == os.path.getsize(path)
  version, manifest, members = file_manifest(path)
  assert version == 2 and manifest["value_dtype"] == value_dtype
  assert members == ["dense", "format_version", "index", "manifest", "values"]
  entries = {e["name"]: e for e in manifest["leaves"]}
  value_bytes = np.dtype(value_dtype).itemsize
  for layer in params:
    e = entries[f"{layer}/kernel"]
    positions = np.flatnonzero(masks[layer]["kernel"].ravel())
    assert (e["encoding"], e["index_bits"]) == sparse.best_encoding(positions, value_bytes)[:2]
    assert "kind" not in e and "value_dtype" not in e  # once per file, derivable
  assert (entries["fc1/kernel"]["encoding"], entries["fc3/kernel"]["entries"]) == ("escape", 0)
  assert (entries["fc2/kernel"]["encoding"], entries["fc2/kernel"]["index_bits"]) == ("filler", 0)
  loaded = sparse.load(path)
  assert loaded.format_version == 2
  decoded_equal(loaded, params, masks, value_dtype)
  # The loaded manifest has the in-memory form: kind, encoding, value_dtype on every sparse leaf.
  fc1 = next(e for e in loaded.manifest["leaves"] if e["name"] == "fc1/kernel")
  assert fc1["kind"] == "fc" and fc1["value_dtype"] == value_dtype
  assert fc1["index_bits"] == entries["fc1/kernel"]["index_bits"]
  # Same export, same bytes (no zip dates, no zip64 extras).
  again = str(tmp_path / "again.npz")
  sparse.save(export, again, 2, compression)
  assert open(path, "rb").read() == open(again, "rb").read()
  # Saved again from the loaded export: the same file.
  sparse.save(loaded, again, 2, compression)
  assert open(path, "rb").read() == open(again, "rb").read()


def test_format_2_stores_kept_zeros_and_state(tmp_path):
  params, masks = toy_model(1)
  kernel = params["fc1"]["kernel"]
  kept = np.flatnonzero(masks["fc1"]["kernel"].ravel())[:3]
  kernel.reshape(-1)[kept] = 0.0  # kept connections stored as +0.0: need zero_kept (fillers)
  state = {"batch_stats": {"bn": {"mean": np.arange(4, dtype=np.float32)}}}
  export = sparse.encode_model(params, masks, {"fc": 5, "conv": "auto"}, model_state=state)
  path = str(tmp_path / "zeros.npz")
  sparse.save(export, path, 2)
  _, manifest, members = file_manifest(path)
  assert "zero_kept" in members and "batch_stats/bn/mean.state" in members
  assert next(e for e in manifest["leaves"] if e["name"] == "fc1/kernel")["zero_kept"] == 3
  loaded = sparse.load(path)
  decoded_equal(loaded, params, masks)
  np.testing.assert_array_equal(loaded.decode_state()["batch_stats"]["bn"]["mean"], np.arange(4))


def old_writer(path, params, masks, bits=5):
  """A format-1 file written the way the format-1 writer did (per-leaf members, manifest with
  kind and value_dtype, no encoding field), independently of lwc.sparse's writer."""
  arrays, leaves = {}, []
  for layer in sorted(params):
    leaves.append({"name": f"{layer}/bias", "storage": "dense",
                   "shape": list(params[layer]["bias"].shape)})
    arrays[f"{layer}/bias.dense"] = params[layer]["bias"]
    w, m = params[layer]["kernel"], masks[layer]["kernel"]
    positions = np.flatnonzero(m.ravel())
    gaps = np.diff(positions, prepend=-1) - 1
    skips, values = [], []
    for gap, p in zip(gaps.tolist(), positions.tolist()):
      skips += [2**bits - 1] * (gap // 2**bits) + [gap % 2**bits]
      values += [0.0] * (gap // 2**bits) + [w.ravel()[p]]
    skips = np.array(skips, np.int64)
    planes = (skips[:, None] >> np.arange(bits)) & 1
    arrays[f"{layer}/kernel.values"] = np.array(values, np.float32)
    arrays[f"{layer}/kernel.index"] = np.packbits(planes.astype(np.uint8).ravel(),
                                                  bitorder="little")
    arrays[f"{layer}/kernel.zero_kept"] = np.zeros(0, np.int64)
    leaves.append({"name": f"{layer}/kernel", "storage": "sparse", "shape": list(w.shape),
                   "kind": "conv" if w.ndim == 4 else "fc", "index_bits": bits,
                   "value_dtype": "float32", "entries": len(values),
                   "fillers": len(values) - len(positions), "zero_kept": 0})
  manifest = {"format": "lwc-sparse", "order": "C", "model": "toy", "leaves": leaves}
  np.savez(path, format_version=np.array(1, np.int64),
           manifest=np.array(json.dumps(manifest, sort_keys=True)), **arrays)
  return path


def test_old_format_files_still_load(tmp_path):
  params, masks = toy_model(2)
  params.pop("fc3"), masks.pop("fc3")
  old = old_writer(str(tmp_path / "old.npz"), params, masks)
  loaded = sparse.load(old)
  assert loaded.format_version == 1
  decoded_equal(loaded, params, masks)
  assert {e["name"]: e.get("encoding") for e in loaded.manifest["leaves"]
          if e["storage"] == "sparse"} == {f"{k}/kernel": "filler" for k in params}
  # lwc's own format-1 writer: what it writes is what the old writer wrote, member for member.
  ours = str(tmp_path / "ours.npz")
  sparse.save(sparse.encode_model(params, masks, {"fc": 5, "conv": 5}, info={"model": "toy"}),
              ours, format_version=1)
  with np.load(old) as a, np.load(ours) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      if key == "manifest":
        assert json.loads(str(a[key])) == json.loads(str(b[key]))
      else:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
  # Format 1 has no 0-bit fillers (format 2 has): such a file claiming format 1 is refused.
  zero_bits = old_writer(str(tmp_path / "zero.npz"), params, masks, bits=0)
  with pytest.raises(UserError, match="bad manifest .*bad index_bits 0"):
    sparse.load(zero_bits)
  # And a format-1 file re-saved as format 2 is smaller and decodes the same.
  new = str(tmp_path / "new.npz")
  assert sparse.save(loaded, new, 2) < os.path.getsize(old)
  decoded_equal(sparse.load(new), params, masks)


def test_save_picks_the_oldest_version_that_holds_the_export(tmp_path):
  params, masks = toy_model()
  paper = sparse.encode_model(params, masks)  # the paper's scheme: fillers at 5 / 8 bits
  auto = sparse.encode_model(params, masks, "auto", encoding="auto")
  assert sparse.format_version_for(paper) == 1 and sparse.format_version_for(auto) == 2
  sparse.save(paper, str(tmp_path / "p.npz"))
  sparse.save(auto, str(tmp_path / "a.npz"))
  assert file_manifest(str(tmp_path / "p.npz"))[0] == 1
  assert file_manifest(str(tmp_path / "a.npz"))[0] == 2
  with pytest.raises(UserError, match="format 1 holds only the filler encoding"):
    sparse.save(auto, str(tmp_path / "x.npz"), format_version=1)
  with pytest.raises(UserError, match="deflated needs format 2"):
    sparse.save(paper, str(tmp_path / "x.npz"), format_version=1, compression="deflated")
  with pytest.raises(UserError, match="format_version must be one of 1, 2"):
    sparse.save(paper, str(tmp_path / "x.npz"), format_version=3)
  assert not os.path.exists(tmp_path / "x.npz")


def test_format_2_container_is_smaller(tmp_path):
  """The same (format-1-compatible) export: format 2 costs fewer container bytes."""
  params, masks = toy_model()
  export = sparse.encode_model(params, masks)
  v1 = sparse.save(export, str(tmp_path / "v1.npz"), 1)
  v2 = sparse.save(export, str(tmp_path / "v2.npz"), 2)
  payload = sparse.size_report(export)["payload_bytes"]
  assert payload < v2 < v1
  assert v2 - payload < 0.6 * (v1 - payload)  # 18 members -> 5, compact manifest
  deflated = sparse.save(export, str(tmp_path / "d.npz"), 2, "deflated")
  assert deflated < v2


def test_doc_snippet_reads_format_2(tmp_path):
  params, masks = toy_model(3)
  snippet = open(DOC).read().split("## Decoding with plain NumPy")[1]
  snippet = snippet.split("```python")[1].split("```")[0]
  for value_dtype in ("float32", "float16"):
    path = str(tmp_path / f"{value_dtype}.npz")
    sparse.save(sparse.encode_model(params, masks, "auto", value_dtype, encoding="auto"), path, 2)
    scope = {}
    exec(snippet.replace('"model.npz"', repr(path)), scope)  # noqa: S102
    for layer in params:
      assert same_bits(scope["weights"][f"{layer}/kernel"],
                       params[layer]["kernel"].astype(value_dtype).astype(np.float32))
      assert same_bits(scope["weights"][f"{layer}/bias"], params[layer]["bias"])


# ------------------------------------------------------------------ bad format-2 files


def members_of(path):
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def write_members(path, arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def edit_manifest(arrays, edit):
  manifest = json.loads(str(arrays["manifest"]))
  edit(manifest)
  return {**arrays, "manifest": np.array(json.dumps(manifest))}


def kernel(manifest, name="fc1/kernel"):
  return next(e for e in manifest["leaves"] if e["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "format_version": np.array(3)},
     "format_version array(3), this reader understands 1 and 2"),
    (lambda a: {**a, "values": a["values"][:-1]},
     "stream values has {short} items, the manifest's leaves take {values}"),
    (lambda a: {**a, "index": a["index"].astype(np.int16)}, "stream index is int16"),
    (lambda a: {**a, "extra": np.zeros(2)}, "format_version 2: unexpected keys ['extra']"),
    (lambda a: {k: v for k, v in a.items() if k != "dense"},
     "format_version 2: missing keys ['dense']"),
    (lambda a: edit_manifest(a, lambda m: kernel(m).update(encoding="huffman")),
     "bad manifest (format_version 2: leaf fc1/kernel: bad encoding 'huffman')"),
    (lambda a: edit_manifest(a, lambda m: m.update(value_dtype="float64")),
     "bad manifest (format_version 2: bad value_dtype 'float64')"),
    (lambda a: edit_manifest(a, lambda m: kernel(m).update(fillers=kernel(m)["fillers"] + 1)),
     "stream values has"),
    (lambda a: edit_manifest(a, lambda m: kernel(m).update(shape=[20, 3])), "beyond the 60"),
    (lambda a: edit_manifest(a, lambda m: kernel(m).update(fillers=10**9)), "fillers for"),
])
def test_bad_format_2_files_are_user_errors(tmp_path, change, message):
  params, masks = toy_model()
  good = str(tmp_path / "good.npz")
  sparse.save(sparse.encode_model(params, masks, "auto", encoding="auto"), good, 2)
  values = sum(sparse.load(good).leaves[f"{k}/kernel"].values.size for k in params)
  message = message.format(values=values, short=values - 1)
  bad = write_members(str(tmp_path / "bad.npz"), change(members_of(good)))
  with pytest.raises(UserError) as e:
    sparse.load(bad)
  text = str(e.value)
  assert text.startswith(bad + ": ") and message in text and "\n" not in text, text


def test_escape_index_that_ends_with_an_escape_is_refused():
  w, m = masked((20, 10), 0.1, seed=1)
  leaf = sparse.encode_leaf(w, m, 3, encoding="escape")
  codes = np.append(sparse.unpack_bits(leaf.index, leaf.entries, 3), 7)
  bad = sparse.SparseLeaf(leaf.shape, 3, leaf.values, sparse.pack_bits(codes, 3), codes.size,
                          leaf.fillers + 1, leaf.zero_kept, "escape")
  assert sparse.check_leaf(bad) == "the index ends with an escape (no kept connection after it)"
  with pytest.raises(UserError, match="ends with an escape"):
    sparse.decode_leaf(bad)


def test_deflated_member_with_flipped_bytes_is_a_user_error(tmp_path):
  params, masks = toy_model()
  path = str(tmp_path / "d.npz")
  sparse.save(sparse.encode_model(params, masks, "auto", encoding="auto"), path, 2, "deflated")
  data = bytearray(open(path, "rb").read())
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
    info = z.getinfo("values.npy")
  middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  open(path, "wb").write(bytes(data))
  with pytest.raises(UserError, match=r": corrupt \.npz export|: refused"):
    sparse.load(path)


# ------------------------------------------------------------------ the size table


def test_size_table_shows_choice_and_paper_overhead(tmp_path):
  params, masks = toy_model()
  path = str(tmp_path / "t.npz")
  export = sparse.encode_model(params, masks, "auto", encoding="auto")
  size = sparse.save(export, path, 2)
  report = sparse.size_report(sparse.load(path), size)
  fc1 = report["leaves"]["fc1/kernel"]
  assert fc1["encoding"] == "escape" and fc1["fillers"] == 0 and fc1["escapes"] > 0
  assert fc1["entries"] == fc1["kept"]  # escapes are no multiply-adds
  assert fc1["index_entries"] == fc1["kept"] + fc1["escapes"]
  assert fc1["paper_overhead"] == pytest.approx(5 / 32)
  assert report["leaves"]["conv1/kernel"]["paper_overhead"] == pytest.approx(8 / 32)
  paper = sparse.encode_leaf(params["fc1"]["kernel"], masks["fc1"]["kernel"], 5)
  assert fc1["paper_scheme_bytes"] == paper.nbytes > fc1["sparse_bytes"]
  assert fc1["paper_scheme_overhead"] == pytest.approx(sparse.leaf_sizes(paper)["overhead"])
  assert fc1["overhead"] == pytest.approx(
      (8 * fc1["sparse_bytes"] - 32 * fc1["kept"]) / (32 * fc1["kept"]), abs=1e-3)
  assert report["compression_by_file"] == pytest.approx(
      report["all_leaves"]["dense_bytes"] / size)
  assert report["format_version"] == 2
  table = sparse.format_size_table(report)
  row = next(line for line in table.splitlines() if line.startswith("| fc1 |"))
  assert f"| escape | {fc1['index_width']} |" in row and "| 15.6% |" in row
  assert f"{100 * fc1['overhead']:.1f}%" in row
  fc2 = next(line for line in table.splitlines() if line.startswith("| fc2 |"))
  assert "dense (filler, no index) | 0 |" in fc2
  assert f"x by file, {report['all_leaves']['compression_by_count']:.2f}x by count" in table
  assert "file (format 2):" in table


def test_export_model_defaults_choose_by_bytes(tmp_path):
  params, masks = toy_model()
  out = str(tmp_path / "m.npz")
  report = export_lib.export_model(out, params, masks)
  assert report["format_version"] == 2 and report["round_trip"]["params_bit_identical"]
  paper = export_lib.export_model(str(tmp_path / "p.npz"), params, masks, fc_index_bits=5,
                                  conv_index_bits=8, encoding="filler")
  assert report["sizes"]["file_bytes"] < paper["sizes"]["file_bytes"]
  assert {r["index_width"] for n, r in paper["sizes"]["leaves"].items()
          if r["storage"] == "sparse"} == {5, 8}
  with pytest.raises(UserError, match="fc_index_bits=0: must be an integer from 1 to 16"):
    export_lib.export_model(out, params, masks, fc_index_bits=0)
  with pytest.raises(UserError, match="encoding=zip: must be one of auto, filler, escape"):
    export_lib.export_model(out, params, masks, encoding="zip")
  assert math.isfinite(report["sizes"]["compression_by_file"])
