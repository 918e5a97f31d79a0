"""Fast sparse (and dense) layers for CPU inference: several kernels behind one interface.

A *matrix* made here from a Flax kernel W (K, N) (inputs x outputs), a bias b (N,) and optionally a
mask (K, N) is a callable that maps activations held feature-major, as lwc.sparse's NumPy forward
pass keeps them:

    X (K, B) float32  ->  Y = (W * mask).T @ X + b  (N, B) float32, any batch B >= 0.

Every kind gives the same Y up to float rounding (the order of the additions differs). Stored
entries: the mask's True positions when a mask is given (kept zeros included), else W's
nonzeros; pruned positions never cost work.

Kinds (`make_matrix(..., kind=...)`):

* "numba" (the default, chosen by `benchmarks/sparse_inference.py`, see benchmarks/RESULTS.md):
  a column-blocked CSR of W.T over the N output rows (panels of PANEL = 4096 inputs) with
  float32 values, uint16 panel-relative column indices and int64 row offsets: 6 bytes per kept
  weight against 4 per dense weight, which is what a batch-1 layer is bound by (memory).
  Kernels compiled by numba on first use and cached on disk (`cache=True`): batch 1 is one
  8-accumulator dot product per row and panel; batches of 2..AXPY_BATCH-1 (padded to a
  multiple of TILE = 8) register tiles, 8 batch columns x 2 FMA chains per row and panel;
  larger batches an 8-way unrolled axpy of X's rows into each output row,
  vectorised over the batch. `threads` > 1 cuts the rows into blocks of about equal nonzero
  count, one per thread (numba's `prange`), once the matrix holds at least `min_parallel_nnz`
  kept weights.
* "mkl": oneMKL's inspector-executor sparse BLAS (`mkl_sparse_s_mv` / `mkl_sparse_s_mm`, after
  `mkl_sparse_optimize` with mv/mm hints) on a CSR of W.T with int32 indices, through ctypes on
  libmkl_rt (the `mkl` wheel). Threads: `mkl_set_num_threads_local` around each call.
* "torch": PyTorch's CSR tensor (`torch.mv` / `torch.sparse.mm`; MKL inside the CPU wheels).
* "scipy": lwc.sparse.CsrMatrix (scipy's csr_matvec / csr_matvecs, rows on a thread pool).
* "dense": lwc.sparse.DenseMatrix (W.T @ X with NumPy's BLAS, OpenBLAS in the wheels).
* "dense-mkl": W.T @ X with MKL's cblas_sgemv / cblas_sgemm: a second dense baseline.

"auto" is DEFAULT_KIND when its library is installed, else "scipy". A kind whose library is
missing raises lwc.errors.UserError naming the package to install.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import numpy as np

from lwc.errors import UserError

try:  # numba is a dependency; without it only the "numba" kind is unavailable.
  import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
  numba = None

KINDS = ("numba", "mkl", "torch", "scipy", "dense", "dense-mkl")
SPARSE_KINDS = ("numba", "mkl", "torch", "scipy")
DEFAULT_KIND = "numba"
FALLBACK_KIND = "scipy"
# What to install for each kind (pip names).
PACKAGES = {"numba": "numba", "mkl": "mkl", "dense-mkl": "mkl", "torch": "torch",
            "scipy": "scipy", "dense": "numpy"}
# numba kind: batch 1 takes the dot kernel, 2..AXPY_BATCH-1 the register tiles (the batch padded
# to a multiple of TILE), larger batches the axpy kernel (measured, benchmarks/RESULTS.md).
TILE = 8
AXPY_BATCH = 32
# numba kind: fewer kept weights than this run on one thread (a parallel launch costs a few µs,
# about the time of 10,000 kept weights on one core).
MIN_PARALLEL_NNZ = 100_000


def cpu_count() -> int:
  """CPUs this process may run on (its affinity mask), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def _threads(threads: int | None) -> int:
  if threads is not None and threads < 0:
    raise UserError(f"threads must be >= 0 (0 = one per CPU), got {threads}")
  return threads or cpu_count()


# ---------------------------------------------------------------------------------------------
# Layout shared by the CSR kinds.


