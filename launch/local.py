"""Runs one command as N JAX processes on this machine, as a multi-host job would run on N hosts.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python -m lwc.experiments.some_module --flag=value

Each process gets LWC_COORDINATOR=127.0.0.1:<free port>, LWC_NUM_PROCESSES=N and
LWC_PROCESS_ID=i (read by `lwc.distributed.initialize`), and with --devices_per_process=D also
JAX_NUM_CPU_DEVICES=D and JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo (D fake CPU devices each, talking
over gloo). Output lines are prefixed [p<i>]. The launcher waits for all; when one fails it stops
the others (SIGTERM, then SIGKILL after --grace seconds) and exits with the first failure's code
(124 after --timeout). Exit code 0 means every process exited 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence


def free_port() -> int:
  """A TCP port free on localhost now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, num_processes: int, coordinator: str,
                devices_per_process: int | None) -> dict[str, str]:
  """The environment of process `index`: `base` plus the lwc.distributed settings."""
  env = dict(base)
  env.update({"LWC_COORDINATOR": coordinator, "LWC_NUM_PROCESSES": str(num_processes),
              "LWC_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1"})
  if devices_per_process is not None:
    env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  return env


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    text = line.decode(errors="replace").rstrip("\n")
    with lock:
      out.write(f"[p{index}] {text}\n")
      out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
  """SIGTERM every running process group, SIGKILL what is left after `grace` seconds."""
  for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
    running = [p for p in procs if p.poll() is None]
    for p in running:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
      time.sleep(0.05)
  for p in procs:
    p.wait()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int | None = None,
           timeout: float | None = None, grace: float = 5.0, out=None) -> int:
  """Runs `command` as `num_processes` processes; the first non-zero exit code, else 0."""
  out = sys.stdout if out is None else out
  coordinator = f"127.0.0.1:{free_port()}"
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i in range(num_processes):
      env = process_env(os.environ, i, num_processes, coordinator, devices_per_process)
      p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True))
      pumps[-1].start()
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    while code == 0:
      codes = [p.poll() for p in procs]  # poll every one: each call updates its returncode
      if None not in codes:
        break
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        code = failed[0]
      elif deadline is not None and time.monotonic() > deadline:
        with lock:
          out.write(f"[launch] timeout after {timeout} s\n")
        code = 124
      else:
        time.sleep(0.05)
    if code == 0:
      code = next((p.returncode for p in procs if p.returncode != 0), 0)
  except BaseException:
    _stop(procs, grace)
    raise
  _stop(procs, grace)
  for t in pumps:
    t.join(timeout=5)
  return code


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  if "--" not in argv:
    print("usage: launch/local.py --num_processes=N [--devices_per_process=D] "
          "[--timeout=S] -- COMMAND ...", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="fake CPU devices per process (JAX_NUM_CPU_DEVICES)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
  parser.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command or args.num_processes < 1:
    parser.error("need a command after -- and --num_processes >= 1")
  if args.devices_per_process is not None and args.devices_per_process < 1:
    parser.error("--devices_per_process must be >= 1")
  # A SIGTERM to the launcher stops the processes too (SystemExit runs launch's clean-up).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  return launch(command, args.num_processes, args.devices_per_process, args.timeout, args.grace)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
