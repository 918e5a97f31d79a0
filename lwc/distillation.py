"""Retraining with the dense network as teacher (knowledge distillation; beyond the paper).

Hinton, Vinyals and Dean (2015): while the pruned network retrains, its loss is

    (1 - weight) * task_loss(outputs, labels) + weight * T^2 * KL(p_T || q_T),

with p_T = softmax(teacher_logits / T) and q_T = softmax(outputs / T) per example, averaged over
the batch (T^2 keeps the gradient scale of the soft term independent of T). The teacher is the
network after dense training (iteration 0: its params and model state), run in inference mode on
the same batch, its logits under `stop_gradient`. Pruning itself is unchanged: the magnitude
threshold, the monotone masks and the zeros of pruned weights do not depend on the loss.

Shapes: outputs and teacher logits (B, ..., classes); labels as the task loss takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


class Teacher(flax.struct.PyTreeNode):
  """The dense network a retraining distils from: its `params` and `model_state` (pytree
  leaves, replicated like the state's), and the loss's `weight` in [0, 1] and `temperature` > 0
  (static: a change recompiles the step)."""

  params: PyTree
  model_state: PyTree
  weight: float = flax.struct.field(pytree_node=False)
  temperature: float = flax.struct.field(pytree_node=False)


def soft_target_loss(outputs: jax.Array, teacher_logits: jax.Array,
                     temperature: float) -> jax.Array:
  """T^2 * mean over examples of KL(softmax(teacher / T) || softmax(outputs / T)), a scalar >= 0,
  exactly 0 where the two agree up to a constant per example.

  >>> import jax.numpy as jnp
  >>> logits = jnp.array([[2.0, 0.0, -1.0]])
  >>> float(soft_target_loss(logits, logits + 5.0, temperature=4.0))
  0.0
  >>> float(soft_target_loss(logits, -logits, temperature=1.0)) > 0
  True
  """
  teacher_log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  student_log_q = jax.nn.log_softmax(outputs / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_q), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def distilled(loss_fn: Callable, metrics_fn: Callable | None, teacher: Teacher
              ) -> tuple[Callable, Callable | None]:
  """(loss_fn, metrics_fn) over targets (labels, teacher_logits): the task loss mixed with the
  soft-target loss by `teacher.weight`; the metrics are the task's, on the labels alone."""

  def loss(outputs, targets):
    labels, teacher_logits = targets
    soft = soft_target_loss(outputs, teacher_logits, teacher.temperature)
    return (1.0 - teacher.weight) * loss_fn(outputs, labels) + teacher.weight * soft

  def metrics(outputs, targets):
    return metrics_fn(outputs, targets[0])

  return loss, (metrics if metrics_fn is not None else None)
