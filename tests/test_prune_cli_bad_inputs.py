"""Bad input on the generic entry point's new paths (models by import path, datasets by name or
.npz): one `error:` line on stderr, exit status 2, and nothing on disk created or changed. Each
expected line is the library's own message for that input, so the CLI adds nothing and drops
nothing."""

import os
import subprocess
import sys

import numpy as np
import pytest

import lwc.data
from lwc import models
from lwc.errors import UserError

TESTS = os.path.dirname(os.path.abspath(__file__))


def _npz(path, **change):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8),
            "y_train": rng.integers(0, 3, 60), "x_test": rng.integers(0, 255, (20, 8, 8, 1),
                                                                      dtype=np.uint8),
            "y_test": rng.integers(0, 3, 20)}
  arrays.update(change)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def _library_error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as e:
    fn(*args, **kwargs)
  return f"error: {e.value}"


MODEL_CASES = {
    "module that does not exist": "no_such_package.nets:Net",
    "attribute that does not exist": "user_models:Missing",
    "not callable": "user_models:NOT_CALLABLE",
    "factory returning no module": "user_models:not_a_module",
    "factory that raises": "user_models:broken_factory",
    "a module, not a factory": "user_models:nnx",
}


def _run(tmp_path, *args):
  env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("LWC_FAULT", None)
  workdir = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "lwc.experiments.prune", f"--workdir={workdir}",
                         "--dense_epochs=1", "--iterations=1", "--tensorboard=false", *args],
                        capture_output=True, text=True, env=env, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  return proc, errors, workdir


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_import_path(case, small_mnist_dir, tmp_path):
  spec = MODEL_CASES[case]
  sys.path.insert(0, TESTS)
  try:
    want = _library_error(lambda: models.instantiate(spec))
  finally:
    sys.path.remove(TESTS)
  proc, errors, workdir = _run(tmp_path, f"--model={spec}", f"--data_dir={small_mnist_dir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert errors == [want] and "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_tfds_name_that_is_not_image_classification(tmp_path):
  want = _library_error(lwc.data.load, "imdb_reviews", None, download=False)
  proc, errors, workdir = _run(tmp_path, "--dataset=imdb_reviews", "--nodownload")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert errors == [want]
  assert not workdir.exists()


NPZ_CASES = {
    "missing keys": dict(y_test=None),
    "mismatched lengths": dict(y_train=np.zeros(59, np.int64)),
    "labels out of range": dict(y_test=np.full(20, -1)),
    "float labels": dict(y_train=np.full(60, 0.5)),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz(case, tmp_path):
  path = _npz(str(tmp_path / "data.npz"), **NPZ_CASES[case])
  with open(path, "rb") as f:
    before = f.read()
  want = _library_error(lwc.data.load, "mine", path)
  proc, errors, workdir = _run(tmp_path, "--dataset=mine", f"--data_dir={path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert errors == [want]
  assert not workdir.exists()
  with open(path, "rb") as f:
    assert f.read() == before
