"""Settings a run is given but never reads are named, never dropped silently
(`lwc.config.settings_without_effect`): logged at the start, kept in summary.json and .md."""

import json
import logging

import chex
import pytest

from lwc import pipeline
from lwc.config import Config, settings_without_effect

from test_pipeline import small_config

TARGET = dict(target_compression=10.0)


@pytest.mark.parametrize("settings, expected", [
    ({}, []),
    (dict(allocation_metric="loss", sensitivity_examples=500),
     ["--allocation_metric, --sensitivity_examples: no effect without --target_compression"]),
    (dict(allocation_metric="loss", **TARGET), []),
    (dict(qualities=(0.5,), layer_qualities={"fc3": (0.2,)}, threshold_scope="global", **TARGET),
     ["--quality, --layer_quality, --threshold_scope: no effect with --target_compression (its "
      "allocation chooses every layer's density; the threshold follows from the density)"]),
    (dict(allocation="lamp"), ["--allocation: no effect without --target_compression"]),
    (dict(allocation="global", allocation_metric="loss", sweep_split="train", **TARGET),
     ["--allocation_metric, --sweep_split: no effect with --allocation=global (no sensitivity "
      "sweep)"]),
    (dict(layer_qualities={"fc1": (0.5,), "fc3": (0.2,)}, layer_densities={"fc3": 0.3}),
     ["--layer_quality for fc3: no effect (--layer_density sets those layers)"]),
    (dict(density_schedule="cubic"),
     ["--density_schedule: no effect without --target_compression or --layer_density"]),
    (dict(density_schedule="cubic", layer_densities={"fc1": 0.1}), []),
    (dict(schedule_power=2.0, density_schedule="cubic", **TARGET),
     ["--schedule_power: no effect with --density_schedule=cubic (only polynomial and "
      "log_polynomial read it)"]),
    (dict(schedule_power=2.0, density_schedule="log_polynomial", **TARGET), []),
    (dict(iterations=0, distill_weight=0.5, final_retrain_epochs=3, lr_rewind=True),
     ["--distill_weight, --final_retrain_epochs, --lr_rewind: no effect with --iterations=0 "
      "(no retraining)"]),
    (dict(distill_temperature=2.0),
     ["--distill_temperature: no effect without --distill_weight"]),
    (dict(lr_rewind=True, retrain_lr_scale=0.5, retrain_lr_schedule="cosine"),
     ["--retrain_lr_scale, --retrain_lr_schedule: no effect with --lr_rewind (retraining "
      "rewinds to dense training's learning rate and schedule)"]),
    (dict(lr_decay_steps=100, lr_decay_factor=0.5, lr_schedule="cosine"),
     ["--lr_decay_steps, --lr_decay_factor: no effect without a step learning-rate schedule"]),
    (dict(lr_decay_steps=100, retrain_lr_schedule="step"), []),
    # With --lr_rewind retraining follows lr_schedule, so a step retrain schedule is not read.
    (dict(lr_decay_steps=100, retrain_lr_schedule="step", lr_rewind=True),
     ["--retrain_lr_schedule: no effect with --lr_rewind (retraining rewinds to dense "
      "training's learning rate and schedule)",
      "--lr_decay_steps: no effect without a step learning-rate schedule"]),
    (dict(optimizer="adam", momentum=0.5), ["--momentum: no effect with --optimizer=adam"]),
    (dict(dropout_layers=("fc1",)),
     ["--dropout_layers: no effect with --dropout=0 and --retrain_dropout 0 or unset"]),
    (dict(dropout=0.5, retrain_dropout=0.5),
     ["--dropout, --retrain_dropout: no effect without --dropout_layers"]),
    (dict(dropout_rescale="none"),
     ["--dropout_rescale: no effect without dropout in retraining (--dropout or "
      "--retrain_dropout, and --dropout_layers)"]),
    (dict(dropout_rescale="none", dropout=0.5, retrain_dropout=0.0, dropout_layers=("fc1",)),
     ["--dropout_rescale: no effect without dropout in retraining (--dropout or "
      "--retrain_dropout, and --dropout_layers)"]),
    (dict(dropout_rescale="none", dropout=0.5, dropout_layers=("fc1",), iterations=0),
     ["--dropout_rescale: no effect with --iterations=0 (no retraining)"]),
    (dict(retrain_dropout=0.5, dropout_layers=("fc1",), iterations=0),
     ["--dropout_layers: no effect with --dropout=0 and --retrain_dropout 0 or unset",
      "--retrain_dropout: no effect with --iterations=0 (no retraining)"]),
    (dict(dropout_rescale="none", dropout=0.5, dropout_layers=("fc1",)), []),
    (dict(dropout_rescale="none", retrain_dropout=0.5, dropout_layers=("fc1",)), []),
    (dict(decide_on_test=True),
     ["--decide_on_test: no effect with a validation split (--validation is not 0)"]),
    (dict(tfds_name="tiny", image_size=32, resize_size=40),
     ["--tfds_name, --image_size, --resize_size: no effect with --dataset=mnist"]),
    (dict(tfds_name="tiny", image_size=32, dataset="imagenet2012"), []),
    (dict(augment_shift=4, augment_flip=True, dataset="imagenet2012"),
     ["--augment_shift, --augment_flip: no effect with --dataset=imagenet2012 (its streamed "
      "pipeline has Caffe's random crops and mirrors)"]),
    (dict(augment_shift=4, augment_flip=True, dataset="cifar10"), []),
])
def test_each_rule_names_exactly_the_unread_flags(settings, expected):
  config = Config(**settings)
  config.validate()
  assert settings_without_effect(config) == expected


