"""Cost of the masked train step over a plain dense one, on the pipeline's own code path.

Masked: lwc.optim.masked(optax.sgd(lr, momentum=0.9), "l2", 5e-4) with all-ones masks.
Prunable: lwc.optim.prunable(the same), masks held in the optimiser state (masks=None in the
TrainState), the way a user's own loop runs it.
Dense: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)), masks=None
(an empty pytree: no mask arrays, no masking ops). Both run through
Parallel.over_local_devices().train_steps_fn() (lwc.train.train_steps) exactly as
lwc/pipeline.py calls it: batches gathered on device from the resident training set by index,
`float(loss)` after every call. With all-ones masks both compute the same update; the script
checks that before timing.

LeNet-300-100: one call = one epoch (600 steps of batch 100, lax.scan).
LeNet-5: one call = one step of batch 100.
Variants alternate (ABCABC..., the order reversed every other sample) so a disturbance on a shared machine hits both.

  python -m benchmarks.masked_step --data_dir=../shared/data/mnist
"""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging

from benchmarks import common
from lwc import masks as masks_lib
from lwc import optim
from lwc import train as train_lib
from lwc.data import load_dataset
from lwc.models import get_model

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/data/mnist", "Folder of the MNIST IDX files.")
flags.DEFINE_list("models", ["lenet_300_100", "lenet5"], "Models to measure.")
flags.DEFINE_integer("batch_size", 100, "Batch size.")
flags.DEFINE_integer("repeats", 9, "Timed samples per variant (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed samples per variant after compilation.")
flags.DEFINE_integer("conv_steps", 60, "LeNet-5: one-step calls per timed sample.")
flags.DEFINE_float("weight_decay", 5e-4, "L2 strength (both variants).")
flags.DEFINE_float("quiet_threshold", 0.05, "Largest share of the CPUs other processes may "
                   "use during a pair of samples for it to count as quiet.")
flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")

# steps per call, calls per timed sample
PLAN = {"lenet_300_100": lambda: (600, 1), "lenet5": lambda: (1, FLAGS.conv_steps)}


def make_states(model, params, parallel):
  """Both variants from the same initial params, each on its own buffers (states are donated)."""
  params = jax.tree.map(np.array, params)
  sgd = optax.sgd(0.01, momentum=0.9)
  masked_tx = optim.masked(sgd, "l2", FLAGS.weight_decay)
  dense_tx = optax.chain(optax.add_decayed_weights(FLAGS.weight_decay), sgd)
  masked = train_lib.TrainState.create(model.apply, params, masks_lib.init_masks(params),
                                       masked_tx)
  prunable = train_lib.TrainState.create(model.apply, jax.tree.map(np.array, params), None,
                                         optim.prunable(sgd, "l2", FLAGS.weight_decay))
  dense = train_lib.TrainState.create(model.apply, jax.tree.map(np.array, params), None,
                                      dense_tx)
  return {"masked": parallel.replicate(masked), "prunable": parallel.replicate(prunable),
          "dense": parallel.replicate(dense)}


VARIANTS = ("masked", "prunable", "dense")


def measure(name: str, images, labels) -> dict:
  parallel = train_lib.Parallel.over_local_devices()
  model = get_model(name)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *images.shape[1:])))["params"]
  states = make_states(model, params, parallel)
  step_fn = parallel.train_steps_fn()  # one jitted function, one compilation per variant
  rng = jax.random.PRNGKey(1)
  per_call, calls = PLAN[name]()
  batches = train_lib.epoch_batches(jax.random.PRNGKey(2), len(labels), FLAGS.batch_size)
  steps = len(batches)

  def run(variant, sample):
    state = states[variant]
    for c in range(calls):
      start = ((sample * calls + c) * per_call) % steps
      chunk = parallel.shard_indices(batches[start:start + per_call])
      state, metrics = step_fn(state, images, labels, chunk, rng)
      float(metrics["loss"])
    states[variant] = state

  # Same update on the same batch (all-ones masks): one step from fresh copies of the states.
  check = make_states(model, params, parallel)
  chunk = parallel.shard_indices(batches[:1])
  out = {v: step_fn(check[v], images, labels, chunk, rng)[0].params for v in check}
  diff = max(float(jnp.max(jnp.abs(a - b))) for v in ("masked", "prunable") for a, b in
             zip(jax.tree.leaves(out[v]), jax.tree.leaves(out["dense"])))

  for sample in range(FLAGS.warmup):
    for variant in VARIANTS:
      run(variant, sample)
  times = {v: [] for v in VARIANTS}
  foreign = {v: [] for v in VARIANTS}
  for sample in range(FLAGS.repeats):
    for variant in VARIANTS if sample % 2 == 0 else VARIANTS[::-1]:
      with common.Watch() as w:
        run(variant, FLAGS.warmup + sample)
      times[variant].append(w.seconds / (calls * per_call))
      foreign[variant].append(w.foreign)
  medians = {v: statistics.median(times[v]) for v in VARIANTS}
  out = {"model": name, "steps_per_call": per_call, "steps_per_sample": calls * per_call,
         "dense_ms_per_step": 1e3 * medians["dense"],
         "dense_ms_samples": [1e3 * t for t in times["dense"]],
         "foreign_cpu": foreign, "max_abs_param_diff_after_one_step": diff}
  for v in ("masked", "prunable"):
    # Paired ratios: sample i of each variant ran back to back; "quiet" pairs are those during
    # which other processes used at most --quiet_threshold of the CPUs.
    ratios = [m / d for m, d in zip(times[v], times["dense"])]
    quiet = [r for r, fm, fd in zip(ratios, foreign[v], foreign["dense"])
             if max(fm, fd) <= FLAGS.quiet_threshold]
    prefix = "" if v == "masked" else "prunable_"
    out.update({
        f"{v}_ms_per_step": 1e3 * medians[v],
        f"{prefix}overhead_pct": 100 * (medians[v] / medians["dense"] - 1),
        f"{prefix}paired_overhead_pct_median": 100 * (statistics.median(ratios) - 1),
        f"{prefix}quiet_pairs": len(quiet),
        f"{prefix}quiet_paired_overhead_pct_median":
            100 * (statistics.median(quiet) - 1) if quiet else None,
        f"{v}_ms_samples": [1e3 * t for t in times[v]]})
  return out


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  train, _ = load_dataset("mnist", FLAGS.data_dir)
  images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
  info = common.machine()
  print(json.dumps(info))
  results = []
  for name in FLAGS.models:
    r = measure(name, images, labels)
    results.append(r)
    for v, prefix in (("masked", ""), ("prunable", "prunable_")):
      quiet = (f"{r[prefix + 'quiet_paired_overhead_pct_median']:+.1f}% over "
               f"{r[prefix + 'quiet_pairs']} quiet pairs" if r[prefix + "quiet_pairs"]
               else "no quiet pair: disturbed, run again")
      print(f"{name}: {v} {r[v + '_ms_per_step']:.3f} ms/step, dense "
            f"{r['dense_ms_per_step']:.3f} ms/step (medians), overhead "
            f"{r[prefix + 'overhead_pct']:+.1f}%; paired median "
            f"{r[prefix + 'paired_overhead_pct_median']:+.1f}%, {quiet}; "
            f"{r['steps_per_call']} step(s)/call, {FLAGS.repeats} samples of "
            f"{r['steps_per_sample']} steps per variant", flush=True)
    print(f"{name}: |masked or prunable - dense| params after one step "
          f"{r['max_abs_param_diff_after_one_step']:.1e}", flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
