"""AlexNet and VGG-16 training throughput: dense step against masked step, on resident data.

Per model, one synthetic chunk of K = --steps batches, images (K, B, H, W, 3) and labels (K, B),
is generated on the devices once, sharded along B over every device (Parallel.over_all_devices),
and every timed call runs `Parallel.train_batches_fn()` (lwc.train.train_steps_on_batches: K
steps under lax.scan, state donated) on it, as the ImageNet pipeline does on its streamed chunks.
No input pipeline is timed: these are the step's own figures.

  dense:  optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)), masks=None
          (no mask arrays, no masking ops), as benchmarks/masked_step.py's baseline;
  masked: lwc.optim.masked(optax.sgd(lr, momentum=0.9), "l2", wd) with random masks at the
          paper's per-layer densities (Table 4 for AlexNet, Table 5 for VGG-16, as in
          experiments/*_table{4,5}.flags; biases unmasked), pruned weights zeroed.

The model is lwc.models.get_model's, dropout 0.5 on fc6 and fc7 in training. Density does not
change the speed of the dense kernels; it only makes the masked state what a pruned run holds.
Each variant is compiled ahead of time (compile seconds and XLA's memory analysis recorded), run
--warmup untimed calls, then --repeats timed calls, masked and dense alternating (ABAB, BABA...);
each call is closed by jax.block_until_ready. Reports medians: ms/step, images/s, the masked
overhead in % (ratio of medians and median of paired ratios), the device kind and count, and
the devices' peak memory where `device.memory_stats()` gives it (GPU; the process high-water mark
so far, max over local devices).

  python -m benchmarks.imagenet_throughput --models=alexnet,vgg16 --batch_size=256 --steps=50
  # tiny, on CPU (seconds):
  python -m benchmarks.imagenet_throughput --image_size=67,32 --batch_size=8 --steps=2 \\
      --widths=16,32,32,32,32,64,64/8,8,16,16,16,16,16,32,32,32,32,32,32,64,64
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from lwc import masks as masks_lib
from lwc import optim
from lwc import train as train_lib
from lwc.errors import UserError, run_cli
from lwc.models import alexnet, get_model, vgg

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["alexnet", "vgg16"], "Models to measure: alexnet, vgg16.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (split over every device).")
flags.DEFINE_integer("steps", 50, "Steps per call (K of the resident (K, B, H, W, 3) chunk).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per variant after compilation.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (medians reported).")
flags.DEFINE_list("image_size", ["0"], "Square input size, one for every model or one per model; "
                  "0 = the model's own (AlexNet 227, VGG-16 224).")
flags.DEFINE_string("widths", "", "Layer widths (the models' `widths`), comma-separated; with "
                    "several models one group per model separated by '/', an empty group keeping "
                    "that model's default. Empty: the paper's widths.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "float32: what lwc trains with. "
                  "bfloat16: params, momentum and images stored in bfloat16 (a pure-bf16 step, "
                  "not lwc's training; an upper bound for mixed precision).")
flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate (both variants).")
flags.DEFINE_float("weight_decay", 5e-4, "L2 strength (both variants).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data, weights and masks.")
flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")

DEFAULT_SIZE = {"alexnet": 227, "vgg16": 224}
MIN_SIZE = {"alexnet": alexnet.MIN_IMAGE_SIZE, "vgg16": vgg.MIN_IMAGE_SIZE}
NUM_WIDTHS = {"alexnet": 7, "vgg16": 15}
# Table 4 / Table 5 "Weights%" per layer (experiments/alexnet_table4.flags, vgg16_table5.flags).
DENSITIES = {
    "alexnet": {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                "fc6": 0.09, "fc7": 0.09, "fc8": 0.25},
    "vgg16": {"conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36,
              "conv3_1": 0.53, "conv3_2": 0.24, "conv3_3": 0.42, "conv4_1": 0.32,
              "conv4_2": 0.27, "conv4_3": 0.34, "conv5_1": 0.35, "conv5_2": 0.29,
              "conv5_3": 0.36, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23},
}
VARIANTS = ("dense", "masked")


def _per_model(values: list, what: str, models: list[str]) -> list:
  if len(values) == 1:
    return values * len(models)
  if len(values) != len(models):
    raise UserError(f"--{what}: give one value or one per model ({len(models)}), "
                    f"got {len(values)}")
  return values


def parse_settings() -> list[dict]:
  """[{model, image_size, widths}] from the flags; UserError on anything that cannot run."""
  models = FLAGS.models
  if not models:
    raise UserError("--models: give at least one of alexnet, vgg16")
  for name in models:
    if name not in DEFAULT_SIZE:
      raise UserError(f"--models: unknown model '{name}', expected alexnet or vgg16")
  for flag in ("batch_size", "steps", "repeats"):
    if getattr(FLAGS, flag) < 1:
      raise UserError(f"--{flag} must be >= 1, got {getattr(FLAGS, flag)}")
  if FLAGS.warmup < 0:
    raise UserError(f"--warmup must be >= 0, got {FLAGS.warmup}")
  try:
    sizes = [int(s) for s in FLAGS.image_size]
  except ValueError:
    raise UserError(f"--image_size: {','.join(FLAGS.image_size)} is not a list of integers")
  sizes = _per_model(sizes, "image_size", models)
  groups = FLAGS.widths.split("/") if FLAGS.widths else [""]
  groups = _per_model(groups, "widths", models)
  settings = []
  for name, size, group in zip(models, sizes, groups):
    size = size or DEFAULT_SIZE[name]
    if size < MIN_SIZE[name]:
      raise UserError(f"--image_size: {name} needs at least {MIN_SIZE[name]}, got {size}")
    widths = None
    if group:
      try:
        widths = tuple(int(w) for w in group.split(","))
      except ValueError:
        raise UserError(f"--widths: '{group}' is not a comma-separated list of integers")
      if len(widths) != NUM_WIDTHS[name] or min(widths) < 1:
        raise UserError(f"--widths: {name} takes {NUM_WIDTHS[name]} positive widths, got "
                        f"'{group}'")
      if name == "alexnet" and any(w % 2 for w in widths[:5]):
        raise UserError(f"--widths: AlexNet's conv1..conv5 widths must be even (two groups), "
                        f"got '{group}'")
    settings.append({"model": name, "image_size": size, "widths": widths})
  if FLAGS.json_out:
    folder = os.path.dirname(os.path.abspath(FLAGS.json_out))
    if not os.path.isdir(folder):
      raise UserError(f"--json_out={FLAGS.json_out}: folder {folder} does not exist")
    if os.path.isdir(FLAGS.json_out):
      raise UserError(f"--json_out={FLAGS.json_out} is a directory")
  return settings


def init_params(model, size: int, dtype, rng: np.random.Generator):
  """He-normal kernels, zero biases, drawn with NumPy from the shapes of `model.init` (traced
  only: nothing compiled)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def fill(path, s):
    if masks_lib.path_names(path)[-1] == "bias":
      return np.zeros(s.shape, dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    w = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return w.astype(dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_masks(params, densities: dict[str, float], rng: np.random.Generator):
  """Each kernel entry survives with its layer's density (Bernoulli); biases all survive."""

  def draw(path, w):
    if not masks_lib.default_is_prunable(path, w):
      return np.ones(w.shape, bool)
    return rng.random(w.shape, dtype=np.float32) < densities[masks_lib.layer_name(path)]

  return jax.tree_util.tree_map_with_path(draw, params)


def synthetic_chunk(parallel, steps: int, batch: int, size: int, dtype, seed: int):
  """Standard-normal images (K, B, H, W, 3) and labels (K, B) made on the devices, split along B."""
  sharding = NamedSharding(parallel.mesh, P(None, "data"))
  k_images, k_labels = jax.random.split(jax.random.key(seed))
  images = jax.jit(lambda k: jax.random.normal(k, (steps, batch, size, size, 3), dtype),
                   out_shardings=sharding)(k_images)
  labels = jax.jit(lambda k: jax.random.randint(k, (steps, batch), 0, 1000, jnp.int32),
                   out_shardings=sharding)(k_labels)
  return jax.block_until_ready((images, labels))


def peak_memory_bytes() -> int | None:
  """The largest peak_bytes_in_use over the local devices, None where the backend has no stats."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def memory_analysis(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
          ("argument", "output", "alias", "temp", "generated_code")
          if hasattr(m, f"{k}_size_in_bytes")}


def measure(setting: dict, parallel: train_lib.Parallel) -> dict:
  name, size, widths = setting["model"], setting["image_size"], setting["widths"]
  dtype = jnp.dtype(FLAGS.dtype)
  batch, steps = FLAGS.batch_size, FLAGS.steps
  model = get_model(name, **({"widths": widths} if widths else {}))
  rng = np.random.default_rng(FLAGS.seed)
  params = init_params(model, size, dtype, rng)
  masks = random_masks(params, DENSITIES[name], rng)
  params = jax.tree.map(lambda w, m: np.where(m, w, np.zeros((), w.dtype)), params, masks)
  sgd = optax.sgd(FLAGS.learning_rate, momentum=0.9)
  txs = {"dense": optax.chain(optax.add_decayed_weights(FLAGS.weight_decay), sgd),
         "masked": optim.masked(sgd, "l2", FLAGS.weight_decay)}
  # Each variant on its own buffers (states are donated).
  states = {v: parallel.replicate(train_lib.TrainState.create(
      model.apply, jax.tree.map(np.array, params), masks if v == "masked" else None, txs[v]))
      for v in VARIANTS}
  images, labels = synthetic_chunk(parallel, steps, batch, size, dtype, FLAGS.seed + 1)
  rng_key = parallel.replicate(jax.random.PRNGKey(FLAGS.seed + 2))
  step_fn = parallel.train_batches_fn()

  out = {v: {} for v in VARIANTS}
  compiled = {}
  for v in VARIANTS:
    t0 = time.perf_counter()
    compiled[v] = step_fn.lower(states[v], images, labels, rng_key).compile()
    out[v]["compile_seconds"] = time.perf_counter() - t0
    out[v]["xla_memory_bytes"] = memory_analysis(compiled[v])
  metrics = {}

  def call(v):
    states[v], metrics[v] = jax.block_until_ready(compiled[v](states[v], images, labels, rng_key))

  for v in VARIANTS:
    for _ in range(FLAGS.warmup):
      call(v)
    out[v]["peak_bytes_after_warmup"] = peak_memory_bytes()
  times = {v: [] for v in VARIANTS}
  for r in range(FLAGS.repeats):
    for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
      t0 = time.perf_counter()
      call(v)
      times[v].append(time.perf_counter() - t0)
  for v in VARIANTS:
    ms = statistics.median(times[v]) * 1e3 / steps
    out[v].update({"ms_per_step": ms, "images_per_s": batch * 1e3 / ms,
                   "ms_per_step_samples": [t * 1e3 / steps for t in times[v]],
                   "loss": float(metrics[v]["loss"]),
                   "params_finite": bool(metrics[v]["params_finite"])})
  peak = peak_memory_bytes()
  ratios = [m / d for m, d in zip(times["masked"], times["dense"])]
  kernels = [(masks_lib.layer_name(p), m) for p, m in jax.tree_util.tree_leaves_with_path(masks)
             if masks_lib.default_is_prunable(p, m)]
  total = sum(m.size for _, m in kernels)
  return {"model": name, "image_size": size, "widths": list(widths) if widths else None,
          "batch_size": batch, "steps_per_call": steps, "dtype": FLAGS.dtype,
          "params": int(sum(np.size(w) for w in jax.tree.leaves(params))),
          "mask_density": sum(int(m.sum()) for _, m in kernels) / total,
          "layer_density": {layer: float(m.mean()) for layer, m in kernels},
          "dense": out["dense"], "masked": out["masked"],
          "masked_overhead_pct": 100 * (out["masked"]["ms_per_step"]
                                        / out["dense"]["ms_per_step"] - 1),
          "paired_overhead_pct_median": 100 * (statistics.median(ratios) - 1),
          "peak_bytes_in_use": peak}


def _mib(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f}"


def table(results: list[dict]) -> str:
  header = ("| model | image | batch | variant | ms/step | images/s | masked overhead | compile s "
            "| XLA temp MiB | peak MiB |")
  lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    for v in VARIANTS:
      o = r[v]
      overhead = (f"{r['masked_overhead_pct']:+.1f}% "
                  f"(paired {r['paired_overhead_pct_median']:+.1f}%)" if v == "masked" else "")
      temp = (o["xla_memory_bytes"] or {}).get("temp")
      lines.append(f"| {r['model']} | {r['image_size']} | {r['batch_size']} | {v} "
                   f"| {o['ms_per_step']:.2f} | {o['images_per_s']:,.1f} | {overhead} "
                   f"| {o['compile_seconds']:.1f} | {_mib(temp)} "
                   f"| {_mib(o['peak_bytes_after_warmup'])} |")
  return "\n".join(lines)


def run() -> dict:
  settings = parse_settings()
  parallel = train_lib.Parallel.over_all_devices()
  parallel.check_batch_size(FLAGS.batch_size)
  devices = {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
             "count": jax.device_count(), "local_count": jax.local_device_count(),
             "processes": jax.process_count(),
             "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
  info = common.machine()
  print(f"machine: {json.dumps(info)}")
  print(f"devices: {json.dumps(devices)}", flush=True)
  results = []
  for setting in settings:
    r = measure(setting, parallel)
    results.append(r)
    print(f"{r['model']}: dense {r['dense']['ms_per_step']:.2f} ms/step "
          f"({r['dense']['images_per_s']:,.1f} images/s), masked {r['masked']['ms_per_step']:.2f} "
          f"ms/step ({r['masked']['images_per_s']:,.1f} images/s), overhead "
          f"{r['masked_overhead_pct']:+.1f}% "
          f"(paired median {r['paired_overhead_pct_median']:+.1f}%); mask density "
          f"{100 * r['mask_density']:.1f}%, {r['params']:,} params", flush=True)
  print(table(results), flush=True)
  report = {"machine": info, "devices": devices, "results": results,
            "flags": {k: getattr(FLAGS, k) for k in (
                "models", "batch_size", "steps", "warmup", "repeats", "image_size", "widths",
                "dtype", "learning_rate", "weight_decay", "seed")}}
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return report


def main(argv) -> None:
  run_cli(argv, run)


if __name__ == "__main__":
  app.run(main)
