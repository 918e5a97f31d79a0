"""Sparse storage of pruned weights (relative indices), size accounting, and sparse inference.

Encoding of one pruned leaf (the paper's Discussion: relative indices, 5 bits for FC layers and
8 bits for CONV layers), format version 1 (`docs/sparse_format.md` is the reference):

* Order: the leaf is flattened in row-major (C) order of its stored layout, i.e. Flax's:
  Dense kernel (in, out), position `i * out + j`; Conv kernel (kh, kw, in, out).
* Entries: the kept connections (mask True), in increasing position, each stored as a value and
  a b-bit *skip*: the number of positions jumped over since the previous entry (the previous
  position is -1 before the first entry). So `positions = cumsum(skip + 1) - 1`.
* Fillers: a skip must fit in b bits (0 .. 2**b - 1). Before a kept connection preceded by a run
  of z > 2**b - 1 pruned positions, z // 2**b filler entries are inserted, each with skip
  2**b - 1 and value +0.0, each standing on one pruned position; the kept entry then has skip
  z % 2**b. Fillers are stored values: they cost value bits and index bits like any entry.
* Kept zeros: a kept connection whose stored value is +0.0 (all bits zero; rare, and possible
  after a float16 cast) is listed by position in `zero_kept`, so that the decoded mask is exact.
  An entry is a filler iff its value is +0.0 and its position is not in `zero_kept`.
* Index stream: skips are bit-packed, entry k in bits [k*b, (k+1)*b) of the stream, least
  significant bit first; bit j of the stream is bit (j % 8) of byte j // 8 (NumPy
  `packbits(..., bitorder='little')`); unused bits of the last byte are 0.

Invariants checked by `encode_leaf` and `decode_leaf`: pruned positions hold +0.0 bit for bit (so
the decoded weights are bit-identical); decode(encode(w, m)) == (w, m) for float32 values.

Which leaves are stored sparse is decided by `lwc.layers` (the prunable leaves), plus any leaf
with a pruned entry. A model's non-parameter collections (`model_state`: BatchNorm statistics,
NNX rng state) ride along exactly, unencoded, in an optional section (`encode_model(...,
model_state=...)`, `Export.decode_state`); params and state may be nested dicts or nnx.State.

Sparse inference runs the forward pass of LeNet-300-100 / LeNet-5 on NumPy arrays with the
weight matrices either dense (BLAS) or CSR (scipy.sparse), activations feature-major; conv
layers are the (kh*kw*in, out) kernel matrix times transposed im2col patches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import itertools
import json
import math
import os
from typing import Any
import zipfile
import zlib

import numpy as np

from lwc.errors import UserError

FORMAT_VERSION = 1
FORMAT_NAME = "lwc-sparse"
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}
VALUE_DTYPES = ("float32", "float16")
MAX_INDEX_BITS = 16
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Relative indices with fillers.


def _check_bits(bits: int) -> None:
  if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= MAX_INDEX_BITS):
    raise UserError(f"index width must be an integer from 1 to {MAX_INDEX_BITS} bits, got {bits}")


def encode_positions(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Skips (relative indices) with fillers for strictly increasing positions >= 0.

  Args:
    positions: int (n,), strictly increasing, >= 0: flat positions of the kept connections.
    bits: index width b, 1..16.

  Returns:
    (skips, real): skips uint32 (n + f,) each <= 2**b - 1, f = number of fillers; real bool
    (n + f,), False at fillers. `cumsum(skips + 1) - 1` gives the entries' positions, and
    those with `real` True are exactly `positions`.
  """
  _check_bits(bits)
  positions = np.asarray(positions, np.int64)
  if positions.ndim != 1:
    raise ValueError(f"positions must be 1-D, got shape {positions.shape}")
  if positions.size and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
    raise ValueError("positions must be >= 0 and strictly increasing")
  period = 1 << bits  # positions one filler advances: 2**b - 1 skipped + its own
  zeros_before = np.diff(positions, prepend=-1) - 1
  fillers = zeros_before // period
  real_at = np.cumsum(fillers + 1) - 1  # entry index of each kept connection
  total = int(real_at[-1]) + 1 if positions.size else 0
  skips = np.full(total, period - 1, np.uint32)
  skips[real_at] = (zeros_before % period).astype(np.uint32)
  real = np.zeros(total, bool)
  real[real_at] = True
  return skips, real


def decode_positions(skips: np.ndarray) -> np.ndarray:
  """Flat positions (int64, (n,)) of the entries whose skips are given (see module docstring)."""
  return np.cumsum(np.asarray(skips, np.int64) + 1) - 1


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """uint8 (ceil(n * bits / 8),): each value's low `bits` bits, LSB first, little bit order."""
  _check_bits(bits)
  values = np.asarray(values, np.uint32)
  if values.size and int(values.max()) >> bits:
    raise ValueError(f"value {int(values.max())} does not fit in {bits} bits")
  planes = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
  return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
  """Inverse of `pack_bits`: uint32 (count,) from uint8 (ceil(count * bits / 8),)."""
  _check_bits(bits)
  planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
  weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
  return planes.reshape(count, bits).astype(np.uint32) @ weights


def packed_length(entries: int, bits: int) -> int:
  """Bytes of the packed index stream of `entries` skips of `bits` bits."""
  return (entries * bits + 7) // 8


# ---------------------------------------------------------------------------------------------
# One leaf.


@dataclasses.dataclass(frozen=True)
class SparseLeaf:
  """One pruned leaf in relative-index form.

  shape: the leaf's shape; size = prod(shape).
  bits: index width b.
  values: float32 or float16 (entries,); fillers hold +0.0.
  index: uint8 (packed_length(entries, bits),), the packed skips.
  entries: stored entries, kept connections + fillers.
  fillers: filler entries.
  zero_kept: int64 (z,), sorted flat positions of kept connections stored as +0.0.
  """

  shape: tuple[int, ...]
  bits: int
  values: np.ndarray
  index: np.ndarray
  entries: int
  fillers: int
  zero_kept: np.ndarray

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def kept(self) -> int:
    """Kept (unpruned) connections."""
    return self.entries - self.fillers


def _bits_of(values: np.ndarray) -> np.ndarray:
  """Bit patterns of float16/float32 values as unsigned ints (same shape)."""
  return values.view(np.uint16 if values.dtype == np.float16 else np.uint32)


