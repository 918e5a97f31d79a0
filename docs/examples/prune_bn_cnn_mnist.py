"""A BatchNorm CNN pruned Han-style on MNIST in a user's own loop, with `import lwc` only.

    python docs/examples/prune_bn_cnn_mnist.py --data_dir=../shared/data/mnist --seed=0

The network (BN after every conv and the hidden FC layer, like every modern CNN):
conv 5x5x32 -> BN -> relu -> pool -> conv 5x5x64 -> BN -> relu -> pool -> fc 256 -> BN -> relu ->
fc 10; 857,738 prunable weights. Trained dense with AdamW, then pruned iteratively (quality x std
of each layer's surviving weights, conv layers at half the quality: they are the sensitive ones,
section 5) and retrained at 1/10 of the rate, in two branches from the same dense network:
  * `running`: BatchNorm keeps the running averages it had (what a loop unaware of BN does);
  * `recalibrated`: `lwc.recalibrate_batch_stats` after each pruning and each retraining.
5,000 training images are held out as a validation split (seeded, never trained on); nothing is
chosen on any split: the schedule is fixed. Prints one JSON line per evaluation and a table.
"""

import json
import time

from absl import app
from absl import flags
from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lwc
from lwc.data import mnist

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MNIST IDX folder (default: TFDS)")
flags.DEFINE_integer("seed", 0, "seed of init, validation split and batch order")
flags.DEFINE_integer("dense_epochs", 8, "dense training epochs")
flags.DEFINE_integer("retrain_epochs", 2, "retraining epochs per pruning")
flags.DEFINE_list("qualities", ["0.8", "1.0", "1.0", "1.0"], "quality per pruning iteration")
flags.DEFINE_integer("validation", 5000, "training images held out for validation")
flags.DEFINE_integer("recalibrate_batches", 50, "batches of 100 for BN re-estimation")


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    for i, width in enumerate((32, 64), 1):
      x = nn.Conv(width, (5, 5), name=f"conv{i}")(x)
      x = nn.max_pool(nn.relu(bn(f"bn{i}")(x)), (2, 2), (2, 2))
    x = nn.relu(bn("bn3")(nn.Dense(256, name="fc1")(x.reshape(len(x), -1))))
    return nn.Dense(10, name="fc2")(x)


def main(argv):
  del argv
  data = mnist.load(FLAGS.data_dir)
  order = np.random.default_rng(FLAGS.seed).permutation(len(data.train))
  val_idx, train_idx = order[:FLAGS.validation], order[FLAGS.validation:]
  x, y = data.train.images[train_idx], data.train.labels[train_idx]
  splits = {"validation": (data.train.images[val_idx], data.train.labels[val_idx]),
            "test": (data.test.images, data.test.labels)}
  model = Net()
  forward = lwc.linen_model(model)
  params, model_state = lwc.split_variables(model.init(jax.random.key(FLAGS.seed), x[:1]))
  steps_per_epoch = len(x) // 128
  dense_steps = FLAGS.dense_epochs * steps_per_epoch
  lr = optax.piecewise_constant_schedule(1e-3, {dense_steps: 0.1})  # retrain at 1/10
  state = train_state.TrainState.create(
      apply_fn=forward, params=params, tx=lwc.prunable(optax.adamw(lr, weight_decay=1e-4)))

  @jax.jit
  def step(state, model_state, xb, yb):
    def loss(p):
      logits, new_state = forward(p, model_state, xb, train=True)
      return lwc.cross_entropy(logits, yb), new_state
    (_, model_state), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), model_state

  predict = jax.jit(lambda p, s, xb: lwc.predict(forward, p, xb, s))

  def train(state, model_state, epochs, first_epoch):
    for epoch in range(first_epoch, first_epoch + epochs):
      perm = np.random.default_rng([FLAGS.seed, epoch]).permutation(len(x))
      for idx in perm[:steps_per_epoch * 128].reshape(-1, 128):
        state, model_state = step(state, model_state, x[idx], y[idx])
    return state, model_state

  def errors(state, model_state):
    out = {}
    for split, (xs, ys) in splits.items():
      wrong = sum(int(jnp.sum(jnp.argmax(predict(state.params, model_state, xs[i:i + 1000]), -1)
                              != ys[i:i + 1000])) for i in range(0, len(ys), 1000))
      out[split] = wrong / len(ys)
    return out

  def recalibrate(state, model_state):
    batches = np.split(x[:FLAGS.recalibrate_batches * 100], FLAGS.recalibrate_batches)
    return lwc.recalibrate_batch_stats(forward, state.params, model_state, batches)

  def log(branch, iteration, phase, state, model_state, t0):
    counts = lwc.total_counts(lwc.get_masks(state.opt_state))
    record = {"seed": FLAGS.seed, "branch": branch, "iteration": iteration, "phase": phase,
              **{f"{k}_error": v for k, v in errors(state, model_state).items()},
              "nonzero": counts["nonzero"], "weights": counts["weights"],
              "compression": round(counts["compression"], 2),
              "seconds": round(time.time() - t0, 1)}
    print(json.dumps(record), flush=True)
    return record

  t0 = time.time()
  state, model_state = train(state, model_state, FLAGS.dense_epochs, 0)
  dense = log("dense", 0, "dense", state, model_state, t0)
  results = {}
  for branch in ("running", "recalibrated"):
    s, ms, epoch = state, model_state, FLAGS.dense_epochs
    for iteration, q in enumerate(map(float, FLAGS.qualities), 1):
      quality = {"default": q, "conv1": q / 2, "conv2": q / 2}
      s = lwc.prune_train_state(s, quality)
      if branch == "recalibrated":
        ms = recalibrate(s, ms)
      log(branch, iteration, "pruned", s, ms, t0)
      s, ms = train(s, ms, FLAGS.retrain_epochs, epoch)
      epoch += FLAGS.retrain_epochs
      if branch == "recalibrated":
        ms = recalibrate(s, ms)
      results[branch] = log(branch, iteration, "retrained", s, ms, t0)
    masks = lwc.get_masks(s.opt_state)
    for w, m in zip(jax.tree.leaves(s.params), jax.tree.leaves(masks)):
      assert bool(jnp.all(jnp.where(m, True, w == 0.0))), "a pruned weight is not 0.0"
  print(f"\n| seed {FLAGS.seed} | compression | validation error | test error |")
  print("|---|---|---|---|")
  print(f"| dense | 1.0x | {dense['validation_error']:.2%} | {dense['test_error']:.2%} |")
  for branch, r in results.items():
    print(f"| pruned, BN {branch} | {r['compression']:.1f}x | {r['validation_error']:.2%} | "
          f"{r['test_error']:.2%} |")
  print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
