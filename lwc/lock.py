"""One run per workdir: an exclusive `flock` on the workdir folder itself. The kernel releases it
when the process ends in any way (kill -9 included), so a killed run never blocks a later one,
and taking it writes nothing: a refused or failed run leaves the workdir exactly as it was."""

from __future__ import annotations

import fcntl
import os

from lwc.errors import UserError


class WorkdirLock:
  """Context manager holding the workdir's lock; UserError if another process holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(f"workdir {self.workdir} is in use by another run; wait for it to end or "
                      "use another --workdir") from None
    except OSError as e:  # a file system without flock: run unprotected rather than not at all
      import logging
      logging.getLogger("lwc").warning("cannot lock %s (%s); make sure no other run uses it",
                                       self.workdir, e)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
