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

import importlib

# Where each public name lives. Loaded on first use (PEP 562), so `import lwc.errors` in an entry
# point stays fast (bad flags fail before JAX is imported).
_EXPORTS = {
    "layers": "lwc.layers", "Selection": "lwc.layers",
    "recalibrate_batch_stats": "lwc.batchnorm",
    "apply_masks": "lwc.masks", "init_masks": "lwc.masks", "layer_counts": "lwc.masks",
    "layer_groups": "lwc.masks", "layer_thresholds": "lwc.masks",
    "prunable_layers": "lwc.masks", "prune": "lwc.masks", "total_counts": "lwc.masks",
    "as_model_fn": "lwc.model_fn", "linen_model": "lwc.model_fn", "nnx_model": "lwc.model_fn",
    "split_variables": "lwc.model_fn",
    "get_masks": "lwc.optim", "masked": "lwc.optim", "prunable": "lwc.optim",
    "prune_nnx": "lwc.optim", "prune_train_state": "lwc.optim", "set_masks": "lwc.optim",
    "TrainState": "lwc.train", "cross_entropy": "lwc.train", "eval_step": "lwc.train",
    "predict": "lwc.train", "train_step": "lwc.train", "train_steps": "lwc.train",
}


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'lwc' has no attribute '{name}'")
  module = importlib.import_module(_EXPORTS[name])
  value = module if name == "layers" else getattr(module, name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))


__version__ = "0.1.0"

__all__ = [  # noqa: F822 (loaded lazily by __getattr__)
    "Selection", "TrainState", "apply_masks", "as_model_fn", "cross_entropy", "eval_step",
    "get_masks", "init_masks", "layer_counts", "layer_groups", "layer_thresholds", "layers",
    "linen_model", "masked", "nnx_model", "predict", "prunable", "prunable_layers", "prune",
    "prune_nnx", "prune_train_state", "recalibrate_batch_stats", "set_masks", "split_variables",
    "total_counts",
    "train_step", "train_steps",
]