def kept_csr(kernel: np.ndarray, mask: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(indptr int64 (N+1,), columns int64 (nnz,), values float32 (nnz,)): CSR of W.T, W (K, N).

  Row n lists output n's stored inputs in increasing order: mask's True entries if a mask is
  given, else W's nonzeros.
  """
  kept = (np.asarray(kernel) != 0) if mask is None else np.asarray(mask, bool)
  rows, cols = np.nonzero(kept.T)
  values = np.asarray(kernel, np.float32).T[rows, cols]
  indptr = np.zeros(kernel.shape[1] + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=kernel.shape[1]), out=indptr[1:])
  return indptr, cols, values


def row_blocks(indptr: np.ndarray, parts: int) -> np.ndarray:
  """Row bounds int64 (parts' + 1,) of at most `parts` blocks of about equal nonzero count."""
  rows = indptr.size - 1
  cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], parts + 1)[1:-1])
  inner = sorted({int(c) for c in cuts} - {0, rows})
  return np.array([0, *inner, rows] if rows else [0, 0], np.int64)


def _check_input(x: np.ndarray, k: int) -> np.ndarray:
  """x as C-contiguous float32 (K, B); a wrong shape is a ValueError (the compiled kernels do
  not check bounds)."""
  x = np.ascontiguousarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] != k:
    raise ValueError(f"expected activations of shape ({k}, batch), got {x.shape}")
  return x


# ---------------------------------------------------------------------------------------------
# numba kernels on a column-blocked CSR of W.T ("panels"): the K inputs are cut into panels of
# PANEL columns; panel p holds, row by row, the entries of W.T[:, p*PANEL:(p+1)*PANEL] with
# column indices relative to the panel start (uint16). Arrays: indptr int64 (panels, N+1),
# absolute offsets (row r of panel p = entries [indptr[p, r], indptr[p, r+1])); indices uint16
# (nnz,); data float32 (nnz,); entries ordered by (panel, row, column). A kernel sweeps one panel
# over all its rows before the next, so the panel's slice of x (16 KiB) stays in L1 while the
# weights stream past: on this project's machine that halves the batch-1 time of AlexNet fc6
# (9216 inputs) and quarters VGG-16 fc6's (25088) against one panel of K columns.
#
# Every index is unsigned (uint64): numba then skips the negative-index wrap-around, which
# otherwise costs a compare and a select per load and stops LLVM from vectorising. No array
# views inside loops either: each view costs two atomic reference-count updates.

PANEL = 4096


def _jit(**options):
  if numba is None:
    return lambda fn: fn
  return numba.njit(nogil=True, cache=True, fastmath={"contract"}, **options)


_prange = numba.prange if numba is not None else range
_U = np.uint64


class _SlpVectorize:
  """numba runs LLVM without its SLP vectoriser (numba.config.SLP_VECTORIZE = 0); the register
  tiles need it. Kernels compile lazily inside their first call, so every call runs inside this
  block, which switches it on for whatever compiles meanwhile (nothing else, normally)."""

  def __enter__(self) -> None:
    self.previous = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1

  def __exit__(self, *exc) -> None:
    numba.config.SLP_VECTORIZE = self.previous


@_jit()
def _dots_rows(r0, r1, indptr, indices, data, xt, bias, y):
  """Rows [r0, r1): y[r, b] = bias[r] + sum over row r's entries (panel p, column c) of
  data * xt[b, p*PANEL + c]; xt (B, K), y (N, B). Eight partial sums per dot."""
  for r in range(_U(r0), _U(r1)):
    for b in range(_U(xt.shape[0])):
      y[r, b] = bias[r]
  for p in range(_U(indptr.shape[0])):
    off = p * _U(PANEL)
    for r in range(_U(r0), _U(r1)):
      start, end = _U(indptr[p, r]), _U(indptr[p, r + _U(1)])
      for b in range(_U(xt.shape[0])):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
        j = start
        while j + _U(8) <= end:
          a0 += data[j] * xt[b, off + indices[j]]
          a1 += data[j + _U(1)] * xt[b, off + indices[j + _U(1)]]
          a2 += data[j + _U(2)] * xt[b, off + indices[j + _U(2)]]
          a3 += data[j + _U(3)] * xt[b, off + indices[j + _U(3)]]
          a4 += data[j + _U(4)] * xt[b, off + indices[j + _U(4)]]
          a5 += data[j + _U(5)] * xt[b, off + indices[j + _U(5)]]
          a6 += data[j + _U(6)] * xt[b, off + indices[j + _U(6)]]
          a7 += data[j + _U(7)] * xt[b, off + indices[j + _U(7)]]
          j += _U(8)
        while j < end:
          a0 += data[j] * xt[b, off + indices[j]]
          j += _U(1)
        y[r, b] += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@_jit()
