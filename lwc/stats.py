"""Per-layer tables as in the paper's Tables 2-5: Weights, FLOP, Act%, Weights%, FLOP%.

Definitions (those that reproduce the paper's numbers):
  Weights  = entries of the layer's kernel (biases not counted).
  FLOP     = 2 per multiply-add for one example: 2 * kernel entries * output positions
             (output positions = 1 for a dense layer, H_out * W_out for a convolution).
             LeNet-300-100 fc1: 2 * 235,200 = 470K; LeNet-5 conv1: 2 * 500 * 24 * 24 = 576K.
  Act%     = fraction of non-zero entries of the activation the layer hands on, i.e. of the
             input of the next prunable layer (after its ReLU / pooling), averaged over the
             evaluated examples; 100% for the last layer, whose logits are all used.
  Weights% = surviving fraction of the kernel.
  FLOP%    = Weights% x Act% of the layer's input (the previous layer's Act%; 100% for the first
             layer, whose input is the image), e.g. Table 3 fc2: 19% x 55% ~ 10%.
Layers are the modules owning a prunable `kernel`, in call order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lwc import masks as masks_lib

PyTree = Any


def _layer_calls(apply_fn, params, images) -> list[tuple[str, jax.Array, jax.Array]]:
  """(layer name, input, output) of every Dense/Conv call in one forward pass, in call order."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      calls.append(("/".join(module.path), args[0], out))
    return out

  with nn.intercept_methods(record):
    apply_fn({"params": params}, images, train=False)
  return calls


def _layer_shapes(apply_fn, params, example) -> list[tuple[str, tuple[int, ...]]]:
  """(layer name, output shape) of every Dense/Conv call, traced abstractly (nothing runs)."""
  names = []

  def outputs(p, x):
    calls = _layer_calls(apply_fn, p, x)
    names.extend(c[0] for c in calls)
    return [c[2] for c in calls]

  shapes = jax.eval_shape(outputs, params, example)
  return [(name, tuple(s.shape)) for name, s in zip(names, shapes)]


def layer_flops(apply_fn, params, example: jax.Array) -> dict[str, int]:
  """FLOP per example of each layer (2 per multiply-add), from one abstract forward pass."""
  kernels = {masks_lib.layer_name(p): int(np.prod(np.shape(w)))
             for p, w in jax.tree_util.tree_leaves_with_path(params)
             if masks_lib.default_is_prunable(p, w)}
  out = {}
  for name, shape in _layer_shapes(apply_fn, params, example[:1]):
    positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    out[name] = 2 * kernels[name] * positions
  return out


def activation_density(apply_fn, params, images: jax.Array, batch_size: int = 1000
                       ) -> dict[str, float]:
  """Act% of each layer (see module docstring) averaged over `images` (N, H, W, C)."""

  @jax.jit
  def counts(p, x):
    calls = _layer_calls(apply_fn, p, x)
    inputs = [jnp.count_nonzero(c[1]) for c in calls]
    sizes = [c[1].size for c in calls]
    return inputs, sizes

  names = [name for name, _ in _layer_shapes(apply_fn, params, images[:1])]
  nonzero = np.zeros(len(names))
  total = np.zeros(len(names))
  for start in range(0, len(images), batch_size):
    nz, size = counts(params, images[start:start + batch_size])
    nonzero += np.asarray(jax.device_get(nz), np.float64)
    total += np.asarray(size, np.float64)
  input_density = nonzero / total
  # Act% of layer i is the density of layer i+1's input; the last layer's output is all used.
  return {name: float(input_density[i + 1]) if i + 1 < len(names) else 1.0
          for i, name in enumerate(names)}


def layer_table(apply_fn, params, masks: PyTree, images: jax.Array) -> dict[str, dict]:
  """{layer: {weights, flop, act, weights_frac, flop_frac}} plus a 'total' row."""
  flops = layer_flops(apply_fn, params, images)
  acts = activation_density(apply_fn, params, images)
  counts = masks_lib.layer_counts(masks)
  table, previous_act = {}, 1.0
  for name in flops:
    weights_frac = counts[name]["density"]
    table[name] = {"weights": counts[name]["weights"], "nonzero": counts[name]["nonzero"],
                   "flop": flops[name], "act": acts[name], "weights_frac": weights_frac,
                   "flop_frac": weights_frac * previous_act}
    previous_act = acts[name]
  weights = sum(r["weights"] for r in table.values())
  flop = sum(r["flop"] for r in table.values())
  table["total"] = {
      "weights": weights, "nonzero": sum(r["nonzero"] for r in table.values()), "flop": flop,
      "act": sum(r["act"] * r["flop"] for r in table.values()) / flop,
      "weights_frac": sum(r["nonzero"] for r in table.values()) / weights,
      "flop_frac": sum(r["flop_frac"] * r["flop"] for r in table.values()) / flop}
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
