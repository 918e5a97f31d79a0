"""Sparse storage of pruned weights (relative indices), size accounting, and sparse inference.

Encoding of one pruned leaf (the paper's Discussion: relative indices, 5 bits for FC layers and
8 bits for CONV layers); `docs/sparse_format.md` is the reference, format version 2 (version 1
files, which hold only the filler encoding, are still read and can still be written):

* Order: the leaf is flattened in row-major (C) order of its stored layout, i.e. Flax's:
  Dense kernel (in, out), position `i * out + j`; Conv kernel (kh, kw, in, out).
* Filler encoding (the paper's, the only one of version 1): the kept connections (mask True), in
  increasing position, each stored as a value and a b-bit *skip*: the number of positions jumped
  over since the previous entry (the previous position is -1 before the first entry). So
  `positions = cumsum(skip + 1) - 1`. A skip must fit in b bits (0 .. 2**b - 1): before a kept
  connection preceded by a run of z > 2**b - 1 pruned positions, z // 2**b filler entries are
  inserted, each with skip 2**b - 1 and value +0.0, each standing on one pruned position; the
  kept entry then has skip z % 2**b. Fillers are stored values: they cost value bits and index
  bits like any entry. b = 0 (version 2 only) stores no index at all: every position up to the
  last kept one is an entry (dense storage with the pruned positions as fillers).
* Kept zeros (filler encoding): a kept connection whose stored value is +0.0 (all bits zero;
  rare, and possible after a float16 cast) is listed by position in `zero_kept`, so that the
  decoded mask is exact. An entry is a filler iff its value is +0.0 and its position is not in
  `zero_kept`.
* Escape encoding (version 2): b-bit codes; the all-ones code E = 2**b - 1 is an *escape*: it
  advances E positions and stores no value; any other code c stands for a kept connection c
  positions after the previous one (skip c, as above) and has a value. A run of z pruned
  positions costs z // E escapes of b bits each, no value; values are the kept ones only. With
  b = 1 this is a bitmask (1 = pruned, 0 = kept) that stops at the last kept position.
* Index stream: codes are bit-packed, code k in bits [k*b, (k+1)*b) of the stream, least
  significant bit first; bit j of the stream is bit (j % 8) of byte j // 8 (NumPy
  `packbits(..., bitorder='little')`); unused bits of the last byte are 0.
* Choice: `encode_leaf(..., bits='auto', encoding='auto')` takes, per leaf, the encoding and
  width of the fewest stored bytes (values + packed index + zero_kept), over filler widths
  0..16 and escape widths 1..16 (`best_encoding`; ties go to the filler encoding, then to the
  narrower width).

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
import io
import itertools
import json
import math
import os
from typing import Any
import zipfile
import zlib

import numpy as np

from lwc.errors import UserError

FORMAT_VERSION = 2  # what `save` writes when asked for the newest; `load` reads these:
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "lwc-sparse"
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}  # the paper's widths
PAPER_INDEX_BITS = DEFAULT_INDEX_BITS
VALUE_DTYPES = ("float32", "float16")
MAX_INDEX_BITS = 16
ENCODINGS = ("filler", "escape")  # of a sparse leaf; 'auto' picks one per leaf by bytes
COMPRESSIONS = ("stored", "deflated")  # zip members of a format-2 file
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Relative indices with fillers, or with escapes.


def _check_bits(bits: int, low: int = 1) -> None:
  if not (isinstance(bits, (int, np.integer)) and not isinstance(bits, (bool, np.bool_))
          and low <= bits <= MAX_INDEX_BITS):
    raise UserError(f"index width must be an integer from {low} to {MAX_INDEX_BITS} bits, "
                    f"got {bits}")


def _min_bits(encoding: str) -> int:
  """Narrowest index width of an encoding: 0 for fillers (no index), 1 for escapes."""
  return 0 if encoding == "filler" else 1


def encode_positions(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Skips (relative indices) with fillers for strictly increasing positions >= 0.

  Args:
    positions: int (n,), strictly increasing, >= 0: flat positions of the kept connections.
    bits: index width b, 0..16 (0: no index; every position up to the last kept one is an
      entry, skips all 0).

  Returns:
    (skips, real): skips uint32 (n + f,) each <= 2**b - 1, f = number of fillers; real bool
    (n + f,), False at fillers. `cumsum(skips + 1) - 1` gives the entries' positions, and
    those with `real` True are exactly `positions`.
  """
  _check_bits(bits, 0)
  positions = _checked_positions(positions)
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


def _checked_positions(positions: np.ndarray) -> np.ndarray:
  positions = np.asarray(positions, np.int64)
  if positions.ndim != 1:
    raise ValueError(f"positions must be 1-D, got shape {positions.shape}")
  if positions.size and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
    raise ValueError("positions must be >= 0 and strictly increasing")
  return positions


def decode_positions(skips: np.ndarray) -> np.ndarray:
  """Flat positions (int64, (n,)) of the entries whose skips are given (see module docstring)."""
  return np.cumsum(np.asarray(skips, np.int64) + 1) - 1


def encode_escapes(positions: np.ndarray, bits: int) -> np.ndarray:
  """Escape codes (uint32) for strictly increasing positions >= 0, b = `bits` 1..16.

  The code E = 2**b - 1 advances E positions without an entry; a code c < E is a kept
  connection c positions after the previous one. A gap of z pruned positions before a kept
  connection costs z // E escapes, and the connection gets code z % E.
  """
  _check_bits(bits, 1)
  positions = _checked_positions(positions)
  escape = (1 << bits) - 1
  zeros_before = np.diff(positions, prepend=-1) - 1
  escapes = zeros_before // escape
  real_at = np.cumsum(escapes + 1) - 1  # code index of each kept connection
  total = int(real_at[-1]) + 1 if positions.size else 0
  codes = np.full(total, escape, np.uint32)
  codes[real_at] = (zeros_before % escape).astype(np.uint32)
  return codes


