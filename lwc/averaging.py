"""Weight averaging inside a phase: the network a phase (dense training, a retraining) hands on
is the moving average of its iterates, not the last one (Polyak averaging; beyond the paper).

`moving_average(tx, decay)` wraps any optax transform (`lwc.optim.masked`, `lwc.prunable`, ...)
and keeps, in its state, the exponential moving average of the parameters its updates lead to:

    average_0 = params at init
    average_t = d_t * average_{t-1} + (1 - d_t) * (params_{t-1} + updates_t)
    d_t = min(decay, (1 + t) / (10 + t))

The warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) keeps the starting
point, a network just pruned, from holding a share of decay ** steps of the result. The updates
themselves pass through unchanged, so training follows the same path with or without it;
`averaged(opt_state)` reads the average at the end of the phase.

Invariant: where every iterate of a phase holds exactly 0.0 (a pruned weight, kept at 0.0 by
the masked transform), the average is exactly 0.0 too: 0.0 * d + 0.0 * (1 - d) == 0.0. So the
average has the same masks as the iterates. BatchNorm statistics are not parameters and are not
averaged: re-estimate them for the averaged weights (`lwc.batchnorm`).

>>> import jax.numpy as jnp, optax
>>> tx = moving_average(optax.sgd(1.0), decay=0.5)
>>> params = {"w": jnp.array([1.0, 0.0])}
>>> state = tx.init(params)
>>> updates, state = tx.update({"w": jnp.array([1.0, 0.0])}, state, params)
>>> params = optax.apply_updates(params, updates)    # the iterate: w = [0, 0]
>>> [round(float(x), 4) for x in averaged(state)["w"]]  # d_0 = 0.1: 0.1 * 1 + 0.9 * 0
[0.1, 0.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lwc.errors import UserError

PyTree = Any


class AveragingState(NamedTuple):
  """`average`: a pytree parallel to params; `count`: updates averaged so far (int32);
  `inner`: the wrapped transform's state."""
  average: PyTree
  count: jax.Array
  inner: optax.OptState


def moving_average(tx: optax.GradientTransformation, decay: float
                   ) -> optax.GradientTransformationExtraArgs:
  """`tx`, with the exponential moving average (module docstring) of the iterates in its state.

  `update` needs `params` and passes any extra keyword arguments (`masks=...`) on to `tx`.
  """
  if not 0.0 < decay < 1.0:
    raise UserError(f"the averaging decay must be in (0, 1), got {decay}")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return AveragingState(average=jax.tree.map(jnp.copy, params),  # its own buffers
                          count=jnp.zeros([], jnp.int32), inner=tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("moving_average needs params: tx.update(grads, state, params)")
    updates, inner = tx.update(updates, state.inner, params, **extra_args)
    new_params = optax.apply_updates(params, updates)
    t = state.count.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    average = jax.tree.map(
        lambda a, p: (d * a + (1.0 - d) * p).astype(a.dtype), state.average, new_params)
    return updates, AveragingState(average=average, count=state.count + 1, inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged(opt_state) -> PyTree:
  """The average held by the (outermost) `moving_average` state in `opt_state`."""
  if isinstance(opt_state, AveragingState):
    return opt_state.average
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, AveragingState))
           if isinstance(s, AveragingState)]
  if not found:
    raise UserError("the optimiser state holds no moving average (tx is not "
                    "lwc.averaging.moving_average(...))")
  return found[0].average
