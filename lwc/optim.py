"""Masked optimisation: optax transforms that keep pruned weights at exactly 0.0.

`masked(inner, regularization, strength)` wraps any optax optimiser (SGD with momentum, Adam, ...)
into a `GradientTransformationExtraArgs` whose `update` takes the masks as a keyword:

    tx = masked(optax.sgd(0.01, momentum=0.9), regularization="l2", strength=5e-4)
    updates, opt_state = tx.update(grads, opt_state, params, masks=masks)

Order of operations, and why:
  1. the regulariser's gradient (L2: strength * w, L1: strength * sign(w)) is added on surviving
     entries only, to every trainable leaf (weights and biases, as Caffe's weight decay does);
  2. gradients of pruned entries are zeroed, so the inner optimiser's statistics (momentum, Adam
     moments) never see them;
  3. the inner optimiser runs;
  4. its updates are zeroed on pruned entries again. This last step is what makes the invariant
     exact whatever the inner optimiser carries over (for example momentum accumulated before the
     connection was pruned): a pruned weight is 0.0 and receives exactly 0.0 at every step.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lwc import masks as masks_lib
from lwc.errors import UserError

Regularization = Literal["none", "l1", "l2"]


def _zero_pruned(tree, masks):
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, masks)


def regularization_grad(params, masks, kind: Regularization, strength: float):
  """Gradient of the penalty, surviving entries only: L1 strength*|w|, L2 (strength/2)*w^2."""
  if kind not in ("none", "l1", "l2"):
    raise UserError(f"regularization must be none, l1 or l2, got '{kind}'")
  if kind == "none" or strength == 0.0:
    return jax.tree.map(jnp.zeros_like, params)
  if kind == "l2":
    g = jax.tree.map(lambda w: strength * w, params)
  else:
    g = jax.tree.map(lambda w: strength * jnp.sign(w), params)
  return _zero_pruned(g, masks)


class MaskedState(NamedTuple):
  inner: optax.OptState


def masked(inner: optax.GradientTransformation,
           regularization: Regularization = "none",
           strength: float = 0.0,
           frozen_layers: Collection[str] = ()) -> optax.GradientTransformationExtraArgs:
  """`inner` restricted to surviving connections, plus L1/L2 on survivors. See module docstring.

  The returned transform's `update(updates, state, params, *, masks)` requires `params` (for the
  regulariser) and `masks` (bool pytree, same structure as params). Every leaf of a layer named
  in `frozen_layers` (kernel and bias; names as `lwc.masks.layer_name`) gets exactly zero
  updates and no regularisation: local retraining of one group with the other fixed (section 3.3).
  """
  frozen_layers = frozenset(frozen_layers)
  if regularization not in ("none", "l1", "l2"):
    raise UserError(f"regularization must be none, l1 or l2, got '{regularization}'")
  if not strength >= 0.0:
    raise UserError(f"regularization strength must be >= 0, got {strength}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MaskedState(inner=inner.init(params))

  def update_fn(updates, state, params=None, *, masks, **extra_args):
    if params is None:
      raise ValueError("masked optimiser needs params in update(grads, state, params, masks=...)")
    if frozen_layers:
      masks = jax.tree_util.tree_map_with_path(
          lambda p, m: jnp.zeros_like(m) if masks_lib.layer_name(p) in frozen_layers else m,
          masks)
    reg = regularization_grad(params, masks, regularization, strength)
    grads = _zero_pruned(jax.tree.map(jnp.add, updates, reg), masks)
    new_updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
    return _zero_pruned(new_updates, masks), MaskedState(inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def learning_rate_schedule(kind: str, base: float, total_steps: int, *,
                           gamma: float = 1e-4, power: float = 0.75,
                           decay_steps: int = 0, decay_factor: float = 0.1) -> optax.Schedule:
  """Learning rate schedules used by the paper's Caffe solvers and by common practice.

  constant: base.  inv (Caffe's LeNet solver): base * (1 + gamma * step) ** -power.
  step: base * decay_factor ** (step // decay_steps).  cosine: cosine decay to 0 over total_steps.
  """
  if not base > 0:
    raise UserError(f"learning rate must be > 0, got {base}")
  if kind == "constant":
    return optax.constant_schedule(base)
  if kind == "inv":
    return lambda step: base * (1.0 + gamma * step) ** (-power)
  if kind == "step":
    if decay_steps <= 0:
      raise UserError("lr_schedule=step needs lr_decay_steps > 0")
    return optax.exponential_decay(base, decay_steps, decay_factor, staircase=True)
  if kind == "cosine":
    return optax.cosine_decay_schedule(base, max(total_steps, 1))
  raise UserError(f"unknown lr_schedule '{kind}', expected constant, inv, step or cosine")


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9
                   ) -> optax.GradientTransformation:
  """The inner optimiser by name: sgd (with momentum) or adam."""
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  raise UserError(f"unknown optimizer '{name}', expected sgd or adam")