def encode_leaf(weights: np.ndarray, mask: np.ndarray, bits: int,
                value_dtype: str = "float32") -> SparseLeaf:
  """Relative-index form of `weights` where `mask` is True.

  Args:
    weights: float array, any shape; pruned entries must be +0.0 bit for bit.
    mask: bool, same shape, True = kept connection.
    bits: index width (1..16).
    value_dtype: 'float32' or 'float16' for the stored values.

  Raises:
    UserError if a pruned position holds anything but +0.0 (decoding would not give the weights
    back), or shapes differ.
  """
  _check_bits(bits)
  if value_dtype not in VALUE_DTYPES:
    raise UserError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype}")
  weights = np.asarray(weights, np.float32)
  mask = np.asarray(mask, bool)
  if weights.shape != mask.shape:
    raise ValueError(f"weights {weights.shape} and mask {mask.shape} differ in shape")
  flat_w, flat_m = weights.ravel(), mask.ravel()
  if np.any(_bits_of(flat_w[~flat_m]) != 0):
    raise UserError(f"a pruned connection holds a value other than +0.0 "
                    f"({int(np.count_nonzero(_bits_of(flat_w[~flat_m])))} of them)")
  positions = np.flatnonzero(flat_m)
  kept_values = flat_w[positions].astype(value_dtype)
  skips, real = encode_positions(positions, bits)
  values = np.zeros(skips.size, value_dtype)
  values[real] = kept_values
  zero_kept = positions[_bits_of(kept_values) == 0].astype(np.int64)
  return SparseLeaf(shape=tuple(int(d) for d in weights.shape), bits=int(bits), values=values,
                    index=pack_bits(skips, bits), entries=int(skips.size),
                    fillers=int(skips.size - positions.size), zero_kept=zero_kept)


def _real_entries(leaf: SparseLeaf, positions: np.ndarray) -> np.ndarray:
  """bool (entries,): True at kept connections, False at fillers."""
  real = _bits_of(leaf.values) != 0
  if leaf.zero_kept.size:
    real |= np.isin(positions, leaf.zero_kept, assume_unique=True)
  return real


def check_leaf(leaf: SparseLeaf) -> str | None:
  """What is inconsistent in `leaf` (lengths, dtypes, positions, fillers), or None."""
  if leaf.bits != int(leaf.bits) or not 1 <= leaf.bits <= MAX_INDEX_BITS:
    return f"index width {leaf.bits} outside 1..{MAX_INDEX_BITS}"
  if leaf.values.dtype.name not in VALUE_DTYPES or leaf.values.ndim != 1:
    return f"values must be 1-D {' or '.join(VALUE_DTYPES)}, got {leaf.values.dtype} " \
           f"{leaf.values.shape}"
  if leaf.values.size != leaf.entries:
    return f"{leaf.values.size} values for {leaf.entries} entries"
  if leaf.index.dtype != np.uint8 or leaf.index.ndim != 1:
    return f"index must be 1-D uint8, got {leaf.index.dtype} {leaf.index.shape}"
  if leaf.index.size != packed_length(leaf.entries, leaf.bits):
    return (f"index has {leaf.index.size} bytes, {leaf.entries} entries of {leaf.bits} bits "
            f"need {packed_length(leaf.entries, leaf.bits)}")
  tail_bits = leaf.entries * leaf.bits % 8
  if tail_bits and int(leaf.index[-1]) >> tail_bits:
    return "unused bits of the last index byte are not 0"
  if leaf.zero_kept.dtype != np.int64 or leaf.zero_kept.ndim != 1:
    return f"zero_kept must be 1-D int64, got {leaf.zero_kept.dtype} {leaf.zero_kept.shape}"
  skips = unpack_bits(leaf.index, leaf.entries, leaf.bits)
  positions = decode_positions(skips)
  if positions.size and positions[-1] >= leaf.size:
    return f"entry at position {int(positions[-1])} beyond the {leaf.size} positions of the leaf"
  if leaf.zero_kept.size:
    if np.any(np.diff(leaf.zero_kept) <= 0):
      return "zero_kept is not strictly increasing"
    at = np.searchsorted(positions, leaf.zero_kept)
    if np.any(at >= positions.size) or np.any(positions[np.minimum(at, positions.size - 1)]
                                              != leaf.zero_kept):
      return "zero_kept names a position that holds no entry"
    if np.any(_bits_of(leaf.values[at]) != 0):
      return "zero_kept names an entry whose value is not +0.0"
  real = _real_entries(leaf, positions)
  fillers = int(np.count_nonzero(~real))
  if fillers != leaf.fillers:
    return f"{fillers} filler entries (value +0.0, not in zero_kept), manifest says {leaf.fillers}"
  if np.any(skips[~real] != (1 << leaf.bits) - 1):
    return f"a filler entry has a skip other than {(1 << leaf.bits) - 1}"
  return None


def decode_leaf(leaf: SparseLeaf) -> tuple[np.ndarray, np.ndarray]:
  """(weights float32 of leaf.shape, mask bool of leaf.shape); exact inverse of `encode_leaf`.

  Raises UserError if the leaf is inconsistent (see `check_leaf`).
  """
  problem = check_leaf(leaf)
  if problem:
    raise UserError(problem)
  positions = decode_positions(unpack_bits(leaf.index, leaf.entries, leaf.bits))
  real = _real_entries(leaf, positions)
  weights = np.zeros(leaf.size, np.float32)
  weights[positions[real]] = leaf.values[real].astype(np.float32)
  mask = np.zeros(leaf.size, bool)
  mask[positions[real]] = True
  return weights.reshape(leaf.shape), mask.reshape(leaf.shape)


# ---------------------------------------------------------------------------------------------
# Whole models: which leaves are sparse, index widths, the file.


def leaf_kind(shape: tuple[int, ...]) -> str:
  """'conv' for 4-D kernels (kh, kw, in, out), else 'fc' (index width chosen by kind)."""
  return "conv" if len(shape) == 4 else "fc"


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
  """{'fc1/kernel': array} from nested dicts {'fc1': {'kernel': array}}, in sorted key order."""
  out = {}
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      out.update({f"{key}/{k}": v for k, v in flatten(value).items()})
    else:
      out[str(key)] = np.asarray(value)
  return out


def unflatten(leaves: Mapping[str, Any]) -> dict:
  """Nested dicts from {'fc1/kernel': x}; inverse of `flatten`."""
  out: dict = {}
  for name, value in leaves.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _name_path(name: str) -> tuple:
  """A jax key path for a `/`-joined leaf name, for asking lwc.layers about it."""
  import jax
  return tuple(jax.tree_util.DictKey(k) for k in name.split("/"))


