"""Preemption and faults: SIGTERM saves and exits 0, kill -9 at random points (hooks inside
training, pruning and checkpoint writes, and plain timed kills) loses nothing, NaN stops the run
with the last good checkpoint untouched, and one workdir takes one run at a time.

Every resumed run must end bit-identical (params, masks, metrics) to an uninterrupted one.
"""

import os
import random
import signal
import subprocess
import time

import conftest
import pytest

from lwc import lock as lock_lib
from lwc import pipeline
from lwc.errors import UserError


# 2,000 training images at batch 100: 20 steps an epoch, 5 steps per jitted call. Dense training
# is steps 1-40, iteration 1 retrains 41-80, iteration 2 81-120. With a checkpoint every 15 steps
# the progress checkpoints fall at steps 15, 30, 55, 70, 95, 110 (never at an epoch's end).
# All 2,000 images train (no validation split): nothing here is decided, and the timeline above
# needs 20 steps an epoch.
FLAGS = ["--validation=0", "--decide_on_test", "--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
         "--iterations=2", "--quality=0.8", "--layer_quality=fc3=0.4", "--tensorboard=false",
         "--steps_per_call=5", "--checkpoint_every_steps=15", "--log_every_seconds=0"]
PROGRESS_STEPS = (15, 30, 55, 70, 95, 110)


def cli(workdir, data_dir, fault=None, extra=(), popen=False):
  return conftest.lenet_cli(workdir, data_dir, [*FLAGS, *extra], fault=fault, popen=popen)


def config(data_dir):
  """The Config of the CLI runs above (for restoring their checkpoints)."""
  return pipeline.Config(model="lenet_300_100", data_dir=data_dir, validation=0,
                         decide_on_test=True, batch_size=100,
                         dense_epochs=2, retrain_epochs=2, iterations=2, qualities=(0.8,),
                         layer_qualities={"fc3": (0.4,)})


