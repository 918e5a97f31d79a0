"""An ImageNet-like TFDS dataset streamed through tf.data, as the pipeline trains and evaluates it.

Each process reads its own shard and the chunks reach the devices as global arrays, two in
flight (`lwc.data.imagenet`). The order and augmentation of (iteration, epoch) depend only on
(seed, iteration, epoch); `start` skips batches inside tf.data, so a resumed epoch continues with
the same batches. Evaluation is top-1 and top-5 over a whole split, every example counted once.

The validation split is the first `validation` examples of the training split (TFDS slicing,
`train[:N]`, evaluated with the eval preprocessing); training reads `train[N:]`. The test split
is ImageNet's `validation` (the ILSVRC labels the paper reports on) unless --test_split names
another.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lwc import config as config_lib
from lwc import stats
from lwc import train as train_lib
from lwc.errors import UserError

DEFAULT_IMAGE_SIZE = {"alexnet": 227, "vgg16": 224}
STATS_IMAGES = 256  # test images whose activations give the Act% column


def image_size(config) -> int:
  return config.image_size or DEFAULT_IMAGE_SIZE.get(config.model, 224)


class StreamedData:
  """The pipeline's view of a streamed dataset (see the module docstring)."""

  def __init__(self, parallel: train_lib.Parallel, config):
    from lwc.data import imagenet
    self.parallel, self.config = parallel, config
    self.name = config.dataset
    tfds_name = config.tfds_name or config.dataset
    if config.train_eval_examples:  # refused before any of the dataset is opened
      raise UserError("--train_eval_examples evaluates a sample held on the devices: it needs "
                      f"an in-memory dataset, not the streamed {tfds_name}")
    test_split = "validation" if config.test_split == "test" else config.test_split
    common = dict(image_size=image_size(config), resize_size=config.resize_size,
                  download=config.download, tfds_name=tfds_name)
    whole = imagenet.ImageNet(config.data_dir, train_split=config.train_split,
                              eval_split=test_split, **common)
    n = config_lib.resolved_validation(config, whole.num_train)
    if n == 0 and not (config.decide_on_test or config.refit):
      raise UserError(f"{tfds_name}: its {whole.num_train} training examples leave no "
                      "validation split at the default size; set --validation, or "
                      "--validation=0 with --decide_on_test or --refit")
    if n >= whole.num_train:
      raise UserError(f"{tfds_name}: validation={n} examples leaves none of the "
                      f"{whole.num_train} training examples to train on")
    self._sources = {"test": whole}
    self.source = whole
    if n:
      self.source = imagenet.ImageNet(config.data_dir, train_split=f"{config.train_split}[{n}:]",
                                      eval_split=test_split, **common)
      self._sources["validation"] = imagenet.ImageNet(
          config.data_dir, train_split=config.train_split,
          eval_split=f"{config.train_split}[:{n}]", **common)
    self.num_classes = whole.num_classes
    self.description = f"tfds:{tfds_name} (streamed, data_dir={config.data_dir})"
    self.num_train = self.source.num_train
    self.num_validation = n
    self.image_shape = whole.image_shape
    self.steps_per_epoch = self.source.steps_per_epoch(config.batch_size)
    if whole.num_eval == 0:
      raise UserError(f"the eval split of {tfds_name} has no examples: nothing to evaluate the "
                      "network on")
    if self.steps_per_epoch < 1:
      raise UserError(f"batch_size {config.batch_size} exceeds the {self.num_train} training "
                      "examples")
    self.per_call = config.steps_per_call or 1
    self._train_fns = functools.lru_cache(lambda smoothing: parallel.train_batches_fn(
        train_lib.smoothed_cross_entropy(smoothing)))
    self._chunk_sharding = NamedSharding(parallel.mesh, P(None, "data"))
    self._prefetch = imagenet.prefetch_to_device

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(s for s in ("validation", "test") if s in self._sources)

  def chunks(self, iteration: int, epoch: int, start: int):
    """(first step of the chunk in the epoch, (images (K, B, H, W, 3), labels (K, B)))."""
    batches = self.source.train_batches(self.config.seed * 100_003 + iteration, epoch,
                                        self.config.batch_size, start_batch=start,
                                        steps_per_chunk=self.per_call)
    first = start
    for chunk in self._prefetch(batches, 2, self._chunk_sharding):
      yield first, chunk
      first += chunk[0].shape[0]

  def train(self, state, chunk, rng, teacher=None, label_smoothing=0.0):
    """K steps on `chunk` (from `chunks`); cross-entropy on labels smoothed by `label_smoothing`."""
    return self._train_fns(label_smoothing)(state, chunk[0], chunk[1], rng, teacher=teacher)

  def evaluate(self, model_fn, params, model_state, split: str) -> dict[str, float]:
    """{'loss', 'error', 'top5_error'} over the whole `split`."""
    step = train_lib._jitted_eval_topk(model_fn)
    totals = None
    batches = self._sources[split].eval_batches(self.config.eval_batch_size)
    for images, labels, valid in self._prefetch(batches, 2, self.parallel.batch):
      out = step(params, images, labels, valid, model_state=model_state or None)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "error": int(totals["top1"]) / count,
            "top5_error": int(totals["top5"]) / count}

  def decision_set(self, n: int):
    raise UserError("target_compression needs an in-memory dataset for its sensitivity "
                    "sweeps; for ImageNet give per-layer densities (layer_densities) instead")

  def sweep_set(self, n: int):
    return self.decision_set(n)

  def recalibration_batches(self, iteration: int, count: int):
    batches = self.source.train_batches(self.config.seed * 100_003 + 7_777_777 + iteration, 0,
                                        self.config.batch_size, steps_per_chunk=1)
    for i, (images, _) in enumerate(batches):
      if i >= count:
        return
      yield jnp.asarray(images[0])

  def sample_images(self, n: int) -> np.ndarray:
    """The first n test images (inputs to trace and check a model with; not a decision)."""
    images = []
    for batch, _, valid in self._sources["test"].eval_batches(self.config.eval_batch_size):
      images.append(batch[valid])
      if sum(len(x) for x in images) >= n:
        break
    return np.concatenate(images)[:n]

  def layer_table(self, model_fn, params, masks, model_state) -> dict:
    images = self.sample_images(STATS_IMAGES)
    return stats.layer_table(model_fn, jax.device_get(params), jax.device_get(masks), images,
                             model_state=jax.device_get(model_state) or None)
