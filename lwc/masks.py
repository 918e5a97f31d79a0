"""Masks: a pytree of bool arrays with exactly the params' structure and shapes.

`masks[path][i] == False` means connection `i` of that leaf is pruned: its weight is 0.0 and stays
0.0 for the rest of the run. Every leaf has a mask; leaves that are not prunable (biases, by
default, as in the paper) keep an all-True mask that no pruning step touches.

Which leaves are prunable and what each layer is called is decided by `lwc.layers` (every
floating weight of 2+ dimensions by default: Dense, Conv, DenseGeneral kernels and embeddings,
never biases or norm scales), for Linen params and NNX states alike. An `nnx.Module` may be passed
wherever params are read (its `nnx.state(module, nnx.Param)` is used). A tree with nothing
prunable is an error, never a silent no-op.

Pruning (`prune`) removes every surviving connection with |w| < quality * std, per layer, where
std is the standard deviation of that layer's **surviving** weights. Why survivors: the zeros of
connections pruned earlier are not weights any more; counting them would shrink std as the layer
gets sparser, so the same quality would mean a weaker and weaker threshold from one iteration to
the next, and the threshold would depend on pruning history instead of on the live weights.
`std_of="all"` (every entry of the weight tensor, zeros included) is available for comparison.
Masks are monotone: `prune` only ever turns True into False.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lwc import layers as layers_lib
from lwc.errors import UserError

PyTree = Any
Quality = float | Mapping[str, float]
Predicate = Callable[[Any, Any], bool]


# Walking the tree to layers lives in lwc.layers; these names stay for existing callers.
path_names = layers_lib.path_names
layer_name = layers_lib.layer_name
default_is_prunable = layers_lib.DEFAULT


def prunable_layers(params: PyTree, is_prunable: Predicate = default_is_prunable) -> list[str]:
  """Names of the prunable layers, in params order."""
  return layers_lib.names(params, is_prunable)


def layer_groups(params: PyTree, is_prunable: Predicate = default_is_prunable
                 ) -> dict[str, list[str]]:
  """{'all', 'fc', 'conv', 'attention', 'embedding', user groups: layers} (lwc.layers.groups)."""
  return layers_lib.groups(params, is_prunable)


def init_masks(params: PyTree) -> PyTree:
  """All-True masks: nothing pruned yet (same structure as params, NNX Variables included)."""
  return jax.tree.map(lambda w: jnp.ones(jnp.shape(w), dtype=bool),
                      layers_lib.as_params(params))


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Params with every pruned entry set to exactly 0.0."""
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


def resolve_qualities(params: PyTree, quality: Quality,
                      is_prunable: Predicate = default_is_prunable
                      ) -> dict[str, float]:
  """One quality per prunable layer from a float, or a mapping with optional key `default`.

  Raises UserError for a negative or non-finite quality and for a layer name that the model does
  not have, listing the names it has.
  """
  layers = list(layers_lib.require_prunable(params, is_prunable))
  if isinstance(quality, Mapping):
    overrides = dict(quality)
    default = overrides.pop("default", None)
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
      raise UserError(f"quality given for unknown layer(s) {', '.join(unknown)}; "
                      f"prunable layers are {', '.join(layers)}")
    missing = [name for name in layers if name not in overrides]
    if missing and default is None:
      raise UserError(f"no quality for layer(s) {', '.join(missing)} and no default")
    out = {name: float(overrides.get(name, default)) for name in layers}
  else:
    out = {name: float(quality) for name in layers}
  for name, q in out.items():
    if not math.isfinite(q) or q < 0:
      raise UserError(f"quality for layer {name} must be a finite number >= 0, got {q}")
  return out


def layer_thresholds(params: PyTree, masks: PyTree, quality: Quality,
                     std_of: Literal["survivors", "all"] = "survivors",
                     is_prunable: Predicate = default_is_prunable
                     ) -> dict[str, jax.Array]:
  """Per-layer threshold quality * std (see module docstring for which std)."""
  if std_of not in ("survivors", "all"):
    raise UserError(f"std_of must be 'survivors' or 'all', got '{std_of}'")
  qualities = resolve_qualities(params, quality, is_prunable)
  mask_of = {name: m for name, (_, m) in
             layers_lib.prunable_leaves(masks, _same_leaves(params, is_prunable)).items()}
  out = {}
  for name, (_, w) in layers_lib.prunable_leaves(params, is_prunable).items():
    std = jnp.std(w) if std_of == "all" else survivor_std(w, mask_of[name])
    out[name] = qualities[name] * std
  return out


