"""lwc.data: MNIST from IDX files (gzipped or plain), its error messages, and the TFDS builder."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest

import lwc.data
from lwc.data import mnist
from lwc.errors import UserError

# Canonical MNIST class counts, digits 0-9.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(magic, dims, payload):
  return struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(payload)


def write(path, data, gz=False):
  if gz:
    path += ".gz"
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return path


def write_idx_set(folder, train, test, gz=False):
  """Writes (images uint8 (n,28,28), labels uint8 (n,)) pairs as the four IDX files."""
  os.makedirs(folder, exist_ok=True)
  for split, (images, labels) in (("train", train), ("test", test)):
    image_stem, label_stem = STEMS[split]
    write(os.path.join(folder, image_stem),
          idx_bytes(IMAGES_MAGIC, images.shape, images.astype(np.uint8).tobytes()), gz)
    write(os.path.join(folder, label_stem),
          idx_bytes(LABELS_MAGIC, labels.shape, labels.astype(np.uint8).tobytes()), gz)
  return str(folder)


def small_set(n_train=5, n_test=3, seed=0):
  rng = np.random.default_rng(seed)
  return ((rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
           rng.integers(0, 10, n_train, dtype=np.uint8)),
          (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
           rng.integers(0, 10, n_test, dtype=np.uint8)))


@pytest.fixture(scope="module")
def full_mnist(mnist_dir):
  return mnist.load_idx(mnist_dir)


def test_load_idx_full_mnist(full_mnist):
  for split, n, counts in ((full_mnist.train, 60000, TRAIN_COUNTS),
                           (full_mnist.test, 10000, TEST_COUNTS)):
    assert split.images.shape == (n, 28, 28, 1)
    assert split.images.dtype == np.float32
    assert split.labels.shape == (n,)
    assert split.labels.dtype == np.int32
    assert len(split) == n
    assert split.images.min() == 0.0 and split.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), counts)
  # Pixel values are k / 255 exactly as float32 computes it.
  values = np.unique(full_mnist.test.images)
  assert len(values) <= 256
  np.testing.assert_array_equal(
      values, np.unique(np.rint(values * 255).astype(np.uint8)).astype(np.float32) / 255)
  # First labels of the upstream files, a check on the order.
  np.testing.assert_array_equal(full_mnist.train.labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
  np.testing.assert_array_equal(full_mnist.test.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])


def test_load_and_load_dataset_read_the_idx_files(mnist_dir, full_mnist):
  data = mnist.load(mnist_dir)  # source='auto' finds the IDX files
  np.testing.assert_array_equal(data.test.images, full_mnist.test.images)
  train, test = lwc.data.load_dataset("mnist", mnist_dir)
  np.testing.assert_array_equal(train.labels, full_mnist.train.labels)
  np.testing.assert_array_equal(test.images, full_mnist.test.images)
  assert mnist.has_idx_files(mnist_dir)


def test_plain_idx_files_read_identically(mnist_dir, full_mnist, tmp_path):
  for name in os.listdir(mnist_dir):
    assert name.endswith(".gz")
    with gzip.open(os.path.join(mnist_dir, name), "rb") as src, \
        open(tmp_path / name[:-3], "wb") as dst:
      shutil.copyfileobj(src, dst)
  plain = mnist.load_idx(str(tmp_path))
  for split in ("train", "test"):
    a, b = getattr(plain, split), getattr(full_mnist, split)
    assert a.images.dtype == b.images.dtype and a.labels.dtype == b.labels.dtype
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("gz", [False, True])
def test_small_set_roundtrip(tmp_path, gz):
  train, test = small_set()
  data = mnist.load_idx(write_idx_set(tmp_path, train, test, gz=gz))
  np.testing.assert_array_equal(data.train.images[..., 0], train[0].astype(np.float32) / 255)
  np.testing.assert_array_equal(data.train.labels, train[1].astype(np.int32))
  np.testing.assert_array_equal(data.test.images[..., 0], test[0].astype(np.float32) / 255)
  np.testing.assert_array_equal(data.test.labels, test[1].astype(np.int32))


def _error(fn, *args):
  with pytest.raises(UserError) as e:
    fn(*args)
  return str(e.value)


def test_missing_file(tmp_path):
  folder = write_idx_set(tmp_path, *small_set())
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte"))
  message = _error(mnist.load_idx, folder)
  assert message == (f"{os.path.join(folder, 't10k-labels-idx1-ubyte')}[.gz]: missing "
                     f"(MNIST IDX file expected in --data_dir={folder})")


def test_truncated_images_file(tmp_path):
  folder = write_idx_set(tmp_path, *small_set())
  path = os.path.join(folder, "train-images-idx3-ubyte")
  with open(path, "rb") as f:
    raw = f.read()
  write(path, raw[:-100])
  assert _error(mnist.load_idx, folder) == (
      f"{path}: truncated: {16 + 5 * 784 - 100} bytes, expected {16 + 5 * 784} for 5 items")
  write(path, raw[:10])
  assert _error(mnist.load_idx, folder) == (
      f"{path}: truncated header: 10 bytes, expected at least 16")


def test_truncated_gzip_stream(tmp_path):
  folder = write_idx_set(tmp_path, *small_set(), gz=True)
  path = os.path.join(folder, "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    raw = f.read()
  write(path, raw[: len(raw) // 2])
  message = _error(mnist.load_idx, folder)
  assert message.startswith(f"{path}: cannot read (")


def test_corrupt_gzip_stream(tmp_path):
  train, test = small_set()
  folder = write_idx_set(tmp_path, train, test)
  os.remove(os.path.join(folder, "train-images-idx3-ubyte"))
  data = gzip.compress(idx_bytes(IMAGES_MAGIC, train[0].shape, train[0].tobytes()), mtime=0)
  # Byte 10 opens the deflate stream (10-byte header, no file name): 0xff = final block of the
  # reserved type 3, "invalid block type".
  path = write(os.path.join(folder, "train-images-idx3-ubyte.gz"), data[:10] + b"\xff" + data[11:])
  message = _error(mnist.load_idx, folder)
  assert message.startswith(f"{path}: cannot read (")


def test_wrong_magic(tmp_path):
  train, test = small_set()
  folder = write_idx_set(tmp_path, train, test)
  path = os.path.join(folder, "train-labels-idx1-ubyte")
  write(path, idx_bytes(IMAGES_MAGIC, train[1].shape, train[1].tobytes()))
  assert _error(mnist.load_idx, folder) == (
      f"{path}: magic number 0x00000803, expected 0x00000801 (IDX uint8 with 1 dimensions)")


def test_wrong_item_shape(tmp_path):
  train, test = small_set()
  folder = write_idx_set(tmp_path, train, test)
  path = os.path.join(folder, "t10k-images-idx3-ubyte")
  write(path, idx_bytes(IMAGES_MAGIC, (3, 32, 32), np.zeros(3 * 32 * 32, np.uint8).tobytes()))
  assert _error(mnist.load_idx, folder) == f"{path}: item shape (32, 32), expected (28, 28)"


def test_trailing_bytes(tmp_path):
  train, test = small_set()
  folder = write_idx_set(tmp_path, train, test)
  path = os.path.join(folder, "t10k-labels-idx1-ubyte")
  write(path, idx_bytes(LABELS_MAGIC, (3,), test[1].tobytes()) + b"\x00\x01")
  assert _error(mnist.load_idx, folder) == (
      f"{path}: trailing bytes: {8 + 3 + 2} bytes, expected {8 + 3} for 3 items")


def test_label_count_differs_from_image_count(tmp_path):
  train, test = small_set()
  folder = write_idx_set(tmp_path, train, test)
  labels_path = os.path.join(folder, "train-labels-idx1-ubyte")
  write(labels_path, idx_bytes(LABELS_MAGIC, (4,), train[1][:4].tobytes()))
  images_path = os.path.join(folder, "train-images-idx3-ubyte")
  assert _error(mnist.load_idx, folder) == (
      f"{images_path} / {labels_path}: 5 images but 4 labels")


def test_label_out_of_range(tmp_path):
  train, test = small_set()
  labels = test[1].copy()
  labels[1] = 10
  folder = write_idx_set(tmp_path, train, (test[0], labels))
  message = _error(mnist.load_idx, folder)
  assert "t10k-labels-idx1-ubyte" in message
  assert message.endswith(": label 10 out of range 0-9")


def test_data_dir_does_not_exist(tmp_path):
  missing = str(tmp_path / "no_such_dir")
  expected = f"--data_dir={missing}: no such directory"
  assert _error(mnist.load, missing) == expected
  assert _error(mnist.load, missing, "idx") == expected
  assert _error(lwc.data.load_dataset, "mnist", missing) == expected
  assert not mnist.has_idx_files(missing)


def test_unknown_dataset_and_source(tmp_path):
  assert _error(lwc.data.load_dataset, "cifar10", str(tmp_path)) == (
      "unknown dataset 'cifar10', expected one of: mnist")
  assert _error(mnist.load, str(tmp_path), "csv") == (
      "unknown MNIST source 'csv', expected auto, idx or tfds")


def test_idx_source_needs_data_dir():
  assert _error(mnist.load, None, "idx") == (
      "source='idx' needs --data_dir naming a folder of MNIST IDX files")


@pytest.fixture(scope="module")
def tfds_prepared(full_mnist, tmp_path_factory):
  """The lwc_mnist TFDS builder prepared from a 200/100-example IDX set: (manual_dir, data_dir)."""
  import tensorflow_datasets as tfds

  from lwc.data import tfds_builders

  def to_u8(split, n):
    images = np.rint(split.images[:n, ..., 0] * 255).astype(np.uint8)
    return images, split.labels[:n].astype(np.uint8)

  root = tmp_path_factory.mktemp("tfds")
  manual_dir = write_idx_set(root / "manual", to_u8(full_mnist.train, 200),
                             to_u8(full_mnist.test, 100), gz=True)
  data_dir = str(root / "data")
  builder = tfds_builders.LwcMnist(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return manual_dir, data_dir


def test_tfds_builder_gives_the_idx_arrays(tfds_prepared, full_mnist):
  manual_dir, data_dir = tfds_prepared
  from_idx = mnist.load_idx(manual_dir)
  from_tfds = mnist.load_tfds("lwc_mnist", data_dir)
  for split, n in (("train", 200), ("test", 100)):
    a, b = getattr(from_tfds, split), getattr(from_idx, split)
    assert len(a) == n
    assert a.images.dtype == b.images.dtype == np.float32
    assert a.labels.dtype == b.labels.dtype == np.int32
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    # ... which are the first n examples of real MNIST, in the upstream order.
    np.testing.assert_array_equal(a.images, getattr(full_mnist, split).images[:n])
    np.testing.assert_array_equal(a.labels, getattr(full_mnist, split).labels[:n])
  # load(source='tfds') goes the same way.
  again = mnist.load(data_dir, source="tfds", tfds_name="lwc_mnist")
  np.testing.assert_array_equal(again.test.images, from_idx.test.images)


def test_tfds_unknown_name_is_user_error(tmp_path):
  message = _error(mnist.load_tfds, "no_such_dataset_lwc", str(tmp_path))
  assert message.startswith(f"TFDS could not load 'no_such_dataset_lwc' (data_dir={tmp_path}): ")
  assert message.endswith("Offline, pass --data_dir holding the MNIST IDX files.")
