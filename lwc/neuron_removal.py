"""Section 3.5, pruning neurons: after the last iteration the pipeline writes workdir/small_model,
the network without the neurons (channels) that pruning left with no input or no output.

LeNets use their known layer chain (`lwc.neurons.CHAINS`) and are rebuilt at the smaller widths;
any other model goes through `lwc.neurons.remove_dead_channels`, which follows the traced dataflow
and refuses, naming it, a coupling it cannot follow (a residual add, attention): the summary then
says why no small model was written. The smaller model's error is measured before it is saved.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from lwc import files
from lwc import network as network_lib
from lwc import neurons
from lwc.errors import UserError

log = logging.getLogger("lwc")


def _save(path: str, tree: dict) -> None:
  import orbax.checkpoint as ocp

  def write(folder):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder, tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
  files.replace_dir(write, path)  # the old small model stays until the new one is complete


def _no_small_model(path: str, empty: list[str]) -> dict:
  log.warning("every unit of %s is dead: the pruned network computes a constant; no small "
              "model written", ", ".join(empty))
  files.recover_dir(path)
  return {"empty_layers": empty}


def _chain_removal(network, chain, params, masks, model_state):
  """(small params, masks, state, widths, removed, model_fn) for a zoo model with a chain."""
  empty = [layer.name for layer in chain
           if layer.name in masks and not np.asarray(masks[layer.name]["kernel"]).any()]
  if empty:
    return empty, None
  small_params, small_masks, removed = neurons.remove_dead_units(params, masks, chain)
  widths = neurons.widths(small_params, chain)
  empty = [name for name, width in widths.items() if width == 0]
  if empty:
    return empty, None
  small = network_lib.with_widths(network, widths, [layer.name for layer in chain[:-1]])
  model_fn = network_lib.build(small, jax.random.PRNGKey(0), abstract=True).model_fn
  return [], (small_params, small_masks, model_state, widths, removed, model_fn)


def _traced_removal(model_fn, params, masks, model_state, inputs):
  """The dataflow-traced removal; the smaller model's function is None when it cannot be run
  (a Linen module fixes its widths; the removal was then checked on the trace alone)."""
  removal = neurons.remove_dead_channels(model_fn, params, masks, inputs, model_state)
  runs = removal.checks["small_model"].startswith("ran") or not any(removal.removed.values())
  return (removal.params, removal.masks, removal.model_state, removal.widths, removal.removed,
          model_fn if runs else None)


def write_small_model(workdir: str, network, model_fn, params, masks, model_state, inputs,
                      evaluate) -> dict:
  """Removes dead neurons, checks the smaller model's error (`evaluate(model_fn, params,
  model_state) -> {'error'}`), saves it to workdir/small_model; returns the summary's record."""
  path = os.path.abspath(os.path.join(workdir, "small_model"))
  params, masks, model_state = jax.device_get((params, masks, model_state))
  chain = neurons.CHAINS.get(network.model)
  try:
    if chain is not None:
      empty, result = _chain_removal(network, chain, params, masks, model_state)
      if empty:
        return _no_small_model(path, empty)
    else:
      result = _traced_removal(model_fn, params, masks, model_state, inputs)
  except UserError as e:
    log.warning("no small model written: %s", e)
    return {"skipped": str(e)}
  small_params, small_masks, small_state, widths, removed, small_fn = result
  same = (evaluate(small_fn, small_params, small_state) if small_fn is not None else
          {"error": None})
  tree = {"params": small_params, "masks": small_masks}
  if small_state:
    tree["model_state"] = small_state
  _save(path, tree)
  log.info("dead neurons removed: %s; widths now %s; test error of the smaller model %s",
           removed, widths, "not measured (checked on the trace)" if same["error"] is None
           else f"{100 * same['error']:.2f}%")
  return {"removed": removed, "widths": widths, "test_error": same["error"], "path": path}
