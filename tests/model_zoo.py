"""Models researchers have, for the "any model" tests: BatchNorm CNNs (Linen and NNX), a residual
block, a small transformer block. Each `make_*` returns a `Case`: the model function, params,
model state, an input batch and its integer labels, and the groups the layers should fall in."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import lwc


class LinenBNCNN(nn.Module):
  """conv -> BN -> relu -> conv -> BN -> relu -> mean pool -> dense (Linen)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(16, (3, 3), strides=2, name="conv2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2)))
    return nn.Dense(self.num_classes, name="head")(x)


class NNXBNCNN(nnx.Module):
  """The same network in NNX."""

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(self.dropout(x.mean((1, 2))))


class ResidualBlock(nn.Module):
  """conv -> BN -> relu -> conv -> BN, added to the input: channels coupled by the add."""
  channels: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.channels, (3, 3), name="stem")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_a")(
        nn.Conv(self.channels, (3, 3), name="conv_a")(x)))
    y = nn.BatchNorm(use_running_average=not train, name="bn_b")(
        nn.Conv(self.channels, (3, 3), name="conv_b")(y))
    x = nn.relu(x + y)
    return nn.Dense(10, name="head")(x.mean((1, 2)))


class TransformerBlock(nn.Module):
  """Token embedding, one pre-LN self-attention block (DenseGeneral q/k/v/out), an MLP, a head."""
  vocab: int = 32
  width: int = 16
  heads: int = 2

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention",
                                            deterministic=not train)(y, y)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(2 * self.width, name="mlp_in")(y)
    x = x + nn.Dense(self.width, name="mlp_out")(nn.gelu(y))
    return nn.Dense(10, name="head")(x.mean(1))


@dataclasses.dataclass
class Case:
  name: str
  model_fn: Any
  params: Any
  model_state: Any
  inputs: np.ndarray
  labels: np.ndarray
  groups: dict[str, list[str]]


def _images(seed: int, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, 12, 12, 1)).astype(np.float32),
          rng.integers(0, 10, n).astype(np.int32))


def make_linen_bn_cnn(seed: int = 0) -> Case:
  x, y = _images(seed)
  module = LinenBNCNN()
  params, state = lwc.split_variables(module.init(jax.random.key(seed), x[:1]))
  return Case("linen_bn_cnn", lwc.linen_model(module), params, state, x, y,
              {"conv": ["conv1", "conv2"], "fc": ["head"], "attention": [], "embedding": []})


def make_nnx_bn_cnn(seed: int = 0) -> Case:
  x, y = _images(seed)
  model_fn, params, state = lwc.nnx_model(NNXBNCNN(rngs=nnx.Rngs(seed)))
  return Case("nnx_bn_cnn", model_fn, params, state, x, y,
              {"conv": ["conv1", "conv2"], "fc": ["head"], "attention": [], "embedding": []})


def make_residual(seed: int = 0) -> Case:
  x, y = _images(seed)
  module = ResidualBlock()
  params, state = lwc.split_variables(module.init(jax.random.key(seed), x[:1]))
  return Case("residual", lwc.linen_model(module), params, state, x, y,
              {"conv": ["conv_a", "conv_b", "stem"], "fc": ["head"], "attention": [],
               "embedding": []})


def make_transformer(seed: int = 0) -> Case:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 32, (16, 6)).astype(np.int32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  module = TransformerBlock()
  params, state = lwc.split_variables(module.init(jax.random.key(seed), tokens[:1]))
  return Case("transformer", lwc.linen_model(module), params, state, tokens, labels,
              {"conv": [], "fc": ["head", "mlp_in", "mlp_out"],
               "attention": ["attention/key", "attention/out", "attention/query",
                             "attention/value"],
               "embedding": ["embed"]})


CASES = {"linen_bn_cnn": make_linen_bn_cnn, "nnx_bn_cnn": make_nnx_bn_cnn,
         "residual": make_residual, "transformer": make_transformer}


def trained_looking_bn_state(state, seed: int):
  """BatchNorm statistics far from init: means ~N(0.5, 1), variances in [0.2, 3]; other state
  leaves unchanged."""
  rng = np.random.default_rng(seed)

  def one(path, x):
    if lwc.layers.leaf_name(path) == "mean":
      return jnp.asarray(0.5 + rng.standard_normal(np.shape(x)), x.dtype)
    if lwc.layers.leaf_name(path) == "var":
      return jnp.asarray(rng.uniform(0.2, 3.0, np.shape(x)), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(one, state)


def jnp_tree(tree):
  return jax.tree.map(jnp.asarray, tree)