def _tiles_rows(r0, r1, indptr, indices, data, x, bias, y):
  """Rows [r0, r1): y[r, :] = bias[r] + sum over row r's entries of data * x[p*PANEL + c, :];
  x (K, Bp), y (N, Bp), Bp a multiple of TILE = 8.

  Register tiles: for each 8 columns of the batch, 16 partial sums (even and odd entries: two
  independent FMA chains) that LLVM's SLP vectoriser packs into two 8-wide vector registers;
  each entry costs one index, one value and one 8-wide load of x.
  """
  bp = _U(x.shape[1])
  for r in range(_U(r0), _U(r1)):
    for b in range(bp):
      y[r, b] = bias[r]
  for p in range(_U(indptr.shape[0])):
    off = p * _U(PANEL)
    for r in range(_U(r0), _U(r1)):
      start, end = _U(indptr[p, r]), _U(indptr[p, r + _U(1)])
      for b in range(_U(0), bp, _U(8)):
        b1, b2, b3, b4 = b + _U(1), b + _U(2), b + _U(3), b + _U(4)
        b5, b6, b7 = b + _U(5), b + _U(6), b + _U(7)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
        e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = np.float32(0)
        j = start
        while j + _U(2) <= end:
          w, c = data[j], off + indices[j]
          v, d = data[j + _U(1)], off + indices[j + _U(1)]
          a0 += w * x[c, b]; a1 += w * x[c, b1]; a2 += w * x[c, b2]; a3 += w * x[c, b3]
          a4 += w * x[c, b4]; a5 += w * x[c, b5]; a6 += w * x[c, b6]; a7 += w * x[c, b7]
          e0 += v * x[d, b]; e1 += v * x[d, b1]; e2 += v * x[d, b2]; e3 += v * x[d, b3]
          e4 += v * x[d, b4]; e5 += v * x[d, b5]; e6 += v * x[d, b6]; e7 += v * x[d, b7]
          j += _U(2)
        if j < end:
          w, c = data[j], off + indices[j]
          a0 += w * x[c, b]; a1 += w * x[c, b1]; a2 += w * x[c, b2]; a3 += w * x[c, b3]
          a4 += w * x[c, b4]; a5 += w * x[c, b5]; a6 += w * x[c, b6]; a7 += w * x[c, b7]
        y[r, b] += a0 + e0; y[r, b1] += a1 + e1; y[r, b2] += a2 + e2; y[r, b3] += a3 + e3
        y[r, b4] += a4 + e4; y[r, b5] += a5 + e5; y[r, b6] += a6 + e6; y[r, b7] += a7 + e7


@_jit()
def _axpy_rows(r0, r1, indptr, indices, data, x, bias, y):
  """Rows [r0, r1): y[r, :] = bias[r] + sum over row r's entries of data * x[p*PANEL + c, :];
  x (K, B), y (N, B).

  Eight kept weights per pass over y[r, :] (the loop over the batch is vectorised), so the
  store-to-load chain through y[r, :] is paid once per eight weights.
  """
  batch = _U(x.shape[1])
  for r in range(_U(r0), _U(r1)):
    for b in range(batch):
      y[r, b] = bias[r]
  for p in range(_U(indptr.shape[0])):
    off = p * _U(PANEL)
    for r in range(_U(r0), _U(r1)):
      j, end = _U(indptr[p, r]), _U(indptr[p, r + _U(1)])
      while j + _U(8) <= end:
        w0, w1, w2, w3 = data[j], data[j + _U(1)], data[j + _U(2)], data[j + _U(3)]
        w4, w5, w6, w7 = data[j + _U(4)], data[j + _U(5)], data[j + _U(6)], data[j + _U(7)]
        c0, c1 = off + indices[j], off + indices[j + _U(1)]
        c2, c3 = off + indices[j + _U(2)], off + indices[j + _U(3)]
        c4, c5 = off + indices[j + _U(4)], off + indices[j + _U(5)]
        c6, c7 = off + indices[j + _U(6)], off + indices[j + _U(7)]
        for b in range(batch):
          y[r, b] += (((w0 * x[c0, b] + w1 * x[c1, b]) + (w2 * x[c2, b] + w3 * x[c3, b]))
                      + ((w4 * x[c4, b] + w5 * x[c5, b]) + (w6 * x[c6, b] + w7 * x[c7, b])))
        j += _U(8)
      while j < end:
        w0, c0 = data[j], off + indices[j]
        for b in range(batch):
          y[r, b] += w0 * x[c0, b]
        j += _U(1)


