"""Section 3.2, dropout ratio adjustment: retraining after pruning uses less dropout.

Equation 2: D_r = D_o * sqrt(C_ir / C_io), with C_i the connections of the layer the dropout sits
on (its kernel's surviving and original weight counts). A pruned layer has fewer parameters to
overfit with, so it is dropped less. `--dropout_rescale=none` keeps D_o instead, an ablation of
that equation, which at 200x leaves LeNet-5's fc1 about 5% of D_o. `--retrain_dropout` gives
retraining its own D_o (dropout in retraining only, over a dense network trained without it).
"""

from __future__ import annotations

import math

from lwc import masks as masks_lib
from lwc.errors import UserError


def original_rate(config, iteration: int) -> float:
  """D_o of the phase of `iteration`: --dropout in dense training (0) and, unless
  --retrain_dropout (>= 0) replaces it, in every retraining."""
  if iteration == 0 or config.retrain_dropout < 0:
    return config.dropout
  return config.retrain_dropout


def drops_anywhere(config) -> bool:
  """Whether some phase that runs has a nonzero D_o (dense training, or a retraining when
  --iterations > 0); what --dropout_layers needs to be read at all."""
  return bool(config.dropout or (config.iterations and original_rate(config, 1)))


def dropout_rates(config, masks, iteration: int) -> dict[str, float]:
  """{layer: D_r} for every layer of `config.dropout_layers` in the phase of `iteration` ({} when
  that phase has no dropout); D_r is D_o itself with `config.dropout_rescale == "none"`. A
  UserError names layers the model does not have."""
  rate = original_rate(config, iteration)
  if rate == 0.0 or not config.dropout_layers:
    return {}
  counts = masks_lib.layer_counts(masks)
  unknown = sorted(set(config.dropout_layers) - set(counts))
  if unknown:
    raise UserError(f"dropout on unknown layer(s) {', '.join(unknown)}; layers are "
                    f"{', '.join(counts)}")
  if config.dropout_rescale == "none":
    return {name: rate for name in config.dropout_layers}
  return {name: rate * math.sqrt(counts[name]["nonzero"] / counts[name]["weights"])
          for name in config.dropout_layers}
