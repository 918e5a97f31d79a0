"""A researcher's own networks, outside the lwc package: loaded by import path in the tests
(`--model=user_models:BNNet`, `user_models:NNXNet`, `user_models:make_bn_net`)."""

from flax import linen as nn
from flax import nnx


class BNNet(nn.Module):
  """conv -> BatchNorm -> relu -> pool -> dense, Linen."""
  width: int = 8
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), strides=2, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    return nn.Dense(self.num_classes, name="fc")(x.reshape(len(x), -1))


def make_bn_net(width: int = 8):
  """A factory function returning a module."""
  return BNNet(width=width)


class NNXNet(nnx.Module):
  """The same network in NNX (28x28x1 inputs)."""

  def __init__(self, width: int = 8, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.fc = nnx.Linear(14 * 14 * width, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.fc(x.reshape(len(x), -1))


def broken_factory():
  raise RuntimeError("this factory always fails")


def not_a_module():
  return 42


NOT_CALLABLE = 3
