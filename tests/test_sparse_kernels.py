"""lwc.sparse_kernels: every installed kernel kind equals the dense product, and LeNets from an
export predict through the fast path exactly as the masked dense model does."""

import zlib

import jax
import numpy as np
import pytest

from lwc import sparse
from lwc import sparse_kernels as sk
from lwc.errors import UserError

INSTALLED = [pytest.param(kind, marks=pytest.mark.skipif(
    not sk.available(kind), reason=f"{sk.PACKAGES[kind]} not installed")) for kind in sk.KINDS]
BATCHES = (1, 2, 3, 7, 8, 31, 32, 64, 256)  # every kernel of every kind, paddings
DENSITIES = (0.0, 0.01, 0.09, 0.5, 1.0)
SHAPES = ((37, 23), (300, 7), (5, 131))  # (inputs K, outputs N), odd on purpose


def layer(shape, density, how, rng):
  """(kernel (K, N) float32 with zeros where pruned, mask (K, N)): `how` = 'random' (a uniform
  random mask) or 'pruned' (magnitude pruning of Gaussian weights to `density`)."""
  w = rng.standard_normal(shape).astype(np.float32)
  if how == "random":
    mask = rng.random(shape) < density
  else:
    keep = int(round(density * w.size))
    order = np.argsort(-np.abs(w), axis=None)
    mask = np.zeros(w.size, bool)
    mask[order[:keep]] = True
    mask = mask.reshape(shape)
  return np.where(mask, w, np.float32(0)), mask


def assert_matches_dense(got, kernel, bias, x):
  """got == kernel.T @ x + bias up to float32 rounding of sums of |terms|."""
  want = kernel.T.astype(np.float64) @ x.astype(np.float64) + bias[:, None]
  scale = np.abs(kernel.T).astype(np.float64) @ np.abs(x).astype(np.float64) + np.abs(bias)[:, None]
  assert got.shape == want.shape and got.dtype == np.float32
  bad = np.abs(got - want) > 2e-6 * scale + 1e-6
  assert not bad.any(), f"{bad.sum()} entries off, max {np.abs(got - want).max()}"


def matrices(kind, kernel, bias, mask):
  """The kind single-threaded and on 2 threads (numba: forced parallel even when small)."""
  if kind == "numba":
    two = sk.NumbaCsr(kernel, bias, mask, threads=2, min_parallel_nnz=0)
  else:
    two = sk.make_matrix(kernel, bias, mask, kind=kind, threads=2)
  return [sk.make_matrix(kernel, bias, mask, kind=kind, threads=1), two]


@pytest.mark.parametrize("kind", INSTALLED)
@pytest.mark.parametrize("how", ["random", "pruned"])
def test_every_density_and_batch_matches_dense(kind, how):
  rng = np.random.default_rng(zlib.crc32(f"{kind} {how}".encode()))
  for shape in SHAPES:
    for density in DENSITIES:
      kernel, mask = layer(shape, density, how, rng)
      bias = rng.standard_normal(shape[1]).astype(np.float32)
      for matrix in matrices(kind, kernel, bias, mask):
        for batch in BATCHES:
          x = rng.standard_normal((shape[0], batch)).astype(np.float32)
          assert_matches_dense(matrix(x), kernel, bias, x)


@pytest.mark.parametrize("kind", INSTALLED)
def test_empty_rows_and_columns_and_edge_shapes(kind):
  rng = np.random.default_rng(1)
  kernel, mask = layer((64, 40), 0.3, "random", rng)
  kernel[:, 3] = 0  # an output with no inputs
  kernel[:, -1] = 0  # the last output too
  kernel[10:20] = 0  # inputs that feed nothing
  mask = kernel != 0
  bias = rng.standard_normal(40).astype(np.float32)
  for matrix in matrices(kind, kernel, bias, mask):
    for batch in (0, 1, 5, 33):
      x = rng.standard_normal((64, batch)).astype(np.float32)
      assert_matches_dense(matrix(x), kernel, bias, x)
  for k, n in ((1, 1), (1, 9), (9, 1)):
    kernel = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((k, 4)).astype(np.float32)
    for matrix in matrices(kind, kernel, bias, None):
      assert_matches_dense(matrix(x), kernel, bias, x)
      assert_matches_dense(matrix(x[:, :1]), kernel, bias, x[:, :1])


@pytest.mark.parametrize("kind", INSTALLED)
def test_mask_is_applied_and_kept_zeros_are_harmless(kind):
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((50, 30)).astype(np.float32)  # nonzero where the mask is False
  mask = rng.random((50, 30)) < 0.2
  kernel[mask & (rng.random((50, 30)) < 0.3)] = 0  # kept connections whose weight is 0
  bias = np.zeros(30, np.float32)
  x = rng.standard_normal((50, 6)).astype(np.float32)
  got = sk.make_matrix(kernel, bias, mask, kind=kind, threads=1)(x)
  assert_matches_dense(got, np.where(mask, kernel, 0).astype(np.float32), bias, x)