def _is_sparse(path, weights: np.ndarray, mask: np.ndarray, is_prunable=None) -> bool:
  from lwc import layers
  prunable = layers.DEFAULT if is_prunable is None else is_prunable
  return bool(prunable(path, weights)) or not bool(np.all(mask))


def is_sparse_leaf(name: str, mask: np.ndarray, is_prunable=None) -> bool:
  """Prunable leaves (as lwc.layers decides: Dense/Conv kernels, embeddings, any floating weight
  of 2+ dimensions but biases and norm scales/statistics) are stored sparse, so is any leaf with
  a pruned entry; other leaves (biases) are stored dense."""
  return _is_sparse(_name_path(name), np.asarray(mask), mask, is_prunable)


# Tree types an export restores: the root container of params (and masks) and of model_state.
_TREE_TYPES = ("dict", "nnx.State", "FrozenDict")


def _tree_type(tree) -> str:
  if isinstance(tree, dict):
    return "dict"
  kind = f"{type(tree).__module__}.{type(tree).__name__}"
  if kind.startswith("flax.nnx") and type(tree).__name__ == "State":
    return "nnx.State"
  if type(tree).__name__ == "FrozenDict":
    return "FrozenDict"
  if isinstance(tree, Mapping):
    return "dict"
  raise UserError(f"cannot export a {type(tree).__name__} tree: nested dicts (Linen), "
                  "FrozenDict or an nnx.State (pure, from lwc.nnx_model) are supported")


def _key_of(entry) -> str | int:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      key = getattr(entry, attr)
      break
  else:
    key = entry
  if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
    raise UserError(f"cannot export a tree key {key!r} ({type(key).__name__}): keys must be "
                    "strings or integers")
  return key if isinstance(key, str) else int(key)


def _flat_tree(tree, what: str) -> list[tuple[str, list, Any]]:
  """[(name, keys, leaf)] of a nested-mapping tree, in the tree's (sorted) order; `name` is the
  keys `/`-joined, `keys` the JSON-able path (ints stay ints). NNX Variables are opened."""
  import jax
  out, seen = [], {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if any(not hasattr(p, "key") for p in path):
      if (len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey)
              and path[-1].name == "value" and all(hasattr(p, "key") for p in path[:-1])):
        path = path[:-1]  # an NNX Variable: its value
      else:
        raise UserError(f"{what}: cannot export {jax.tree_util.keystr(path)}: only nested "
                        "dicts / nnx.State trees are supported (no lists or tuples)")
    keys = [_key_of(p) for p in path]
    name = "/".join(str(k) for k in keys)
    if not keys:
      raise UserError(f"{what}: a bare array, not a tree of named leaves")
    if name in seen:
      raise UserError(f"{what}: two leaves are both named '{name}'")
    seen[name] = True
    out.append((name, keys, leaf))
  return out


def _needs_path(keys: list) -> bool:
  return any(not isinstance(k, str) or "/" in k or not k for k in keys)


def _build_tree(items: list[tuple[list, Any]], tree_type: str):
  """The tree of `_flat_tree`'s keys -> leaves, as `tree_type`."""
  root: dict = {}
  for keys, value in items:
    node = root
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  if tree_type == "nnx.State":
    from flax import nnx
    return nnx.State(root)
  if tree_type == "FrozenDict":
    from flax.core import freeze
    return freeze(root)
  return root


def _state_dtype(name: str) -> np.dtype:
  """The NumPy dtype called `name` (ml_dtypes ones such as bfloat16 included)."""
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes
    if not hasattr(ml_dtypes, name):
      raise
    return np.dtype(getattr(ml_dtypes, name))


def _stored_dtype(dtype: np.dtype) -> np.dtype:
  """How an array of `dtype` is stored in the .npz: as is, or (ml_dtypes: bfloat16, float8...)
  as its bits (unsigned ints of the same width), since .npy has no such dtypes."""
  return np.dtype(f"uint{8 * dtype.itemsize}") if dtype.kind == "V" else dtype


def _encode_state_leaf(name: str, keys: list, leaf) -> tuple[dict, np.ndarray]:
  """(manifest entry, stored array) of one model_state leaf; exact (bits are kept)."""
  import jax
  entry: dict = {"name": name}
  if _needs_path(keys):
    entry["path"] = keys
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = np.asarray(jax.random.key_data(leaf))
    entry.update(shape=list(leaf.shape), dtype="key", key_impl=str(jax.random.key_impl(leaf)),
                 stored_dtype=data.dtype.name, stored_shape=list(data.shape))
    return entry, data
  array = np.asarray(leaf)
  if array.dtype.kind not in "biufcV" or (array.dtype.kind == "V" and array.dtype.names):
    raise UserError(f"model_state leaf {name} has dtype {array.dtype}: only numeric arrays and "
                    "PRNG keys can be exported")
  array = np.array(array, copy=True, order="C")  # (ascontiguousarray would make 0-d 1-d)
  stored = array.view(_stored_dtype(array.dtype))
  entry.update(shape=list(array.shape), dtype=array.dtype.name)
  if stored.dtype != array.dtype:
    entry["stored_dtype"] = stored.dtype.name
  return entry, stored


def _decode_state_leaf(entry: dict, stored: np.ndarray):
  if entry["dtype"] == "key":
    import jax
    return jax.random.wrap_key_data(stored, impl=entry["key_impl"])
  dtype = _state_dtype(entry["dtype"])
  return np.array(stored, copy=True, order="C").view(dtype) if stored.dtype != dtype else stored


