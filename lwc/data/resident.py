"""A whole in-memory dataset resident on the devices, as the pipeline trains and evaluates it.

Any `lwc.data.load` source (TFDS image classification, MNIST-format IDX folder, `.npz`) goes
through here. Each step gathers its batch on device by index; batches of (iteration, epoch) come
from a permutation seeded by (seed, iteration, epoch), so the order never depends on where a run
was interrupted. The validation split is carved from the training split with `validation_seed`
(`lwc.data.carve_validation`): training never sees it, and it alone answers `decision_set`
(and `sweep_set`, unless --sweep_split=train moves the sweeps onto training images).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lwc import augmentation
from lwc import config as config_lib
from lwc import stats
from lwc import train as train_lib
from lwc.data import sources
from lwc.errors import UserError

SPLITS = ("train_sample", "validation", "test")


def _checked(dataset: sources.Dataset, config) -> sources.Dataset:
  """The dataset with its validation split carved as `config` says; UserError when a split is
  empty or the batch does not fit."""
  n = config_lib.resolved_validation(config, len(dataset.train))
  if n == 0 and not (config.decide_on_test or config.refit):
    raise UserError(f"{dataset.name}: its {len(dataset.train)} training examples leave no "
                    "validation split at the default size; set --validation, or "
                    "--validation=0 with --decide_on_test or --refit")
  train, validation = sources.carve_validation(dataset.train, n, config.validation_seed,
                                               allow_no_validation=True, where=dataset.name)
  if len(dataset.test) == 0:
    raise UserError(f"the test split of {config.data_dir or config.dataset} has no examples: "
                    "nothing to evaluate the network on")
  if config.batch_size > len(train):
    raise UserError(f"batch_size {config.batch_size} exceeds the {len(train)} training "
                    "examples")
  return sources.Dataset(dataset.name, train, validation, dataset.test, dataset.num_classes,
                         dataset.image_shape, dataset.source)


def decision_split(config, data_dir: str | None = None, download: bool = False):
  """(split name, `Split`) a run of `config` takes its decisions on, carved exactly as the run
  carved it: the validation split, or the test split when the run had --decide_on_test."""
  if config.decisions_split == "none":
    raise UserError("that run was a --refit on every training image: it kept no split to take "
                    "decisions on; sweep the run (with a validation split) that chose its "
                    "recipe")
  dataset = sources.load(config.dataset, data_dir or config.data_dir, download=download,
                         train_split=config.train_split, test_split=config.test_split,
                         validation=0, allow_no_validation=True)
  n = config_lib.resolved_validation(config, len(dataset.train))
  if n == 0:
    return "test", dataset.test
  _, validation = sources.carve_validation(dataset.train, n, config.validation_seed,
                                           allow_no_validation=True, where=dataset.name)
  return "validation", validation


class ResidentData:
  """The pipeline's view of an in-memory dataset (see the module docstring)."""

  def __init__(self, parallel: train_lib.Parallel, config, dataset: sources.Dataset):
    dataset = _checked(dataset, config)
    self.parallel, self.config, self.name = parallel, config, dataset.name
    self.description = dataset.source
    self.num_classes = dataset.num_classes
    self.num_train = len(dataset.train)
    self.num_validation = 0 if dataset.validation is None else len(dataset.validation)
    self.image_shape = tuple(dataset.image_shape)
    self.steps_per_epoch = self.num_train // config.batch_size
    self.per_call = config.steps_per_call or self.steps_per_epoch
    put = lambda x: parallel.replicate(jnp.asarray(x))
    self.images, self.labels = put(dataset.train.images), put(dataset.train.labels)
    self._eval = {"test": (put(dataset.test.images), put(dataset.test.labels))}
    if dataset.validation is not None:
      self._eval["validation"] = (put(dataset.validation.images),
                                  put(dataset.validation.labels))
    augment = augmentation.from_config(config)
    augmentation.check_shift(config.augment_shift, self.image_shape)
    self._train_fns = functools.lru_cache(lambda smoothing: parallel.train_steps_fn(
        train_lib.smoothed_cross_entropy(smoothing), augment=augment))
    self._data_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)[1]
    if config.train_eval_examples:
      self._eval["train_sample"] = self._sample(self.images, self.labels,
                                                config.train_eval_examples, salt=15_485_867)

  @property
  def splits(self) -> tuple[str, ...]:
    """The splits `evaluate` measures: ('validation', 'test'), or ('test',) without one;
    'train_sample' first with --train_eval_examples (training images, a report only)."""
    return tuple(s for s in SPLITS if s in self._eval)

  def chunks(self, iteration: int, epoch: int, start: int):
    """(first step of the chunk in the epoch, (K, B) batch indices), from step `start` on."""
    key = jax.random.fold_in(jax.random.fold_in(self._data_key, iteration), epoch)
    batches = train_lib.epoch_batches(key, self.num_train, self.config.batch_size)
    for first in range(start, len(batches), self.per_call):
      yield first, self.parallel.shard_indices(batches[first:first + self.per_call])

  def train(self, state, chunk, rng, teacher=None, label_smoothing=0.0):
    """K steps on `chunk` (from `chunks`); cross-entropy on labels smoothed by `label_smoothing`;
    each batch augmented as --augment_shift and --augment_flip say (`lwc.augmentation`)."""
    return self._train_fns(label_smoothing)(state, self.images, self.labels, chunk, rng,
                                            teacher=teacher)

  def evaluate(self, model_fn, params, model_state, split: str) -> dict[str, float]:
    """{'loss', 'error'} of the model on the whole `split` (one of `splits`)."""
    images, labels = self._eval[split]
    return self.parallel.evaluate(model_fn, params, images, labels, self.config.eval_batch_size,
                                  model_state=model_state or None)

  def layer_table(self, model_fn, params, masks, model_state) -> dict:
    """Per-layer weights, FLOPs and activation density (on the test images: a report)."""
    return stats.layer_table(model_fn, params, masks, self._eval["test"][0],
                             model_state=model_state or None)

  def decision_set(self, n: int) -> tuple[jax.Array, jax.Array]:
    """Up to n examples of the split that takes decisions (validation; test only with
    --decide_on_test), a fixed seeded choice, for sensitivity sweeps. UserError under
    --refit, which takes no decision."""
    if self.config.decisions_split == "none":
      raise UserError("a --refit run takes no decision, yet a decision asked for held-out "
                      "images (a sensitivity sweep on the validation split?)")
    return self._sample(*self._eval[self.config.decisions_split], n, salt=104_729)

  def sweep_set(self, n: int) -> tuple[jax.Array, jax.Array]:
    """The images a sensitivity sweep of --target_compression evaluates: `decision_set(n)`,
    or with --sweep_split=train a fixed seeded sample of up to n training images, so the
    allocations never read the validation split."""
    if self.config.sweep_split_name != "train":
      return self.decision_set(n)
    return self._sample(self.images, self.labels, n, salt=1_299_709)

  def _sample(self, images, labels, n: int, salt: int) -> tuple[jax.Array, jax.Array]:
    """Up to n of (images, labels), in their order, chosen by (seed, salt): the same at every
    iteration and on resume."""
    count = int(labels.shape[0])
    if n >= count:
      return images, labels
    key = jax.random.fold_in(self._data_key, salt)
    idx = np.sort(np.asarray(jax.random.permutation(key, count))[:n])
    return images[idx], labels[idx]

  def sample_images(self, n: int) -> np.ndarray:
    """The first n test images (inputs to trace and check a model with; not a decision)."""
    return np.asarray(self._eval["test"][0][:n])

  def recalibration_batches(self, iteration: int, count: int):
    """`count` training batches (B, H, W, C) of a seeded order of their own, for re-estimating
    BatchNorm statistics after the pruning of `iteration`."""
    key = jax.random.fold_in(jax.random.fold_in(self._data_key, 15_485_863), iteration)
    batches = train_lib.epoch_batches(key, self.num_train, self.config.batch_size)
    for idx in batches[:count]:
      yield self.images[jnp.asarray(idx)]
