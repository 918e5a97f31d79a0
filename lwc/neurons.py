"""Dead-neuron removal (section 3.5): physically smaller layers that compute the same function.

A unit (a neuron of a dense layer, a channel of a conv layer) is dead when
  * it has no input connections left: its kernel slice is all pruned, so it outputs the constant
    act(bias). That constant's contribution to the next layer is folded into the next layer's
    bias, then the unit is removed; or
  * it has no output connections left: the next layer's kernel slice for it is all pruned, so
    nothing it computes is used; it is removed.
Removing units of one layer can kill units of the layer before, so removal repeats from the
output backwards until nothing changes. The last layer's units (the classes) are never removed.

Networks are described as a chain of `Layer`s (see `CHAINS`). Conv layers use VALID padding, so
every output position of the next conv sees the whole kernel: a constant input channel adds
c * sum(kernel[:, :, j, :]) to its bias exactly. Max pooling keeps a constant map constant. A conv
layer followed by flatten and a dense layer feeds `positions` rows (h, w, channel), channel
fastest, of the dense kernel per channel.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from lwc.errors import UserError


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
    mask = np.asarray(masks[layer.name]["kernel"])
    units = mask.shape[-1]
    no_input = ~mask.reshape(-1, units).any(axis=0)
    nxt = chain[i + 1]
    next_mask = np.asarray(masks[nxt.name]["kernel"])
    no_output = np.array([not _slice_in(next_mask, nxt, _input_rows(layer, nxt, j, units)).any()
                          for j in range(units)])
    out[layer.name] = no_input | no_output
  return out


def remove_dead_units(params: dict, masks: dict, chain: tuple[Layer, ...]
                      ) -> tuple[dict, dict, dict[str, int]]:
  """Smaller (params, masks) computing the same function, and units removed per layer.

  params/masks: {layer: {'kernel', 'bias'}} NumPy-convertible. Kernels: dense (in, out), conv
  (kh, kw, in, out). Returns new dicts with dense shapes over the surviving units only.
  """
  params = {k: {n: np.array(v, copy=True) for n, v in p.items()} for k, p in params.items()}
  masks = {k: {n: np.array(v, copy=True) for n, v in p.items()} for k, p in masks.items()}
  for layer in chain:
    if layer.name not in params:
      raise UserError(f"model has no layer '{layer.name}' (layers: {', '.join(params)})")
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
      kernel, bias = params[layer.name]["kernel"], params[layer.name]["bias"]
      units = kernel.shape[-1]
      next_kernel = params[nxt.name]["kernel"]
      constant = _act(layer.activation, bias)  # output of a unit with no inputs
      no_input = ~masks[layer.name]["kernel"].reshape(-1, units).any(axis=0)
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
        tree[layer.name]["kernel"] = tree[layer.name]["kernel"][..., keep]
        tree[layer.name]["bias"] = tree[layer.name]["bias"][keep]
        tree[nxt.name]["kernel"] = np.take(tree[nxt.name]["kernel"], keep_rows,
                                           axis=_next_in_axis(nxt))
      removed[layer.name] += int(gone.sum())
      break  # recompute dead units on the new shapes
  return params, masks, removed


def widths(params: dict, chain: tuple[Layer, ...]) -> dict[str, int]:
  """Units per layer: the last axis of each kernel."""
  return {layer.name: int(np.shape(params[layer.name]["kernel"])[-1]) for layer in chain}
