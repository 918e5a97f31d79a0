"""Image-classification datasets by name, as whole splits of NumPy arrays: `load(name, data_dir)`.

Where the examples come from (the first rule that applies):

  1. `data_dir` ends in `.npz`: that NumPy file; `name` is only the name the dataset is reported
     under (any string, e.g. `load("my_digits", "/data/digits.npz")`).
  2. `name` ends in `.npz`: the NumPy file at that path (relative paths are taken inside
     `data_dir` when one is given); the dataset is reported under the file's stem
     (`load("/data/digits.npz")` is the dataset `digits`).
  3. `data_dir` is a folder holding MNIST-format IDX files (`train-images-idx3-ubyte`,
     `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each plain or
     `.gz`, as MNIST, Fashion-MNIST and KMNIST are distributed): those files, read by
     `lwc.data.mnist.load_idx` (28x28 images, 10 classes) and reported under `name`
     (`load("fashion_mnist", "/data/fashion")`).
  4. Otherwise `name` is a TFDS name (`mnist`, `fashion_mnist`, `kmnist`, `cifar10`,
     `emnist/balanced`, `mnist:3.*.*`, ...) and `data_dir` the TFDS data_dir (None: TFDS's
     default). Its features must hold an `image` Image feature of fixed shape and a `label`
     ClassLabel; `train_split` / `test_split` name its splits (TFDS split syntax, e.g.
     `train[:10%]`, is passed through; for the other sources they must stay "train" / "test").
     `download=False` fails at once when the dataset is not already prepared in `data_dir`.
     Splits are read whole through tf.data in chunks and concatenated (not `batch_size=-1`,
     which asks for `sys.maxsize` examples, and aborts the process, when TFDS does not know the
     split's size, as under `tfds.testing.mock_data`).

An `.npz` file holds the arrays `x_train`, `y_train`, `x_test`, `y_test` and optionally a scalar
integer `num_classes` (otherwise 1 + the largest label of either split); any other array is ignored.
It is read with `allow_pickle=False`: object arrays are refused, nothing in the file is executed.

Every source is checked when read, each problem one UserError naming the file or dataset:
images of rank 3 (N, H, W; a channel axis is added) or 4 (N, H, W, C, channels last), numeric
dtype; labels integers of shape (N,) (or (N, 1)) in [0, num_classes); as many labels as images;
at least one example in each split; train and test images of the same shape.

Pixel scale: integer images (uint8 as TFDS and IDX files store them, or any integer dtype holding
0-255) are divided by 255 into float32 [0, 1]; float images must already lie in [0, 1] and are
only cast to float32. Labels become int32.

The validation split is carved out of the training split: a permutation of the training indices
seeded by `validation_seed` picks `validation` examples (5,000 by default) that training never
sees; both parts keep the source's order. `validation=0` is refused unless
`allow_no_validation=True`, since without a validation split the test set would take the
decisions (thresholds, checkpoints, tuning) and stop being a fair measure.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import zipfile
import zlib

import numpy as np

from lwc.data import mnist
from lwc.data.mnist import Split
from lwc.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DEFAULT_VALIDATION = 5000
_TFDS_CHUNK = 8192  # examples per tf.data batch when a TFDS split is read into memory


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A whole image-classification dataset in memory.

  Each split: images float32 (N, H, W, C) in [0, 1], labels int32 (N,) in [0, num_classes).
  `validation` is carved from the source's training split (None only with
  allow_no_validation=True and validation=0); `source` says where the examples came from
  (`tfds:cifar10 (data_dir=...)`, `idx:/path/folder`, `npz:/path/file.npz`).
  """

  name: str
  train: Split
  validation: Split | None
  test: Split
  num_classes: int
  image_shape: tuple[int, ...]
  source: str

  def splits(self) -> dict[str, Split]:
    """The splits present, by name: train, [validation,] test."""
    out = {"train": self.train}
    if self.validation is not None:
      out["validation"] = self.validation
    out["test"] = self.test
    return out


