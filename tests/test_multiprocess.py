"""Multi-process training: 2 processes x 4 CPU devices (gloo) match 1 process x 8 devices.

The processes are started by launch/local.py and run tests/multiprocess_worker.py; also tested:
the launcher's failure handling and lwc.distributed's settings resolution.
"""

import os
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from lwc import distributed
from lwc.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
LAUNCH = os.path.join(REPO, "launch", "local.py")


def clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LWC_", "JAX_", "XLA_", "SLURM_", "OMPI_", "PMI_"))}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def run(command, env, timeout=120):
  result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_two_processes_train_as_one(mnist_dir, tmp_path):
  single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
  worker = [sys.executable, WORKER, f"--mnist_dir={mnist_dir}", "--steps=5"]
  run(worker + [f"--out={single}"], clean_env(JAX_NUM_CPU_DEVICES="8"))
  out = run([sys.executable, LAUNCH, "--num_processes=2", "--devices_per_process=4",
             "--timeout=100", "--", *worker, f"--out={multi}"], clean_env())
  assert "[p0] process 0/2: 8 devices, 4 local" in out
  assert "[p1] process 1/2: 8 devices, 4 local" in out
  one, two = dict(np.load(single)), dict(np.load(multi))
  assert (int(one["process_count"]), int(two["process_count"])) == (1, 2)
  assert int(one["device_count"]) == int(two["device_count"]) == 8
  assert int(two["local_device_count"]) == 4
  assert int(two["eval_count"]) == 100  # padding excluded on both processes
  assert one["loss"].shape == (3,) and one["loss"][-1] < one["loss"][0]  # 5 steps, chunks of 2
  drop = ("process_count", "local_device_count")
  chex.assert_trees_all_close({k: v for k, v in two.items() if k not in drop},
                              {k: v for k, v in one.items() if k not in drop},
                              rtol=1e-5, atol=1e-6)


def test_launcher_sets_the_job_and_stops_the_rest_on_failure():
  script = ("import os, sys, time\n"
            "pid = os.environ['LWC_PROCESS_ID']\n"
            "print('settings', os.environ['LWC_COORDINATOR'].split(':')[0],\n"
            "      os.environ['LWC_NUM_PROCESSES'], pid, os.environ['JAX_NUM_CPU_DEVICES'])\n"
            "sys.exit(3) if pid == '1' else time.sleep(60)\n")
  start = time.monotonic()
  result = subprocess.run([sys.executable, LAUNCH, "--num_processes=2", "--devices_per_process=3",
                           "--grace=1", "--", sys.executable, "-c", script],
                          env=clean_env(), capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
  for p in (0, 1):
    assert f"[p{p}] settings 127.0.0.1 2 {p} 3" in result.stdout


def test_resolve_settings():
  assert distributed.resolve(env={}) is None
  settings = distributed.resolve("10.0.0.1:1234", 4, 2, "0,1", env={})
  assert settings == distributed.Settings("flags", "10.0.0.1:1234", 4, 2, (0, 1))
  env = {"LWC_COORDINATOR": "host:99", "LWC_NUM_PROCESSES": "2", "LWC_PROCESS_ID": "1"}
  assert distributed.resolve(env=env) == distributed.Settings("environment", "host:99", 2, 1)
  assert distributed.resolve("a:1", 1, 0, env={}) is None  # one process: nothing to join
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
  assert distributed.resolve(env=slurm).source == "slurm"
  assert distributed.resolve(env={**slurm, "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize("kwargs,env,match", [
    ({"coordinator_address": "h:1"}, {},
     "from the flags are incomplete: coordinator_address given but not num_processes, process_id"),
    ({}, {"LWC_NUM_PROCESSES": "2", "LWC_PROCESS_ID": "0"},
     "environment are incomplete: LWC_NUM_PROCESSES, LWC_PROCESS_ID given but not LWC_COORDINATOR"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {}, "host:port"),
    ({}, {"LWC_COORDINATOR": "h:1", "LWC_NUM_PROCESSES": "two", "LWC_PROCESS_ID": "0"},
     "LWC_NUM_PROCESSES='two' is not an integer"),
])
def test_resolve_rejects_partial_or_bad_settings(kwargs, env, match):
  with pytest.raises(UserError, match=match):
    distributed.resolve(**kwargs, env=env)