def test_settings_at_their_defaults_are_never_named():
  """Giving a setting its default value explicitly is not a setting without effect."""
  config = Config(allocation_metric="error", distill_temperature=4.0, momentum=0.9,
                  lr_decay_factor=0.1, resize_size=256, decide_on_test=False)
  assert settings_without_effect(config) == []


def test_a_run_with_unread_settings_logs_them_and_computes_the_same_bits(
    small_mnist_dir, tmp_path, caplog):
  """The claim "no effect" is true: with three unread settings the run ends on the same
  parameters and errors as without them, and the settings are logged and reported."""
  config = small_config(small_mnist_dir, dense_epochs=1, iterations=1)
  workdir = str(tmp_path / "reference")
  summary = pipeline.run(config, workdir)
  assert summary["settings_without_effect"] == []
  unread = config.replace(distill_temperature=2.0, lr_decay_factor=0.5, dropout_layers=("fc1",))
  with caplog.at_level(logging.WARNING, logger="lwc"):
    again = pipeline.run(unread, str(tmp_path / "w"))
  expected = ["--distill_temperature: no effect without --distill_weight",
              "--lr_decay_factor: no effect without a step learning-rate schedule",
              "--dropout_layers: no effect with --dropout=0 and --retrain_dropout 0 or unset"]
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
          and "no effect" in r.getMessage()] == expected
  assert again["settings_without_effect"] == expected
  with open(tmp_path / "w" / "summary.json") as f:
    assert json.load(f)["settings_without_effect"] == expected
  with open(tmp_path / "w" / "summary.md") as f:
    markdown = f.read()
  for line in expected:
    assert f"Setting without effect: {line}." in markdown
  for h, h_again in zip(summary["iterations"], again["iterations"]):
    assert (h["params_nonzero"], h["test_error"], h["validation_error"]) == (
        h_again["params_nonzero"], h_again["test_error"], h_again["validation_error"])
  mine = pipeline.restore_iteration(str(tmp_path / "w"), unread)
  reference = pipeline.restore_iteration(workdir, config)
  chex.assert_trees_all_equal(mine["params"], reference["params"])
  chex.assert_trees_all_equal(mine["masks"], reference["masks"])
