"""Loading checkpoints, exports and imported weights never unpickles or evaluates code.

(a) Crafted files: a pickle whose `__reduce__` runs `os.mkdir(marker)` is put wherever a loader
reads: an object array inside an export, a checkpoint file, a pretrained `.npz` or
`.safetensors`. Each load fails with a one-line UserError and the marker never appears; each test
then unpickles its payload itself to show it was armed.

(b) Guarded normal loads: with `pickle.load/loads/Unpickler`, `builtins.eval/exec` made to raise,
`np.load` refusing `allow_pickle`, and an audit hook refusing the `pickle.find_class` and `exec`
events (which catch unpickling and code execution however the functions were imported), a real
checkpoint restores, a real export loads and decodes, and real pretrained files load.
"""

from __future__ import annotations

import _pickle
import builtins
import glob
import io
import os
import pickle
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import export as export_lib
from lwc import models, pipeline, pretrained, sparse
from lwc.errors import UserError

CONFIG = pipeline.Config(model="lenet_300_100", dense_epochs=0, iterations=0, batch_size=8,
                         tensorboard=False, remove_dead_neurons=False)


class _MakesMarker:
  """Unpickling this runs os.mkdir(path): what a malicious pickle could do."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def payload(marker: str) -> bytes:
  return pickle.dumps(_MakesMarker(marker))


def armed_object_array(marker: str) -> np.ndarray:
  array = np.empty(1, dtype=object)
  array[0] = _MakesMarker(marker)
  return array


def npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=True)
  return buf.getvalue()


def replace_member(path: str, member: str, data: bytes) -> None:
  """Rewrites the zip at `path` with `member`'s bytes replaced."""
  with zipfile.ZipFile(path) as src:
    members = {info.filename: src.read(info.filename) for info in src.infolist()}
  assert member in members
  members[member] = data
  with zipfile.ZipFile(path, "w") as dst:
    for name, raw in members.items():
      dst.writestr(name, raw)


def unpickle_file(path: str):
  with open(path, "rb") as f:
    return pickle.load(f)


def assert_armed(marker: str, unpickle) -> None:
  """The payload was live: unpickling it ourselves creates the marker."""
  assert not os.path.exists(marker)
  unpickle()
  assert os.path.isdir(marker)


@pytest.fixture(scope="module")
def workdir(small_mnist_dir, tmp_path_factory) -> str:
  """A real pipeline workdir: checkpoint 0 of LeNet-300-100 (no training)."""
  path = str(tmp_path_factory.mktemp("nopickle") / "w")
  pipeline.run(CONFIG.replace(data_dir=small_mnist_dir), path)
  return path


@pytest.fixture(scope="module")
def reference_state(workdir):
  return pipeline.restore_iteration(workdir, CONFIG)


@pytest.fixture(scope="module")
def export_path(workdir, tmp_path_factory) -> str:
  restored = export_lib.restore(workdir)
  path = str(tmp_path_factory.mktemp("nopickle_export") / "model.npz")
  sparse.save(sparse.encode_model(restored.params, restored.masks,
                                  info={"model": restored.model}), path)
  return path


# Small VGG-16 (the names and layouts do not depend on the widths), as in test_pretrained.py.
VGG_KW = {"widths": (4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32), "num_classes": 10}


@pytest.fixture(scope="module")
def vgg_template():
  model = models.get_model("vgg16", **VGG_KW)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 64, 64, 3), jnp.float32))["params"]


@pytest.fixture(scope="module")
def keras_arrays(vgg_template) -> dict[str, np.ndarray]:
  """Random VGG-16 weights under their Keras names (Keras layout = ours: no transposes)."""
  rng = np.random.default_rng(0)
  leaves = {tuple(str(k.key) for k in p): s
            for p, s in jax.tree_util.tree_leaves_with_path(vgg_template)}
  return {name: rng.standard_normal(leaves[key].shape).astype(np.float32)
          for name, key in pretrained.name_mapping("vgg16", "keras").items()}


