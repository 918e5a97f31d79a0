"""Dead-neuron removal (section 3.5): physically smaller layers that compute the same function.

Two entry points:
  * `remove_dead_units(params, masks, chain)`: the built-in LeNets, described by a chain of
    `Layer`s (`CHAINS`); what `lwc.pipeline` uses for `workdir/small_model`.
  * `remove_dead_channels(model_fn, params, masks, inputs, model_state)`: any Linen or NNX model
    (a model function, see `lwc.model_fn`). Its dataflow is read from the model's own trace
    (`jax.make_jaxpr`), the removal is checked numerically before anything is returned, and a
    coupling it cannot follow (a residual add, a concatenation, a layer whose outputs feed two
    layers, a grouped convolution, ...) is refused with a UserError that names it.

A unit (a neuron of a dense layer, a channel of a conv layer) is dead when
  * it has no input connections left: its kernel slice is all pruned, so it outputs a constant;
    or
  * it has no output connections left: the next layer's kernel slice for it is all pruned, so
    nothing it computes is used; it is removed.
Removing units of one layer can kill units of the layer before, so removal repeats until nothing
changes. The last layer's units (the classes, the model's outputs) are never removed.

Built-in chains: conv layers use VALID padding, so every output position of the next conv sees
the whole kernel: a constant input channel adds c * sum(kernel[:, :, j, :]) to its bias exactly.
Max pooling keeps a constant map constant. A conv layer followed by flatten and a dense layer
feeds `positions` rows (h, w, channel), channel fastest, of the dense kernel per channel.

Any model (`remove_dead_channels`)
----------------------------------
Which weights: the prunable leaves of `lwc.layers` (kernels of Dense/Conv, Linen or NNX). The
model is traced once in evaluation mode; for every layer the trace gives the one convolution or
matrix product its kernel feeds, and every value that depends on the layer's output is followed
until it reaches the next such product. Supported is a *linear link* P -> N:
  * P's outputs feed exactly one layer N and nothing else (not the model's outputs, not an add,
    a concatenation or a product with another layer's outputs), and N's input is P's output
    only;
  * what lies between is per-channel: P's bias, a normalisation of P's outputs (BatchNorm: scale
    and bias in params, mean and var in `model_state`, Linen `batch_stats` or the NNX state),
    activations, pooling, a mean over positions, a flatten into a dense layer (channel fastest,
    `positions` rows per channel). Every parameter or state leaf that meets P's outputs there is
    found by the trace and must hold one value per channel of P (or be a broadcast scalar); it
    loses the same channels as P;
  * N is a dense layer or an ungrouped convolution, and P's kernel is used nowhere else.
Anything else that meets a layer with dead channels is refused before anything is computed,
naming it, e.g. "conv_b's outputs are added to stem's outputs (residual): removing its channels
would break the add". Layers without dead channels are never refused.

The constant of a channel with no inputs, and what is done with it. Such a channel computes, for
every input and at every position, c = act(norm(bias)) (in evaluation mode a BatchNorm is
per-channel affine: (b - mean) / sqrt(var + eps) * scale + beta; no bias means b = 0; a SAME
padded convolution of an all-zero kernel slice is 0 at the borders too). c is not derived from
formulas: it is read off N's input in a forward pass on the example inputs, and the channel is
only treated as constant if it is constant there. Then:
  * c == 0 (e.g. a ReLU after a negative pre-activation): the channel is removed;
  * N is a dense layer (after pooling or flatten every row it feeds holds c) or a convolution
    without padding and without input dilation (every output position sees the whole kernel):
    c * (sum of N's kernel slice for the channel) is added to N's bias exactly (and N's bias
    mask is set True where it gained a constant), then the channel is removed;
  * otherwise (N is a padded convolution: border positions see only part of the kernel, so the
    contribution is not one constant per output channel; or N has no bias) the channel is
    **kept** and counted in `Removal.kept`.
The smaller model is exact in evaluation mode. (In training mode a BatchNorm normalises with
batch statistics, under which a constant channel outputs beta, not c.)

Checks before the result is returned (outputs compared on `inputs`, tolerance `atol + rtol *
max|outputs|`): (1) the model at its original shapes with the removed channels' rows of N set to
zero and the folded constants added to N's biases gives the original outputs (the folding is
right); (2) so does it after the removed channels' kernels, biases, normalisation scales,
offsets and statistics are replaced by random values (the removed channels reach the outputs
through nothing but the rows that were zeroed: no mixing across channels, no other path); (3)
the smaller model itself, run through `build(widths)` when given, else through `model_fn` (an
NNX graphdef takes arrays of any width; Linen checks parameter shapes against the module's
features, so a Linen model needs `build` for this check). A failed check is a UserError naming
the layers; nothing is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any, Literal

import numpy as np

from lwc import layers as layers_lib
from lwc import tracing
from lwc.errors import UserError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  kind: Literal["dense", "conv"]
  activation: Literal["relu", "none"]
  # For a conv layer followed by flatten + dense: spatial positions per channel (after pooling).
  positions: int = 1


CHAINS = {
    "lenet_300_100": (Layer("fc1", "dense", "relu"), Layer("fc2", "dense", "relu"),
                      Layer("fc3", "dense", "none")),
    "lenet5": (Layer("conv1", "conv", "none"), Layer("conv2", "conv", "none", positions=16),
               Layer("fc1", "dense", "relu"), Layer("fc2", "dense", "none")),
}


def _act(kind: str, x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0) if kind == "relu" else x


def _weight_key(tree: Mapping, layer: str) -> str:
  """The key of `layer`'s prunable leaf (its kernel) inside `tree[layer]`, found by lwc.layers."""
  if layer not in tree:
    raise UserError(f"model has no layer '{layer}' (layers: {', '.join(map(str, tree))})")
  found = layers_lib.prunable_leaves({layer: tree[layer]})
  if layer not in found:
    raise UserError(f"layer '{layer}' has no prunable weight (leaves: "
                    f"{', '.join(map(str, tree[layer]))})")
  return layers_lib.path_names(found[layer][0])[-1]


def _input_rows(layer: Layer, nxt: Layer, unit: int, units: int) -> np.ndarray | slice:
  """Indices along the next kernel's input axis that carry `unit` of `layer`."""
  if nxt.kind == "dense" and layer.kind == "conv":
    return np.arange(layer.positions) * units + unit
  return np.asarray([unit])


def _next_in_axis(nxt: Layer) -> int:
  return 2 if nxt.kind == "conv" else 0


def _slice_in(kernel: np.ndarray, nxt: Layer, rows) -> np.ndarray:
  return np.take(kernel, rows, axis=_next_in_axis(nxt))


def dead_units(params: dict, masks: dict, chain: tuple[Layer, ...]) -> dict[str, np.ndarray]:
  """{layer: bool (units,)} True for units with no input or no output connection left."""
  out = {}
  for i, layer in enumerate(chain[:-1]):
    mask = np.asarray(masks[layer.name][_weight_key(masks, layer.name)])
    units = mask.shape[-1]
    no_input = ~mask.reshape(-1, units).any(axis=0)
    nxt = chain[i + 1]
    next_mask = np.asarray(masks[nxt.name][_weight_key(masks, nxt.name)])
    no_output = np.array([not _slice_in(next_mask, nxt, _input_rows(layer, nxt, j, units)).any()
                          for j in range(units)])
    out[layer.name] = no_input | no_output
  return out


