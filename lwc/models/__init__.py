"""Model zoo: `get_model(name)` returns a Flax Linen module taking NHWC float images.

Any other network comes by import path: `resolve_model("mypkg.nets:ResNet")` imports `mypkg.nets`
and takes its `ResNet` (a Flax Linen or NNX module class, or a callable returning a module);
`instantiate(spec, kwargs, seed)` builds it (NNX classes get `rngs=nnx.Rngs(seed)`), and
`build(spec, kwargs, example, seed)` gives `(model_fn, params, model_state)` for lwc's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib
import inspect
import re
from typing import Any

import flax.linen as nn

from lwc.errors import UserError
from lwc.models import alexnet, lenet, resnet, vgg, vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet.LeNet300100,
    "lenet5": lenet.LeNet5,
    "alexnet": alexnet.AlexNet,
    "vgg16": vgg.VGG16,
    "resnet": resnet.ResNet,
    "vit": vit.ViT,
}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def get_model(name: str, **kwargs) -> nn.Module:
  """The model registered as `name`; UserError listing the known names otherwise."""
  if name not in MODELS:
    raise UserError(f"unknown model '{name}', expected one of: {', '.join(sorted(MODELS))}")
  return MODELS[name](**kwargs)


def is_import_path(spec: str) -> bool:
  return bool(_IMPORT_PATH.match(spec))


def resolve_model(spec: str) -> Callable[..., Any]:
  """The factory named by `spec`: a built-in name or `package.module:attribute`."""
  if spec in MODELS:
    return MODELS[spec]
  if not is_import_path(spec):
    raise UserError(f"unknown model '{spec}': expected a built-in name "
                    f"({', '.join(sorted(MODELS))}) or an import path package.module:factory")
  module_name, attr = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or whatever the user's module raises on import
    raise UserError(f"--model={spec}: cannot import module '{module_name}': "
                    f"{type(e).__name__}: {e}") from None
  factory = module
  for part in attr.split("."):
    if not hasattr(factory, part):
      raise UserError(f"--model={spec}: module '{module_name}' has no attribute '{attr}'")
    factory = getattr(factory, part)
  if inspect.ismodule(factory) or not callable(factory):
    raise UserError(f"--model={spec}: '{attr}' is a {type(factory).__name__}, not a Flax module "
                    "class or a callable returning one")
  return factory


def instantiate(spec: str, kwargs: Mapping[str, Any] | None = None, seed: int = 0):
  """The module `spec` names, built with `kwargs` (NNX modules also get `rngs`)."""
  from flax import nnx
  factory = resolve_model(spec)
  kwargs = dict(kwargs or {})
  try:
    target = factory.__init__ if inspect.isclass(factory) else factory
    wants_rngs = "rngs" in inspect.signature(target).parameters
  except (TypeError, ValueError):
    wants_rngs = False
  if wants_rngs and "rngs" not in kwargs:
    kwargs["rngs"] = nnx.Rngs(seed)
  try:
    model = factory(**kwargs)
  except UserError:
    raise
  except Exception as e:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "rngs")
    raise UserError(f"--model={spec}: building it with ({shown}) failed: "
                    f"{type(e).__name__}: {e}") from None
  if not isinstance(model, (nn.Module, nnx.Module)):
    raise UserError(f"--model={spec} gave a {type(model).__name__}, not a Flax Linen or NNX "
                    "module")
  return model


def build(spec: str, kwargs: Mapping[str, Any] | None, example, seed: int = 0):
  """(model_fn, params, model_state) of the model `spec` names, initialised on `example`
  (one input batch, e.g. zeros of shape (1, H, W, C)); see lwc.model_fn."""
  import jax
  from flax import nnx
  from lwc import model_fn as model_fn_lib
  model = instantiate(spec, kwargs, seed)
  if isinstance(model, nnx.Module):
    return model_fn_lib.nnx_model(model)
  try:
    variables = model.init(jax.random.key(seed), example)
  except Exception as e:
    raise UserError(f"--model={spec}: initialising it on inputs of shape "
                    f"{tuple(example.shape)} failed: {type(e).__name__}: {e}") from None
  params, model_state = model_fn_lib.split_variables(variables)
  return model_fn_lib.linen_model(model), params, model_state
