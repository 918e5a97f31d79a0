"""Per-layer tables as in the paper's Tables 2-5: Weights, FLOP, Act%, Weights%, FLOP%.

Works on any model function (`lwc.model_fn`: a Linen module's `apply`, `lwc.linen_model(...)`,
`lwc.nnx_model(...)[0]`, or a plain function with that convention), evaluated in eval mode with
its `model_state` (BatchNorm statistics). Layers are the prunable leaves of `lwc.layers`.

How layers are found in the computation: the forward pass is traced to a jaxpr (nothing runs for
FLOP; one jitted pass per batch for Act%) and every prunable weight is followed from the model's
inputs through shape and dtype operations (reshape, transpose, casts, slices, elementwise masks)
to the operations that consume it. So it needs no hook into Linen or NNX and sees every use,
shared layers and raw `self.param` weights included.

Definitions (those that reproduce the paper's numbers):
  Weights  = entries of the layer's weight (biases not counted).
  FLOP     = 2 per multiply-add for one example, summed over the dot products and convolutions
             the weight enters:
               dense: 2 * kernel entries (LeNet-300-100 fc1: 2 * 235,200 = 470K);
               convolution: 2 * kernel entries * output positions H_out * W_out
                 (LeNet-5 conv1: 2 * 500 * 24 * 24 = 576K; grouped kernels hold in/groups);
               DenseGeneral (attention query/key/value/out projections): 2 * prod(kernel shape)
                 * positions (the sequence length, for a (B, L, ...) input);
               embedding: 0 -- a lookup (gather) is no multiply-add; an embedding also used as
                 the output projection (`attend`, tied weights) counts that dot product;
             a weight inside `lax.scan` (`nn.scan`) counts `length` times, inside a while loop
             once, inside `lax.cond` its costliest branch. A prunable weight that never enters
             a dot product or convolution has 0 FLOP.
  Act%     = fraction of non-zero entries of the activation the layer hands on, i.e. of the
             input of the next prunable layer (the operand its weight is multiplied with, after
             the previous layer's ReLU / pooling / normalisation), averaged over the evaluated
             examples; 100% for the last layer, whose outputs are all used, and where the next
             layer has no such input (an embedding's token ids) or uses it only inside
             control flow (`lax.scan`, `while_loop`, `cond`: not entered to measure).
  Weights% = surviving fraction of the weight.
  FLOP%    = Weights% x Act% of the layer's input (the previous layer's Act%; 100% for the first
             layer, whose input is the image), e.g. Table 3 fc2: 19% x 55% ~ 10%.
Rows are the prunable layers in the order the forward pass first uses them; layers it never uses
come last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from lwc import layers as layers_lib
from lwc import masks as masks_lib
from lwc import model_fn as model_fn_lib
from lwc import tracing

PyTree = Any
Predicate = Callable[[Any, Any], bool]

# Operations that hand a weight on unchanged in substance (its layout, dtype or a slice of it).
_SHAPE_OPS = frozenset({
    "convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
    "copy", "copy_p", "reduce_precision", "neg", "rev", "slice", "dynamic_slice", "real",
    "optimization_barrier"})
# Elementwise operations that keep a weight a weight when the result has its shape (w * mask,
# jnp.where(mask, w, 0), w / scale): weight normalisation and masking inside a model.
_ELEMENTWISE = frozenset({"mul", "div", "select_n", "stack", "concatenate"})
_LOOPS = frozenset({"scan", "while", "cond"})


def _forward(apply_fn) -> Callable:
  fn = model_fn_lib.as_model_fn(apply_fn)
  return lambda params, model_state, inputs: fn(params, model_state, inputs, train=False)[0]


def _leaf_tags(params: PyTree, is_prunable: Predicate) -> list[str | None]:
  """Per flattened params leaf: its layer name if prunable, else None."""
  chosen = {jax.tree_util.keystr(path): name
            for name, (path, _) in layers_lib.prunable_leaves(params, is_prunable).items()}
  return [chosen.get(jax.tree_util.keystr(path))
          for path, _ in layers_lib.leaves_with_path(params)]


def _trace(apply_fn, params, model_state, inputs, is_prunable):
  """(closed jaxpr of the eval forward pass, tags of its inputs: layer name or None)."""
  params = layers_lib.as_params(params)
  closed = jax.make_jaxpr(_forward(apply_fn))(params, model_state or {}, inputs)
  tags = _leaf_tags(params, is_prunable)
  return closed, tags + [None] * (len(closed.jaxpr.invars) - len(tags))


def _call_jaxpr(eqn):
  """(jaxpr, consts) of a call-like equation (jit, custom_jvp/vjp, checkpoint) whose inputs and
  outputs are the equation's own, else None."""
  if eqn.primitive.name in _LOOPS:
    return None
  for key in ("jaxpr", "call_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jex_core.ClosedJaxpr):
      sub, consts = sub.jaxpr, sub.consts
    elif isinstance(sub, jex_core.Jaxpr):
      consts = []
    else:
      continue
    if len(sub.invars) == len(eqn.invars) and len(sub.outvars) == len(eqn.outvars):
      return sub, consts
  return None


def _tag_of(tags: dict, atom) -> str | None:
  return None if isinstance(atom, jex_core.Literal) else tags.get(atom)


def _passed_on(eqn, in_tags: list) -> str | None:
  """The layer whose weight this (shape or elementwise) equation hands on, if any."""
  name = eqn.primitive.name
  present = {t for t in in_tags if t is not None}
  if len(present) != 1 or len(eqn.outvars) != 1:
    return None
  tag = present.pop()
  if name in _SHAPE_OPS:
    return tag
  if name in _ELEMENTWISE:
    shapes = [tuple(a.aval.shape) for a, t in zip(eqn.invars, in_tags) if t is not None]
    out = tuple(eqn.outvars[0].aval.shape)
    if name in ("stack", "concatenate") or all(s == out for s in shapes):
      return tag
  return None


def _macs(eqn, operand: int) -> int:
  """Multiply-adds of a dot_general or convolution per call, the weight being `operand`."""
  out = int(np.prod(eqn.outvars[0].aval.shape))
  if eqn.primitive.name == "dot_general":
    (lhs_contract, rhs_contract), _ = eqn.params["dimension_numbers"]
    shape = eqn.invars[operand].aval.shape
    contract = rhs_contract if operand == 1 else lhs_contract
    return out * int(np.prod([shape[d] for d in contract]))
  rhs = eqn.invars[1].aval.shape  # the filter; out-channel dimension first in rhs_spec
  out_channels = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return out * int(np.prod(rhs)) // max(int(out_channels), 1)


_COMPUTE = ("dot_general", "conv_general_dilated")


def _count(jaxpr, in_tags: list, macs: dict, uses: dict, times: int = 1) -> list:
  """Adds each layer's multiply-adds in `jaxpr` (times `times`) to `macs`, first uses to `uses`
  (insertion order); returns the tags of the outputs. Shapes only: nothing is evaluated."""
  tags = {v: t for v, t in zip(jaxpr.invars, in_tags) if t is not None}
  for eqn in jaxpr.eqns:
    t_in = [_tag_of(tags, a) for a in eqn.invars]
    if not any(t is not None for t in t_in):
      continue
    name = eqn.primitive.name
    t_out = [None] * len(eqn.outvars)
    call = _call_jaxpr(eqn)
    if call is not None:
      t_out = _count(call[0], t_in, macs, uses, times)
    elif name == "scan":
      t_out = _count(eqn.params["jaxpr"].jaxpr, t_in, macs, uses, times * eqn.params["length"])
    elif name == "while":
      cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
      t_out = _count(eqn.params["body_jaxpr"].jaxpr, t_in[cn:cn + bn] + t_in[cn + bn:], macs,
                     uses, times)
    elif name == "cond":
      branch_macs = []
      for branch in eqn.params["branches"]:
        branch_macs.append({})
        outs = _count(branch.jaxpr, t_in[1:], branch_macs[-1], uses, times)
        t_out = [a if a is not None else b for a, b in zip(t_out, outs)]
      for layer in {k for m in branch_macs for k in m}:
        macs[layer] = macs.get(layer, 0) + max(m.get(layer, 0) for m in branch_macs)
    elif name in _COMPUTE:
      for i, t in enumerate(t_in[:2]):
        if t is not None:
          uses.setdefault(t, None)
          macs[t] = macs.get(t, 0) + times * _macs(eqn, i)
    else:
      passed = _passed_on(eqn, t_in)
      if passed is None:
        for t in t_in:
          if t is not None:
            uses.setdefault(t, None)  # a lookup (gather) or another use: no multiply-adds
      t_out = [passed]
    for v, t in zip(eqn.outvars, t_out):
      if t is not None:
        tags[v] = t
  return [_tag_of(tags, v) for v in jaxpr.outvars]


def _evaluate(jaxpr, consts, args, in_tags: list, record: Callable) -> tuple[list, list]:
  """Evaluates `jaxpr` (under a trace), calling `record(layer, operand)` with the operand each
  prunable weight is multiplied with (call-like equations are entered; loops are not)."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  tags = {v: t for v, t in zip(jaxpr.invars, in_tags) if t is not None}

  def read(a):
    return a.val if isinstance(a, jex_core.Literal) else env[a]

  for eqn in jaxpr.eqns:
    invals = [read(a) for a in eqn.invars]
    t_in = [_tag_of(tags, a) for a in eqn.invars]
    tagged = any(t is not None for t in t_in)
    call = _call_jaxpr(eqn) if tagged else None
    t_out = [None] * len(eqn.outvars)
    if call is not None:
      outs, t_out = _evaluate(call[0], call[1], invals, t_in, record)
    else:
      outs = tracing.bind(eqn, invals)
      if tagged and eqn.primitive.name in _COMPUTE:
        for i, t in enumerate(t_in[:2]):
          if t is not None and t_in[1 - i] is None:
            record(t, invals[1 - i])
      elif tagged and eqn.primitive.name not in _LOOPS:
        t_out = [_passed_on(eqn, t_in)]
    env.update(zip(eqn.outvars, outs))
    for v, t in zip(eqn.outvars, t_out):
      if t is not None:
        tags[v] = t
  return [read(v) for v in jaxpr.outvars], [_tag_of(tags, v) for v in jaxpr.outvars]


def _first(inputs: PyTree, stop: int, start: int = 0) -> PyTree:
  return jax.tree.map(lambda x: x[start:stop], inputs)


def _num_examples(inputs: PyTree) -> int:
  return int(np.shape(jax.tree.leaves(inputs)[0])[0])


def _layer_order(apply_fn, params, example, model_state, is_prunable) -> tuple[dict, list]:
  """({layer: multiply-adds per example}, rows: layers in first-use order, unused ones last)."""
  closed, tags = _trace(apply_fn, params, model_state, _first(example, 1), is_prunable)
  macs, uses = {}, {}
  _count(closed.jaxpr, tags, macs, uses)
  names = layers_lib.names(params, is_prunable)
  return macs, [n for n in uses if n in names] + [n for n in names if n not in uses]


def layer_flops(apply_fn, params, example, model_state: PyTree | None = None,
                is_prunable: Predicate = layers_lib.DEFAULT) -> dict[str, int]:
  """FLOP per example of each prunable layer (2 per multiply-add; module docstring), from one
  abstract trace of the forward pass on `example[:1]` (nothing runs; abstract params work)."""
  layers_lib.require_prunable(params, is_prunable)
  macs, rows = _layer_order(apply_fn, params, example, model_state, is_prunable)
  return {name: 2 * int(macs.get(name, 0)) for name in rows}


def activation_density(apply_fn, params, images, batch_size: int = 1000,
                       model_state: PyTree | None = None,
                       is_prunable: Predicate = layers_lib.DEFAULT) -> dict[str, float]:
  """Act% of each prunable layer (module docstring) averaged over `images` (N, ...)."""
  layers_lib.require_prunable(params, is_prunable)
  _, rows = _layer_order(apply_fn, params, images, model_state, is_prunable)
  return _activation_density(apply_fn, params, images, batch_size, model_state, is_prunable,
                             rows)


def _activation_density(apply_fn, params, images, batch_size, model_state, is_prunable,
                        rows: list[str]) -> dict[str, float]:
  params = layers_lib.as_params(params)
  model_state = model_state or {}

  sizes: dict[tuple, dict[str, int]] = {}  # per input shape: entries of each layer's operands

  def shape_key(x) -> tuple:
    return tuple((tuple(np.shape(a)), str(a.dtype)) for a in jax.tree.leaves(x))

  @jax.jit
  def counts(p, s, x):
    closed, tags = _trace(apply_fn, p, s, x, is_prunable)
    seen: dict[str, list] = {}
    entries = sizes.setdefault(shape_key(x), {})
    entries.clear()

    def record(layer, operand):
      # Counted per leading index (int32 holds one example's activation), summed on the host.
      seen.setdefault(layer, []).append(
          jnp.count_nonzero(operand, axis=tuple(range(1, operand.ndim))))
      entries[layer] = entries.get(layer, 0) + int(operand.size)

    _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves((p, s, x)), tags, record)
    return seen

  nonzero, total = {}, {}
  n = _num_examples(images)
  for start in range(0, n, batch_size):
    batch = jax.tree.map(jnp.asarray, _first(images, start + batch_size, start))
    out = jax.device_get(counts(params, model_state, batch))
    entries = sizes[shape_key(batch)]
    for name, records in out.items():
      nonzero[name] = nonzero.get(name, 0) + sum(int(np.sum(c, dtype=np.int64)) for c in records)
      total[name] = total.get(name, 0) + entries[name]
  density = {name: nonzero[name] / total[name] for name in total if total[name] > 0}
  # Act% of layer i is the density of layer i+1's input; the last layer's output is all used.
  return {name: density.get(rows[i + 1], 1.0) if i + 1 < len(rows) else 1.0
          for i, name in enumerate(rows)}


def layer_table(apply_fn, params, masks: PyTree, images, model_state: PyTree | None = None,
                is_prunable: Predicate = layers_lib.DEFAULT) -> dict[str, dict]:
  """{layer: {weights, nonzero, flop, act, weights_frac, flop_frac}} plus a 'total' row.

  `apply_fn` is any model function (or a Linen `module.apply`), `model_state` its other
  collections (BatchNorm statistics; eval mode), `params` the (masked) weights whose
  activations are measured, `masks` what counts as surviving.
  """
  flops = layer_flops(apply_fn, params, images, model_state, is_prunable)
  acts = _activation_density(apply_fn, params, images, 1000, model_state, is_prunable,
                             list(flops))
  counts = masks_lib.layer_counts(masks, is_prunable)
  table, previous_act = {}, 1.0
  for name in flops:
    weights_frac = counts[name]["density"]
    table[name] = {"weights": counts[name]["weights"], "nonzero": counts[name]["nonzero"],
                   "flop": flops[name], "act": acts[name], "weights_frac": weights_frac,
                   "flop_frac": weights_frac * previous_act}
    previous_act = acts[name]
  weights = sum(r["weights"] for r in table.values())
  flop = sum(r["flop"] for r in table.values())
  nonzero = sum(r["nonzero"] for r in table.values())
  table["total"] = {
      "weights": weights, "nonzero": nonzero, "flop": flop,
      "act": sum(r["act"] * r["flop"] for r in table.values()) / flop if flop else 1.0,
      "weights_frac": nonzero / weights if weights else 0.0,
      "flop_frac": (sum(r["flop_frac"] * r["flop"] for r in table.values()) / flop if flop
                    else 0.0)}
  return table


def _si(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:g}"


def markdown(table: dict[str, dict]) -> str:
  """The table in the paper's layout: Layer | Weights | FLOP | Act% | Weights% | FLOP%."""
  rows = ["| Layer | Weights | FLOP | Act% | Weights% | FLOP% |", "|---|---|---|---|---|---|"]
  for name, r in table.items():
    rows.append(f"| {name} | {_si(r['weights'])} | {_si(r['flop'])} | {100 * r['act']:.0f}% "
                f"| {100 * r['weights_frac']:.1f}% | {100 * r['flop_frac']:.1f}% |")
  return "\n".join(rows)