def remove_dead_units(params: dict, masks: dict, chain: tuple[Layer, ...]
                      ) -> tuple[dict, dict, dict[str, int]]:
  """Smaller (params, masks) computing the same function, and units removed per layer.

  params/masks: {layer: {kernel, 'bias'}} NumPy-convertible, the kernel being the layer's
  prunable leaf (lwc.layers). Kernels: dense (in, out), conv (kh, kw, in, out). Returns new dicts
  with dense shapes over the surviving units only.
  """
  params = {k: {n: np.array(v, copy=True) for n, v in p.items()} for k, p in params.items()}
  masks = {k: {n: np.array(v, copy=True) for n, v in p.items()} for k, p in masks.items()}
  for layer in chain:
    if layer.name not in params:
      raise UserError(f"model has no layer '{layer.name}' (layers: {', '.join(params)})")
  key = {layer.name: _weight_key(params, layer.name) for layer in chain}
  removed = {layer.name: 0 for layer in chain}
  changed = True
  while changed:
    changed = False
    dead = dead_units(params, masks, chain)
    for i in reversed(range(len(chain) - 1)):
      layer, nxt = chain[i], chain[i + 1]
      gone = dead[layer.name]
      if not gone.any():
        continue
      changed = True
      kernel, bias = params[layer.name][key[layer.name]], params[layer.name]["bias"]
      units = kernel.shape[-1]
      next_kernel = params[nxt.name][key[nxt.name]]
      constant = _act(layer.activation, bias)  # output of a unit with no inputs
      no_input = ~masks[layer.name][key[layer.name]].reshape(-1, units).any(axis=0)
      for j in np.flatnonzero(gone & no_input):
        rows = _input_rows(layer, nxt, j, units)
        w = _slice_in(next_kernel, nxt, rows)  # the next layer's weights fed by unit j
        sum_axes = tuple(a for a in range(w.ndim) if a != w.ndim - 1)
        params[nxt.name]["bias"] = params[nxt.name]["bias"] + constant[j] * w.sum(axis=sum_axes)
      keep = np.flatnonzero(~gone)
      keep_rows = np.concatenate([_input_rows(layer, nxt, j, units) for j in keep]) \
          if keep.size else np.zeros(0, int)
      if nxt.kind == "dense" and layer.kind == "conv":
        keep_rows = np.sort(keep_rows)
      for tree in (params, masks):
        tree[layer.name][key[layer.name]] = tree[layer.name][key[layer.name]][..., keep]
        tree[layer.name]["bias"] = tree[layer.name]["bias"][keep]
        tree[nxt.name][key[nxt.name]] = np.take(tree[nxt.name][key[nxt.name]], keep_rows,
                                                axis=_next_in_axis(nxt))
      removed[layer.name] += int(gone.sum())
      break  # recompute dead units on the new shapes
  return params, masks, removed


def widths(params: dict, chain: tuple[Layer, ...]) -> dict[str, int]:
  """Units per layer: the last axis of each kernel."""
  return {layer.name: int(np.shape(params[layer.name][_weight_key(params, layer.name)])[-1])
          for layer in chain}


# ---------------------------------------------------------------------------------------------
# Any model: the flat leaves and the dataflow from the trace.
#
# remove_dead_channels runs, in this order (each step a value computed from the ones before):
#   _flat_leaves (_Leaves) -> _trace (_Dataflow) -> _graph (_Graph: layouts, consumers) ->
#   _linear_links (_link per layer: a _Link or why not; _refuse_dead_unlinked) -> _recorder
#   (reference outputs, N's inputs) -> _removal_plan (_Plan: alive, kept, folded constants) ->
#   _check_variants -> _smaller_model (_variant, _slicing_plan: _Cut values, _apply_cuts) ->
#   _run_small_model -> Removal.

_INPUT = "the model's inputs"
_LAYER_OPS = ("conv_general_dilated", "dot_general")
# Call-like primitives whose inner jaxpr takes exactly the eqn's operands: followed inside.
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                     "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint"})
_NONE: tuple[frozenset, frozenset] = (frozenset(), frozenset())


def _jcore():
  from jax.extend import core
  return core


def _inner_jaxpr(eqn):
  """(jaxpr, consts) of a call-like eqn whose inner jaxpr maps its operands to its results."""
  if eqn.primitive.name not in _INLINE:
    return None
  core = _jcore()
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, core.ClosedJaxpr):
      jaxpr, consts = j.jaxpr, list(j.consts)
    elif isinstance(j, core.Jaxpr):
      jaxpr, consts = j, []
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


@dataclasses.dataclass(frozen=True)
class _Use:
  """One convolution / matrix product of a layer's kernel with an activation."""
  layer: str
  site: tuple[int, ...]  # eqn indices from the top jaxpr down (nested calls)
  primitive: str
  kernel_pos: int  # operand position of the kernel
  sources: frozenset  # layers (or _INPUT) whose outputs form the activation operand
  extra_leaves: frozenset  # other leaves combined with the kernel before the product
  params: dict


class _Flow:
  """Walks a jaxpr once, following which layers' outputs every value depends on (labels), and
  which parameter/state leaves (flat indices) meet each layer's outputs before the next layer.
  Private to `_trace`, which freezes what it found into a `_Dataflow`."""

  def __init__(self, kernel_of: Mapping[int, str]):
    self.kernel_of = kernel_of
    self.uses: dict[str, list[_Use]] = {}
    self.coupled: dict[str, set[int]] = {}
    self.merges: list[tuple[str, list[frozenset]]] = []

  def run(self, jaxpr, const_infos, in_infos, site=()):
    core = _jcore()
    env = {}

    def read(v):
      return _NONE if isinstance(v, core.Literal) else env.get(v, _NONE)

    for v, info in zip(jaxpr.constvars, const_infos):
      env[v] = info
    for v, info in zip(jaxpr.invars, in_infos):
      env[v] = info
    for n, eqn in enumerate(jaxpr.eqns):
      ins = [read(v) for v in eqn.invars]
      here = site + (n,)
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        outs = self.run(inner[0], [_NONE] * len(inner[1]), ins, here)
      else:
        use = self._layer_use(eqn, ins, here)
        out = (frozenset({use.layer}), frozenset()) if use else self._combine(eqn, ins)
        outs = [out] * len(eqn.outvars)
      for v, info in zip(eqn.outvars, outs):
        if not isinstance(v, core.DropVar):
          env[v] = info
    return [read(v) for v in jaxpr.outvars]

  def _layer_use(self, eqn, ins, site) -> _Use | None:
    if eqn.primitive.name not in _LAYER_OPS or len(ins) != 2:
      return None
    for k in (1, 0):
      (k_labels, k_leaves), (a_labels, _) = ins[k], ins[1 - k]
      kernels = {i for i in k_leaves if i in self.kernel_of}
      if not k_labels and len(kernels) == 1 and a_labels:
        (index,) = kernels
        use = _Use(self.kernel_of[index], site, eqn.primitive.name, k, a_labels,
                   frozenset(k_leaves - kernels), dict(eqn.params))
        self.uses.setdefault(use.layer, []).append(use)
        return use
    return None

  def _combine(self, eqn, ins):
    labeled = [labels for labels, _ in ins if labels]
    leaves = frozenset().union(*(lv for labels, lv in ins if not labels))
    if not labeled:
      return frozenset(), leaves
    if len(set(labeled)) > 1:
      self.merges.append((eqn.primitive.name, labeled))
    labels = frozenset().union(*labeled)
    for label in labels:
      self.coupled.setdefault(label, set()).update(leaves)
    return labels, frozenset()


