"""AlexNet as the paper's Caffe reference model (bvlc_alexnet), with local response normalisation.

Takes images of shape (batch, H, W, 3), NHWC, H = W = 227 for ImageNet, and returns logits of
shape (batch, num_classes). Layer names are Caffe's; the paper's Table 4 calls the three fully
connected layers fc1, fc2, fc3:

  ours / Caffe   Table 4   kernel (HWIO or in x out)   weights      FLOP at 227x227
  conv1          conv1     11 x 11 x 3 x 96                34,848     210,830,400
  conv2          conv2     5 x 5 x 48 x 256 (2 groups)    307,200     447,897,600
  conv3          conv3     3 x 3 x 256 x 384              884,736     299,040,768
  conv4          conv4     3 x 3 x 192 x 384 (2 groups)   663,552     224,280,576
  conv5          conv5     3 x 3 x 192 x 256 (2 groups)   442,368     149,520,384
  fc6            fc1       9216 x 4096                 37,748,736      75,497,472
  fc7            fc2       4096 x 4096                 16,777,216      33,554,432
  fc8            fc3       4096 x 1000                  4,096,000       8,192,000
  total                                                60,954,656   1,448,813,632

(Table 4: 35K, 307K, 885K, 663K, 442K, 38M, 17M, 4M weights, 61M in all; 211M, 448M, 299M, 224M,
150M, 75M, 34M, 8M FLOP, 1.5B in all: the exact counts rounded, except conv4, 664K rounded, and
the total FLOP, 1.4B rounded, 1.45B at three digits.) A grouped convolution's kernel holds
in_channels / groups input channels per output channel, as Caffe's does, so counts and FLOP are
those of the two-tower network.

Spatial sizes at 227: conv1 55, pool1 27, conv2 27, pool2 13, conv3..conv5 13, pool5 6, so fc6
takes 6 * 6 * 256 = 9216 inputs flattened in (h, w, channel) order, channel fastest. Pooling is
VALID (floor); Caffe rounds pooled sizes up, which gives the same sizes at 227 (55, 27 and 13 are
all odd). Smaller images work too, fc6's input size following from the conv stack: the smallest
is 67 x 67 (conv1 15, pool1 7, pool2 3, pool5 1, fc6 takes 256 inputs).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lwc.errors import UserError

#: Caffe's LRN settings in bvlc_alexnet (norm1, norm2): local_size, alpha, beta, k.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0

#: Smallest square input AlexNet accepts (see the module docstring).
MIN_IMAGE_SIZE = 67


def local_response_norm(x: jnp.ndarray, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                        beta: float = LRN_BETA, k: float = LRN_K) -> jnp.ndarray:
  """Caffe's ACROSS_CHANNELS local response normalisation of an NHWC (or any ...C) array.

  out[..., c] = x[..., c] / (k + alpha / size * sum_{j in window(c)} x[..., j] ** 2) ** beta,
  window(c) = channels max(0, c - size // 2) .. min(C - 1, c + size // 2). `size` must be odd.
  Same shape and dtype as `x`.
  """
  if size % 2 != 1:
    raise ValueError(f"LRN size must be odd, got {size}")
  half = size // 2
  channels = x.shape[-1]
  squared = jnp.pad(jnp.square(x), [(0, 0)] * (x.ndim - 1) + [(half, half)])
  window_sum = sum(squared[..., i:i + channels] for i in range(size))
  return x / (k + (alpha / size) * window_sum) ** beta


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """Overlapping 3x3 max pooling, stride 2, VALID: (N, H, W, C) -> (N, (H-3)//2+1, ..., C)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class AlexNet(nn.Module):
  """Caffe's bvlc_alexnet: 5 convolutions (conv2, conv4, conv5 in two groups), 3 dense layers.

  `widths` = output channels of conv1..conv5, then the units of fc6 and fc7 (smaller after
  dead-neuron removal; grouped layers need widths divisible by `groups`). `dropout` is a tuple of
  (layer, rate) pairs applying dropout to that hidden layer's output in training, by default 0.5
  on fc6 and fc7 as in Caffe. `groups` = 1 gives the single-tower variant (more conv weights).
  Dropout draws from the 'dropout' rng.
  """

  widths: tuple[int, ...] = (96, 256, 384, 384, 256, 4096, 4096)
  dropout: tuple[tuple[str, float], ...] = (("fc6", 0.5), ("fc7", 0.5))
  num_classes: int = 1000
  groups: int = 2

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise UserError(f"AlexNet takes NHWC images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, "
                      f"got shape {tuple(x.shape)}")
    c1, c2, c3, c4, c5, f6, f7 = self.widths
    rates = dict(self.dropout)
    g = self.groups
    x = nn.relu(nn.Conv(c1, (11, 11), strides=(4, 4), padding="VALID", name="conv1")(x))
    x = max_pool_3x3_s2(local_response_norm(x))
    x = nn.relu(nn.Conv(c2, (5, 5), padding=2, feature_group_count=g, name="conv2")(x))
    x = max_pool_3x3_s2(local_response_norm(x))
    x = nn.relu(nn.Conv(c3, (3, 3), padding=1, name="conv3")(x))
    x = nn.relu(nn.Conv(c4, (3, 3), padding=1, feature_group_count=g, name="conv4")(x))
    x = nn.relu(nn.Conv(c5, (3, 3), padding=1, feature_group_count=g, name="conv5")(x))
    x = max_pool_3x3_s2(x)
    x = x.reshape((x.shape[0], -1))
    for name, width in (("fc6", f6), ("fc7", f7)):
      x = nn.relu(nn.Dense(width, name=name)(x))
      if rates.get(name, 0.0) > 0.0:
        x = nn.Dropout(rates[name], deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc8")(x)