def load(name: str, data_dir: str | None = None, *, download: bool = True,
         train_split: str = "train", test_split: str = "test",
         validation: int = DEFAULT_VALIDATION, validation_seed: int = 0,
         allow_no_validation: bool = False) -> Dataset:
  """The dataset `name` (see the module docstring for how `name` and `data_dir` pick the source),
  with `validation` training examples set apart as the validation split."""
  if not isinstance(name, str) or not name:
    raise UserError(f"dataset name must be a non-empty string, got {name!r}")
  _check_validation_args(validation, validation_seed, allow_no_validation)
  if data_dir is not None and not isinstance(data_dir, str):
    data_dir = os.fspath(data_dir)
  if data_dir is not None and data_dir.endswith(".npz"):
    if name.endswith(".npz"):
      raise UserError(f"both the dataset name ({name}) and data_dir ({data_dir}) name a .npz "
                      "file: give the file once, as data_dir (name is then only a label) or as "
                      "name")
    raw, source = load_npz(data_dir)
  elif name.endswith(".npz"):
    path = name if data_dir is None or os.path.isabs(name) else os.path.join(data_dir, name)
    name = os.path.basename(name)[:-len(".npz")] or name
    raw, source = load_npz(path)
  elif data_dir is not None and os.path.isfile(data_dir):
    raise UserError(f"data_dir={data_dir} is a file: expected a folder (a TFDS data_dir or a "
                    "folder of MNIST-format IDX files) or a .npz file")
  elif mnist.has_idx_files(data_dir):
    raw, source = load_idx_folder(data_dir, name)
  else:
    raw, source = load_tfds(name, data_dir, download=download, train_split=train_split,
                            test_split=test_split)
  if not source.startswith("tfds:") and (train_split, test_split) != ("train", "test"):
    raise UserError(f"{source}: train_split={train_split!r} / test_split={test_split!r} apply "
                    "only to TFDS datasets; a .npz file or IDX folder has exactly one train and "
                    "one test split")
  train, test, num_classes = raw
  train, val = carve_validation(train, validation, validation_seed, allow_no_validation,
                                where=name)
  return Dataset(name=name, train=train, validation=val, test=test, num_classes=num_classes,
                 image_shape=tuple(int(d) for d in train.images.shape[1:]), source=source)


# ----------------------------------------------------------------------------- validation split

def _check_validation_args(validation, validation_seed, allow_no_validation) -> None:
  if isinstance(validation, bool) or not isinstance(validation, (int, np.integer)):
    raise UserError(f"validation must be a whole number of examples, got {validation!r}")
  if validation < 0:
    raise UserError(f"validation must be >= 0 examples, got {validation}")
  if isinstance(validation_seed, bool) or not isinstance(validation_seed, (int, np.integer)) \
      or validation_seed < 0:
    raise UserError(f"validation_seed must be a non-negative integer, got {validation_seed!r}")
  if validation == 0 and not allow_no_validation:
    raise UserError("validation=0 leaves no validation split: the test set would then take "
                    "decisions (thresholds, checkpoints, tuning) and no longer measure the result "
                    "fairly; set a validation size, or pass allow_no_validation=True to accept it")


def carve_validation(train: Split, validation: int, seed: int = 0,
                     allow_no_validation: bool = False,
                     where: str = "dataset") -> tuple[Split, Split | None]:
  """(train without the validation examples, validation): `validation` examples chosen by a
  permutation of range(len(train)) seeded by `seed`; both parts keep their order in `train`."""
  _check_validation_args(validation, seed, allow_no_validation)
  if validation == 0:
    return train, None
  n = len(train)
  if validation >= n:
    raise UserError(f"{where}: validation={validation} examples leaves none of the {n} training "
                    "examples to train on; choose a smaller validation size")
  chosen = np.random.default_rng(int(seed)).permutation(n)[:validation]
  in_val = np.zeros(n, bool)
  in_val[chosen] = True
  val_idx, train_idx = np.flatnonzero(in_val), np.flatnonzero(~in_val)
  return (Split(images=train.images[train_idx], labels=train.labels[train_idx]),
          Split(images=train.images[val_idx], labels=train.labels[val_idx]))


# ----------------------------------------------------------------------------- checks

def _images(x, where: str) -> np.ndarray:
  """float32 (N, H, W, C) in [0, 1] from a rank-3 or rank-4 numeric array (see module doc)."""
  x = np.asarray(x)
  if x.dtype.kind not in "uif":
    raise UserError(f"{where}: images have dtype {x.dtype}, expected a numeric dtype "
                    "(uint8 0-255 or float in [0, 1])")
  if x.ndim == 3:
    x = x[..., None]
  elif x.ndim != 4:
    raise UserError(f"{where}: images have shape {x.shape} (rank {x.ndim}), expected rank 3 "
                    "(N, H, W) or rank 4 (N, H, W, C)")
  if x.shape[0] == 0:
    raise UserError(f"{where}: no examples")
  if 0 in x.shape[1:]:
    raise UserError(f"{where}: images have shape {x.shape}: an empty image dimension")
  if x.shape[3] > 4 and x.shape[1] in (1, 3, 4):
    raise UserError(f"{where}: images have shape {x.shape}, which looks channels-first "
                    "(N, C, H, W); expected channels-last (N, H, W, C)")
  if x.dtype.kind in "ui":
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
      raise UserError(f"{where}: integer pixel values span [{lo}, {hi}], expected 0-255 "
                      "(or float images in [0, 1])")
    return x.astype(np.float32) / np.float32(255.0)
  x = x.astype(np.float32)
  if not np.isfinite(x).all():
    raise UserError(f"{where}: images hold NaN or infinite values")
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    raise UserError(f"{where}: float pixel values span [{lo:g}, {hi:g}], expected [0, 1] "
                    "(or uint8 images 0-255)")
  return x