# --- (a) crafted files ---------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["fc3/bias.dense.npy", "fc1/kernel.values.npy", "manifest.npy"])
def test_export_with_a_pickled_object_array(member, export_path, tmp_path):
  marker = str(tmp_path / "marker")
  path = str(tmp_path / "evil.npz")
  shutil.copy(export_path, path)
  replace_member(path, member, npy_bytes(armed_object_array(marker)))
  with pytest.raises(UserError) as e:
    sparse.load(path)
  message = str(e.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  assert "allow_pickle=False" in message or "not a string" in message, message
  assert not os.path.exists(marker)
  key = member[:-len(".npy")]
  assert_armed(marker, lambda: np.load(path, allow_pickle=True)[key])


def test_export_file_that_is_a_pickle(tmp_path):
  marker = str(tmp_path / "marker")
  path = str(tmp_path / "evil.npz")
  with open(path, "wb") as f:
    f.write(payload(marker))
  with pytest.raises(UserError) as e:
    sparse.load(path)
  assert str(e.value).startswith(f"{path}: not a readable .npz export")
  assert not os.path.exists(marker)
  assert_armed(marker, lambda: unpickle_file(path))


# Checkpoint files, relative to the workdir, and whether restoring reads them (a file it never
# reads may hold anything: the restore then simply succeeds with the saved arrays).
CHECKPOINT_FILES = {
    "meta JSON": ("checkpoints/0/meta/metadata", "is corrupt"),
    "state tree metadata": ("checkpoints/0/state/_METADATA", "is corrupt"),
    "OCDBT manifest": ("checkpoints/0/state/manifest.ocdbt", "is corrupt"),
    "largest array data file": ("checkpoints/0/state/ocdbt.process_0/d/*", "is corrupt"),
    "array metadata file": ("checkpoints/0/state/d/*", "is corrupt"),
    "checkpoint metadata (not read)": ("checkpoints/0/_CHECKPOINT_METADATA", None),
    # Not read by orbax, but covered by the checksums written at save time.
    "commit marker": ("checkpoints/0/state/commit_success.txt", "is corrupt"),
}


# Every file under state/ is checked against the checksums saved with the checkpoint before
# orbax reads anything, so a replaced file is refused as corrupt.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", list(CHECKPOINT_FILES))
def test_checkpoint_file_replaced_by_a_pickle(name, workdir, reference_state, tmp_path):
  pattern, problem = CHECKPOINT_FILES[name]
  marker = str(tmp_path / "marker")
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  target = max(glob.glob(os.path.join(copy, pattern)), key=os.path.getsize)
  with open(target, "wb") as f:
    f.write(payload(marker))
  if problem is None:
    state = pipeline.restore_iteration(copy, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, state["params"], reference_state["params"])
  else:
    for load in (lambda: pipeline.restore_iteration(copy, CONFIG),
                 lambda: export_lib.restore(copy)):
      with pytest.raises(UserError) as e:
        load()
      assert str(e.value).startswith(f"checkpoint {copy}/checkpoints/0 {problem}"), str(e.value)
      assert "\n" not in str(e.value)
  assert not os.path.exists(marker)
  assert_armed(marker, lambda: unpickle_file(target))


def test_pretrained_npz_with_a_pickled_object_array(keras_arrays, vgg_template, tmp_path):
  marker = str(tmp_path / "marker")
  path = str(tmp_path / "evil.npz")
  np.savez(path, **{**keras_arrays, "fc2/bias": armed_object_array(marker)})
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained(path, "vgg16", vgg_template)
  assert str(e.value) == (f"{path}: tensor 'fc2/bias' is a pickled object array; refused "
                          "(unpickling can run code)")
  assert not os.path.exists(marker)
  assert_armed(marker, lambda: np.load(path, allow_pickle=True)["fc2/bias"])


@pytest.mark.parametrize("suffix, message", [
    (".npz", "{p}: not a .npz (zip) archive"),
    (".safetensors", "{p}: not a readable .safetensors file: "),
    (".pth", "{p}: expected a .npz or .safetensors weights file"),
])
def test_pretrained_file_that_is_a_pickle(suffix, message, vgg_template, tmp_path):
  marker = str(tmp_path / "marker")
  path = str(tmp_path / ("evil" + suffix))
  with open(path, "wb") as f:
    pickle.dump({"block1_conv1/kernel": _MakesMarker(marker)}, f)
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained(path, "vgg16", vgg_template)
  assert str(e.value).startswith(message.format(p=path)), str(e.value)
  assert not os.path.exists(marker)
  assert_armed(marker, lambda: unpickle_file(path))


# --- (b) normal loads never touch pickle or eval/exec --------------------------------------------

_GUARD = {"on": False, "events": []}


def _audit(event, args):
  if _GUARD["on"] and event in ("pickle.find_class", "exec"):
    _GUARD["events"].append(event)
    raise RuntimeError(f"audit event {event} during a guarded load")


sys.addaudithook(_audit)  # permanent (audit hooks cannot be removed); inert unless _GUARD["on"]


@pytest.fixture
def no_code_loading(monkeypatch):
  """Makes every way of unpickling or evaluating code raise; fails the test if any was tried."""
  tried = []

  def forbidden(name):
    def refuse(*args, **kwargs):
      tried.append(name)
      raise AssertionError(f"{name} called during a guarded load")
    return refuse

  for module in (pickle, _pickle):
    for name in ("load", "loads", "Unpickler"):
      monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
  monkeypatch.setattr(builtins, "eval", forbidden("eval"))
  monkeypatch.setattr(builtins, "exec", forbidden("exec"))
  real_np_load = np.load

  def np_load(*args, allow_pickle=False, **kwargs):
    if allow_pickle:
      tried.append("np.load(allow_pickle=True)")
      raise AssertionError("np.load with allow_pickle during a guarded load")
    return real_np_load(*args, allow_pickle=allow_pickle, **kwargs)

  monkeypatch.setattr(np, "load", np_load)
  _GUARD["events"].clear()
  _GUARD["on"] = True
  try:
    yield tried
  finally:
    _GUARD["on"] = False
  assert not tried, tried
  assert not _GUARD["events"], _GUARD["events"]


def test_the_guard_catches_unpickling(no_code_loading, tmp_path):
  """The guard is live: pickle, np.load(allow_pickle=True) and eval all raise under it."""
  marker = str(tmp_path / "marker")
  data = payload(marker)
  with pytest.raises(AssertionError):
    pickle.loads(data)
  with pytest.raises(AssertionError):
    np.load(io.BytesIO(npy_bytes(armed_object_array(marker))), allow_pickle=True)
  with pytest.raises(AssertionError):
    eval("1 + 1")
  # Even an Unpickler bound before the patches stops at the audit hook.
  with pytest.raises(RuntimeError, match="pickle.find_class"):
    _GUARD_UNPICKLER(io.BytesIO(data)).load()
  assert not os.path.exists(marker)
  no_code_loading.clear()
  _GUARD["events"].clear()


_GUARD_UNPICKLER = pickle.Unpickler  # bound at import, before any monkeypatch


def test_checkpoint_restore_never_unpickles(workdir, reference_state, no_code_loading):
  state = pipeline.restore_iteration(workdir, CONFIG)
  restored = export_lib.restore(workdir)
  jax.tree.map(np.testing.assert_array_equal, state["params"], reference_state["params"])
  jax.tree.map(np.testing.assert_array_equal, restored.params,
               jax.tree.map(np.asarray, reference_state["params"]))


def test_export_load_never_unpickles(export_path, reference_state, no_code_loading):
  params, masks = sparse.load(export_path).decode()
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, dict(reference_state["params"])))
  jax.tree.map(np.testing.assert_array_equal, masks,
               jax.tree.map(lambda m: np.asarray(m, bool), dict(reference_state["masks"])))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_pretrained_load_never_unpickles(suffix, keras_arrays, vgg_template, tmp_path, request):
  path = str(tmp_path / ("vgg16" + suffix))
  if suffix == ".npz":
    pretrained.save_npz(path, keras_arrays)
  else:
    from safetensors.numpy import save_file
    save_file(keras_arrays, path)
  request.getfixturevalue("no_code_loading")
  params = pretrained.load_pretrained(path, "vgg16", vgg_template, layout="keras")
  for name, (layer, param) in pretrained.name_mapping("vgg16", "keras").items():
    np.testing.assert_array_equal(params[layer][param], keras_arrays[name])
