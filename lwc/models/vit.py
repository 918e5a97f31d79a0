"""A small Vision Transformer (Dosovitskiy et al. 2021) for MNIST/CIFAR-sized inputs.

Patches (patch x patch, non-overlapping) embedded by a Dense layer (`patch_embed`), a learned
position embedding (`position`, an nn.Embed over patch positions: its table is prunable, group
`embedding`), `depth` pre-LayerNorm blocks of multi-head self-attention (`block{i}/attention/
{query,key,value,out}`: DenseGeneral kernels of rank 3, group `attention`) and an MLP
(`block{i}/mlp_in`, `mlp_out`), a final LayerNorm, mean over tokens, `head`.
Input NHWC with H and W divisible by `patch`; output (batch, num_classes) logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
  width: int
  heads: int
  mlp_ratio: int = 2
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention",
                                            deterministic=True)(y, y)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * self.width, name="mlp_in")(y))
    if self.dropout_rate > 0.0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + nn.Dense(self.width, name="mlp_out")(y)


class ViT(nn.Module):
  """See the module docstring. `dropout`: (layer, rate) pairs; `mlp` drops inside every MLP."""

  patch: int = 7
  width: int = 64
  depth: int = 2
  heads: int = 4
  num_classes: int = 10
  dropout: tuple[tuple[str, float], ...] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    n, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // p) * (w // p), p * p * c)
    x = nn.Dense(self.width, name="patch_embed")(x)
    x = x + nn.Embed(x.shape[1], self.width, name="position")(jnp.arange(x.shape[1]))
    rate = dict(self.dropout).get("mlp", 0.0)
    for i in range(self.depth):
      x = Block(self.width, self.heads, dropout_rate=rate, name=f"block{i}")(x, train)
    x = nn.LayerNorm(name="ln")(x).mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)
