"""lwc.masks: mask pytrees, per-layer magnitude pruning, monotonicity, counts."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import masks as masks_lib
from lwc.errors import UserError

# fc1's first four entries are already pruned (zeros, mask False); the survivors' std
# (0.8934) and the std of all twelve entries (0.7498) give different thresholds.
FC1_KERNEL = np.array([[0.0, 0.0, 0.0, 0.0],
                       [1.0, -1.0, 0.6, -0.6],
                       [0.3, 2.0, -0.15, 0.8]], np.float32)
FC1_MASK = np.array([[False, False, False, False],
                     [True, True, True, True],
                     [True, True, True, True]])
FC2_KERNEL = np.array([[0.5, -0.01], [-3.0, 0.2], [0.05, 1.5]], np.float32)


def tiny_tree():
  params = {"fc1": {"bias": np.array([1e-6, -1e-7, 0.0, 5e-8], np.float32), "kernel": FC1_KERNEL},
            "fc2": {"bias": np.array([1e-9, 0.0], np.float32), "kernel": FC2_KERNEL}}
  masks = masks_lib.init_masks(params)
  masks["fc1"]["kernel"] = jnp.asarray(FC1_MASK)
  return params, masks


def random_tree(seed):
  rng = np.random.default_rng(seed)
  params = {"params": {
      "fc1": {"kernel": rng.standard_normal((20, 16)).astype(np.float32),
              "bias": (rng.standard_normal(16) * 1e-3).astype(np.float32)},
      "block": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
                         "bias": (rng.standard_normal(4) * 1e-3).astype(np.float32)}},
      "fc2": {"kernel": (rng.standard_normal((16, 5)) * 0.1).astype(np.float32),
              "bias": np.zeros(5, np.float32)}}}
  return params


def np_tree(tree):
  return jax.tree.map(np.asarray, tree)


def assert_subset(new_masks, old_masks):
  """new ⊆ old: no False ever becomes True."""
  for new, old in zip(jax.tree.leaves(new_masks), jax.tree.leaves(old_masks)):
    new, old = np.asarray(new), np.asarray(old)
    assert not np.any(new & ~old), "a pruned connection came back"


def test_init_masks_structure_and_dtype():
  params = random_tree(0)
  masks = masks_lib.init_masks(params)
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  chex.assert_trees_all_equal_shapes(masks, params)
  for m in jax.tree.leaves(masks):
    assert m.dtype == jnp.bool_
    assert bool(jnp.all(m))


def test_layer_names():
  params = random_tree(0)
  assert masks_lib.prunable_layers(params) == ["block/conv", "fc1", "fc2"]  # sorted dict keys
  names = [masks_lib.layer_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert names == ["block/conv"] * 2 + ["fc1"] * 2 + ["fc2"] * 2


def test_apply_masks_zeroes_pruned_entries_only():
  params, masks = tiny_tree()
  params["fc1"]["kernel"] = FC1_KERNEL + 7.0  # pruned entries nonzero now
  out = np_tree(masks_lib.apply_masks(params, masks))
  np.testing.assert_array_equal(out["fc1"]["kernel"][~FC1_MASK], 0.0)
  np.testing.assert_array_equal(out["fc1"]["kernel"][FC1_MASK], (FC1_KERNEL + 7.0)[FC1_MASK])
  np.testing.assert_array_equal(out["fc2"]["kernel"], FC2_KERNEL)


@pytest.mark.parametrize("std_of", ["survivors", "all"])
def test_thresholds_match_numpy(std_of):
  params, masks = tiny_tree()
  thresholds = masks_lib.layer_thresholds(params, masks, 0.7, std_of=std_of)
  assert sorted(thresholds) == ["fc1", "fc2"]
  fc1_values = FC1_KERNEL[FC1_MASK] if std_of == "survivors" else FC1_KERNEL
  np.testing.assert_allclose(float(thresholds["fc1"]), 0.7 * np.std(fc1_values), rtol=1e-6)
  np.testing.assert_allclose(float(thresholds["fc2"]), 0.7 * np.std(FC2_KERNEL), rtol=1e-6)


def test_prune_hand_computed_survivors_vs_all():
  params, masks = tiny_tree()
  # survivors: std 0.8934 -> threshold 0.6253 prunes the +-0.6 entries; all: std 0.7498 ->
  # threshold 0.5249 keeps them.
  assert 0.7 * np.std(FC1_KERNEL[FC1_MASK]) > 0.6 > 0.7 * np.std(FC1_KERNEL)
  _, m_surv = masks_lib.prune(params, masks, 0.7)  # std_of='survivors' is the default
  _, m_all = masks_lib.prune(params, masks, 0.7, std_of="all")
  np.testing.assert_array_equal(np.asarray(m_surv["fc1"]["kernel"]),
                                [[False, False, False, False],
                                 [True, True, False, False],
                                 [False, True, False, True]])
  np.testing.assert_array_equal(np.asarray(m_all["fc1"]["kernel"]),
                                [[False, False, False, False],
                                 [True, True, True, True],
                                 [False, True, False, True]])
  # fc2 had nothing pruned before, so both stds agree: threshold 0.7 * 1.3689 = 0.958.
  expected_fc2 = np.abs(FC2_KERNEL) >= 0.7 * np.std(FC2_KERNEL)
  np.testing.assert_array_equal(expected_fc2, [[False, False], [True, False], [False, True]])
  for m in (m_surv, m_all):
    np.testing.assert_array_equal(np.asarray(m["fc2"]["kernel"]), expected_fc2)
  # The same expectation computed generically with NumPy.
  survivors = FC1_KERNEL[FC1_MASK]
  expected = FC1_MASK & (np.abs(FC1_KERNEL) >= 0.7 * np.std(survivors))
  np.testing.assert_array_equal(np.asarray(m_surv["fc1"]["kernel"]), expected)


@pytest.mark.parametrize("seed", range(3))
def test_pruned_are_exact_zero_and_survivors_bit_identical(seed):
  params = random_tree(seed)
  new_params, new_masks = masks_lib.prune(params, masks_lib.init_masks(params), 1.0)
  for w, nw, m in zip(jax.tree.leaves(params), jax.tree.leaves(np_tree(new_params)),
                      jax.tree.leaves(np_tree(new_masks))):
    assert nw.dtype == w.dtype
    np.testing.assert_array_equal(nw[~m], np.zeros(int((~m).sum()), w.dtype))
    assert not np.any(np.signbit(nw[~m])), "pruned entries must be +0.0"
    # Bit for bit: compare the raw float32 bit patterns.
    np.testing.assert_array_equal(nw[m].view(np.uint32), w[m].view(np.uint32))
  # Quality 1.0 on Gaussian weights prunes about 68% of each layer (|z| < 1).
  counts = masks_lib.layer_counts(new_masks)
  for name in ("fc1", "block/conv"):
    assert 0.5 < 1.0 - counts[name]["density"] < 0.85


@pytest.mark.parametrize("std_of", ["survivors", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_masks_are_monotone(seed, std_of):
  params = random_tree(seed)
  masks = masks_lib.init_masks(params)
  history = []
  for quality in (1.0, 0.5, 0.2, 1.5, 0.0):  # smaller qualities too: nothing may regrow
    params, new_masks = masks_lib.prune(params, masks, quality, std_of=std_of)
    assert_subset(new_masks, masks)
    masks = new_masks
    history.append(masks_lib.total_counts(masks)["nonzero"])
  assert history == sorted(history, reverse=True)
  assert history[0] > history[-1]  # the 1.5 step did prune more


@pytest.mark.parametrize("seed", range(4))
def test_masks_do_not_regrow_when_pruned_params_become_nonzero(seed):
  params = random_tree(seed)
  params, masks = masks_lib.prune(params, masks_lib.init_masks(params), 1.0)
  # Corrupt every pruned entry with a huge magnitude (e.g. an optimiser that forgot the mask).
  corrupted = jax.tree.map(lambda w, m: np.where(np.asarray(m), np.asarray(w), 100.0)
                           .astype(np.float32), params, masks)
  for quality in (0.5, 0.0):
    new_params, new_masks = masks_lib.prune(corrupted, masks, quality)
    assert_subset(new_masks, masks)
    for w, m in zip(jax.tree.leaves(np_tree(new_params)), jax.tree.leaves(np_tree(new_masks))):
      np.testing.assert_array_equal(w[~m], 0.0)
  # With std of survivors the corrupted pruned entries do not even change the threshold.
  t_clean = masks_lib.layer_thresholds(params, masks, 0.5)
  t_corrupt = masks_lib.layer_thresholds(corrupted, masks, 0.5)
  chex.assert_trees_all_close(t_clean, t_corrupt, rtol=1e-6)


def test_biases_never_pruned():
  params, masks = tiny_tree()
  new_params, new_masks = masks_lib.prune(params, masks, 50.0)  # threshold >> every weight
  for layer in ("fc1", "fc2"):
    assert bool(jnp.all(new_masks[layer]["bias"]))
    np.testing.assert_array_equal(np.asarray(new_params[layer]["bias"]), params[layer]["bias"])
    assert not bool(jnp.any(new_masks[layer]["kernel"]))
  assert masks_lib.total_counts(new_masks)["nonzero"] == 0
  assert masks_lib.total_counts(new_masks)["compression"] == math.inf


def test_per_layer_quality_applies_to_named_layer_only():
  params, masks = tiny_tree()
  new_params, new_masks = masks_lib.prune(params, masks, {"fc2": 50.0, "default": 0.0})
  np.testing.assert_array_equal(np.asarray(new_masks["fc1"]["kernel"]), FC1_MASK)  # unchanged
  np.testing.assert_array_equal(np.asarray(new_params["fc1"]["kernel"]), FC1_KERNEL)
  np.testing.assert_array_equal(np.asarray(new_masks["fc2"]["kernel"]), np.zeros((3, 2), bool))
  # Every layer named, no default needed; matches the float version layer by layer.
  _, m_dict = masks_lib.prune(params, masks, {"fc1": 0.7, "fc2": 0.0})
  _, m_float = masks_lib.prune(params, masks, 0.7)
  np.testing.assert_array_equal(np.asarray(m_dict["fc1"]["kernel"]),
                                np.asarray(m_float["fc1"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(m_dict["fc2"]["kernel"]), np.ones((3, 2), bool))
  assert masks_lib.resolve_qualities(params, {"fc1": 0.3, "default": 1.25}) == {
      "fc1": 0.3, "fc2": 1.25}
  assert masks_lib.resolve_qualities(random_tree(0), {"block/conv": 2.0, "default": 1.0}) == {
      "block/conv": 2.0, "fc1": 1.0, "fc2": 1.0}


@pytest.mark.parametrize("quality, message", [
    ({"fc3": 1.0, "default": 1.0},
     "quality given for unknown layer(s) fc3; prunable layers are fc1, fc2"),
    ({"fc1": 1.0}, "no quality for layer(s) fc2 and no default"),
    (-0.5, "quality for layer fc1 must be a finite number >= 0, got -0.5"),
    ({"fc2": -1.0, "default": 1.0},
     "quality for layer fc2 must be a finite number >= 0, got -1.0"),
    (float("nan"), "quality for layer fc1 must be a finite number >= 0, got nan"),
    ({"default": float("nan")}, "quality for layer fc1 must be a finite number >= 0, got nan"),
    (float("inf"), "quality for layer fc1 must be a finite number >= 0, got inf"),
])
def test_bad_quality_raises(quality, message):
  params, masks = tiny_tree()
  with pytest.raises(UserError) as e:
    masks_lib.prune(params, masks, quality)
  assert str(e.value) == message


def test_bad_std_of_raises():
  params, masks = tiny_tree()
  with pytest.raises(UserError, match="std_of must be 'survivors' or 'all', got 'median'"):
    masks_lib.prune(params, masks, 1.0, std_of="median")


def test_layer_and_total_counts():
  params, masks = tiny_tree()
  masks["fc2"]["kernel"] = jnp.asarray([[True, False], [False, False], [False, True]])
  masks["fc2"]["bias"] = jnp.asarray([False, False])  # not prunable: never counted
  counts = masks_lib.layer_counts(masks)
  assert counts == {"fc1": {"weights": 12, "nonzero": 8, "density": 8 / 12},
                    "fc2": {"weights": 6, "nonzero": 2, "density": 2 / 6}}
  totals = masks_lib.total_counts(masks)
  assert totals == {"weights": 18, "nonzero": 10, "density": 10 / 18, "compression": 1.8}
  assert masks_lib.total_counts(masks_lib.init_masks(params)) == {
      "weights": 18, "nonzero": 18, "density": 1.0, "compression": 1.0}


def test_probabilistic_pruning_statistics():
  """P(prune) = max(0, 1 - |w| / 2t): measured per bin on 400k seeded weights."""
  w = jnp.linspace(-1.0, 1.0, 400_001)[:-1]
  params = {"fc": {"kernel": w.reshape(400, 1000), "bias": jnp.zeros(1000)}}
  masks = masks_lib.init_masks(params)
  std = float(jnp.std(w))
  _, new = masks_lib.prune(params, masks, 0.25, rng=jax.random.PRNGKey(0))
  pruned = ~np.asarray(new["fc"]["kernel"]).ravel()
  t = 0.25 * std
  a = np.abs(np.asarray(w))
  for lo, hi in ((0, 0.2 * t), (0.9 * t, 1.1 * t), (1.6 * t, 1.8 * t), (2.0 * t, 1.0)):
    sel = (a >= lo) & (a < hi)
    expected = np.clip(1 - a[sel] / (2 * t), 0, 1).mean()
    assert abs(pruned[sel].mean() - expected) < 0.02, (lo, hi, pruned[sel].mean(), expected)
  assert not pruned[a >= 2 * t].any()
  _, again = masks_lib.prune(params, masks, 0.25, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(again["fc"]["kernel"], new["fc"]["kernel"])
