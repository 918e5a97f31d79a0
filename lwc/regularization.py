"""Section 3.1, regularisation, and the optimiser of each phase.

Dense training and retraining each have their own penalty (--regularization / --reg_strength,
--retrain_regularization / --retrain_reg_strength: L1 keeps more weights near zero, so more can be
pruned before retraining; L2 retrains better, Figure 5) and their own learning rate (retraining:
--retrain_lr_scale of the original). `lwc.optim.masked` applies the penalty to surviving weights
only and keeps pruned ones at exactly 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optax

from lwc import optim


def learning_rate(config, iteration: int, total_steps: int):
  """The learning-rate schedule of the phase of `iteration` (0: dense training)."""
  dense = iteration == 0 or config.lr_rewind
  base = config.learning_rate * (1.0 if dense else config.retrain_lr_scale)
  kind = config.lr_schedule if dense else (config.retrain_lr_schedule or config.lr_schedule)
  return optim.learning_rate_schedule(kind, base, total_steps,
                                      decay_steps=config.lr_decay_steps,
                                      decay_factor=config.lr_decay_factor)


def penalty(config, iteration: int) -> tuple[str, float]:
  """(kind, strength) of the penalty of the phase of `iteration`."""
  if iteration == 0:
    return config.regularization, config.reg_strength
  return config.retrain_regularization, config.retrain_reg_strength


def label_smoothing(config, iteration: int) -> float:
  """The label smoothing of the phase of `iteration` (`lwc.train.smoothed_cross_entropy`)."""
  if iteration == 0 or config.retrain_label_smoothing < 0:
    return config.label_smoothing
  return config.retrain_label_smoothing


def average_decay(config, iteration: int) -> float:
  """The weight-averaging decay of the phase of `iteration` (0: none; `lwc.averaging`)."""
  if iteration == 0 or config.retrain_average_decay < 0:
    return config.average_decay
  return config.retrain_average_decay


def phase_optimizer(config, iteration: int, total_steps: int, frozen: Sequence[str] = (),
                    admm_keep: Mapping[str, int] | None = None, steps_per_epoch: int = 1):
  """The masked optimiser of one phase: inner optimiser at the phase's learning rate, the
  phase's penalty, `frozen` layers left unchanged (section 3.3), and with --admm_rho every
  retraining's pull toward `admm_keep` (`lwc.admm.next_keep`; its state is in the optimiser
  state of every retraining, also when `admm_keep` is empty, so a checkpoint's structure depends
  only on the settings and the iteration). With the phase's --average_decay the whole of it is
  wrapped in `lwc.averaging.moving_average`."""
  kind, strength = penalty(config, iteration)
  inner = optim.make_optimizer(config.optimizer, learning_rate(config, iteration, total_steps),
                               config.momentum)
  if config.admm_rho and iteration > 0:
    from lwc import admm
    every = max(1, steps_per_epoch // config.admm_updates_per_epoch)
    inner = optax.chain(admm.admm(admm_keep or {}, config.admm_rho, every,
                                  config.admm_rho_growth), inner)
  tx = optim.masked(inner, kind, strength, frozen_layers=list(frozen))
  if decay := average_decay(config, iteration):
    from lwc import averaging
    tx = averaging.moving_average(tx, decay)
  return tx
