"""A catalogue of malformed inputs, each run through the real command line.

Every case must give exactly one error line (`error: ...`, flags of the wrong type or out of
bounds included), exit status 2 (3 for a NaN stop), no traceback, and leave the disk as it was:
every file and folder of the workdir, the data folder and the other inputs keeps its content and
mtime, and a workdir that did not exist still does not. Cases the tools do not handle yet are
strict xfails naming what happens now.

The cases run as subprocesses, a few at a time, once per test session from one module fixture (a
JAX import costs about two seconds each; xdist workers share the outcomes through a file); the
parametrized test then checks each one's outcome.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable

import filelock
import numpy as np
import pytest

from lwc import checkpoints as ckpt_lib
from lwc import export as export_lib
from lwc import lock as lock_lib
from lwc import sparse
from lwc.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = int(os.environ.get("LWC_TEST_WORKERS", "3"))
MODULES = {"lenet": "lwc.experiments.lenet", "export": "lwc.export",
           "sensitivity": "lwc.experiments.sensitivity", "bench": "benchmarks.sparse_inference"}
# Flags every case of a tool starts with (a case's own flags come after and win). They keep a run
# that unexpectedly succeeds short.
BASE_ARGS = {
    "lenet": ("--workdir={w}", "--data_dir={d}", "--dense_epochs=0", "--retrain_epochs=0",
              "--iterations=0", "--tensorboard=false", "--remove_dead_neurons=false"),
    "export": ("--workdir={w}", "--out={root}/out.npz"),
    "sensitivity": ("--workdir={w}", "--points=2"),
    "bench": ("--alexnet=false", "--alexnet_sizes=false", "--torch=false", "--repeats=1"),
}
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
CORRUPT = ("is corrupt: its files differ from the checksums saved with it; move it away to resume "
           "from an earlier one")


@dataclasses.dataclass
class Paths:
  root: str  # the case's own folder: everything below it is snapshotted
  w: str  # the workdir
  d: str  # the data folder

  def fmt(self, text: str, extra: dict) -> str:
    return text.format(root=self.root, w=self.w, d=self.d, **extra)


@dataclasses.dataclass(frozen=True)
class Case:
  tool: str
  args: tuple[str, ...]
  error: str  # the expected error line; {root}, {w}, {d} and prepare's keys are filled in
  # The workdir: None = does not exist; 'nested' = does not exist, nor its parent; 'dense' = a copy
  # of a LeNet-300-100 run's workdir (checkpoint 0); 'reshaped' = checkpoint of other shapes;
  # 'empty' = an empty folder; 'no_checkpoints' = an empty checkpoints/; 'file' = a plain file.
  workdir: str | None = None
  # Mutates a private copy of the MNIST subset (None: the shared subset, read only).
  data: Callable[[str], None] | None = None
  # prepare(paths, exit_stack) -> extra placeholders; runs after the workdir and data are set up.
  prepare: Callable[[Paths, contextlib.ExitStack], dict] | None = None
  env: tuple[tuple[str, str], ...] = ()
  xfail: str | None = None
  strict: bool = True  # False only where what goes wrong is a race (see its reason)


# --- input mutators ------------------------------------------------------------------------------


def _rewrite(path: str, change: Callable[[bytes], bytes]) -> None:
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(change(raw))


def _idx(name: str, change: Callable[[bytes], bytes]) -> Callable[[str], None]:
  return lambda d: _rewrite(os.path.join(d, name), change)


def _data_dir_is_a_file(d: str) -> None:
  shutil.rmtree(d)
  with open(d, "w") as f:
    f.write("not a folder\n")


def _not_gzip(d: str) -> None:
  os.remove(os.path.join(d, LABELS))
  with open(os.path.join(d, LABELS + ".gz"), "wb") as f:
    f.write(b"not gzip at all")


def _label_12(raw: bytes) -> bytes:
  raw = bytearray(raw)
  raw[8 + 17] = 12
  return bytes(raw)


def _flagfile(text: str) -> Callable[[Paths, contextlib.ExitStack], dict]:
  def prepare(p, stack):
    with open(os.path.join(p.root, "run.flags"), "w") as f:
      f.write(text)
    return {}
  return prepare


def _largest_array_file(w: str) -> str:
  return max(glob.glob(os.path.join(w, "checkpoints", "0", "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _checkpoint_file(change: Callable[[bytes], bytes], which: Callable[[str], str]):
  def prepare(p, stack):
    _rewrite(which(p.w), change)
    return {}
  return prepare


def _meta_file(w: str) -> str:
  return os.path.join(w, "checkpoints", "0", "meta", "metadata")


def _flip_middle(raw: bytes) -> bytes:
  raw, mid = bytearray(raw), len(raw) // 2
  for i in range(mid, mid + 4096):
    raw[i] ^= 0xFF
  return bytes(raw)


def _binary_flagfile(p, stack):
  with open(os.path.join(p.root, "run.flags"), "wb") as f:
    f.write(b"--dense_epochs=0\n--quality=0.5\xff\n")
  return {}


def _dangling_workdir(p, stack):
  os.symlink(os.path.join(p.root, "gone"), p.w)
  return {}


def _progress_is_a_file(p, stack):
  if os.path.isdir(os.path.join(p.w, "progress")):
    os.rmdir(os.path.join(p.w, "progress"))
  with open(os.path.join(p.w, "progress"), "w") as f:
    f.write("not a folder\n")
  return {}


def _flip_one_meta_bit(p, stack):
  path = _meta_file(p.w)
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  i = raw.index(b'"test_error"')
  i = raw.index(b"0.", i) + 3  # a digit of the dense test error
  raw[i] ^= 0x01
  with open(path, "wb") as f:
    f.write(bytes(raw))
  return {}


def _empty_idx(magic: int, dims: tuple[int, ...]) -> Callable[[bytes], bytes]:
  return lambda raw: struct.pack(">I" + "I" * (1 + len(dims)), magic, 0, *dims)


def _empty_test_split(d: str) -> None:
  _rewrite(os.path.join(d, TEST_IMAGES), _empty_idx(0x803, (28, 28)))
  _rewrite(os.path.join(d, TEST_LABELS), _empty_idx(0x801, ()))


def _hold_lock(p, stack):
  stack.enter_context(lock_lib.WorkdirLock(p.w))
  return {"pid": os.getpid()}


def _mkdir(name: str):
  def prepare(p, stack):
    os.mkdir(os.path.join(p.root, name))
    return {}
  return prepare


def _leftover_tmp_checkpoint(p, stack):
  """What a run killed while saving iteration 1 leaves behind."""
  tmp = os.path.join(p.w, "checkpoints", "1.orbax-checkpoint-tmp-1")
  os.makedirs(os.path.join(tmp, "state"))
  with open(os.path.join(tmp, "state", "_METADATA"), "w") as f:
    f.write("{}")
  return {}


def _not_an_export(p, stack):
  np.savez(os.path.join(p.root, "x.npz"), x=np.zeros(3, np.float32))
  return {}


# --- the catalogue -------------------------------------------------------------------------------

FATAL = "error: "  # absl flag errors follow the one convention too
CASES: dict[str, Case] = {
    # Flag values.
    "lenet learning_rate not a number": Case(
        "lenet", ("--learning_rate=abc",),
        FATAL + "flag --learning_rate=abc: could not convert string to float: 'abc'"),
    "lenet dropout 1.5": Case(
        "lenet", ("--dropout=1.5",), "error: dropout must be in [0, 1), got 1.5"),
    "lenet qualities count mismatch": Case(
        "lenet", ("--iterations=3", "--quality=0.5,0.6"),
        "error: qualities has 2 values; give 1 or iterations=3"),
    "lenet unknown prune group": Case(
        "lenet", ("--prune_groups=bogus",),
        "error: prune group must be all, fc or conv, got 'bogus'"),
    "lenet prune group the model lacks": Case(
        "lenet", ("--iterations=1", "--prune_groups=conv"),
        "error: iteration 1 prunes group 'conv' but lenet_300_100 has no such layer"),
    "lenet unknown optimizer": Case(
        "lenet", ("--optimizer=rmsprop",),
        FATAL + "flag --optimizer=rmsprop: value should be one of <sgd|adam>"),
    "lenet retrain step schedule without decay steps": Case(
        "lenet", ("--iterations=1", "--retrain_lr_schedule=step"),
        "error: retrain_lr_schedule=step needs lr_decay_steps > 0"),
    "lenet negative checkpoint_every_steps": Case(
        "lenet", ("--checkpoint_every_steps=-5",),
        FATAL + "flag --checkpoint_every_steps=-5: -5 is not a non-negative integer"),
    "lenet batch not divisible by the devices": Case(
        "lenet", ("--batch_size=100",),
        "error: batch_size 100 is not divisible by the 8 devices it is split over",
        env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),)),
    "lenet batch larger than the training set": Case(
        "lenet", ("--batch_size=5000",),
        "error: batch_size 5000 exceeds the 1800 training examples"),  # 200 are validation
    "lenet dropout on an unknown layer, workdir in a new folder": Case(
        "lenet", ("--dropout=0.5", "--dropout_layers=fc9"),
        "error: dropout on unknown layer(s) fc9; layers are fc1, fc2, fc3", workdir="nested"),
    # Numbers that pass the flag parser (issue 14, class 6): checked before any data is read.
    "lenet learning_rate inf": Case(
        "lenet", ("--learning_rate=inf",), "error: learning_rate must be a finite number, got inf"),
    "lenet momentum nan": Case(
        "lenet", ("--momentum=nan",), "error: momentum must be a finite number, got nan"),
    "lenet momentum 1": Case(
        "lenet", ("--momentum=1",), "error: momentum must be in [0, 1), got 1"),
    "lenet target_compression nan": Case(
        "lenet", ("--target_compression=nan",),
        "error: target_compression must be a finite number, got nan"),
    "lenet target_compression inf": Case(
        "lenet", ("--target_compression=inf",),
        "error: target_compression must be a finite number, got inf"),
    "lenet seed too large for the RNG": Case(
        "lenet", ("--seed=99999999999",), "error: seed must be <= 4294967295, got 99999999999"),
    "lenet negative seed": Case(
        "lenet", ("--seed=-1",), "error: flag --seed=-1: -1 is not a non-negative integer"),
    "lenet lr_decay_factor nan": Case(
        "lenet", ("--lr_decay_factor=nan",),
        "error: lr_decay_factor must be a finite number, got nan"),
    "lenet reg_strength inf": Case(
        "lenet", ("--reg_strength=inf",), "error: reg_strength must be a finite number, got inf"),
    "lenet log_every_seconds nan": Case(
        "lenet", ("--log_every_seconds=nan",),
        "error: log_every_seconds must be a finite number, got nan"),
    # Flag bounds (class 7): the same convention as every other error.
    "lenet batch_size 0": Case(
        "lenet", ("--batch_size=0",), "error: flag --batch_size=0: 0 is not a positive integer"),
    "lenet flagfile not UTF-8": Case(
        "lenet", ("--flagfile={root}/run.flags",),
        "error: cannot read flagfile {root}/run.flags: not UTF-8 text (byte 30)",
        prepare=_binary_flagfile),
    # Model shapes (class 8), before any data is read.
    "lenet too many widths": Case(
        "lenet", ("--widths=300,100,50",),
        "error: --widths has 3 values; lenet_300_100 takes 2 (its own: 300,100)"),
    "lenet too few widths": Case(
        "lenet", ("--widths=300",),
        "error: --widths has 1 values; lenet_300_100 takes 2 (its own: 300,100)"),
    # The file system (class 5).
    "lenet empty workdir": Case(
        "lenet", ("--workdir=",), "error: --workdir is empty: give the run's directory"),
    "lenet workdir is a dangling symlink": Case(
        "lenet", (), "error: --workdir={w} is a dangling symbolic link (to {root}/gone)",
        prepare=_dangling_workdir),
    "lenet progress is a file": Case(
        "lenet", (), "error: --workdir={w}: {w}/progress is not a directory; move it away",
        workdir="dense", prepare=_progress_is_a_file),
    # Edges of data (class 9).
    "data: empty test split": Case(
        "lenet", (), "error: mnist ({d}/t10k-images-idx3-ubyte[.gz]): no examples",
        data=_empty_test_split),
    # Resuming with other settings (class 2).
    "lenet resume with other batch size and seed": Case(
        "lenet", ("--batch_size=50", "--seed=3", "--dense_epochs=1"),
        "error: {w} holds a run with other settings, which cannot change when resuming after "
        "iteration 0: --batch_size=100 (now 50), --seed=0 (now 3); rerun with the old values or "
        "use another --workdir", workdir="dense"),
    "lenet resume with another optimiser": Case(
        "lenet", ("--optimizer=adam", "--dense_epochs=1", "--iterations=1"),
        "error: {w} holds a run with other settings, which cannot change when resuming after "
        "iteration 0: --optimizer=sgd (now adam); rerun with the old values or use another "
        "--workdir", workdir="dense"),
    # Missing pieces (class 10).
    "lenet init_checkpoint of a missing iteration": Case(
        "lenet", ("--workdir={root}/fresh", "--init_checkpoint={w}:7"),
        "error: --init_checkpoint={w}:7: no checkpoint of iteration 7 in {w}/checkpoints; it "
        "has 0", workdir="dense"),
    "lenet workdir is a file": Case(
        "lenet", (), "error: --workdir={w} is not a directory", workdir="file"),
    # Flag files.
    "lenet flagfile does not exist": Case(
        "lenet", ("--flagfile={root}/nope.flags",),
        FATAL + "Unable to open flagfile: [Errno 2] No such file or directory: "
        "'{root}/nope.flags'"),
    "lenet flagfile with an unknown flag": Case(
        "lenet", ("--flagfile={root}/run.flags",), FATAL + "Unknown command line flag 'bogus_flag'",
        prepare=_flagfile("--dense_epochs=0\n--bogus_flag=3\n")),
    "lenet flagfile line without --": Case(
        "lenet", ("--flagfile={root}/run.flags",), "error: unexpected arguments: iterations=0",
        prepare=_flagfile("--dense_epochs=0\niterations=0\n")),
    # Data files.
    "data_dir is a file": Case(
        "lenet", (), "error: --data_dir={d}: no such directory", data=_data_dir_is_a_file),
    "data: training images missing": Case(
        "lenet", (), "error: {d}/" + IMAGES + "[.gz]: missing (MNIST IDX file expected in "
        "--data_dir={d})", data=lambda d: os.remove(os.path.join(d, IMAGES))),
    "data: truncated images": Case(
        "lenet", (), "error: {d}/" + IMAGES + ": truncated: 1567016 bytes, expected 1568016 for "
        "2000 items", data=_idx(IMAGES, lambda raw: raw[:-1000])),
    "data: wrong magic number": Case(
        "lenet", (), "error: {d}/" + TEST_IMAGES + ": magic number 0x00000801, expected 0x00000803 "
        "(IDX uint8 with 3 dimensions)",
        data=_idx(TEST_IMAGES, lambda raw: struct.pack(">I", 0x801) + raw[4:])),
    "data: label count differs from image count": Case(
        "lenet", (), "error: {d}/" + IMAGES + " / {d}/" + LABELS + ": 2000 images but 1999 labels",
        data=_idx(LABELS, lambda raw: struct.pack(">II", 0x801, 1999) + raw[8:-1])),
    "data: label 12": Case(
        "lenet", (), "error: {d}/" + TEST_IMAGES + " / {d}/" + TEST_LABELS + ": label 12 out of "
        "range 0-9", data=_idx(TEST_LABELS, _label_12)),
    "data: .gz that is not gzip": Case(
        "lenet", (), "error: {d}/" + LABELS + ".gz: cannot read (Not a gzipped file (b'no'))",
        data=_not_gzip),
    # Checkpoints.
    "lenet workdir of another model": Case(
        "lenet", ("--model=lenet5",), "error: workdir holds checkpoints of model 'lenet_300_100', "
        "this run is 'lenet5': use another --workdir ({w}/checkpoints)", workdir="dense"),
    "lenet workdir locked by a live process": Case(
        "lenet", (), "error: workdir {w} is in use by another run; wait for it to end or use "
        "another --workdir", workdir="dense", prepare=_hold_lock),
    "lenet flipped bytes in a checkpoint array file": Case(
        "lenet", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_checkpoint_file(_flip_middle, _largest_array_file)),
    "export checkpoint of other shapes": Case(
        "export", (), "error: workdir holds checkpoints of 'lenet_300_100' with other parameter "
        "shapes (first difference: ['fc1']['bias']: [200] there, [300] here; other --widths?): "
        "use another --workdir or the run's own settings ({w}/checkpoints)",
        workdir="reshaped"),
    "export corrupt meta JSON": Case(
        "export", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_checkpoint_file(lambda raw: raw[:50], _meta_file)),
    "export truncated checkpoint array file": Case(
        "export", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_checkpoint_file(lambda raw: raw[:len(raw) // 2], _largest_array_file)),
    "export flipped bytes in a checkpoint array file": Case(
        "export", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_checkpoint_file(_flip_middle, _largest_array_file)),
    "lenet one flipped bit in a checkpoint's meta": Case(
        "lenet", ("--dense_epochs=1",), "error: checkpoint {w}/checkpoints/0 " + CORRUPT,
        workdir="dense", prepare=_flip_one_meta_bit),
    "export one flipped bit in a checkpoint's meta": Case(
        "export", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_flip_one_meta_bit),
    "sensitivity corrupt state metadata": Case(
        "sensitivity", (), "error: checkpoint {w}/checkpoints/0 " + CORRUPT, workdir="dense",
        prepare=_checkpoint_file(lambda raw: b"{garbage",
                                 lambda w: os.path.join(w, "checkpoints/0/state/_METADATA"))),
    # Export.
    "export workdir without checkpoints": Case(
        "export", (), "error: --workdir={w}: no checkpoints/ folder (not a pipeline workdir)",
        workdir="empty"),
    "export empty checkpoints folder": Case(
        "export", (), "error: --workdir={w}: no complete checkpoint", workdir="no_checkpoints"),
    "export workdir does not exist": Case(
        "export", (), "error: --workdir={w}: no checkpoints/ folder (not a pipeline workdir)"),
    "export iteration that does not exist": Case(
        "export", ("--iteration=7",), "error: --iteration=7: {w} has iterations 0",
        workdir="dense"),
    "export iteration that does not exist, leftover temporary checkpoint": Case(
        "export", ("--iteration=7",), "error: --iteration=7: {w} has iterations 0",
        workdir="dense", prepare=_leftover_tmp_checkpoint),
    "export out in a missing folder": Case(
        "export", ("--out={root}/nodir/e.npz",),
        "error: --out={root}/nodir/e.npz: folder {root}/nodir does not exist", workdir="dense"),
    "export out is a folder": Case(
        "export", ("--out={root}/outdir",), "error: --out={root}/outdir is a directory",
        workdir="dense", prepare=_mkdir("outdir")),
    "export out inside the workdir's checkpoints": Case(
        "export", ("--out={w}/checkpoints/0/meta/metadata",),
        "error: --out={w}/checkpoints/0/meta/metadata is inside the workdir's checkpoints "
        "({w}/checkpoints)", workdir="dense"),
    "export json_out in a missing folder": Case(
        "export", ("--json_out={root}/nodir/r.json",),
        "error: --json_out={root}/nodir/r.json: folder {root}/nodir does not exist",
        workdir="dense"),
    "export data_dir with a bad label": Case(
        "export", ("--data_dir={d}",), "error: {d}/" + TEST_IMAGES + " / {d}/" + TEST_LABELS +
        ": label 12 out of range 0-9", workdir="dense", data=_idx(TEST_LABELS, _label_12)),
    "export sweep_index_bits not integers": Case(
        "export", ("--sweep_index_bits=a,b",),
        "error: --sweep_index_bits: a,b is not a list of integers", workdir="dense"),
    "export fc_index_bits 0": Case(
        "export", ("--fc_index_bits=0",),
        FATAL + "flag --fc_index_bits=0: 0 is not an integer in the range [1, 16]",
        workdir="dense"),
    "export unknown value_dtype": Case(
        "export", ("--value_dtype=int8",),
        FATAL + "flag --value_dtype=int8: value should be one of <float32|float16>",
        workdir="dense"),
    "bench loads an npz that is not an export": Case(
        "bench", ("--lenet_300_100={root}/x.npz",),
        "error: {root}/x.npz: missing format_version or manifest: not an lwc sparse export",
        prepare=_not_an_export),
    # Sensitivity.
    "sensitivity workdir without checkpoints": Case(
        "sensitivity", (), "error: {w}: no checkpoints/ folder (not a workdir of a run)",
        workdir="empty"),
    "sensitivity empty checkpoints folder": Case(
        "sensitivity", (), "error: no checkpoint in {w}/checkpoints", workdir="no_checkpoints"),
    "sensitivity iteration that does not exist": Case(
        "sensitivity", ("--iteration=3",),
        "error: no checkpoint of iteration 3 in {w}/checkpoints; it has 0", workdir="dense"),
    "sensitivity points 1": Case(
        "sensitivity", ("--points=1",), "error: points must be >= 2, got 1", workdir="dense"),
    "sensitivity max_fraction 1.5": Case(
        "sensitivity", ("--max_fraction=1.5",), "error: max_fraction must be in (0, 1], got 1.5",
        workdir="dense"),
    "sensitivity unknown layer": Case(
        "sensitivity", ("--layers=fc9",),
        "error: unknown layer(s) fc9; prunable layers are fc1, fc2, fc3", workdir="dense"),
    "sensitivity out is a file": Case(
        "sensitivity", ("--out={w}/summary.json",),
        "error: --out={w}/summary.json is not a directory", workdir="dense"),
}


# --- running -------------------------------------------------------------------------------------


def snapshot(folder: str, include_self: bool = True) -> dict:
  """{relative path: (kind, sha256 or None, mtime_ns)} of every file and folder below `folder`."""
  out = {}
  if include_self and os.path.exists(folder):
    st = os.lstat(folder)
    out["."] = ("dir" if os.path.isdir(folder) else "file", None, st.st_mtime_ns)
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = ("dir", None, os.lstat(path).st_mtime_ns)
    for name in files:
      path = os.path.join(root, name)
      if os.path.islink(path):
        out[os.path.relpath(path, folder)] = ("link", os.readlink(path), None)
        continue
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, folder)] = ("file", digest, os.lstat(path).st_mtime_ns)
  return out


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines()
          if line.startswith(("error:", "FATAL Flags parsing error:"))]


def cli_env(extra=()) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LWC_FAULT", None)
  env.pop("XLA_FLAGS", None)
  env.update(dict(extra))
  return env


@dataclasses.dataclass
class Outcome:
  expected: str
  command: list[str]
  returncode: int = 0
  stderr: str = ""
  before: dict = dataclasses.field(default_factory=dict)
  after: dict = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def dense_workdir(small_mnist_dir, tmp_path_factory):
  """A LeNet-300-100 workdir with checkpoint 0 after one epoch (batch 100), made by the CLI."""
  workdir = str(tmp_path_factory.mktemp("dense") / "w")
  proc = subprocess.run(
      [sys.executable, "-m", MODULES["lenet"], f"--workdir={workdir}",
       f"--data_dir={small_mnist_dir}", "--dense_epochs=1", "--iterations=0", "--batch_size=100",
       "--tensorboard=false", "--remove_dead_neurons=false"],
      cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def reshaped_workdir(tmp_path_factory):
  """A workdir whose checkpoint says lenet_300_100 but holds other parameter shapes."""
  workdir = str(tmp_path_factory.mktemp("reshaped") / "w")
  params = {"fc1": {"kernel": np.zeros((784, 200), np.float32), "bias": np.zeros(200, np.float32)}}
  checkpoints = ckpt_lib.Checkpoints(workdir)
  checkpoints.save(0, {"params": params, "rng": np.zeros(2, np.uint32)},
                   {"model": "lenet_300_100", "param_shapes": ckpt_lib.param_shapes(params),
                    "config": {}, "history": []})
  checkpoints.close()
  return workdir


def _setup(case: Case, root: str, small_mnist_dir: str, sources: dict,
           stack: contextlib.ExitStack) -> tuple[Paths, dict]:
  w = os.path.join(root, "new", "sub", "w") if case.workdir == "nested" else os.path.join(root, "w")
  if case.workdir in ("dense", "reshaped"):
    shutil.copytree(sources[case.workdir], w)
  elif case.workdir == "empty":
    os.mkdir(w)
  elif case.workdir == "no_checkpoints":
    os.makedirs(os.path.join(w, "checkpoints"))
  elif case.workdir == "file":
    with open(w, "w") as f:
      f.write("not a workdir\n")
  d = small_mnist_dir
  if case.data is not None:
    d = os.path.join(root, "data")
    shutil.copytree(small_mnist_dir, d)
    case.data(d)
  paths = Paths(root=root, w=w, d=d)
  extra = case.prepare(paths, stack) if case.prepare else {}
  return paths, extra


@pytest.fixture(scope="module")
def outcomes(request, small_mnist_dir, tmp_path_factory, worker_id):
  """{case: Outcome} of every selected case, run once per test session.

  Every xdist worker collects every case, and a worker may set this module fixture up more than
  once (when its items of this module are not contiguous). So the first setup of the session
  runs the cases and writes their outcomes to a JSON file in the session's shared temp folder,
  under a file lock; every other setup, on any worker, waits for the lock and reads the file.
  """
  selected = sorted(item.callspec.params["case"] for item in request.session.items
                    if getattr(item, "originalname", None) == "test_bad_input"
                    and item.module is request.module)
  shared = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    shared = shared.parent  # the folder of the whole session, above every worker's own
  path = shared / "bad_input_outcomes.json"
  with filelock.FileLock(str(path) + ".lock"):
    if path.exists():
      with open(path) as f:
        stored = json.load(f)
      if stored["selected"] == selected:
        return {name: Outcome(**fields) for name, fields in stored["outcomes"].items()}
    results = _run_cases(request, selected, small_mnist_dir, tmp_path_factory)
    # Through JSON, so every worker compares what was stored, tuples read back as lists.
    stored = json.loads(json.dumps({"selected": selected, "outcomes": {
        name: dataclasses.asdict(outcome) for name, outcome in results.items()}}))
    with open(str(path) + ".tmp", "w") as f:
      json.dump(stored, f)
    os.replace(str(path) + ".tmp", path)
  return {name: Outcome(**fields) for name, fields in stored["outcomes"].items()}


def _run_cases(request, selected, small_mnist_dir, tmp_path_factory) -> dict[str, Outcome]:
  """Runs the `selected` cases (WORKERS at a time) and records each one's exit, stderr and
  snapshots of its folders before and after."""
  sources = {}
  if any(CASES[c].workdir == "dense" for c in selected):
    sources["dense"] = request.getfixturevalue("dense_workdir")
  if any(CASES[c].workdir == "reshaped" for c in selected):
    sources["reshaped"] = request.getfixturevalue("reshaped_workdir")
  results: dict[str, Outcome] = {}
  with contextlib.ExitStack() as stack:
    roots = {}
    for name in selected:
      case = CASES[name]
      root = str(tmp_path_factory.mktemp("case"))
      paths, extra = _setup(case, root, small_mnist_dir, sources, stack)
      command = [sys.executable, "-m", MODULES[case.tool],
                 *(paths.fmt(a, extra) for a in BASE_ARGS[case.tool] + case.args)]
      results[name] = Outcome(expected=paths.fmt(case.error, extra), command=command)
      roots[name] = root
      results[name].before = {"root": snapshot(root, include_self=False),
                              "data": snapshot(small_mnist_dir)}

    def run(name):
      proc = subprocess.run(results[name].command, cwd=REPO_ROOT, env=cli_env(CASES[name].env),
                            capture_output=True, text=True, timeout=300, check=False)
      results[name].returncode, results[name].stderr = proc.returncode, proc.stderr

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
      list(pool.map(run, selected))
    for name in selected:
      results[name].after = {"root": snapshot(roots[name], include_self=False),
                             "data": snapshot(small_mnist_dir)}
  return results


def _param(name: str):
  case = CASES[name]
  marks = [pytest.mark.xfail(strict=case.strict, reason=case.xfail)] if case.xfail else []
  return pytest.param(name, marks=marks, id=name.replace(" ", "_"))


@pytest.mark.parametrize("case", [_param(name) for name in CASES])
def test_bad_input(case, outcomes):
  outcome = outcomes[case]
  detail = f"{' '.join(outcome.command)}\n{outcome.stderr[-3000:]}"
  assert error_lines(outcome.stderr) == [outcome.expected], detail
  assert outcome.returncode == 2, detail
  assert "Traceback" not in outcome.stderr, detail
  assert outcome.after == outcome.before


# --- corrupt export files, through lwc.sparse.load (the reader of every export consumer) ---------


@pytest.fixture(scope="module")
def export_bytes(dense_workdir, tmp_path_factory) -> bytes:
  restored = export_lib.restore(dense_workdir)
  path = str(tmp_path_factory.mktemp("export") / "good.npz")
  sparse.save(sparse.encode_model(restored.params, restored.masks,
                                  info={"model": restored.model}), path)
  sparse.load(path)  # the untouched file loads
  with open(path, "rb") as f:
    return f.read()


def _with_member(good: bytes, name: str, data: bytes | None) -> bytes:
  """The export's bytes with member `name` replaced by `data` (None: left out)."""
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
    for info in src.infolist():
      if info.filename != name:
        dst.writestr(info.filename, src.read(info.filename))
      elif data is not None:
        dst.writestr(info.filename, data)
  return out.getvalue()


