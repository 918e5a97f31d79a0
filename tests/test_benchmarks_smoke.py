"""Smoke test of benchmarks/imagenet_throughput.py: tiny AlexNet and VGG-16 on two CPU devices.

Runs the script as a subprocess (its absl flags stay out of the test process, and it gets its own
two-device CPU backend), then checks the JSON report. About 30 s on a 2-core machine, nearly all
of it XLA compiling the four train steps. `test_gpu_check_smoke_cpu` runs benchmarks/gpu_check.py
--smoke (tiny throughput sections and the end-to-end kill/resume run on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALEXNET_WIDTHS = "16,32,32,32,32,64,64"
VGG_WIDTHS = "8,8,16,16,16,16,16,32,32,32,32,32,32,64,64"


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2").strip())
  return subprocess.run([sys.executable, "-m", "benchmarks.imagenet_throughput", *args],
                        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_imagenet_throughput_tiny_cpu(tmp_path):
  out = tmp_path / "throughput.json"
  proc = _run("--models=alexnet,vgg16", "--image_size=67,32", "--batch_size=8", "--steps=2",
              "--warmup=1", "--repeats=2", f"--widths={ALEXNET_WIDTHS}/{VGG_WIDTHS}",
              f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["devices"]["platform"] == "cpu"
  assert report["devices"]["count"] == 2
  assert report["devices"]["kind"]
  assert [r["model"] for r in report["results"]] == ["alexnet", "vgg16"]
  for r, size, widths in zip(report["results"], (67, 32), (ALEXNET_WIDTHS, VGG_WIDTHS)):
    assert r["image_size"] == size
    assert r["widths"] == [int(w) for w in widths.split(",")]
    assert (r["batch_size"], r["steps_per_call"], r["dtype"]) == (8, 2, "float32")
    assert 0.0 < r["mask_density"] < 1.0
    assert set(r["layer_density"]) >= {"fc6", "fc7", "fc8"}
    for v in ("dense", "masked"):
      o = r[v]
      assert o["ms_per_step"] > 0
      assert abs(o["images_per_s"] - 8 * 1e3 / o["ms_per_step"]) < 1e-6 * o["images_per_s"]
      assert len(o["ms_per_step_samples"]) == 2
      assert o["compile_seconds"] > 0
      assert o["params_finite"] is True
      assert o["loss"] > 0
      assert o["peak_bytes_after_warmup"] is None  # the CPU backend keeps no memory stats
    expected = 100 * (r["masked"]["ms_per_step"] / r["dense"]["ms_per_step"] - 1)
    assert abs(r["masked_overhead_pct"] - expected) < 1e-6
    assert isinstance(r["paired_overhead_pct_median"], float)
  assert "| alexnet | 67 | 8 | masked |" in proc.stdout
  assert "| vgg16 | 32 | 8 | dense |" in proc.stdout


def test_imagenet_throughput_bad_widths():
  proc = _run("--models=alexnet,vgg16", "--widths=16,32")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --widths: alexnet takes 7 positive widths, got '16,32'")


def test_gpu_check_smoke_cpu(tmp_path):
  """benchmarks/gpu_check.py --smoke: every section runs (tiny, on CPU) and the JSON says so."""
  out = tmp_path / "gc"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke",
                         "--time_limit_s=600", "--section_limit_s=300", f"--out_dir={out}"],
                        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out / "gpu_check.json").read_text())
  assert report["check"] == "gpu_check" and report["smoke"] is True
  assert report["status"] == "ok", report["notes"]
  assert report["devices"]["platform"] == "cpu"
  assert report["machine"]["jax"] and report["wall_s"] > 0
  assert [r["model"] for r in report["throughput"]] == ["alexnet", "vgg16"]
  for r, size in zip(report["throughput"], (67, 32)):
    assert (r["image_size"], r["batch_size"], r["steps_per_call"]) == (size, 8, 2)
    for v in ("dense", "masked"):
      o = r[v]
      assert o["status"] == "ok"
      assert o["ms_per_step"] > 0 and o["compile_s"] > 0 and o["params_finite"] is True
      assert abs(o["images_per_s"] - 8e3 / o["ms_per_step"]) < 1e-6 * o["images_per_s"]
      assert len(o["ms_per_step_samples"]) == 2
      assert o["peak_bytes_in_use"] is None  # the CPU backend keeps no memory stats
      assert o["state_bytes"] > 0 and o["chunk_bytes"] == 2 * 8 * (size * size * 3 + 1) * 4
    assert r["dense"]["mask_density"] is None
    assert abs(r["masked"]["mask_density"] - 0.1) < 0.05
    assert r["masked_overhead_pct"] == pytest.approx(
        100 * (r["masked"]["ms_per_step"] / r["dense"]["ms_per_step"] - 1))
  e2e = report["e2e"]
  assert e2e["status"] == "ok", e2e
  for check in ("A_dense_pruned_retrained", "B_killed_mid_iteration_2",
                "C_resumed_kept_iterations_0_1", "D_nothing_retrained"):
    assert e2e["checks"][check] is True, check
  assert e2e["data"]["splits"] == {"train": 32, "validation": 16}
  runs = e2e["runs"]
  assert [runs[k]["status"] for k in "ABCD"] == ["ok", "killed", "ok", "ok"]
  assert [runs[k]["checkpoints_after"] for k in "ABCD"] == [[0, 1], [0, 1], [0, 1, 2], [0, 1, 2]]
  assert [h["iteration"] for h in runs["C"]["iterations"]] == [0, 1, 2]
  assert runs["C"]["iterations"][:2] == runs["A"]["iterations"]
  assert runs["D"]["iterations"] == runs["C"]["iterations"]
  table = (out / "gpu_check.md").read_text()
  assert "| alexnet | 67 | 8 | masked |" in table and "| C | the same command again" in table


def test_epoch_time_with_its_floor(small_mnist_dir, tmp_path):
  """benchmarks/epoch_time.py on 2,000 images: lwc's epochs, the hand-written floor epoch and
  its GEMMs on NumPy's BLAS are all timed, and the floor line reports the FLOP rate."""
  out = tmp_path / "epoch.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.epoch_time", "--notorch",
                         "--models=lenet_300_100", "--epochs=2", "--rounds=1",
                         f"--data_dir={small_mnist_dir}", f"--json_out={out}"],
                        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  floor = report["table"]["lenet_300_100_floor"]
  assert floor["n"] == 1 and floor["xla_sgd"] > 0 and floor["numpy_gemms"] > 0
  # 2,000 images: 20 steps of batch 100, 112.68 MFLOP each.
  assert floor["gflops_xla"] * floor["xla_sgd"] == pytest.approx(20 * 112.68e6 / 1e9)
  assert len(report["runs"]["lenet_300_100"]["lwc"][0]["epoch_seconds"]) == 2
  assert "lenet_300_100 floor: the same SGD epoch by hand (jit)" in proc.stdout
