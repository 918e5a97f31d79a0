"""Input pipelines.

`load(name, data_dir, ...)` (`lwc.data.sources`) gives any image-classification dataset as a
`Dataset` of whole NumPy splits (train, validation carved from train, test): a TFDS name, a folder
of MNIST-format IDX files, or a `.npz` file; see `lwc.data.sources` for the rules.

`load_dataset(name, data_dir, download)` is the older MNIST-only entry point, kept as it was:
(train, test) `lwc.data.mnist.Split`s, no validation split.
"""

from __future__ import annotations

from lwc.data.mnist import Split
from lwc.data.sources import DEFAULT_VALIDATION, NPZ_KEYS, Dataset, carve_validation, load
from lwc.errors import UserError

DATASETS = ("mnist",)

__all__ = ["DATASETS", "DEFAULT_VALIDATION", "NPZ_KEYS", "Dataset", "Split", "carve_validation",
           "load", "load_dataset"]


def load_dataset(name: str, data_dir: str | None = None, download: bool = True):
  """(train, test) `lwc.data.mnist.Split`s of dataset `name` (see `lwc.data.mnist.load`)."""
  if name == "mnist":
    from lwc.data import mnist
    data = mnist.load(data_dir, download=download)
    return data.train, data.test
  raise UserError(f"unknown dataset '{name}', expected one of: {', '.join(DATASETS)}")
