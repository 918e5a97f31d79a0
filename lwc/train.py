"""Pure, jittable training and evaluation steps with params and masks side by side.

Shapes: images (B, H, W, C) float32, labels (B,) int32. Batches are drawn on device from a
device-resident dataset by index: `batch_indices` has shape (K, B) for K steps of batch B.

Data parallelism: `Parallel` puts the dataset and the state replicated on a 1-D mesh over every
local device and shards each batch along its batch axis; `jax.jit` then partitions the step
(GSPMD) and sums gradients across devices itself. For code that embeds the step in `jax.pmap`
instead, pass `axis_name`: gradients and metrics are then averaged over that axis with `pmean`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lwc import augmentation
from lwc import distillation
from lwc import model_fn as model_fn_lib
from lwc.errors import UserError

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. `masks` is a bool pytree parallel to `params`.

  `apply_fn` is a model function (`lwc.model_fn`: a Linen `module.apply`, `lwc.linen_model(...)`
  or `lwc.nnx_model(...)[0]`); `model_state` holds the model's other collections (BatchNorm
  statistics, NNX rng counts; `{}` when none), updated by training steps, never masked. With
  `masks=None` the masks are the ones `tx = lwc.prunable(...)` holds in `opt_state`.
  """

  step: jax.Array
  params: PyTree
  masks: PyTree
  opt_state: PyTree
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformationExtraArgs = flax.struct.field(pytree_node=False)
  model_state: PyTree = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, apply_fn, params, masks, tx, step=0, model_state=None) -> "TrainState":
    return cls(step=jnp.asarray(step, jnp.int32), params=params, masks=masks,
               opt_state=tx.init(params), apply_fn=apply_fn, tx=tx,
               model_state={} if model_state is None else model_state)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; logits (B, classes), labels (B,) int."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def smoothed_cross_entropy(smoothing: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Mean softmax cross-entropy against labels smoothed toward uniform by `smoothing`
  (`optax.smooth_labels`); 0.0 gives `cross_entropy` itself. logits (B, classes), labels (B,)."""
  if smoothing == 0.0:
    return cross_entropy

  def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                  smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  return loss_fn


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """{'accuracy'}: top-1 over the batch; logits (B, ..., classes), labels (B, ...) int."""
  return {"accuracy": (jnp.argmax(logits, -1) == labels).mean()}


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
               axis_name: str | None = None, loss_fn: Callable = cross_entropy,
               metrics_fn: Callable | None = classification_metrics
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a batch; pruned weights stay exactly 0.0 (see lwc.optim).

  `loss_fn(outputs, labels) -> scalar` (default softmax cross-entropy on integer labels) and
  `metrics_fn(outputs, labels) -> {name: scalar}` (default top-1 accuracy; None for none) say
  what the model's outputs mean; nothing else is assumed of their shape. The rng of the step is
  `fold_in(rng, state.step)`, so every step draws fresh dropout.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
  forward = model_fn_lib.as_model_fn(state.apply_fn)

  def objective(params):
    outputs, model_state = forward(params, state.model_state, images, train=True, rng=step_rng)
    return loss_fn(outputs, labels), (outputs, model_state)

  (loss, (outputs, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  metrics = {"loss": loss, **(metrics_fn(outputs, labels) if metrics_fn else {})}
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
    model_state = jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        model_state)
  if state.masks is None:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  else:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=state.masks)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state)
  return new_state, metrics


def train_steps(state: TrainState, images: jax.Array, labels: jax.Array,
                batch_indices: jax.Array, rng: jax.Array,
                batch_sharding: NamedSharding | None = None, loss_fn: Callable = cross_entropy,
                metrics_fn: Callable | None = classification_metrics,
                teacher: distillation.Teacher | None = None,
                augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """K steps in one call (lax.scan), batch k = dataset[batch_indices[k]].

  With a `teacher` each step's loss also pulls toward the teacher's outputs on the same batch
  (`lwc.distillation`). With `augment(images, key)` (`lwc.augmentation`) each gathered batch is
  augmented first, its key a function of `rng` and the step number. Returns the final state and
  metrics averaged over the K steps, plus `params_finite` (whether every parameter of the final
  state is finite).
  """

  def body(state, idx):
    x, y = images[idx], labels[idx]
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    if augment is not None:
      x = augment(x, augmentation.step_key(rng, state.step))
    return _step(state, x, y, rng, loss_fn, metrics_fn, teacher)

  if batch_indices.shape[0] == 1:
    state, metrics = body(state, batch_indices[0])
  else:
    state, metrics = jax.lax.scan(body, state, batch_indices)
    metrics = jax.tree.map(jnp.mean, metrics)
  return state, {**metrics, "params_finite": all_finite(state.params)}


def _step(state, images, labels, rng, loss_fn, metrics_fn, teacher):
  """`train_step` on one batch, distilling from `teacher` when there is one."""
  if teacher is None:
    return train_step(state, images, labels, rng, loss_fn=loss_fn, metrics_fn=metrics_fn)
  teacher_logits = predict(state.apply_fn, teacher.params, images, teacher.model_state)
  targets = (labels, jax.lax.stop_gradient(teacher_logits))
  loss_fn, metrics_fn = distillation.distilled(loss_fn, metrics_fn, teacher)
  return train_step(state, images, targets, rng, loss_fn=loss_fn, metrics_fn=metrics_fn)


def all_finite(tree: PyTree) -> jax.Array:
  """True iff no leaf of `tree` holds a NaN or an Inf (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_steps_on_batches(state: TrainState, images: jax.Array, labels: jax.Array,
                           rng: jax.Array, batch_sharding: NamedSharding | None = None,
                           loss_fn: Callable = cross_entropy,
                           metrics_fn: Callable | None = classification_metrics,
                           teacher: distillation.Teacher | None = None
                           ) -> tuple[TrainState, dict[str, jax.Array]]:
  """K steps (lax.scan) on streamed batches: images (K, B, H, W, C), labels (K, B).

  The same contract as `train_steps`, for data that does not fit on the devices (ImageNet).
  """

  def body(state, batch):
    x, y = batch
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    return _step(state, x, y, rng, loss_fn, metrics_fn, teacher)

  state, metrics = jax.lax.scan(body, state, (images, labels))
  metrics = jax.tree.map(jnp.mean, metrics)
  return state, {**metrics, "params_finite": all_finite(state.params)}


def predict(apply_fn: Callable, params: PyTree, images: jax.Array,
            model_state: PyTree | None = None) -> jax.Array:
  """The model's outputs in evaluation mode (any model function, see lwc.model_fn)."""
  outputs, _ = model_fn_lib.as_model_fn(apply_fn)(params, model_state or {}, images, train=False)
  return outputs


def eval_step_topk(apply_fn: Callable, params: PyTree, images: jax.Array, labels: jax.Array,
                   valid: jax.Array, ks: tuple[int, ...] = (1, 5),
                   model_state: PyTree | None = None) -> dict[str, jax.Array]:
  """Sums over the valid examples of a padded batch: loss_sum, top{k} mistakes, count.

  As Caffe's Accuracy layer, an example is right at k when fewer than k classes score strictly
  higher than its label.
  """
  logits = predict(apply_fn, params, images, model_state)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  true_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
  rank = jnp.sum(logits > true_logit, axis=-1)
  out = {f"top{k}": jnp.sum((rank >= k) & valid, dtype=jnp.int32) for k in ks}
  out["loss_sum"] = jnp.sum(jnp.where(valid, losses, 0.0))
  out["count"] = jnp.sum(valid, dtype=jnp.int32)
  return out


def eval_step(apply_fn: Callable, params: PyTree, images: jax.Array, labels: jax.Array,
              model_state: PyTree | None = None) -> dict[str, jax.Array]:
  """Sums over the batch: loss_sum, correct, count (sums, so batches and devices add up)."""
  logits = predict(apply_fn, params, images, model_state)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss_sum": losses.sum(),
          "correct": (jnp.argmax(logits, -1) == labels).sum(),
          "count": jnp.asarray(labels.shape[0])}


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Data parallelism over every local device with jax.jit + NamedSharding (1-D mesh 'data')."""

  mesh: jax.sharding.Mesh

  @classmethod
  def over_local_devices(cls) -> "Parallel":
    devices = jax.local_devices()
    return cls(jax.sharding.Mesh(np.asarray(devices), ("data",)))

  @classmethod
  def over_all_devices(cls) -> "Parallel":
    """A mesh over every device of every process (after `lwc.distributed.initialize()`); the
    same as `over_local_devices` in a single process."""
    return cls(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.num_devices:
      raise UserError(f"batch_size {batch_size} is not divisible by the {self.num_devices} "
                      "devices it is split over")

  def replicate(self, tree: PyTree) -> PyTree:
    """Every leaf replicated on every device of the mesh. Each process must pass the same
    values (true for the pipeline: same seed, same checkpoint)."""
    return jax.tree.map(lambda x: _place(x, self.replicated), tree)

  def shard_indices(self, batch_indices: np.ndarray) -> jax.Array:
    """(K, B) indices (the same in every process), split along B."""
    return _place(batch_indices, NamedSharding(self.mesh, P(None, "data")))

  def train_batches_fn(self, loss_fn: Callable = cross_entropy) -> Callable:
    """jit(train_steps_on_batches), state donated; feed (K, B, ...) chunks sharded along B."""
    fn = functools.partial(train_steps_on_batches, batch_sharding=self.batch, loss_fn=loss_fn)
    return jax.jit(fn, donate_argnums=0, compiler_options=compiler_options())

  def train_steps_fn(self, loss_fn: Callable = cross_entropy,
                     augment: Callable | None = None) -> Callable:
    """jit(train_steps) with the state donated and each gathered batch sharded over devices
    (and augmented by `augment`, when given)."""
    fn = functools.partial(train_steps, batch_sharding=self.batch, loss_fn=loss_fn,
                           augment=augment)
    return jax.jit(fn, donate_argnums=0, compiler_options=compiler_options())

  def evaluate(self, apply_fn: Callable, params: PyTree, images: jax.Array, labels: jax.Array,
               batch_size: int = 2000, model_state: PyTree | None = None) -> dict[str, float]:
    """Loss and error over the whole (device-resident) split."""
    step = _jitted_eval(apply_fn)
    n = int(labels.shape[0])
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for start in range(0, n, batch_size):
      out = step(params, images[start:start + batch_size], labels[start:start + batch_size],
                 model_state)
      for k in totals:
        totals[k] += out[k]
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count,
            "error": 1.0 - float(totals["correct"]) / count}


def _place(x, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every process holds in full (works across processes, where
  `jax.device_put` of host data to non-addressable devices does not)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and jax.process_count() == 1:
    return jax.device_put(x, sharding)
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


@functools.lru_cache(maxsize=16)
def _jitted_eval_topk(apply_fn: Callable) -> Callable:
  return jax.jit(functools.partial(eval_step_topk, apply_fn), compiler_options=compiler_options())


@functools.lru_cache(maxsize=16)
def _jitted_eval(apply_fn: Callable) -> Callable:
  return jax.jit(functools.partial(eval_step, apply_fn), compiler_options=compiler_options())


# XLA:CPU (jax 0.10) hands convolutions, dots and reductions to YNNPACK by default, which is
# 2-6x slower than its Eigen kernels on LeNet-5's shapes (benchmarks/RESULTS.md, section 3:
# 23.0 -> 14.1 s per epoch with it off; the MLP is unchanged). The option is experimental, so it
# is probed once and dropped where this XLA does not know it.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=1)
def compiler_options() -> dict[str, str] | None:
  """Options for every jitted step: YNNPACK off on the CPU backend, None elsewhere.

  `LWC_XLA_DEFAULTS=1` in the environment keeps XLA's defaults (for comparisons).
  """
  import os
  if jax.default_backend() != "cpu" or os.environ.get("LWC_XLA_DEFAULTS") == "1":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(
        jnp.zeros((2,), jnp.float32)).compile()
  except Exception:  # an XLA without the option: INVALID_ARGUMENT at compile time
    return None
  return dict(_CPU_OPTIONS)


def epoch_batches(rng: jax.Array, num_examples: int, batch_size: int) -> np.ndarray:
  """A seeded permutation cut into full batches: int32 (num_examples // batch_size, batch_size).

  The remainder (num_examples % batch_size examples) is dropped; which examples are dropped
  changes from epoch to epoch with the permutation.
  """
  perm = np.asarray(jax.random.permutation(rng, num_examples))
  steps = num_examples // batch_size
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)
