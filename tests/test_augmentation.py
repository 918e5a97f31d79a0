"""--augment_shift / --augment_flip (lwc.augmentation): exact shifts and mirrors, drawn per image
from (phase key, step); a pipeline run with them keeps every invariant and resumes bit for bit."""

import doctest
import json
import os

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import augmentation
from lwc import pipeline
from lwc import report
from lwc import resume
from lwc.errors import UserError

from test_pipeline import small_config


def _impulses(b, h=7, w=7):
  """b one-channel images, each 0 but for a 1.0 at the centre."""
  return jnp.zeros((b, h, w, 1)).at[:, h // 2, w // 2, 0].set(1.0)


def test_docstring_example():
  assert doctest.testmod(augmentation).failed == 0


def test_shift_moves_each_image_by_at_most_max_shift_and_covers_every_offset():
  images = _impulses(400)
  shifted = np.asarray(augmentation.random_shift(images, jax.random.PRNGKey(3), max_shift=2))
  chex.assert_shape(shifted, images.shape)
  offsets = set()
  for image in shifted[..., 0]:
    (y,), (x,) = np.nonzero(image)
    assert image[y, x] == 1.0 and image.sum() == 1.0
    offsets.add((y - 3, x - 3))
  assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_shift_fills_the_uncovered_border_with_zero_and_keeps_the_rest():
  images = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3) + 1.0
  shifted = np.asarray(augmentation.random_shift(images, jax.random.PRNGKey(0), max_shift=1))
  for src, out in zip(np.asarray(images), shifted):
    # Recover the shift from where the input's first pixel went (or from the zero rows/columns).
    matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if np.array_equal(out, _shifted_by(src, dy, dx))]
    assert len(matches) == 1, "not a whole-pixel shift of the input with a zero border"


def _shifted_by(image, dy, dx):
  h, w, _ = image.shape
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def test_zero_shift_is_the_identity_and_no_augmentation_is_none():
  images = _impulses(3)
  assert augmentation.random_shift(images, jax.random.PRNGKey(0), 0) is images
  assert augmentation.augmenter(0, False) is None


def test_shift_refuses_a_shift_as_large_as_the_image():
  with pytest.raises(ValueError, match=r"max_shift 7 must be smaller than the images' height "
                     r"and width \(7 x 7\)"):
    augmentation.random_shift(_impulses(1), jax.random.PRNGKey(0), 7)


def test_flip_mirrors_about_half_the_images_exactly():
  images = jax.random.normal(jax.random.PRNGKey(1), (200, 4, 5, 2))
  flipped = np.asarray(augmentation.random_flip(images, jax.random.PRNGKey(2)))
  mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, np.asarray(images))]
  kept = [np.array_equal(f, i) for f, i in zip(flipped, np.asarray(images))]
  assert all(m != k for m, k in zip(mirrored, kept))  # each image exactly one of the two
  assert 70 < sum(mirrored) < 130


def test_draws_depend_on_the_step_and_repeat_for_the_same_step():
  augment = augmentation.augmenter(2, True)
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 1))
  rng = jax.random.PRNGKey(7)
  a = augment(images, augmentation.step_key(rng, jnp.int32(5)))
  chex.assert_trees_all_equal(a, augment(images, augmentation.step_key(rng, jnp.int32(5))))
  assert not np.array_equal(a, augment(images, augmentation.step_key(rng, jnp.int32(6))))


def _config(data_dir, **overrides):
  """The Config of a `_FLAGS` run (test_pipeline's small run at the CLI's batch and epochs)."""
  return small_config(data_dir, **{"batch_size": 100, "retrain_epochs": 2, **overrides})


_FLAGS = ["--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
          "--iterations=2", "--quality=0.8", "--layer_quality=fc3=0.4", "--tensorboard=false",
          "--augment_shift=2"]