@dataclasses.dataclass(frozen=True)
class _Dataflow:
  """What the trace of the model says. Labels are layer names or _INPUT; leaves are flat indices
  (`_Leaves`).

  jaxpr: the ClosedJaxpr of forward(*params, *state, *inputs) -> outputs (evaluation mode).
  uses: {layer: its kernel's convolutions / matrix products with an activation, trace order}.
  coupled: {label: the leaves combined with values of that label before the next product}.
  merges: (primitive, [label sets]) for every eqn that combines values of different labels.
  output_labels: the labels the model's outputs depend on (through no layer after them).
  """
  jaxpr: Any
  uses: Mapping[str, tuple[_Use, ...]]
  coupled: Mapping[str, frozenset]
  merges: tuple[tuple[str, list[frozenset]], ...]
  output_labels: frozenset


@dataclasses.dataclass(frozen=True)
class _Leaves:
  """A model's arrays as flat tuples in tree order, and how to rebuild the trees.

  Flat leaf index i (as in `_Dataflow`): i < len(params) is params[i], else
  state[i - len(params)]. params are NumPy copies (never the caller's arrays); masks are bool
  arrays shaped like params (given, or params != 0); state and inputs are the given leaves.
  kernels: {layer: flat index of its prunable leaf (lwc.layers)}, in tree order.
  """
  params: tuple
  masks: tuple
  state: tuple
  inputs: tuple
  param_paths: tuple
  state_paths: tuple
  param_def: Any
  state_def: Any
  input_def: Any
  kernels: Mapping[str, int]

  @property
  def args(self) -> list:
    """The leaves the traced model takes: params, state, inputs."""
    return [*self.params, *self.state, *self.inputs]

  @property
  def kernel_layers(self) -> dict[int, str]:
    """{flat index of a kernel: its layer}."""
    return {i: name for name, i in self.kernels.items()}

  def tree_index(self, i: int) -> tuple[str, int]:
    """('params', index) or ('state', index) of flat leaf i."""
    n_p = len(self.params)
    return ("params", i) if i < n_p else ("state", i - n_p)

  def path(self, tree: str, i: int):
    return (self.param_paths if tree == "params" else self.state_paths)[i]

  def name(self, i: int) -> str:
    """'layer/leaf' of flat leaf i."""
    return _leaf_label(self.path(*self.tree_index(i)))

  def shape(self, i: int) -> tuple[int, ...]:
    tree, j = self.tree_index(i)
    return self.params[j].shape if tree == "params" else np.shape(self.state[j])

  def trees(self, params: Sequence, masks: Sequence, state: Sequence) -> tuple[PyTree, ...]:
    """(params, masks, model_state) trees of flat leaves shaped like these."""
    import jax
    return (jax.tree_util.tree_unflatten(self.param_def, params),
            jax.tree_util.tree_unflatten(self.param_def, masks),
            jax.tree_util.tree_unflatten(self.state_def, state))


def _flat(tree):
  import jax
  return jax.tree_util.tree_flatten_with_path(tree)


def _as_np(x):
  return np.array(x, copy=True)


def _leaf_label(path) -> str:
  return "/".join(layers_lib.path_names(path))


def _flat_leaves(params: PyTree, masks: PyTree | None, model_state: PyTree, inputs,
                 is_prunable) -> _Leaves:
  """The model's `_Leaves`. UserError when masks are not shaped like params as a tree, or when
  two prunable leaves share a layer name."""
  import jax
  p_flat, p_def = _flat(params)
  s_flat, s_def = _flat(model_state)
  param_values = tuple(_as_np(x) for _, x in p_flat)
  if masks is None:
    mask_values = tuple(v != 0 for v in param_values)
  else:
    m_flat, m_def = _flat(masks)
    if m_def != p_def:
      raise UserError("masks do not have the params' tree structure")
    mask_values = tuple(np.asarray(x, bool) for _, x in m_flat)
  param_paths = tuple(path for path, _ in p_flat)
  index_of = {jax.tree_util.keystr(path): i for i, path in enumerate(param_paths)}
  kernels = {name: index_of[jax.tree_util.keystr(path)]
             for name, (path, _) in layers_lib.prunable_leaves(params, is_prunable).items()}
  x_flat, x_def = jax.tree_util.tree_flatten(inputs)
  return _Leaves(params=param_values, masks=mask_values, state=tuple(x for _, x in s_flat),
                 inputs=tuple(x_flat), param_paths=param_paths,
                 state_paths=tuple(path for path, _ in s_flat), param_def=p_def,
                 state_def=s_def, input_def=x_def, kernels=kernels)


def _forward(fn, leaves: _Leaves) -> Callable:
  """forward(*params, *state, *inputs) -> the model's outputs in evaluation mode."""
  import jax
  n_p, n_s = len(leaves.params), len(leaves.state)

  def forward(*flat):
    p = jax.tree_util.tree_unflatten(leaves.param_def, flat[:n_p])
    s = jax.tree_util.tree_unflatten(leaves.state_def, flat[n_p:n_p + n_s])
    x = jax.tree_util.tree_unflatten(leaves.input_def, flat[n_p + n_s:])
    return fn(p, s, x, train=False)[0]

  return forward


def _trace(fn, leaves: _Leaves) -> _Dataflow:
  """The model's `_Dataflow`: traced once (jax.make_jaxpr) on the example inputs."""
  import jax
  closed = jax.make_jaxpr(_forward(fn, leaves))(*leaves.args)
  walker = _Flow(leaves.kernel_layers)
  n_leaves = len(leaves.params) + len(leaves.state)
  infos = ([(frozenset(), frozenset({i})) for i in range(n_leaves)] +
           [(frozenset({_INPUT}), frozenset())] * len(leaves.inputs))
  outs = walker.run(closed.jaxpr, [_NONE] * len(closed.consts), infos)
  return _Dataflow(jaxpr=closed,
                   uses={name: tuple(us) for name, us in walker.uses.items()},
                   coupled={label: frozenset(lv) for label, lv in walker.coupled.items()},
                   merges=tuple(walker.merges),
                   output_labels=frozenset().union(*(labels for labels, _ in outs)))


def _evaluate(jaxpr, consts, args, want: set, site=()) -> tuple[list, dict]:
  """(outputs of `jaxpr`, {site: operands} of the eqns at the sites in `want`), eqn by eqn;
  call-like eqns are entered only when a wanted site lies inside."""
  core = _jcore()
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  operands: dict = {}
  for n, eqn in enumerate(jaxpr.eqns):
    here = site + (n,)
    ins = [read(v) for v in eqn.invars]
    if here in want:
      operands[here] = ins
    inner = _inner_jaxpr(eqn)
    if inner is not None and any(s[:len(here)] == here and s != here for s in want):
      outs, inner_operands = _evaluate(inner[0], inner[1], ins, want, here)
      operands.update(inner_operands)
    else:
      outs = tracing.bind(eqn, ins)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars], operands