@dataclasses.dataclass(frozen=True)
class Export:
  """A decoded-on-demand export: manifest (JSON-able dict) and leaves by name.

  leaves[name] is a SparseLeaf (sparse storage) or a float32 ndarray (dense storage). state[name]
  is a model_state leaf (BatchNorm statistics, NNX rng counts and keys, ...) as stored in the
  file (see `decode_state`); empty when the export has no model state.
  """

  manifest: dict
  leaves: dict[str, SparseLeaf | np.ndarray]
  state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def _entries(self) -> dict[str, dict]:
    return {e["name"]: e for e in self.manifest.get("leaves", [])}

  def decode(self) -> tuple[PyTree, PyTree]:
    """(params, masks) as nested dicts of NumPy arrays (float32 / bool), or as the tree type
    they were exported from (an nnx.State)."""
    entries = self._entries()
    params, masks = [], []
    for name, leaf in self.leaves.items():
      keys = entries.get(name, {}).get("path") or name.split("/")
      if isinstance(leaf, SparseLeaf):
        w, m = decode_leaf(leaf)
      else:
        w, m = leaf, np.ones(leaf.shape, bool)
      params.append((keys, w))
      masks.append((keys, m))
    tree_type = self.manifest.get("params_tree", "dict")
    return _build_tree(params, tree_type), _build_tree(masks, tree_type)

  def decode_state(self) -> PyTree | None:
    """The model state (`model_state` of encode_model), bit for bit, in its tree type; None when
    the export was written without one."""
    section = self.manifest.get("state")
    if section is None:
      return None
    items = [(e.get("path") or e["name"].split("/"), _decode_state_leaf(e, self.state[e["name"]]))
             for e in section["leaves"]]
    return _build_tree(items, section.get("tree", "dict"))

  def decode_all(self) -> tuple[PyTree, PyTree, PyTree | None]:
    """(params, masks, model_state)."""
    params, masks = self.decode()
    return params, masks, self.decode_state()


def encode_model(params: PyTree, masks: PyTree | None, index_bits: Mapping[str, int] | None = None,
                 value_dtype: str = "float32", info: Mapping | None = None, *,
                 model_state: PyTree | None = None, is_prunable=None) -> Export:
  """Export of a whole model.

  Args:
    params, masks: trees of the same structure: nested dicts (Linen params) or an nnx.State in
      pure form (lwc.nnx_model); masks as lwc.masks (None: nothing pruned).
    index_bits: {'fc': b, 'conv': b}; defaults 5 and 8 (the paper's widths).
    value_dtype: stored dtype of sparse values ('float32' or 'float16'); dense leaves stay
      float32.
    info: JSON-able extra fields for the manifest (model name, source checkpoint).
    model_state: the model's other collections (Linen `{'batch_stats': ...}`, the NNX state);
      stored exactly (dtypes, PRNG keys) and given back by `Export.decode_state`.
    is_prunable: which leaves are weights stored sparse (lwc.layers; default its DEFAULT).
  """
  bits = {**DEFAULT_INDEX_BITS, **(index_bits or {})}
  tree_type = _tree_type(params)
  flat_p = _flat_tree(params, "params")
  if masks is None:
    flat_m = [(name, keys, np.ones(np.shape(w), bool)) for name, keys, w in flat_p]
  else:
    flat_m = _flat_tree(masks, "masks")
  if [n for n, _, _ in flat_p] != [n for n, _, _ in flat_m]:
    raise ValueError("params and masks have different leaves")
  leaves, entries = {}, []
  import jax
  for (name, keys, w), (_, _, m) in zip(flat_p, flat_m):
    w = np.asarray(w, np.float32)
    m = np.asarray(m, bool)
    extra = {"path": keys} if _needs_path(keys) else {}
    path = tuple(jax.tree_util.DictKey(k) for k in keys)
    if not _is_sparse(path, w, m, is_prunable):
      leaves[name] = w
      entries.append({"name": name, "storage": "dense", "shape": list(w.shape), **extra})
      continue
    kind = leaf_kind(w.shape)
    try:
      leaf = encode_leaf(w, m, bits[kind], value_dtype)
    except UserError as e:
      raise UserError(f"leaf {name}: {e}") from None
    except ValueError as e:
      raise ValueError(f"leaf {name}: {e}") from None
    leaves[name] = leaf
    entries.append({"name": name, "storage": "sparse", "shape": list(leaf.shape), "kind": kind,
                    "index_bits": leaf.bits, "value_dtype": value_dtype,
                    "entries": leaf.entries, "fillers": leaf.fillers,
                    "zero_kept": int(leaf.zero_kept.size), **extra})
  manifest = {"format": FORMAT_NAME, "order": "C", **dict(info or {}), "leaves": entries}
  if tree_type != "dict":
    manifest["params_tree"] = tree_type
  state = {}
  if model_state is not None:
    state_entries = []
    for name, keys, leaf in _flat_tree(model_state, "model_state"):
      entry, stored = _encode_state_leaf(name, keys, leaf)
      state_entries.append(entry)
      state[name] = stored
    manifest["state"] = {"tree": _tree_type(model_state), "leaves": state_entries}
  return Export(manifest=manifest, leaves=leaves, state=state)


def _arrays(export: Export) -> dict[str, np.ndarray]:
  arrays = {"format_version": np.array(FORMAT_VERSION, np.int64),
            "manifest": np.array(json.dumps(export.manifest, sort_keys=True))}
  for name, leaf in export.leaves.items():
    if isinstance(leaf, SparseLeaf):
      arrays[f"{name}.values"] = leaf.values
      arrays[f"{name}.index"] = leaf.index
      arrays[f"{name}.zero_kept"] = leaf.zero_kept
    else:
      arrays[f"{name}.dense"] = np.asarray(leaf, np.float32)
  for name, stored in export.state.items():
    arrays[f"{name}.state"] = stored
  return arrays


def save(export: Export, path: str) -> int:
  """Writes an uncompressed .npz (no object arrays); returns the file size in bytes.

  Written to `path + '.tmp'` and renamed, so `path` is never a half-written file.
  """
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **_arrays(export))
  os.replace(tmp, path)
  return os.path.getsize(path)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive


def _expected_keys(manifest: dict) -> set[str]:
  keys = {"format_version", "manifest"}
  for leaf in manifest["leaves"]:
    suffixes = ("values", "index", "zero_kept") if leaf["storage"] == "sparse" else ("dense",)
    keys |= {f"{leaf['name']}.{s}" for s in suffixes}
  for leaf in manifest.get("state", {}).get("leaves", []):
    keys.add(f"{leaf['name']}.state")
  return keys


