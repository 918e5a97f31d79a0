"""A kill at every write of every file lwc produces, and the resumed run still bit-identical.

Every write goes through `lwc.files` (atomic replace or synced append) or orbax (checkpoints,
whose own kill points `tests/test_reliability.py` covers), and `lwc.faults.hook` sees each one
at its last moment before it becomes visible: a rewritten file complete in its temporary file
but not yet renamed, an appended line not yet written. At every such point the test copies the
workdir, which is then exactly what `kill -9` at that moment leaves (a torn half line added to
the copy for appends), lets the run go on, and afterwards resumes every copy in process. Each
resumed copy is killed again at its own first write (the metrics rewrite of a resume, among
others) and resumed once more. All of them must end bit-identical to the uninterrupted run:
summary, params, masks, optimiser state, metrics lines.
"""

import json
import os
import shutil
import signal

import conftest
import pytest

from lwc import faults
from lwc import pipeline

# 2,000 training images at batch 80: 25 steps an epoch; progress checkpoints at steps 10, 20
# (dense) and 35, 45 (retraining); figures and the small model after iteration 1. All 2,000
# images train (no validation split): nothing is decided here, and the timeline needs 25 steps.
CONFIG = dict(model="lenet_300_100", validation=0, decide_on_test=True, batch_size=80, learning_rate=0.05, dense_epochs=1,
              retrain_epochs=1, iterations=1, qualities=(0.8,), tensorboard=False,
              steps_per_call=5, checkpoint_every_steps=10, log_every_seconds=1e9)


class _Snapshots:
  """faults.hook that copies `workdir` at every write (or only at the first, `first_only`)."""

  def __init__(self, workdir, out, first_only=False):
    self.workdir, self.out, self.first_only = os.path.abspath(workdir), out, first_only
    self.taken = []  # (copy, path relative to the workdir, kind)

  def __call__(self, path, kind, data):
    path = os.path.abspath(path)
    if not path.startswith(self.workdir + os.sep) or (self.first_only and self.taken):
      return
    rel = os.path.relpath(path, self.workdir)
    copy = os.path.join(self.out, f"{len(self.taken):03d}")
    for attempt in range(3):  # orbax may be removing a superseded checkpoint meanwhile
      try:
        shutil.copytree(self.workdir, copy, symlinks=True)
        break
      except (shutil.Error, FileNotFoundError):
        shutil.rmtree(copy, ignore_errors=True)
    else:
      raise AssertionError(f"could not copy {self.workdir}")
    if kind == "append":  # the kill tore the line
      with open(os.path.join(copy, rel), "ab") as f:
        f.write(data[:len(data) // 2])
    self.taken.append((copy, rel, kind))


_run = conftest.run_pipeline


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  summary.pop("wall_seconds")
  for h in summary["iterations"] + [summary["final"]]:
    h.pop("seconds")
  summary["small_model"]["path"] = os.path.relpath(summary["small_model"]["path"], workdir)
  return summary


def _leftovers(workdir):
  return sorted(os.path.relpath(os.path.join(root, name), workdir)
                for root, dirs, names in os.walk(workdir) for name in names + dirs
                if name.endswith((".tmp", ".new", ".old")) or ".orbax-checkpoint-tmp" in name)


@pytest.fixture(scope="module")
def killed_everywhere(small_mnist_dir, tmp_path_factory):
  """(reference workdir, config, snapshots) of one uninterrupted run copied at every write."""
  cfg = pipeline.Config(data_dir=small_mnist_dir, **CONFIG)
  root = tmp_path_factory.mktemp("writes")
  reference = str(root / "reference")
  snapshots = _Snapshots(reference, str(root / "kills"))
  os.makedirs(snapshots.out)
  _run(cfg, reference, snapshots)
  return reference, cfg, snapshots.taken


def test_every_file_lwc_writes_is_a_kill_point(killed_everywhere):
  reference, _, taken = killed_everywhere
  written = {rel for _, rel, _ in taken}
  for name in ("metrics.jsonl", "summary.json", "summary.md", "small_model",
               "checkpoints/0/lwc_checksums.json", "checkpoints/1/lwc_checksums.json",
               "progress/10/lwc_checksums.json", "figures/sparsity_fc1.png",
               "figures/histogram_fc1.png"):
    assert name in written, sorted(written)
  # Every file in the finished workdir outside orbax's own folders came through a kill point.
  for root, _, names in os.walk(reference):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), reference)
      parts = rel.split(os.sep)
      orbax = parts[0] == "small_model" or (parts[0] in ("checkpoints", "progress") and
                                            name != "lwc_checksums.json")
      assert orbax or rel in written, rel
  # Nothing but complete files and folders is left behind by the uninterrupted run.
  assert _leftovers(reference) == []
  print(f"{len(taken)} kill points: {sorted(written)}")


