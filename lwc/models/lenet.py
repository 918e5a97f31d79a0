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
  """784-300-100-10 fully connected network with ReLU."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no dropout or batch statistics in the reference model
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300, name="fc1")(x))
    x = nn.relu(nn.Dense(100, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


class LeNet5(nn.Module):
  """Caffe LeNet: conv 5x5x20, pool, conv 5x5x50, pool, fc 500 + ReLU, fc 10 (no padding)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = max_pool_2x2(nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x))
    x = max_pool_2x2(nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)