def _labels(y, n_images: int, where: str) -> np.ndarray:
  y = np.asarray(y)
  if y.dtype.kind not in "ui":
    raise UserError(f"{where}: labels have dtype {y.dtype}, expected integer class indices")
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    hint = " (one-hot? store class indices)" if y.ndim == 2 else ""
    raise UserError(f"{where}: labels have shape {y.shape}, expected (N,){hint}")
  if len(y) != n_images:
    raise UserError(f"{where}: {n_images} images but {len(y)} labels")
  if len(y) and int(y.min()) < 0:
    raise UserError(f"{where}: label {int(y.min())} is negative, expected class indices >= 0")
  return y


def check_splits(train: tuple, test: tuple, where: dict[str, str],
                 num_classes: int | None = None) -> tuple[Split, Split, int]:
  """(train Split, test Split, num_classes) from (images, labels) pairs, with every check of the
  module docstring. `where[split]` names the split's file or dataset in error messages;
  num_classes None: 1 + the largest label."""
  parts = {}
  for split, (x, y) in (("train", train), ("test", test)):
    images = _images(x, where[split])
    parts[split] = (images, _labels(y, len(images), where[split]))
  if num_classes is None:
    num_classes = 1 + max(int(y.max()) for _, y in parts.values())
  for split, (_, y) in parts.items():
    if int(y.max()) >= num_classes:
      raise UserError(f"{where[split]}: label {int(y.max())} out of range 0-{num_classes - 1} "
                      f"({num_classes} classes)")
  (x_train, _), (x_test, _) = parts["train"], parts["test"]
  if x_train.shape[1:] != x_test.shape[1:]:
    raise UserError(f"{where['train']} / {where['test']}: train images have shape "
                    f"{x_train.shape[1:]} but test images {x_test.shape[1:]}")
  splits = [Split(images=x, labels=y.astype(np.int32)) for x, y in parts.values()]
  return splits[0], splits[1], int(num_classes)


# ----------------------------------------------------------------------------- .npz files

def load_npz(path: str) -> tuple[tuple[Split, Split, int], str]:
  """((train, test, num_classes), source) from the .npz file at `path` (see module doc)."""
  if not os.path.isfile(path):
    what = "is not a file" if os.path.exists(path) else "no such file"
    raise UserError(f"{path}: {what} (a .npz with {', '.join(NPZ_KEYS)} expected)")
  arrays = {}
  try:
    with np.load(path, allow_pickle=False) as f:
      keys = set(f.files)
      missing = [k for k in NPZ_KEYS if k not in keys]
      if missing:
        raise UserError(f"{path}: missing array{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} (the file has: {', '.join(sorted(keys)) or 'none'}; "
                        f"expected {', '.join(NPZ_KEYS)})")
      for key in (*NPZ_KEYS, "num_classes"):
        if key not in keys:
          continue
        try:
          arrays[key] = f[key]
        except ValueError as e:
          if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{path}: array '{key}' holds Python objects (pickled); .npz files "
                            "are read with allow_pickle=False: store numeric arrays") from None
          raise UserError(f"{path}: cannot read array '{key}' ({e})") from None
  except UserError:
    raise
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise UserError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
  num_classes = None
  if "num_classes" in arrays:
    k = arrays["num_classes"]
    if k.shape != () or k.dtype.kind not in "ui" or int(k) < 1:
      raise UserError(f"{path}: num_classes must be a positive integer scalar, got "
                      f"{k.dtype} array of shape {k.shape}")
    num_classes = int(k)
  where = {split: f"{path} (x_{split}, y_{split})" for split in ("train", "test")}
  data = check_splits((arrays["x_train"], arrays["y_train"]),
                      (arrays["x_test"], arrays["y_test"]), where, num_classes)
  return data, f"npz:{path}"


# ----------------------------------------------------------------------------- IDX folders

def load_idx_folder(data_dir: str, name: str = "mnist") -> tuple[tuple[Split, Split, int], str]:
  """((train, test, 10), source) from the four MNIST-format IDX files in `data_dir`."""
  data = mnist.load_idx(data_dir)
  where = {split: f"{name} ({os.path.join(data_dir, mnist.IDX_STEMS[split][0])}[.gz])"
           for split in ("train", "test")}
  out = check_splits((data.train.images, data.train.labels), (data.test.images, data.test.labels),
                     where, mnist.NUM_CLASSES)
  return out, f"idx:{data_dir}"


# ----------------------------------------------------------------------------- TFDS

def _similar(name: str, choices: list[str], n: int = 5) -> list[str]:
  key = name.lower().replace("-", "_")
  close = difflib.get_close_matches(key, choices, n=n, cutoff=0.6)
  close += [c for c in choices if key and key in c and c not in close]
  return close[:n]