@_jit(parallel=True)
def _dots_parallel(bounds, indptr, indices, data, xt, bias, y):
  for i in _prange(bounds.size - 1):
    _dots_rows(bounds[i], bounds[i + 1], indptr, indices, data, xt, bias, y)


@_jit(parallel=True)
def _tiles_parallel(bounds, indptr, indices, data, x, bias, y):
  for i in _prange(bounds.size - 1):
    _tiles_rows(bounds[i], bounds[i + 1], indptr, indices, data, x, bias, y)


@_jit(parallel=True)
def _axpy_parallel(bounds, indptr, indices, data, x, bias, y):
  for i in _prange(bounds.size - 1):
    _axpy_rows(bounds[i], bounds[i + 1], indptr, indices, data, x, bias, y)


def panel_csr(kernel: np.ndarray, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(indptr int64 (panels, N+1), indices uint16 (nnz,), data float32 (nnz,)): the
  column-blocked CSR of W.T described above, W (K, N); panels = max(1, ceil(K / PANEL))."""
  k, n = kernel.shape
  panels = max(1, -(-k // PANEL))
  kept = (np.asarray(kernel) != 0) if mask is None else np.asarray(mask, bool)
  cols, rows = np.nonzero(kept)  # row-major over (K, N): ordered by input, then output
  values = np.asarray(kernel, np.float32)[cols, rows]
  order = np.lexsort((cols, rows, cols // PANEL))  # by (panel, output row, input column)
  counts = np.bincount((cols // PANEL) * n + rows, minlength=panels * n).reshape(panels, n)
  indptr = np.zeros((panels, n + 1), np.int64)
  indptr[:, 1:] = np.cumsum(counts, axis=1)
  indptr += np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])[:, None]
  return indptr, (cols[order] % PANEL).astype(np.uint16), values[order]


class NumbaCsr:
  """X (K, B) -> W.T @ X + b (N, B) on lwc's numba kernels (column-blocked CSR, see above).

  Attributes: `indptr` int64 (panels, N+1), `indices` uint16 (nnz,), `data` float32 (nnz,),
  `bias` float32 (N,), `bounds` int64 row-block bounds (one block of about equal nonzero count
  per thread when parallel, else [0, N]).
  """

  def __init__(self, kernel: np.ndarray, bias: np.ndarray | None = None,
               mask: np.ndarray | None = None, threads: int | None = 0,
               min_parallel_nnz: int = MIN_PARALLEL_NNZ):
    require("numba")
    self.shape = tuple(kernel.shape)  # (K, N)
    self.indptr, self.indices, self.data = panel_csr(kernel, mask)
    self.bias = _bias(bias, self.shape[1])
    threads = _threads(threads)
    self.threads = threads if threads > 1 and self.nnz >= min_parallel_nnz else 1
    per_row = np.diff(self.indptr, axis=1).sum(axis=0)
    self.bounds = row_blocks(np.concatenate([[0], np.cumsum(per_row)]), self.threads)

  @property
  def nnz(self) -> int:
    return int(self.data.size)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_input(x, self.shape[0])
    batch, n = x.shape[1], self.shape[1]
    if batch == 0:
      return np.empty((n, 0), np.float32)
    if batch == 1:
      kernels, x, y = (_dots_parallel, _dots_rows), x.reshape(1, -1), np.empty((n, 1), np.float32)
    else:
      kernels = (_tiles_parallel, _tiles_rows) if batch < AXPY_BATCH else (_axpy_parallel,
                                                                           _axpy_rows)
      width = -(-batch // TILE) * TILE
      x, y = aligned(x, width), aligned(np.empty((n, 0), np.float32), width)
    args = (self.indptr, self.indices, self.data, x, self.bias, y)
    with _SlpVectorize():
      if self.threads > 1:
        kernels[0](self.bounds, *args)
      else:
        kernels[1](0, n, *args)
    return np.ascontiguousarray(y[:, :batch]) if y.shape[1] != batch else y


def aligned(x: np.ndarray, width: int) -> np.ndarray:
  """x (K, B) float32 as a C-contiguous (K, width) array at a 64-byte boundary, columns B and
  up zero (x itself when it already is one). With width a multiple of 8, no 8-wide row load
  straddles a cache line (a misaligned X costs the tile kernel ~40%)."""
  k, b = x.shape
  if b == width and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
    return x
  buffer = np.empty(k * width + 16, np.float32)
  start = (-buffer.ctypes.data % 64) // 4
  out = buffer[start:start + k * width].reshape(k, width)
  out[:, :b] = x
  out[:, b:] = 0
  return out


def _bias(bias: np.ndarray | None, n: int) -> np.ndarray:
  if bias is None:
    return np.zeros(n, np.float32)
  bias = np.ascontiguousarray(bias, np.float32).reshape(-1)
  if bias.shape != (n,):
    raise ValueError(f"bias of shape {bias.shape} for {n} outputs")
  return bias


# ---------------------------------------------------------------------------------------------
# oneMKL through ctypes (LP64 interface: MKL_INT is int32). Enum values of mkl_spblas.h.

_SPARSE_STATUS_SUCCESS = 0
_SPARSE_OPERATION_NON_TRANSPOSE = 10
_SPARSE_MATRIX_TYPE_GENERAL = 20
_SPARSE_FILL_MODE_FULL = 42
_SPARSE_DIAG_NON_UNIT = 50
_SPARSE_INDEX_BASE_ZERO = 0
_SPARSE_LAYOUT_ROW_MAJOR = 101
_CBLAS_ROW_MAJOR = 101
_CBLAS_NO_TRANS = 111
_MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "libmkl_rt.dylib", "mkl_rt.dll")


class _MatrixDescr(ctypes.Structure):
  _fields_ = [("type", ctypes.c_int), ("mode", ctypes.c_int), ("diag", ctypes.c_int)]


_GENERAL = _MatrixDescr(_SPARSE_MATRIX_TYPE_GENERAL, _SPARSE_FILL_MODE_FULL, _SPARSE_DIAG_NON_UNIT)


@functools.cache
def _mkl_library() -> ctypes.CDLL | None:
  """libmkl_rt with the prototypes lwc uses, or None if it cannot be loaded."""
  for name in _MKL_NAMES:
    for path in (name, os.path.join(sys.prefix, "lib", name)):
      try:
        lib = ctypes.CDLL(path)
        break
      except OSError:
        continue
    else:
      continue
    break
  else:
    return None
  p, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
  protos = {
      "mkl_sparse_s_create_csr": [ctypes.POINTER(p), i32, i32, i32, p, p, p, p],
      "mkl_sparse_set_mv_hint": [p, i32, _MatrixDescr, i32],
      "mkl_sparse_set_mm_hint": [p, i32, _MatrixDescr, i32, i32, i32],
      "mkl_sparse_optimize": [p],
      "mkl_sparse_destroy": [p],
      "mkl_sparse_s_mv": [i32, f32, p, _MatrixDescr, p, f32, p],
      "mkl_sparse_s_mm": [i32, f32, p, _MatrixDescr, i32, p, i32, i32, f32, p, i32],
      "MKL_Set_Num_Threads_Local": [i32],
      "cblas_sgemv": [i32, i32, i32, i32, f32, p, i32, p, i32, f32, p, i32],
      "cblas_sgemm": [i32, i32, i32, i32, i32, i32, f32, p, i32, p, i32, f32, p, i32],
  }
  for fn, args in protos.items():
    getattr(lib, fn).argtypes = args
    getattr(lib, fn).restype = None if fn.startswith("cblas") else i32
  return lib


def _ptr(a: np.ndarray) -> int:
  return a.ctypes.data


def _mkl_check(status: int, what: str) -> None:
  if status != _SPARSE_STATUS_SUCCESS:
    raise RuntimeError(f"MKL {what} failed with sparse_status_t {status}")


class _MklThreads:
  """Sets MKL's thread count for the calling thread inside a `with` block."""

  def __init__(self, lib: ctypes.CDLL, threads: int):
    self.lib, self.threads = lib, threads

  def __enter__(self) -> None:
    self.previous = self.lib.MKL_Set_Num_Threads_Local(self.threads)

  def __exit__(self, *exc) -> None:
    self.lib.MKL_Set_Num_Threads_Local(self.previous)


class MklCsr:
  """X (K, B) -> W.T @ X + b (N, B) with MKL's inspector-executor sparse BLAS (CSR of W.T,
  int32 indices, float32 values; `mkl_sparse_optimize` after mv and mm hints)."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray | None = None,
               mask: np.ndarray | None = None, threads: int | None = 0,
               expected_calls: int = 1000):
    self._lib = _mkl_library() or require("mkl")
    self.shape = tuple(kernel.shape)
    indptr, cols, data = kept_csr(kernel, mask)
    if indptr[-1] >= 2**31:
      raise UserError(f"kernel 'mkl' (LP64) holds at most 2**31 - 1 entries, got {indptr[-1]}")
    self.indptr, self.indices, self.data = indptr.astype(np.int32), cols.astype(np.int32), data
    self.bias = _bias(bias, self.shape[1])
    self.threads = _threads(threads)
    self._handle = ctypes.c_void_p()
    if not self.nnz:  # y = bias: no handle (MKL refuses some empty shapes)
      return
    k, n = self.shape
    lib = self._lib
    _mkl_check(lib.mkl_sparse_s_create_csr(
        ctypes.byref(self._handle), _SPARSE_INDEX_BASE_ZERO, n, k, _ptr(self.indptr),
        _ptr(self.indptr) + 4, _ptr(self.indices), _ptr(self.data)), "create_csr")
    op = _SPARSE_OPERATION_NON_TRANSPOSE
    _mkl_check(lib.mkl_sparse_set_mv_hint(self._handle, op, _GENERAL, expected_calls), "mv_hint")
    _mkl_check(lib.mkl_sparse_set_mm_hint(self._handle, op, _GENERAL, _SPARSE_LAYOUT_ROW_MAJOR,
                                          64, expected_calls), "mm_hint")
    with _MklThreads(lib, self.threads):
      _mkl_check(lib.mkl_sparse_optimize(self._handle), "optimize")

  @property
  def nnz(self) -> int:
    return int(self.data.size)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_input(x, self.shape[0])
    batch = x.shape[1]
    y = np.empty((self.shape[1], batch), np.float32)
    y[:] = self.bias[:, None]
    if batch == 0 or not self.nnz:
      return y
    op, lib = _SPARSE_OPERATION_NON_TRANSPOSE, self._lib
    with _MklThreads(lib, self.threads):
      if batch == 1:
        status = lib.mkl_sparse_s_mv(op, 1.0, self._handle, _GENERAL, _ptr(x), 1.0, _ptr(y))
      else:
        status = lib.mkl_sparse_s_mm(op, 1.0, self._handle, _GENERAL, _SPARSE_LAYOUT_ROW_MAJOR,
                                     _ptr(x), batch, batch, 1.0, _ptr(y), batch)
    _mkl_check(status, "mv" if batch == 1 else "mm")
    return y

  def __del__(self):
    if getattr(self, "_handle", None) and self._handle.value:
      self._lib.mkl_sparse_destroy(self._handle)
      self._handle = ctypes.c_void_p()


class MklDense:
  """X (K, B) -> W.T @ X + b (N, B) dense with MKL's cblas_sgemv (B = 1) / cblas_sgemm."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray | None = None,
               mask: np.ndarray | None = None, threads: int | None = 0):
    self._lib = _mkl_library() or require("dense-mkl")
    self.weights_t = np.ascontiguousarray(_masked(kernel, mask).T)  # (N, K)
    self.shape = tuple(kernel.shape)
    self.bias = _bias(bias, self.shape[1])
    self.threads = _threads(threads)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_input(x, self.shape[0])
    (k, n), batch = self.shape, x.shape[1]
    y = np.empty((n, batch), np.float32)
    y[:] = self.bias[:, None]
    if batch == 0 or n == 0 or k == 0:
      return y
    w, lib = self.weights_t, self._lib
    with _MklThreads(lib, self.threads):
      if batch == 1:
        lib.cblas_sgemv(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, n, k, 1.0, _ptr(w), k, _ptr(x), 1,
                        1.0, _ptr(y), 1)
      else:
        lib.cblas_sgemm(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, n, batch, k, 1.0,
                        _ptr(w), k, _ptr(x), batch, 1.0, _ptr(y), batch)
    return y


