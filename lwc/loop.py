"""The one place where training steps run: a phase (dense training or one retraining) epoch by
epoch, with the NaN/Inf check, SIGTERM and mid-phase progress checkpoints handled once.

A phase stops cleanly at a step boundary: after SIGTERM it saves a progress checkpoint and raises
`Preempted`; on a non-finite loss or parameter it raises `NumericError` without saving (the last
good checkpoint stays). Progress checkpoints are also written every `checkpoint_every_steps`
steps; none is written at the end of the last epoch (the iteration's own checkpoint follows).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import logging
import math
import signal

import jax
import numpy as np

from lwc import faults
from lwc import writers
from lwc.errors import UserError

log = logging.getLogger("lwc")


class Preempted(Exception):
  """SIGTERM arrived: a checkpoint was written at the next step boundary; run again to resume."""


class NumericError(UserError):
  """A NaN or Inf in the loss or the parameters; nothing was saved after the last good step."""


class Sigterm:
  """While active, SIGTERM only sets `received`; the run saves at the next step boundary."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self) -> "Sigterm":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    if not self.received:
      log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
    self.received = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: `iteration` (0 = dense), its `name` ('dense'/'retrain'), `epochs`, where it
  starts (`start_epoch`, `start_batch`: a mid-phase resume) and the global step it began at."""

  iteration: int
  name: str
  epochs: int
  start_epoch: int = 0
  start_batch: int = 0
  first_step: int = 0


def check_preempted(sigterm: Sigterm, phase: Phase, step: int, where: str | None = None) -> None:
  if sigterm.received:
    message = (f"preempted at step {step} (iteration {phase.iteration}, {where or phase.name}); "
               "checkpoint saved, run the same command again to resume")
    log.warning(message)
    raise Preempted(message)


def _first_bad_leaf(tree) -> str | None:
  """The path of the first leaf holding a NaN or Inf, or None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    if not np.all(np.isfinite(leaf)):
      return jax.tree_util.keystr(path)
  return None


def _check_finite(loss: float, metrics, state, step: int, phase: Phase, epoch: int) -> None:
  if math.isfinite(loss) and bool(metrics["params_finite"]):
    return
  what = (f"loss is {loss}" if not math.isfinite(loss) else
          f"parameter {_first_bad_leaf(state.params)} is not finite")
  raise NumericError(f"{what} at step {step} (iteration {phase.iteration}, {phase.name}, epoch "
                     f"{epoch + 1}); stopped without saving: the last good checkpoint is kept "
                     "(lower the learning rate or check the data)")


def run_phase(phase: Phase, state, data, rng: jax.Array, *, sigterm: Sigterm,
              checkpoint_every_steps: int, log_every_seconds: float,
              save_progress: Callable[[object, int, int, int], None],
              end_of_epoch: Callable[[object, int, int], None], teacher=None,
              label_smoothing: float = 0.0):
  """Runs `phase` from its start to its end; returns (state, global step).

  `save_progress(state, step, epoch, batch)` writes a checkpoint that resumes at (epoch, batch);
  `end_of_epoch(state, step, epoch)` evaluates and logs; `teacher`: an `lwc.distillation.Teacher`
  the phase distils from, or None; `label_smoothing`: the phase's (`lwc.train`).
  """
  step = phase.first_step + int(state.step)
  total = phase.epochs * data.steps_per_epoch
  bar = writers.Progress(f"iteration {phase.iteration} {phase.name}", total, log_every_seconds,
                         done=int(state.step))
  last_save = step

  def save_if_due(state, step, epoch, batch):
    nonlocal last_save
    if sigterm.received or (checkpoint_every_steps and
                            step - last_save >= checkpoint_every_steps):
      save_progress(state, step, epoch, batch)
      last_save = step
      check_preempted(sigterm, phase, step)

  for epoch in range(phase.start_epoch, phase.epochs):
    start = phase.start_batch if epoch == phase.start_epoch else 0
    for first, chunk in data.chunks(phase.iteration, epoch, start):
      state, metrics = data.train(state, chunk, rng, teacher, label_smoothing)
      loss = float(metrics["loss"])
      steps = jax.tree.leaves(chunk)[0].shape[0]
      step += steps
      _check_finite(loss, metrics, state, step, phase, epoch)
      bar.update(steps, loss)
      faults.maybe_kill("step", step, at_least=True)
      if first + steps != data.steps_per_epoch:
        save_if_due(state, step, epoch, first + steps)
    end_of_epoch(state, step, epoch)
    if epoch + 1 < phase.epochs:
      save_if_due(state, step, epoch + 1, 0)
  return state, step