def _tfds_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  base = re.split(r"[/:]", name, maxsplit=1)[0]
  known = sorted(tfds.list_builders(with_community_datasets=False))
  if base not in known:
    similar = _similar(base, known)
    hint = f"; similar TFDS names: {', '.join(similar)}" if similar else ""
    raise UserError(f"unknown dataset '{name}': not a TFDS dataset, a .npz file or a folder of "
                    f"MNIST-format IDX files (data_dir={data_dir}){hint}")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises ValueError/AssertionError with long multi-line texts.
    message = str(e)
    if "/" in name and "BuilderConfig" in message:
      configs = [c.name for c in getattr(tfds.builder_cls(base), "BUILDER_CONFIGS", [])]
      config = name.split("/", 1)[1].split(":")[0]
      raise UserError(f"TFDS '{name}': {base} has no config '{config}'; its configs: "
                      f"{', '.join(configs) or 'none'}") from None
    reason = re.search(r'builder_kwargs ".*?": (.+)', message)
    first = (reason.group(1) if reason else message.splitlines()[0] if message else
             type(e).__name__)
    raise UserError(f"TFDS '{name}': {first}") from None


def _feature_summary(features) -> str:
  def one(v):
    shape = tuple(getattr(v, "shape", ()) or ())
    return type(v).__name__ + (str(shape) if shape else "")
  return ", ".join(f"{k}: {one(v)}" for k, v in features.items())


def load_tfds(name: str, data_dir: str | None = None, *, download: bool = True,
              train_split: str = "train", test_split: str = "test"
              ) -> tuple[tuple[Split, Split, int], str]:
  """((train, test, num_classes), source) of TFDS dataset `name`, whole splits in memory.

  The splits are read in TFDS's file order (shuffle_files=False); a dataset with an `index`
  feature (lwc's offline `lwc_mnist` builder) is put back in that order.
  """
  from lwc.data import tfds_builders  # noqa: F401  (registers lwc_mnist; keeps TF off the GPUs)
  import tensorflow_datasets as tfds

  builder = _tfds_builder(name, data_dir)
  features = builder.info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
    raise UserError(f"'{name}' is not an image-classification dataset: features are "
                    f"{{{_feature_summary(features)}}}; expected an 'image' Image and a 'label' "
                    "ClassLabel")
  if any(d is None for d in image.shape):
    raise UserError(f"'{name}': images have variable shape {tuple(image.shape)}; only datasets of "
                    "fixed-shape images can be read as whole arrays")
  where_dir = data_dir if data_dir is not None else "TFDS's default"
  if not download and not builder.is_prepared():
    if tuple(image.shape) == (28, 28, 1):  # an MNIST-format set: its IDX files would do
      raise UserError(f"TFDS '{name}' is not prepared in data_dir={where_dir} and --download is "
                      "off; pass --data_dir holding the MNIST IDX files "
                      f"({', '.join(s for pair in mnist.IDX_STEMS.values() for s in pair)}, "
                      "optionally .gz)")
    raise UserError(f"TFDS '{name}' is not prepared in data_dir={where_dir} and --download is "
                    "off; prepare it there first, allow the download, or give a .npz file")
  try:
    builder.download_and_prepare()
  except Exception as e:  # network, checksums, manual_dir, ...: many types
    first = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"TFDS could not prepare '{name}' (data_dir={where_dir}): "
                    f"{type(e).__name__}: {first}") from None
  known = list(builder.info.splits.keys())
  keys = ["image", "label"] + (["index"] if "index" in features else [])
  pairs, where = {}, {}
  for role, split in (("train", train_split), ("test", test_split)):
    where[role] = f"tfds:{name}/{split}"
    if known and re.fullmatch(r"\w+", split) and split not in known:
      raise UserError(f"TFDS '{name}' has no split '{split}' (for {role}); its splits: "
                      f"{', '.join(known)}")
    try:
      ds = builder.as_dataset(split=split, shuffle_files=False)
      ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(_TFDS_CHUNK)
      chunks = list(tfds.as_numpy(ds))
    except Exception as e:
      first = str(e).splitlines()[0] if str(e) else ""
      raise UserError(f"TFDS could not read split '{split}' of '{name}' "
                      f"(data_dir={where_dir}): {type(e).__name__}: {first}") from None
    if not chunks:
      raise UserError(f"{where[role]}: no examples")
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
    if "index" in arrays:
      order = np.argsort(arrays["index"], kind="stable")
      arrays = {k: v[order] for k, v in arrays.items()}
    pairs[role] = (arrays["image"], arrays["label"])
  data = check_splits(pairs["train"], pairs["test"], where, int(label.num_classes))
  return data, f"tfds:{name} (data_dir={where_dir})"
