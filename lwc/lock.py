"""One run per workdir: an exclusive `flock` on `workdir/lock`, released by the kernel when the
process ends in any way (kill -9 included), so a stale lock file never blocks a later run."""

from __future__ import annotations

import fcntl
import os

from lwc.errors import UserError


class WorkdirLock:
  """Context manager holding the workdir's lock; UserError if another process holds it.

  The lock file is removed on a normal exit; after a kill it stays, unlocked, and is reused.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise UserError(f"workdir {os.path.dirname(self.path)} is in use by another run (pid "
                      f"{holder}); wait for it to end or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None
