"""lwc.data.load: datasets by name from TFDS (mocked or a tiny local builder, all offline), from a
folder of MNIST-format IDX files, or from a .npz file; every check on read; the validation split."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

import lwc.data
from lwc.data import sources
from lwc.errors import UserError


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as e:
    fn(*args, **kwargs)
  return str(e.value)


# ----------------------------------------------------------------------------- TFDS, mocked

@pytest.fixture(scope="module")
def tfds():
  from lwc.data import tfds_builders  # noqa: F401  (imports TF with the GPUs hidden)
  import tensorflow_datasets
  return tensorflow_datasets


@pytest.mark.parametrize("name,shape", [("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mocked(tfds, tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=12):
    data = lwc.data.load(name, str(tmp_path), validation=4, validation_seed=3)
    builder = tfds.builder(name, data_dir=str(tmp_path))
    raw = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False).batch(100)))[0]
  assert data.name == name
  assert data.source == f"tfds:{name} (data_dir={tmp_path})"
  assert data.num_classes == 10 and data.image_shape == shape
  assert [len(s) for s in data.splits().values()] == [8, 4, 12]
  for split in data.splits().values():
    assert split.images.dtype == np.float32 and split.images.shape[1:] == shape
    assert split.labels.dtype == np.int32 and split.labels.shape == (len(split),)
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert 0 <= split.labels.min() and split.labels.max() < 10
  # uint8 pixels scaled by 1/255, in TFDS's order.
  np.testing.assert_array_equal(data.test.images, raw["image"].astype(np.float32) / 255)
  np.testing.assert_array_equal(data.test.labels, raw["label"])
  # The mock yields the same examples for every split: train + validation is the test split.
  merged = np.zeros_like(data.test.images)
  train_idx, val_idx = _carved_indices(12, 4, 3)
  merged[train_idx], merged[val_idx] = data.train.images, data.validation.images
  np.testing.assert_array_equal(merged, data.test.images)


def test_tfds_not_image_classification(tfds, tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    message = _error(lwc.data.load, "imdb_reviews", str(tmp_path))
    assert message == ("'imdb_reviews' is not an image-classification dataset: features are "
                       "{text: Text, label: ClassLabel}; expected an 'image' Image and a "
                       "'label' ClassLabel")
    message = _error(lwc.data.load, "binarized_mnist", str(tmp_path))
    assert message.startswith("'binarized_mnist' is not an image-classification dataset: "
                              "features are {image: Image(28, 28, 1)}")
    # Checked before anything is downloaded or prepared.
    assert _error(lwc.data.load, "imdb_reviews", str(tmp_path), download=False).startswith(
        "'imdb_reviews' is not an image-classification dataset")
    assert _error(lwc.data.load, "caltech101", str(tmp_path)) == (
        "'caltech101': images have variable shape (None, None, 3); only datasets of "
        "fixed-shape images can be read as whole arrays")


def test_tfds_unknown_name_lists_similar_names(tfds, tmp_path):
  message = _error(lwc.data.load, "cifar_10", str(tmp_path))
  assert message.startswith(f"unknown dataset 'cifar_10': not a TFDS dataset, a .npz file or a "
                            f"folder of MNIST-format IDX files (data_dir={tmp_path}); similar "
                            "TFDS names: cifar10")
  assert "fashion_mnist" in _error(lwc.data.load, "fashion-mnist", str(tmp_path))
  assert _error(lwc.data.load, "emnist/nope", str(tmp_path)) == (
      "TFDS 'emnist/nope': emnist has no config 'nope'; its configs: byclass, bymerge, balanced, "
      "letters, digits, mnist")
  assert _error(lwc.data.load, "mnist:9.9.9", str(tmp_path)) == (
      "TFDS 'mnist:9.9.9': Dataset mnist cannot be loaded at version 9.9.9, only: 3.0.1.")


def test_tfds_not_prepared_without_download_fails_fast(tfds, tmp_path):
  message = _error(lwc.data.load, "fashion_mnist", str(tmp_path / "tfds"), download=False)
  assert message == (f"TFDS 'fashion_mnist' is not prepared in data_dir={tmp_path / 'tfds'} and "
                     "--download is off; pass --data_dir holding the MNIST IDX files "
                     "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                     "t10k-labels-idx1-ubyte, optionally .gz)")


# ----------------------------------------------------------------------------- TFDS, a real builder

TINY_SPLITS = {"train": 10, "test": 4, "extra": 6}


def _tiny_pixels(split, i):
  base = {"train": 0, "test": 100, "extra": 200}[split]
  return np.full((4, 4, 3), base + i, np.uint8)


@pytest.fixture(scope="module")
def tiny_tfds(tfds, tmp_path_factory):
  """A 4x4x3, 5-class image builder with train/test/extra splits, prepared: its data_dir."""

  class LwcTestTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(4, 4, 3)),
          "label": tfds.features.ClassLabel(num_classes=5),
          "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in TINY_SPLITS}

    def _generate_examples(self, split):
      for i in range(TINY_SPLITS[split]):
        yield i, {"image": _tiny_pixels(split, i), "label": i % 5, "id": f"{split}{i}"}

  data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
  LwcTestTinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


def _by_pixel(split: lwc.data.Split) -> dict[int, int]:
  return {int(round(float(img[0, 0, 0]) * 255)): int(y)
          for img, y in zip(split.images, split.labels)}


def test_tfds_prepared_builder_and_split_names(tiny_tfds):
  data = lwc.data.load("lwc_test_tiny_images", tiny_tfds, download=False, test_split="extra",
                       validation=3)
  assert data.num_classes == 5 and data.image_shape == (4, 4, 3)
  assert [len(s) for s in data.splits().values()] == [7, 3, 6]
  got = {**_by_pixel(data.train), **_by_pixel(data.validation)}
  assert got == {i: i % 5 for i in range(10)}
  assert _by_pixel(data.test) == {200 + i: i % 5 for i in range(6)}
  np.testing.assert_array_equal(data.test.images[0], _tiny_pixels("extra", 0) / np.float32(255))
  # TFDS split syntax passes through.
  sliced = lwc.data.load("lwc_test_tiny_images", tiny_tfds, download=False,
                         train_split="train[:6]", validation=2)
  assert len(sliced.train) + len(sliced.validation) == 6 and len(sliced.test) == 4
  message = _error(lwc.data.load, "lwc_test_tiny_images", tiny_tfds, download=False,
                   test_split="validation")
  assert message.startswith("TFDS 'lwc_test_tiny_images' has no split 'validation' (for test); "
                            "its splits: "), message
  assert sorted(message.split("its splits: ")[1].split(", ")) == ["extra", "test", "train"]
  assert _error(lwc.data.load, "lwc_test_tiny_images", tiny_tfds, download=False,
                test_split="test[:0]", validation=1) == (
                    "TFDS could not read split 'test[:0]' of 'lwc_test_tiny_images' "
                    f"(data_dir={tiny_tfds}): ValueError: Instruction [] corresponds to no data!")
  assert _error(lwc.data.load, "lwc_test_tiny_images", tiny_tfds, download=False,
                test_split="test[:x]").startswith(
                    "TFDS could not read split 'test[:x]' of 'lwc_test_tiny_images' (data_dir=")


# ----------------------------------------------------------------------------- IDX folders

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(folder, n_train=6, n_test=3, seed=0, gz=True):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    arrays[split] = (images, labels)
    for stem, magic, a in zip(IDX_FILES[split], (0x803, 0x801), (images, labels)):
      raw = struct.pack(f">I{a.ndim}I", magic, *a.shape) + a.tobytes()
      opener, path = (gzip.open, stem + ".gz") if gz else (open, stem)
      with opener(os.path.join(folder, path), "wb") as f:
        f.write(raw)
  return str(folder), arrays


def test_idx_folder_under_another_name(tmp_path):
  folder, arrays = write_idx(tmp_path / "fashion")
  data = lwc.data.load("fashion_mnist", folder, validation=2, download=False)
  assert data.name == "fashion_mnist" and data.source == f"idx:{folder}"
  assert data.num_classes == 10 and data.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(data.test.images[..., 0], arrays["test"][0] / np.float32(255))
  np.testing.assert_array_equal(data.test.labels, arrays["test"][1])
  train_idx, val_idx = _carved_indices(6, 2, 0)
  np.testing.assert_array_equal(data.train.labels, arrays["train"][1][train_idx])
  np.testing.assert_array_equal(data.validation.labels, arrays["train"][1][val_idx])
  # Any name: the folder decides the source.
  assert lwc.data.load("kmnist", folder, validation=1).source == f"idx:{folder}"


def test_idx_folder_errors(tmp_path):
  folder, _ = write_idx(tmp_path / "empty_test", n_test=0, gz=False)
  assert _error(lwc.data.load, "kmnist", folder, validation=1) == (
      f"kmnist ({os.path.join(folder, 't10k-images-idx3-ubyte')}[.gz]): no examples")
  folder, _ = write_idx(tmp_path / "partial")
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  assert "t10k-labels-idx1-ubyte[.gz]: missing" in _error(lwc.data.load, "kmnist", folder)


# ----------------------------------------------------------------------------- .npz files

def good_arrays(n_train=8, n_test=4, shape=(5, 6), seed=0):
  rng = np.random.default_rng(seed)
  return {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
          "y_train": rng.integers(0, 3, n_train).astype(np.int64),
          "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
          "y_test": rng.integers(0, 3, n_test).astype(np.uint8)}


def save(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_by_path_as_name_or_data_dir(tmp_path):
  arrays = good_arrays()
  arrays["y_train"][0], arrays["y_test"][0] = 2, 1
  path = save(tmp_path / "digits.npz", **arrays)
  data = lwc.data.load(path, validation=3, validation_seed=1)
  assert data.name == "digits" and data.source == f"npz:{path}"
  assert data.num_classes == 3 and data.image_shape == (5, 6, 1)
  assert [len(s) for s in data.splits().values()] == [5, 3, 4]
  np.testing.assert_array_equal(data.test.images[..., 0], arrays["x_test"] / np.float32(255))
  assert data.test.labels.dtype == np.int32
  np.testing.assert_array_equal(data.test.labels, arrays["y_test"])
  train_idx, val_idx = _carved_indices(8, 3, 1)
  np.testing.assert_array_equal(data.train.images[..., 0],
                                arrays["x_train"][train_idx] / np.float32(255))
  np.testing.assert_array_equal(data.validation.labels, arrays["y_train"][val_idx])
  # The same file as data_dir, reported under the given name; or relative to data_dir.
  again = lwc.data.load("my_digits", path, validation=3, validation_seed=1)
  assert again.name == "my_digits" and again.source == f"npz:{path}"
  np.testing.assert_array_equal(again.validation.images, data.validation.images)
  rel = lwc.data.load("digits.npz", str(tmp_path), validation=3, validation_seed=1)
  assert rel.name == "digits" and rel.source == f"npz:{os.path.join(tmp_path, 'digits.npz')}"
  np.testing.assert_array_equal(rel.train.labels, data.train.labels)
  assert _error(lwc.data.load, path, validation=3, test_split="extra") == (
      f"npz:{path}: train_split='train' / test_split='extra' apply only to TFDS datasets; a .npz "
      "file or IDX folder has exactly one train and one test split")
  assert _error(lwc.data.load, "other.npz", path) == (
      f"both the dataset name (other.npz) and data_dir ({path}) name a .npz file: give the file "
      "once, as data_dir (name is then only a label) or as name")


def test_npz_float_rank4_labels_column_and_num_classes(tmp_path):
  rng = np.random.default_rng(1)
  x_train = rng.random((6, 3, 3, 2), dtype=np.float32)
  x_test = rng.random((2, 3, 3, 2)).astype(np.float64)
  path = save(tmp_path / "f.npz", x_train=x_train, y_train=np.zeros((6, 1), np.int32),
              x_test=x_test, y_test=np.array([0, 1], np.int16), num_classes=np.int64(7),
              extra=np.arange(3))
  data = lwc.data.load(path, validation=1)
  assert data.num_classes == 7 and data.image_shape == (3, 3, 2)
  np.testing.assert_array_equal(data.test.images, x_test.astype(np.float32))
  assert data.train.labels.shape == (5,) and data.test.labels.dtype == np.int32


def _spring():
  Trap.loaded = True
  return "sprung"


class Trap:
  """Unpickling an instance calls `_spring`, which sets `Trap.loaded`: proof that pickle ran."""
  loaded = False

  def __reduce__(self):
    return (_spring, ())


def _npz_error(tmp_path, **changes) -> tuple[str, str]:
  arrays = good_arrays()
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  path = save(tmp_path / "bad.npz", **arrays)
  return path, _error(lwc.data.load, path, validation=1)


def test_npz_bad_files(tmp_path):
  path, message = _npz_error(tmp_path, y_test=None)
  assert message == (f"{path}: missing array y_test (the file has: x_test, x_train, y_train; "
                     "expected x_train, y_train, x_test, y_test)")
  path, message = _npz_error(tmp_path, y_train=np.zeros(7, np.int64))
  assert message == f"{path} (x_train, y_train): 8 images but 7 labels"
  path, message = _npz_error(tmp_path, y_test=np.array([0, 1, 5, 2]), num_classes=np.int32(3))
  assert message == f"{path} (x_test, y_test): label 5 out of range 0-2 (3 classes)"
  path, message = _npz_error(tmp_path, y_train=np.array([0, 1, -1, 2, 0, 1, 2, 0]))
  assert message == f"{path} (x_train, y_train): label -1 is negative, expected class indices >= 0"
  path, message = _npz_error(tmp_path, y_train=np.zeros(8, np.float32))
  assert message == f"{path} (x_train, y_train): labels have dtype float32, expected integer " \
      "class indices"
  path, message = _npz_error(tmp_path, y_train=np.eye(3, dtype=np.int64)[np.zeros(8, int)])
  assert message == f"{path} (x_train, y_train): labels have shape (8, 3), expected (N,) " \
      "(one-hot? store class indices)"
  path, message = _npz_error(tmp_path, x_test=np.zeros((0, 5, 6), np.uint8),
                             y_test=np.zeros(0, np.int64))
  assert message == f"{path} (x_test, y_test): no examples"
  path, message = _npz_error(tmp_path, x_train=np.zeros((8, 30), np.uint8))
  assert message == (f"{path} (x_train, y_train): images have shape (8, 30) (rank 2), expected "
                     "rank 3 (N, H, W) or rank 4 (N, H, W, C)")
  path, message = _npz_error(tmp_path, x_train=np.zeros((8, 2, 5, 6, 1), np.uint8))
  assert "images have shape (8, 2, 5, 6, 1) (rank 5)" in message
  path, message = _npz_error(tmp_path, x_test=np.zeros((4, 6, 5), np.uint8))
  assert message == (f"{path} (x_train, y_train) / {path} (x_test, y_test): train images have "
                     "shape (5, 6, 1) but test images (6, 5, 1)")
  path, message = _npz_error(tmp_path, x_train=np.full((8, 5, 6), "a"))
  assert message == (f"{path} (x_train, y_train): images have dtype <U1, expected a numeric dtype "
                     "(uint8 0-255 or float in [0, 1])")
  path, message = _npz_error(tmp_path, x_train=np.full((8, 5, 6), 256, np.int32))
  assert message == (f"{path} (x_train, y_train): integer pixel values span [256, 256], expected "
                     "0-255 (or float images in [0, 1])")
  path, message = _npz_error(tmp_path, x_test=np.full((4, 5, 6), 2.5))
  assert message == (f"{path} (x_test, y_test): float pixel values span [2.5, 2.5], expected "
                     "[0, 1] (or uint8 images 0-255)")
  path, message = _npz_error(tmp_path, x_test=np.full((4, 5, 6), np.nan, np.float32))
  assert message == f"{path} (x_test, y_test): images hold NaN or infinite values"
  path, message = _npz_error(tmp_path, x_train=np.zeros((8, 3, 5, 6), np.uint8))
  assert "looks channels-first (N, C, H, W)" in message
  path, message = _npz_error(tmp_path, num_classes=np.array([3, 4]))
  assert message.startswith(f"{path}: num_classes must be a positive integer scalar")


def test_npz_pickled_object_array_is_refused(tmp_path):
  objects = np.empty(8, dtype=object)
  objects[:] = [Trap() for _ in range(8)]
  pickle.loads(pickle.dumps(Trap()))  # the trap works ...
  assert Trap.loaded
  Trap.loaded = False
  path, message = _npz_error(tmp_path, y_train=objects)
  assert message == (f"{path}: array 'y_train' holds Python objects (pickled); .npz files are read "
                     "with allow_pickle=False: store numeric arrays")
  assert not Trap.loaded  # ... and was never sprung by the loader


def test_npz_unreadable_or_missing(tmp_path):
  missing = str(tmp_path / "nope.npz")
  assert _error(lwc.data.load, missing) == (
      f"{missing}: no such file (a .npz with x_train, y_train, x_test, y_test expected)")
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip file at all")
  assert _error(lwc.data.load, str(junk)).startswith(f"{junk}: cannot read as .npz (")
  (tmp_path / "dir.npz").mkdir()
  assert _error(lwc.data.load, str(tmp_path / "dir.npz")).startswith(
      f"{tmp_path / 'dir.npz'}: is not a file")
  other = tmp_path / "data.bin"
  other.write_bytes(b"x")
  assert _error(lwc.data.load, "mnist", str(other)) == (
      f"data_dir={other} is a file: expected a folder (a TFDS data_dir or a folder of "
      "MNIST-format IDX files) or a .npz file")


# ----------------------------------------------------------------------------- validation

def _carved_indices(n, validation, seed):
  """What carve_validation promises: the first `validation` of a default_rng(seed) permutation,
  both parts in their original order."""
  chosen = np.sort(np.random.default_rng(seed).permutation(n)[:validation])
  return np.setdiff1d(np.arange(n), chosen), chosen


def _identity_split(n):
  return lwc.data.Split(images=np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1),
                        labels=np.arange(n, dtype=np.int32))


def test_validation_carving_is_deterministic_and_disjoint():
  full = _identity_split(100)
  train, val = lwc.data.carve_validation(full, 30, seed=5)
  again_train, again_val = lwc.data.carve_validation(full, 30, seed=5)
  np.testing.assert_array_equal(val.labels, again_val.labels)
  np.testing.assert_array_equal(train.images, again_train.images)
  assert len(train) == 70 and len(val) == 30
  assert not set(train.labels) & set(val.labels)
  assert sorted({*train.labels, *val.labels}) == list(range(100))
  assert list(train.labels) == sorted(train.labels) and list(val.labels) == sorted(val.labels)
  np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels)  # pairs kept together
  np.testing.assert_array_equal(val.labels, _carved_indices(100, 30, 5)[1])
  _, other = lwc.data.carve_validation(full, 30, seed=6)
  assert set(other.labels) != set(val.labels)
  # The default size, and a dataset too small for it.
  big_train, big_val = lwc.data.carve_validation(_identity_split(6000), lwc.data.DEFAULT_VALIDATION)
  assert len(big_val) == 5000 and len(big_train) == 1000
  assert _error(lwc.data.carve_validation, full, 100, where="tiny") == (
      "tiny: validation=100 examples leaves none of the 100 training examples to train on; "
      "choose a smaller validation size")


def test_validation_zero_needs_allow_no_validation(tmp_path):
  path = save(tmp_path / "d.npz", **good_arrays())
  message = _error(lwc.data.load, path, validation=0)
  assert message.startswith("validation=0 leaves no validation split: the test set would then "
                            "take decisions")
  assert message.endswith("pass allow_no_validation=True to accept it")
  data = lwc.data.load(path, validation=0, allow_no_validation=True)
  assert data.validation is None and len(data.train) == 8
  assert list(data.splits()) == ["train", "test"]
  assert _error(lwc.data.load, path) == (
      "d: validation=5000 examples leaves none of the 8 training examples to train on; "
      "choose a smaller validation size")
  assert _error(lwc.data.load, path, validation=-1) == "validation must be >= 0 examples, got -1"
  assert _error(lwc.data.load, path, validation=True).startswith("validation must be a whole")
  assert _error(lwc.data.load, path, validation=2, validation_seed=-3).startswith(
      "validation_seed must be a non-negative integer")
  assert _error(lwc.data.load, "", validation=2).startswith("dataset name must be")


def test_load_dataset_is_unchanged(tmp_path):
  folder, arrays = write_idx(tmp_path / "m")
  train, test = lwc.data.load_dataset("mnist", folder, False)
  assert len(train) == 6 and len(test) == 3
  assert sources.Split is lwc.data.Split
  assert _error(lwc.data.load_dataset, "cifar10", folder) == (
      "unknown dataset 'cifar10', expected one of: mnist")