def _parse_manifest(text: str) -> dict:
  """The manifest dict, with types checked; ValueError naming the first problem."""
  manifest = json.loads(text)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise ValueError(f"manifest is not an {FORMAT_NAME} manifest")
  if manifest.get("order") != "C" or not isinstance(manifest.get("leaves"), list):
    raise ValueError("manifest lacks order 'C' or a list of leaves")
  names = set()
  for leaf in manifest["leaves"]:
    if not isinstance(leaf, dict) or not isinstance(leaf.get("name"), str) or not leaf["name"]:
      raise ValueError("manifest leaf without a name")
    if leaf["name"] in names:
      raise ValueError(f"leaf {leaf['name']} listed twice")
    names.add(leaf["name"])
    shape = leaf.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
      raise ValueError(f"leaf {leaf['name']}: bad shape {shape!r}")
    if leaf.get("storage") == "sparse":
      for field in ("index_bits", "entries", "fillers", "zero_kept"):
        if not isinstance(leaf.get(field), int) or leaf[field] < 0:
          raise ValueError(f"leaf {leaf['name']}: bad {field} {leaf.get(field)!r}")
      if leaf.get("value_dtype") not in VALUE_DTYPES:
        raise ValueError(f"leaf {leaf['name']}: bad value_dtype {leaf.get('value_dtype')!r}")
    elif leaf.get("storage") != "dense":
      raise ValueError(f"leaf {leaf['name']}: storage must be sparse or dense")
    _check_path(leaf)
  if manifest.get("params_tree", "dict") not in _TREE_TYPES:
    raise ValueError(f"params_tree must be one of {', '.join(_TREE_TYPES)}")
  if "state" in manifest:
    _parse_state(manifest["state"])
  return manifest


def _check_path(leaf: dict) -> None:
  if "path" not in leaf:
    return
  path = leaf["path"]
  if not (isinstance(path, list) and path and all(
      isinstance(k, (str, int)) and not isinstance(k, bool) for k in path)
          and "/".join(map(str, path)) == leaf["name"]):
    raise ValueError(f"leaf {leaf['name']}: bad path {path!r}")


def _parse_state(section) -> None:
  """Types of the optional `state` section (model_state leaves)."""
  if not isinstance(section, dict) or not isinstance(section.get("leaves"), list):
    raise ValueError("state section without a list of leaves")
  if section.get("tree", "dict") not in _TREE_TYPES:
    raise ValueError(f"state tree must be one of {', '.join(_TREE_TYPES)}")
  names = set()
  for leaf in section["leaves"]:
    if not isinstance(leaf, dict) or not isinstance(leaf.get("name"), str) or not leaf["name"]:
      raise ValueError("state leaf without a name")
    name = leaf["name"]
    if name in names:
      raise ValueError(f"state leaf {name} listed twice")
    names.add(name)
    for field in ("shape",) + (("stored_shape",) if leaf.get("dtype") == "key" else ()):
      shape = leaf.get(field)
      if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"state leaf {name}: bad {field} {shape!r}")
    _check_path(leaf)
    dtype = leaf.get("dtype")
    if dtype == "key":
      if not isinstance(leaf.get("key_impl"), str):
        raise ValueError(f"state leaf {name}: PRNG key without key_impl")
      continue
    try:
      numpy_dtype = _state_dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, AttributeError):
      numpy_dtype = None
    if numpy_dtype is None or numpy_dtype.kind not in "biufcV" or numpy_dtype.names:
      raise ValueError(f"state leaf {name}: bad dtype {dtype!r}")
    if leaf.get("stored_dtype", dtype) != _stored_dtype(numpy_dtype).name:
      raise ValueError(f"state leaf {name}: bad stored_dtype {leaf.get('stored_dtype')!r}")


