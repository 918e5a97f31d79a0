"""The one exception type that entry points turn into a one-line message and a non-zero exit,
and the one convention for every kind of bad input: `error: ...` on stderr, exit status 2, no
traceback. Flag errors (a value of the wrong type or out of bounds, an unknown flag, a flagfile
that cannot be read) follow it too: `parse_flags` replaces absl's `FATAL Flags parsing error`
and exit 1, in every absl program that imports lwc (see `_install`)."""


class UserError(ValueError):
  """Bad input from the user: a flag value, a data file, a workdir.

  The message is the whole story."""


def run_cli(argv, fn):
  """The body of a small absl `main`: refuses stray arguments, silences absl's INFO logging
  (orbax logs every file it writes there) and returns fn(); a UserError becomes `error: ...` on
  stderr and exit status 2, with no traceback."""
  import sys

  from absl import logging as absl_logging
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    return fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _flagfiles(argv) -> list[str]:
  out = []
  for i, arg in enumerate(argv[1:], 1):
    for prefix in ("--flagfile=", "-flagfile="):
      if arg.startswith(prefix):
        out.append(arg[len(prefix):])
    if arg in ("--flagfile", "-flagfile") and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def flag_error(argv, e: BaseException) -> str:
  """The one-line message for an exception of absl's flag parsing."""
  if isinstance(e, UnicodeDecodeError):
    for path in _flagfiles(argv):
      try:
        with open(path, "rb") as f:
          f.read().decode("utf-8")
      except UnicodeDecodeError as bad:
        return f"cannot read flagfile {path}: not UTF-8 text (byte {bad.start})"
      except OSError:
        continue
    return f"cannot read a flagfile: not UTF-8 text ({e})"
  if isinstance(e, OSError):
    return f"cannot read {e.filename}: {e.strerror}"
  message = " ".join(str(e).split())
  message = message.removeprefix("ERROR:: ")
  return message


def parse_flags(argv):
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`) with lwc's convention:
  any flag error is `error: ...` on stderr and exit status 2."""
  import sys

  from absl import flags
  try:
    return flags.FLAGS(argv)
  except (flags.Error, UnicodeDecodeError, OSError) as e:
    print(f"error: {flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def _install() -> None:
  """Makes `parse_flags` absl's default flag parser (in `app.run`), so that every lwc program
  (the experiments, lwc.export, the benchmarks) reports flag errors the same way."""
  try:
    from absl import app
  except ImportError:  # absl is a dependency; without it there are no flags to parse
    return
  defaults = app.run.__defaults__
  if defaults and defaults[-1] is app.parse_flags_with_usage:
    app.run.__defaults__ = (*defaults[:-1], parse_flags)


_install()
