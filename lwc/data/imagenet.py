"""ImageNet (ILSVRC-2012) through TFDS, with Caffe's AlexNet/VGG augmentation, sharded per process.

`ImageNet(data_dir=None, image_size=227, resize_size=256, mean=IMAGENET_MEAN_RGB, download=True,
tfds_name="imagenet2012", manual_dir=None, ...)` reads the TFDS `imagenet2012` dataset (prepared in
`data_dir`; to prepare it TFDS wants ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
`manual_dir`, default `<data_dir>/downloads/manual`) and knows `num_train`, `num_eval`,
`image_shape` (image_size, image_size, 3) and `num_classes`. Any TFDS dataset with an encoded
`image` (H, W, 3) and an integer `label` works the same (`train_split`/`eval_split` name its
splits; tests use `tfds.testing.mock_data` and a tiny real one). AlexNet: image_size=227, VGG: 224.

Preprocessing, as Caffe's bvlc_alexnet / VGG data layers:
  every image is resized (bilinear, like OpenCV's INTER_LINEAR) to `resize_size` x `resize_size`
  and rounded to uint8 values, as Caffe's LMDB stores it; then
  train: a uniformly random `image_size` crop (offsets 0..resize_size - image_size inclusive) and
    a horizontal mirror with probability 1/2;
  eval: the centre crop (offset (resize_size - image_size) // 2);
  then the per-channel `mean` (0-255 scale, RGB) is subtracted: float32 (H, W, 3), no scaling.

Batches (NumPy, per process; b = global_batch // process_count is the local batch):
  `train_batches(seed, epoch, global_batch, start_batch=0, steps_per_chunk=1)` yields
    (images float32 (K, b, H, W, 3), labels int32 (K, b)) chunks of K = steps_per_chunk steps;
    the last chunk of an epoch holds fewer steps when K does not divide what is left.
  `eval_batches(global_batch)` yields (images float32 (b, H, W, 3), labels int32 (b,),
    valid bool (b,)); padding examples are zeros with label 0 and valid False.

Multi-host invariants (process p of P, defaults jax.process_index() / jax.process_count()):
  * Each process reads its own `tfds.even_splits(split, P)[p]`: the shards are disjoint and their
    union is the split (the first n % P shards hold one example more).
  * Train: every process yields `steps_per_epoch(global_batch)` = (n // P) // b steps per epoch, so
    all processes step together; a process's few remaining examples are dropped, different ones
    each epoch. The order and the augmentation depend only on (seed, epoch, p, P): files and
    examples are shuffled with seeds derived from them, tf.data runs deterministically, and each
    example's crop and mirror come from a stateless RNG keyed by its position in the epoch, so
    `start_batch=k` (tf.data `skip` before decoding) yields exactly batches k.. of the epoch.
  * Eval: every process yields ceil(ceil(n / P) / b) batches; over all processes every example
    appears exactly once with valid True, so summed `top_k_errors` give exact error rates.

`prefetch_to_device(batches, size, sharding)` turns these per-process arrays into global
`jax.Array`s (`jax.make_array_from_process_local_data`) and keeps `size` of them in flight;
`top_k_errors(logits, labels, ks, valid)` counts top-k mistakes with Caffe's Accuracy-layer rule.

TensorFlow is imported on first use of `ImageNet` only and kept off every GPU.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwc.errors import UserError

IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@functools.lru_cache(maxsize=1)
def _tf():
  """(tensorflow, tensorflow_datasets), imported once with TF hidden from every GPU."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  # TF only feeds data: keep it off every accelerator so JAX owns their memory.
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds
  return tf, tfds


def shard_sizes(num_examples: int, process_count: int) -> list[int]:
  """Sizes of `tfds.even_splits(split, process_count)`: the first n % P shards get one more."""
  base, extra = divmod(num_examples, process_count)
  return [base + (1 if i < extra else 0) for i in range(process_count)]


def epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, augmentation key), two 31-bit ints determined by (seed, epoch, process)."""
  state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(2, np.uint32)
  return int(state[0] >> 1), int(state[1] >> 1)


def _decode_resized(encoded, resize_size: int):
  """Encoded JPEG/PNG bytes -> float32 (resize_size, resize_size, 3) holding uint8 values."""
  tf, _ = _tf()
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image = tf.image.resize(image, (resize_size, resize_size), method="bilinear", antialias=False)
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _train_example(position, encoded, label, *, key: int, resize_size: int, image_size: int,
                   mean: tuple[float, float, float]):
  """Random crop + mirror of one example; the randomness is a function of (key, position)."""
  tf, _ = _tf()
  image = _decode_resized(encoded, resize_size)
  seeds = tf.random.experimental.stateless_split(
      tf.stack([tf.constant(key, tf.int64), tf.cast(position, tf.int64)]), 3)
  top = tf.random.stateless_uniform([], seeds[0], 0, resize_size - image_size + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[1], 0, resize_size - image_size + 1, tf.int32)
  image = tf.slice(image, tf.stack([top, left, 0]), [image_size, image_size, 3])
  mirror = tf.random.stateless_uniform([], seeds[2]) < 0.5
  image = tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)
  return image - tf.constant(mean, tf.float32), tf.cast(label, tf.int32)


def _eval_example(encoded, label, *, resize_size: int, image_size: int,
                  mean: tuple[float, float, float]):
  """Centre crop of one example, with valid=True."""
  tf, _ = _tf()
  image = _decode_resized(encoded, resize_size)
  offset = (resize_size - image_size) // 2
  image = image[offset:offset + image_size, offset:offset + image_size]
  return image - tf.constant(mean, tf.float32), tf.cast(label, tf.int32), tf.constant(True)


class ImageNet:
  """The input pipeline of one process; see the module docstring for shapes and invariants.

  Construction checks the arguments, prepares the dataset when `download` (which for
  imagenet2012 needs the tar files in `manual_dir`) and fails at once with a UserError when it is
  not prepared and `download` is False.
  """

  def __init__(self, data_dir: str | None = None, image_size: int = 227, resize_size: int = 256,
               mean: Sequence[float] = IMAGENET_MEAN_RGB, download: bool = True,
               tfds_name: str = "imagenet2012", manual_dir: str | None = None,
               train_split: str = "train", eval_split: str = "validation",
               shuffle_buffer: int = 16384, process_index: int | None = None,
               process_count: int | None = None):
    if not 0 < image_size <= resize_size:
      raise UserError(f"need 0 < image_size <= resize_size, got image_size={image_size}, "
                      f"resize_size={resize_size}")
    if len(mean) != 3:
      raise UserError(f"mean must hold 3 per-channel values (RGB, 0-255), got {list(mean)}")
    if shuffle_buffer < 1:
      raise UserError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= self.process_index < self.process_count:
      raise UserError(f"process_index {self.process_index} is not in [0, {self.process_count})")
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self.mean = tuple(float(m) for m in mean)
    self.tfds_name, self.train_split, self.eval_split = tfds_name, train_split, eval_split
    self.shuffle_buffer = int(shuffle_buffer)
    self._builder = _prepared_builder(tfds_name, data_dir, manual_dir, download)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def num_classes(self) -> int:
    return int(self._builder.info.features["label"].num_classes)

  @functools.cached_property
  def num_train(self) -> int:
    return self._split_size(self.train_split)

  @functools.cached_property
  def num_eval(self) -> int:
    return self._split_size(self.eval_split)

  def _split_size(self, split: str) -> int:
    splits = self._builder.info.splits
    if split in splits and splits[split].num_examples:
      return int(splits[split].num_examples)
    # Splits unknown to the info (tfds.testing.mock_data): the dataset's own cardinality.
    n = int(self._builder.as_dataset(split=split).cardinality())
    if n < 0:
      raise UserError(f"TFDS '{self.tfds_name}': the size of split '{split}' is unknown")
    return n

  def local_batch(self, global_batch: int) -> int:
    """global_batch // process_count; a UserError unless it divides evenly and is positive."""
    if global_batch < 1 or global_batch % self.process_count:
      raise UserError(f"global batch {global_batch} is not a positive multiple of the "
                      f"{self.process_count} processes it is split over")
    return global_batch // self.process_count

  def steps_per_epoch(self, global_batch: int) -> int:
    """Steps every process makes per epoch: (num_train // P) // local batch."""
    return (self.num_train // self.process_count) // self.local_batch(global_batch)

  def num_eval_batches(self, global_batch: int) -> int:
    """Batches every process yields in `eval_batches`: ceil(largest shard / local batch)."""
    largest = shard_sizes(self.num_eval, self.process_count)[0]
    return -(-largest // self.local_batch(global_batch))

  def _read(self, split: str, shuffle_seed: int | None):
    """This process's shard of `split`: (image bytes, label) pairs, files shuffled if seeded."""
    _, tfds = _tf()
    shard = tfds.even_splits(split, self.process_count)[self.process_index]
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=_options(),
                                  try_autocache=False, shuffle_reshuffle_each_iteration=False)
    ds = self._builder.as_dataset(split=shard, shuffle_files=shuffle_seed is not None,
                                  decoders={"image": tfds.decode.SkipDecoding()},
                                  read_config=read_config)
    return ds.map(lambda ex: (ex["image"], ex["label"]))

  def train_dataset(self, seed: int, epoch: int, global_batch: int, start_batch: int = 0,
                    steps_per_chunk: int = 1):
    """The tf.data pipeline behind `train_batches` (same arguments)."""
    tf, _ = _tf()
    b = self.local_batch(global_batch)
    steps = self.steps_per_epoch(global_batch)
    if steps < 1:
      raise UserError(f"global batch {global_batch} exceeds the {self.num_train} training "
                      f"examples shared by {self.process_count} processes")
    if not 0 <= start_batch <= steps:
      raise UserError(f"start_batch {start_batch} is not in [0, {steps}] (steps per epoch)")
    if steps_per_chunk < 1:
      raise UserError(f"steps_per_chunk must be >= 1, got {steps_per_chunk}")
    if seed < 0 or epoch < 0:
      raise UserError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    shuffle_seed, key = epoch_seeds(seed, epoch, self.process_index)
    ds = self._read(self.train_split, shuffle_seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * b).enumerate().skip(start_batch * b)
    augment = functools.partial(_train_example, key=key, resize_size=self.resize_size,
                                image_size=self.image_size, mean=self.mean)
    ds = ds.map(lambda i, ex: augment(i, *ex), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(b, drop_remainder=True).batch(steps_per_chunk)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def train_batches(self, seed: int, epoch: int, global_batch: int, start_batch: int = 0,
                    steps_per_chunk: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches start_batch.. of `epoch`: (images (K, b, H, W, 3) float32, labels (K, b) int32)."""
    _, tfds = _tf()
    return iter(tfds.as_numpy(self.train_dataset(seed, epoch, global_batch, start_batch,
                                                 steps_per_chunk)))

  def eval_dataset(self, global_batch: int):
    """The tf.data pipeline behind `eval_batches` (same argument)."""
    tf, _ = _tf()
    b = self.local_batch(global_batch)
    size = shard_sizes(self.num_eval, self.process_count)[self.process_index]
    padding = self.num_eval_batches(global_batch) * b - size
    prepare = functools.partial(_eval_example, resize_size=self.resize_size,
                                image_size=self.image_size, mean=self.mean)
    ds = self._read(self.eval_split, None).take(size)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    blank = (tf.zeros(self.image_shape, tf.float32), tf.constant(0, tf.int32),
             tf.constant(False))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    return ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def eval_batches(self, global_batch: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's part of the eval split: (images (b, H, W, 3), labels (b,), valid (b,))."""
    _, tfds = _tf()
    return iter(tfds.as_numpy(self.eval_dataset(global_batch)))


def _options():
  tf, _ = _tf()
  options = tf.data.Options()
  options.deterministic = True
  return options


def _prepared_builder(name: str, data_dir: str | None, manual_dir: str | None, download: bool):
  """The TFDS builder of `name`, prepared (downloading/extracting when `download`)."""
  _, tfds = _tf()
  where = f"data_dir={data_dir}" if data_dir else "TFDS's default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001  (unknown name, bad folder, ...)
    raise UserError(f"TFDS has no dataset '{name}' ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if builder.is_prepared():
    return builder
  if not download:
    raise UserError(f"TFDS '{name}' is not prepared in {where} and --download is off; prepare "
                    f"it once with --download and the ILSVRC-2012 tars ({', '.join(MANUAL_FILES)})"
                    " in manual_dir")
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # noqa: BLE001  (TFDS: missing manual files, network, checksums)
    first = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"TFDS could not prepare '{name}' in {where}: {type(e).__name__}: {first} "
                    f"(imagenet2012 needs {', '.join(MANUAL_FILES)} in manual_dir="
                    f"{manual_dir or '<data_dir>/downloads/manual'})") from None
  return builder


def top_k_errors(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5),
                 valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Counts of top-k mistakes, as sums so that batches and processes add up.

  Args:
    logits: (B, classes) float.
    labels: (B,) int in [0, classes).
    ks: the k's to count.
    valid: (B,) bool, False for padding examples; None means all valid.

  Returns:
    {"top{k}": int32 number of valid examples whose label is not among the k best classes,
     "count": int32 number of valid examples}. As Caffe's Accuracy layer, an example is right
    at k when fewer than k classes score strictly higher than its label (ties favour the label).
  """
  true_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
  rank = jnp.sum(logits > true_logit, axis=-1)
  valid = jnp.ones(labels.shape, bool) if valid is None else valid.astype(bool)
  out = {f"top{k}": jnp.sum((rank >= k) & valid, dtype=jnp.int32) for k in ks}
  out["count"] = jnp.sum(valid, dtype=jnp.int32)
  return out


def error_rates(totals: dict[str, Any]) -> dict[str, float]:
  """{"top{k}_error": top{k} / count} from summed `top_k_errors` outputs."""
  count = int(totals["count"])
  if count == 0:
    raise UserError("no valid examples were evaluated")
  return {f"{key}_error": int(value) / count for key, value in totals.items() if key != "count"}


def prefetch_to_device(batches: Iterable[Any], size: int, sharding: Any) -> Iterator[Any]:
  """Per-process NumPy batches -> global jax.Arrays, with `size` batches transferred ahead.

  Args:
    batches: pytrees of per-process arrays (e.g. `train_batches` chunks); process p holds its
      slice of the global batch along the sharded axes.
    size: how many batches stay on their way to the devices while the consumer works on the one
      handed out (>= 1).
    sharding: a `jax.sharding.Sharding` for every leaf, or a pytree prefix of the batch of them
      (e.g. NamedSharding(mesh, P(None, "data")) for (K, b, ...) chunks, P("data") for eval).

  Yields:
    The batches as global arrays (`jax.make_array_from_process_local_data`), in order.
  """
  if size < 1:
    raise UserError(f"prefetch size must be >= 1, got {size}")

  def put(batch):
    if isinstance(sharding, jax.sharding.Sharding):
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    return jax.tree.map(
        lambda s, part: jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(s, x), part), sharding, batch)

  iterator = iter(batches)
  queue = collections.deque(put(b) for b in itertools.islice(iterator, size))
  while queue:
    batch = queue.popleft()
    queue.extend(put(b) for b in itertools.islice(iterator, 1))  # refill before handing out
    yield batch
