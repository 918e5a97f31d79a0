"""Which leaves of a params tree are prunable, what each layer is called, and its group.

The one place that walks a params tree to layers; masks, optim, sensitivity, schedule, tradeoff,
stats, export and neurons all ask this module, none matches leaf names on its own.

Trees it understands:
  * Linen params: `{'fc1': {'kernel': ..., 'bias': ...}}`, with or without a leading `params`;
  * Flax NNX states: `nnx.state(model, nnx.Param)` (paths end in `.value`), their pure form
    (`nnx.as_pure(...)`, what `nnx.Optimizer` hands an optax transform), or an `nnx.Module`
    itself (`as_params`).

A *layer* is named by the path of the module holding the weight, `/`-joined: `fc1` for
`params['fc1']['kernel']` (and for its bias), `block1/conv2` for a nested one, `embed` for
`embed/embedding`. A leaf with another name (a raw `self.param('w1', ...)`) is named by its full
path, `mlp/w1`, so two such leaves of one module stay two layers.

Prunable by default: every floating leaf with two or more dimensions (Dense and Conv kernels,
DenseGeneral kernels of any rank, embeddings); never biases (a DenseGeneral bias is 2-D) or
normalisation scales and statistics (leaves named bias, scale, mean, var).
`Selection(include=..., exclude=...)` narrows that by regular expressions on the layer name.

Groups (for local retraining, section 3.3): every layer is in `all` and in one kind:
  * `embedding`: a leaf named `embedding` (nn.Embed, nnx.Embed);
  * `attention`: a layer whose path names an attention module (`attention`, `attn`, `self_attn`,
    `query`/`key`/`value`/`out` under one, `q_proj`, ...);
  * `fc`: any other 2-D weight;
  * `conv`: any other weight of 3 or more dimensions.
`Selection(groups={'head': r'^head'})` adds user groups by pattern on the layer name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwc.errors import UserError

PyTree = Any
KINDS = ("fc", "conv", "attention", "embedding")
# Leaves that Flax modules name by their role: they belong to the module, the layer.
_NAMED_BY_PARENT = ("kernel", "embedding", "bias", "scale", "mean", "var")
# Never prunable, whatever their rank (a DenseGeneral bias is (heads, head_dim)).
_NEVER = ("bias", "scale", "mean", "var")
_ATTENTION = re.compile(
    r"(attn|attention|^(q|k|v|qkv|query|key|value)(_proj)?$|^(o|out)_proj$)", re.IGNORECASE)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path) -> tuple[str, ...]:
  """The path's names, without a leading `params` collection or an NNX trailing `value`."""
  names = [_key_name(k) for k in path]
  if names and names[0] == "params":
    names = names[1:]
  if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return tuple(names)


def leaf_name(path) -> str:
  """The leaf's own name: `kernel`, `bias`, `scale`, `embedding`, ..."""
  names = path_names(path)
  return names[-1] if names else ""


def layer_name(path) -> str:
  """`fc1` for params['fc1']['kernel'] (see the module docstring for the rule)."""
  names = path_names(path)
  if len(names) > 1 and names[-1] in _NAMED_BY_PARENT:
    names = names[:-1]
  return "/".join(names)


def kind(path, leaf) -> str:
  """'embedding', 'attention', 'fc' or 'conv' for a prunable leaf (module docstring)."""
  names = path_names(path)
  if names and names[-1] == "embedding":
    return "embedding"
  if any(_ATTENTION.search(n) for n in names[:-1]):
    return "attention"
  return "fc" if np.ndim(leaf) == 2 else "conv"


def _is_weight_dtype(leaf) -> bool:
  """Floating weights, or the bool masks parallel to them (so counts can walk a masks tree)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return False
  return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.bool_))


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
  if pattern is None:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise UserError(f"{what} pattern '{pattern}' is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which leaves are prunable: a predicate `(path, leaf) -> bool`, hashable (usable under jit).

  Attributes:
    include: regular expression searched in the layer name; only matching layers are prunable.
    exclude: regular expression; matching layers are never prunable.
    min_ndim: weights with fewer dimensions are not prunable (2: biases and scales are kept).
    groups: extra groups, {group name: regular expression searched in the layer name}.
  """

  include: str | None = None
  exclude: str | None = None
  min_ndim: int = 2
  groups: tuple[tuple[str, str], ...] | Mapping[str, str] = ()

  def __post_init__(self):
    if isinstance(self.groups, Mapping):
      object.__setattr__(self, "groups", tuple(sorted(self.groups.items())))
    for name, pattern in self.groups:
      if name in KINDS or name == "all":
        raise UserError(f"group name '{name}' is taken by a built-in group ({', '.join(KINDS)}, "
                        "all)")
      _compile(pattern, f"group '{name}'")
    _compile(self.include, "include")
    _compile(self.exclude, "exclude")

  def __call__(self, path, leaf) -> bool:
    if np.ndim(leaf) < self.min_ndim or not _is_weight_dtype(leaf) or leaf_name(path) in _NEVER:
      return False
    name = layer_name(path)
    if self.include is not None and not re.search(self.include, name):
      return False
    return self.exclude is None or not re.search(self.exclude, name)


