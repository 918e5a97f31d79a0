"""lwc.data.imagenet: augmentation, determinism, resume, per-process shards, padded eval, top-k.

`tfds.testing.mock_data` (policy USE_CODE: no imagenet2012 metadata is needed offline) checks the
real `imagenet2012` builder end to end, but mocks every split (sub-split or not) with the same
examples and ignores read configs, so sharding and ordering are tested on `lwc_test_imagenet`,
a tiny real TFDS dataset defined here: 32x32 PNGs whose red/green channels code the pixel row and
column (8 * row, 8 * col), blue the example index, and label = the example index.
"""

import numpy as np
import pytest

from lwc.data import imagenet
from lwc.errors import UserError

tf, tfds = imagenet._tf()

N_TRAIN, N_EVAL, SIDE = 200, 77, 32
SMALL = {"image_size": 24, "resize_size": SIDE, "tfds_name": "lwc_test_imagenet",
         "shuffle_buffer": 64}
MEAN = np.asarray(imagenet.IMAGENET_MEAN_RGB, np.float32)


def coded_image(index: int) -> np.ndarray:
  rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
  return np.stack([8 * rows, 8 * cols, np.full_like(rows, index % 256)], -1).astype(np.uint8)


class LwcTestImagenet(tfds.core.GeneratorBasedBuilder):
  """Position-coded images with the features of imagenet2012 that the pipeline reads."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=1000),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(N_TRAIN), "validation": self._generate_examples(N_EVAL)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": coded_image(i), "label": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("lwc_test_imagenet", data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="module")
def small(data_dir):
  return imagenet.ImageNet(data_dir, download=False, **SMALL)


def all_train(data, seed=0, epoch=0, global_batch=16, **kwargs):
  """Every batch of one epoch as (images (S, b, H, W, 3), labels (S, b))."""
  chunks = list(data.train_batches(seed, epoch, global_batch, **kwargs))
  return (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))


def test_mock_imagenet2012_shapes_and_ranges():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = imagenet.ImageNet()  # download is a no-op under mock_data
    assert (data.num_train, data.num_eval, data.num_classes) == (6, 6, 1000)
    assert data.image_shape == (227, 227, 3)
    images, labels = next(data.train_batches(0, 0, global_batch=2, steps_per_chunk=3))
    eval_images, eval_labels, valid = next(data.eval_batches(4))
  assert images.shape == (3, 2, 227, 227, 3) and images.dtype == np.float32
  assert labels.shape == (3, 2) and labels.dtype == np.int32
  assert eval_images.shape == (4, 227, 227, 3) and eval_images.dtype == np.float32
  assert eval_labels.dtype == np.int32 and valid.dtype == bool and valid.all()
  for x in (images.reshape(-1, 227, 227, 3), eval_images):
    assert (x >= -MEAN - 1e-4).all() and (x <= 255 - MEAN + 1e-4).all()
    assert (x != -MEAN).any()  # not blank
  assert ((0 <= labels) & (labels < 1000)).all()


def test_crops_in_bounds_mirror_half_and_centre_eval(small):
  images, labels = all_train(small, epoch=0)
  images2, labels2 = all_train(small, epoch=1)
  images = np.concatenate([images, images2]).reshape(-1, 24, 24, 3) + MEAN
  labels = np.concatenate([labels, labels2]).reshape(-1)
  assert np.allclose(images, np.round(images), atol=1e-3)
  images = np.round(images).astype(int)
  rows, cols, index = images[..., 0] // 8, images[..., 1] // 8, images[..., 2]
  assert (index == labels[:, None, None] % 256).all()
  tops = rows[:, 0, 0]
  assert (rows == tops[:, None, None] + np.arange(24)[None, :, None]).all()
  mirrored = cols[:, 0, 0] > cols[:, 0, -1]
  lefts = np.where(mirrored, cols[:, 0, -1], cols[:, 0, 0])
  step = np.where(mirrored, -1, 1)[:, None]
  assert (cols[:, 0, :] == cols[:, 0, :1] + step * np.arange(24)).all()
  for offsets in (tops, lefts):  # Caffe: offsets 0..resize - crop inclusive, all of them
    assert set(offsets.tolist()) == set(range(SIDE - 24 + 1))
  assert 0.35 < mirrored.mean() < 0.65, mirrored.mean()

  eval_images, eval_labels, valid = next(small.eval_batches(8))
  expected = np.stack([coded_image(i)[4:28, 4:28] for i in eval_labels]).astype(np.float32)
  np.testing.assert_array_equal(eval_images + MEAN, expected)
  assert valid.all()


def test_order_is_a_function_of_seed_and_epoch(small):
  a_images, a_labels = all_train(small, seed=1, epoch=3)
  b_images, b_labels = all_train(small, seed=1, epoch=3)
  np.testing.assert_array_equal(a_labels, b_labels)
  np.testing.assert_array_equal(a_images, b_images)
  assert a_labels.shape == (N_TRAIN // 16, 16) == (small.steps_per_epoch(16), 16)
  assert len(set(a_labels.ravel().tolist())) == a_labels.size  # no repeats within an epoch
  for seed, epoch in ((1, 4), (2, 3)):
    _, other = all_train(small, seed=seed, epoch=epoch)
    assert not np.array_equal(other, a_labels)


def test_start_batch_skips_exactly_the_batches_done(small):
  images, labels = all_train(small, seed=5, epoch=2)
  chunks = list(small.train_batches(5, 2, 16, start_batch=5, steps_per_chunk=3))
  assert [c[0].shape[0] for c in chunks] == [3, 3, 1]  # 12 steps: 7 left after 5
  np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), labels[5:])
  np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), images[5:])
  assert list(small.train_batches(5, 2, 16, start_batch=12)) == []
  with pytest.raises(UserError, match="start_batch 13"):
    small.train_batches(5, 2, 16, start_batch=13)


def test_two_processes_read_disjoint_shards_covering_the_split(data_dir):
  procs = [imagenet.ImageNet(data_dir, download=False, process_index=p, process_count=2, **SMALL)
           for p in range(2)]
  shards = []
  for data in procs:
    assert data.steps_per_epoch(20) == 10  # 100 examples per process, local batch 10
    _, labels = all_train(data, seed=0, epoch=0, global_batch=20)
    assert labels.shape == (10, 10)
    shards.append(set(labels.ravel().tolist()))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(N_TRAIN))
  with pytest.raises(UserError, match="not a positive multiple of the 2 processes"):
    procs[0].train_batches(0, 0, 15)


@pytest.mark.parametrize("process_count,global_batch", [(1, 16), (2, 16), (3, 9)])
def test_eval_covers_every_example_once(data_dir, process_count, global_batch):
  seen, batch_counts = [], set()
  for p in range(process_count):
    data = imagenet.ImageNet(data_dir, download=False, process_index=p,
                             process_count=process_count, **SMALL)
    batches = list(data.eval_batches(global_batch))
    batch_counts.add(len(batches))
    assert len(batches) == data.num_eval_batches(global_batch)
    for images, labels, valid in batches:
      assert images.shape == (global_batch // process_count, 24, 24, 3)
      assert (images[~valid] == 0).all() and (labels[~valid] == 0).all()
      seen.extend(labels[valid].tolist())
  assert len(batch_counts) == 1  # every process steps the same number of times
  assert sorted(seen) == list(range(N_EVAL))


def numpy_top_k_errors(logits, labels, k, valid):
  """Reference without ties: the label is right when it is among the k largest logits."""
  top = np.argsort(-logits, axis=-1)[:, :k]
  wrong = ~(top == labels[:, None]).any(-1)
  return int((wrong & valid).sum())


def test_top_k_errors_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((64, 20)).astype(np.float32)
  labels = rng.integers(0, 20, 64).astype(np.int32)
  valid = rng.random(64) < 0.8
  out = imagenet.top_k_errors(logits, labels, ks=(1, 3, 5), valid=valid)
  for k in (1, 3, 5):
    assert int(out[f"top{k}"]) == numpy_top_k_errors(logits, labels, k, valid)
  assert int(out["count"]) == valid.sum()
  all_valid = imagenet.top_k_errors(logits, labels)
  assert int(all_valid["top1"]) == numpy_top_k_errors(logits, labels, 1, np.ones(64, bool))
  assert int(all_valid["count"]) == 64
  # Ties favour the label (Caffe): label 1 ties with class 0 for the best score -> top-1 right.
  tied = imagenet.top_k_errors(np.asarray([[2.0, 2.0, 1.0]]), np.asarray([1]), ks=(1,))
  assert int(tied["top1"]) == 0
  rates = imagenet.error_rates({"top1": 3, "top5": 1, "count": 4})
  assert rates == {"top1_error": 0.75, "top5_error": 0.25}


def test_prefetch_to_device_builds_global_arrays_ahead():
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  pulled = []

  def source():
    for i in range(4):
      pulled.append(i)
      yield np.full((2, 16, 3), i, np.float32), np.full((2, 16), i, np.int32)

  it = imagenet.prefetch_to_device(source(), 2, NamedSharding(mesh, P(None, "data")))
  images, labels = next(it)
  assert pulled == [0, 1, 2]  # two in flight behind the one handed out
  assert isinstance(images, jax.Array) and images.shape == (2, 16, 3)
  assert images.sharding.spec == P(None, "data") and labels.sharding.spec == P(None, "data")
  assert [int(x[1][0, 0]) for x in it] == [1, 2, 3]
  tree_sharding = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
  (x, y), = imagenet.prefetch_to_device([(np.ones((8, 2)), np.zeros(3))], 1, tree_sharding)
  assert x.sharding.spec == P("data") and y.sharding.spec == P() and y.shape == (3,)


def test_download_off_and_missing_manual_files_are_clear_errors(tmp_path):
  with pytest.raises(UserError, match="'imagenet2012' is not prepared .* --download is off"):
    imagenet.ImageNet(str(tmp_path), download=False)
  with pytest.raises(UserError, match="could not prepare 'imagenet2012'.*ILSVRC2012_img_val.tar"):
    imagenet.ImageNet(str(tmp_path), manual_dir=str(tmp_path / "none"), download=True)
  with pytest.raises(UserError, match="image_size"):
    imagenet.ImageNet(str(tmp_path), image_size=300, resize_size=256)