def _npy_of(value) -> bytes:
  buf = io.BytesIO()
  np.save(buf, value)
  return buf.getvalue()


EXPORT_FILES = {
    "empty file": (lambda good: b"",
                   "{p}: not a readable .npz export (EOFError: No data left in file)", None),
    "a .npy array": (lambda good: _npy_of(np.zeros(3, np.float32)),
                     "{p}: a single .npy array, not a .npz export", None),
    "truncated": (lambda good: good[:len(good) // 2],
                  "{p}: not a readable .npz export (BadZipFile: File is not a zip file)", None),
    "flipped bytes in a member": (
        lambda good: _flip_middle(good),
        "{p}: corrupt .npz export (BadZipFile: Bad CRC-32 for file 'fc1/kernel.values.npy')",
        None),
    "neither zip nor npy": (
        lambda good: b"hello world" * 10,
        "{p}: not a readable .npz export (neither a zip archive nor a .npy array)", None),
    "format version 3": (
        lambda good: _with_member(good, "format_version.npy", _npy_of(np.int64(3))),
        "{p}: format_version array(3), this reader understands 1 and 2", None),
    "manifest not JSON": (
        lambda good: _with_member(good, "manifest.npy", _npy_of(np.array("{not json"))),
        ("{p}: bad manifest (Expecting property name enclosed in double quotes: line 1 column 2 "
         "(char 1))"), None),
    "dense leaf of another shape": (
        lambda good: _with_member(good, "fc3/bias.dense.npy", _npy_of(np.zeros(9, np.float32))),
        "{p}: leaf fc3/bias: dense array float32 (9,), manifest says float32 (10,)", None),
    "member missing": (
        lambda good: _with_member(good, "fc3/bias.dense.npy", None),
        "{p}: missing keys ['fc3/bias.dense']", None),
}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=why)] if why else [],
                 id=name.replace(" ", "_"))
    for name, (_, _, why) in EXPORT_FILES.items()])
def test_corrupt_export_file(name, export_bytes, tmp_path):
  make, message, _ = EXPORT_FILES[name]
  path = str(tmp_path / "bad.npz")
  with open(path, "wb") as f:
    f.write(make(export_bytes))
  before = snapshot(str(tmp_path))
  with pytest.raises(UserError) as e:
    sparse.load(path)
  assert str(e.value) == message.format(p=path)
  assert snapshot(str(tmp_path)) == before