def decode_escapes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Positions (int64) of the kept connections of escape `codes` (inverse of encode_escapes)."""
  codes = np.asarray(codes, np.int64)
  escape = (1 << bits) - 1
  is_escape = codes == escape
  ends = np.cumsum(np.where(is_escape, escape, codes + 1)) - 1
  return ends[~is_escape]


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """uint8 (ceil(n * bits / 8),): each value's low `bits` bits, LSB first, little bit order."""
  _check_bits(bits, 0)
  values = np.asarray(values, np.uint32)
  if values.size and int(values.max()) >> bits:
    raise ValueError(f"value {int(values.max())} does not fit in {bits} bits")
  planes = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
  return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
  """Inverse of `pack_bits`: uint32 (count,) from uint8 (ceil(count * bits / 8),)."""
  _check_bits(bits, 0)
  if bits == 0:
    return np.zeros(count, np.uint32)
  planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
  weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
  return planes.reshape(count, bits).astype(np.uint32) @ weights


def packed_length(entries: int, bits: int) -> int:
  """Bytes of the packed index stream of `entries` skips of `bits` bits."""
  return (entries * bits + 7) // 8


def encoded_bytes(positions: np.ndarray, encoding: str, bits: int, value_bytes: int = 4,
                  zero_kept: int = 0) -> int:
  """Stored bytes (values + packed index + zero_kept) of kept `positions` in `encoding` at
  `bits`, without encoding them; equal to `leaf_sizes(encode_leaf(...))['sparse_bytes']`.

  zero_kept: kept connections stored as +0.0 (listed at 8 bytes each by the filler encoding;
  the escape encoding needs no such list).
  """
  values, codes, bits, zero_kept = _encoded_counts(positions, encoding, bits, zero_kept)
  return values * value_bytes + packed_length(codes, bits) + 8 * zero_kept


def encoded_bits(positions: np.ndarray, encoding: str, bits: int, value_bytes: int = 4,
                 zero_kept: int = 0) -> int:
  """Stored bits as `leaf_sizes` counts them (`sparse_bits`: the index unrounded)."""
  values, codes, bits, zero_kept = _encoded_counts(positions, encoding, bits, zero_kept)
  return 8 * values * value_bytes + codes * bits + 64 * zero_kept