def _recorder(closed, sites: Sequence[tuple[tuple[int, ...], int]]) -> Callable:
  """A jitted run(*params, *state, *inputs) -> (the model's outputs, [the operand at each
  (site, operand position) of `sites`]): one compiled function, run on variants of the weights."""
  import jax
  want = {site for site, _ in sites}

  def recorded(*leaves):
    outs, operands = _evaluate(closed.jaxpr, closed.consts, leaves, want)
    return outs, [operands[site][operand] for site, operand in sites]

  return jax.jit(recorded)


# ---------------------------------------------------------------------------------------------
# Any model: layouts and links.


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a layer's kernel meets its activation in its one product `use`."""
  kernel: int  # flat params index of the kernel
  in_axis: int
  out_axis: int
  act_axis: int  # feature axis of the activation operand
  use: _Use


@dataclasses.dataclass(frozen=True)
class _Link:
  """P -> N: P's channels may be removed (see the module docstring)."""
  layer: str
  next: str
  positions: int  # rows of N's kernel per channel of P (flatten: p * C + j)
  foldable: bool  # a constant channel's contribution is one constant per output of N
  next_bias: int | None  # flat params index of N's bias
  slices: tuple[tuple[str, int], ...]  # ('params' | 'state', flat index) of per-channel leaves


@dataclasses.dataclass(frozen=True)
class Removal:
  """The result of `remove_dead_channels`.

  params, masks, model_state: the smaller model (same tree types and structure as given).
  removed: {layer: channels removed}; kept: {layer: dead channels kept (a nonzero constant
  feeding a padded convolution or a layer without bias)}; widths: {layer: output channels now}.
  checks: the verification (see the module docstring): max |output difference| of the
  zeroed-rows model, of the randomised-channels probe and of the smaller model itself (None
  when it was not run), the bound they were held to, and `small_model` saying how it was run.
  """

  params: PyTree
  masks: PyTree
  model_state: PyTree
  removed: dict[str, int]
  kept: dict[str, int]
  widths: dict[str, int]
  checks: dict[str, Any]


def _layout(use: _Use, kernel_shape: tuple[int, ...], kernel: int) -> _Layout | str:
  """Which kernel axes are the input and output features, or why that is unknown."""
  name = use.layer
  if use.primitive == "conv_general_dilated":
    p = use.params
    if use.kernel_pos != 1:
      return f"{name}'s kernel is the input operand of its convolution"
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
      return (f"{name} is a grouped convolution (feature_group_count="
              f"{p.get('feature_group_count', 1)}): its input channels are tied to its output "
              "channels")
    lhs_spec, rhs_spec, _ = p["dimension_numbers"]
    return _Layout(kernel, rhs_spec[1], rhs_spec[0], lhs_spec[1], use)
  (lc, rc), (lb, rb) = use.params["dimension_numbers"]
  kc, kb, ac = (rc, rb, lc) if use.kernel_pos == 1 else (lc, lb, rc)
  if kb:
    return f"{name}'s kernel enters a batched matrix product"
  free = [a for a in range(len(kernel_shape)) if a not in kc]
  if len(kc) != 1 or len(free) != 1 or len(ac) != 1:
    return (f"{name}'s kernel {tuple(kernel_shape)} has {len(kc)} input and {len(free)} output "
            "axes (DenseGeneral): only one of each is supported")
  return _Layout(kernel, int(kc[0]), int(free[0]), int(ac[0]), use)


def _layout_or_reason(name: str, uses: Sequence[_Use], kernel_shape: tuple[int, ...],
                      kernel: int) -> _Layout | str:
  """The layout of a layer whose kernel has exactly one use, else why it has none."""
  if len(uses) == 1:
    return _layout(uses[0], kernel_shape, kernel)
  if not uses:
    return (f"{name}'s weights feed no convolution or matrix product with an activation (an "
            "embedding lookup?)")
  return f"{name}'s weights are used {len(uses)} times (shared)"


@dataclasses.dataclass(frozen=True)
class _Graph:
  """A traced model's layers.

  leaves, flow: its flat leaves and its dataflow. layouts: {layer: its `_Layout`, or why it has
  none} for every prunable layer, tree order; tracked: the layers with a layout; channels:
  {tracked layer: output channels}; consumers: {layer: the layers its outputs feed, trace order}.
  """
  leaves: _Leaves
  flow: _Dataflow
  layouts: Mapping[str, _Layout | str]
  tracked: Mapping[str, _Layout]
  channels: Mapping[str, int]
  consumers: Mapping[str, list[str]]


def _graph(leaves: _Leaves, flow: _Dataflow) -> _Graph:
  """The `_Graph` of a model: each prunable layer's layout from its kernel's uses in `flow`."""
  layouts = {name: _layout_or_reason(name, flow.uses.get(name, ()), leaves.params[k].shape, k)
             for name, k in leaves.kernels.items()}
  tracked = {name: lay for name, lay in layouts.items() if not isinstance(lay, str)}
  channels = {name: leaves.params[lay.kernel].shape[lay.out_axis] for name, lay in tracked.items()}
  consumers = {name: [u.layer for us in flow.uses.values() for u in us if name in u.sources]
               for name in leaves.kernels}
  return _Graph(leaves, flow, layouts, tracked, channels, consumers)


def _chain_entries(chain: Sequence[str | tuple[str, str | None]] | None, layers: Sequence[str]
                   ) -> tuple[list[str], dict[str, str | None]]:
  """(the layers that may lose channels, in chain order; {layer: the normalisation `chain`
  declares for its outputs, None: none}). chain None: every prunable layer, nothing declared.
  UserError for a chain entry that is not a prunable layer."""
  if chain is None:
    return list(layers), {}
  names, norms = [], {}
  for entry in chain:
    name, norm = (entry, "") if isinstance(entry, str) else tuple(entry)
    if name not in layers:
      raise UserError(f"chain names layer '{name}', the model's prunable layers are: "
                      f"{', '.join(layers)}")
    names.append(name)
    if norm != "":
      norms[name] = norm
  return names, norms


def _removable(names: Sequence[str], graph: _Graph) -> list[str]:
  """`names` without the layers whose outputs are only the model's outputs (they keep them)."""
  return [name for name in names
          if not (name in graph.flow.output_labels and not graph.consumers[name])]


def _merge_message(layer: str, primitive: str, others: list[str]) -> str:
  other = " and ".join(o if o == _INPUT else f"{o}'s outputs" for o in others)
  if primitive in ("add", "add_any", "sub"):
    return (f"{layer}'s outputs are added to {other} (residual): removing its channels would "
            "break the add")
  if primitive == "concatenate":
    return (f"{layer}'s outputs are concatenated with {other}: removing its channels would "
            "shift the channels of what follows")
  if primitive in ("mul", "div", "dot_general"):
    return (f"{layer}'s outputs are multiplied with {other} ({primitive}, e.g. gating or "
            "attention): removing its channels would break the product")
  return (f"{layer}'s outputs are combined with {other} in `{primitive}`: removing its channels "
          "would break that")


def _combined_kernel_message(layer: str, extra_leaves: frozenset, leaves: _Leaves) -> str:
  return (f"{layer}'s kernel is combined with "
          f"{', '.join(sorted(leaves.name(i) for i in extra_leaves))} before use")


