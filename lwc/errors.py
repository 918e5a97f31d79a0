"""The one exception type that entry points turn into a one-line message and a non-zero exit."""


class UserError(ValueError):
  """Bad input from the user: a flag value, a data file, a workdir. The message is the whole story."""
