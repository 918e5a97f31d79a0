"""lwc.allocation: a compression target's cut shared by one ranking of every survivor (global
magnitude, LAMP, uniform), exact to the weight, through the pipeline's magnitude cut."""

import chex
import numpy as np
import pytest

from lwc import allocation
from lwc import masks as masks_lib
from lwc import pipeline
from lwc import schedule

from tests.test_schedule import small_target_config


def _lamp_by_definition(w):
  a = np.square(np.asarray(w, np.float64))
  return np.array([x / a[a >= x].sum() for x in a])


def test_lamp_scores_match_the_definition_and_keep_magnitude_order():
  w = np.random.default_rng(0).normal(size=257)
  w[:3] = [0.5, -0.5, 0.0]  # a tie and a zero
  scores = allocation.lamp_scores(w)
  chex.assert_trees_all_close(scores, _lamp_by_definition(w), rtol=1e-12)
  assert scores.max() == 1.0 and scores[0] == scores[1]
  order = np.argsort(np.abs(w), kind="stable")
  assert np.all(np.diff(scores[order]) >= 0)  # within a layer LAMP ranks by |w|


def _pruned_lenet(make_params):
  _, params = make_params("lenet_300_100", seed=1)
  masks = masks_lib.init_masks(params)
  # Start from a network that is not fresh: the layers hold different densities already.
  qualities = schedule.qualities_for_densities(params, masks,
                                               {"fc1": 0.2, "fc2": 0.5, "fc3": 0.9})
  return masks_lib.prune(params, masks, {**qualities, "default": 0.0})


@pytest.mark.parametrize("rule", ["global", "lamp", "uniform"])
def test_keep_counts_add_up_and_the_cut_keeps_exactly_them(make_params, rule):
  params, masks = _pruned_lenet(make_params)
  before = {k: v["nonzero"] for k, v in masks_lib.layer_counts(masks).items()}
  keep = sum(before.values()) // 7
  counts = allocation.keep_counts(params, masks, keep, rule)
  assert sum(counts.values()) == keep
  assert all(0 <= counts[k] <= before[k] for k in before)  # masks never regrow
  densities = allocation.densities(params, masks, counts)
  qualities = schedule.qualities_for_densities(params, masks, densities)
  _, new_masks = masks_lib.prune(params, masks, {**qualities, "default": 0.0})
  after = {k: v["nonzero"] for k, v in masks_lib.layer_counts(new_masks).items()}
  assert after == counts
  if rule == "uniform":  # the same fraction of every layer's survivors, to a weight
    for k in before:
      assert abs(counts[k] - keep * before[k] / sum(before.values())) < 1.0


def test_global_keeps_the_largest_weights_of_the_whole_network(make_params):
  params, masks = _pruned_lenet(make_params)
  keep = 4000
  counts = allocation.keep_counts(params, masks, keep, "global")
  qualities = schedule.qualities_for_densities(params, masks,
                                               allocation.densities(params, masks, counts))
  _, new_masks = masks_lib.prune(params, masks, {**qualities, "default": 0.0})
  kept, cut = [], []
  for layer in counts:
    w = np.abs(np.asarray(params[layer]["kernel"]))
    old, new = np.asarray(masks[layer]["kernel"]), np.asarray(new_masks[layer]["kernel"])
    kept.append(w[new])
    cut.append(w[old & ~new])
  assert np.concatenate(kept).min() >= np.concatenate(cut).max()
  # Brute force over the concatenated survivors gives the same counts.
  alive = {k: np.abs(np.asarray(params[k]["kernel"]))[np.asarray(masks[k]["kernel"])]
           for k in counts}
  threshold = np.sort(np.concatenate(list(alive.values())))[::-1][keep - 1]
  assert counts == {k: int((v >= threshold).sum()) for k, v in alive.items()}


def test_lamp_never_empties_a_layer_and_global_can(make_params):
  params, masks = _pruned_lenet(make_params)
  # Shrink fc3 so that a global magnitude threshold would take every weight of it.
  params = {**params, "fc3": {**params["fc3"], "kernel": params["fc3"]["kernel"] * 1e-6}}
  assert allocation.keep_counts(params, masks, 3, "global")["fc3"] == 0
  assert allocation.keep_counts(params, masks, 3, "lamp") == {"fc1": 1, "fc2": 1, "fc3": 1}


def test_keep_counts_rejects_what_cannot_be_kept(make_params):
  params, masks = _pruned_lenet(make_params)
  total = masks_lib.total_counts(masks)["nonzero"]
  with pytest.raises(pipeline.UserError, match="cannot keep"):
    allocation.keep_counts(params, masks, total + 1, "lamp")
  with pytest.raises(pipeline.UserError, match="unknown allocation rule"):
    allocation.keep_counts(params, masks, 10, "random")


def test_target_compression_with_lamp_runs_no_sweep_and_reaches_the_target(
    small_mnist_dir, tmp_path, monkeypatch):
  from lwc import sensitivity

  def no_sweep(*args, **kwargs):
    raise AssertionError("--allocation=lamp ran a sensitivity sweep")

  monkeypatch.setattr(sensitivity, "sweep", no_sweep)
  config = small_target_config(small_mnist_dir, iterations=3, retrain_epochs=1,
                               allocation="lamp")
  summary = pipeline.run(config, str(tmp_path / "w"))
  history = summary["iterations"]
  assert history[-1]["params_nonzero"] == 266200 // 4  # floor(weights / N), exactly
  for h in history[1:]:
    assert h["allocation"]["rule"] == "lamp"
    got = {k: v["nonzero"] for k, v in h["layers"].items()}
    assert got == h["allocation"]["keep"]
  # The last iteration's cut is LAMP's ranking of the weights it started from.
  before = pipeline.restore_iteration(str(tmp_path / "w"), config, iteration=2)
  assert history[3]["allocation"]["keep"] == allocation.keep_counts(
      before["params"], before["masks"], 266200 // 4, "lamp")


def test_admm_prepares_the_cut_lamp_ranks_ahead(small_mnist_dir, tmp_path):
  config = small_target_config(small_mnist_dir, iterations=2, retrain_epochs=1, allocation="lamp",
                               target_compression=8.0, admm_rho=0.1, admm_updates_per_epoch=3)
  history = pipeline.run(config, str(tmp_path / "w"))["iterations"]
  ahead = history[1]["allocation"]["next_densities"]
  assert history[1]["admm_keep"] == {
      k: int(np.floor(d * history[1]["layers"][k]["weights"] + 0.5)) for k, d in ahead.items()}
  assert history[2]["allocation"]["prepared_by_admm"]
  assert history[2]["allocation"]["keep"] == history[1]["admm_keep"]
  assert history[2]["params_nonzero"] == 266200 // 8