def _why_outputs_not_followed(name: str, graph: _Graph) -> str | None:
  """Why P's outputs do not feed exactly one layer and nothing else (no merge with other values,
  not a model output), or None."""
  flow = graph.flow
  for primitive, groups in flow.merges:
    if any(name in g for g in groups):
      others = sorted(set().union(*groups) - {name}, key=lambda o: (o == _INPUT, o))
      return _merge_message(name, primitive, others)
  if name in flow.output_labels:
    return f"{name}'s outputs are also outputs of the model"
  used_by = graph.consumers[name]
  if not used_by:
    return f"{name}'s outputs reach no convolution or dense layer"
  if len(used_by) > 1:
    return (f"{name}'s outputs feed {' and '.join(used_by)}: removing its channels would change "
            "all of them")
  return None


def _why_next_not_followed(name: str, nxt: str, graph: _Graph) -> str | None:
  """Why N (the one layer P feeds) does not take P's outputs alone through its kernel, or None."""
  nlay = graph.layouts[nxt]
  if isinstance(nlay, str):
    return f"{name}'s outputs feed {nxt}, and {nlay}"
  if nlay.use.sources != {name}:
    return (f"{nxt}'s inputs combine {name}'s outputs with "
            f"{', '.join(sorted(nlay.use.sources - {name}))}")
  if nlay.use.extra_leaves:
    return _combined_kernel_message(nxt, nlay.use.extra_leaves, graph.leaves)
  return None


def _rows_per_channel(name: str, nxt: str, graph: _Graph) -> int | str:
  """N's input rows per channel of P: 1, or positions of a flatten into a dense layer (N's
  features a multiple of P's channels); else why N's inputs are not P's channels."""
  channels = graph.channels[name]
  nlay = graph.tracked[nxt]
  features = graph.leaves.params[nlay.kernel].shape[nlay.in_axis]
  if features == channels:
    return 1
  if nlay.use.primitive == "dot_general" and features % channels == 0:
    return features // channels
  return (f"{nxt} takes {features} input features from {name}'s {channels} channels (not a "
          "flatten of them)")


def _channel_leaves(name: str, graph: _Graph) -> tuple[tuple[str, int], ...] | str:
  """(tree, index) of the leaves that meet P's outputs and hold one value per channel of P
  (shape (1, ..., 1, C)); broadcast scalars are skipped. Else why a leaf cannot be sliced."""
  leaves, flow, channels = graph.leaves, graph.flow, graph.channels[name]
  kernel_layers = leaves.kernel_layers
  slices = []
  for i in sorted(flow.coupled.get(name, ())):
    shape = leaves.shape(i)
    if i in kernel_layers:
      return (f"{name}'s outputs meet {kernel_layers[i]}'s weights outside a convolution or "
              "matrix product")
    shared = [o for o, coupled in flow.coupled.items() if o != name and i in coupled]
    if shared:
      return f"{leaves.name(i)} is applied to the outputs of both {name} and {shared[0]}"
    if all(d == 1 for d in shape):
      continue  # a broadcast scalar: no channel axis
    if shape[-1] != channels or any(d != 1 for d in shape[:-1]):
      return (f"{leaves.name(i)} {tuple(shape)} meets {name}'s outputs but is not one value per "
              f"channel of {name} ({channels})")
    slices.append(leaves.tree_index(i))
  return tuple(slices)


def _foldable(use: _Use) -> bool:
  """Whether a constant input channel of this product adds one constant per output channel: a
  matrix product, or a convolution without padding and without input dilation."""
  return use.primitive == "dot_general" or (
      all(lo == 0 and hi == 0 for lo, hi in use.params["padding"]) and
      all(d == 1 for d in use.params.get("lhs_dilation", ())))


def _next_bias(nxt: str, graph: _Graph) -> int | None:
  """Flat params index of N's bias: N's leaf 'bias', one value per output, added to N's
  outputs; None when N has none."""
  leaves, nlay = graph.leaves, graph.tracked[nxt]
  next_channels = leaves.params[nlay.kernel].shape[nlay.out_axis]
  bias = [i for i in graph.flow.coupled.get(nxt, ()) if i < len(leaves.params) and
          layers_lib.layer_name(leaves.param_paths[i]) == nxt and
          layers_lib.leaf_name(leaves.param_paths[i]) == "bias" and
          leaves.params[i].shape == (next_channels,)]
  return bias[0] if bias else None


def _norm_mismatch(name: str, declared: str | None, slices: Sequence[tuple[str, int]],
                   leaves: _Leaves) -> str | None:
  """Why the normalisation `chain` declares for P's outputs is not the one the model applies
  (the layers of P's per-channel leaves other than P), or None when it is."""
  norms = sorted({layers_lib.layer_name(leaves.path(tree, i)) for tree, i in slices} - {name})
  ok = (not norms if declared is None else
        bool(norms) and all(n == declared or n.endswith("/" + declared) for n in norms))
  if ok:
    return None
  return (f"chain says {name}'s outputs are normalised by {declared}, but the model applies "
          f"{', '.join(norms) or 'no normalisation'} to them")


def _link(name: str, graph: _Graph, declared_norms: Mapping[str, str | None]) -> _Link | str:
  """P -> N when P's channels can be removed (a linear link, module docstring), else why not."""
  lay = graph.layouts[name]
  if isinstance(lay, str):
    return lay
  if lay.use.extra_leaves:
    return _combined_kernel_message(name, lay.use.extra_leaves, graph.leaves)
  if (why := _why_outputs_not_followed(name, graph)) is not None:
    return why
  nxt = graph.consumers[name][0]
  if (why := _why_next_not_followed(name, nxt, graph)) is not None:
    return why
  positions = _rows_per_channel(name, nxt, graph)
  if isinstance(positions, str):
    return positions
  slices = _channel_leaves(name, graph)
  if isinstance(slices, str):
    return slices
  if name in declared_norms and (
      why := _norm_mismatch(name, declared_norms[name], slices, graph.leaves)) is not None:
    return why
  return _Link(name, nxt, positions, _foldable(graph.tracked[nxt].use), _next_bias(nxt, graph),
               slices)


# ---------------------------------------------------------------------------------------------
# Any model: dead channels, and the refusal of those that cannot be removed.


def _inputless(layout: _Layout, mask: np.ndarray, alive_rows: np.ndarray | None) -> np.ndarray:
  """bool (output channels,): True where the kernel `mask` keeps no weight from an alive input
  row (alive_rows: bool (input rows,), None: all rows alive)."""
  if alive_rows is not None:
    mask = np.compress(alive_rows, mask, axis=layout.in_axis)
  mask = np.moveaxis(mask, layout.out_axis, -1)
  return ~mask.reshape(-1, mask.shape[-1]).any(axis=0)


def _rows_with_output(layout: _Layout, mask: np.ndarray, alive_cols: np.ndarray | None
                      ) -> np.ndarray:
  """bool (input rows,): True where the kernel `mask` keeps a weight to an alive output channel
  (alive_cols: bool (output channels,), None: all alive)."""
  if alive_cols is not None:
    mask = np.compress(alive_cols, mask, axis=layout.out_axis)
  mask = np.moveaxis(mask, layout.in_axis, 0)
  return mask.reshape(mask.shape[0], -1).any(axis=1)