@pytest.fixture(scope="module")
def uninterrupted(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = cli(workdir, small_mnist_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint at step 15 " in proc.stderr  # mid-phase checkpoints were written
  assert not os.listdir(os.path.join(workdir, "progress"))  # ... and dropped when superseded
  return workdir


def assert_same_run(workdir, reference, data_dir):
  conftest.assert_same_run(workdir, reference, config(data_dir))


def fault_timeline():
  """Every hook point of the run above, in the order the run reaches them."""
  events = []
  for step in range(5, 121, 5):
    events.append((step, f"step:{step}"))
  for step in PROGRESS_STEPS:
    events.append((step + 0.5, f"progress:{step}"))
  for iteration, end in ((0, 40), (1, 80), (2, 120)):
    events.append((end + 0.6, f"save:{iteration}"))
    if iteration:
      events.append((end - 40 + 0.7, f"prune:{iteration}"))
  return [name for _, name in sorted(events)]


@pytest.mark.parametrize("seed", [0, 1])
def test_kills_at_random_hook_points_lose_nothing(seed, uninterrupted, small_mnist_dir,
                                                   tmp_path):
  """Five kill -9 in one run, at points drawn at random (seeded) from every step boundary,
  progress-checkpoint write, iteration-checkpoint write and pruning; then it must finish equal."""
  timeline = fault_timeline()
  points = sorted(random.Random(seed).sample(range(len(timeline)), 5))
  faults = [timeline[i] for i in points]
  workdir = str(tmp_path / "w")
  for fault in faults:
    proc = cli(workdir, small_mnist_dir, fault=fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
  proc = cli(workdir, small_mnist_dir)
  assert proc.returncode == 0, (faults, proc.stderr[-3000:])
  assert_same_run(workdir, uninterrupted, small_mnist_dir)


def test_kill_mid_progress_save_leaves_only_a_temporary_dir(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  proc = cli(workdir, small_mnist_dir, fault="progress:30")
  assert proc.returncode == -signal.SIGKILL
  names = os.listdir(os.path.join(workdir, "progress"))
  assert "15" in names and "30" not in names
  assert any(n.startswith("30.") and "tmp" in n for n in names), names
  proc = cli(workdir, small_mnist_dir, extra=["--iterations=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from" in proc.stderr and "(iteration 0 dense, epoch 1, step 15)" in proc.stderr


def test_timed_kills_at_arbitrary_moments(uninterrupted, small_mnist_dir, tmp_path):
  """kill -9 from outside after random delays (not at any hook), then a run to the end."""
  workdir = str(tmp_path / "w")
  rng = random.Random(7)
  kills = 0
  for delay in [rng.uniform(3.0, 14.0) for _ in range(4)] + [None]:
    proc = cli(workdir, small_mnist_dir, popen=True)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      kills += 1
      continue
    finally:
      proc.stderr.close()
    assert proc.returncode == 0
    if delay is not None:
      break  # finished before its kill came
  assert kills >= 1
  assert_same_run(workdir, uninterrupted, small_mnist_dir)


def test_sigterm_saves_at_next_step_and_exits_zero(uninterrupted, small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  proc = cli(workdir, small_mnist_dir, popen=True)
  lines = []
  for line in proc.stderr:  # wait until training is under way (a progress line of step >= 10)
    lines.append(line)
    if " step 10/40 " in line or " step 15/40 " in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  proc.wait(timeout=120)
  proc.stderr.close()
  stderr = "".join(lines) + rest
  assert proc.returncode == 0, stderr[-3000:]
  stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
  assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], stderr
  assert "SIGTERM received" in stderr
  assert os.listdir(os.path.join(workdir, "progress")), "no checkpoint saved on SIGTERM"
  resumed = cli(workdir, small_mnist_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from" in resumed.stderr
  assert_same_run(workdir, uninterrupted, small_mnist_dir)


def snapshot(folder):
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), folder)] = "dir"
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
  return out


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  proc = cli(workdir, small_mnist_dir, extra=["--iterations=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = snapshot(os.path.join(workdir, "checkpoints"))
  # Retraining at 1e7 x the learning rate diverges within a few steps.
  proc = cli(workdir, small_mnist_dir, extra=["--iterations=1", "--retrain_lr_scale=1e7"])
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "is not finite at step" in errors[0] or "loss is nan at step" in errors[0] or \
      "loss is inf at step" in errors[0], errors
  assert "(iteration 1, retrain, epoch 1)" in errors[0]
  assert "the last good checkpoint is kept" in errors[0]
  assert snapshot(os.path.join(workdir, "checkpoints")) == before
  assert not os.listdir(os.path.join(workdir, "progress"))


def test_nan_error_names_step_and_phase_in_process(small_mnist_dir, tmp_path):
  cfg = pipeline.Config(model="lenet_300_100", data_dir=small_mnist_dir, batch_size=80,
                        learning_rate=1e6, dense_epochs=1, iterations=0, tensorboard=False,
                        steps_per_call=1, log_every_seconds=1e9)
  with pytest.raises(pipeline.NumericError) as e:
    pipeline.run(cfg, str(tmp_path / "w"))
  message = str(e.value)
  assert "(iteration 0, dense, epoch 1)" in message and " at step " in message
  step = int(message.split(" at step ")[1].split()[0])
  assert 1 <= step <= 25
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_second_run_on_a_locked_workdir_is_refused(small_mnist_dir, tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  with lock_lib.WorkdirLock(str(workdir)):
    with pytest.raises(UserError) as e:
      pipeline.run(config(small_mnist_dir).replace(batch_size=80), str(workdir))
    assert str(e.value) == (f"workdir {workdir} is in use by another run; wait for it to end "
                            "or use another --workdir")
    # The CLI, from another process, gets the same answer.
    proc = cli(str(workdir), small_mnist_dir)
    assert proc.returncode == 2
    assert f"error: workdir {workdir} is in use by another run;" in proc.stderr
  assert os.listdir(workdir) == []  # the lock is on the folder: nothing was written


def test_lock_of_a_killed_run_does_not_block(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  proc = cli(workdir, small_mnist_dir, fault="step:5", extra=["--iterations=0"])
  assert proc.returncode == -signal.SIGKILL
  start = time.perf_counter()
  proc = cli(workdir, small_mnist_dir, extra=["--iterations=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert time.perf_counter() - start < 120
