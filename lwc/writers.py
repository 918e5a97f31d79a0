"""What a run reports while it runs: progress lines, metrics.jsonl and TensorBoard, the summary.

metrics.jsonl has one line per evaluation: {iteration, phase, step, loss, validation_error,
test_error, params_nonzero[, *_top5_error]}; summary.json / summary.md the per-iteration and
per-layer tables (lwc.report). Only process 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import logging
import os
import time

import jax

from lwc import files
from lwc import report

log = logging.getLogger("lwc")


class Progress:
  """Console progress for a phase: step, loss, steps/s, ETA, at most every `every` seconds."""

  def __init__(self, label: str, total_steps: int, every: float, done: int = 0):
    self.label, self.total, self.every = label, total_steps, every
    self.start = self.last = time.perf_counter()
    self.done = self.first = done

  def update(self, steps: int, loss: float, force: bool = False) -> None:
    self.done += steps
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = (self.done - self.first) / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    log.info("%s step %d/%d loss %.4f %.0f steps/s ETA %.0fs", self.label, self.done,
             self.total, loss, rate, eta)


class Writers:
  """metrics.jsonl and (optionally) TensorBoard scalars, from process 0 only.

  On resume, lines past the resume point (`keep(record)` false) are dropped: that work is about to
  be redone, and redoing it writes the same lines again.
  """

  def __init__(self, workdir: str, tensorboard: bool, keep: Callable[[dict], bool]):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      kept = []
      text = files.read_text(self.path, "metrics file")
      for line in text.splitlines(keepends=True):
        try:
          if keep(json.loads(line)):
            kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
          continue  # a line cut by kill -9
      if "".join(kept) != text:
        files.atomic_write_text(self.path, "".join(kept))  # a kill leaves the old or the new
    if tensorboard:
      from flax.metrics import tensorboard as tb  # imports TensorFlow
      self.tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    files.append_line(self.path, json.dumps(record))
    if self.tb is not None:
      prefix = f"{record['phase']}/"
      for key in ("loss", "train_sample_error", "validation_error", "test_error",
                  "params_nonzero"):
        if key in record:
          self.tb.scalar(prefix + key, record[key], record["step"])
      self.tb.flush()


def write_summary(workdir: str, summary: dict) -> None:
  """summary.json and summary.md, each replaced atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  files.atomic_write_json(os.path.join(workdir, "summary.json"), summary, indent=1)
  files.atomic_write_text(os.path.join(workdir, "summary.md"), report.markdown(summary))
