"""Reliability, second round, in process: resuming with other settings, metadata covered by the
checksums, every numeric setting checked up front, degenerate pruning, edges of data and
signals, missing pieces of a finished run, the file system, and model shapes.

The runs are tiny (2,000 MNIST images, one epoch a phase); the command line's side of the same
cases is in tests/test_bad_inputs.py.
"""

import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import signal

import conftest
import pytest

from lwc import checkpoints as ckpt_lib
from lwc import faults
from lwc import files
from lwc import pipeline
from lwc.errors import UserError

# 25 steps an epoch at batch 80 (all 2,000 images train: no validation split, nothing is
# decided here); progress checkpoints every 10 steps.
BASE = dict(model="lenet_300_100", validation=0, decide_on_test=True, batch_size=80, learning_rate=0.05, dense_epochs=1,
            retrain_epochs=1, iterations=2, qualities=(0.8,), tensorboard=False,
            steps_per_call=5, checkpoint_every_steps=10, log_every_seconds=1e9)


class Killed(BaseException):
  """Stands in for kill -9 in process: nothing catches it, the files stay as they are."""


def kill_at(n_appends):
  """faults.hook raising Killed at the n-th metrics line (before it is written)."""
  seen = []

  def hook(path, kind, data):
    if kind == "append":
      seen.append(path)
      if len(seen) == n_appends:
        raise Killed()
  return hook


run = conftest.run_pipeline


def snapshot(folder):
  out = {}
  for root, dirs, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      if os.path.islink(path):
        out[os.path.relpath(path, folder)] = ("link", os.readlink(path))
        continue
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), folder)] = "dir"
  return out


@pytest.fixture(scope="module")
def cfg(small_mnist_dir):
  return pipeline.Config(data_dir=small_mnist_dir, **BASE)


@pytest.fixture(scope="module")
def finished(cfg, tmp_path_factory):
  """A finished 2-iteration run."""
  workdir = str(tmp_path_factory.mktemp("finished") / "w")
  run(cfg, workdir)
  return workdir


@pytest.fixture(scope="module")
def mid_dense(cfg, tmp_path_factory):
  """A run 'killed' just before its first metrics line (step 25): progress checkpoint 20."""
  workdir = str(tmp_path_factory.mktemp("mid_dense") / "w")
  with pytest.raises(Killed):
    run(cfg, workdir, kill_at(1))
  assert os.listdir(os.path.join(workdir, "progress")) == ["20"]
  return workdir


@pytest.fixture(scope="module")
def mid_retrain(cfg, tmp_path_factory):
  """A run 'killed' in iteration 1's retraining, after its pruning record: progress 45."""
  workdir = str(tmp_path_factory.mktemp("mid_retrain") / "w")
  with pytest.raises(Killed):
    run(cfg, workdir, kill_at(3))  # dense 25, prune 25, retrain 50
  assert os.listdir(os.path.join(workdir, "progress")) == ["45"]
  return workdir


