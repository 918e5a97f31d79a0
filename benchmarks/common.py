"""Small helpers shared by the benchmarks: machine description, timing, disturbance check.

Imports neither JAX nor PyTorch, so the torch script can use it too.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import statistics
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine() -> dict:
  """nproc, CPU model and library versions, for the results table."""
  return {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
          "jax": version("jax"), "jaxlib": version("jaxlib"), "flax": version("flax"),
          "optax": version("optax"), "torch": version("torch"),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _busy_jiffies() -> int:
  """CPU time (clock ticks) every process on the machine has spent since boot, all cores."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields[:8]) - idle


def _own_cpu_seconds() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Watch:
  """Wall time of a block, our CPU time, and how much of the machine other processes used.

  `foreign` is the CPU time of every other process divided by (wall time x cores): 0.0 on a quiet
  machine, 0.5 when another process kept one of two cores busy throughout. Children count as
  ours only once they have exited (as a torch subprocess has by the time it reports).
  """

  def __enter__(self) -> Watch:
    self._j0, self._c0, self._t0 = _busy_jiffies(), _own_cpu_seconds(), time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self.seconds = time.perf_counter() - self._t0
    busy = (_busy_jiffies() - self._j0) / os.sysconf("SC_CLK_TCK")
    self.cpu_seconds = _own_cpu_seconds() - self._c0
    other = max(busy - self.cpu_seconds, 0.0)
    self.foreign = other / max(self.seconds * (os.cpu_count() or 1), 1e-9)


def summary(samples: list[float]) -> dict:
  """Median, min, max and count of a list of timings."""
  return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
          "n": len(samples)}


def fmt_seconds(samples: list[float], unit: str = "s", scale: float = 1.0) -> str:
  s = summary(samples)
  return (f"median {s['median'] * scale:.3f} {unit} (min {s['min'] * scale:.3f}, "
          f"max {s['max'] * scale:.3f}, n={s['n']})")
