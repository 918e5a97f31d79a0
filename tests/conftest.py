"""Shared test setup: 8 fake CPU devices for the whole suite, and where the MNIST IDX files are."""

import os

import jax

# Must run before any JAX backend is initialised (conftest is imported before every test module);
# jax raises if a backend already exists, so a misordered import fails loudly instead of silently
# giving one device.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_all_idx_files(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, name)) or
             os.path.isfile(os.path.join(path, name + ".gz")) for name in MNIST_FILES)


@pytest.fixture(scope="session")
def mnist_dir() -> str:
  """The folder of MNIST IDX files: $LWC_MNIST_DIR, else <repo>/../shared/data/mnist."""
  override = os.environ.get("LWC_MNIST_DIR")
  if override:
    if not _has_all_idx_files(override):
      pytest.fail(f"LWC_MNIST_DIR={override} does not hold the four MNIST IDX files")
    return override
  path = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))
  if not _has_all_idx_files(path):
    pytest.skip(f"MNIST IDX files not found in {path} (set LWC_MNIST_DIR)")
  return path


@pytest.fixture(scope="session")
def make_params():
  """make_params(model_name, seed) -> (model, params) with LeCun-normal kernels and zero biases.

  Shapes come from the model's own `init` (traced with jax.eval_shape, nothing compiled); values
  are drawn with NumPy, because compiling Flax's random initialisers costs seconds per model on a
  small CPU and no test depends on their exact distribution.
  """
  import jax.numpy as jnp
  import numpy as np

  from lwc import models

  def make(name: str, seed: int = 0):
    model = models.get_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
      if path[-1].key == "bias":
        return np.zeros(s.shape, np.float32)
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)

  return make


def write_mnist_subset(src: str, dst: str, n_train: int, n_test: int) -> str:
  """Writes the first n_train / n_test examples of the real MNIST in `src` as plain IDX files."""
  import struct

  from lwc.data import mnist

  data = mnist.load_idx(src)
  os.makedirs(dst, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    part = getattr(data, split)
    images = (part.images[:n, :, :, 0] * 255).round().astype("uint8")
    labels = part.labels[:n].astype("uint8")
    image_stem, label_stem = mnist.IDX_STEMS[split]
    with open(os.path.join(dst, image_stem), "wb") as f:
      f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    with open(os.path.join(dst, label_stem), "wb") as f:
      f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
  return dst


@pytest.fixture(scope="session")
def small_mnist_dir(mnist_dir, tmp_path_factory) -> str:
  """The first 2,000 training and 1,000 test images of MNIST, as IDX files in a temp folder."""
  return write_mnist_subset(mnist_dir, str(tmp_path_factory.mktemp("mnist_small")), 2000, 1000)


def assert_same_run(workdir: str, reference: str, config) -> None:
  """A resumed run ended exactly where an uninterrupted one did: the same per-iteration summary
  (wall times aside), bit-identical final params, masks and optimiser state, identical
  metrics.jsonl lines. `config` is the runs' pipeline.Config (to restore their checkpoints)."""
  import json

  import chex

  from lwc import pipeline

  summaries = []
  for folder in (workdir, reference):
    with open(os.path.join(folder, "summary.json")) as f:
      summaries.append([_without_wall_times(h) for h in json.load(f)["iterations"]])
  assert summaries[0] == summaries[1]
  got, want = (pipeline.restore_iteration(folder, config) for folder in (workdir, reference))
  for key in ("masks", "params", "opt_state"):
    chex.assert_trees_all_equal(got[key], want[key])
  lines = []
  for folder in (workdir, reference):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
      lines.append([json.loads(line) for line in f])
  assert lines[0] == lines[1]


def _without_wall_times(row: dict) -> dict:
  """A history row less what the clock measured (the iteration's and its sweep's seconds)."""
  row = {k: v for k, v in row.items() if k != "seconds"}
  if "allocation" in row:
    row["allocation"] = {k: v for k, v in row["allocation"].items() if k != "sweep_seconds"}
  return row


def lenet_cli(workdir, data_dir, flags, fault=None, popen=False):
  """`python -m lwc.experiments.lenet` in a subprocess on the CPU with `flags`; LWC_FAULT set to
  `fault` (kill -9 at that point, lwc.faults) or unset. Returns the CompletedProcess (stdout and
  stderr captured, 300 s at most), or with `popen` the Popen (stderr piped)."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LWC_FAULT", None)
  if fault:
    env["LWC_FAULT"] = fault
  cmd = [sys.executable, "-m", "lwc.experiments.lenet", f"--workdir={workdir}",
         f"--data_dir={data_dir}", *flags]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def run_pipeline(cfg, workdir, hook=None):
  """pipeline.run(cfg, workdir) with `lwc.faults.hook` set to `hook` for its duration."""
  from lwc import faults, pipeline
  faults.hook = hook
  try:
    return pipeline.run(cfg, workdir)
  finally:
    faults.hook = None


def rewrite_npz(path, out, change):
  """Copies the npz at `path` to `out` with arrays changed by change(dict) -> dict."""
  import numpy as np
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  with open(out, "wb") as f:
    np.savez(f, **change(arrays))
  return out
