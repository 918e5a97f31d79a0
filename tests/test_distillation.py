"""lwc.distillation: the soft-target loss, the distilled train step (weight 0 is the plain step
bit for bit, weight 1 pulls toward the teacher, pruned weights stay 0.0), and --distill_weight
through the pipeline, resumed after kill -9 mid-retraining to the same bits."""

import doctest
import signal

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import distillation
from lwc import pipeline
from lwc import train
from lwc.errors import UserError
from test_train import assert_pruned_zero, fake_data, pruned_state



def test_docstring_examples():
  assert doctest.testmod(distillation, raise_on_error=True).attempted >= 2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_loss_is_t_squared_times_the_mean_kl(temperature):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 10)) * 3

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(teacher / temperature), softmax(student / temperature)
  want = temperature ** 2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  got = distillation.soft_target_loss(jnp.asarray(student, jnp.float32),
                                      jnp.asarray(teacher, jnp.float32), temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(distillation.soft_target_loss(jnp.asarray(student), jnp.asarray(student),
                                             temperature)) == pytest.approx(0.0, abs=1e-6)


def _teacher_of(state, weight, temperature=4.0, seed=1):
  """A teacher: the same network with other weights (so its outputs differ from the student's)."""
  params = jax.tree.map(lambda w: w + 0.05 * np.random.default_rng(seed).standard_normal(
      w.shape).astype(np.float32), state.params)
  return distillation.Teacher(params, {}, weight=weight, temperature=temperature)


def test_weight_zero_is_the_plain_step_bit_for_bit(make_params):
  state = pruned_state(make_params)
  images, labels = fake_data(200)
  batches = np.arange(200, dtype=np.int32).reshape(5, 40)
  rng = jax.random.PRNGKey(0)
  plain, _ = jax.jit(train.train_steps)(state, images, labels, batches, rng)
  teacher = _teacher_of(state, weight=0.0)
  distilled, metrics = jax.jit(train.train_steps)(state, images, labels, batches, rng,
                                                  teacher=teacher)
  chex.assert_trees_all_equal(distilled.params, plain.params)
  assert set(metrics) == {"loss", "accuracy", "params_finite"}


def test_weight_one_pulls_toward_the_teacher_and_keeps_pruned_zero(make_params):
  state = pruned_state(make_params, lr=0.02)
  teacher = _teacher_of(state, weight=1.0)
  images, labels = fake_data(400, seed=3)

  def gap(params):
    outputs = train.predict(state.apply_fn, params, images)
    return float(distillation.soft_target_loss(
        outputs, train.predict(state.apply_fn, teacher.params, images), 4.0))

  before = gap(state.params)
  steps = jax.jit(train.train_steps)
  for epoch in range(3):
    batches = np.random.default_rng(epoch).permutation(400).astype(np.int32).reshape(10, 40)
    state, metrics = steps(state, images, labels, batches, jax.random.PRNGKey(epoch),
                           teacher=teacher)
    assert_pruned_zero(state.params, state.masks)
  # Weight 1: the labels play no part; the student moves toward the teacher's outputs.
  assert gap(state.params) < 0.5 * before
  assert bool(metrics["params_finite"])


def test_distill_flags_are_checked():
  with pytest.raises(UserError, match=r"distill_weight must be in \[0, 1\]"):
    pipeline.Config(distill_weight=1.5).validate()
  with pytest.raises(UserError, match=r"distill_temperature must be in \(0, inf\)"):
    pipeline.Config(distill_temperature=0.0).validate()


# 2,000 MNIST images less a validation split of 200: 18 steps an epoch at batch 100. Dense
# training is steps 1-36, iteration 1 retrains 37-72, iteration 2 73-108.
FLAGS = ["--batch_size=100", "--learning_rate=0.05", "--dense_epochs=2", "--retrain_epochs=2",
         "--iterations=2", "--quality=0.8", "--layer_quality=fc3=0.4", "--tensorboard=false",
         "--steps_per_call=6", "--checkpoint_every_steps=12", "--log_every_seconds=0",
         "--distill_weight=0.7", "--distill_temperature=3"]


def _cli(workdir, data_dir, fault=None, extra=()):
  return conftest.lenet_cli(workdir, data_dir, [*FLAGS, *extra], fault=fault)


def _config(data_dir, **changes):
  settings = dict(model="lenet_300_100", data_dir=data_dir, batch_size=100, learning_rate=0.05,
                  dense_epochs=2, retrain_epochs=2, iterations=2, qualities=(0.8,),
                  layer_qualities={"fc3": (0.4,)}, distill_weight=0.7, distill_temperature=3.0)
  return pipeline.Config(**{**settings, **changes})


def test_pipeline_distils_and_resumes_after_kill_to_the_same_bits(small_mnist_dir, tmp_path):
  reference = str(tmp_path / "reference")
  proc = _cli(reference, small_mnist_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "retraining distils from the dense network (weight 0.7, temperature 3)" in proc.stderr
  # Killed in iteration 2's retraining (after its progress checkpoint at step 84), resumed.
  workdir = str(tmp_path / "w")
  killed = _cli(workdir, small_mnist_dir, fault="step:90")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = _cli(workdir, small_mnist_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(iteration 2 retrain" in resumed.stderr
  conftest.assert_same_run(workdir, reference, _config(small_mnist_dir))
  final = pipeline.restore_iteration(reference, _config(small_mnist_dir))
  assert_pruned_zero(final["params"], final["masks"])
  # The teacher changes the result: the same run without it retrains to other weights (the
  # dense network and the first pruning, before any distillation, are the same).
  plain = str(tmp_path / "plain")
  proc = _cli(plain, small_mnist_dir, extra=["--distill_weight=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "distils from the dense network" not in proc.stderr
  with_teacher = pipeline.restore_iteration(reference, _config(small_mnist_dir), iteration=1)
  without = pipeline.restore_iteration(plain, _config(small_mnist_dir, distill_weight=0.0),
                                       iteration=1)
  dense = [pipeline.restore_iteration(d, _config(small_mnist_dir), iteration=0)
           for d in (reference, plain)]
  chex.assert_trees_all_equal(dense[0]["params"], dense[1]["params"])
  assert not np.array_equal(np.asarray(with_teacher["params"]["fc1"]["kernel"]),
                            np.asarray(without["params"]["fc1"]["kernel"]))