def test_kill_at_every_write_resumes_bit_identical(killed_everywhere, tmp_path):
  reference, cfg, taken = killed_everywhere
  want = _summary(reference)
  second = []
  for copy, rel, kind in taken:
    snapshots = _Snapshots(copy, str(tmp_path / os.path.basename(copy)), first_only=True)
    os.makedirs(snapshots.out)
    _run(cfg, copy, snapshots)
    conftest.assert_same_run(copy, reference, cfg)
    assert _summary(copy) == want, (rel, kind)
    assert _leftovers(copy) == [], (rel, kind)
    second += [(c, f"{rel} then {r}") for c, r, _ in snapshots.taken]
  assert len(second) >= len(taken) - 2  # a finished run's re-run writes too (summary, figures)
  for copy, what in second:
    _run(cfg, copy)
    conftest.assert_same_run(copy, reference, cfg)
    assert _summary(copy) == want, what
    assert _leftovers(copy) == [], what
  print(f"{len(taken)} kills in the run, {len(second)} more in their resumes: all bit-identical")


def test_real_kill_during_the_metrics_rewrite_of_a_resume(small_mnist_dir, tmp_path):
  """The issue's case, with a real SIGKILL: a run killed mid-phase, its resume killed while
  rewriting metrics.jsonl, must keep every record of the finished work."""
  import subprocess
  import sys
  workdir = str(tmp_path / "w")
  flags = ["--validation=0", "--decide_on_test", "--batch_size=80", "--learning_rate=0.05",
           "--dense_epochs=1", "--retrain_epochs=2",
           "--iterations=1", "--quality=0.8", "--tensorboard=false", "--steps_per_call=5",
           "--checkpoint_every_steps=10", "--log_every_seconds=0", f"--workdir={workdir}",
           f"--data_dir={small_mnist_dir}"]

  def cli(fault):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LWC_FAULT=fault)
    return subprocess.run([sys.executable, "-m", "lwc.experiments.lenet", *flags],
                          cwd=conftest.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)

  # 25 steps an epoch: the dense record at 25, the pruning record at 25, progress checkpoints
  # at 35 and 45, the first retraining epoch's record at 50; killed at 55, before the
  # checkpoint there, the resume from 45 must drop the record at 50 by rewriting the file.
  proc = cli("step:55")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    before = f.read()
  assert [json.loads(line)["step"] for line in before.splitlines()] == [25, 25, 50]
  proc = cli("write:metrics.jsonl")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert "resuming from" in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == before  # the old file, whole: the new one never replaced it
  proc = cli("none:0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [(r["phase"], r["step"]) for r in lines] == [
      ("dense", 25), ("prune", 25), ("retrain", 50), ("retrain", 75)]


# Write sites outside lwc.files, each with the reason it may stay.
OWN_WRITERS = {
    "lwc/files.py": "the helper itself",
    "lwc/faults.py": "fault injection: the torn line of a simulated kill",
    "lwc/sparse.py": "exports: written to PATH.tmp and renamed (its own atomic write)",
    "lwc/pretrained.py": "save_npz: a conversion helper writing a new file the caller names",
}


def test_every_write_site_in_lwc_goes_through_lwc_files():
  """No `open(..., 'w')`, `savefig(path)`, `json.dump` or `np.savez` in lwc outside lwc.files
  (and the few listed above): a rewrite added later cannot silently be non-atomic."""
  import re
  pattern = re.compile(r"""open\([^)]*["'](w|wb|a|ab|x|w\+|r\+b?)["']|(?<!files)\.savefig\(|"""
                       r"""json\.dump\(|np\.savez(_compressed)?\(|\.write_(text|bytes)\(""")
  found = []
  lwc_dir = os.path.join(conftest.REPO_ROOT, "lwc")
  for root, _, names in os.walk(lwc_dir):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, conftest.REPO_ROOT)
      if rel in OWN_WRITERS:
        continue
      with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if pattern.search(line) and "files." not in line:
            found.append(f"{rel}:{number}: {line.strip()}")
  assert found == []
