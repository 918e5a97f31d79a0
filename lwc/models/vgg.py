"""VGG-16 (Simonyan & Zisserman's configuration D), the network of the paper's Table 5.

Takes images of shape (batch, H, W, 3), NHWC, H = W = 224 for ImageNet, and returns logits of
shape (batch, num_classes). Thirteen 3x3 convolutions, padding 1, stride 1, each with ReLU, in five
blocks closed by 2x2 max pooling, stride 2; then fc6 and fc7 (4096 units, ReLU, dropout 0.5 in
training) and fc8. Layer names are those of Table 5 (conv1_1 .. conv5_3, fc6, fc7, fc8).

Per layer at 224x224 (weights = kernel entries, FLOP = 2 * weights * output positions):

  layer     weights      FLOP             layer     weights      FLOP
  conv1_1       1,728      173,408,256    conv4_1   1,179,648    1,849,688,064
  conv1_2      36,864    3,699,376,128    conv4_2   2,359,296    3,699,376,128
  conv2_1      73,728    1,849,688,064    conv4_3   2,359,296    3,699,376,128
  conv2_2     147,456    3,699,376,128    conv5_1   2,359,296      924,844,032
  conv3_1     294,912    1,849,688,064    conv5_2   2,359,296      924,844,032
  conv3_2     589,824    3,699,376,128    conv5_3   2,359,296      924,844,032
  conv3_3     589,824    3,699,376,128    fc6     102,760,448      205,520,896
                                          fc7      16,777,216       33,554,432
                                          fc8       4,096,000        8,192,000
  total   138,344,128 weights, 30,940,528,640 FLOP (Table 5: 138M, 30.9B).

Table 5's figures are these rounded, except conv2_2's weights: 148K there, 147K rounded.

fc6 takes 7 * 7 * 512 = 25088 inputs flattened in (h, w, channel) order, channel fastest. Any
input of at least 32 x 32 works (five halvings, floor), fc6's input size following from it: at
32 x 32 fc6 takes 512 inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lwc.errors import UserError

#: Layer names of the convolutions, block by block (configuration D).
CONV_BLOCKS: tuple[tuple[str, ...], ...] = (
    ("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"), ("conv5_1", "conv5_2", "conv5_3"))

#: Smallest square input VGG-16 accepts.
MIN_IMAGE_SIZE = 32


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling, stride 2, VALID: (N, H, W, C) -> (N, H // 2, W // 2, C)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG16(nn.Module):
  """VGG-16, configuration D.

  `widths` = output channels of the 13 convolutions in order, then the units of fc6 and fc7
  (smaller after dead-neuron removal). `dropout` is a tuple of (layer, rate) pairs applying dropout
  to that hidden layer's output in training, by default 0.5 on fc6 and fc7 as in the original.
  Dropout draws from the 'dropout' rng.
  """

  widths: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
                             4096, 4096)
  dropout: tuple[tuple[str, float], ...] = (("fc6", 0.5), ("fc7", 0.5))
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise UserError(f"VGG16 takes NHWC images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, "
                      f"got shape {tuple(x.shape)}")
    conv_names = [name for block in CONV_BLOCKS for name in block]
    if len(self.widths) != len(conv_names) + 2:
      raise ValueError(f"VGG16 takes {len(conv_names) + 2} widths, got {len(self.widths)}")
    width = dict(zip(conv_names + ["fc6", "fc7"], self.widths))
    rates = dict(self.dropout)
    for block in CONV_BLOCKS:
      for name in block:
        x = nn.relu(nn.Conv(width[name], (3, 3), padding=1, name=name)(x))
      x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(width[name], name=name)(x))
      if rates.get(name, 0.0) > 0.0:
        x = nn.Dropout(rates[name], deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc8")(x)
