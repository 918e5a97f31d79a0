"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch: syntax, --help, argument errors, dry runs."""

import glob
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))
                 + glob.glob(os.path.join(REPO, "launch", "*.sbatch")))
FLAGFILE = os.path.join(REPO, "experiments", "lenet5.flags")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LWC_"))}
  env.update(extra)
  return env


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path, monkeypatch):
  """A `gcloud` that fails loudly comes first on PATH: no test may reach the real one."""
  bin_dir = tmp_path / "guard"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called' >&2\nexit 99\n")
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _run(script, *args, env=None):
  return subprocess.run(["bash", script, *args], check=False, capture_output=True, text=True,
                        timeout=30, env=env or _clean_env(), cwd=REPO)


def _commands(stdout):
  """The dry-run lines ('+ cmd args'), each split back into its words."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_scripts_are_found():
  assert TPU in SCRIPTS and SLURM in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_syntax(script):
  result = subprocess.run(["bash", "-n", script], check=False, capture_output=True, text=True,
                          timeout=30)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM], ids=os.path.basename)
def test_help(script):
  for flag in ("--help", "-h"):
    result = _run(script, flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert "--flagfile" in result.stdout and "--workdir" in result.stdout


@pytest.mark.parametrize("args,message", [
    ((), "a command is required: create, setup, run, delete or all"),
    (("launch",), "unknown command 'launch': expected create, setup, run, delete or all"),
    (("create", "--zone=z"), "--name is required for 'create'"),
    (("create", "--name=n", "--zone=z"), "--accelerator_type is required for 'create'"),
    (("run", "--name=n", "--zone=z", "--experiment=lenet", "--flagfile=f"),
     "--workdir is required for 'run'"),
    (("run", "--name=n", "--zone=z", "--experiment=lenet", "--flagfile=/no/such.flags",
      "--workdir=gs://b"), "--flagfile /no/such.flags does not exist"),
    (("create", "--name=n", "--zone=z", "--accelerator_type=v9-8"),
     "no default --version for accelerator type 'v9-8'; pass --version"),
    (("delete", "--name=n", "--zone=z", "--colour=red"), "unknown option --colour"),
    (("delete", "--name=n", "--zone"), "--zone needs a value"),
    (("delete", "--zone", "--name=n"), "--zone needs a value"),
])
def test_tpu_argument_errors(args, message):
  result = _run(TPU, "--dry_run", *args)
  assert result.returncode == 2
  assert result.stderr.splitlines()[0] == f"tpu_pod.sh: error: {message}"
  assert result.stdout == ""


def test_tpu_dry_run_all():
  result = _run(TPU, "all", "--name=lwc-v4", "--zone", "us-central2-b", "--project=proj",
                "--accelerator_type=v4-32", "--experiment=lenet", f"--flagfile={FLAGFILE}",
                "--workdir=gs://bucket/run 1", "--delete_after", "--dry_run", "--", "--seed=3",
                "--note=a b")
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  cmds = _commands(result.stdout)
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = ["--zone=us-central2-b", "--project=proj"]
  assert cmds[0] == tpu + ["create", "lwc-v4"] + where + [
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  assert cmds[1][:3] == ["git", "-C", REPO] and cmds[1][3:5] == ["archive", "--format=tar.gz"]
  archive = cmds[1][5].removeprefix("--output=")
  assert cmds[1][6] == "HEAD"
  assert cmds[2] == tpu + ["scp", archive, "lwc-v4:lwc-src.tar.gz", "--worker=all"] + where
  assert cmds[3][:7] == tpu + ["ssh", "lwc-v4", "--worker=all"] and cmds[3][7:9] == where
  setup = cmds[3][9].removeprefix("--command=")
  assert "tar -xzf lwc-src.tar.gz -C lwc" in setup
  assert "python3 -m pip install -e . 'jax[tpu]>=0.10'" in setup
  assert cmds[4] == tpu + ["scp", FLAGFILE, "lwc-v4:lwc/run.flags", "--worker=all"] + where
  assert cmds[5][:9] == tpu + ["ssh", "lwc-v4", "--worker=all"] + where
  remote = cmds[5][9].removeprefix("--command=")
  assert remote.startswith("cd lwc && ")
  # What each worker's shell runs, word by word.
  assert shlex.split(remote.removeprefix("cd lwc && ")) == [
      "python3", "-m", "lwc.experiments.lenet", "--flagfile=run.flags",
      "--workdir=gs://bucket/run 1", "--seed=3", "--note=a b"]
  assert cmds[6] == tpu + ["delete", "lwc-v4"] + where + ["--quiet"]
  assert len(cmds) == 7


def test_tpu_dry_run_single_commands():
  base = ("--name=t", "--zone=z", "--dry_run")
  create = _commands(_run(TPU, "create", *base, "--accelerator_type=v5litepod-16", "--spot").stdout)
  assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=z",
                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                     "--spot"]]
  delete = _commands(_run(TPU, "delete", *base).stdout)
  assert delete == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--quiet"]]
  result = _run(TPU, "run", *base, "--experiment=lenet", f"--flagfile={FLAGFILE}",
                "--workdir=/local/dir", "--detach", "--remote_dir=code")
  assert "warning: --workdir /local/dir is not a gs:// path" in result.stderr
  remote = _commands(result.stdout)[-1][-1]
  assert remote == ("--command=cd code && nohup python3 -m lwc.experiments.lenet "
                    "--flagfile=run.flags --workdir=/local/dir > run.log 2>&1 < /dev/null &")
  result = _run(TPU, "all", *base, "--accelerator_type=v4-8", "--experiment=lenet",
                f"--flagfile={FLAGFILE}", "--workdir=gs://b", "--detach", "--delete_after")
  assert result.returncode == 2 and "--detach and --delete_after" in result.stderr


SLURM_ENV = {"SLURM_JOB_ID": "12345", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_GPUS_ON_NODE": "4",
             "SLURM_CPUS_PER_TASK": "6", "SLURM_SUBMIT_DIR": REPO}


@pytest.mark.parametrize("args,message", [
    (("--flagfile=f", "--workdir=w"), "--experiment is required"),
    (("--experiment=lenet", "--workdir=w"), "--flagfile is required"),
    (("--experiment=lenet", "--flagfile=f"), "--workdir is required"),
    (("--experiment=lenet", "--flagfile=f", "--workdir=w", "--mode=per_rack"),
     "--mode must be per_gpu or per_node, got 'per_rack'"),
    (("--experiment=lenet", "--flagfile=f", "--workdir=w", "stray"),
     "unexpected argument 'stray' (experiment arguments go after '--')"),
])
def test_slurm_argument_errors(args, message):
  result = _run(SLURM, *args, env=_clean_env(**SLURM_ENV))
  assert result.returncode == 2
  assert result.stderr.splitlines()[0] == f"slurm_gpu.sbatch: error: {message}"


def test_slurm_outside_a_job_and_missing_flagfile():
  args = ("--experiment=lenet", f"--flagfile={FLAGFILE}", "--workdir=/shared/w")
  result = _run(SLURM, *args)
  assert result.returncode == 2
  assert result.stderr.splitlines()[0] == (
      "slurm_gpu.sbatch: error: not inside a SLURM job: submit this script with sbatch")
  result = _run(SLURM, "--experiment=lenet", "--flagfile=no.flags", "--workdir=w",
                env=_clean_env(**SLURM_ENV))
  assert result.stderr.splitlines()[0] == (
      f"slurm_gpu.sbatch: error: --flagfile no.flags does not exist (relative to {REPO})")


def test_slurm_dry_run_per_gpu():
  env = _clean_env(**SLURM_ENV, SLURM_NTASKS_PER_NODE="4")
  result = _run(SLURM, "--experiment=lenet", "--flagfile=experiments/lenet5.flags",
                "--workdir=/shared/runs/a b", "--dry_run", "--", "--seed=2", env=env)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert _commands(result.stdout) == [[
      "srun", "--kill-on-bad-exit=1", "python", "-m", "lwc.experiments.lenet",
      f"--flagfile={FLAGFILE}", "--workdir=/shared/runs/a b", "--seed=2"]]
  # Fewer tasks than GPUs: a warning, the command still runs.
  env["SLURM_NTASKS_PER_NODE"] = "1"
  result = _run(SLURM, "--experiment=lenet", f"--flagfile={FLAGFILE}", "--workdir=w",
                "--dry_run", env=env)
  assert result.returncode == 0 and "1 tasks but 4 GPUs per node" in result.stderr


def _fake_bin(tmp_path):
  """Stand-ins for scontrol, srun (runs the command as 2 tasks) and python (prints its env)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scripts = {
      # Many hosts: a reader that stops after the first line would SIGPIPE it.
      "scontrol": 'echo gpu001\nfor i in $(seq 2 20000); do echo "gpu$i"; done\n',
      "srun": ('while [[ "$1" == --* ]]; do shift; done\n'
               'for i in 0 1; do SLURM_PROCID=$i "$@" || exit $?; done\n'),
      "python": ('echo "task $LWC_PROCESS_ID/$LWC_NUM_PROCESSES at $LWC_COORDINATOR'
                 ' gpus $LWC_LOCAL_DEVICE_IDS cpus $SRUN_CPUS_PER_TASK: $*"\n'),
  }
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
  return str(bin_dir)


