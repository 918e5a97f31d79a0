"""Schedules beyond the paper, all magnitude pruning with monotone masks (issue 13.3): the
threshold's std taken from the dense layer and kept, one global threshold, the cubic density
schedule, learning-rate rewinding. Each is checked against its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import config as config_lib
from lwc import iterative
from lwc import masks as masks_lib
from lwc import regularization
from lwc import schedule


def trees(seed=0):
  rng = np.random.default_rng(seed)
  params = {"fc1": {"kernel": jnp.asarray(rng.normal(0, 1.0, (40, 30)), jnp.float32),
                    "bias": jnp.zeros(30)},
            "fc2": {"kernel": jnp.asarray(rng.normal(0, 0.1, (30, 10)), jnp.float32),
                    "bias": jnp.zeros(10)}}
  return params, masks_lib.init_masks(params)


def cfg(**kw):
  return config_lib.Config(iterations=3, **kw)


def test_cubic_density_follows_zhu_gupta():
  assert schedule.cubic_density(0.1, 0, 4) == 1.0
  assert schedule.cubic_density(0.1, 4, 4) == pytest.approx(0.1)
  for done in range(5):
    assert schedule.cubic_density(0.1, done, 4) == pytest.approx(
        0.1 + 0.9 * (1 - done / 4) ** 3)
  # Large cuts first: the first step removes more than the geometric schedule's.
  assert schedule.cubic_density(0.1, 1, 4) < schedule.geometric_density(0.1, 1, 4)


def test_polynomial_and_log_polynomial_densities():
  for done in range(5):
    assert schedule.polynomial_density(0.1, done, 4, power=3.0) == pytest.approx(
        schedule.cubic_density(0.1, done, 4))
    assert schedule.polynomial_density(0.1, done, 4, power=2.0) == pytest.approx(
        0.1 + 0.9 * (1 - done / 4) ** 2)
    # Power 1 in log space is the geometric schedule.
    assert schedule.log_polynomial_density(0.005, done, 4, power=1.0) == pytest.approx(
        schedule.geometric_density(0.005, done, 4))
    assert schedule.log_polynomial_density(0.005, done, 4, power=2.0) == pytest.approx(
        0.005 ** (1 - (1 - done / 4) ** 2))
  # Power 2: the fraction of survivors each step keeps grows, and the last cut is the smallest,
  # where cubic's last-but-one cut toward 0.5% takes 42% of the survivors.
  total, final = 12, 0.005
  densities = [schedule.log_polynomial_density(final, k, total, 2.0) for k in range(total + 1)]
  kept = [b / a for a, b in zip(densities, densities[1:])]
  assert densities[0] == 1.0 and densities[-1] == pytest.approx(final)
  assert all(x < y for x, y in zip(kept, kept[1:]))
  assert 1 - kept[-1] == pytest.approx(1 - final ** (1 / total ** 2))
  assert 1 - kept[-1] < 0.04
  cubic = [schedule.cubic_density(final, k, total) for k in range(total + 1)]
  assert 1 - cubic[-2] / cubic[-3] > 0.4
  assert schedule.scheduled_density("log_polynomial", final, 3, total, 2.0) == densities[3]
  assert schedule.scheduled_density("polynomial", final, 3, total, 3.0) == cubic[3]
  with pytest.raises(ValueError, match="unknown density schedule 'cubik'"):
    schedule.scheduled_density("cubik", final, 3, total)


@pytest.mark.parametrize("kind", ["geometric", "cubic", "polynomial", "log_polynomial"])
def test_layer_density_follows_the_schedule(kind):
  params, masks = trees()
  config = cfg(layer_densities={"fc1": 0.05}, density_schedule=kind, schedule_power=2.0)
  for iteration in (1, 2, 3):
    quality, wanted = iterative._density_quality(config, iteration, params, masks)
    assert wanted == {"fc1": schedule.scheduled_density(kind, 0.05, iteration, 3, 2.0)}
    assert set(quality) >= {"default", "fc1"}
  if kind == "log_polynomial":
    assert wanted["fc1"] == pytest.approx(0.05)
    assert iterative._density_quality(config, 1, params, masks)[1]["fc1"] == pytest.approx(
        0.05 ** (1 - (2 / 3) ** 2))


def test_schedule_docstring_examples():
  import doctest
  assert doctest.testmod(schedule, raise_on_error=True).attempted >= 2


def test_dense_std_is_measured_once_and_kept():
  params, masks = trees()
  dense = iterative.dense_reference(params, masks)
  config = cfg(std_of="dense", qualities=(0.8,))
  plan1 = iterative.plan_pruning(config, 1, params, masks, dense=dense)
  params, masks = iterative.prune(plan1, config, jax.random.PRNGKey(0), params, masks)
  plan2 = iterative.plan_pruning(config, 2, params, masks, dense=dense)
  for layer in ("fc1", "fc2"):
    want = 0.8 * dense["layer_std"][layer]
    assert plan1.thresholds[layer] == pytest.approx(want, rel=1e-5)
    assert plan2.thresholds[layer] == pytest.approx(want, rel=1e-5)
  # The paper's rule (survivors) takes the std of what is left: a larger threshold now.
  survivors = iterative.plan_pruning(cfg(qualities=(0.8,)), 2, params, masks)
  assert survivors.thresholds["fc1"] > plan2.thresholds["fc1"] * 1.05


def test_global_threshold_is_one_for_every_layer():
  params, masks = trees()
  plan = iterative.plan_pruning(cfg(threshold_scope="global", qualities=(0.5,)), 1, params,
                                masks)
  pooled = np.concatenate([np.asarray(params[k]["kernel"]).ravel() for k in ("fc1", "fc2")])
  assert plan.thresholds["fc1"] == pytest.approx(plan.thresholds["fc2"], rel=1e-6)
  assert plan.thresholds["fc1"] == pytest.approx(0.5 * pooled.std(), rel=1e-5)
  new_params, new_masks = iterative.prune(plan, cfg(threshold_scope="global"),
                                          jax.random.PRNGKey(0), params, masks)
  # fc2's weights are 10x smaller: a global cut takes most of them.
  assert masks_lib.layer_counts(new_masks)["fc2"]["density"] < 0.2
  assert masks_lib.layer_counts(new_masks)["fc1"]["density"] > 0.5
  for layer in ("fc1", "fc2"):
    kept = np.asarray(new_masks[layer]["kernel"])
    assert np.all(np.asarray(new_params[layer]["kernel"])[~kept] == 0.0)


def test_lr_rewind_retrains_at_the_dense_schedule():
  config = cfg(learning_rate=0.1, lr_schedule="cosine", retrain_lr_scale=0.1,
               retrain_lr_schedule="constant", lr_rewind=True)
  dense = regularization.learning_rate(config, 0, 100)
  rewound = regularization.learning_rate(config, 1, 100)
  for step in (0, 50, 99):
    assert float(rewound(step)) == pytest.approx(float(dense(step)))
  plain = regularization.learning_rate(config.replace(lr_rewind=False), 1, 100)
  assert float(plain(50)) == pytest.approx(0.01)
