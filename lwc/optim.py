"""Masked optimisation: optax transforms that keep pruned weights at exactly 0.0.

The primary way: `prunable(inner)` holds the masks in the optimiser state, so the standard
`tx.update(grads, opt_state, params)` call works and any training loop stays as it is (flax's
`TrainState.apply_gradients`, `nnx.Optimizer.update`); pruning replaces the held masks
(`set_masks`, or `prune_train_state` / `prune_nnx` in one call).

The explicit way: `masked(inner, regularization, strength)` wraps any optax optimiser (SGD with
momentum, Adam, ...) into a `GradientTransformationExtraArgs` whose `update` takes the masks as a
keyword:

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
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lwc import layers as layers_lib
from lwc import masks as masks_lib
from lwc.errors import UserError

PyTree = Any

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


class PruningState(NamedTuple):
  """State of `prunable`: the masks (bool pytree parallel to params) and the inner state."""
  masks: PyTree
  inner: optax.OptState


def _check_settings(regularization: str, strength: float) -> None:
  if regularization not in ("none", "l1", "l2"):
    raise UserError(f"regularization must be none, l1 or l2, got '{regularization}'")
  if not strength >= 0.0:
    raise UserError(f"regularization strength must be >= 0, got {strength}")
  if not math.isfinite(strength):
    raise UserError(f"regularization strength must be finite, got {strength}")


def _masked_update(inner, updates, inner_state, params, masks, regularization, strength,
                   frozen_layers, **extra_args):
  """Steps 1-4 of the module docstring; returns (updates, new inner state)."""
  if params is None:
    raise ValueError("a masked optimiser needs params: tx.update(grads, state, params)")
  if frozen_layers:
    masks = jax.tree_util.tree_map_with_path(
        lambda p, m: jnp.zeros_like(m) if layers_lib.layer_name(p) in frozen_layers else m,
        masks)
  reg = regularization_grad(params, masks, regularization, strength)
  grads = _zero_pruned(jax.tree.map(jnp.add, updates, reg), masks)
  new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
  return _zero_pruned(new_updates, masks), inner_state


def masked(inner: optax.GradientTransformation,
           regularization: Regularization = "none",
           strength: float = 0.0,
           frozen_layers: Collection[str] = ()) -> optax.GradientTransformationExtraArgs:
  """`inner` restricted to surviving connections, plus L1/L2 on survivors. See module docstring.

  The returned transform's `update(updates, state, params, *, masks)` requires `params` (for the
  regulariser) and `masks` (bool pytree, same structure as params). Every leaf of a layer named
  in `frozen_layers` (kernel and bias; names as `lwc.layers.layer_name`) gets exactly zero
  updates and no regularisation: local retraining of one group with the other fixed (section 3.3).
  """
  frozen_layers = frozenset(frozen_layers)
  _check_settings(regularization, strength)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MaskedState(inner=inner.init(params))

  def update_fn(updates, state, params=None, *, masks, **extra_args):
    new_updates, inner_state = _masked_update(inner, updates, state.inner, params, masks,
                                              regularization, strength, frozen_layers,
                                              **extra_args)
    return new_updates, MaskedState(inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def prunable(inner: optax.GradientTransformation,
             regularization: Regularization = "none",
             strength: float = 0.0,
             frozen_layers: Collection[str] = ()) -> optax.GradientTransformationExtraArgs:
  """`masked`, with the masks held in the optimiser state: the standard optax call works.

      tx = lwc.prunable(optax.adamw(1e-3, weight_decay=1e-4))
      opt_state = tx.init(params)                       # masks all True
      updates, opt_state = tx.update(grads, opt_state, params)
      opt_state = lwc.set_masks(opt_state, new_masks)   # after pruning (or lwc.prune_train_state)

  so flax's `TrainState.apply_gradients(grads=...)` and `nnx.Optimizer.update(model, grads)`
  run unchanged. Pruned weights receive exactly 0.0 updates, whatever `inner` carries (momentum,
  Adam moments, decoupled weight decay): the same four steps as `masked`.
  """
  frozen_layers = frozenset(frozen_layers)
  _check_settings(regularization, strength)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PruningState(masks=masks_lib.init_masks(params), inner=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, inner_state = _masked_update(inner, updates, state.inner, params, state.masks,
                                              regularization, strength, frozen_layers,
                                              **extra_args)
    return new_updates, PruningState(masks=state.masks, inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_pruning_state(x) -> bool:
  return isinstance(x, PruningState)


def _pruning_states(opt_state) -> list[PruningState]:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_pruning_state)
           if _is_pruning_state(x)]
  if len(found) != 1:
    raise UserError(f"expected one lwc.prunable(...) state in the optimiser state, found "
                    f"{len(found)}: build the optimiser with tx = lwc.prunable(inner)")
  return found


def _as_pure(tree):
  from flax import nnx
  return nnx.as_pure(tree)


def get_masks(opt_state) -> PyTree:
  """The masks held by `prunable` in an optimiser state (or an `nnx.Optimizer`)."""
  from flax import nnx
  if isinstance(opt_state, nnx.Optimizer):
    opt_state = _as_pure(opt_state.opt_state)
  return _pruning_states(opt_state)[0].masks


def set_masks(opt_state, masks: PyTree):
  """A new optimiser state with `masks` in place of the held ones (same structure and shapes).

  An `nnx.Optimizer` is updated in place (and returned). Masks are checked to be monotone-ready
  bool trees of the held masks' structure; the inner state is untouched.
  """
  from flax import nnx
  if isinstance(opt_state, nnx.Optimizer):
    optimizer = opt_state
    new_state = set_masks(_as_pure(optimizer.opt_state), _as_pure(masks))
    nnx.update(optimizer.opt_state, nnx.state(new_state))
    return optimizer
  old = _pruning_states(opt_state)[0].masks
  old_def, new_def = jax.tree.structure(old), jax.tree.structure(masks)
  if old_def != new_def:
    raise UserError(f"masks do not match the optimiser's: {new_def} vs {old_def}")
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(masks)):
    if jnp.shape(a) != jnp.shape(b):
      raise UserError(f"mask shape {jnp.shape(b)} does not match the optimiser's {jnp.shape(a)}")
  masks = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
  return jax.tree.map(lambda x: x._replace(masks=masks) if _is_pruning_state(x) else x,
                      opt_state, is_leaf=_is_pruning_state)


def prune_train_state(state, quality: masks_lib.Quality, **prune_kwargs):
  """Prunes a flax `TrainState` whose `tx` is `lwc.prunable(...)`: params and held masks.

  `prune_kwargs` go to `lwc.prune` (std_of, is_prunable, layers, rng). Returns the new state.
  """
  params, masks = masks_lib.prune(state.params, get_masks(state.opt_state), quality,
                                  **prune_kwargs)
  return state.replace(params=params, opt_state=set_masks(state.opt_state, masks))


def prune_nnx(model, optimizer, quality: masks_lib.Quality, **prune_kwargs) -> PyTree:
  """Prunes an NNX model in place and the masks its `nnx.Optimizer(model, lwc.prunable(tx),
  wrt=nnx.Param)` holds. Returns the new masks."""
  from flax import nnx
  params = _as_pure(nnx.state(model, optimizer.wrt))
  params, masks = masks_lib.prune(params, get_masks(optimizer), quality, **prune_kwargs)
  nnx.update(model, params)
  set_masks(optimizer, masks)
  return masks


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
