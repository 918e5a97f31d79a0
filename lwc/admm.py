"""Beyond the paper: ADMM-regularised retraining (Zhang et al. 2018; progressive, Ye et al. 2019).

Magnitude pruning cuts weights the network still uses, and retraining then has to recover. ADMM
prepares a cut instead: while it trains, each targeted layer's weights W are pulled toward Z,
their projection onto the layer's next keep count (the `keep` largest |W + U|, the rest 0.0),
by the gradient of (rho / 2) * ||W - Z + U||^2; every `steps_per_update` steps

    Z <- project(W + U, keep)      U <- U + W - Z

(U is the scaled dual variable). The weights the next cut removes are thus driven toward zero
while the survivors learn to do without them, so that the cut itself costs little.

In lwc the ADMM target of iteration i's retraining is iteration i+1's cut (`next_keep`): one
retraining both recovers from the cut just made and prepares the next, and the last retraining
is plain masked retraining. The cut stays the plan's magnitude cut: masks only lose connections,
pruned weights stay exactly 0.0 (their W, Z and U are all 0.0), and survivors keep their values.

`admm(keep, rho, ...)` is an optax transform whose state holds Z, U and the step count, so a
checkpoint of the optimiser state resumes the dual variables exactly; put it before the inner
optimiser (`optax.chain(admm(...), optax.sgd(...))`) inside `lwc.optim.masked`.

>>> import jax.numpy as jnp
>>> project({"fc": {"kernel": jnp.array([[0.3, -2.0], [1.0, -0.1]])}}, {"fc": 2})
{'fc': {'kernel': Array([[ 0., -2.],
       [ 1.,  0.]], dtype=float32)}}
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lwc import layers as layers_lib
from lwc.errors import UserError

PyTree = Any


class AdmmState(NamedTuple):
  """Z (the projection, params-shaped), U (the scaled dual, params-shaped) and the steps
  taken (int32 scalar). Leaves of layers without a keep count hold 0.0 in both."""
  z: PyTree
  u: PyTree
  count: jax.Array


def _project_leaf(x: jax.Array, keep: int) -> jax.Array:
  """x with all but its `keep` largest |x| set to 0.0 (ties at the k-th value all kept); a new
  array, never `x` itself (a state must not alias the params it is donated with)."""
  if keep >= x.size:
    return jnp.array(x, copy=True)
  if keep <= 0:
    return jnp.zeros_like(x)
  kth = jnp.sort(jnp.abs(x).ravel())[x.size - keep]
  return jnp.where(jnp.abs(x) >= kth, x, jnp.zeros_like(x))


def _targeted(tree: PyTree, keep: Mapping[str, int], is_prunable) -> dict:
  """{path: keep count} of the leaves of `tree` that `keep` names (layer names, lwc.layers)."""
  leaves = layers_lib.prunable_leaves(tree, is_prunable)
  unknown = sorted(set(keep) - set(leaves))
  if unknown:
    raise UserError(f"ADMM keep count for unknown layer(s) {', '.join(unknown)}; prunable "
                    f"layers are {', '.join(leaves)}")
  return {leaves[name][0]: int(k) for name, k in keep.items()}


def _map_targeted(fn, tree: PyTree, targets: Mapping, *rest: PyTree) -> PyTree:
  """fn(leaf, keep, *rest leaves) on targeted leaves, zeros elsewhere."""
  def one(path, leaf, *others):
    if path in targets:
      return fn(leaf, targets[path], *others)
    return jnp.zeros_like(leaf)
  return jax.tree_util.tree_map_with_path(one, tree, *rest)


def project(params: PyTree, keep: Mapping[str, int],
            is_prunable=layers_lib.DEFAULT) -> PyTree:
  """Each layer named in `keep` ({layer: count}) with only its `count` largest |w| left, every
  other leaf 0.0; the same structure as `params`."""
  targets = _targeted(params, keep, is_prunable)
  return _map_targeted(_project_leaf, params, targets)


def admm(keep: Mapping[str, int], rho: float, steps_per_update: int, rho_growth: float = 1.0,
         is_prunable=layers_lib.DEFAULT) -> optax.GradientTransformation:
  """Adds rho_k * (W - Z + U) to the gradient of each layer named in `keep`; see the module
  docstring. rho_k = rho * rho_growth ** (dual updates done so far); Z and U are updated after
  every `steps_per_update` steps (on the weights the step was given). `keep` may be empty: the
  transform then changes nothing, but holds a state of the same structure.
  """
  if not (math.isfinite(rho) and rho >= 0):
    raise UserError(f"ADMM rho must be a finite number >= 0, got {rho}")
  if not (math.isfinite(rho_growth) and rho_growth >= 1.0):
    raise UserError(f"ADMM rho growth must be a finite number >= 1, got {rho_growth}")
  if steps_per_update < 1:
    raise UserError(f"ADMM needs at least one step per update, got {steps_per_update}")
  keep = dict(keep)

  def init_fn(params):
    targets = _targeted(params, keep, is_prunable)
    return AdmmState(z=_map_targeted(_project_leaf, params, targets),
                     u=jax.tree.map(jnp.zeros_like, params), count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ADMM needs params: tx.update(grads, state, params)")
    targets = _targeted(params, keep, is_prunable)
    if not targets:
      return updates, state._replace(count=state.count + 1)
    done = state.count // steps_per_update
    rho_k = rho * jnp.asarray(rho_growth, jnp.float32) ** done.astype(jnp.float32)
    pull = _map_targeted(lambda w, _, z, u: rho_k * (w - z + u), params, targets, state.z,
                         state.u)
    updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, pull)
    count = state.count + 1

    def dual_update(zu):
      _, u = zu
      shifted = jax.tree.map(jnp.add, params, u)
      z = _map_targeted(_project_leaf, shifted, targets)
      u = _map_targeted(lambda w, _, u, z: u + w - z, params, targets, u, z)
      return z, u

    z, u = jax.lax.cond(count % steps_per_update == 0, dual_update, lambda zu: zu,
                        (state.z, state.u))
    return updates, AdmmState(z=z, u=u, count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def next_keep(config, iteration: int, params: PyTree, masks: PyTree, plan: Mapping
              ) -> dict[str, int]:
  """{layer: weights to keep} of iteration + 1's cut, known when iteration's retraining starts:
  the ADMM target of that retraining ({} after the last iteration's cut, or with --admm_rho=0).

  --layer_density: each listed layer's scheduled density at the next pruning (lwc.schedule).
  --target_compression: the schedule's next total, split over the layers by this iteration's
  sweep (`allocation['next_densities']`: what it allocates for the next total on the network it
  measured); where its grid cannot reach that total, as this iteration's allocation cut them
  (each layer keeping the fraction of its survivors it kept now, scaled so that the counts add
  up to the next total). The next iteration's own sweep then allocates the cut it actually makes,
  on the weights ADMM prepared.
  """
  if not config.admm_rho or iteration >= config.iterations:
    return {}
  from lwc import iterative
  from lwc import local_retraining
  from lwc import masks as masks_lib
  from lwc import schedule
  counts = masks_lib.layer_counts(masks)
  if config.layer_densities:
    out = {}
    for layer, final in config.layer_densities.items():
      done, total = local_retraining.layer_prunings(config, params, layer, iteration + 1)
      before, _ = local_retraining.layer_prunings(config, params, layer, iteration)
      if done == before:  # not pruned at the next iteration (another group is)
        continue
      density = schedule.scheduled_density(config.density_schedule, final, done, total,
                                           config.schedule_power)
      out[layer] = min(counts[layer]["nonzero"],
                       int(np.floor(density * counts[layer]["weights"] + 0.5)))
    return out
  if not config.target_compression:
    raise UserError("--admm_rho needs each layer's next keep count: give --target_compression "
                    "or --layer_density")
  ahead = plan.get("allocation", {}).get("next_densities")
  if ahead:
    return _within_survivors({name: int(np.floor(d * counts[name]["weights"] + 0.5))
                              for name, d in ahead.items()}, counts)
  total = iterative.scheduled_keep(config, iteration + 1, masks)
  kept = {name: counts[name]["nonzero"] *
          (1.0 - plan.get("allocation", {}).get("fractions", {}).get(name, 0.0))
          for name in counts}
  scale = total / max(sum(kept.values()), 1e-12)
  return {name: min(counts[name]["nonzero"], int(np.floor(v * scale + 0.5)))
          for name, v in kept.items()}


def _within_survivors(wanted: Mapping[str, int], counts: Mapping) -> dict[str, int]:
  """`wanted` with no layer above its survivors (the sweep that looked ahead saw the network
  before this iteration's cut); what that takes off goes to the layers with the most room left,
  so the counts still add up to the next total and the next iteration can cut exactly them."""
  room = {name: counts[name]["nonzero"] for name in wanted}
  keep = {name: min(k, room[name]) for name, k in wanted.items()}
  deficit = sum(wanted.values()) - sum(keep.values())
  for name in sorted(keep, key=lambda n: keep[n] - room[n]):
    if deficit <= 0:
      break
    extra = min(deficit, room[name] - keep[name])
    keep[name] += extra
    deficit -= extra
  return keep


def residual(params: PyTree, keep: Mapping[str, int], is_prunable=layers_lib.DEFAULT
             ) -> dict[str, float]:
  """{layer: ||W - project(W)|| / ||W||}: how much of each targeted layer's weight norm the
  next cut would remove (0.0 when ADMM has driven every weight the cut removes to zero)."""
  leaves = layers_lib.prunable_leaves(params, is_prunable)
  out = {}
  for name, k in keep.items():
    w = np.asarray(jax.device_get(leaves[name][1]), np.float64).ravel()
    norm = float(np.linalg.norm(w))
    if k >= w.size or norm == 0.0:
      out[name] = 0.0
      continue
    small = np.sort(np.abs(w))[:w.size - k]
    out[name] = float(np.linalg.norm(small)) / norm
  return out
