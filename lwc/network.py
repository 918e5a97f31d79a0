"""Which network a run prunes, as a value recorded in every checkpoint, and how to build it.

A `Network` is the model's name or import path, the keyword arguments of its factory, and the
input shape and class count that came from the data. The pipeline saves it in each checkpoint's
metadata; resume, export, sensitivity, trade-off and `--init_checkpoint` rebuild the model from
there, never from a constant or from the dataset's name.

`build(network, key)` gives the model function (lwc.model_fn), its params and its other state
(BatchNorm statistics, NNX rng counts): Linen modules are initialised on zeros of the input shape
with `key`; NNX modules build themselves with `nnx.Rngs(seed)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwc import dropout as dropout_lib
from lwc import model_fn as model_fn_lib
from lwc import models
from lwc.errors import UserError

PyTree = Any
# Input shapes of runs saved before checkpoints recorded their network.
_LEGACY_IMAGE_SIZE = {"alexnet": 227, "vgg16": 224}


@dataclasses.dataclass(frozen=True)
class Network:
  """model: a built-in name or `package.module:factory`; kwargs: the factory's keyword arguments
  (JSON types); input_shape: one example's shape (H, W, C); num_classes: the outputs."""

  model: str
  kwargs: Mapping[str, Any]
  input_shape: tuple[int, ...]
  num_classes: int

  def to_json(self) -> dict:
    return {"model": self.model, "kwargs": _json(dict(self.kwargs)),
            "input_shape": list(self.input_shape), "num_classes": self.num_classes}

  @classmethod
  def from_json(cls, d: Mapping) -> "Network":
    try:
      return cls(str(d["model"]), dict(d["kwargs"]), tuple(int(x) for x in d["input_shape"]),
                 int(d["num_classes"]))
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f"checkpoint metadata holds an unusable network record ({e})") from None


@dataclasses.dataclass(frozen=True)
class Built:
  """A built network: `model_fn(params, model_state, x, train=, rng=)` and its initial trees."""

  model_fn: Callable
  params: PyTree
  model_state: PyTree


def _json(value):
  if isinstance(value, tuple):
    return [_json(v) for v in value]
  if isinstance(value, list):
    return [_json(v) for v in value]
  if isinstance(value, dict):
    return {k: _json(v) for k, v in value.items()}
  return value


def _tuples(value):
  """JSON lists back to tuples (Linen module fields must be hashable)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def factory_arguments(spec: str) -> set[str]:
  """The keyword arguments the factory of `spec` accepts (empty if its signature is unknown)."""
  factory = models.resolve_model(spec)
  try:
    return set(inspect.signature(factory).parameters)
  except (TypeError, ValueError):
    return set()


def from_config(config, input_shape: Sequence[int], num_classes: int) -> Network:
  """The network of a run: --model with --model_kwargs, --widths for built-in models, and
  `num_classes` (the data's, unless --num_classes) for factories that take it."""
  kwargs = dict(config.model_kwargs)
  accepted = factory_arguments(config.model)
  if config.widths:
    if "widths" not in accepted:
      raise UserError(f"--widths: {config.model} takes no widths argument; give its settings "
                      "with --model_kwargs")
    kwargs["widths"] = list(config.widths)
  classes = int(config.num_classes or num_classes)
  if "num_classes" in accepted and "num_classes" not in kwargs:
    kwargs["num_classes"] = classes
  if config.dropout_layers and dropout_lib.drops_anywhere(config) and "dropout" not in accepted:
    raise UserError(f"--dropout_layers: {config.model} takes no dropout argument; the pipeline "
                    "rescales dropout (equation 2) through a factory argument "
                    "dropout=((layer, rate), ...), as the built-in models have")
  return Network(config.model, kwargs, tuple(int(d) for d in input_shape), classes)


def legacy(config) -> Network:
  """The network of a checkpoint saved before checkpoints recorded it (built-in models on MNIST
  or ImageNet only, as those versions ran)."""
  if config.dataset == "imagenet2012":
    size = config.image_size or _LEGACY_IMAGE_SIZE.get(config.model, 224)
    shape, classes = (size, size, 3), config.num_classes or 1000
  else:
    shape, classes = (28, 28, 1), 10
  kwargs: dict = {}
  if config.widths:
    kwargs["widths"] = list(config.widths)
  if config.model in _LEGACY_IMAGE_SIZE:
    kwargs["num_classes"] = classes
  return Network(config.model, kwargs, shape, classes)


def from_meta(meta: Mapping, config) -> Network:
  """The network a checkpoint's metadata records (or, for older checkpoints, `legacy`)."""
  record = meta.get("network")
  return Network.from_json(record) if record is not None else legacy(config)


def with_widths(network: Network, widths: Mapping[str, int], order: Sequence[str]) -> Network:
  """The same network at other hidden widths (a smaller model after neuron removal)."""
  return dataclasses.replace(network, kwargs={**network.kwargs,
                                              "widths": [int(widths[n]) for n in order]})


def build(network: Network, key: jax.Array, seed: int = 0, dropout: Mapping[str, float] = (),
          abstract: bool = False) -> Built:
  """The model of `network` with `dropout` {layer: rate} (models that take it); `abstract`:
  params and state as `jax.ShapeDtypeStruct`s (no memory, for restoring)."""
  kwargs = _tuples(dict(network.kwargs))
  if dropout:
    kwargs["dropout"] = tuple((k, float(v)) for k, v in dict(dropout).items())
  module = _instantiate(network, kwargs, seed, abstract)
  from flax import nnx
  if isinstance(module, nnx.Module):
    fn, params, state = model_fn_lib.nnx_model(module)
    return Built(fn, params, state)
  example = jnp.zeros((1, *network.input_shape), jnp.float32)
  try:
    init = jax.eval_shape if abstract else (lambda f, *a: f(*a))
    variables = init(module.init, key, example)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (flax reports a shape that does not fit in many ways)
    raise UserError(f"--model={network.model} does not fit inputs of shape "
                    f"{'x'.join(map(str, network.input_shape))} with "
                    f"{_shown(network.kwargs)} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  params, state = model_fn_lib.split_variables(dict(variables))
  return Built(module.apply, params, state)


def _shown(kwargs: Mapping) -> str:
  return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "its defaults"


def _instantiate(network: Network, kwargs: dict, seed: int, abstract: bool):
  if not abstract:
    return models.instantiate(network.model, kwargs, seed)
  from flax import nnx
  factory = models.resolve_model(network.model)
  if inspect.isclass(factory) and issubclass(factory, nnx.Module):
    return nnx.eval_shape(lambda: models.instantiate(network.model, kwargs, seed))
  return models.instantiate(network.model, kwargs, seed)


def zeros_like_abstract(tree: PyTree) -> PyTree:
  """NumPy zeros shaped like a tree of arrays or `ShapeDtypeStruct`s (a restore template)."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
