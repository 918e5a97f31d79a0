"""LeNet-300-100 and LeNet-5 as in the paper's Caffe reference models.

Both take images of shape (batch, 28, 28, 1) and return logits of shape (batch, 10).
Layer names match Tables 2 and 3: fc1..fc3 for LeNet-300-100; conv1, conv2, fc1, fc2 for LeNet-5.
Weight counts: LeNet-300-100 235,200 + 30,000 + 1,000 = 266,200;
LeNet-5 500 + 25,000 + 400,000 + 5,000 = 430,500 (biases not counted, as in the paper).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling, stride 2, on NHWC with even H and W.

  Written as reshape + max because on XLA:CPU the backward of `nn.max_pool` (select-and-scatter)
  dominates the LeNet-5 step; the result is identical.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _conv(x: jax.Array, kernel: jax.Array, padding="VALID") -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC_HWIO)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 VALID convolution, NHWC x HWIO -> NHWC, whose backward pass is itself NHWC/HWIO.

  Values and gradients are those of `lax.conv_general_dilated` (bit for bit on XLA:CPU). JAX's
  own transpose rules emit the two backward convolutions with permuted dimension labels; XLA:CPU
  rewrites them into the NHWC/HWIO form its fast kernels take at the top level of a program but
  not inside the while loop of a `lax.scan`, where they fall back to a naive loop nest: a LeNet-5
  step scanned 4 per call took 350 ms instead of 40 (benchmarks/RESULTS.md). Written here in that
  form already, they stay fast in scans too.
  """
  return _conv(x, kernel)


def _conv_valid_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _conv_valid_bwd(residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # d kernel[i, j, c, o] = sum over n, h, w of x[n, h + i, w + j, c] * g[n, h, w, o]: a VALID
  # convolution of x with channels as batch and batch as features, by g as an (h, w, n, o) kernel.
  d_kernel = _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3)).transpose(1, 2, 0, 3)
  # d x: the FULL convolution of g with the spatially flipped kernel, in/out channels swapped.
  d_x = _conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2),
              ((kh - 1, kh - 1), (kw - 1, kw - 1)))
  return d_x, d_kernel


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None):
  """`nn.Conv(conv_general_dilated=...)` hook: `conv_valid` for the one case LeNet-5 uses."""
  ones = (1,) * (lhs.ndim - 2)
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
  if (lhs.ndim != 4 or tuple(window_strides) != ones or padding != "VALID"
      or tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
      or feature_group_count != 1 or precision is not None or dimension_numbers != expected):
    raise ValueError("conv_valid supports 2-D NHWC/HWIO stride-1 VALID convolutions only")
  return conv_valid(lhs, rhs)


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

  The convolutions are `nn.Conv` (same parameters and initialisation) computing `conv_valid`,
  so that training steps stay fast when several are scanned in one call.

  `widths` = (conv1 channels, conv2 channels, fc1 units); `dropout` as for LeNet300100 (only
  `fc1` has a hidden output to drop).
  """

  widths: tuple[int, int, int] = (20, 50, 500)
  dropout: tuple[tuple[str, float], ...] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    c1, c2, hidden = self.widths
    conv = {"padding": "VALID", "conv_general_dilated": _conv_general_dilated}
    x = max_pool_2x2(nn.Conv(c1, (5, 5), name="conv1", **conv)(x))
    x = max_pool_2x2(nn.Conv(c2, (5, 5), name="conv2", **conv)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(hidden, name="fc1")(x))
    rate = dict(self.dropout).get("fc1", 0.0)
    if rate > 0.0:
      x = nn.Dropout(rate, deterministic=not train)(x)
    return nn.Dense(10, name="fc2")(x)
