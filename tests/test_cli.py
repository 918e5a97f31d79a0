"""Bad input at the command line: one clear error line, a non-zero exit, no traceback, and no
file of an existing workdir touched."""

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lwc import checkpoints as ckpt_lib
from lwc import pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LWC_FAULT", None)
  return subprocess.run([sys.executable, "-m", "lwc.experiments.lenet", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def snapshot(folder):
  """{relative path: (sha256, mtime_ns)} of every file below folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                              os.stat(path).st_mtime_ns)
  return out


def error_lines(proc):
  return [line for line in proc.stderr.splitlines()
          if line.startswith(("error:", "FATAL Flags parsing error:"))]


@pytest.fixture(scope="module")
def lenet5_workdir(small_mnist_dir, tmp_path_factory):
  """A workdir holding an iteration-0 checkpoint of LeNet-5."""
  workdir = str(tmp_path_factory.mktemp("lenet5"))
  pipeline.run(pipeline.Config(model="lenet5", data_dir=small_mnist_dir, dense_epochs=0,
                               iterations=0, batch_size=8, tensorboard=False), workdir)
  return workdir


@pytest.fixture(scope="module")
def reshaped_workdir(tmp_path_factory):
  """A workdir whose checkpoint says lenet_300_100 but holds other parameter shapes."""
  workdir = str(tmp_path_factory.mktemp("reshaped"))
  params = {"fc1": {"kernel": np.zeros((784, 200), np.float32), "bias": np.zeros(200, np.float32)}}
  checkpoints = ckpt_lib.Checkpoints(workdir)
  checkpoints.save(0, {"params": params, "rng": np.asarray(jax.random.PRNGKey(0))},
                   {"model": "lenet_300_100", "param_shapes": ckpt_lib.param_shapes(params),
                    "config": {}, "history": []})
  checkpoints.close()
  return workdir


def partial_mnist(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    if not name.startswith("t10k-labels"):
      os.symlink(os.path.join(src, name), os.path.join(dst, name))
  return dst


CASES = {
    "negative quality": (["--quality=-0.5"], "error: quality must be a finite number >= 0, got "
                         "-0.5"),
    "non-numeric quality": (["--quality=abc"], "error: --quality: 'abc' is not a number"),
    "nan quality": (["--quality=nan"], "error: quality must be a finite number >= 0, got nan"),
    "bad layer quality": (["--layer_quality=fc3"], "error: --layer_quality=fc3: expected NAME=Q "
                          "or NAME=Q:Q:..."),
    "unknown layer": (["--layer_quality=fc9=0.5"], "error: quality given for unknown layer(s) "
                      "fc9; prunable layers are fc1, fc2, fc3"),
    "negative iterations": (["--iterations=-1"], "error: flag --iterations=-1: -1 is not a "
                            "non-negative integer"),
    "unknown model": (["--model=resnet50"], "error: --model=resnet50: this entry point runs "
                      "lenet_300_100, lenet5; any other network runs with python -m "
                      "lwc.experiments.prune"),
    "not an image dataset": (["--dataset=imdb_reviews", "--data_dir=", "--nodownload"],
                             "error: 'imdb_reviews' is not an image-classification dataset: "
                             "features are {text: Text, label: ClassLabel}; expected an 'image' "
                             "Image and a 'label' ClassLabel"),
    "stray argument": (["extra"], "error: unexpected arguments: extra"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flag(case, small_mnist_dir, tmp_path):
  args, message = CASES[case]
  workdir = tmp_path / "w"
  proc = run_cli(f"--workdir={workdir}", f"--data_dir={small_mnist_dir}", *args)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert error_lines(proc) == [message], proc.stderr[-2000:]
  assert not workdir.exists()


def test_data_dir_without_files(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli(f"--workdir={tmp_path / 'w'}", f"--data_dir={empty}", "--download=false")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == [
      f"error: TFDS 'mnist' is not prepared in data_dir={empty} and --download is off; pass "
      "--data_dir holding the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
      "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz)"]
  assert not (tmp_path / "w").exists()


def test_data_dir_missing_one_file(mnist_dir, tmp_path):
  folder = partial_mnist(mnist_dir, str(tmp_path / "partial"))
  proc = run_cli(f"--workdir={tmp_path / 'w'}", f"--data_dir={folder}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == [
      f"error: {folder}/t10k-labels-idx1-ubyte[.gz]: missing (MNIST IDX file expected in "
      f"--data_dir={folder})"]


def test_data_dir_does_not_exist(tmp_path):
  proc = run_cli(f"--workdir={tmp_path / 'w'}", f"--data_dir={tmp_path / 'nope'}")
  assert proc.returncode == 2
  assert error_lines(proc) == [f"error: --data_dir={tmp_path / 'nope'}: no such directory"]


def test_workdir_of_another_model(lenet5_workdir, small_mnist_dir):
  before = snapshot(lenet5_workdir)
  proc = run_cli(f"--workdir={lenet5_workdir}", f"--data_dir={small_mnist_dir}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == [
      "error: workdir holds checkpoints of model 'lenet5', this run is 'lenet_300_100': use "
      f"another --workdir ({lenet5_workdir}/checkpoints)"]
  assert snapshot(lenet5_workdir) == before


def test_workdir_with_other_shapes(reshaped_workdir, small_mnist_dir):
  before = snapshot(reshaped_workdir)
  proc = run_cli(f"--workdir={reshaped_workdir}", f"--data_dir={small_mnist_dir}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert error_lines(proc) == [
      "error: workdir holds checkpoints of 'lenet_300_100' with other parameter shapes (first "
      "difference: ['fc1']['bias']: [200] there, [300] here; other --widths?): use another "
      f"--workdir or the run's own settings ({reshaped_workdir}/checkpoints)"]
  assert snapshot(reshaped_workdir) == before


def test_help_lists_the_flags():
  proc = run_cli("--helpshort")  # absl exits 1 after printing help
  for flag in ("--workdir", "--quality", "--layer_quality", "--retrain_lr_scale",
               "--regularization", "--iterations", "--data_dir"):
    assert flag in proc.stdout