def copy(src, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(src, dst, symlinks=True)
  return dst


# --- class 2: resuming with other settings -------------------------------------------------------


@pytest.mark.parametrize("where", ["finished", "mid_dense", "mid_retrain"])
def test_resume_with_other_fixed_settings_is_refused_naming_them(where, cfg, request, tmp_path):
  workdir = copy(request.getfixturevalue(where), tmp_path)
  before = snapshot(workdir)
  with pytest.raises(UserError) as e:
    run(cfg.replace(batch_size=40, seed=3, optimizer="adam"), workdir)
  message = str(e.value)
  assert message.startswith(f"{workdir} holds a run with other settings, which cannot change "
                            "when resuming ")
  for part in ("--batch_size=80 (now 40)", "--optimizer=sgd (now adam)", "--seed=0 (now 3)"):
    assert part in message, message
  assert "\n" not in message
  assert snapshot(workdir) == before


def test_retraining_settings_may_change_between_iterations_not_within(cfg, finished, mid_retrain,
                                                                      tmp_path):
  # Mid-retraining: refused.
  workdir = copy(mid_retrain, tmp_path)
  before = snapshot(workdir)
  with pytest.raises(UserError, match=r"in the middle of iteration 1: --retrain_lr_scale=0\.1 "
                     r"\(now 0\.5\)"):
    run(cfg.replace(retrain_lr_scale=0.5), workdir)
  assert snapshot(workdir) == before
  # A past iteration's quality: refused.
  with pytest.raises(UserError, match=r"--quality of iteration 1: 0\.8 \(now 0\.5\)"):
    run(cfg.replace(qualities=(0.5,)), workdir)
  # Between iterations (after iteration 2 of the finished run): more iterations, a quality for
  # the new one, other retraining settings. Each iteration records what it ran with.
  workdir = str(tmp_path / "more")
  shutil.copytree(finished, workdir)
  more = cfg.replace(iterations=3, qualities=(0.8, 0.8, 1.2), retrain_epochs=2,
                     remove_dead_neurons=False)
  summary = run(more, workdir)
  settings = [h["settings"] for h in summary["iterations"]]
  assert [s["retrain_epochs"] for s in settings] == [1, 1, 1, 2]
  assert [s["iterations"] for s in settings] == [2, 2, 2, 3]
  assert summary["iterations"][3]["quality"] == {"fc1": 1.2, "fc2": 1.2, "fc3": 1.2}


def test_free_settings_may_change_anywhere(cfg, mid_dense, tmp_path):
  workdir = copy(mid_dense, tmp_path)
  summary = run(cfg.replace(iterations=0, checkpoint_every_steps=0, eval_batch_size=1000,
                            remove_dead_neurons=False), workdir)
  assert len(summary["iterations"]) == 1


# --- class 3: metadata under the checksums --------------------------------------------------------


def _flip_meta(workdir, folder):
  path = os.path.join(workdir, folder, "meta", "metadata")
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  i = raw.index(b'"batch"') if b'"batch"' in raw else raw.index(b'"test_error"')
  digit = raw.index(b"0", i) if b"0" in raw[i:] else i + 10
  raw[digit] ^= 0x01  # one bit: '0' becomes '1', still valid JSON
  with open(path, "wb") as f:
    f.write(bytes(raw))


@pytest.mark.parametrize("where,folder", [("finished", "checkpoints/2"),
                                          ("finished", "checkpoints/0"),
                                          ("mid_dense", "progress/20")])
def test_one_flipped_bit_in_meta_is_refused(where, folder, cfg, request, tmp_path):
  workdir = copy(request.getfixturevalue(where), tmp_path)
  _flip_meta(workdir, folder)
  before = snapshot(workdir)
  want = (f"checkpoint {os.path.join(workdir, folder)} is corrupt: its files differ from the "
          "checksums saved with it")
  latest = folder in ("checkpoints/2", "progress/20")
  if latest:  # what a resume reads first
    with pytest.raises(UserError) as e:
      run(cfg, workdir)
    assert str(e.value).startswith(want), str(e.value)
  if folder.startswith("checkpoints"):
    with pytest.raises(UserError) as e:
      pipeline.restore_iteration(workdir, cfg, int(folder.split("/")[1]))
    assert str(e.value).startswith(want), str(e.value)
  assert snapshot(workdir) == before


def test_old_checksums_of_state_only_are_still_checked(finished, tmp_path):
  workdir = copy(finished, tmp_path)
  folder = os.path.join(workdir, "checkpoints", "1")
  path = os.path.join(folder, ckpt_lib.CHECKSUMS)
  with open(path) as f:
    digests = json.load(f)
  with open(path, "w") as f:
    json.dump({k: v for k, v in digests.items() if k.startswith("state")}, f)
  assert ckpt_lib.verify_checksums(folder)
  target = max(glob.glob(os.path.join(folder, "state", "**", "*"), recursive=True),
               key=lambda p: os.path.getsize(p) if os.path.isfile(p) else -1)
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 1]))
  assert not ckpt_lib.verify_checksums(folder)


# --- class 6: every numeric setting, finite and in range, before any data is read ----------------


def _numeric_fields():
  out = []
  for field in dataclasses.fields(pipeline.Config):
    if isinstance(field.default, bool) or not isinstance(field.default, (int, float)):
      continue
    out.append(field.name)
  return out


def test_every_numeric_setting_has_a_range():
  covered = set(pipeline.Config.INT_RANGES) | set(pipeline.Config.FLOAT_RANGES)
  assert set(_numeric_fields()) == covered


def _bad_values(name):
  if name in pipeline.Config.INT_RANGES:
    low, high = pipeline.Config.INT_RANGES[name]
    return [low - 1, high + 1, 2**70, 1.5]
  low, high, low_in, high_in = pipeline.Config.FLOAT_RANGES[name]
  bad = [math.nan, math.inf, -math.inf]
  bad.append(low if not low_in else low - 1.0)
  if math.isfinite(high):
    bad.append(high if not high_in else high + 1.0)
  return bad


@pytest.mark.parametrize("name", _numeric_fields())
def test_every_numeric_setting_is_checked_before_data_is_read(name, tmp_path):
  workdir = str(tmp_path / "w")
  for value in _bad_values(name):
    cfg = pipeline.Config(data_dir=str(tmp_path / "no_data_here"), **{name: value})
    with pytest.raises(UserError) as e:
      pipeline.run(cfg, workdir)
    assert str(e.value).startswith(f"{name} must be"), (value, str(e.value))
    assert not os.path.exists(workdir)


