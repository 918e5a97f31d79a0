"""Smoke runs of the ImageNet experiments on CPU: the real flagfiles (paper settings plus the
per-layer Table 4 / Table 5 densities) on a tiny mocked ImageNet, end to end: dense training ->
every prune/retrain iteration -> checkpoints -> per-layer table with top-1 and top-5 error.

Only what a CPU cannot afford is overridden: a small crop, narrow layers, a few steps.
`tfds.testing.mock_data` serves random examples for `imagenet2012` (no files, no network).
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from lwc import masks as masks_lib
from lwc import pipeline
from lwc.experiments import alexnet as alexnet_entry  # noqa: F401  (defines the flags)
from lwc.experiments import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

SMOKE = {
    "alexnet": ("alexnet_table4.flags", 67, 72, "16,32,32,32,32,64,64",
                {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                 "fc6": 0.09, "fc7": 0.09, "fc8": 0.25}),
    "vgg16": ("vgg16_table5.flags", 32, 36, "8,8,16,16,16,16,16,16,16,16,16,16,16,32,32",
              {"conv1_1": 0.58, "conv3_2": 0.24, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23}),
}


def config_from(flagfile, workdir, *overrides):
  FLAGS.unparse_flags()
  FLAGS(["smoke", f"--flagfile={os.path.join(REPO_ROOT, 'experiments', flagfile)}",
         f"--workdir={workdir}", *overrides])
  try:
    return common.config_from_flags()
  finally:
    FLAGS.unparse_flags()


@pytest.mark.parametrize("model", sorted(SMOKE))
def test_flagfiles_hold_the_papers_settings(model, tmp_path):
  config = config_from(SMOKE[model][0], str(tmp_path / "w"))
  assert config.model == model and config.dataset == "imagenet2012"
  assert (config.optimizer, config.momentum, config.reg_strength) == ("sgd", 0.9, 5e-4)
  assert (config.batch_size, config.lr_schedule, config.learning_rate) == (256, "step", 0.01)
  assert config.dropout_layers == ("fc6", "fc7") and config.dropout == 0.5
  assert config.retrain_lr_scale == 0.01  # 1/100 of the original rate
  assert config.image_size == (227 if model == "alexnet" else 224)
  if model == "alexnet":
    assert config.iterations == 4 and config.prune_groups == ("fc", "conv", "fc", "conv")
  else:
    assert config.iterations == 5  # "five iterations of pruning and retraining"
  for layer, want in SMOKE[model][4].items():
    assert config.layer_densities[layer] == want


@pytest.mark.parametrize("model", sorted(SMOKE))
def test_imagenet_experiment_end_to_end(model, tmp_path):
  flagfile, size, resize, widths, densities = SMOKE[model]
  workdir = str(tmp_path / model)
  # Two iterations (AlexNet: FC, then conv) keep the CPU time small; the densities are reached
  # over whatever number of iterations prunes each layer.
  config = config_from(flagfile, workdir, f"--model={model}", f"--image_size={size}",
                       f"--resize_size={resize}", f"--widths={widths}", "--batch_size=16",
                       "--eval_batch_size=16", "--dense_epochs=1", "--retrain_epochs=1",
                       "--iterations=2", "--prune_groups=" + ("fc,conv" if model == "alexnet"
                                                             else "all"),
                       "--tensorboard=false", f"--data_dir={tmp_path / 'tfds'}")
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = pipeline.run(config, workdir)

  history = summary["iterations"]
  assert [h["iteration"] for h in history] == list(range(config.iterations + 1))
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))) == \
      list(range(config.iterations + 1))
  final = history[-1]
  assert 0.0 <= final["test_error"] <= 1.0 and 0.0 <= final["test_top5_error"] <= 1.0
  assert final["test_top5_error"] <= final["test_error"]
  table = final["layer_table"]
  assert list(table)[-1] == "total" and len(table) == (9 if model == "alexnet" else 17)
  # Every layer ends at its Table 4/5 density (within a weight or two of the narrow layer).
  for layer, want in densities.items():
    layer_weights = table[layer]["weights"]
    assert abs(table[layer]["nonzero"] - round(want * layer_weights)) <= 2, layer
  # Pruned weights are exactly zero in the final checkpoint; masks only shrank.
  state = pipeline.restore_iteration(workdir, config)
  for w, m in zip(*(masks_lib.jax.tree.leaves(state[k]) for k in ("params", "masks"))):
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert all("test_top5_error" in r for r in records)
  assert os.path.exists(os.path.join(workdir, "summary.md"))
