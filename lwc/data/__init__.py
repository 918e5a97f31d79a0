"""Input pipelines: `load_dataset(name, data_dir)` gives whole splits as NumPy arrays."""

from __future__ import annotations

from lwc.errors import UserError

DATASETS = ("mnist",)


def load_dataset(name: str, data_dir: str | None = None, download: bool = True):
  """(train, test) `lwc.data.mnist.Split`s of dataset `name` (see `lwc.data.mnist.load`)."""
  if name == "mnist":
    from lwc.data import mnist
    data = mnist.load(data_dir, download=download)
    return data.train, data.test
  raise UserError(f"unknown dataset '{name}', expected one of: {', '.join(DATASETS)}")