def _encoded_counts(positions, encoding: str, bits: int, zero_kept: int):
  """(stored values, index codes, bits, zero_kept entries) of kept `positions`."""
  positions = np.asarray(positions, np.int64)
  zeros_before = np.diff(positions, prepend=-1) - 1
  n = int(positions.size)
  if encoding == "filler":
    entries = n + int((zeros_before >> bits).sum())
    return entries, entries, bits, zero_kept
  if encoding == "escape":
    return n, n + int((zeros_before // ((1 << bits) - 1)).sum()), bits, 0
  raise UserError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def best_encoding(positions: np.ndarray, value_bytes: int = 4, zero_kept: int = 0,
                  encodings: tuple[str, ...] = ENCODINGS,
                  widths: tuple[int, ...] | None = None) -> tuple[str, int, int]:
  """(encoding, bits, bytes) of the fewest stored bytes for kept `positions`, trying every
  encoding in `encodings` at every width in `widths` (default: all, 0..16 for fillers, 1..16
  for escapes). Ties go to the earlier encoding of ENCODINGS (fillers, the paper's scheme),
  then to the narrower width."""
  best = None
  for encoding in encodings:
    low = _min_bits(encoding)
    for bits in (range(low, MAX_INDEX_BITS + 1) if widths is None else widths):
      if bits < low:
        continue
      size = encoded_bytes(positions, encoding, bits, value_bytes, zero_kept)
      key = (size, ENCODINGS.index(encoding), bits)
      if best is None or key < best[0]:
        best = (key, encoding, bits, size)
  if best is None:
    raise UserError(f"no index width in {widths} fits the encodings {encodings}")
  return best[1], best[2], best[3]


# ---------------------------------------------------------------------------------------------
# One leaf.


@dataclasses.dataclass(frozen=True)
class SparseLeaf:
  """One pruned leaf in relative-index form.

  shape: the leaf's shape; size = prod(shape).
  bits: index width b (0..16 for fillers, 1..16 for escapes).
  values: float32 or float16: (entries,) for fillers, fillers holding +0.0; (entries - fillers,)
    (the kept connections) for escapes.
  index: uint8 (packed_length(entries, bits),), the packed skips / codes.
  entries: codes of the index stream (kept connections + fillers).
  fillers: entries that are not kept connections: filler zeros, or escape codes.
  zero_kept: int64 (z,), sorted flat positions of kept connections stored as +0.0 (fillers
    only; always empty for escapes).
  encoding: 'filler' (the paper's, format 1) or 'escape' (format 2).
  """

  shape: tuple[int, ...]
  bits: int
  values: np.ndarray
  index: np.ndarray
  entries: int
  fillers: int
  zero_kept: np.ndarray
  encoding: str = "filler"

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def kept(self) -> int:
    """Kept (unpruned) connections."""
    return self.entries - self.fillers

  @property
  def nbytes(self) -> int:
    """Stored bytes: values, packed index, zero_kept."""
    return self.values.nbytes + self.index.nbytes + self.zero_kept.nbytes


def _bits_of(values: np.ndarray) -> np.ndarray:
  """Bit patterns of float16/float32 values as unsigned ints (same shape)."""
  return values.view(np.uint16 if values.dtype == np.float16 else np.uint32)


def _check_encoding(encoding: str, allow_auto: bool) -> None:
  allowed = ENCODINGS + (("auto",) if allow_auto else ())
  if encoding not in allowed:
    raise UserError(f"encoding must be one of {', '.join(allowed)}, got {encoding!r}")


def encode_leaf(weights: np.ndarray, mask: np.ndarray, bits: int | str,
                value_dtype: str = "float32", encoding: str = "filler") -> SparseLeaf:
  """Relative-index form of `weights` where `mask` is True.

  Args:
    weights: float array, any shape; pruned entries must be +0.0 bit for bit.
    mask: bool, same shape, True = kept connection.
    bits: index width (0..16 for fillers, 1..16 for escapes), or 'auto': the width of the fewest
      stored bytes (`best_encoding`).
    value_dtype: 'float32' or 'float16' for the stored values.
    encoding: 'filler' (the paper's filler zeros), 'escape', or 'auto': the one of the fewest
      stored bytes (at `bits`, or at the best width of each when `bits` is 'auto').

  Raises:
    UserError if a pruned position holds anything but +0.0 (decoding would not give the weights
    back), or shapes differ.
  """
  _check_encoding(encoding, allow_auto=True)
  if bits != "auto":
    _check_bits(bits, 0 if encoding in ("filler", "auto") else 1)
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
  zero_kept = positions[_bits_of(kept_values) == 0].astype(np.int64)
  shape = tuple(int(d) for d in weights.shape)
  if bits == "auto" or encoding == "auto":
    encoding, bits, _ = best_encoding(
        positions, np.dtype(value_dtype).itemsize, int(zero_kept.size),
        ENCODINGS if encoding == "auto" else (encoding,), None if bits == "auto" else (bits,))
  if encoding == "escape":
    codes = encode_escapes(positions, bits)
    return SparseLeaf(shape=shape, bits=int(bits), values=kept_values,
                      index=pack_bits(codes, bits), entries=int(codes.size),
                      fillers=int(codes.size - positions.size), zero_kept=np.zeros(0, np.int64),
                      encoding="escape")
  skips, real = encode_positions(positions, bits)
  values = np.zeros(skips.size, value_dtype)
  values[real] = kept_values
  return SparseLeaf(shape=shape, bits=int(bits), values=values,
                    index=pack_bits(skips, bits), entries=int(skips.size),
                    fillers=int(skips.size - positions.size), zero_kept=zero_kept)


def _real_entries(leaf: SparseLeaf, positions: np.ndarray) -> np.ndarray:
  """bool (entries,): True at kept connections, False at fillers (filler encoding)."""
  real = _bits_of(leaf.values) != 0
  if leaf.zero_kept.size:
    real |= np.isin(positions, leaf.zero_kept, assume_unique=True)
  return real


def check_leaf(leaf: SparseLeaf) -> str | None:
  """What is inconsistent in `leaf` (lengths, dtypes, positions, fillers), or None."""
  if leaf.encoding not in ENCODINGS:
    return f"encoding {leaf.encoding!r} is not one of {', '.join(ENCODINGS)}"
  low = _min_bits(leaf.encoding)
  if (isinstance(leaf.bits, (bool, np.bool_)) or leaf.bits != int(leaf.bits)
          or not low <= leaf.bits <= MAX_INDEX_BITS):
    return f"index width {leaf.bits} outside {low}..{MAX_INDEX_BITS}"
  if leaf.values.dtype.name not in VALUE_DTYPES or leaf.values.ndim != 1:
    return f"values must be 1-D {' or '.join(VALUE_DTYPES)}, got {leaf.values.dtype} " \
           f"{leaf.values.shape}"
  if not 0 <= leaf.fillers <= leaf.entries:
    return f"{leaf.fillers} fillers for {leaf.entries} entries"
  escape = leaf.encoding == "escape"
  want_values = leaf.entries - leaf.fillers if escape else leaf.entries
  if leaf.values.size != want_values:
    return (f"{leaf.values.size} values for {leaf.entries} entries" +
            (f" of which {leaf.fillers} escapes" if escape else ""))
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
  if escape:
    return _check_escapes(leaf, skips)
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


def _check_escapes(leaf: SparseLeaf, codes: np.ndarray) -> str | None:
  escape = (1 << leaf.bits) - 1
  escapes = int(np.count_nonzero(codes == escape))
  if escapes != leaf.fillers:
    return f"{escapes} escape codes, manifest says {leaf.fillers}"
  if codes.size and codes[-1] == escape:
    return "the index ends with an escape (no kept connection after it)"
  if leaf.zero_kept.size:
    return "zero_kept must be empty for the escape encoding"
  positions = decode_escapes(codes, leaf.bits)
  if positions.size and positions[-1] >= leaf.size:
    return (f"kept connection at position {int(positions[-1])} beyond the {leaf.size} "
            "positions of the leaf")
  return None


def leaf_positions(leaf: SparseLeaf) -> np.ndarray:
  """Flat positions (int64, increasing) of the kept connections of a checked leaf."""
  codes = unpack_bits(leaf.index, leaf.entries, leaf.bits)
  if leaf.encoding == "escape":
    return decode_escapes(codes, leaf.bits)
  positions = decode_positions(codes)
  return positions[_real_entries(leaf, positions)]


def decode_leaf(leaf: SparseLeaf) -> tuple[np.ndarray, np.ndarray]:
  """(weights float32 of leaf.shape, mask bool of leaf.shape); exact inverse of `encode_leaf`.

  Raises UserError if the leaf is inconsistent (see `check_leaf`).
  """
  problem = check_leaf(leaf)
  if problem:
    raise UserError(problem)
  codes = unpack_bits(leaf.index, leaf.entries, leaf.bits)
  if leaf.encoding == "escape":
    kept_at, kept_values = decode_escapes(codes, leaf.bits), leaf.values
  else:
    positions = decode_positions(codes)
    real = _real_entries(leaf, positions)
    kept_at, kept_values = positions[real], leaf.values[real]
  weights = np.zeros(leaf.size, np.float32)
  weights[kept_at] = kept_values.astype(np.float32)
  mask = np.zeros(leaf.size, bool)
  mask[kept_at] = True
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
  format_version: int | None = None  # of the file it was loaded from; None if never saved

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


def encode_model(params: PyTree, masks: PyTree | None,
                 index_bits: Mapping[str, int | str] | str | None = None,
                 value_dtype: str = "float32", info: Mapping | None = None, *,
                 model_state: PyTree | None = None, is_prunable=None,
                 encoding: str = "filler") -> Export:
  """Export of a whole model.

  Args:
    params, masks: trees of the same structure: nested dicts (Linen params) or an nnx.State in
      pure form (lwc.nnx_model); masks as lwc.masks (None: nothing pruned).
    index_bits: {'fc': b, 'conv': b}, b an int or 'auto' (per leaf, the width of the fewest
      bytes); 'auto' for both; missing kinds default to 5 and 8 (the paper's widths).
    encoding: of every sparse leaf: 'filler' (default; the paper's filler zeros, which format 1
      holds), 'escape', or 'auto' (per leaf, the one of the fewest bytes). The defaults give the
      paper's scheme; `lwc.export` asks for 'auto' everywhere.
    value_dtype: stored dtype of sparse values ('float32' or 'float16'); dense leaves stay
      float32.
    info: JSON-able extra fields for the manifest (model name, source checkpoint).
    model_state: the model's other collections (Linen `{'batch_stats': ...}`, the NNX state);
      stored exactly (dtypes, PRNG keys) and given back by `Export.decode_state`.
    is_prunable: which leaves are weights stored sparse (lwc.layers; default its DEFAULT).
  """
  if isinstance(index_bits, str):
    index_bits = {kind: index_bits for kind in DEFAULT_INDEX_BITS}
  bits = {**DEFAULT_INDEX_BITS, **(index_bits or {})}
  _check_encoding(encoding, allow_auto=True)
  for kind, b in bits.items():
    if b != "auto":
      _check_bits(b, 0 if encoding in ("filler", "auto") else 1)
  if value_dtype not in VALUE_DTYPES:
    raise UserError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype}")
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
      leaf = encode_leaf(w, m, bits[kind], value_dtype, encoding)
    except UserError as e:
      raise UserError(f"leaf {name}: {e}") from None
    except ValueError as e:
      raise ValueError(f"leaf {name}: {e}") from None
    leaves[name] = leaf
    entries.append({"name": name, "storage": "sparse", "shape": list(leaf.shape), "kind": kind,
                    "encoding": leaf.encoding, "index_bits": leaf.bits, "value_dtype": value_dtype,
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


def _v1_holds(leaf: SparseLeaf | np.ndarray) -> bool:
  """Whether format 1 can store `leaf`: dense, or fillers at 1..16 bits."""
  return not isinstance(leaf, SparseLeaf) or (leaf.encoding == "filler" and leaf.bits >= 1)


def _leaf_entry(entry: dict, leaf: SparseLeaf | np.ndarray) -> dict:
  """A manifest leaf entry with the counts of `leaf` (the leaf, not the manifest, is the truth)."""
  entry = dict(entry)
  if isinstance(leaf, SparseLeaf):
    entry.update(storage="sparse", shape=list(leaf.shape), kind=leaf_kind(leaf.shape),
                 encoding=leaf.encoding, index_bits=int(leaf.bits),
                 value_dtype=leaf.values.dtype.name, entries=int(leaf.entries),
                 fillers=int(leaf.fillers), zero_kept=int(leaf.zero_kept.size))
  else:
    entry.update(storage="dense", shape=list(np.shape(leaf)))
    for field in ("kind", "encoding", "index_bits", "value_dtype", "entries", "fillers",
                  "zero_kept"):
      entry.pop(field, None)
  return entry


def _ordered_leaves(export: Export) -> list[tuple[dict, SparseLeaf | np.ndarray]]:
  """(manifest entry with the leaf's counts, leaf) in manifest order (then any leaf the manifest
  does not list, by name)."""
  listed = {e["name"]: e for e in export.manifest.get("leaves", [])}
  names = [n for n in listed if n in export.leaves]
  names += [n for n in export.leaves if n not in listed]
  return [(_leaf_entry(listed.get(n, {"name": n}), export.leaves[n]), export.leaves[n])
          for n in names]


def _json(manifest: dict, compact: bool) -> np.ndarray:
  separators = (",", ":") if compact else None
  return np.array(json.dumps(manifest, sort_keys=True, separators=separators))


def _arrays_v1(export: Export) -> dict[str, np.ndarray]:
  """Members of a format-1 file: every leaf in its own members, manifest as written by v1."""
  manifest = {k: v for k, v in export.manifest.items() if k not in ("leaves", "value_dtype")}
  entries, arrays = [], {}
  for entry, leaf in _ordered_leaves(export):
    name = entry["name"]
    if not _v1_holds(leaf):
      raise UserError(f"leaf {name}: format 1 holds only the filler encoding at 1 to "
                      f"{MAX_INDEX_BITS} bits, not {leaf.encoding} at {leaf.bits} bits: save "
                      f"it as format {FORMAT_VERSION}")
    entry.pop("encoding", None)
    entries.append(entry)
    if isinstance(leaf, SparseLeaf):
      arrays[f"{name}.values"] = leaf.values
      arrays[f"{name}.index"] = leaf.index
      arrays[f"{name}.zero_kept"] = leaf.zero_kept
    else:
      arrays[f"{name}.dense"] = np.asarray(leaf, np.float32)
  manifest["leaves"] = entries
  out = {"format_version": np.array(1, np.int64), "manifest": _json(manifest, compact=False)}
  out.update(arrays)
  for name, stored in export.state.items():
    out[f"{name}.state"] = stored
  return out


# Format 2: the streams of all leaves, each concatenated in manifest order into one member.
_STREAMS = {"values": None, "index": np.uint8, "dense": np.float32, "zero_kept": np.int64}


def _stream_counts(entry: dict) -> dict[str, int]:
  """How many items of each format-2 stream a manifest leaf entry takes."""
  if entry["storage"] == "dense":
    return {"dense": math.prod(entry["shape"])}
  values = entry["entries"] - (entry["fillers"] if entry["encoding"] == "escape" else 0)
  return {"values": values, "index": packed_length(entry["entries"], entry["index_bits"]),
          "zero_kept": entry["zero_kept"]}


def _arrays_v2(export: Export) -> dict[str, np.ndarray]:
  """Members of a format-2 file: format_version, manifest (compact JSON), then the streams
  values / index / dense / zero_kept (each only when not empty), then state leaves."""
  ordered = _ordered_leaves(export)
  dtypes = {leaf.values.dtype.name for _, leaf in ordered if isinstance(leaf, SparseLeaf)}
  if len(dtypes) > 1:
    raise UserError(f"format 2 stores one value dtype, the leaves have {', '.join(sorted(dtypes))}")
  value_dtype = dtypes.pop() if dtypes else "float32"
  parts = {k: [] for k in _STREAMS}
  entries = []
  for entry, leaf in ordered:
    for field in ("kind", "value_dtype"):
      entry.pop(field, None)
    entries.append(entry)
    if isinstance(leaf, SparseLeaf):
      parts["values"].append(leaf.values)
      parts["index"].append(leaf.index)
      parts["zero_kept"].append(leaf.zero_kept)
    else:
      parts["dense"].append(np.asarray(leaf, np.float32).ravel())
  manifest = {k: v for k, v in export.manifest.items() if k != "leaves"}
  manifest.update(value_dtype=value_dtype, leaves=entries)
  out = {"format_version": np.array(2, np.int64), "manifest": _json(manifest, compact=True)}
  for key, dtype in _STREAMS.items():
    if parts[key]:
      stream = np.concatenate(parts[key]).astype(dtype or value_dtype, copy=False)
      if stream.size:
        out[key] = stream
  for name, stored in export.state.items():
    out[f"{name}.state"] = stored
  return out


def _write_zip(f, arrays: dict[str, np.ndarray], compression: str) -> None:
  """An .npz of `arrays` (members `<key>.npy`), without zip64 extras and with a fixed date, so
  that the same export gives the same bytes; members stored or deflated (level 9)."""
  method = zipfile.ZIP_DEFLATED if compression == "deflated" else zipfile.ZIP_STORED
  with zipfile.ZipFile(f, "w", compression=method) as archive:
    for key, array in arrays.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = method
      info.external_attr = 0o644 << 16
      archive.writestr(info, buffer.getvalue(),
                       compresslevel=9 if method == zipfile.ZIP_DEFLATED else None)


def format_version_for(export: Export) -> int:
  """The oldest format that holds `export`: 1 when every sparse leaf uses fillers at 1..16
  bits (the paper's scheme), else 2."""
  return 1 if all(_v1_holds(leaf) for leaf in export.leaves.values()) else 2


def save(export: Export, path: str, format_version: int | None = None,
         compression: str = "stored") -> int:
  """Writes the export as an .npz (no object arrays); returns the file size in bytes.

  format_version: 1 (every leaf in its own members; only the filler encoding at 1..16 bits),
    2 (streams concatenated, compact manifest; every encoding), or None: the oldest that holds
    the export (`format_version_for`), so files of the paper's scheme stay readable by format-1
    readers. `lwc.export` writes 2.
  compression: 'stored' (uncompressed, as format 1 always is) or 'deflated' (format 2 only).

  Written to `path + '.tmp'` and renamed, so `path` is never a half-written file.
  """
  if compression not in COMPRESSIONS:
    raise UserError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
  if format_version is None:
    format_version = format_version_for(export) if compression == "stored" else 2
  if format_version not in READABLE_VERSIONS:
    raise UserError(f"format_version must be one of {', '.join(map(str, READABLE_VERSIONS))}, "
                    f"got {format_version!r}")
  if format_version == 1 and compression != "stored":
    raise UserError("format 1 is always stored uncompressed; deflated needs format 2")
  arrays = _arrays_v1(export) if format_version == 1 else _arrays_v2(export)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    if format_version == 1:
      np.savez(f, **arrays)
    else:
      _write_zip(f, arrays, compression)
  os.replace(tmp, path)
  return os.path.getsize(path)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive


def _expected_keys(manifest: dict, version: int = 1) -> set[str]:
  keys = {"format_version", "manifest"}
  if version == 1:
    for leaf in manifest["leaves"]:
      suffixes = ("values", "index", "zero_kept") if leaf["storage"] == "sparse" else ("dense",)
      keys |= {f"{leaf['name']}.{s}" for s in suffixes}
  else:
    keys |= {k for k, n in _stream_totals(manifest).items() if n}
  for leaf in manifest.get("state", {}).get("leaves", []):
    keys.add(f"{leaf['name']}.state")
  return keys


def _stream_totals(manifest: dict) -> dict[str, int]:
  totals = dict.fromkeys(_STREAMS, 0)
  for leaf in manifest["leaves"]:
    for key, n in _stream_counts(leaf).items():
      totals[key] += n
  return totals


def _parse_manifest(text: str, version: int = 1) -> dict:
  """The manifest dict, with types checked; ValueError naming the first problem."""
  manifest = json.loads(text)
  if version == 2 and isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
    if manifest.get("value_dtype") not in VALUE_DTYPES:
      raise ValueError(f"bad value_dtype {manifest.get('value_dtype')!r}")
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
        if not _is_count(leaf.get(field)):
          raise ValueError(f"leaf {leaf['name']}: bad {field} {leaf.get(field)!r}")
      if version == 1 and leaf.get("value_dtype") not in VALUE_DTYPES:
        raise ValueError(f"leaf {leaf['name']}: bad value_dtype {leaf.get('value_dtype')!r}")
      if version == 1 and leaf["index_bits"] == 0:  # format 1: fillers at 1..16 bits only
        raise ValueError(f"leaf {leaf['name']}: bad index_bits 0")
      if version == 2:
        if leaf.get("encoding") not in ENCODINGS:
          raise ValueError(f"leaf {leaf['name']}: bad encoding {leaf.get('encoding')!r}")
        if leaf["fillers"] > leaf["entries"]:
          raise ValueError(f"leaf {leaf['name']}: {leaf['fillers']} fillers for "
                           f"{leaf['entries']} entries")
        if leaf["index_bits"] > MAX_INDEX_BITS:
          raise ValueError(f"leaf {leaf['name']}: bad index_bits {leaf['index_bits']!r}")
    elif leaf.get("storage") != "dense":
      raise ValueError(f"leaf {leaf['name']}: storage must be sparse or dense")
    _check_path(leaf)
  if manifest.get("params_tree", "dict") not in _TREE_TYPES:
    raise ValueError(f"params_tree must be one of {', '.join(_TREE_TYPES)}")
  if "state" in manifest:
    _parse_state(manifest["state"])
  return manifest


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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

  Reads format 1 and format 2 files. The manifest comes back in one form for both: every
  sparse leaf entry with its `kind`, `encoding` and `value_dtype`; `Export.format_version` says
  which format the file was.

  Raises UserError (one line naming the file) for an unreadable file, a pickle or object array,
  a format version other than 1 or 2, missing or unexpected keys, dtypes or lengths that
  disagree with the manifest, or entries beyond a leaf's size.
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
      if (version.shape != () or version.dtype.kind not in "iu"
              or int(version) not in READABLE_VERSIONS):
        raise fail(f"format_version {version!r}, this reader understands "
                   f"{' and '.join(map(str, READABLE_VERSIONS))}")
      version = int(version)
      of_v2 = "format_version 2: " if version == 2 else ""
      text = member("manifest")
      if text.shape != () or text.dtype.kind != "U":
        raise fail("manifest is not a string")
      try:
        manifest = _parse_manifest(str(text), version)
      except (ValueError, TypeError, AttributeError) as e:
        raise fail(f"bad manifest ({of_v2}{e})") from None
      expected = _expected_keys(manifest, version)
      if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise fail(of_v2 + (f"unexpected keys {extra} and missing keys {missing}"
                            if extra and missing else f"unexpected keys {extra}" if extra
                            else f"missing keys {missing}"))
      if version == 1:
        leaves = {entry["name"]: _read_leaf(member, entry, fail)
                  for entry in manifest["leaves"]}
      else:
        leaves = _read_leaves_v2(member, manifest, fail)
      manifest = _normalised(manifest, leaves)
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
  return Export(manifest=manifest, leaves=leaves, state=state, format_version=version)


def _normalised(manifest: dict, leaves: dict) -> dict:
  """The manifest in its in-memory form (that of `encode_model`), whichever format it came in."""
  manifest = {k: v for k, v in manifest.items() if k != "value_dtype"}
  manifest["leaves"] = [_leaf_entry(entry, leaves[entry["name"]]) for entry in manifest["leaves"]]
  return manifest


def _read_leaves_v2(member: Callable[[str], np.ndarray], manifest: dict,
                    fail: Callable[[str], UserError]) -> dict[str, SparseLeaf | np.ndarray]:
  """The leaves of a format-2 file: slices of the concatenated streams, each leaf checked."""
  totals = _stream_totals(manifest)
  streams = {}
  for key, dtype in _STREAMS.items():
    dtype = np.dtype(dtype or manifest["value_dtype"])
    stream = member(key) if totals[key] else np.zeros(0, dtype)
    if stream.dtype != dtype or stream.ndim != 1:
      raise fail(f"stream {key} is {stream.dtype} {stream.shape}, the manifest says 1-D {dtype}")
    if stream.size != totals[key]:
      raise fail(f"stream {key} has {stream.size} items, the manifest's leaves take "
                 f"{totals[key]}")
    streams[key] = stream
  at = dict.fromkeys(_STREAMS, 0)

  def take(key: str, n: int) -> np.ndarray:
    at[key] += n
    return streams[key][at[key] - n:at[key]]

  leaves = {}
  for entry in manifest["leaves"]:
    name, shape, counts = entry["name"], tuple(entry["shape"]), _stream_counts(entry)
    if entry["storage"] == "dense":
      leaves[name] = take("dense", counts["dense"]).reshape(shape)
      continue
    leaf = SparseLeaf(shape=shape, bits=entry["index_bits"],
                      values=take("values", counts["values"]),
                      index=take("index", counts["index"]), entries=entry["entries"],
                      fillers=entry["fillers"],
                      zero_kept=take("zero_kept", counts["zero_kept"]),
                      encoding=entry["encoding"])
    problem = check_leaf(leaf)
    if problem:
      raise fail(f"leaf {name}: {problem}")
    leaves[name] = leaf
  return leaves


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


def _zero_kept_count(leaf: SparseLeaf) -> int:
  """Kept connections stored as +0.0 (what the filler encoding lists in zero_kept)."""
  if leaf.encoding == "escape":
    return int(np.count_nonzero(_bits_of(leaf.values) == 0))
  return int(leaf.zero_kept.size)


def paper_scheme_bytes(leaf: SparseLeaf) -> int:
  """Stored bytes of `leaf` in the paper's scheme: filler zeros at its width for the kind
  (PAPER_INDEX_BITS: 5 FC, 8 conv), values of the leaf's value dtype."""
  return encoded_bytes(leaf_positions(leaf), "filler", PAPER_INDEX_BITS[leaf_kind(leaf.shape)],
                       leaf.values.dtype.itemsize, _zero_kept_count(leaf))


def leaf_sizes(leaf: SparseLeaf | np.ndarray) -> dict[str, int | float]:
  """Accounted storage of one leaf, in bits and bytes.

  weights: entries of the dense leaf; kept: kept connections; entries: stored values = kept +
  fillers (filler zeros; what the pruned layer multiplies); escapes: escape codes (no value);
  index_entries: codes of the index stream (entries + escapes). dense_bytes: float32 dense
  storage. value_bits: stored values; index_bits: all codes; filler_bits: what fillers and
  escapes cost (values and codes); extra_bits: zero_kept positions (64 each).
  sparse_bytes: bytes of the stored arrays (values, packed index, zero_kept).
  index_overhead: index_bits / value_bits.
  overhead: (sparse bits - kept * value width) / (kept * value width): everything stored beyond
  the kept values (indices, fillers, escapes, zero_kept); the paper's figure for this is its
  index width over 32 bits, fillers not counted: `paper_overhead` (15.6% = 5/32 for FC, 8/32
  for conv). paper_scheme_bytes / paper_scheme_overhead: the paper's scheme (filler zeros at
  5 or 8 bits) on this leaf's mask.
  """
  if not isinstance(leaf, SparseLeaf):
    n = int(np.size(leaf))
    return {"storage": "dense", "weights": n, "kept": n, "dense_bytes": 4 * n,
            "sparse_bytes": 4 * n}
  vbits = leaf.values.dtype.itemsize * 8
  escapes = leaf.fillers if leaf.encoding == "escape" else 0
  fillers = 0 if leaf.encoding == "escape" else leaf.fillers
  value_bits, index_bits = leaf.values.size * vbits, leaf.entries * leaf.bits
  extra_bits = 64 * int(leaf.zero_kept.size)
  sparse_bits = value_bits + index_bits + extra_bits
  kept_value_bits = leaf.kept * vbits
  sparse_bytes = leaf.nbytes
  paper_bits = PAPER_INDEX_BITS[leaf_kind(leaf.shape)]
  paper_bytes = paper_scheme_bytes(leaf)
  paper_sparse_bits = encoded_bits(leaf_positions(leaf), "filler", paper_bits,
                                   leaf.values.dtype.itemsize, _zero_kept_count(leaf))
  return {
      "storage": "sparse", "encoding": leaf.encoding, "weights": leaf.size, "kept": leaf.kept,
      "entries": int(leaf.values.size), "fillers": fillers, "escapes": escapes,
      "index_entries": leaf.entries, "index_width": leaf.bits, "value_width": vbits,
      "density": leaf.kept / leaf.size if leaf.size else 0.0,
      "dense_bytes": 4 * leaf.size, "value_bits": value_bits, "index_bits": index_bits,
      "filler_bits": fillers * (vbits + leaf.bits) + escapes * leaf.bits,
      "extra_bits": extra_bits, "sparse_bits": sparse_bits, "sparse_bytes": sparse_bytes,
      "index_overhead": index_bits / value_bits if value_bits else 0.0,
      "overhead": (sparse_bits - kept_value_bits) / kept_value_bits if kept_value_bits else 0.0,
      "paper_index_width": paper_bits, "paper_overhead": paper_bits / 32,
      "paper_scheme_bytes": paper_bytes, "paper_scheme_bits": paper_sparse_bits,
      "paper_scheme_overhead": ((paper_sparse_bits - kept_value_bits) / kept_value_bits
                                if kept_value_bits else 0.0),
      "compression_by_count": leaf.size / leaf.kept if leaf.kept else math.inf,
      "compression_by_size": 4 * leaf.size / sparse_bytes if sparse_bytes else math.inf,
  }


def _totals(rows: list[dict]) -> dict[str, int | float]:
  keys = ("weights", "kept", "dense_bytes", "sparse_bytes", "entries", "fillers", "escapes",
          "index_entries", "value_bits", "index_bits", "filler_bits", "extra_bits", "sparse_bits")
  t = {k: sum(int(r.get(k, 0)) for r in rows) for k in keys}
  t["paper_scheme_bytes"] = sum(int(r.get("paper_scheme_bytes", r["sparse_bytes"])) for r in rows)
  t["paper_scheme_bits"] = sum(int(r.get("paper_scheme_bits", 8 * r["sparse_bytes"])) for r in rows)
  sparse_kept = sum(r["kept"] for r in rows if r["storage"] == "sparse")
  kept_value_bits = sum(r["kept"] * r.get("value_width", 32) for r in rows)
  stored_bits = t["sparse_bits"] + sum(8 * r["sparse_bytes"] for r in rows
                                       if r["storage"] == "dense")
  paper_bits = t["paper_scheme_bits"]
  t.update({
      "density": t["kept"] / t["weights"] if t["weights"] else 0.0,
      "index_overhead": t["index_bits"] / t["value_bits"] if t["value_bits"] else 0.0,
      "overhead": (stored_bits - kept_value_bits) / kept_value_bits if kept_value_bits else 0.0,
      "paper_overhead": (sum(r["kept"] * r.get("paper_index_width", 0) for r in rows) /
                         (32 * sparse_kept) if sparse_kept else 0.0),
      "paper_scheme_overhead": ((paper_bits - kept_value_bits) / kept_value_bits
                                if kept_value_bits else 0.0),
      "compression_by_count": t["weights"] / t["kept"] if t["kept"] else math.inf,
      "compression_by_size": t["dense_bytes"] / t["sparse_bytes"] if t["sparse_bytes"]
      else math.inf})
  return t


def size_report(export: Export, file_bytes: int | None = None) -> dict:
  """Per-leaf sizes, totals over sparse (pruned) leaves and over every leaf, and the file.

  `payload_bytes` sums the stored arrays (what the accounting counts); `file_bytes` is the real
  .npz size, whose difference from the payload is the container (zip and .npy headers, manifest);
  `compression_by_file` is the dense float32 bytes of every leaf over `file_bytes`.
  """
  rows = {name: leaf_sizes(leaf) for name, leaf in export.leaves.items()}
  sparse_rows = [r for r in rows.values() if r["storage"] == "sparse"]
  report = {"leaves": rows, "pruned_layers": _totals(sparse_rows),
            "all_leaves": _totals(list(rows.values()))}
  report["payload_bytes"] = report["all_leaves"]["sparse_bytes"]
  if export.format_version is not None:
    report["format_version"] = export.format_version
  if file_bytes is not None:
    report["file_bytes"] = file_bytes
    report["container_bytes"] = file_bytes - report["payload_bytes"]
    report["compression_by_file"] = (report["all_leaves"]["dense_bytes"] / file_bytes
                                     if file_bytes else math.inf)
  return report


def _layer_of(name: str) -> str:
  """The layer a leaf name belongs to, as lwc.layers names it (`fc1` for `fc1/kernel`)."""
  from lwc import layers
  return layers.layer_name(_name_path(name))


def _encoding_label(r: dict) -> str:
  if r["encoding"] == "filler" and r["index_width"] == 0:
    return "dense (filler, no index)"
  return r["encoding"]


def format_size_table(report: dict) -> str:
  """Markdown table of `size_report`: one row per sparse leaf, then totals, then the file.

  `overhead` is ours: all stored bits beyond the kept values over the kept values' bits
  (indices, fillers, escapes, zero_kept). `paper` is the paper's figure (15.6% = 5/32 for FC,
  8/32 for conv: index bits per 32-bit value, fillers not counted), and `paper's scheme here`
  the overhead of the paper's scheme (filler zeros at 5 / 8 bits) on the same mask.
  """
  head = ("| layer | weights | kept | density | encoding | idx bits | fillers / escapes | "
          "dense bytes | stored bytes | overhead | paper | paper's scheme here | "
          "compression by count | by size |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
  lines = []
  for name, r in report["leaves"].items():
    if r["storage"] != "sparse":
      continue
    lines.append(
        f"| {_layer_of(name)} | {r['weights']:,} | {r['kept']:,} | "
        f"{100 * r['density']:.2f}% | {_encoding_label(r)} | {r['index_width']} | "
        f"{r['fillers']:,} / {r['escapes']:,} | {r['dense_bytes']:,} | {r['sparse_bytes']:,} | "
        f"{100 * r['overhead']:.1f}% | {100 * r['paper_overhead']:.1f}% | "
        f"{100 * r['paper_scheme_overhead']:.1f}% ({r['paper_scheme_bytes']:,} B) | "
        f"{r['compression_by_count']:.1f}x | {r['compression_by_size']:.1f}x |")
  for label, t in (("total (pruned layers)", report["pruned_layers"]),
                   ("total (with dense biases)", report["all_leaves"])):
    lines.append(
        f"| {label} | {t['weights']:,} | {t['kept']:,} | {100 * t['density']:.2f}% | | | "
        f"{t['fillers']:,} / {t['escapes']:,} | {t['dense_bytes']:,} | {t['sparse_bytes']:,} | "
        f"{100 * t['overhead']:.1f}% | {100 * t['paper_overhead']:.1f}% | "
        f"{100 * t['paper_scheme_overhead']:.1f}% ({t['paper_scheme_bytes']:,} B) | "
        f"{t['compression_by_count']:.1f}x | {t['compression_by_size']:.1f}x |")
  out = head + "\n".join(lines) + "\n"
  if "file_bytes" in report:
    version = report.get("format_version")
    container = report["container_bytes"]
    parts = (f"payload {report['payload_bytes']:,} + container {container:,} (zip and .npy "
             "headers, manifest)" if container >= 0 else
             f"payload {report['payload_bytes']:,} and container, deflated: "
             f"{100 * report['file_bytes'] / report['payload_bytes']:.1f}% of the payload")
    out += (f"\nfile{f' (format {version})' if version else ''}: {report['file_bytes']:,} bytes "
            f"= {parts}; dense float32 "
            f"{report['all_leaves']['dense_bytes']:,} bytes: "
            f"{report['compression_by_file']:.2f}x by file, "
            f"{report['all_leaves']['compression_by_count']:.2f}x by count\n")
  return out


def index_width_sweep(export: Export, widths: list[int]) -> dict[str, dict[int, int]]:
  """{sparse leaf: {b: sparse bytes when re-encoded with b-bit indices}} in the leaf's own
  encoding (fillers or escapes included); widths an encoding cannot take are left out."""
  out = {}
  for name, leaf in export.leaves.items():
    if isinstance(leaf, SparseLeaf):
      positions = leaf_positions(leaf)
      out[name] = {b: encoded_bytes(positions, leaf.encoding, b, leaf.values.dtype.itemsize,
                                    _zero_kept_count(leaf))
                   for b in widths if b >= _min_bits(leaf.encoding)}
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
# Inference on NumPy: dense (BLAS) or sparse weight matrices. The sparse kernels (numba CSR with
# 16-bit indices, the default; MKL; PyTorch; scipy CSR) live in lwc/sparse_kernels.py, behind
# `make_matrix`; DenseMatrix and CsrMatrix below are its "dense" and "scipy" kinds.
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


def _matrix_maker(backend: str, threads: int | None) -> tuple[Callable, str]:
  """(matrix(kernel (K, N), bias (N,)) -> layer callable, resolved kind) of a NumpyModel
  backend; UserError for an unknown backend or one whose library is not installed."""
  if backend == "csr":
    return functools.partial(CsrMatrix, threads=threads), "scipy"
  from lwc import sparse_kernels
  if backend != "auto" and backend not in sparse_kernels.KINDS:
    raise UserError(f"backend must be auto, csr or one of {', '.join(sparse_kernels.KINDS)}, "
                    f"got '{backend}'")
  kind = sparse_kernels.require(sparse_kernels.resolve(backend))
  return functools.partial(sparse_kernels.make_matrix, kind=kind, threads=threads or 0), kind


class NumpyModel:
  """The forward pass of `model` (lwc.models names) on NumPy, mirroring lwc/models/lenet.py.

  backend: 'auto' (default) = lwc.sparse_kernels' default kernel (numba CSR; scipy's if numba
  is not installed); any kind of lwc.sparse_kernels.KINDS ('numba', 'mkl', 'torch', 'scipy',
  'dense', 'dense-mkl'); or 'csr', the scipy CSR of before (CsrMatrix with `csr_threads`).
  `threads`: of the sparse kernels (0 or None = one per CPU; `csr_threads` if not given).
  `self.backend` is the kind used. Any layer widths (shapes come from `params`).
  Call with images float32 (B, 28, 28, 1); returns logits float32 (B, 10).
  """

  def __init__(self, model: str, params: Mapping, backend: str = "auto",
               csr_threads: int | None = None, threads: int | None = None):
    if model not in FORWARD:
      raise UserError(f"no NumPy forward pass for model '{model}', expected one of: "
                      f"{', '.join(sorted(FORWARD))}")
    matrix, self.backend = _matrix_maker(backend, csr_threads if threads is None else threads)
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