@pytest.fixture(scope="module")
def augmented_run(small_mnist_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("augmented"))
  proc = conftest.lenet_cli(workdir, small_mnist_dir, _FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_an_augmented_run_keeps_the_invariants_and_says_so(augmented_run, small_mnist_dir,
                                                           tmp_path):
  config = _config(small_mnist_dir, augment_shift=2)
  with open(os.path.join(augmented_run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["config"]["augment_shift"] == 2
  with open(os.path.join(augmented_run, "summary.md")) as f:
    assert "**Augmented training images** (random shifts of up to 2 pixels along each axis" in (
        f.read())
  previous = None
  for it in range(3):
    state = pipeline.restore_iteration(augmented_run, config, it)
    for w, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["masks"])):
      np.testing.assert_array_equal(np.asarray(w)[~np.asarray(m)], 0.0)
    if previous is not None:
      for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(state["masks"])):
        assert not np.any(np.asarray(new) & ~np.asarray(old))
    previous = state["masks"]

  # The same run without augmentation trains other weights from the first step.
  plain = str(tmp_path / "plain")
  proc = conftest.lenet_cli(plain, small_mnist_dir, [*_FLAGS[:-1], "--iterations=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  dense_plain = pipeline.restore_iteration(plain, _config(small_mnist_dir, iterations=0), 0)
  dense_augmented = pipeline.restore_iteration(augmented_run, config, 0)
  assert not np.array_equal(dense_plain["params"]["fc1"]["kernel"],
                            dense_augmented["params"]["fc1"]["kernel"])


# Step 70 is mid retraining of iteration 1 (steps 37-72; see tests/test_pipeline.py): the resumed
# phase must draw the shifts of steps 71-72 as the uninterrupted run did.
@pytest.mark.parametrize("fault", ["step:70"])
def test_an_augmented_run_resumes_bit_for_bit(fault, augmented_run, small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  killed = conftest.lenet_cli(workdir, small_mnist_dir, _FLAGS, fault=fault)
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = conftest.lenet_cli(workdir, small_mnist_dir, _FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  conftest.assert_same_run(workdir, augmented_run, _config(small_mnist_dir, augment_shift=2))


def test_resuming_with_other_augmentation_is_refused(small_mnist_dir):
  saved = _config(small_mnist_dir).to_json()
  with pytest.raises(UserError, match=r"--augment_shift=0 \(now 2\)"):
    resume.check_resume_settings(_config(small_mnist_dir, augment_shift=2), saved, "w", 1, None)
  # A run saved before the setting existed ran without augmentation.
  del saved["augment_shift"], saved["augment_flip"]
  with pytest.raises(UserError, match=r"--augment_flip=false \(now true\)"):
    resume.check_resume_settings(_config(small_mnist_dir, augment_flip=True), saved, "w", 1, None)
  resume.check_resume_settings(_config(small_mnist_dir), saved, "w", 1, None)


def test_a_shift_as_large_as_the_images_is_refused_before_any_training(small_mnist_dir, tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(UserError, match=r"augment_shift 28 must be smaller than the images' "
                     r"height and width \(28 x 28\)"):
    pipeline.run(_config(small_mnist_dir, augment_shift=28, batch_size=80), workdir)
  assert not os.path.exists(workdir)


def test_negative_shift_is_a_range_error(small_mnist_dir):
  with pytest.raises(UserError, match="augment_shift must be >= 0, got -1"):
    _config(small_mnist_dir, augment_shift=-1).validate()


def test_the_report_names_the_augmentation_only_when_there_is_one():
  assert report.augmentation_note({"config": {"augment_shift": 0, "augment_flip": False}}) == ""
  assert report.augmentation_note({"config": {}}) == ""
  note = report.augmentation_note({"config": {"augment_shift": 1, "augment_flip": True}})
  assert "random shifts of up to 1 pixel along each axis and left-right mirror images" in note


def test_the_seeds_table_says_the_training_images_were_augmented(augmented_run):
  from lwc.experiments import seeds
  with open(os.path.join(augmented_run, "summary.json")) as f:
    summary = json.load(f)
  result = {"aggregate": seeds.aggregate([summary], [0]), "command": "python -m ...",
            "published": [], "published_note": "none drawn",
            "augmentation": report.augmentation_text(summary)}
  line = ("**Augmented training images** (random shifts of up to 2 pixels along each axis): the "
          "published points below trained without.")
  assert line in seeds.markdown(result)
  assert "Augmented" not in seeds.markdown({**result, "augmentation": ""})