# ---------------------------------------------------------------------------------------------
# PyTorch, scipy, NumPy.


class TorchCsr:
  """X (K, B) -> W.T @ X + b (N, B) with a torch.sparse_csr_tensor of W.T (int64 indices)."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray | None = None,
               mask: np.ndarray | None = None, threads: int | None = 0):
    require("torch")
    import torch
    import warnings
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    self._torch = torch
    self.shape = tuple(kernel.shape)
    indptr, cols, data = kept_csr(kernel, mask)
    self.matrix = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols),
                                          torch.from_numpy(data), size=self.shape[::-1])
    self.bias = torch.from_numpy(_bias(bias, self.shape[1]))
    self.threads = _threads(threads)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_input(x, self.shape[0])
    torch = self._torch
    if torch.get_num_threads() != self.threads:
      torch.set_num_threads(self.threads)
    with torch.inference_mode():
      xt = torch.from_numpy(x)
      if x.shape[1] == 1:
        return (torch.mv(self.matrix, xt[:, 0]) + self.bias)[:, None].numpy()
      return (torch.sparse.mm(self.matrix, xt) + self.bias[:, None]).numpy()


def _masked(kernel: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  kernel = np.asarray(kernel, np.float32)
  return kernel if mask is None else np.where(mask, kernel, np.float32(0))


def _scipy(kernel, bias, mask, threads):
  from lwc import sparse
  require("scipy")
  return sparse.CsrMatrix(_masked(kernel, mask), _bias(bias, kernel.shape[1]),
                          threads=threads or None)


def _dense(kernel, bias, mask, threads):
  from lwc import sparse
  return sparse.DenseMatrix(_masked(kernel, mask), _bias(bias, kernel.shape[1]))


_MAKERS = {"numba": NumbaCsr, "mkl": MklCsr, "torch": TorchCsr, "scipy": _scipy,
           "dense": _dense, "dense-mkl": MklDense}


def available(kind: str) -> bool:
  """Whether `kind`'s library can be loaded here (no kernel is compiled)."""
  if kind == "numba":
    return numba is not None
  if kind in ("mkl", "dense-mkl"):
    return _mkl_library() is not None
  if kind == "torch":
    import importlib.util
    return importlib.util.find_spec("torch") is not None
  if kind == "scipy":
    import importlib.util
    return importlib.util.find_spec("scipy") is not None
  return kind == "dense"