def survivor_std(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Standard deviation of the entries of `w` where `mask` is True (0 when none is)."""
  count = jnp.maximum(mask.sum(), 1)
  mean = jnp.where(mask, w, 0).sum() / count
  return jnp.sqrt(jnp.where(mask, (w - mean) ** 2, 0).sum() / count)


def _same_leaves(params: PyTree, is_prunable: Predicate) -> Predicate:
  """A predicate for the masks tree that picks the leaves `is_prunable` picks in params."""
  chosen = {layers_lib.path_names(p) for p, w in layers_lib.leaves_with_path(params)
            if is_prunable(p, w)}
  return lambda path, m: layers_lib.path_names(path) in chosen


def prune_probability(w: jax.Array, threshold: jax.Array) -> jax.Array:
  """Probabilistic pruning (section 3.4's ablation): P(prune) = max(0, 1 - |w| / (2 t)).

  Falls linearly with |w| from 1 at w = 0 to 0 at |w| = 2t, so the expected cut sits at the
  deterministic threshold t: weights far below t are almost surely pruned, some between t and 2t
  are pruned too, and some below t survive.
  """
  return jnp.clip(1.0 - jnp.abs(w) / (2.0 * threshold), 0.0, 1.0)


def prune(params: PyTree, masks: PyTree, quality: Quality,
          std_of: Literal["survivors", "all"] = "survivors",
          is_prunable: Predicate = default_is_prunable,
          layers: Collection[str] | None = None,
          rng: jax.Array | None = None) -> tuple[PyTree, PyTree]:
  """Prunes every surviving prunable connection with |w| < quality * std of its layer.

  Args:
    params: weights, any pytree of float arrays.
    masks: bool pytree of the same structure and shapes (False = already pruned).
    quality: one float for every layer, or {layer_name: q, 'default': q}.
    std_of: 'survivors' (default) or 'all'; see the module docstring.
    layers: prune only these layers (e.g. the FC group for local pruning); default all.
    rng: if given, prune probabilistically instead (`prune_probability`), seeded by rng.

  Returns:
    (params, masks): new masks = old masks AND (|w| >= threshold), so a pruned connection never
    returns; params with every pruned entry exactly 0.0 and survivors unchanged (bit for bit).
  """
  thresholds = layer_thresholds(params, masks, quality, std_of, is_prunable)
  if layers is not None:
    unknown = sorted(set(layers) - set(thresholds))
    if unknown:
      raise UserError(f"cannot prune unknown layer(s) {', '.join(unknown)}; prunable layers are "
                      f"{', '.join(thresholds)}")
  keys = {}
  if rng is not None:
    keys = dict(zip(thresholds, jax.random.split(rng, len(thresholds))))

  def one(name, w, m):
    if layers is not None and name not in layers:
      return m
    if rng is None:
      return jnp.logical_and(m, jnp.abs(w) >= thresholds[name])
    pruned = jax.random.uniform(keys[name], jnp.shape(w)) < prune_probability(w, thresholds[name])
    return jnp.logical_and(m, jnp.logical_not(pruned))

  new_masks = layers_lib.map_prunable(one, params, masks, is_prunable=is_prunable)
  return apply_masks(params, new_masks), new_masks


def layer_counts(masks: PyTree,
                 is_prunable: Predicate = default_is_prunable
                 ) -> dict[str, dict[str, int | float]]:
  """{layer: {'weights': total, 'nonzero': surviving, 'density': nonzero / weights}}."""
  out = {}
  for name, (_, m) in layers_lib.prunable_leaves(masks, is_prunable).items():
    total = int(np.prod(np.shape(m)))
    nonzero = int(np.asarray(m).sum())
    out[name] = {"weights": total, "nonzero": nonzero,
                 "density": nonzero / total if total else 0.0}
  return out


def total_counts(masks: PyTree,
                 is_prunable: Predicate = default_is_prunable
                 ) -> dict[str, int | float]:
  """Totals over prunable layers: weights, nonzero, density and compression (weights/nonzero)."""
  layers_lib.require_prunable(masks, is_prunable)
  per_layer = layer_counts(masks, is_prunable)
  weights = sum(c["weights"] for c in per_layer.values())
  nonzero = sum(c["nonzero"] for c in per_layer.values())
  return {"weights": weights, "nonzero": nonzero,
          "density": nonzero / weights if weights else 0.0,
          "compression": weights / nonzero if nonzero else math.inf}