def test_seed_range_is_what_the_rng_keeps_apart():
  import jax
  low, high = pipeline.Config.INT_RANGES["seed"]
  assert (low, high) == (0, 2**32 - 1)
  assert list(jax.random.PRNGKey(high)) != list(jax.random.PRNGKey(0))


# --- class 4: degenerate pruning -----------------------------------------------------------------


@pytest.mark.parametrize("layer_qualities,empty", [({"fc3": (100.0,)}, ["fc3"]),
                                                   ({"default": (100.0,)}, None)])
def test_pruning_a_whole_layer_or_network_is_reported_not_a_crash(layer_qualities, empty, cfg,
                                                                   tmp_path):
  if empty is None:  # the whole network
    c = cfg.replace(iterations=1, qualities=(100.0,))
    empty = ["fc1", "fc2", "fc3"]
  else:
    c = cfg.replace(iterations=1, layer_qualities=layer_qualities)
  workdir = str(tmp_path / "w")
  summary = run(c, workdir)
  assert summary["iterations"][1]["empty_layers"] == empty
  assert summary["small_model"]["empty_layers"]
  assert not os.path.exists(os.path.join(workdir, "small_model"))
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "computes a constant" in f.read()
  assert os.path.exists(os.path.join(workdir, "figures", "histogram_fc1.png"))
  again = run(c, workdir)  # and every re-run ends the same way
  assert again["iterations"] == summary["iterations"]


# --- class 9: edges of data and signals ----------------------------------------------------------


def test_empty_test_split_is_refused_before_training(mnist_dir, cfg, tmp_path):
  data = conftest.write_mnist_subset(mnist_dir, str(tmp_path / "data"), 400, 0)
  workdir = str(tmp_path / "w")
  with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\[\.gz\]\): no examples"):
    pipeline.run(cfg.replace(data_dir=data), workdir)
  assert not os.path.exists(workdir)


def test_sigterm_while_data_loads_stops_cleanly(cfg, tmp_path, monkeypatch):
  real = pipeline.open_data

  def loading(config, parallel):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(config, parallel)

  monkeypatch.setattr(pipeline, "open_data", loading)
  workdir = str(tmp_path / "w")
  with pytest.raises(pipeline.Preempted, match="SIGTERM while loading the data"):
    pipeline.run(cfg, workdir)
  assert not os.path.exists(workdir)
  assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back


# --- class 10: missing pieces of a finished run --------------------------------------------------


def test_finished_run_with_a_middle_checkpoint_deleted_still_writes_its_summary(cfg, finished,
                                                                                 tmp_path):
  workdir = copy(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "1"))
  os.remove(os.path.join(workdir, "summary.json"))
  summary = run(cfg, workdir)
  assert len(summary["iterations"]) == 3
  assert "checkpoint(s) 1 of" in summary["figures_skipped"]
  assert os.path.exists(os.path.join(workdir, "summary.json"))


def test_init_checkpoint_of_a_missing_iteration_names_what_exists(cfg, finished, tmp_path):
  with pytest.raises(UserError) as e:
    pipeline.run(cfg.replace(init_checkpoint=f"{finished}:7"), str(tmp_path / "w"))
  assert str(e.value) == (f"--init_checkpoint={finished}:7: no checkpoint of iteration 7 in "
                          f"{finished}/checkpoints; it has 0, 1, 2")
  assert not os.path.exists(tmp_path / "w")


# --- class 5: the file system --------------------------------------------------------------------


def test_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "summary.json")
  files.atomic_write_text(path, "old")

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(files.os, "fsync", full)
  with pytest.raises(UserError) as e:
    files.atomic_write_json(path, {"new": 1})
  assert str(e.value) == f"cannot write {path}: No space left on device"
  with open(path) as f:
    assert f.read() == "old"
  assert os.listdir(tmp_path) == ["summary.json"]


def test_disk_full_during_a_run_is_one_error_and_keeps_the_last_checkpoint(cfg, finished,
                                                                           tmp_path, monkeypatch):
  workdir = copy(finished, tmp_path)
  checkpoints_before = snapshot(os.path.join(workdir, "checkpoints"))
  real = files.atomic_open

  def full(path, *args, **kwargs):
    if path.endswith("summary.json"):
      raise UserError(f"cannot write {path}: No space left on device")
    return real(path, *args, **kwargs)

  monkeypatch.setattr(files, "atomic_open", full)
  with pytest.raises(UserError, match="cannot write .*summary.json: No space left on device"):
    run(cfg, workdir)
  assert snapshot(os.path.join(workdir, "checkpoints")) == checkpoints_before


