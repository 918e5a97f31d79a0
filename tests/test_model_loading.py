"""lwc.models: the new zoo members (ResNet, ViT) and models by import path, Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lwc
from lwc import batchnorm
from lwc import models
from lwc.errors import UserError

EXAMPLE = jnp.zeros((2, 28, 28, 1), jnp.float32)


def test_resnet_has_batch_stats_and_conv_groups():
  model_fn, params, state = models.build("resnet", {}, EXAMPLE)
  groups = lwc.layer_groups(params)
  assert groups["fc"] == ["head"] and len(groups["conv"]) == 9
  assert lwc.total_counts(lwc.init_masks(params))["weights"] == 77072
  # mean and var of the stem's BN, 2 per block and the projections of stages 2 and 3
  assert len(batchnorm.statistic_names(state)) == 2 * (1 + 2 + 3 + 3)
  out, new_state = model_fn(params, state, EXAMPLE, train=True, rng=jax.random.key(0))
  assert out.shape == (2, 10)
  assert set(new_state) == {"batch_stats"}


def test_vit_groups_attention_and_embedding():
  model_fn, params, state = models.build("vit", {"patch": 7, "width": 16, "depth": 1,
                                                 "heads": 2}, EXAMPLE)
  groups = lwc.layer_groups(params)
  assert state == {}
  assert groups["attention"] == ["block0/attention/key", "block0/attention/out",
                                 "block0/attention/query", "block0/attention/value"]
  assert groups["embedding"] == ["position"]
  assert groups["fc"] == ["block0/mlp_in", "block0/mlp_out", "head", "patch_embed"]
  assert model_fn(params, state, EXAMPLE, train=False)[0].shape == (2, 10)


@pytest.mark.parametrize("spec, kwargs", [("user_models:BNNet", {"width": 4}),
                                          ("user_models:make_bn_net", {"width": 4}),
                                          ("user_models:NNXNet", {"width": 4})])
def test_user_models_by_import_path(spec, kwargs):
  model_fn, params, state = models.build(spec, kwargs, EXAMPLE, seed=3)
  assert lwc.prunable_layers(params) == ["conv", "fc"]
  assert np.shape(lwc.layers.prunable_leaves(params)["conv"][1]) == (3, 3, 1, 4)
  assert len(batchnorm.statistic_names(state)) == 2
  out, _ = model_fn(params, state, EXAMPLE, train=False)
  assert out.shape == (2, 10)


@pytest.mark.parametrize("spec, message", [
    ("nope", r"unknown model 'nope': expected a built-in name \(alexnet, lenet5, lenet_300_100, "
             r"resnet, vgg16, vit\) or an import path package.module:factory"),
    ("no_such_package.nets:Net", r"cannot import module 'no_such_package.nets': "
                                 r"ModuleNotFoundError"),
    ("user_models:Missing", r"module 'user_models' has no attribute 'Missing'"),
    ("user_models:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a Flax module class"),
    ("lwc:models", r"'models' is a module, not a Flax module class"),
    ("user_models:broken_factory", r"building it with \(\) failed: RuntimeError: this factory "
                                   r"always fails"),
    ("user_models:not_a_module", r"gave a int, not a Flax Linen or NNX module"),
])
def test_bad_import_paths_say_what_is_wrong(spec, message):
  with pytest.raises(UserError, match=message):
    models.build(spec, {}, EXAMPLE)


def test_bad_kwargs_and_bad_inputs():
  with pytest.raises(UserError, match=r"building it with \(depth_typo=2\) failed: TypeError"):
    models.build("vit", {"depth_typo": 2}, EXAMPLE)
  with pytest.raises(UserError, match=r"initialising it on inputs of shape \(2, 28, 28, 1\) "
                                      r"failed: ValueError: image 28x28 is not divisible"):
    models.build("vit", {"patch": 5}, EXAMPLE)


@pytest.mark.parametrize("settings", [dict(dropout=0.5), dict(retrain_dropout=0.5)])
def test_dropout_needs_a_model_that_takes_its_rates(settings):
  """Dropout (dense or retraining only) reaches a model through its factory's dropout argument;
  one without it is refused before anything runs. With no retraining, --retrain_dropout asks
  nothing of the model (it is reported as a setting without effect)."""
  from lwc import network as network_lib
  from lwc.config import Config
  config = Config(model="user_models:BNNet", dropout_layers=("fc1",), **settings)
  with pytest.raises(UserError, match="user_models:BNNet takes no dropout argument"):
    network_lib.from_config(config, (28, 28, 1), 10)
  if "retrain_dropout" in settings:
    network_lib.from_config(config.replace(iterations=0), (28, 28, 1), 10)
