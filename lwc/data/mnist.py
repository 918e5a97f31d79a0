"""MNIST as NumPy arrays, from TFDS (the default) or from classic IDX files (offline).

Both sources give the same arrays:
  images: float32, shape (N, 28, 28, 1), pixel / 255 in [0, 1];
  labels: int32, shape (N,), digit 0-9;
in the order of the upstream IDX files (train N=60000, test N=10000).

`load(data_dir)` reads the IDX files when `data_dir` holds them (as `../shared/data/mnist`
does) and otherwise asks TFDS for `mnist` with that `data_dir`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from typing import Literal

import numpy as np

from lwc.errors import UserError

IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # float32 (N, 28, 28, 1) in [0, 1]
  labels: np.ndarray  # int32 (N,)

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Mnist:
  train: Split
  test: Split


def _find(data_dir: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  return None


def has_idx_files(data_dir: str | None) -> bool:
  """True when `data_dir` holds at least one MNIST IDX file (plain or .gz)."""
  if not data_dir or not os.path.isdir(data_dir):
    return False
  return any(_find(data_dir, s) for pair in IDX_STEMS.values() for s in pair)


def read_idx(path: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) holding uint8 items of `item_shape`.

  Returns a uint8 array of shape (n, *item_shape). Raises UserError naming the file and what was
  expected when the file is truncated, has the wrong magic number or the wrong item shape.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f"{path}: cannot read ({e})") from None
  ndim = 1 + len(item_shape)
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise UserError(f"{path}: truncated header: {len(raw)} bytes, expected at least {header_len}")
  (got_magic,) = struct.unpack(">I", raw[:4])
  if got_magic != magic:
    raise UserError(f"{path}: magic number 0x{got_magic:08x}, expected 0x{magic:08x} "
                    f"(IDX uint8 with {ndim} dimensions)")
  dims = struct.unpack(f">{ndim}I", raw[4:header_len])
  if tuple(dims[1:]) != tuple(item_shape):
    raise UserError(f"{path}: item shape {tuple(dims[1:])}, expected {tuple(item_shape)}")
  n = dims[0]
  want = header_len + n * int(np.prod(item_shape, dtype=np.int64))
  if len(raw) != want:
    kind = "truncated" if len(raw) < want else "trailing bytes"
    raise UserError(f"{path}: {kind}: {len(raw)} bytes, expected {want} for {n} items")
  return np.frombuffer(raw, np.uint8, offset=header_len).reshape((n, *item_shape))


def _as_split(images_u8: np.ndarray, labels: np.ndarray, where: str) -> Split:
  if len(images_u8) != len(labels):
    raise UserError(f"{where}: {len(images_u8)} images but {len(labels)} labels")
  if len(labels) and int(labels.max()) >= NUM_CLASSES:
    raise UserError(f"{where}: label {int(labels.max())} out of range 0-{NUM_CLASSES - 1}")
  images = images_u8.reshape(-1, 28, 28, 1).astype(np.float32) / np.float32(255.0)
  return Split(images=images, labels=labels.astype(np.int32))


def load_idx(data_dir: str) -> Mnist:
  """Reads the four classic IDX files from `data_dir`."""
  splits = {}
  for split, (image_stem, label_stem) in IDX_STEMS.items():
    paths = []
    for stem in (image_stem, label_stem):
      path = _find(data_dir, stem)
      if path is None:
        raise UserError(f"{os.path.join(data_dir, stem)}[.gz]: missing (MNIST IDX file expected "
                        f"in --data_dir={data_dir})")
      paths.append(path)
    images = read_idx(paths[0], _IMAGE_MAGIC, (28, 28))
    labels = read_idx(paths[1], _LABEL_MAGIC, ())
    splits[split] = _as_split(images, labels, f"{paths[0]} / {paths[1]}")
  return Mnist(**splits)


def load_tfds(name: str = "mnist", data_dir: str | None = None, download: bool = True) -> Mnist:
  """Loads `name` through TFDS (downloading/preparing as TFDS does) into whole-split arrays.

  With `download=False` a dataset that is not already prepared in `data_dir` is an error at once
  (offline, TFDS's own download retries take minutes before failing).

  Examples carrying an `index` feature (as the offline `lwc_mnist` builder writes) are put back
  in IDX order; the stock `mnist` builder stores no index, so its order is TFDS's own.
  """
  from lwc.data import tfds_builders  # noqa: F401  (registers lwc_mnist; imports TF)
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not download and not builder.is_prepared():
      raise UserError(f"TFDS '{name}' is not prepared in data_dir={data_dir} and --download is "
                      "off; pass --data_dir holding the MNIST IDX files "
                      f"({', '.join(s for pair in IDX_STEMS.values() for s in pair)}, "
                      "optionally .gz)")
    builder.download_and_prepare()
    raw = tfds.as_numpy(builder.as_dataset(split=["train", "test"], batch_size=-1,
                                           shuffle_files=False))
  except UserError:
    raise
  except Exception as e:  # TFDS raises many types (network, checksum, manual_dir).
    raise UserError(f"TFDS could not load '{name}' (data_dir={data_dir}): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                    "Offline, pass --data_dir holding the MNIST IDX files.") from None
  splits = {}
  for split, examples in zip(("train", "test"), raw):
    order = np.argsort(examples["index"]) if "index" in examples else slice(None)
    splits[split] = _as_split(examples["image"][order], examples["label"][order],
                              f"tfds:{name}/{split}")
  return Mnist(**splits)


def load(data_dir: str | None = None,
         source: Literal["auto", "idx", "tfds"] = "auto",
         tfds_name: str = "mnist", download: bool = True) -> Mnist:
  """MNIST from IDX files when `data_dir` holds them (or source='idx'), else from TFDS."""
  if source not in ("auto", "idx", "tfds"):
    raise UserError(f"unknown MNIST source '{source}', expected auto, idx or tfds")
  if data_dir is not None and source != "tfds" and not os.path.isdir(data_dir):
    raise UserError(f"--data_dir={data_dir}: no such directory")
  if source == "idx" or (source == "auto" and has_idx_files(data_dir)):
    if data_dir is None:
      raise UserError("source='idx' needs --data_dir naming a folder of MNIST IDX files")
    return load_idx(data_dir)
  return load_tfds(tfds_name, data_dir, download)