DEFAULT = Selection()
Predicate = Callable[[Any, Any], bool]


def is_module(tree) -> bool:
  from flax import nnx
  return isinstance(tree, nnx.Module)


def as_params(tree: PyTree) -> PyTree:
  """An `nnx.Module` becomes `nnx.state(module, nnx.Param)`; any other tree is returned as is."""
  if is_module(tree):
    from flax import nnx
    return nnx.state(tree, nnx.Param)
  return tree


def _is_variable(x) -> bool:
  from flax import nnx
  return isinstance(x, nnx.Variable)


def leaves_with_path(tree: PyTree) -> list[tuple[Any, Any]]:
  """(path, array) for every leaf, NNX Variables opened to their value."""
  return jax.tree_util.tree_leaves_with_path(as_params(tree))


def prunable_leaves(tree: PyTree, is_prunable: Predicate = DEFAULT) -> dict[str, tuple[Any, Any]]:
  """{layer name: (path, leaf)} for every prunable leaf, in tree order.

  Raises UserError when two prunable leaves get the same layer name (not expected from Flax's
  own modules).
  """
  out: dict[str, tuple[Any, Any]] = {}
  for path, leaf in leaves_with_path(tree):
    if is_prunable(path, leaf):
      name = layer_name(path)
      if name in out:
        raise UserError(f"two prunable leaves are both named layer '{name}': "
                        f"{jax.tree_util.keystr(out[name][0])} and {jax.tree_util.keystr(path)}")
      out[name] = (path, leaf)
  return out


def names(tree: PyTree, is_prunable: Predicate = DEFAULT) -> list[str]:
  """Names of the prunable layers, in tree order."""
  return list(prunable_leaves(tree, is_prunable))


def require_prunable(tree: PyTree, is_prunable: Predicate = DEFAULT) -> dict[str, tuple]:
  """`prunable_leaves`, but a tree with nothing prunable is an error saying what was seen."""
  found = prunable_leaves(tree, is_prunable)
  if not found:
    seen = [f"{'/'.join(path_names(p))} {tuple(np.shape(x))}" for p, x in leaves_with_path(tree)]
    shown = ", ".join(seen[:8]) + (f", ... ({len(seen)} leaves)" if len(seen) > 8 else "")
    raise UserError("nothing to prune: no leaf of this tree is prunable (floating weights with "
                    f">= {getattr(is_prunable, 'min_ndim', 2)} dimensions matching the "
                    f"selection); leaves seen: {shown or 'none'}")
  return found


def groups(tree: PyTree, is_prunable: Predicate = DEFAULT) -> dict[str, list[str]]:
  """{'all', 'fc', 'conv', 'attention', 'embedding', user groups...: [layer names]}."""
  out = {"all": [], **{k: [] for k in KINDS}}
  user = dict(getattr(is_prunable, "groups", ()))
  out.update({g: [] for g in user})
  for name, (path, leaf) in prunable_leaves(tree, is_prunable).items():
    out["all"].append(name)
    out[kind(path, leaf)].append(name)
    for group, pattern in user.items():
      if re.search(pattern, name):
        out[group].append(name)
  return out


def map_prunable(fn: Callable[[str, Any, Any], Any], tree: PyTree, *rest: PyTree,
                 is_prunable: Predicate = DEFAULT,
                 other: Callable[..., Any] | None = None) -> PyTree:
  """tree_map over `tree` (and trees of the same structure): `fn(layer, leaf, *rest_leaves)` on
  prunable leaves, `other(leaf, *rest_leaves)` (default: the first rest leaf, or the leaf) on the
  others. NNX Variables in `tree` are mapped through to their values."""
  tree = as_params(tree)

  def one(path, leaf, *others):
    if is_prunable(path, leaf):
      return fn(layer_name(path), leaf, *others)
    if other is not None:
      return other(leaf, *others)
    return others[0] if others else leaf

  return jax.tree_util.tree_map_with_path(one, tree, *rest)
