"""sensitivity.sweep on any Flax model: BatchNorm CNNs (Linen and NNX, model_state passed in eval
mode), a residual block, a transformer block (attention and embedding layers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lwc
import model_zoo
from lwc import layers, schedule, sensitivity, train

# Swept layers per case (every kind present in each model, few enough to keep the test fast).
SWEPT = {"linen_bn_cnn": None, "nnx_bn_cnn": None, "residual": ["stem", "conv_b", "head"],
         "transformer": ["embed", "attention/query"]}
FRACTIONS = [0.0, 0.5, 0.9]


_PREDICT = {}  # id(model_fn) -> (model_fn, jitted train.predict): one compilation per model


def _predict(model_fn, params, inputs, model_state):
  entry = _PREDICT.get(id(model_fn))
  if entry is None or entry[0] is not model_fn:
    entry = _PREDICT[id(model_fn)] = (model_fn, jax.jit(
        lambda p, s, x: train.predict(model_fn, p, x, s)))
  return np.asarray(entry[1](params, model_state, jnp.asarray(inputs)))


def _error(model_fn, params, inputs, labels, model_state) -> float:
  logits = _predict(model_fn, params, inputs, model_state)
  return float(np.mean(np.argmax(logits, -1) != labels))


_bn_state = model_zoo.trained_looking_bn_state


def _kind(case, layer):
  return next(g for g in ("conv", "fc", "attention", "embedding") if layer in case.groups[g])


@pytest.mark.parametrize("name", sorted(model_zoo.CASES))
def test_sweep_any_model_matches_explicit_pruning(name):
  case = model_zoo.CASES[name]()
  masks = lwc.init_masks(case.params)
  result = sensitivity.sweep(case.model_fn, case.params, masks, case.inputs, case.labels,
                             layers=SWEPT[name], fractions=FRACTIONS, batch_size=7,
                             model_state=case.model_state)
  baseline = _error(case.model_fn, case.params, case.inputs, case.labels, case.model_state)
  assert result.baseline[0] == pytest.approx(baseline, abs=1e-12)
  assert list(result.layers) == [n for n in lwc.prunable_layers(case.params)
                                 if SWEPT[name] is None or n in SWEPT[name]]
  for layer, sweep in result.layers.items():
    assert sweep.group == _kind(case, layer)
    assert sweep.errors[0, 0] == result.baseline[0]
    # fraction 0.5: the same model pruned explicitly and evaluated independently
    pruned, pruned_masks = sensitivity.prune_layer(case.params, masks, layer, 0.5)
    expected = _error(case.model_fn, pruned, case.inputs, case.labels, case.model_state)
    assert sweep.errors[1, 0] == pytest.approx(expected, abs=1e-12), layer
    assert lwc.layer_counts(pruned_masks)[layer]["nonzero"] == sweep.surviving - sweep.removed[1]


@pytest.mark.parametrize("name", ["linen_bn_cnn", "nnx_bn_cnn"])
def test_batch_stats_are_really_used(name):
  """Labels = the model's own predictions with trained-looking BatchNorm statistics: the sweep's
  baseline with those statistics is 0, and with the initial ones it is not."""
  case = model_zoo.CASES[name]()
  state = _bn_state(case.model_state, 7)
  logits = _predict(case.model_fn, case.params, case.inputs, state)
  assert not np.allclose(logits, _predict(case.model_fn, case.params, case.inputs,
                                          case.model_state))
  labels = np.argmax(logits, -1).astype(np.int32)
  masks = lwc.init_masks(case.params)
  with_state = sensitivity.sweep(case.model_fn, case.params, masks, case.inputs, labels,
                                 layers=["conv2"], fractions=FRACTIONS, model_state=state)
  initial = sensitivity.sweep(case.model_fn, case.params, masks, case.inputs, labels,
                              layers=["conv2"], fractions=FRACTIONS,
                              model_state=case.model_state)
  assert with_state.baseline[0] == 0.0
  assert initial.baseline[0] == _error(case.model_fn, case.params, case.inputs, labels,
                                       case.model_state) > 0.0
  for i, f in enumerate(FRACTIONS):
    pruned, _ = sensitivity.prune_layer(case.params, masks, "conv2", f)
    assert with_state.layers["conv2"].errors[i, 0] == pytest.approx(
        _error(case.model_fn, pruned, case.inputs, labels, state), abs=1e-12)


def test_linen_cached_inputs_match_the_whole_forward_pass():
  case = model_zoo.make_residual(1)
  masks = lwc.init_masks(case.params)
  state = _bn_state(case.model_state, 2)
  kwargs = {"layers": ["conv_a", "head"], "fractions": FRACTIONS, "model_state": state}
  cached = sensitivity.sweep(case.model_fn, case.params, masks, case.inputs, case.labels,
                             **kwargs)
  uncached = sensitivity.sweep(case.model_fn, case.params, masks, case.inputs, case.labels,
                               cache=False, **kwargs)
  for layer in cached.layers:
    np.testing.assert_array_equal(cached.layers[layer].errors, uncached.layers[layer].errors)


def test_schedule_on_attention_and_embedding_layers():
  case = model_zoo.make_transformer()
  masks = lwc.init_masks(case.params)
  want = {"embed": 0.25, "attention/query": 0.5}
  qualities = schedule.qualities_for_densities(case.params, masks, want)
  _, new_masks = lwc.prune(case.params, masks, {**qualities, "default": 0.0})
  counts = lwc.layer_counts(new_masks)
  for layer, density in want.items():
    assert counts[layer]["nonzero"] == int(np.floor(density * counts[layer]["weights"] + 0.5))
  assert counts["head"]["density"] == 1.0