def test_numba_panels_and_row_blocks():
  rng = np.random.default_rng(3)
  kernel, mask = layer((70_001, 3), 0.001, "random", rng)  # 18 panels of 4096 inputs
  wide = sk.NumbaCsr(kernel, None, mask, threads=2, min_parallel_nnz=0)
  assert wide.indptr.shape == (18, 4) and wide.indices.dtype == np.uint16
  assert wide.nnz == mask.sum() and wide.indptr[-1, -1] == wide.nnz
  for batch in (1, 2, 9):
    x = rng.standard_normal((70_001, batch)).astype(np.float32)
    assert_matches_dense(wide(x), kernel, np.zeros(3, np.float32), x)
  kernel, mask = layer((9000, 500), 0.05, "random", rng)  # 3 panels, the last one partial
  m = sk.NumbaCsr(kernel, None, mask, threads=3, min_parallel_nnz=0)
  assert m.indptr.shape == (3, 501) and m.data.dtype == np.float32
  # Panel p, row r holds W.T[r, p*4096:(p+1)*4096]'s kept entries, columns relative.
  p, r = 2, 17
  lo, hi = m.indptr[p, r], m.indptr[p, r + 1]
  cols = np.nonzero(mask[8192:, r])[0]
  np.testing.assert_array_equal(m.indices[lo:hi], cols)
  np.testing.assert_array_equal(m.data[lo:hi], kernel[8192 + cols, r])
  assert m.threads == 3 and m.bounds[0] == 0 and m.bounds[-1] == 500 and len(m.bounds) == 4
  per_block = [mask[:, a:b].sum() for a, b in zip(m.bounds[:-1], m.bounds[1:])]
  assert max(per_block) - min(per_block) <= 2 * mask.sum(axis=0).max()
  assert sk.NumbaCsr(kernel[:1000], None, mask[:1000], threads=2).threads == 1  # small
  assert np.array_equal(sk.row_blocks(np.zeros(1, np.int64), 2), [0, 0])
  x = np.zeros(5 * 13 + 1, np.float32)[1:].reshape(5, 13)  # 4 bytes past an aligned start
  padded = sk.aligned(x + 1, 16)
  assert padded.ctypes.data % 64 == 0 and padded.shape == (5, 16)
  assert (padded[:, :13] == 1).all() and (padded[:, 13:] == 0).all()
  ready = sk.aligned(padded, 16)
  assert ready is padded


def test_bad_input():
  kernel = np.eye(4, 3, dtype=np.float32)
  with pytest.raises(UserError, match="unknown kernel kind 'bcoo'"):
    sk.make_matrix(kernel, kind="bcoo")
  with pytest.raises(UserError, match="threads must be >= 0"):
    sk.make_matrix(kernel, kind="numba", threads=-1)
  with pytest.raises(ValueError, match="2-D"):
    sk.make_matrix(np.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match="mask of shape"):
    sk.make_matrix(kernel, mask=np.ones((3, 4), bool))
  with pytest.raises(ValueError, match="bias of shape"):
    sk.make_matrix(kernel, np.zeros(4), kind="numba")
  for kind in ("numba", "mkl"):
    if sk.available(kind):
      with pytest.raises(ValueError, match=r"expected activations of shape \(4, batch\)"):
        sk.make_matrix(kernel, kind=kind)(np.zeros((3, 1), np.float32))


def test_missing_library_is_a_user_error(monkeypatch):
  monkeypatch.setattr(sk, "numba", None)
  monkeypatch.setattr(sk, "_mkl_library", lambda: None)
  assert sk.resolve("auto") == sk.FALLBACK_KIND
  for kind in ("numba", "mkl", "dense-mkl"):
    with pytest.raises(UserError, match=f"kernel kind '{kind}' needs the .* package"):
      sk.make_matrix(np.eye(2, dtype=np.float32), kind=kind)
    with pytest.raises(UserError, match="pip install"):
      sparse.NumpyModel("lenet_300_100", {}, backend=kind)


def test_numpy_model_backends():
  with pytest.raises(UserError, match="backend must be auto, csr or one of"):
    sparse.NumpyModel("lenet5", {}, backend="bcoo")
  model = sparse.NumpyModel("lenet_300_100", {}, backend="csr")
  assert model.backend == "scipy"
  if sk.available(sk.DEFAULT_KIND):
    assert sparse.NumpyModel("lenet_300_100", {}).backend == sk.DEFAULT_KIND


# ------------------------------------------------------------------ LeNets from an export

DENSITY = {"lenet_300_100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},  # Table 2
           "lenet5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19}}  # Table 3


def pruned_export(model_name, make_params, tmp_path):
  """(model, masked params, export decoded from disk): random weights magnitude-pruned to the
  paper's per-layer densities, written with lwc.sparse.save and read back."""
  model, params = make_params(model_name, seed=4)
  rng = np.random.default_rng(5)
  masks = {}
  for name, p in params.items():
    kernel, mask = layer(p["kernel"].shape, DENSITY[model_name][name], "pruned", rng)
    kernel *= np.abs(p["kernel"]).max() / np.abs(kernel).max()
    params[name] = {"kernel": kernel, "bias": rng.standard_normal(p["bias"].shape).astype(
        np.float32) * 0.1}
    masks[name] = {"kernel": mask, "bias": np.ones(p["bias"].shape, bool)}
  path = str(tmp_path / f"{model_name}.npz")
  sparse.save(sparse.encode_model(params, masks, info={"model": model_name}), path)
  decoded, _ = sparse.load(path).decode()
  return model, params, decoded


@pytest.mark.parametrize("model_name", ["lenet_300_100", "lenet5"])
def test_lenet_predictions_from_export_equal_dense_masked_model(model_name, make_params,
                                                                small_mnist_dir, tmp_path):
  from lwc.data import mnist
  images = mnist.load_idx(small_mnist_dir).test.images  # the first 1,000 test images
  model, params, decoded = pruned_export(model_name, make_params, tmp_path)
  want = np.asarray(jax.jit(model.apply)({"params": params}, images))
  fast = sparse.NumpyModel(model_name, decoded)  # the default path
  assert fast.backend == sk.resolve("auto")
  for batch in (1000, 7, 1):
    got = np.concatenate([fast(images[s:s + batch]) for s in range(0, 21 if batch < 1000
                                                                    else 1000, batch)])
    np.testing.assert_allclose(got, want[:len(got)], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(sparse.predict(fast, images, 250), want.argmax(-1))
