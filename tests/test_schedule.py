"""lwc.schedule: density targets realised exactly through the pipeline's q * std rule, the
sensitivity-driven allocation, and the --target_compression loop stopping at its budgets."""

import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc import pipeline
from lwc import schedule
from lwc import sensitivity


@pytest.mark.parametrize("std_of", ["survivors", "all"])
def test_qualities_for_densities_prune_to_the_exact_count(make_params, std_of):
  _, params = make_params("lenet_300_100", seed=3)
  masks = masks_lib.init_masks(params)
  params, masks = masks_lib.prune(params, masks, 0.5, std_of)  # not a fresh layer
  wanted = {"fc1": 0.1, "fc2": 0.35, "fc3": 0.9}
  qualities = schedule.qualities_for_densities(params, masks, wanted, std_of)
  pruned, new_masks = masks_lib.prune(params, masks, {**qualities, "default": 0.0}, std_of)
  counts = masks_lib.layer_counts(new_masks)
  for layer, density in wanted.items():
    target = min(round(density * counts[layer]["weights"]),
                 masks_lib.layer_counts(masks)[layer]["nonzero"])
    assert abs(counts[layer]["nonzero"] - target) <= 1, layer
  # A density above the current one prunes nothing (masks never regrow).
  assert qualities["fc3"] == 0.0
  # The survivors are the largest |w| of the old survivors.
  w, m_old, m_new = (np.asarray(t["fc1"]["kernel"]) for t in (params, masks, new_masks))
  assert np.abs(w[m_new]).min() >= np.abs(w[m_old & ~m_new]).max()


def test_qualities_for_densities_rejects_bad_input(make_params):
  _, params = make_params("lenet_300_100")
  masks = masks_lib.init_masks(params)
  with pytest.raises(pipeline.UserError, match="unknown layer"):
    schedule.qualities_for_densities(params, masks, {"fc9": 0.5})
  with pytest.raises(pipeline.UserError, match=r"must be in \[0, 1\]"):
    schedule.qualities_for_densities(params, masks, {"fc1": 1.5})


def test_geometric_density_and_next_density():
  assert schedule.geometric_density(0.09, 1, 2) == pytest.approx(0.3)
  assert schedule.geometric_density(0.09, 2, 2) == pytest.approx(0.09)
  assert schedule.next_density(1.0, 1 / 40, 2) == pytest.approx(np.sqrt(1 / 40))
  assert schedule.next_density(0.01, 1 / 40, 3) == 0.01  # already past the target


def fake_sweep(curves, surviving, losses=None):
  """A SweepResult with given top-1 error (and loss) curves over fractions 0, 0.25, 0.5, 0.75."""
  fractions = np.asarray([0.0, 0.25, 0.5, 0.75])
  layers = {}
  for name, errs in curves.items():
    layers[name] = sensitivity.LayerSweep(
        name=name, group="fc", weights=surviving[name], surviving=surviving[name], std=1.0,
        removed=np.zeros(4, int), thresholds=np.zeros(4), qualities=np.zeros(4),
        errors=np.asarray(errs, float)[:, None],
        losses=None if losses is None else np.asarray(losses[name], float))
  return sensitivity.SweepResult(fractions=fractions, ks=(1,), baseline=np.asarray([0.01]),
                                 layers=layers, num_examples=100, std_of="survivors", seconds=0.0)


def test_allocate_cuts_the_insensitive_layer_first_and_hits_the_count():
  result = fake_sweep({"sensitive": [0.01, 0.05, 0.20, 0.50],
                       "robust": [0.01, 0.01, 0.011, 0.02]},
                      {"sensitive": 1000, "robust": 1000})
  fractions = schedule.allocate(result, 600)
  assert fractions["robust"] > fractions["sensitive"]
  assert fractions["robust"] == pytest.approx(0.6)
  assert fractions["sensitive"] == 0.0
  removed = sum(f * 1000 for f in fractions.values())
  assert removed == pytest.approx(600)
  fractions = schedule.allocate(result, 1000)  # robust maxes out, the rest from sensitive
  assert fractions["robust"] == 0.75 and fractions["sensitive"] == pytest.approx(0.25)
  with pytest.raises(pipeline.UserError, match="cannot remove 1600 weights"):
    schedule.allocate(result, 1600)


