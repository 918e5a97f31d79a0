"""Small helpers for the modules that read a model's jaxpr (stats: FLOPs and activation density;
neurons: which tensors a layer's channels are coupled to)."""

from __future__ import annotations


def bind(eqn, operands: list) -> list:
  """The results of one jaxpr equation on concrete (or traced) operands, always a list."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *operands, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
