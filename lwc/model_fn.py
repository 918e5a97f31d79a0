"""How lwc calls a model: one convention for Linen modules, NNX modules and plain functions.

A *model function* is a callable

    outputs, new_model_state = model_fn(params, model_state, inputs, train=bool, rng=key|None)

`params` is the prunable-and-trainable tree (Linen `variables['params']`, NNX `nnx.Param` state),
`model_state` every other collection (Linen `batch_stats` and the like, NNX `BatchStat`, `RngState`
...; `{}` when there is none), `train` selects training behaviour (dropout on, BatchNorm on batch
statistics), `rng` seeds Linen's rng streams in training. In evaluation the state comes back
unchanged. Masks never touch `model_state`.

    fn = lwc.linen_model(module)                      # or lwc.as_model_fn(module.apply)
    fn, params, model_state = lwc.nnx_model(nnx_module)

Linen modules are told `train` through the argument their `__call__` has (`train`, `training`,
`is_training`, or `deterministic` = not train; none if they have none); in training every
collection of `model_state` is mutable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import inspect
from typing import Any

import jax

from lwc.errors import UserError

PyTree = Any
_TRAIN_ARGS = ("train", "training", "is_training")


def _train_kwargs(module_call: Callable, mode: str) -> Callable[[bool], dict]:
  if mode != "auto":
    if mode == "none":
      return lambda train: {}
    if mode == "deterministic":
      return lambda train: {"deterministic": not train}
    return lambda train: {mode: train}
  try:
    names = inspect.signature(module_call).parameters
  except (TypeError, ValueError):
    names = {}
  for name in _TRAIN_ARGS:
    if name in names:
      return lambda train, name=name: {name: train}
  if "deterministic" in names:
    return lambda train: {"deterministic": not train}
  return lambda train: {}


@dataclasses.dataclass(frozen=True)
class LinenModel:
  """A Linen module's `apply` as a model function (see the module docstring).

  Attributes:
    apply: `module.apply` (or any function with its signature).
    train_arg: 'auto' (from the signature), 'none', 'deterministic', or the argument's name.
    rng_names: rng streams seeded from `rng` in training (split per name).
  """

  apply: Callable
  train_arg: str = "auto"
  rng_names: tuple[str, ...] = ("dropout",)

  def __call__(self, params, model_state, inputs, *, train: bool, rng=None):
    module = getattr(self.apply, "__self__", None)
    call = type(module).__call__ if module is not None else self.apply
    kwargs = _train_kwargs(call, self.train_arg)(train)
    variables = {"params": params, **(model_state or {})}
    rngs = None
    if train and rng is not None and self.rng_names:
      # One stream takes the step's key itself (as lwc always did), several get a split each.
      keys = [rng] if len(self.rng_names) == 1 else jax.random.split(rng, len(self.rng_names))
      rngs = dict(zip(self.rng_names, keys))
    if train and model_state:
      outputs, new_state = self.apply(variables, inputs, rngs=rngs, mutable=list(model_state),
                                      **kwargs)
      return outputs, {**model_state, **new_state}
    return self.apply(variables, inputs, rngs=rngs, **kwargs), model_state


def linen_model(module, train_arg: str = "auto",
                rng_names: Sequence[str] = ("dropout",)) -> LinenModel:
  """The model function of a Linen module (or of its bound `apply`)."""
  apply = module.apply if hasattr(module, "apply") and not inspect.ismethod(module) else module
  return LinenModel(apply, train_arg, tuple(rng_names))


@dataclasses.dataclass(frozen=True)
class NNXModel:
  """An NNX module, split, as a model function: merged per call, `train()`/`eval()` set."""

  graphdef: Any

  def __call__(self, params, model_state, inputs, *, train: bool, rng=None):
    from flax import nnx
    del rng  # NNX modules carry their rng streams in model_state (nnx.Rngs)
    model = nnx.merge(self.graphdef, params, model_state)
    if train:
      model.train()
    else:
      model.eval()
    outputs = model(inputs)
    if not train:
      return outputs, model_state
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return outputs, nnx.as_pure(new_state)


def nnx_model(module) -> tuple[NNXModel, PyTree, PyTree]:
  """(model function, params, model state) of an NNX module; both trees in pure form (arrays).

  Write trained values back with `nnx.update(module, params, model_state)`.
  """
  from flax import nnx
  if not isinstance(module, nnx.Module):
    raise UserError(f"nnx_model needs an nnx.Module, got {type(module).__name__}")
  graphdef, params, model_state = nnx.split(module, nnx.Param, ...)
  return NNXModel(graphdef), nnx.as_pure(params), nnx.as_pure(model_state)


def as_model_fn(fn) -> Callable:
  """A model function from a model function, a Linen module or its `apply`, or an NNX graphdef."""
  if isinstance(fn, (LinenModel, NNXModel)):
    return fn
  from flax import linen as nn
  from flax import nnx
  if isinstance(fn, nn.Module) or (inspect.ismethod(fn) and isinstance(fn.__self__, nn.Module)):
    return linen_model(fn)
  if isinstance(fn, nnx.Module):
    raise UserError("an nnx.Module is stateful: split it first with "
                    "`model_fn, params, model_state = lwc.nnx_model(module)`")
  if isinstance(fn, nnx.GraphDef):
    return NNXModel(fn)
  if callable(fn):
    return fn
  raise UserError(f"not a model function: {type(fn).__name__}")


def split_variables(variables: Mapping) -> tuple[PyTree, PyTree]:
  """Linen `variables` -> (params, model_state): every collection but `params` is state."""
  if "params" not in variables:
    raise UserError(f"Linen variables without a 'params' collection: {sorted(variables)}")
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}
