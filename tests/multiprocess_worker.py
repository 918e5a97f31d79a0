"""Worker of tests/test_multiprocess.py: data-parallel LeNet-300-100 over every device of the job.

  python tests/multiprocess_worker.py --mnist_dir=DIR --out=OUT.npz [--steps=5]

Alone it is one process; under `launch/local.py` each process joins the job through
`lwc.distributed.initialize()`. Every process builds the same initial state, feeds only its part
of each global batch (`lwc.data.imagenet.prefetch_to_device`: global arrays from process-local
data), trains `--steps` steps on a 1-D mesh over `jax.devices()` (all processes) with the pipeline's
own `lwc.train.Parallel.over_all_devices().train_batches_fn()`, evaluates
a padded test set with a valid mask, and process 0 writes params, losses and error counts to
--out. The result must not depend on how the devices are spread over processes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lwc import distributed

GLOBAL_BATCH, STEPS_PER_CHUNK, EVAL_EXAMPLES, EVAL_BATCH = 64, 2, 100, 32


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mnist_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  distributed.initialize()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from lwc import optim, train
  from lwc.data import imagenet, mnist
  from lwc.models import lenet

  parallel = train.Parallel.over_all_devices()
  pid, nproc = jax.process_index(), jax.process_count()
  local = GLOBAL_BATCH // nproc
  data = mnist.load_idx(args.mnist_dir)

  # Same initial state everywhere: NumPy draws, a fixed random mask (half the fc1 weights pruned).
  model = lenet.LeNet300100()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32), shapes)
  masks = jax.tree.map(lambda s: np.ones(s.shape, bool), shapes)
  masks["fc1"]["kernel"] = rng.random(shapes["fc1"]["kernel"].shape) < 0.5
  params = jax.tree.map(lambda p, m: np.where(m, p, 0).astype(np.float32), params, masks)
  tx = optim.masked(optax.sgd(0.05, momentum=0.9))
  state = train.TrainState.create(model.apply, params, masks, tx)
  state = parallel.replicate(state)

  # Global batch k is training examples [k * 64, (k + 1) * 64); this process feeds its slice.
  def chunks():
    for start in range(0, args.steps, STEPS_PER_CHUNK):
      k = min(STEPS_PER_CHUNK, args.steps - start)
      x = data.train.images[start * GLOBAL_BATCH:(start + k) * GLOBAL_BATCH]
      y = data.train.labels[start * GLOBAL_BATCH:(start + k) * GLOBAL_BATCH]
      x, y = x.reshape(k, GLOBAL_BATCH, 28, 28, 1), y.reshape(k, GLOBAL_BATCH)
      yield x[:, pid * local:(pid + 1) * local], y[:, pid * local:(pid + 1) * local]

  step = parallel.train_batches_fn()  # what the pipeline runs on streamed data
  losses = []
  for images, labels in imagenet.prefetch_to_device(
      chunks(), 2, NamedSharding(parallel.mesh, P(None, "data"))):
    state, metrics = step(state, images, labels, jax.random.key(1))
    losses.append(metrics["loss"])

  # Padded eval: 100 test examples in batches of 32 -> 4 batches, the last 28 entries invalid.
  @jax.jit
  def eval_counts(params, images, labels, valid):
    logits = model.apply({"params": params}, images)
    return imagenet.top_k_errors(logits, labels, ks=(1, 5), valid=valid)

  n_pad = -(-EVAL_EXAMPLES // EVAL_BATCH) * EVAL_BATCH
  x = np.zeros((n_pad, 28, 28, 1), np.float32)
  y = np.zeros(n_pad, np.int32)
  x[:EVAL_EXAMPLES], y[:EVAL_EXAMPLES] = (data.test.images[:EVAL_EXAMPLES],
                                          data.test.labels[:EVAL_EXAMPLES])
  valid = np.arange(n_pad) < EVAL_EXAMPLES
  b = EVAL_BATCH // nproc

  def eval_batches():
    for s in range(0, n_pad, EVAL_BATCH):
      part = slice(s + pid * b, s + (pid + 1) * b)
      yield x[part], y[part], valid[part]

  totals = {"top1": 0, "top5": 0, "count": 0}
  for batch in imagenet.prefetch_to_device(eval_batches(), 1, parallel.batch):
    out = eval_counts(state.params, *batch)
    totals = {k: totals[k] + int(out[k]) for k in totals}

  flat = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  loss = np.stack([np.asarray(v.addressable_data(0)) for v in losses])  # mean loss per chunk
  print(f"process {pid}/{nproc}: {jax.device_count()} devices, {jax.local_device_count()} local, "
        f"loss {loss.tolist()}, eval {totals}", flush=True)
  if pid == 0:
    np.savez(args.out, loss=loss, process_count=nproc, device_count=jax.device_count(),
             local_device_count=jax.local_device_count(),
             **{f"eval_{k}": v for k, v in totals.items()}, **{f"param{k}": v
                                                               for k, v in flat.items()})


if __name__ == "__main__":
  main()
