"""lwc.train: masked train step, data parallelism (jit+NamedSharding and pmap), batching, eval."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwc import masks as masks_lib
from lwc import optim
from lwc import train
from lwc.errors import UserError

NUM_DEVICES = 8

needs_8_devices = pytest.mark.skipif(
    jax.local_device_count() != NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} local devices (conftest asks for 8 fake CPU devices; "
           f"the default backend here has {jax.local_device_count()})")


def fake_data(n, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((n, 28, 28, 1), np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return images, labels


def pruned_state(make_params, quality=0.8, lr=0.05):
  """LeNet-300-100 with about half of every layer pruned, SGD + momentum + L2."""
  model, params = make_params("lenet_300_100", seed=0)
  params, masks = masks_lib.prune(params, masks_lib.init_masks(params), quality)
  masks = jax.tree.map(np.asarray, masks)
  params = jax.tree.map(np.asarray, params)
  tx = optim.masked(optax.sgd(lr, momentum=0.9), "l2", 5e-4)
  return train.TrainState.create(model.apply, params, masks, tx)


def assert_pruned_zero(params, masks):
  for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    m = np.asarray(m)
    np.testing.assert_array_equal(np.asarray(w)[~m], 0.0)


def test_suite_sees_8_cpu_devices():
  if jax.default_backend() != "cpu":
    pytest.skip(f"default backend is {jax.default_backend()}")
  assert jax.local_device_count() == NUM_DEVICES
  assert len(jax.devices("cpu")) == NUM_DEVICES


def test_train_step_keeps_pruned_zero_and_lowers_loss(make_params):
  state = pruned_state(make_params)
  assert 0.3 < masks_lib.total_counts(state.masks)["density"] < 0.7
  assert_pruned_zero(state.params, state.masks)
  images, labels = fake_data(32)
  step = jax.jit(train.train_step)
  rng = jax.random.key(0)
  losses = []
  for _ in range(15):
    state, metrics = step(state, images, labels, rng)
    chex.assert_tree_all_finite(metrics)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    losses.append(float(metrics["loss"]))
    assert_pruned_zero(state.params, state.masks)
  assert int(state.step) == 15
  # Random labels on a fixed batch: the network memorises them.
  assert losses[-1] < 0.5 * losses[0], losses
  assert losses[0] == pytest.approx(np.log(10), rel=0.3)
  # The loss reported is the cross-entropy of the params the step started from.
  logits = state.apply_fn({"params": state.params}, images)
  next_state, metrics = step(state, images, labels, rng)
  np.testing.assert_allclose(float(metrics["loss"]), float(train.cross_entropy(logits, labels)),
                             rtol=1e-5)
  assert_pruned_zero(next_state.params, next_state.masks)


def test_train_steps_equals_repeated_train_step(make_params):
  """K steps in one scan give the same state as K separate steps on the same batches."""
  state = pruned_state(make_params)
  images, labels = fake_data(96)
  idx = train.epoch_batches(jax.random.key(3), 96, 32)  # (3, 32)
  rng = jax.random.key(1)
  scanned, metrics = jax.jit(train.train_steps)(state, images, labels, idx, rng)
  ref = state
  losses = []
  step = jax.jit(train.train_step)
  for k in range(3):
    ref, m = step(ref, images[idx[k]], labels[idx[k]], rng)
    losses.append(float(m["loss"]))
  chex.assert_trees_all_close(scanned.params, ref.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  assert int(scanned.step) == 3
  assert_pruned_zero(scanned.params, scanned.masks)


def _reference_k_steps(state, images, labels, idx, rng):
  """Single device, no sharding: jit(train_steps) on device 0."""
  device = jax.devices()[0]
  state, images, labels, idx = jax.device_put((state, images, labels, idx), device)
  return jax.jit(train.train_steps)(state, images, labels, idx, rng)


@needs_8_devices
def test_parallel_jit_matches_single_device(make_params):
  state = pruned_state(make_params)
  images, labels = fake_data(256)
  idx = train.epoch_batches(jax.random.key(7), 256, 64)[:3]  # K=3 steps of batch 64
  rng = jax.random.key(5)
  host_state = jax.device_get(state)
  ref_state, ref_metrics = _reference_k_steps(host_state, images, labels, idx, rng)
  ref_params = jax.device_get(ref_state.params)

  par = train.Parallel.over_local_devices()
  assert par.num_devices == NUM_DEVICES
  par.check_batch_size(64)
  p_state = par.replicate(jax.device_get(state))  # fresh buffers: this state is donated
  p_images, p_labels = par.replicate(images), par.replicate(labels)
  p_idx = par.shard_indices(idx)
  assert len(p_idx.sharding.device_set) == NUM_DEVICES
  assert p_idx.addressable_shards[0].data.shape == (3, 64 // NUM_DEVICES)
  out_state, out_metrics = par.train_steps_fn()(p_state, p_images, p_labels, p_idx, rng)
  assert len(jax.tree.leaves(out_state.params)[0].sharding.device_set) == NUM_DEVICES

  out_params = jax.device_get(out_state.params)
  chex.assert_trees_all_close(out_params, ref_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(out_metrics), jax.device_get(ref_metrics),
                              rtol=1e-5, atol=1e-6)
  assert int(out_state.step) == 3
  assert_pruned_zero(out_params, state.masks)
  # The steps did move the weights (otherwise equality would prove nothing).
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(out_params), jax.tree.leaves(jax.device_get(state.params))))
  assert diff > 1e-3


@needs_8_devices
def test_pmap_train_step_matches_single_device(make_params):
  state = pruned_state(make_params)
  images, labels = fake_data(256)
  idx = train.epoch_batches(jax.random.key(8), 256, 64)[:3]
  rng = jax.random.key(6)
  ref_state, _ = _reference_k_steps(jax.device_get(state), images, labels, idx, rng)
  ref_params = jax.device_get(ref_state.params)

  n = NUM_DEVICES
  stack = lambda x: jnp.stack([jnp.asarray(x)] * n)  # noqa: E731
  rep_state = jax.tree.map(stack, state)
  rep_rng = stack(rng)
  p_step = jax.pmap(functools.partial(train.train_step, axis_name="batch"), axis_name="batch")
  losses = []
  for k in range(3):
    x = images[idx[k]].reshape(n, 64 // n, 28, 28, 1)
    y = labels[idx[k]].reshape(n, 64 // n)
    rep_state, metrics = p_step(rep_state, x, y, rep_rng)
    losses.append(np.asarray(metrics["loss"]))
  rep_params = jax.device_get(rep_state.params)
  # Every replica holds the same params (gradients were pmean'ed) ...
  for leaf in jax.tree.leaves(rep_params):
    for r in range(1, n):
      np.testing.assert_array_equal(leaf[r], leaf[0])
  # ... equal to one device on the whole batch.
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], rep_params), ref_params,
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(rep_state.step), np.full(n, 3))
  for loss in losses:  # metrics are pmean'ed too: identical on every device
    np.testing.assert_array_equal(loss, np.full(n, loss[0]))
  assert_pruned_zero(jax.tree.map(lambda x: x[0], rep_params), state.masks)


def test_check_batch_size():
  devices = np.asarray(jax.devices()[:1])
  one = train.Parallel(jax.sharding.Mesh(devices, ("data",)))
  one.check_batch_size(7)  # anything divides by one device
  par = train.Parallel.over_local_devices()
  n = par.num_devices
  par.check_batch_size(8 * n)
  if n > 1:
    with pytest.raises(UserError) as e:
      par.check_batch_size(8 * n + 1)
    assert str(e.value) == (f"batch_size {8 * n + 1} is not divisible by the {n} devices it is "
                            "split over")


@needs_8_devices
def test_check_batch_size_8_devices():
  par = train.Parallel.over_local_devices()
  with pytest.raises(UserError, match="batch_size 60 is not divisible by the 8 devices"):
    par.check_batch_size(60)
  par.check_batch_size(64)
  three = train.Parallel(jax.sharding.Mesh(np.asarray(jax.devices()[:3]), ("data",)))
  assert three.num_devices == 3
  with pytest.raises(UserError, match="batch_size 64 is not divisible by the 3 devices"):
    three.check_batch_size(64)


def test_epoch_batches():
  key = jax.random.key(42)
  a = train.epoch_batches(key, 1000, 64)
  b = train.epoch_batches(key, 1000, 64)
  assert a.shape == (15, 64) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)  # deterministic for a key
  flat = a.ravel()
  assert len(np.unique(flat)) == flat.size  # no repeats
  assert flat.min() >= 0 and flat.max() < 1000
  assert not np.array_equal(flat, np.sort(flat))  # shuffled
  c = train.epoch_batches(jax.random.key(43), 1000, 64)
  assert not np.array_equal(a, c)
  assert set(a.ravel()) != set(c.ravel())  # a different remainder is dropped
  full = train.epoch_batches(key, 640, 64)
  assert full.shape == (10, 64)
  np.testing.assert_array_equal(np.sort(full.ravel()), np.arange(640))  # a permutation


def _logits_as_images(params, model_state, images, *, train, rng=None):
  """A model function (lwc.model_fn) whose outputs are its inputs."""
  del params, train, rng
  return images, model_state


def test_eval_step_sums_hand_built():
  logits = np.array([[2.0, 0.0, 0.0],
                     [0.0, 3.0, 0.0],
                     [0.0, 0.0, 1.0],
                     [5.0, 0.0, 0.0]], np.float32)
  labels = np.array([0, 1, 1, 2], np.int32)
  out = train.eval_step(_logits_as_images, {}, logits, labels)
  assert int(out["correct"]) == 2
  assert int(out["count"]) == 4
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected_loss_sum = -log_softmax[np.arange(4), labels].sum()
  np.testing.assert_allclose(float(out["loss_sum"]), expected_loss_sum, rtol=1e-6)
  # Parallel.evaluate adds the sums over uneven batches (3 + 1) and divides once.
  par = train.Parallel.over_local_devices()
  result = par.evaluate(_logits_as_images, {}, jnp.asarray(logits), jnp.asarray(labels),
                        batch_size=3)
  assert result["error"] == pytest.approx(0.5)
  assert result["loss"] == pytest.approx(expected_loss_sum / 4, rel=1e-6)
