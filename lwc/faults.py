"""Fault injection for tests: `LWC_FAULT=<point>:<n>` makes the process SIGKILL itself there.

Points: `save:<iteration>` (while orbax is writing that iteration's checkpoint, before it is
committed), `progress:<step>` (likewise for a mid-phase checkpoint), `prune:<iteration>` (after
pruning, before its evaluation), `step:<step>` (at the first step boundary at or after that
many training steps) and `write:<n>` / `write:<name>` (at the n-th file write of the process, or
the first write of a file called <name>: a rewritten file killed with its new contents complete
in the temporary file but not yet renamed, an appended line killed half written).

In-process tests can instead set `hook` to a callable(path, kind, data) called at every file
write (`kind` 'replace' or 'append'; `data` the bytes an append is about to write).
Unset in normal runs; reading one environment variable is the whole cost.
"""

from __future__ import annotations

import os
import signal

hook = None
_writes = 0


def _kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def armed(point: str, n: int) -> bool:
  """True if LWC_FAULT would kill at `point:n` (for a caller that must first reach the state
  the kill is meant to hit)."""
  spec = os.environ.get("LWC_FAULT")
  return bool(spec) and spec == f"{point}:{n}"


def maybe_kill(point: str, n: int, at_least: bool = False) -> None:
  """SIGKILLs this process if LWC_FAULT is `point:m` and n == m (n >= m with at_least)."""
  spec = os.environ.get("LWC_FAULT")
  if not spec or not spec.startswith(point + ":"):
    return
  target = int(spec.split(":", 1)[1])
  if n == target or (at_least and n >= target):
    _kill()


def write_point(path: str, kind: str, data: bytes = b"") -> None:
  """Called by `lwc.files` at every write: before a rename (`replace`) or an append."""
  global _writes
  _writes += 1
  if hook is not None:
    hook(path, kind, data)
  spec = os.environ.get("LWC_FAULT")
  if not spec or not spec.startswith("write:"):
    return
  target = spec.split(":", 1)[1]
  if (target.isdigit() and int(target) == _writes) or target == os.path.basename(path):
    if kind == "append" and data:
      with open(path, "ab") as f:  # a torn line, as a kill in the middle of write() leaves
        f.write(data[:max(1, len(data) // 2)])
    _kill()