def test_checkpoint_save_failure_is_one_error(cfg, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(UserError) as e:
    run(cfg.replace(iterations=0), str(tmp_path / "w"))
  assert str(e.value).startswith(f"cannot write checkpoint {tmp_path}/w/")
  assert "No space left on device; the last complete checkpoint is kept" in str(e.value)


@pytest.mark.parametrize("case", ["empty", "dangling symlink", "progress is a file",
                                  "summary.json is a folder", "read-only"])
def test_workdir_problems_are_one_error_before_data_is_read(case, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  if case == "empty":
    workdir, want = "", "--workdir is empty: give the run's directory"
  elif case == "dangling symlink":
    os.symlink(str(tmp_path / "gone"), workdir)
    want = f"--workdir={workdir} is a dangling symbolic link (to {tmp_path}/gone)"
  elif case == "progress is a file":
    os.makedirs(workdir)
    open(os.path.join(workdir, "progress"), "w").close()
    want = f"--workdir={workdir}: {workdir}/progress is not a directory; move it away"
  elif case == "summary.json is a folder":
    os.makedirs(os.path.join(workdir, "summary.json"))
    want = f"--workdir={workdir}: {workdir}/summary.json is a directory; move it away"
  else:
    os.makedirs(workdir)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == workdir else real(p, mode))
    want = (f"--workdir={workdir}: {workdir} is not writable (permission denied or a read-only "
            "file system)")
  before = snapshot(str(tmp_path))
  cfg = pipeline.Config(data_dir=str(tmp_path / "no_data_here"), batch_size=80)
  with pytest.raises(UserError) as e:
    pipeline.run(cfg, workdir)
  assert str(e.value) == want
  assert snapshot(str(tmp_path)) == before


def test_non_utf8_metrics_file_is_one_error_naming_it(cfg, mid_dense, tmp_path):
  workdir = copy(mid_dense, tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "wb") as f:
    f.write(b'{"iteration": 0}\n\xff\xfe\n')
  before = snapshot(workdir)
  with pytest.raises(UserError) as e:
    run(cfg, workdir)
  assert str(e.value) == f"cannot read metrics file {path}: not UTF-8 text (byte 17)"
  assert snapshot(workdir) == before


# --- class 8: model shape settings ---------------------------------------------------------------


@pytest.mark.parametrize("widths", [(300, 100, 50), (300,)])
def test_widths_of_the_wrong_length_are_refused_before_data(widths, tmp_path):
  cfg = pipeline.Config(widths=widths, data_dir=str(tmp_path / "no_data_here"), batch_size=80)
  with pytest.raises(UserError) as e:
    pipeline.run(cfg, str(tmp_path / "w"))
  assert str(e.value) == (f"--widths has {len(widths)} values; lenet_300_100 takes 2 (its own: "
                          "300,100)")


def test_tools_work_on_a_run_with_other_widths(cfg, small_mnist_dir, tmp_path):
  import subprocess
  import sys
  narrow = cfg.replace(widths=(40, 20), iterations=1)
  workdir = str(tmp_path / "narrow")
  summary = run(narrow, workdir)
  assert summary["small_model"]["widths"]["fc1"] <= 40
  # Resuming it needs its widths: other ones are refused naming the difference.
  with pytest.raises(UserError, match=r"first difference: \['fc1'\]\['bias'\]: \[40\] there, "
                     r"\[300\] here; other --widths\?"):
    run(cfg.replace(iterations=1), workdir)
  # init from it.
  again = run(narrow.replace(init_checkpoint=f"{workdir}:1", dense_epochs=0, iterations=0),
              str(tmp_path / "init"))
  assert again["final"]["params_nonzero"] == summary["final"]["params_nonzero"]
  # A sensitivity sweep of it (the command line: its flags clash with the pipeline's here).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LWC_FAULT", None)
  proc = subprocess.run(
      [sys.executable, "-m", "lwc.experiments.sensitivity", f"--workdir={workdir}",
       "--iteration=1", "--points=2", f"--data_dir={small_mnist_dir}",
       f"--out={tmp_path / 'sens'}"], cwd=conftest.REPO_ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(tmp_path / "sens" / "sensitivity.csv")
  # Exported (with the prediction check on the data): the run's own widths, not the defaults.
  proc = subprocess.run(
      [sys.executable, "-m", "lwc.export", f"--workdir={workdir}",
       f"--out={tmp_path / 'narrow.npz'}", f"--data_dir={small_mnist_dir}"],
      cwd=conftest.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "narrow.json") as f:
    report = json.load(f)
  assert report["round_trip"]["params_bit_identical"]
  predictions = report["predictions"]
  assert predictions["equal_predictions"] == predictions["examples"] > 0
