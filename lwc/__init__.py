"""lwc: Learning both Weights and Connections (Han et al., NIPS 2015) in JAX/Flax.

What a user's own training loop needs, flat:

  which weights               `layers`, `Selection`, `prunable_layers`, `layer_groups`
  masks and pruning           `init_masks`, `apply_masks`, `prune`, `layer_thresholds`,
                              `layer_counts`, `total_counts`
  optimisers (exact zeros)    `prunable` (masks in the optimiser state: the primary way),
                              `get_masks`, `set_masks`, `prune_train_state`, `prune_nnx`,
                              `masked` (masks passed explicitly)
  calling any model           `linen_model`, `nnx_model`, `split_variables`, `as_model_fn`
  training steps              `TrainState`, `train_step`, `train_steps`, `eval_step`, `predict`
  BatchNorm after pruning     `recalibrate_batch_stats`
"""

from lwc import layers
from lwc.batchnorm import recalibrate_batch_stats
from lwc.layers import Selection
from lwc.masks import (apply_masks, init_masks, layer_counts, layer_groups, layer_thresholds,
                       prunable_layers, prune, total_counts)
from lwc.model_fn import as_model_fn, linen_model, nnx_model, split_variables
from lwc.optim import (get_masks, masked, prunable, prune_nnx, prune_train_state,
                       set_masks)
from lwc.train import (TrainState, cross_entropy, eval_step, predict, train_step,
                       train_steps)

__version__ = "0.1.0"

__all__ = [
    "Selection", "TrainState", "apply_masks", "as_model_fn", "cross_entropy", "eval_step",
    "get_masks", "init_masks", "layer_counts", "layer_groups", "layer_thresholds", "layers",
    "linen_model", "masked", "nnx_model", "predict", "prunable", "prunable_layers", "prune",
    "prune_nnx", "prune_train_state", "recalibrate_batch_stats", "set_masks", "split_variables", "total_counts",
    "train_step", "train_steps",
]
