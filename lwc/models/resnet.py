"""A residual CNN with BatchNorm for MNIST/CIFAR-sized inputs (He et al. 2016, CIFAR form).

conv 3x3 (stem) -> BN -> relu -> stages of basic blocks (conv 3x3 -> BN -> relu -> conv 3x3 -> BN,
added to the block's input, a 1x1 projection when the width or stride changes) -> global mean ->
dense. `ResNet(stage_sizes=(1, 1, 1), widths=(16, 32, 64))` is a ResNet-8 (77,072 prunable
weights); (3, 3, 3) is the classic ResNet-20. Input NHWC of any size; output (batch,
num_classes) logits.

Layer names: `stem`, `stage{s}_block{b}/conv{1,2}`, `.../projection`, `head`; BatchNorm layers
`.../bn{1,2}` hold `batch_stats`. Dead-channel removal refuses this network (residual adds couple
the channels of every block).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class BasicBlock(nn.Module):
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.width, (3, 3), self.stride, use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False, name="conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = bn("projection_bn")(nn.Conv(self.width, (1, 1), self.stride, use_bias=False,
                                      name="projection")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """See the module docstring. `dropout` as for the LeNets: (layer, rate) pairs; only `head`'s
  input (`pool`) can be dropped."""

  stage_sizes: tuple[int, ...] = (1, 1, 1)
  widths: tuple[int, ...] = (16, 32, 64)
  num_classes: int = 10
  dropout: tuple[tuple[str, float], ...] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), 1):
      for b in range(1, blocks + 1):
        stride = 2 if s > 1 and b == 1 else 1
        x = BasicBlock(width, stride, name=f"stage{s}_block{b}")(x, train)
    x = x.mean(axis=(1, 2))
    rate = dict(self.dropout).get("pool", 0.0)
    if rate > 0.0:
      x = nn.Dropout(rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)
