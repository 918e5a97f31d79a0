"""`python -m lwc.export` on real (tiny) pipeline checkpoints: round trip, predictions, errors."""

import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from lwc import checkpoints as ckpt_lib
from lwc import export as export_lib
from lwc import pipeline
from lwc import regularization
from lwc import sparse
from lwc.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_export(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "lwc.export", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def lenet_workdir(small_mnist_dir, tmp_path_factory):
  """LeNet-300-100 trained one epoch on 2,000 images, pruned once and retrained one epoch."""
  workdir = str(tmp_path_factory.mktemp("lenet300"))
  pipeline.run(pipeline.Config(model="lenet_300_100", data_dir=small_mnist_dir, batch_size=80,
                               learning_rate=0.05, dense_epochs=1, retrain_epochs=1,
                               iterations=1, qualities=(1.5,), tensorboard=False,
                               log_every_seconds=1e9), workdir)
  return workdir


@pytest.fixture(scope="module")
def lenet5_workdir(make_params, tmp_path_factory):
  """A LeNet-5 checkpoint as the pipeline writes it (same state, metadata and optimiser state),
  of random weights pruned to ~20%: training it would only slow the suite, the conv path is what
  matters here."""
  workdir = str(tmp_path_factory.mktemp("lenet5"))
  _, params = make_params("lenet5", seed=2)
  rng = np.random.default_rng(0)
  masks = {layer: {"kernel": rng.random(p["kernel"].shape) < 0.2,
                   "bias": np.ones(p["bias"].shape, bool)} for layer, p in params.items()}
  params = {layer: {"kernel": np.where(masks[layer]["kernel"], p["kernel"], np.float32(0)),
                    "bias": p["bias"]} for layer, p in params.items()}
  config = pipeline.Config(model="lenet5", iterations=1, tensorboard=False)
  checkpoints = ckpt_lib.Checkpoints(workdir)
  checkpoints.save(1, {"params": params, "masks": masks,
                       "opt_state": regularization.phase_optimizer(config, 1, 1).init(params),
                       "step": np.int32(0), "rng": jax.random.PRNGKey(0)},
                   {"model": "lenet5", "param_shapes": ckpt_lib.param_shapes(params),
                    "config": config.to_json(), "history": []})
  checkpoints.close()
  return workdir


def test_cli_writes_export_and_report(lenet_workdir, small_mnist_dir, tmp_path):
  out = str(tmp_path / "lenet.npz")
  proc = run_export(f"--workdir={lenet_workdir}", f"--out={out}", f"--data_dir={small_mnist_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "round trip: params bit-identical to the checkpoint: True; masks identical: True" in (
      proc.stdout)
  assert "| total (pruned layers) |" in proc.stdout and "dense/pruned" in proc.stdout
  with open(str(tmp_path / "lenet.json")) as f:
    report = json.load(f)
  assert report["iteration"] == 1 and report["format_version"] == 2
  predictions = report["predictions"]
  assert predictions["equal_predictions"] == predictions["examples"] == 1000
  assert predictions["sparse_error"] == predictions["dense_error"]
  sizes = report["sizes"]
  assert sizes["file_bytes"] == os.path.getsize(out)
  fc1 = sizes["leaves"]["fc1/kernel"]
  chosen = report["chosen"]["fc1/kernel"]  # by default the width of the fewest bytes
  assert (fc1["encoding"], fc1["index_width"]) == (chosen["encoding"], chosen["index_bits"])
  assert fc1["paper_overhead"] == pytest.approx(5 / 32)
  with open(os.path.join(lenet_workdir, "summary.json")) as f:
    history = json.load(f)["final"]
  assert sizes["pruned_layers"]["kept"] == history["params_nonzero"]
  assert report["energy"]["ratio"] > 1


def test_export_in_process_bit_identical_and_float16(lenet_workdir, tmp_path):
  restored = export_lib.restore(lenet_workdir)
  out = str(tmp_path / "narrow.npz")
  report = export_lib.export(lenet_workdir, out, fc_index_bits=2, value_dtype="float16",
                             sram_kib=0, sweep_index_bits=(2, 5), encoding="filler")
  assert report["round_trip"]["masks_identical"]
  leaf = report["sizes"]["leaves"]["fc1/kernel"]
  assert leaf["fillers"] > 0 and leaf["value_width"] == 16
  assert report["index_width_sweep"]["fc1/kernel"][2] == leaf["sparse_bytes"]
  assert report["index_width_sweep"]["fc1/kernel"][5] < leaf["sparse_bytes"]
  assert report["energy"]["dense"]["total"]["sram_words"] == 0
  params, masks = sparse.load(out).decode()
  for layer in ("fc1", "fc2", "fc3"):
    np.testing.assert_array_equal(masks[layer]["kernel"], restored.masks[layer]["kernel"])
    np.testing.assert_array_equal(
        params[layer]["kernel"],
        restored.params[layer]["kernel"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(params[layer]["bias"], restored.params[layer]["bias"])


def test_lenet5_export_round_trip_and_predictions(lenet5_workdir, small_mnist_dir, tmp_path):
  out = str(tmp_path / "lenet5.npz")
  report = export_lib.export(lenet5_workdir, out, data_dir=small_mnist_dir, fc_index_bits=5,
                             conv_index_bits=8)
  assert report["round_trip"]["params_bit_identical"]
  assert report["output_positions"] == {"conv1": 576, "conv2": 64, "fc1": 1, "fc2": 1}
  leaves = report["sizes"]["leaves"]
  assert leaves["conv2/kernel"]["index_width"] == 8 and leaves["fc1/kernel"]["index_width"] == 5
  p = report["predictions"]
  assert p["equal_predictions"] == p["examples"]


def test_iteration_flag_and_earlier_checkpoint(lenet_workdir, tmp_path):
  report = export_lib.export(lenet_workdir, str(tmp_path / "dense.npz"), iteration=0)
  assert report["sizes"]["pruned_layers"]["density"] == 1.0
  with pytest.raises(UserError, match="--iteration=7: .* has iterations 0, 1"):
    export_lib.export(lenet_workdir, str(tmp_path / "x.npz"), iteration=7)


def test_cli_bad_input_is_one_error_line(tmp_path, lenet_workdir):
  missing = str(tmp_path / "nowhere")
  proc = run_export(f"--workdir={missing}", f"--out={tmp_path / 'x.npz'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: --workdir={missing}: no checkpoints/ folder (not a pipeline workdir)"]
  assert not os.path.exists(missing)
  proc = run_export(f"--workdir={lenet_workdir}", f"--out={tmp_path / 'no' / 'x.npz'}")
  assert proc.returncode == 2 and proc.stderr.startswith("error: --out=")
  assert "does not exist" in proc.stderr
  with pytest.raises(UserError, match="--data_dir=.*: no such directory"):
    export_lib.export(lenet_workdir, str(tmp_path / "y.npz"), data_dir=str(tmp_path / "none"))
  assert not os.path.exists(tmp_path / "y.npz")


def test_default_export_picks_bytes_per_layer_and_is_smaller(lenet_workdir, tmp_path):
  """Issue 15.2: per-layer encoding and width by bytes (recorded in the manifest and the
  report), never larger than the paper's scheme, round trip still bit-identical."""
  auto = export_lib.export(lenet_workdir, str(tmp_path / "auto.npz"))
  paper = export_lib.export(lenet_workdir, str(tmp_path / "paper.npz"), fc_index_bits=5,
                            conv_index_bits=8, encoding="filler")
  for report in (auto, paper):
    assert report["round_trip"]["params_bit_identical"] and report["round_trip"]["masks_identical"]
    assert report["format_version"] == 2
  assert auto["settings"]["fc_index_bits"] == "auto" and auto["settings"]["encoding"] == "auto"
  loaded = sparse.load(str(tmp_path / "auto.npz"))
  restored = export_lib.restore(lenet_workdir)
  for layer in ("fc1", "fc2", "fc3"):
    name = f"{layer}/kernel"
    entry = next(e for e in loaded.manifest["leaves"] if e["name"] == name)
    positions = np.flatnonzero(restored.masks[layer]["kernel"].ravel())
    best = sparse.best_encoding(positions)
    assert (entry["encoding"], entry["index_bits"]) == best[:2]
    assert auto["chosen"][name] == {"encoding": best[0], "index_bits": best[1]}
    row = auto["sizes"]["leaves"][name]
    assert row["sparse_bytes"] == best[2] <= paper["sizes"]["leaves"][name]["sparse_bytes"]
    assert row["paper_scheme_bytes"] == paper["sizes"]["leaves"][name]["sparse_bytes"]
    assert paper["sizes"]["leaves"][name]["index_width"] == 5
  assert auto["sizes"]["file_bytes"] < paper["sizes"]["file_bytes"]
  assert auto["sizes"]["compression_by_file"] > paper["sizes"]["compression_by_file"]
  text = export_lib.describe(auto)
  assert "(format 2; encoding auto, index bits fc auto / conv auto, stored)" in text
  assert "x by file" in text and "| 15.6% |" in text


def test_cli_encoding_and_compression_flags(lenet_workdir, tmp_path):
  out = str(tmp_path / "d.npz")
  proc = run_export(f"--workdir={lenet_workdir}", f"--out={out}", "--encoding=escape",
                    "--fc_index_bits=6", "--compression=deflated")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "round trip: params bit-identical to the checkpoint: True" in proc.stdout
  entries = [e for e in sparse.load(out).manifest["leaves"] if e["storage"] == "sparse"]
  assert {(e["encoding"], e["index_bits"]) for e in entries} == {("escape", 6)}
  with zipfile.ZipFile(out) as z:
    assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
  proc = run_export(f"--workdir={lenet_workdir}", f"--out={out}", "--encoding=huffman")
  assert proc.returncode != 0 and "--encoding" in proc.stderr