def _dead_with_layout(name: str, graph: _Graph) -> bool:
  """A tracked layer has a channel with no inputs, or (feeding one tracked layer, channels
  fastest) with no outputs."""
  masks, lay = graph.leaves.masks, graph.tracked[name]
  if _inputless(lay, masks[lay.kernel], None).any():
    return True
  nxts = graph.consumers[name]
  if len(nxts) != 1 or nxts[0] not in graph.tracked:
    return False
  nlay, channels = graph.tracked[nxts[0]], graph.channels[name]
  rows = _rows_with_output(nlay, masks[nlay.kernel], None)
  return rows.size % channels == 0 and bool((~rows.reshape(-1, channels).any(axis=0)).any())


def _dead_by_kernel_mask(name: str, graph: _Graph) -> bool:
  """A layer without a layout has an output unit whose kernel slice is all pruned (units: the
  free axes of a matrix product, else the kernel's last axis)."""
  m = graph.leaves.masks[graph.leaves.kernels[name]]
  uses = graph.flow.uses.get(name, ())
  if uses and uses[0].primitive == "dot_general":  # units over all output axes
    (lc, rc), _ = uses[0].params["dimension_numbers"]
    kc = list(rc if uses[0].kernel_pos == 1 else lc)
    m = np.moveaxis(m, kc, list(range(len(kc)))).reshape(
        int(np.prod([m.shape[a] for a in kc])), -1)
  else:
    m = m.reshape(-1, m.shape[-1]) if m.ndim else m.reshape(1, 1)
  return bool((~m.any(axis=0)).any())


def _refuse_dead_unlinked(verdicts: Mapping[str, _Link | str], graph: _Graph) -> None:
  """UserError for the first layer whose verdict is a reason, not a link, and that has dead
  channels (named, with the reason). Layers without dead channels are never refused."""
  for name, verdict in verdicts.items():
    if isinstance(verdict, _Link):
      continue
    dead = (_dead_with_layout(name, graph) if name in graph.tracked else
            _dead_by_kernel_mask(name, graph))
    if dead:
      raise UserError(f"cannot remove the dead channels of {name}: {verdict} (leave {name} out "
                      "of `chain` to keep its channels)")


def _linear_links(graph: _Graph, chain) -> dict[str, _Link]:
  """{P: P -> N} for the layers of `chain` (default: all) that may lose channels; UserError for
  a chain entry the model does not have, a declared normalisation it does not apply, or a layer
  with dead channels that is not a linear link. Nothing is computed before these refusals."""
  names, declared_norms = _chain_entries(chain, list(graph.leaves.kernels))
  verdicts = {name: _link(name, graph, declared_norms) for name in _removable(names, graph)}
  _refuse_dead_unlinked(verdicts, graph)
  return {name: v for name, v in verdicts.items() if isinstance(v, _Link)}

# ---------------------------------------------------------------------------------------------
# Any model: the removal plan (which channels go, which constants are folded).


def _rows_of(link: _Link, channels: int, keep: np.ndarray) -> np.ndarray:
  """int (positions * keep.sum(),): N's input rows of P's channels where `keep` (bool
  (channels,)) is True, flatten order p * channels + j, positions outermost."""
  return (np.arange(link.positions)[:, None] * channels + np.flatnonzero(keep)[None, :]).ravel()


def _alive_input_rows(prev: _Link | None, alive: Mapping[str, np.ndarray],
                      channels: Mapping[str, int]) -> np.ndarray | None:
  """bool (P's input rows,): the rows fed by alive channels of the layer before P (the link
  `prev` -> P); None when no link feeds P (all rows alive)."""
  if prev is None:
    return None
  out = np.zeros(channels[prev.layer] * prev.positions, bool)
  out[_rows_of(prev, channels[prev.layer], alive[prev.layer])] = True
  return out


def _next_input_sites(links: Mapping[str, _Link], tracked: Mapping[str, _Layout]
                      ) -> list[tuple[tuple[int, ...], int]]:
  """Sorted (eqn site, operand position) of every link's N's activation operand."""
  return sorted({(tracked[ln.next].use.site, 1 - tracked[ln.next].use.kernel_pos)
                 for ln in links.values()})


def _channel_constant(next_input: np.ndarray, link: _Link, next_layout: _Layout, channels: int,
                      j: int) -> float | None:
  """What channel j of P feeds N (`next_input`: N's activation operand on the example inputs,
  P's channels flattened p * channels + j along its feature axis) when that is one constant
  over the batch and all positions (its float64 mean), else None."""
  rows = np.arange(link.positions) * channels + j
  values = np.take(next_input, rows, axis=next_layout.act_axis)
  first = values.flat[0] if values.size else 0.0
  if not np.allclose(values, first, rtol=1e-6, atol=1e-7 * max(1.0, abs(first))):
    return None
  return float(np.mean(values, dtype=np.float64))


