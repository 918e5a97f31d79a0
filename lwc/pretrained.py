"""Pretrained AlexNet / VGG-16 weights from `.npz` or `.safetensors` files, without running code.

Neither format can carry code once pickles are refused: `.npz` files are read with
`np.load(allow_pickle=False)` (an object array is refused, never unpickled) and `.safetensors`
files with the `safetensors` library's NumPy loader (a JSON header and raw little-endian bytes).

Three tensor-name layouts (tables in docs/pretrained.md, or `name_mapping(model, layout)`):

  torchvision  `features.0.weight`, ..., `classifier.6.bias` (a torchvision `vgg16` state dict):
               conv weights (O, I, KH, KW), linear weights (out, in).
  keras        `block1_conv1/kernel`, ..., `fc1/kernel`, `fc2/bias`, `predictions/kernel` (Keras
               `VGG16`, channels_last): conv kernels (KH, KW, I, O), dense kernels (in, out),
               already our layout.
  caffe        `<layer>/weights`, `<layer>/biases` under the Caffe layer names, which are ours
               (`conv1`..`fc8` for bvlc_alexnet, `conv1_1`..`fc8` for VGG_ILSVRC_16_layers):
               Caffe's blob shapes, conv (O, I / groups, KH, KW), inner product (out, in).

Supported: vgg16 in all three, alexnet in `caffe` only (torchvision's AlexNet, with 64-192-384-256-
256 channels, no groups and no LRN, is a different network).

Flattening: torchvision and Caffe flatten the last conv output (C, H, W) in NCHW order, so row
c * H * W + h * W + w of their first fully connected layer (our fc6) multiplies what our NHWC model
flattens to row (h * W + w) * C + c. `chw_to_hwc_rows` permutes fc6's rows accordingly; Keras
(channels_last) flattens like us and needs no permutation.

Every problem is a one-line `UserError`: an unreadable file, a pickled array, missing or unexpected
tensor names, a shape mismatch naming the tensor and both shapes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lwc.errors import UserError
from lwc.models import vgg

PyTree = Any

LAYOUTS = ("torchvision", "keras", "caffe")

_VGG16_CONVS = tuple(name for block in vgg.CONV_BLOCKS for name in block)
LAYERS = {
    "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"),
    "vgg16": _VGG16_CONVS + ("fc6", "fc7", "fc8"),
}
SUPPORTED = {"alexnet": ("caffe",), "vgg16": LAYOUTS}

#: The fully connected layer fed by the flattened conv stack, and the conv layer feeding it.
FIRST_FC = "fc6"
LAST_CONV = {"alexnet": "conv5", "vgg16": "conv5_3"}

_TORCHVISION_VGG16_MODULES = (
    "features.0", "features.2", "features.5", "features.7", "features.10", "features.12",
    "features.14", "features.17", "features.19", "features.21", "features.24", "features.26",
    "features.28", "classifier.0", "classifier.3", "classifier.6")
_KERAS_FC = {"fc6": "fc1", "fc7": "fc2", "fc8": "predictions"}
_SUFFIXES = {"torchvision": (".weight", ".bias"), "keras": ("/kernel", "/bias"),
             "caffe": ("/weights", "/biases")}
_MAX_LISTED = 6


def _keras_name(layer: str) -> str:
  if layer in _KERAS_FC:
    return _KERAS_FC[layer]
  block, index = layer[len("conv"):].split("_")
  return f"block{block}_conv{index}"


def name_mapping(model_name: str, layout: str) -> dict[str, tuple[str, str]]:
  """{tensor name in the file: (our layer, 'kernel' or 'bias')}, in layer order.

  UserError for an unknown model or layout, or a layout the model's weights do not come in.
  """
  if model_name not in SUPPORTED:
    raise UserError(f"no pretrained weights for model '{model_name}', expected one of: "
                    f"{', '.join(sorted(SUPPORTED))}")
  if layout not in LAYOUTS:
    raise UserError(f"unknown weights layout '{layout}', expected one of: {', '.join(LAYOUTS)}")
  if layout not in SUPPORTED[model_name]:
    if model_name == "alexnet" and layout == "torchvision":
      raise UserError("torchvision's AlexNet (64-192-384-256-256 channels, no groups, no LRN) is "
                      "not the paper's Caffe AlexNet; convert bvlc_alexnet to the caffe layout "
                      "(docs/pretrained.md)")
    raise UserError(f"{model_name} weights are read in the {', '.join(SUPPORTED[model_name])} "
                    f"layout, not {layout}")
  layers = LAYERS[model_name]
  if layout == "torchvision":
    stems = dict(zip(layers, _TORCHVISION_VGG16_MODULES))
  elif layout == "keras":
    stems = {layer: _keras_name(layer) for layer in layers}
  else:
    stems = {layer: layer for layer in layers}
  weight, bias = _SUFFIXES[layout]
  mapping = {}
  for layer in layers:
    mapping[stems[layer] + weight] = (layer, "kernel")
    mapping[stems[layer] + bias] = (layer, "bias")
  return mapping


def detect_layout(names) -> str | None:
  """The one layout whose naming the tensor names follow, or None if none or several do."""
  signatures = {
      "torchvision": lambda n: n.startswith(("features.", "classifier.")),
      "keras": lambda n: n.split("/")[0].startswith("block") or n.split("/")[0] in ("fc1", "fc2",
                                                                                    "predictions"),
      "caffe": lambda n: n.endswith(("/weights", "/biases")),
  }
  found = [layout for layout, matches in signatures.items() if any(matches(n) for n in names)]
  return found[0] if len(found) == 1 else None


def chw_to_hwc_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
  """Reorders the rows of an (in, out) dense kernel from (c, h, w) to (h, w, c) flattening.

  Args:
    kernel: (C * P, out) where row c * P + p multiplies channel c at spatial position p
      (P = H * W, positions in row-major (h, w) order), as NCHW frameworks flatten.
    channels: C.

  Returns:
    (P * C, out) where row p * C + c holds the same weights: what an NHWC flatten multiplies.
  """
  n_in, n_out = kernel.shape
  if n_in % channels:
    raise ValueError(f"{n_in} kernel rows are not a multiple of {channels} channels")
  positions = n_in // channels
  return kernel.reshape(channels, positions, n_out).transpose(1, 0, 2).reshape(n_in, n_out)


def file_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape a tensor of our shape `flax_shape` has in a file of `layout`."""
  if layout == "keras" or len(flax_shape) == 1:
    return tuple(flax_shape)
  if len(flax_shape) == 4:  # HWIO -> OIHW
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(flax_shape[::-1])  # (in, out) -> (out, in)