def test_allocate_on_the_loss_breaks_the_ties_the_error_cannot_see():
  # On 5,000 examples neither layer's first cuts cost a whole example; the loss still says
  # which one they hurt.
  errors = {"small": [0.02, 0.02, 0.02, 0.03], "big": [0.02, 0.02, 0.02, 0.03]}
  losses = {"small": [0.07, 0.0701, 0.0702, 0.09], "big": [0.07, 0.075, 0.08, 0.10]}
  result = fake_sweep(errors, {"small": 400, "big": 1000}, losses)
  # By error, the tie goes to the layer with the most survivors.
  assert schedule.allocate(result, 250) == pytest.approx({"small": 0.0, "big": 0.25})
  # By loss, the cheap layer is cut first: 0.0001 per 100 weights against 0.005 per 250.
  by_loss = schedule.allocate(result, 250, "loss")
  assert by_loss["small"] == 0.5 and by_loss["big"] == pytest.approx(0.05)
  with pytest.raises(pipeline.UserError, match="did not measure the loss"):
    schedule.allocate(fake_sweep(errors, {"small": 400, "big": 1000}), 250, "loss")
  with pytest.raises(pipeline.UserError, match="must be 'error' or 'loss'"):
    schedule.allocate(result, 250, "top5")


def small_target_config(data_dir, **overrides):
  base = dict(model="lenet_300_100", data_dir=data_dir, batch_size=80, learning_rate=0.05,
              dense_epochs=2, retrain_epochs=1, iterations=6, target_compression=4.0,
              max_error_increase=0.5, sensitivity_examples=500, tensorboard=False,
              log_every_seconds=1e9)
  base.update(overrides)
  return pipeline.Config(**base)


def test_target_compression_reaches_the_target_and_then_stops(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  summary = pipeline.run(small_target_config(small_mnist_dir, iterations=3), workdir)
  history = summary["iterations"]
  # Geometric steps (4^(1/3) each) land on 4x at the last iteration.
  assert [round(h["compression"], 2) for h in history] == [1.0, 1.59, 2.52, 4.0]
  for h in history[1:-1]:
    assert h["params_nonzero"] == round(h["allocation"]["density_wanted"] * 266200)
  assert history[-1]["params_nonzero"] == 266200 // 4  # floor(weights / N): reached exactly
  assert summary["target"]["reached"] and summary["target"]["best_iteration"] == 3
  # Allowed more iterations, the finished run stops at once: the target is reached.
  again = pipeline.run(small_target_config(small_mnist_dir, iterations=6), workdir)
  assert len(again["iterations"]) == 4


def test_target_compression_on_the_log_polynomial_schedule(small_mnist_dir, tmp_path):
  config = small_target_config(small_mnist_dir, iterations=3, retrain_epochs=0,
                               density_schedule="log_polynomial", schedule_power=2.0)
  history = pipeline.run(config, str(tmp_path / "w"))["iterations"]
  # Density 0.25 ** (1 - (1 - k/3) ** 2): 2.16x, 3.43x, then the target exactly.
  assert [h["params_nonzero"] for h in history[1:-1]] == [
      int(np.floor(0.25 ** (1 - (1 - k / 3) ** 2) * 266200 + 0.5)) for k in (1, 2)]
  assert history[-1]["params_nonzero"] == 266200 // 4


def test_target_compression_allocates_on_the_validation_loss(small_mnist_dir, tmp_path):
  config = small_target_config(small_mnist_dir, iterations=2, retrain_epochs=0,
                               allocation_metric="loss")
  history = pipeline.run(config, str(tmp_path / "w"))["iterations"]
  assert [h["allocation"]["metric"] for h in history[1:]] == ["loss", "loss"]
  assert history[-1]["params_nonzero"] == 266200 // 4


def test_target_compression_stops_at_the_error_budget(small_mnist_dir, tmp_path):
  # A budget no pruned network meets: the first iteration over it is the last one run.
  config = small_target_config(small_mnist_dir, target_compression=50.0, iterations=3,
                               max_error_increase=0.0, retrain_epochs=0)
  summary = pipeline.run(config, str(tmp_path / "w"))
  history = summary["iterations"]
  # The budget is on the validation split, which takes the decisions.
  dense = history[0]["validation_error"]
  over = [h for h in history[1:] if h["validation_error"] > dense]
  assert over, "expected pruning 50x without retraining to cost accuracy"
  assert history[-1] is not None and history[-1]["iteration"] == over[0]["iteration"]
  target = summary["target"]
  assert not target["reached"] and target["chosen_on"] == "validation"
  assert target["best_iteration"] == max(
      (h for h in history if h["validation_error"] <= dense), key=lambda h: h["compression"]
  )["iteration"]