def _row_sums(next_kernel: np.ndarray, next_layout: _Layout, link: _Link, channels: int,
              j: int) -> np.ndarray:
  """float64 (N's output channels,): N's kernel summed over the rows of channel j of P: what a
  constant 1 on channel j adds to each output of N (at every position when foldable)."""
  w = _take(next_kernel, next_layout.in_axis,
            np.arange(link.positions) * channels + j).astype(np.float64)
  w = np.moveaxis(w, next_layout.out_axis, -1)
  return w.reshape(-1, w.shape[-1]).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which channels of each link's P go, and what N's bias gains.

  alive: {P: bool (P's channels,)} the channels that stay; kept: {P: bool (P's channels,)} the
  dead ones among them (a constant that cannot be folded, or not constant); bias_delta: {N:
  float64 (N's output channels,)} the folded constants c * (N's row sums), summed. Keys in the
  links' order. A channel once removed never comes back.
  """
  alive: Mapping[str, np.ndarray]
  kept: Mapping[str, np.ndarray]
  bias_delta: Mapping[str, np.ndarray]

  @property
  def removed(self) -> dict[str, int]:
    return {name: int((~alive).sum()) for name, alive in self.alive.items()}

  @property
  def gone(self) -> list[str]:
    """The layers that lose channels, links' order."""
    return [name for name, n in self.removed.items() if n]


def _link_step(link: _Link, alive: Mapping[str, np.ndarray], bias_delta: np.ndarray,
               prev: _Link | None, graph: _Graph, next_inputs: Mapping
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(P's alive, P's kept, N's bias_delta) after one pass over link P -> N given `alive` (all
  links): an alive channel with no weight to an alive output of N goes; one with no weight from
  an alive input goes when its constant c (read off `next_inputs`) is 0, or is foldable into
  N's bias (bias_delta + c * row sums); otherwise it stays and is kept."""
  name, channels = link.layer, graph.channels[link.layer]
  lay, nlay = graph.tracked[name], graph.tracked[link.next]
  masks = graph.leaves.masks
  inputless = _inputless(lay, masks[lay.kernel], _alive_input_rows(prev, alive, graph.channels))
  used = _rows_with_output(nlay, masks[nlay.kernel], alive.get(link.next))
  outputless = ~used[_rows_of(link, channels, np.ones(channels, bool))].reshape(
      link.positions, channels).any(axis=0)
  stays, kept, delta = alive[name].copy(), np.zeros(channels, bool), bias_delta
  for j in np.flatnonzero(alive[name] & (outputless | inputless)):
    if not outputless[j]:
      c = _channel_constant(next_inputs[nlay.use.site], link, nlay, channels, j)
      if c is None or (c != 0 and not (link.foldable and link.next_bias is not None)):
        kept[j] = True
        continue
      if c != 0:
        delta = delta + c * _row_sums(graph.leaves.params[nlay.kernel], nlay, link, channels, j)
    stays[j] = False
  return stays, kept, delta


def _sweep(plan: _Plan, links: Mapping[str, _Link], graph: _Graph, next_inputs: Mapping
           ) -> _Plan:
  """One pass over the links in order, each seeing the removals of the ones before it."""
  alive, kept, delta = dict(plan.alive), dict(plan.kept), dict(plan.bias_delta)
  prev = {ln.next: ln for ln in links.values()}
  for name, link in links.items():
    alive[name], kept[name], delta[link.next] = _link_step(
        link, alive, delta[link.next], prev.get(name), graph, next_inputs)
  return _Plan(alive, kept, delta)


def _removal_plan(links: Mapping[str, _Link], graph: _Graph, next_inputs: Mapping) -> _Plan:
  """Sweeps until no channel goes: removing channels of one layer can kill channels of the
  layers next to it."""
  plan = _Plan(alive={name: np.ones(graph.channels[name], bool) for name in links},
               kept={name: np.zeros(graph.channels[name], bool) for name in links},
               bias_delta={ln.next: np.zeros(graph.channels[ln.next], np.float64)
                           for ln in links.values()})
  while True:
    swept = _sweep(plan, links, graph, next_inputs)
    if swept.removed == plan.removed:
      return swept
    plan = swept


# ---------------------------------------------------------------------------------------------
# Any model: checks, and the smaller model.


def _take(x: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
  return np.take(x, index, axis=axis)


def _set(x: np.ndarray, axis: int, index: np.ndarray, value) -> np.ndarray:
  x = np.array(x, copy=True)
  where = [slice(None)] * x.ndim
  where[axis] = index
  x[tuple(where)] = value
  return x


def _outputs_diff(reference, outputs) -> float:
  import jax
  worst = 0.0
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(outputs)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      return float("inf")
    d = np.abs(a - b)
    if d.size and not np.all(np.isfinite(d)):
      return float("inf")
    worst = max(worst, float(d.max()) if d.size else 0.0)
  return worst


def _bound(reference, rtol: float, atol: float) -> float:
  import jax
  scale = max((float(np.abs(np.asarray(a, np.float64)).max()) if np.size(a) else 0.0)
              for a in jax.tree.leaves(reference))
  return atol + rtol * scale


def _randomised_channels(x, dead: np.ndarray, is_state: bool, rng: np.random.Generator
                         ) -> np.ndarray:
  """A copy of per-channel leaf `x` (shape (..., channels)) with the `dead` channels replaced
  by random values: scaled by U(0.5, 2) plus 0.1 for a nonnegative statistic (a variance),
  else shifted by N(0, std(x)^2)."""
  x = np.array(x, copy=True)
  sel = x[..., dead]
  if is_state and np.all(x >= 0):
    new = sel * rng.uniform(0.5, 2.0, sel.shape) + 0.1
  else:
    new = sel + rng.standard_normal(sel.shape) * (float(np.std(x)) or 1.0)
  x[..., dead] = new.astype(x.dtype)
  return x


def _randomised(params: list, state: list, layout: _Layout, link: _Link, dead: np.ndarray,
                rng: np.random.Generator) -> tuple[list, list]:
  """(params, state) leaves with P's kernel columns of the `dead` channels, and the same
  channels of P's per-channel leaves, replaced by random values."""
  params, state = list(params), list(state)
  k = params[layout.kernel]
  scale = float(np.std(k)) or 1.0
  shape = list(k.shape)
  shape[layout.out_axis] = int(dead.sum())
  params[layout.kernel] = _set(k, layout.out_axis, np.flatnonzero(dead),
                               (rng.standard_normal(shape) * scale).astype(k.dtype))
  for tree, i in link.slices:
    values = params if tree == "params" else state
    values[i] = _randomised_channels(values[i], dead, tree == "state", rng)
  return params, state


def _with_folded_constants(params: list, links: Mapping[str, _Link], plan: _Plan) -> list:
  """params leaves with each N's bias plus its bias_delta (in float64, cast back)."""
  params = list(params)
  for link in links.values():
    d = plan.bias_delta[link.next]
    if link.next_bias is not None and d.any():
      b = params[link.next_bias]
      params[link.next_bias] = (b.astype(np.float64) + d).astype(b.dtype)
  return params


def _variant(graph: _Graph, links: Mapping[str, _Link], plan: _Plan, probe: bool, seed: int
             ) -> tuple[list, list]:
  """(params, state) leaves of the model at its original shapes: N's rows of the removed
  channels zeroed and the folded constants added to N's biases; with `probe`, the removed
  channels' kernels and per-channel leaves also randomised (seeded)."""
  rng = np.random.default_rng(seed)
  params, state = list(graph.leaves.params), list(graph.leaves.state)
  for name in plan.gone:
    link, nlay = links[name], graph.tracked[links[name].next]
    dead = ~plan.alive[name]
    params[nlay.kernel] = _set(params[nlay.kernel], nlay.in_axis,
                               _rows_of(link, graph.channels[name], dead), 0)
    if probe:
      params, state = _randomised(params, state, graph.tracked[name], link, dead, rng)
  return _with_folded_constants(params, links, plan), state


def _check_variants(run: Callable, reference, bound: float, graph: _Graph,
                    links: Mapping[str, _Link], plan: _Plan, seed: int) -> dict[str, float]:
  """{zeroed_max_abs_diff, probe_max_abs_diff}: max |outputs - reference| of the zeroed and the
  probe `_variant` (0.0 when nothing goes). UserError, naming the links, above `bound`."""
  if not plan.gone:
    return {"zeroed_max_abs_diff": 0.0, "probe_max_abs_diff": 0.0}
  diffs = {}
  for label, probe in (("zeroed_max_abs_diff", False), ("probe_max_abs_diff", True)):
    params, state = _variant(graph, links, plan, probe, seed)
    diff = _outputs_diff(reference, run(*params, *state, *graph.leaves.inputs)[0])
    if not diff <= bound:
      layers_text = ", ".join(f"{n} -> {links[n].next}" for n in plan.gone)
      what = ("with their rows zeroed and constants folded" if not probe else
              "when their weights and normalisation are randomised")
      raise UserError(
          f"removing the dead channels of {layers_text} changes the model's outputs {what} "
          f"(max |diff| {diff:.3g} > {bound:.3g}): the path between these layers is not "
          "per-channel (a normalisation across channels, a flatten in another order, another "
          "use of these outputs)")
    diffs[label] = diff
  return diffs


@dataclasses.dataclass(frozen=True)
class _Cut:
  """Keep only `index` (int, sorted) along `axis` of leaf `leaf` of `tree`: 'params' (the
  params and their masks) or 'state'."""
  tree: str
  leaf: int
  axis: int
  index: np.ndarray


def _slicing_plan(links: Mapping[str, _Link], plan: _Plan, graph: _Graph) -> tuple[_Cut, ...]:
  """The cuts that remove the gone channels: P's kernel columns, N's kernel rows, and the same
  channels (last axis) of P's per-channel leaves (bias, normalisation, statistics)."""
  cuts = []
  for name in plan.gone:
    link, lay, nlay = links[name], graph.tracked[name], graph.tracked[links[name].next]
    keep = np.flatnonzero(plan.alive[name])
    rows = np.sort(_rows_of(link, graph.channels[name], plan.alive[name]))
    cuts += [_Cut("params", lay.kernel, lay.out_axis, keep),
             _Cut("params", nlay.kernel, nlay.in_axis, rows)]
    cuts += [_Cut(tree, i, -1, keep) for tree, i in link.slices]
  return tuple(cuts)


def _apply_cuts(cuts: Sequence[_Cut], params: Sequence, masks: Sequence, state: Sequence
                ) -> tuple[list, list, list]:
  """(params, masks, state) leaves after the cuts, in order (the given lists are not changed)."""
  params, masks, state = list(params), list(masks), list(state)
  for cut in cuts:
    if cut.tree == "params":
      params[cut.leaf] = _take(params[cut.leaf], cut.axis, cut.index)
      masks[cut.leaf] = _take(masks[cut.leaf], cut.axis, cut.index)
    else:
      state[cut.leaf] = _take(np.asarray(state[cut.leaf]), cut.axis, cut.index)
  return params, masks, state


def _masks_of_folded_biases(masks: Sequence, links: Mapping[str, _Link], plan: _Plan) -> list:
  """masks leaves with N's bias marked kept wherever a constant was folded into it (a bias
  that was 0, so masked when masks are derived from params != 0, now holds the constant)."""
  masks = list(masks)
  for link in links.values():
    d = plan.bias_delta[link.next]
    if link.next_bias is not None and d.any():
      masks[link.next_bias] = masks[link.next_bias] | (d != 0)
  return masks


def _smaller_model(graph: _Graph, links: Mapping[str, _Link], plan: _Plan, seed: int
                   ) -> tuple[PyTree, PyTree, PyTree, dict[str, int]]:
  """(params, masks, model_state, widths) of the smaller model: the zeroed `_variant` (folded
  constants in N's biases) cut by the `_slicing_plan`; widths: {tracked layer: channels now}."""
  zeroed_params, state = _variant(graph, links, plan, probe=False, seed=seed)
  masks = _masks_of_folded_biases(graph.leaves.masks, links, plan)
  params, masks, state = _apply_cuts(_slicing_plan(links, plan, graph), zeroed_params, masks,
                                     state)
  widths = {name: int(params[lay.kernel].shape[lay.out_axis])
            for name, lay in graph.tracked.items()}
  return (*graph.leaves.trees(params, masks, state), widths)

def _run_small_model(fn, build, widths: dict[str, int], params: PyTree, state: PyTree, inputs,
                     reference, bound: float, gone: Sequence[str]) -> tuple[float | None, str]:
  """(max |outputs - reference|, how it ran) of the smaller model (`gone`: the layers that lost
  channels), through build(widths) when given, else `fn`; (None, why) when Linen refuses the
  new shapes without `build`. UserError when it does not run, or differs by more than `bound`."""
  import jax

  from lwc import model_fn as model_fn_lib
  small_fn = model_fn_lib.as_model_fn(build(dict(widths))) if build is not None else fn
  try:
    small_out = jax.jit(lambda p, s, x: small_fn(p, s, x, train=False)[0])(params, state, inputs)
  except Exception as e:  # noqa: BLE001 - reported, or refused below
    from flax import errors as flax_errors
    if build is None and isinstance(e, flax_errors.ScopeParamShapeError):
      return None, ("not run: Linen checks parameter shapes against the module's features; pass "
                    "build=widths -> model to run it")
    raise UserError(f"the smaller model does not run ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
  diff = _outputs_diff(reference, small_out)
  if not diff <= bound:
    raise UserError(f"the smaller model's outputs differ from the original's (max |diff| "
                    f"{diff:.3g} > {bound:.3g}) after removing channels of {', '.join(gone)}")
  return diff, "ran (build)" if build is not None else "ran (model_fn)"


def remove_dead_channels(model_fn, params: PyTree, masks: PyTree | None, inputs,
                         model_state: PyTree | None = None, *,
                         chain: Sequence[str | tuple[str, str | None]] | None = None,
                         build: Callable[[dict[str, int]], Any] | None = None,
                         is_prunable=layers_lib.DEFAULT, rtol: float = 1e-4, atol: float = 1e-5,
                         seed: int = 0) -> Removal:
  """Removes the dead channels of any Linen/NNX model (module docstring), checked on `inputs`.

  Args:
    model_fn: a model function (`lwc.linen_model(module)`, `lwc.nnx_model(module)[0]`), or a Linen
      module / its `apply`.
    params, masks: the params tree and its masks (`lwc.init_masks` structure; None: a weight is
      kept iff it is nonzero). Pruned weights must be 0.
    inputs: example inputs (a batch) used to trace the model, to read the constants of channels
      with no inputs and to check the result.
    model_state: the model's other collections (Linen `{'batch_stats': ...}`, the NNX state).
    chain: layers whose channels may be removed, in any order, optionally with the name of the
      normalisation of their outputs (None: none), checked against the trace, e.g.
      `[("conv1", "bn1"), ("conv2", "bn2"), ("head", None)]`. Default: every prunable layer.
      Layers whose outputs are model outputs never lose channels; layers left out keep theirs
      (their inputs may still shrink when the layer before loses channels).
    build: `widths -> model function` (or module) of the model at the new widths
      ({layer: output channels}), to run the smaller model itself as the last check. Without it
      `model_fn` is tried (works for NNX; Linen refuses other shapes, then that check is skipped
      and `checks['small_model']` says so).
    is_prunable: which leaves are layer weights (lwc.layers).
    rtol, atol: outputs must agree within atol + rtol * max|outputs|.
    seed: of the random values of the probe check.

  Returns: a `Removal`. Inputs are never modified.

  Raises:
    UserError: a layer with dead channels sits in a coupling this cannot follow (named), a chain
    entry does not match the model, or a check fails.
  """
  from lwc import model_fn as model_fn_lib

  fn = model_fn_lib.as_model_fn(model_fn)
  leaves = _flat_leaves(params, masks, {} if model_state is None else model_state, inputs,
                        is_prunable)
  graph = _graph(leaves, _trace(fn, leaves))
  links = _linear_links(graph, chain)
  sites = _next_input_sites(links, graph.tracked)
  run = _recorder(graph.flow.jaxpr, sites)
  reference, operands = run(*leaves.args)
  next_inputs = {site: np.asarray(a) for (site, _), a in zip(sites, operands)}
  plan = _removal_plan(links, graph, next_inputs)
  bound = _bound(reference, rtol, atol)
  checks: dict[str, Any] = {"bound": bound,
                            **_check_variants(run, reference, bound, graph, links, plan, seed)}
  small_params, small_masks, small_state, widths = _smaller_model(graph, links, plan, seed)
  diff, how = (_run_small_model(fn, build, widths, small_params, small_state, inputs, reference,
                                bound, plan.gone) if plan.gone else (None, "nothing removed"))
  checks.update(small_model_max_abs_diff=diff, small_model=how)
  removed, kept = plan.removed, {name: int(k.sum()) for name, k in plan.kept.items()}
  return Removal(params=small_params, masks=small_masks, model_state=small_state,
                 removed={name: removed.get(name, 0) for name in graph.tracked},
                 kept={name: kept.get(name, 0) for name in graph.tracked},
                 widths=widths, checks=checks)
