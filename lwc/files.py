"""Every file lwc writes goes through here: rewritten files are replaced atomically, appended
lines are flushed and synced, and a failing write is one UserError naming the path and the cause.

A rewrite goes to `.<name>.tmp` in the same folder, is flushed and fsynced, then `os.replace`d
over the target and the folder is fsynced: a `kill -9` (or a power cut) at any moment leaves
either the old file or the new one, never an empty or half-written one. A failed write (disk
full, read-only folder, ...) removes its temporary file and leaves the old file as it was.

Fault injection (`lwc.faults.write_point`) sits between the complete, synced temporary file and
the rename: the last moment before the change becomes visible.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from typing import Any

from lwc import faults
from lwc.errors import UserError


def _cause(e: OSError) -> str:
  if isinstance(e, UnicodeError):
    return str(e)
  return e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or type(e).__name__


def os_error(path: str, e: BaseException, action: str = "cannot write") -> UserError:
  """The UserError for an OSError `e` on `path`: `cannot write PATH: No space left on device`."""
  cause = _cause(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
  return UserError(f"{action} {path}: {cause}")


def temp_path(path: str) -> str:
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.tmp")


def fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems cannot sync a folder; the rename itself is still atomic
    pass
  finally:
    os.close(fd)


def _check_target(path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"cannot write {path}: it is a directory")
  if not os.path.isdir(folder):
    what = "is not a directory" if os.path.exists(folder) else "does not exist"
    raise UserError(f"cannot write {path}: {folder} {what}")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
  """`with atomic_open(path, "w", newline="") as f:` writes `path` atomically (modes w, wb).

  Nothing replaces `path` unless the block ends without an exception."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files (mode w or wb), not '{mode}'")
  _check_target(path)
  if "b" not in mode:
    kwargs.setdefault("encoding", "utf-8")
  tmp = temp_path(path)
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise os_error(path, e) from None
    raise
  commit(tmp, path)


def commit(tmp: str, path: str) -> None:
  """Renames the complete temporary file `tmp` over `path` and syncs the folder."""
  faults.write_point(path, "replace")
  try:
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise os_error(path, e) from None
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> str:
  with atomic_open(path, "wb") as f:
    f.write(data)
  return path


def atomic_write_text(path: str, text: str) -> str:
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, **kwargs) -> str:
  return atomic_write_text(path, json.dumps(obj, **kwargs))


def savefig(fig, path: str, **kwargs) -> str:
  """`fig.savefig(path)`, atomically (the format from the extension of `path`)."""
  fmt = kwargs.pop("format", None) or os.path.splitext(path)[1].lstrip(".") or "png"
  buffer = io.BytesIO()
  fig.savefig(buffer, format=fmt, **kwargs)
  return atomic_write_bytes(path, buffer.getvalue())


def append_line(path: str, line: str) -> None:
  """Appends one line (a newline is added) and syncs it. A kill mid-line leaves a torn last
  line, which readers of lwc's line files skip."""
  data = (line + "\n").encode("utf-8")
  faults.write_point(path, "append", data)
  try:
    with open(path, "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise os_error(path, e) from None


def makedirs(path: str) -> str:
  """os.makedirs(path, exist_ok=True), an OSError becoming a UserError naming the path."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise os_error(path, e, "cannot create folder") from None
  return path


def read_text(path: str, what: str = "") -> str:
  """The UTF-8 text of `path`; a UserError naming it when unreadable or not UTF-8."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise os_error(path, e, f"cannot read {what}".strip()) from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"cannot read {what + ' ' if what else ''}{path}: not UTF-8 text (byte "
                    f"{e.start})") from None


def replace_dir(write, path: str) -> str:
  """Writes a folder atomically enough: `write(new)` fills `path.new`, then the old folder is
  moved to `path.old`, the new one renamed to `path`, the old one removed. `recover_dir(path)`
  (called first) undoes what a kill in between left: `path` itself is always either the old or
  the new complete folder, or (between two renames) found again in `path.old`."""
  recover_dir(path)
  new, old = path + ".new", path + ".old"
  write(new)
  faults.write_point(path, "replace")
  try:
    if os.path.exists(path):
      os.rename(path, old)
    os.rename(new, path)
  except OSError as e:
    raise os_error(path, e) from None
  fsync_dir(os.path.dirname(os.path.abspath(path)))
  shutil.rmtree(old, ignore_errors=True)
  return path


def recover_dir(path: str) -> None:
  """After a kill inside `replace_dir`: the old folder back in place if the new one never
  arrived, leftovers removed."""
  new, old = path + ".new", path + ".old"
  if os.path.isdir(old):
    if not os.path.exists(path):
      os.rename(old, path)
    else:
      shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(new):
    shutil.rmtree(new, ignore_errors=True)
