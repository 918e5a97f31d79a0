"""Dead-neuron removal: smaller dense layers, same function on the whole MNIST test set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import neurons
from lwc.data import mnist
from lwc.models import get_model


@pytest.fixture(scope="module")
def test_images(mnist_dir):
  return jnp.asarray(mnist.load_idx(mnist_dir).test.images)


def sparse_params(make_params, name, seed):
  model, params = make_params(name, seed)
  rng = np.random.default_rng(seed)
  masks = {layer: {"kernel": rng.random(p["kernel"].shape) < 0.1,
                   "bias": np.ones(p["bias"].shape, bool)} for layer, p in params.items()}
  chain = neurons.CHAINS[name]
  first, second = chain[0].name, chain[1].name
  masks[first]["kernel"][..., :4] = False   # units 0-3 of the first layer: no inputs
  masks[second]["kernel"][..., -3:] = False  # last 3 units of the second layer: no inputs
  params = {layer: {"kernel": np.where(masks[layer]["kernel"], p["kernel"], 0).astype(np.float32),
                    "bias": rng.normal(size=p["bias"].shape).astype(np.float32)}
            for layer, p in params.items()}
  return model, params, masks


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_same_function_fewer_units(name, make_params, test_images):
  model, params, masks = sparse_params(make_params, name, seed=3)
  chain = neurons.CHAINS[name]
  small_params, small_masks, removed = neurons.remove_dead_units(params, masks, chain)
  widths = neurons.widths(small_params, chain)
  first, second = chain[0].name, chain[1].name
  assert removed[first] >= 4 and removed[second] >= 3
  assert removed[chain[-1].name] == 0 and widths[chain[-1].name] == 10
  for layer in widths:
    assert widths[layer] == params[layer]["kernel"].shape[-1] - removed[layer]
    assert small_masks[layer]["kernel"].shape == small_params[layer]["kernel"].shape
  # Nothing dead is left, and every surviving weight is kept.
  assert not any(d.any() for d in neurons.dead_units(small_params, small_masks, chain).values())
  small = get_model(name, widths=tuple(widths[layer.name] for layer in chain[:-1]))
  big_logits = model.apply({"params": params}, test_images)
  small_logits = small.apply({"params": small_params}, test_images)
  np.testing.assert_allclose(small_logits, big_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(small_logits.argmax(-1), big_logits.argmax(-1))


def test_dead_units_by_hand():
  chain = neurons.CHAINS["lenet_300_100"]
  masks = {"fc1": {"kernel": np.ones((784, 300), bool)}, "fc2": {"kernel": np.ones((300, 100),
                                                                                     bool)},
           "fc3": {"kernel": np.ones((100, 10), bool)}}
  masks["fc1"]["kernel"][:, 7] = False   # fc1 unit 7: no input
  masks["fc2"]["kernel"][9, :] = False   # fc1 unit 9: no output
  masks["fc3"]["kernel"][42, :] = False  # fc2 unit 42: no output
  dead = neurons.dead_units({}, masks, chain)
  assert list(np.flatnonzero(dead["fc1"])) == [7, 9]
  assert list(np.flatnonzero(dead["fc2"])) == [42]


def test_removal_cascades_backwards(make_params):
  """Killing every fc2 unit that fc1 unit 0 feeds makes fc1 unit 0 dead too."""
  model, params = make_params("lenet_300_100", 0)
  masks = {layer: {"kernel": np.ones(p["kernel"].shape, bool), "bias": np.ones(p["bias"].shape,
                                                                              bool)}
           for layer, p in params.items()}
  masks["fc2"]["kernel"][0, :] = False
  masks["fc2"]["kernel"][0, :2] = True     # fc1 unit 0 feeds only fc2 units 0 and 1 ...
  masks["fc3"]["kernel"][:2, :] = False    # ... which have no outputs
  params = jax.tree.map(lambda w, m: np.where(m, w, 0), params, masks)
  _, _, removed = neurons.remove_dead_units(params, masks, neurons.CHAINS["lenet_300_100"])
  assert removed == {"fc1": 1, "fc2": 2, "fc3": 0}
