"""Model zoo: `get_model(name)` returns a Flax Linen module taking NHWC float images."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from lwc.errors import UserError
from lwc.models import alexnet, lenet, vgg

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet.LeNet300100,
    "lenet5": lenet.LeNet5,
    "alexnet": alexnet.AlexNet,
    "vgg16": vgg.VGG16,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """The model registered as `name`; UserError listing the known names otherwise."""
  if name not in MODELS:
    raise UserError(f"unknown model '{name}', expected one of: {', '.join(sorted(MODELS))}")
  return MODELS[name](**kwargs)
