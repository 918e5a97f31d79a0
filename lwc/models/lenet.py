"""LeNet-300-100 and LeNet-5 as in the paper's Caffe reference models.

Both take images of shape (batch, 28, 28, 1) and return logits of shape (batch, 10).
Layer names match Tables 2 and 3: fc1..fc3 for LeNet-300-100; conv1, conv2, fc1, fc2 for LeNet-5.
Weight counts: LeNet-300-100 235,200 + 30,000 + 1,000 = 266,200;
LeNet-5 500 + 25,000 + 400,000 + 5,000 = 430,500 (biases not counted, as in the paper).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling, stride 2, on NHWC with even H and W.

  Written as reshape + max because on XLA:CPU the backward of `nn.max_pool` (select-and-scatter)
  dominates the LeNet-5 step; the result is identical.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet300100(nn.Module):
  """784-300-100-10 fully connected network with ReLU.

  `widths` sets the hidden layers (smaller after dead-neuron removal); `dropout` is a tuple of
  (layer, rate) pairs applying dropout to that hidden layer's output in training (none in the
  reference model).
  """

  widths: tuple[int, int] = (300, 100)
  dropout: tuple[tuple[str, float], ...] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    rates = dict(self.dropout)
    x = x.reshape((x.shape[0], -1))
    for name, width in zip(("fc1", "fc2"), self.widths):
      x = nn.relu(nn.Dense(width, name=name)(x))
      if rates.get(name, 0.0) > 0.0:
        x = nn.Dropout(rates[name], deterministic=not train)(x)
    return nn.Dense(10, name="fc3")(x)


class LeNet5(nn.Module):
  """Caffe LeNet: conv 5x5x20, pool, conv 5x5x50, pool, fc 500 + ReLU, fc 10 (no padding).

  `widths` = (conv1 channels, conv2 channels, fc1 units); `dropout` as for LeNet300100 (only
  `fc1` has a hidden output to drop).
  """

  widths: tuple[int, int, int] = (20, 50, 500)
  dropout: tuple[tuple[str, float], ...] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    c1, c2, hidden = self.widths
    x = max_pool_2x2(nn.Conv(c1, (5, 5), padding="VALID", name="conv1")(x))
    x = max_pool_2x2(nn.Conv(c2, (5, 5), padding="VALID", name="conv2")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(hidden, name="fc1")(x))
    rate = dict(self.dropout).get("fc1", 0.0)
    if rate > 0.0:
      x = nn.Dropout(rate, deterministic=not train)(x)
    return nn.Dense(10, name="fc2")(x)