def to_flax(array: np.ndarray, layout: str, first_fc_channels: int | None = None) -> np.ndarray:
  """A tensor of a `layout` file in our layout: HWIO convs, (in, out) dense kernels, NHWC rows.

  `first_fc_channels`: for the kernel of the first fully connected layer only, the channels of
  the conv output it flattens (its rows get `chw_to_hwc_rows` in the NCHW layouts).
  """
  if layout == "keras" or array.ndim == 1:
    return array
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  kernel = array.T
  if first_fc_channels is not None:
    kernel = chw_to_hwc_rows(kernel, first_fc_channels)
  return kernel


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(path):
    raise UserError(f"{path}: not a .npz (zip) archive")
  arrays = {}
  with np.load(path, allow_pickle=False) as npz:
    for name in npz.files:
      try:
        array = npz[name]
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise UserError(f"{path}: tensor '{name}' is a pickled object array; refused "
                          "(unpickling can run code)") from None
        raise UserError(f"{path}: cannot read tensor '{name}': {_one_line(e)}") from None
      if not isinstance(array, np.ndarray):
        raise UserError(f"{path}: member '{name}' is not a .npy array")
      arrays[name] = array
  return arrays


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 - SafetensorError and friends: any failure is a bad file.
    raise UserError(f"{path}: not a readable .safetensors file: {_one_line(e)}") from None


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a `.npz` or `.safetensors` file; floating-point arrays only."""
  if not os.path.isfile(path):
    raise UserError(f"no weights file {path}")
  if path.endswith(".npz"):
    arrays = _read_npz(path)
  elif path.endswith(".safetensors"):
    arrays = _read_safetensors(path)
  else:
    raise UserError(f"{path}: expected a .npz or .safetensors weights file")
  for name, array in arrays.items():
    if array.dtype.kind != "f":
      raise UserError(f"{path}: tensor '{name}' has dtype {array.dtype}, expected floating point")
  return arrays


def _listed(names) -> str:
  names = list(names)
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _template_leaves(params_template: PyTree) -> dict[tuple[str, str], Any]:
  leaves = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params_template):
    leaves[tuple(str(getattr(k, "key", k)) for k in path)] = leaf
  return leaves


def load_pretrained(path: str, model_name: str, params_template: PyTree,
                    layout: str | None = None) -> PyTree:
  """Params for `model_name` from the weights file at `path`.

  Args:
    path: a `.npz` or `.safetensors` file in one of `LAYOUTS`.
    model_name: 'alexnet' or 'vgg16'.
    params_template: the model's params tree, arrays or `jax.ShapeDtypeStruct`s (e.g.
      `jax.eval_shape(model.init, key, images)['params']`), giving the structure, shapes and
      dtypes. fc6's input size follows the image size: build it at 227x227 (AlexNet) or
      224x224 (VGG-16) for ImageNet weights.
    layout: one of `LAYOUTS`; by default told from the tensor names.

  Returns:
    A tree of the template's structure holding NumPy arrays of the template's shapes and dtypes.

  Raises:
    UserError: one line naming the problem (see the module docstring).
  """
  arrays = read_arrays(path)
  if layout is None:
    layout = detect_layout(arrays)
    if layout is None:
      raise UserError(f"{path}: cannot tell the layout from its tensor names "
                      f"({_listed(sorted(arrays))}); expected torchvision (features.0.weight), "
                      "keras (block1_conv1/kernel) or caffe (conv1/weights) names")
  mapping = name_mapping(model_name, layout)
  missing = [name for name in mapping if name not in arrays]
  unexpected = sorted(name for name in arrays if name not in mapping)
  if missing or unexpected:
    parts = ([f"missing {_listed(missing)}"] if missing else []) + (
        [f"unexpected {_listed(unexpected)}"] if unexpected else [])
    raise UserError(f"{path}: tensor names do not fit {model_name} ({layout} layout): "
                    f"{'; '.join(parts)}")
  leaves = _template_leaves(params_template)
  if set(leaves) != set(mapping.values()):
    ours = sorted("/".join(k) for k in leaves)
    raise UserError(f"the params template is not {model_name}'s: it holds {_listed(ours)}")
  channels = int(leaves[(LAST_CONV[model_name], "kernel")].shape[-1])
  converted = {}
  for name, (layer, param) in mapping.items():
    target = leaves[(layer, param)]
    expected = file_shape(layout, tuple(target.shape))
    array = arrays[name]
    if array.shape != expected:
      hint = (" (fc6's input size follows the image size of the template)"
              if layer == FIRST_FC and param == "kernel" else "")
      raise UserError(f"{path}: tensor '{name}' has shape {tuple(array.shape)}, expected "
                      f"{expected} for {layer}/{param}{hint}")
    first_fc = channels if (layer, param) == (FIRST_FC, "kernel") else None
    converted[(layer, param)] = np.ascontiguousarray(
        to_flax(array, layout, first_fc), dtype=np.dtype(target.dtype))
  return jax.tree_util.tree_map_with_path(
      lambda p, _: converted[tuple(str(getattr(k, "key", k)) for k in p)], params_template)


def save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` as a `.npz` `load_pretrained` reads (no pickles: refuses object arrays)."""
  for name, array in arrays.items():
    if np.asarray(array).dtype.hasobject:
      raise UserError(f"tensor '{name}' is an object array; only numeric arrays can be saved")
  np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
