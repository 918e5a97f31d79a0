"""Fault injection for tests: `LWC_FAULT=<point>:<n>` makes the process SIGKILL itself there.

Points: `save:<iteration>` (while orbax is writing that iteration's checkpoint, before it is
committed) and `step:<step>` (at the first step boundary at or after that many training steps). Unset in normal runs;
reading one environment variable is the whole cost.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, n: int, at_least: bool = False) -> None:
  """SIGKILLs this process if LWC_FAULT is `point:m` and n == m (n >= m with at_least)."""
  spec = os.environ.get("LWC_FAULT")
  if not spec or not spec.startswith(point + ":"):
    return
  target = int(spec.split(":", 1)[1])
  if n == target or (at_least and n >= target):
    os.kill(os.getpid(), signal.SIGKILL)