def load(path: str) -> Export:
  """Reads and validates an export written by `save`; never unpickles anything.

  Raises UserError (one line naming the file) for an unreadable file, a pickle or object array,
  a format version other than 1, missing or unexpected keys, dtypes or lengths that disagree with
  the manifest, or entries beyond a leaf's size.
  """
  def fail(what: str) -> UserError:
    return UserError(f"{path}: {what}")

  def why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__

  # The kind of file from its first bytes, so that numpy only ever opens a zip archive (for any
  # other file its fallback is unpickling, refused with a message suggesting allow_pickle).
  try:
    with open(path, "rb") as f:
      head = f.read(len(_NPY_MAGIC))
  except OSError as e:
    raise fail(f"not a readable .npz export ({why(e)})") from None
  if not head:
    raise fail("not a readable .npz export (EOFError: No data left in file)")
  if head == _NPY_MAGIC:
    raise fail("a single .npy array, not a .npz export")
  if not head.startswith(_ZIP_MAGICS):
    raise fail("not a readable .npz export (neither a zip archive nor a .npy array)")
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise fail(f"not a readable .npz export ({why(e)})") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise fail("not a .npz export")

  def member(key: str) -> np.ndarray:
    array = archive[key]  # NpzFile hands back raw bytes for a member that is not a .npy
    if not isinstance(array, np.ndarray):
      raise fail(f"member '{key}' is not a .npy array")
    return array

  with archive:
    try:
      keys = set(archive.files)
      if not {"format_version", "manifest"} <= keys:
        raise fail("missing format_version or manifest: not an lwc sparse export")
      version = member("format_version")
      if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise fail(f"format_version {version!r}, this reader understands {FORMAT_VERSION}")
      text = member("manifest")
      if text.shape != () or text.dtype.kind != "U":
        raise fail("manifest is not a string")
      try:
        manifest = _parse_manifest(str(text))
      except (ValueError, TypeError, AttributeError) as e:
        raise fail(f"bad manifest ({e})") from None
      expected = _expected_keys(manifest)
      if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise fail(f"unexpected keys {extra} and missing keys {missing}" if extra and missing
                   else f"unexpected keys {extra}" if extra else f"missing keys {missing}")
      leaves = {}
      for entry in manifest["leaves"]:
        leaves[entry["name"]] = _read_leaf(member, entry, fail)
      state = {}
      for entry in manifest.get("state", {}).get("leaves", []):
        state[entry["name"]] = _read_state_leaf(member, entry, fail)
    except ValueError as e:  # a pickled (object) array, or a corrupt member
      if isinstance(e, UserError):
        raise
      raise fail(f"refused: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
                 ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # bad CRC, cut-off member
      raise fail(f"corrupt .npz export ({why(e)})") from None
  return Export(manifest=manifest, leaves=leaves, state=state)


def _read_state_leaf(member: Callable[[str], np.ndarray], entry: dict,
                     fail: Callable[[str], UserError]) -> np.ndarray:
  name = entry["name"]
  stored = member(f"{name}.state")
  if entry["dtype"] == "key":
    want_dtype, want_shape = entry.get("stored_dtype", "uint32"), tuple(entry["stored_shape"])
  else:
    want_dtype = entry.get("stored_dtype", entry["dtype"])
    want_shape = tuple(entry["shape"])
  if stored.dtype.name != want_dtype or stored.shape != want_shape:
    raise fail(f"state leaf {name}: array {stored.dtype} {stored.shape}, manifest says "
               f"{want_dtype} {want_shape}")
  return stored


def _read_leaf(member: Callable[[str], np.ndarray], entry: dict,
               fail: Callable[[str], UserError]) -> SparseLeaf | np.ndarray:
  name, shape = entry["name"], tuple(entry["shape"])
  if entry["storage"] == "dense":
    dense = member(f"{name}.dense")
    if dense.dtype != np.float32 or dense.shape != shape:
      raise fail(f"leaf {name}: dense array {dense.dtype} {dense.shape}, manifest says float32 "
                 f"{shape}")
    return dense
  leaf = SparseLeaf(shape=shape, bits=entry["index_bits"], values=member(f"{name}.values"),
                    index=member(f"{name}.index"), entries=entry["entries"],
                    fillers=entry["fillers"], zero_kept=member(f"{name}.zero_kept"))
  if leaf.values.dtype.name != entry["value_dtype"]:
    raise fail(f"leaf {name}: values are {leaf.values.dtype}, manifest says "
               f"{entry['value_dtype']}")
  if leaf.zero_kept.size != entry["zero_kept"]:
    raise fail(f"leaf {name}: {leaf.zero_kept.size} zero_kept positions, manifest says "
               f"{entry['zero_kept']}")
  problem = check_leaf(leaf)
  if problem:
    raise fail(f"leaf {name}: {problem}")
  return leaf


# ---------------------------------------------------------------------------------------------
# Size accounting.


def leaf_sizes(leaf: SparseLeaf | np.ndarray) -> dict[str, int | float]:
  """Accounted storage of one leaf, in bits and bytes.

  weights: entries of the dense leaf; kept: kept connections; entries = kept + fillers.
  dense_bytes: float32 dense storage. value_bits, index_bits: all stored entries (fillers
  included); filler_bits: the fillers' share of both; extra_bits: zero_kept positions (64 each).
  sparse_bytes: bytes of the stored arrays (values, packed index, zero_kept).
  index_overhead: index_bits / value_bits (the paper's 15.6% is 5/32).
  overhead: (sparse bits - kept * value width) / (kept * value width): everything stored beyond
  the kept values (indices, fillers, zero_kept).
  """
  if not isinstance(leaf, SparseLeaf):
    n = int(np.size(leaf))
    return {"storage": "dense", "weights": n, "kept": n, "dense_bytes": 4 * n,
            "sparse_bytes": 4 * n}
  vbits = leaf.values.dtype.itemsize * 8
  value_bits, index_bits = leaf.entries * vbits, leaf.entries * leaf.bits
  extra_bits = 64 * int(leaf.zero_kept.size)
  sparse_bits = value_bits + index_bits + extra_bits
  kept_value_bits = leaf.kept * vbits
  sparse_bytes = leaf.values.nbytes + leaf.index.nbytes + leaf.zero_kept.nbytes
  return {
      "storage": "sparse", "weights": leaf.size, "kept": leaf.kept, "entries": leaf.entries,
      "fillers": leaf.fillers, "index_width": leaf.bits, "value_width": vbits,
      "density": leaf.kept / leaf.size if leaf.size else 0.0,
      "dense_bytes": 4 * leaf.size, "value_bits": value_bits, "index_bits": index_bits,
      "filler_bits": leaf.fillers * (vbits + leaf.bits), "extra_bits": extra_bits,
      "sparse_bits": sparse_bits, "sparse_bytes": sparse_bytes,
      "index_overhead": index_bits / value_bits if value_bits else 0.0,
      "overhead": (sparse_bits - kept_value_bits) / kept_value_bits if kept_value_bits else 0.0,
      "compression_by_count": leaf.size / leaf.kept if leaf.kept else math.inf,
      "compression_by_size": 4 * leaf.size / sparse_bytes if sparse_bytes else math.inf,
  }


def _totals(rows: list[dict]) -> dict[str, int | float]:
  keys = ("weights", "kept", "dense_bytes", "sparse_bytes", "entries", "fillers", "value_bits",
          "index_bits", "filler_bits", "extra_bits", "sparse_bits")
  t = {k: sum(int(r.get(k, 0)) for r in rows) for k in keys}
  kept_value_bits = sum(r["kept"] * r.get("value_width", 32) for r in rows)
  stored_bits = t["sparse_bits"] + sum(8 * r["sparse_bytes"] for r in rows
                                       if r["storage"] == "dense")
  t.update({
      "density": t["kept"] / t["weights"] if t["weights"] else 0.0,
      "index_overhead": t["index_bits"] / t["value_bits"] if t["value_bits"] else 0.0,
      "overhead": (stored_bits - kept_value_bits) / kept_value_bits if kept_value_bits else 0.0,
      "compression_by_count": t["weights"] / t["kept"] if t["kept"] else math.inf,
      "compression_by_size": t["dense_bytes"] / t["sparse_bytes"] if t["sparse_bytes"]
      else math.inf})
  return t


def size_report(export: Export, file_bytes: int | None = None) -> dict:
  """Per-leaf sizes, totals over sparse (pruned) leaves and over every leaf, and the file.

  `payload_bytes` sums the stored arrays (what the accounting counts); `file_bytes` is the real
  .npz size, whose difference from the payload is the container (zip and .npy headers, manifest).
  """
  rows = {name: leaf_sizes(leaf) for name, leaf in export.leaves.items()}
  sparse_rows = [r for r in rows.values() if r["storage"] == "sparse"]
  report = {"leaves": rows, "pruned_layers": _totals(sparse_rows),
            "all_leaves": _totals(list(rows.values()))}
  report["payload_bytes"] = report["all_leaves"]["sparse_bytes"]
  if file_bytes is not None:
    report["file_bytes"] = file_bytes
    report["container_bytes"] = file_bytes - report["payload_bytes"]
  return report


def _layer_of(name: str) -> str:
  """The layer a leaf name belongs to, as lwc.layers names it (`fc1` for `fc1/kernel`)."""
  from lwc import layers
  return layers.layer_name(_name_path(name))


def format_size_table(report: dict) -> str:
  """Markdown table of `size_report`: one row per sparse leaf, then totals."""
  head = ("| layer | weights | kept | density | fillers | idx bits | dense bytes | sparse bytes "
          "(values+index) | index/values | overhead | compression by count | by size |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
  lines = []
  for name, r in report["leaves"].items():
    if r["storage"] != "sparse":
      continue
    lines.append(
        f"| {_layer_of(name)} | {r['weights']:,} | {r['kept']:,} | "
        f"{100 * r['density']:.2f}% | {r['fillers']:,} | {r['index_width']} | "
        f"{r['dense_bytes']:,} | {r['sparse_bytes']:,} | {100 * r['index_overhead']:.1f}% | "
        f"{100 * r['overhead']:.1f}% | {r['compression_by_count']:.1f}x | "
        f"{r['compression_by_size']:.1f}x |")
  for label, t in (("total (pruned layers)", report["pruned_layers"]),
                   ("total (with dense biases)", report["all_leaves"])):
    lines.append(
        f"| {label} | {t['weights']:,} | {t['kept']:,} | {100 * t['density']:.2f}% | "
        f"{t['fillers']:,} | | {t['dense_bytes']:,} | {t['sparse_bytes']:,} | "
        f"{100 * t['index_overhead']:.1f}% | {100 * t['overhead']:.1f}% | "
        f"{t['compression_by_count']:.1f}x | {t['compression_by_size']:.1f}x |")
  out = head + "\n".join(lines) + "\n"
  if "file_bytes" in report:
    out += (f"\nfile: {report['file_bytes']:,} bytes = payload {report['payload_bytes']:,} + "
            f"container {report['container_bytes']:,} (zip and .npy headers, manifest)\n")
  return out


def index_width_sweep(export: Export, widths: list[int]) -> dict[str, dict[int, int]]:
  """{sparse leaf: {b: sparse bytes when re-encoded with b-bit indices}} (fillers included)."""
  out = {}
  for name, leaf in export.leaves.items():
    if isinstance(leaf, SparseLeaf):
      weights, mask = decode_leaf(leaf)
      out[name] = {b: leaf_sizes(encode_leaf(weights, mask, b, leaf.values.dtype.name))
                   ["sparse_bytes"] for b in widths}
  return out


def format_sweep_table(sweep: dict[str, dict[int, int]]) -> str:
  """Markdown: sparse bytes per leaf and index width, and the smallest."""
  widths = sorted({b for row in sweep.values() for b in row})
  lines = ["| layer | " + " | ".join(f"{b} bits" for b in widths) + " | smallest |",
           "|---|" + "---:|" * (len(widths) + 1)]
  totals = {b: sum(row[b] for row in sweep.values()) for b in widths}
  for name, row in list(sweep.items()) + [("total", totals)]:
    best = min(widths, key=lambda b: row[b])
    lines.append(f"| {_layer_of(name) if name != 'total' else name} | " +
                 " | ".join(f"{row[b]:,}" for b in widths) + f" | {best} bits |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Inference on NumPy: dense (BLAS) or CSR (scipy.sparse) weight matrices.
#
# Activations are kept feature-major: an FC layer sees X (features, batch), a conv layer
# (channels, batch, H, W). Every layer is then Y = W.T @ X + b with X C-contiguous, which is the
# natural orientation of a CSR matrix times dense columns, and no transposes happen between
# layers (only at the input and before the first FC layer of LeNet-5).


class DenseMatrix:
  """X (K, B) -> W.T @ X + b (N, B) with W float32 (K, N) dense (BLAS), kept as W.T."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray):
    self.weights_t = np.ascontiguousarray(np.asarray(kernel, np.float32).T)
    self.bias = np.asarray(bias, np.float32)[:, None]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    y = self.weights_t @ x
    y += self.bias
    return y


_POOL = None


def _pool(threads: int):
  """A process-wide thread pool for CSR row blocks (scipy's kernels release the GIL)."""
  global _POOL
  if _POOL is None or _POOL._max_workers < threads:
    from concurrent.futures import ThreadPoolExecutor
    if _POOL is not None:
      _POOL.shutdown(wait=False)
    _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lwc-csr")
  return _POOL


class CsrMatrix:
  """X (K, B) -> W.T @ X + b (N, B) with W.T held as CSR (N rows of K), float32.

  Row n of W.T lists the kept inputs of output n. Batch 1 is a CSR matrix-vector product (work
  ~ kept weights); batch B a CSR times dense (K, B) product, each kept weight an axpy over the
  B contiguous columns. scipy's compiled kernels (`csr_matvec`, `csr_matvecs`, which accumulate
  into Y, here pre-filled with the bias) are called directly when available, to keep the
  per-call overhead small at batch 1; otherwise `csr_array @`.

  threads: rows are cut into this many blocks of equal nonzero count, run on a thread pool
  (scipy releases the GIL in its kernels), when the matrix has at least `min_parallel_nnz`
  nonzeros; below that the hand-off costs more than it saves. Default: one thread per CPU, as
  OpenBLAS uses for the dense product.
  """

  def __init__(self, kernel: np.ndarray, bias: np.ndarray, threads: int | None = None,
               min_parallel_nnz: int = 200_000):
    import scipy.sparse

    self.shape = kernel.shape  # (K, N)
    self.matrix = scipy.sparse.csr_array(np.asarray(kernel, np.float32).T)
    self.matrix.sort_indices()
    self.bias = np.asarray(bias, np.float32)
    try:
      from scipy.sparse import _sparsetools
      self._tools = _sparsetools
    except ImportError:  # pragma: no cover - older or newer scipy layouts
      self._tools = None
    threads = threads or os.cpu_count() or 1
    self.threads = threads if self.nnz >= min_parallel_nnz and self._tools else 1
    self._blocks = self._row_blocks(self.threads)

  @property
  def nnz(self) -> int:
    return int(self.matrix.nnz)

  def _row_blocks(self, parts: int) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row, end row, indptr from 0, indices, data) per block of ~nnz/parts nonzeros."""
    m = self.matrix
    cuts = np.searchsorted(m.indptr, np.linspace(0, m.nnz, parts + 1)[1:-1])
    bounds = [0, *sorted({int(c) for c in cuts} - {0, m.shape[0]}), m.shape[0]]
    blocks = []
    for r0, r1 in itertools.pairwise(bounds):
      lo, hi = int(m.indptr[r0]), int(m.indptr[r1])
      blocks.append((r0, r1, (m.indptr[r0:r1 + 1] - lo).astype(m.indptr.dtype),
                     m.indices[lo:hi], m.data[lo:hi]))
    return blocks

  def _matvec(self, x: np.ndarray, y: np.ndarray, block) -> None:
    r0, r1, indptr, indices, data = block
    self._tools.csr_matvec(r1 - r0, self.shape[0], indptr, indices, data, x, y[r0:r1])

  def _matvecs(self, x: np.ndarray, y: np.ndarray, block) -> None:
    r0, r1, indptr, indices, data = block
    self._tools.csr_matvecs(r1 - r0, self.shape[0], y.shape[1], indptr, indices, data, x,
                            y[r0:r1].reshape(-1))

  def _run(self, fn, *args) -> None:
    if len(self._blocks) == 1:
      fn(*args, self._blocks[0])
      return
    futures = [_pool(self.threads).submit(fn, *args, b) for b in self._blocks[1:]]
    fn(*args, self._blocks[0])
    for f in futures:
      f.result()

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if self._tools is None:
      return self.matrix @ x + self.bias[:, None]
    batch = x.shape[1]
    if batch == 1:
      y = self.bias.copy()
      self._run(self._matvec, x.reshape(-1), y)
      return y[:, None]
    y = np.empty((self.shape[1], batch), np.float32)
    y[:] = self.bias[:, None]
    self._run(self._matvecs, x.reshape(-1), y)
    return y


def im2col_t(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
  """Transposed patches of a VALID, stride-1 convolution, channel-major.

  x (C, B, H, W) -> (kh*kw*C, B*H'*W'), H' = H - kh + 1, W' = W - kw + 1. Row order (kh, kw,
  C) matches a Flax Conv kernel (kh, kw, C, O) reshaped to (kh*kw*C, O); column order
  (B, H', W').
  """
  c, b, h, w = x.shape
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  # windows: (C, B, H', W', kh, kw) -> (kh, kw, C, B, H', W')
  return np.ascontiguousarray(windows.transpose(4, 5, 0, 1, 2, 3)).reshape(
      kh * kw * c, b * (h - kh + 1) * (w - kw + 1))


class Conv:
  """VALID stride-1 convolution on (C, B, H, W): the (kh*kw*C, O) kernel matrix (dense or CSR)
  times the transposed im2col patches; returns (O, B, H', W')."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray, matrix: Callable):
    self.kh, self.kw, self.c, self.o = kernel.shape
    self.linear = matrix(np.asarray(kernel).reshape(-1, self.o), bias)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    _, b, h, w = x.shape
    y = self.linear(im2col_t(x, self.kh, self.kw))
    return y.reshape(self.o, b, h - self.kh + 1, w - self.kw + 1)


def _max_pool_2x2(x: np.ndarray) -> np.ndarray:
  """2x2 max pooling, stride 2, on (C, B, H, W) with even H and W."""
  # Four strided views and three elementwise maxima: much faster in NumPy than a reduction
  # over the two size-2 axes of a reshape.
  return np.maximum(np.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                    np.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


def _relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0, out=x)


def _lenet_300_100(layers: Mapping[str, Callable], images: np.ndarray,
                   record: dict | None = None) -> np.ndarray:
  """images (B, 28, 28, 1) -> logits (10, B), as lwc.models.lenet.LeNet300100."""
  x = np.ascontiguousarray(images.reshape(images.shape[0], -1).T)  # (784, B)
  for name in ("fc1", "fc2", "fc3"):
    if record is not None:
      record[name] = x
    x = layers[name](x)
    if name != "fc3":
      x = _relu(x)
  return x


def _lenet5(layers: Mapping[str, Callable], images: np.ndarray,
            record: dict | None = None) -> np.ndarray:
  """images (B, 28, 28, 1) -> logits (10, B), as lwc.models.lenet.LeNet5 (no conv ReLU)."""
  x = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # (1, B, 28, 28)
  for name in ("conv1", "conv2"):
    if record is not None:
      record[name] = x
    x = _max_pool_2x2(layers[name](x))
  c, b, h, w = x.shape
  x = np.ascontiguousarray(x.transpose(2, 3, 0, 1)).reshape(h * w * c, b)  # Flax's NHWC flatten
  if record is not None:
    record["fc1"] = x
  x = _relu(layers["fc1"](x))
  if record is not None:
    record["fc2"] = x
  return layers["fc2"](x)


FORWARD = {"lenet_300_100": _lenet_300_100, "lenet5": _lenet5}


class NumpyModel:
  """The forward pass of `model` (lwc.models names) on NumPy, mirroring lwc/models/lenet.py.

  backend 'dense': weight matrices dense (BLAS); 'csr': CSR (scipy.sparse), `csr_threads` as
  CsrMatrix's `threads`. Any layer widths (shapes come from `params`).
  Call with images float32 (B, 28, 28, 1); returns logits float32 (B, 10).
  """

  def __init__(self, model: str, params: Mapping, backend: str = "csr",
               csr_threads: int | None = None):
    if model not in FORWARD:
      raise UserError(f"no NumPy forward pass for model '{model}', expected one of: "
                      f"{', '.join(sorted(FORWARD))}")
    if backend not in ("dense", "csr"):
      raise UserError(f"backend must be dense or csr, got '{backend}'")
    matrix = (functools.partial(CsrMatrix, threads=csr_threads) if backend == "csr"
              else DenseMatrix)
    self.forward = FORWARD[model]
    self.layers = {}
    from lwc import layers
    weights = layers.prunable_leaves(params)  # {layer: (path, kernel)}
    for name, p in params.items():
      if name not in weights:
        raise UserError(f"layer {name} of {model} has no weight (leaves: {', '.join(p)})")
      kernel = np.asarray(weights[name][1], np.float32)
      bias = np.asarray(p["bias"], np.float32)
      self.layers[name] = (Conv(kernel, bias, matrix) if kernel.ndim == 4
                           else matrix(kernel, bias))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.forward(self.layers, np.asarray(images, np.float32)).T

  def layer_inputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """{layer: its input in the internal feature-major layout} for one forward pass."""
    record: dict = {}
    self.forward(self.layers, np.asarray(images, np.float32), record)
    return record


def predict(model: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
            batch_size: int = 1000) -> np.ndarray:
  """Argmax predictions int64 (N,) of `model` over images (N, ...) in batches."""
  out = [np.argmax(model(images[s:s + batch_size]), -1) for s in range(0, len(images),
                                                                          batch_size)]
  return np.concatenate(out) if out else np.zeros(0, np.int64)
