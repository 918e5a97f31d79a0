"""The one exception type that entry points turn into a one-line message and a non-zero exit."""


class UserError(ValueError):
  """Bad input from the user: a flag value, a data file, a workdir. The message is the whole story."""


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