def require(kind: str) -> str:
  """`kind` if its library is installed, else UserError naming the package to install."""
  if not available(kind):
    raise UserError(f"kernel kind '{kind}' needs the {PACKAGES[kind]} package, which is not "
                    f"installed here (pip install {PACKAGES[kind]})")
  return kind


def resolve(kind: str) -> str:
  """The kind that `kind` stands for: 'auto' -> DEFAULT_KIND if installed, else FALLBACK_KIND."""
  if kind == "auto":
    return DEFAULT_KIND if available(DEFAULT_KIND) else FALLBACK_KIND
  if kind not in KINDS:
    raise UserError(f"unknown kernel kind '{kind}', expected auto or one of: {', '.join(KINDS)}")
  return kind


def make_matrix(kernel: np.ndarray, bias: np.ndarray | None = None,
                mask: np.ndarray | None = None, kind: str = "auto", threads: int | None = 0):
  """A callable X (K, B) float32 -> (W * mask).T @ X + bias (N, B) float32 of the given kind.

  kernel: (K, N), Flax's Dense layout (a conv kernel reshaped to (kh*kw*in, out)); bias (N,)
  or None (zeros); mask (K, N) bool or None (W's nonzeros are the stored entries); threads: 0
  or None = one per CPU, 1 = single-threaded (ignored by "dense", which uses BLAS's own).
  Raises UserError for an unknown kind or one whose library is not installed.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (inputs, outputs), got shape {kernel.shape}")
  if mask is not None and np.shape(mask) != kernel.shape:
    raise ValueError(f"mask of shape {np.shape(mask)} for a kernel of shape {kernel.shape}")
  return _MAKERS[resolve(kind)](kernel, bias, mask, threads)