def test_slurm_per_node(tmp_path):
  env = _clean_env(**SLURM_ENV, SLURM_NTASKS_PER_NODE="1")
  env["PATH"] = _fake_bin(tmp_path) + os.pathsep + env["PATH"]
  args = ("--mode=per_node", "--experiment=lenet", f"--flagfile={FLAGFILE}",
          "--workdir=gs://b/run")
  result = _run(SLURM, *args, "--dry_run", env=env)
  assert result.returncode == 0, result.stderr
  port = 61440 + 12345 % 4096
  assert result.stdout.splitlines()[0] == (
      f"LWC_COORDINATOR=gpu001:{port} LWC_NUM_PROCESSES=2 LWC_LOCAL_DEVICE_IDS=0,1,2,3")
  (srun,) = _commands(result.stdout)
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
  assert srun[-5:] == ["python", "-m", "lwc.experiments.lenet", f"--flagfile={FLAGFILE}",
                       "--workdir=gs://b/run"]
  # Run for real through the stand-ins: each task gets its own LWC_PROCESS_ID.
  result = _run(SLURM, *args, env=env)
  assert result.returncode == 0, result.stderr
  common = (f"at gpu001:{port} gpus 0,1,2,3 cpus 6: -m lwc.experiments.lenet "
            f"--flagfile={FLAGFILE} --workdir=gs://b/run")
  assert result.stdout.splitlines() == [f"task 0/2 {common}", f"task 1/2 {common}"]
  env["SLURM_NTASKS_PER_NODE"] = "4"
  result = _run(SLURM, *args, env=env)
  assert result.returncode == 2
  assert "--mode=per_node wants --ntasks-per-node=1, got 4" in result.stderr
