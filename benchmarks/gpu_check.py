"""One GPU check, within a time budget: AlexNet and VGG-16 dense vs masked train-step throughput,
and a short end-to-end pipeline run (dense -> prune -> retrain -> checkpoint -> kill -> resume)
on generated ImageNet-shaped data. Writes `gpu_check.json` and `gpu_check.md` to --out_dir.

  python -m benchmarks.gpu_check --out_dir=gpu_check_out      # one GPU, at most 8 minutes
  python -m benchmarks.gpu_check --smoke --out_dir=/tmp/gc    # tiny, on CPU (the CI smoke test)

Every section runs in a subprocess of its own (this script with --worker), one after the other,
so that each one's device memory is its own (`peak_bytes_in_use` is a process high-water mark),
an out-of-memory error or a crash is recorded without losing the other sections, and the budget
is enforced: a section gets at most the time left (throughput sections also at most
--section_limit_s), is killed when it runs over, and is skipped, with a note, when less than
--min_section_s is left. The parent process never touches a device.

Throughput, per model and variant (one subprocess each): the full-size model (AlexNet 227 x 227,
VGG-16 224 x 224, 1000 classes, dropout 0.5 on fc6 and fc7) at --batch_sizes, on one resident
chunk of K = --steps_per_call standard-normal batches (K, B, H, W, 3) generated on the devices,
run by `lwc.train.Parallel.over_all_devices().train_batches_fn()` (K steps under lax.scan,
state donated), as the ImageNet pipeline trains:
  dense:  optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9)), no masks;
  masked: lwc.optim.masked(optax.sgd(0.01, momentum=0.9), "l2", 5e-4) with random masks keeping
          --mask_density of every kernel (0.1: 90% pruned; biases kept), pruned weights zeroed.
Compiled ahead of time (seconds recorded), --warmup untimed calls, --repeats timed calls, each
closed by jax.block_until_ready: median ms/step and images/s, peak device memory
(`device.memory_stats()['peak_bytes_in_use']`, max over local devices; null where the backend
keeps no stats, as on CPU), XLA's memory analysis of the step, and the masked step's overhead
(ratio of the medians).

End to end (public API only: `lwc.pipeline.Config` and `lwc.pipeline.run`): a small TFDS dataset
with imagenet2012's features (JPEG images of ImageNet-like sizes, 1000 classes) is generated in
--out_dir/tfds, then in the workdir --out_dir/e2e_workdir (deleted first if present):
  A  iterations=1: dense training, pruning, retraining, a checkpoint per iteration;
  B  iterations=2, same workdir, killed with SIGKILL in the middle of iteration 2's retraining
     (LWC_FAULT=step:N, lwc.faults) after a mid-phase checkpoint (checkpoint_every_steps);
  C  the same command again: resumes and finishes iteration 2; iterations 0 and 1 must come back
     from the checkpoints unchanged (their records, wall seconds included, identical to A's);
  D  the same command once more: nothing left to train; the history must be C's.
The images are random (low-frequency noise), so the error rates mean nothing; the check is that
every stage runs, resumes and keeps its results, and how long each takes.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny widths, images, batches and steps (a CPU run of about a "
                  "minute, for CI); numeric flags given explicitly still apply.")
flags.DEFINE_string("out_dir", "gpu_check_out", "Folder for gpu_check.json, gpu_check.md, "
                    "logs/, the generated dataset (tfds/) and the pipeline workdir "
                    "(e2e_workdir/, replaced on every run). Created if missing.")
flags.DEFINE_float("time_limit_s", 480.0, "Budget of the whole check in seconds (8 minutes).")
flags.DEFINE_float("section_limit_s", 100.0, "At most this many seconds per throughput section "
                   "(model x variant), so that the end-to-end run keeps some of the budget.")
flags.DEFINE_float("min_section_s", 30.0, "Skip a section when less than this is left.")
flags.DEFINE_list("models", ["alexnet", "vgg16"], "Models to time: alexnet, vgg16.")
flags.DEFINE_list("batch_sizes", ["128", "64"], "Global batch per model (one value for all, or "
                  "one per model).")
flags.DEFINE_integer("steps_per_call", 10, "Steps per timed call (K of the resident chunk).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per variant after compilation.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (medians reported).")
flags.DEFINE_float("mask_density", 0.1, "Fraction of every kernel the masks keep (0.1: 90% "
                   "pruned).")
flags.DEFINE_bool("e2e", True, "Run the end-to-end pipeline section.")
flags.DEFINE_string("e2e_model", "alexnet", "Model of the end-to-end run: alexnet or vgg16.")
flags.DEFINE_integer("e2e_batch_size", 64, "Batch of the end-to-end run (train and eval).")
flags.DEFINE_integer("e2e_train_examples", 512, "Generated training images.")
flags.DEFINE_integer("e2e_eval_examples", 128, "Generated validation images.")
flags.DEFINE_integer("e2e_steps_per_call", 2, "The end-to-end run's steps_per_call.")
flags.DEFINE_bool("e2e_compilation_cache", True, "Share a persistent JAX compilation cache "
                  "(out_dir/jax_cache, emptied first) between the end-to-end runs.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, masks, data and pipeline.")
flags.DEFINE_string("worker", "", "Internal: a JSON spec; run that one section and exit.")

CHECK_VERSION = 1
DEFAULT_SIZE = {"alexnet": 227, "vgg16": 224}
VARIANTS = ("dense", "masked")
BUILDER_NAME = "lwc_gpu_check_images"
LEARNING_RATE, WEIGHT_DECAY = 0.01, 5e-4
# The end-to-end run trains on noise: a tenth of the paper's rate keeps it far from diverging
# (a NumericError would end the check), which is all it needs.
E2E_LEARNING_RATE = 0.001

# --smoke: what a 2-core CPU compiles and runs in seconds (the shapes of
# tests/test_benchmarks_smoke.py's imagenet_throughput test and tests/test_imagenet_smoke.py).
SMOKE = {
    "image_size": {"alexnet": 67, "vgg16": 32},
    "resize_size": {"alexnet": 72, "vgg16": 36},
    "widths": {"alexnet": (16, 32, 32, 32, 32, 64, 64),
               "vgg16": (8, 8, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 64, 64)},
    "flags": {"batch_sizes": ["8"], "steps_per_call": 2, "warmup": 1, "repeats": 2,
              "time_limit_s": 300.0, "section_limit_s": 120.0, "min_section_s": 5.0,
              "e2e_batch_size": 8, "e2e_train_examples": 32, "e2e_eval_examples": 16,
              "e2e_steps_per_call": 1},
}


def setting(name: str):
  """A flag's value, or under --smoke its smoke value unless the flag was given explicitly."""
  if FLAGS.smoke and not FLAGS[name].present and name in SMOKE["flags"]:
    return SMOKE["flags"][name]
  return FLAGS[name].value


# ------------------------------------------------------------------------------------------
# Workers (subprocesses): each imports JAX (and TF) itself.


def _device_info() -> dict:
  import jax
  return {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
          "count": jax.device_count(), "local_count": jax.local_device_count(),
          "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def _peak_bytes() -> int | None:
  import jax
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _xla_memory(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
          ("argument", "output", "alias", "temp", "generated_code")
          if hasattr(m, f"{k}_size_in_bytes")}


def _tree_bytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def throughput_worker(spec: dict) -> dict:
  """Dense or masked train steps of one model: compile, warm up, time; see the module doc."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from lwc import masks as masks_lib
  from lwc import optim
  from lwc import train as train_lib
  from lwc.models import get_model

  name, variant = spec["model"], spec["variant"]
  batch, size, steps = spec["batch_size"], spec["image_size"], spec["steps_per_call"]
  widths = spec["widths"]
  model = get_model(name, **({"widths": tuple(widths)} if widths else {}))
  parallel = train_lib.Parallel.over_all_devices()
  parallel.check_batch_size(batch)
  t_setup = time.perf_counter()
  sgd = optax.sgd(LEARNING_RATE, momentum=0.9)
  if variant == "dense":
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), sgd)
  else:
    tx = optim.masked(sgd, "l2", WEIGHT_DECAY)

  # Weights and masks drawn with NumPy from the shapes alone: XLA:CPU takes seconds to compile
  # a random initialiser per parameter shape. He-normal kernels, zero biases.
  rng = np.random.default_rng(spec["seed"])
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def draw(path, s):
    if masks_lib.path_names(path)[-1] == "bias":
      return np.zeros(s.shape, np.float32), np.ones(s.shape, bool)
    w = rng.standard_normal(s.shape, dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / np.prod(s.shape[:-1])))
    if not masks_lib.default_is_prunable(path, w):
      return w, np.ones(s.shape, bool)
    m = rng.random(s.shape, dtype=np.float32) < spec["mask_density"]
    return np.where(m, w, np.float32(0.0)), m

  drawn = jax.tree_util.tree_map_with_path(draw, shapes)
  params = jax.tree.map(lambda s, d: d[0], shapes, drawn)
  masks = jax.tree.map(lambda s, d: d[1], shapes, drawn)
  del drawn
  kernels = [m for p, m in jax.tree_util.tree_leaves_with_path(masks)
             if masks_lib.default_is_prunable(p, m)]
  kept, total = sum(int(m.sum()) for m in kernels), sum(m.size for m in kernels)
  state = jax.jit(lambda p, m: train_lib.TrainState.create(model.apply, p, m, tx))(
      params, masks if variant == "masked" else None)
  del params, masks
  key, k_dropout = jax.random.split(jax.random.key(spec["seed"]))
  k_images, k_labels = jax.random.split(key)
  sharding = NamedSharding(parallel.mesh, P(None, "data"))
  state = parallel.replicate(state)
  images = jax.jit(lambda k: jax.random.normal(k, (steps, batch, size, size, 3), jnp.float32),
                   out_shardings=sharding)(k_images)
  labels = jax.jit(lambda k: jax.random.randint(k, (steps, batch), 0, 1000, jnp.int32),
                   out_shardings=sharding)(k_labels)
  dropout_rng = parallel.replicate(k_dropout)
  jax.block_until_ready((state, images, labels))
  out = {"devices": _device_info(), "model": name, "variant": variant, "batch_size": batch,
         "image_size": size, "widths": widths, "steps_per_call": steps,
         "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
         "mask_density": kept / total if variant == "masked" else None,
         "state_bytes": _tree_bytes(state), "chunk_bytes": _tree_bytes((images, labels)),
         "setup_s": time.perf_counter() - t_setup}
  t0 = time.perf_counter()
  compiled = parallel.train_batches_fn().lower(state, images, labels, dropout_rng).compile()
  out["compile_s"] = time.perf_counter() - t0
  out["xla_memory_bytes"] = _xla_memory(compiled)
  metrics = None
  for _ in range(spec["warmup"]):
    state, metrics = jax.block_until_ready(compiled(state, images, labels, dropout_rng))
  times = []
  for _ in range(spec["repeats"]):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, images, labels, dropout_rng))
    times.append(time.perf_counter() - t0)
  ms = statistics.median(times) * 1e3 / steps
  out.update({"ms_per_step": ms, "images_per_s": batch * 1e3 / ms,
              "ms_per_step_samples": [t * 1e3 / steps for t in times],
              "loss": float(metrics["loss"]), "params_finite": bool(metrics["params_finite"]),
              "peak_bytes_in_use": _peak_bytes()})
  return out


_BUILDER = None


def builder_class(num_train: int = 0, num_eval: int = 0, min_side: int = 0, seed: int = 0):
  """The TFDS builder of the generated dataset, registered as BUILDER_NAME (once a process);
  the sizes matter only when it generates."""
  global _BUILDER
  if _BUILDER is None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")  # TF only feeds data; JAX owns the GPU
    import tensorflow_datasets as tfds

    class LwcGpuCheckImages(tfds.core.GeneratorBasedBuilder):
      """imagenet2012's features: JPEG images of varying sizes, labels in 1000 classes."""

      VERSION = tfds.core.Version("1.0.0")
      SIZES = {}

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
            }),
            supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        del dl_manager
        s = self.SIZES
        return {"train": self._generate_examples(s["train"], 0),
                "validation": self._generate_examples(s["eval"], 1)}

      def _generate_examples(self, n, split):
        s = self.SIZES
        rng = np.random.default_rng([s["seed"], split])
        for i in range(n):
          h, w = (int(rng.integers(s["side"], s["side"] * 3 // 2 + 1)) for _ in range(2))
          # Low-frequency noise: 16 x 16 pixel blocks (JPEG-friendly, like photos).
          small = rng.integers(0, 256, (-(-h // 16), -(-w // 16), 3), dtype=np.uint8)
          image = np.repeat(np.repeat(small, 16, 0), 16, 1)[:h, :w]
          yield i, {"image": image, "label": int(rng.integers(0, 1000))}

    _BUILDER = LwcGpuCheckImages
  if num_train:
    _BUILDER.SIZES = {"train": num_train, "eval": num_eval, "side": min_side, "seed": seed}
  return _BUILDER


def data_worker(spec: dict) -> dict:
  """Generates and prepares the dataset in spec['data_dir']."""
  cls = builder_class(spec["num_train"], spec["num_eval"], spec["min_side"], spec["seed"])
  t0 = time.perf_counter()
  builder = cls(data_dir=spec["data_dir"])
  builder.download_and_prepare()
  info = builder.info
  return {"seconds": time.perf_counter() - t0,
          "splits": {k: int(v.num_examples) for k, v in info.splits.items()},
          "bytes": int(sum(os.path.getsize(os.path.join(d, f))
                           for d, _, fs in os.walk(spec["data_dir"]) for f in fs))}


def pipeline_worker(spec: dict) -> dict:
  """`lwc.pipeline.run(Config.from_json(spec['config']), spec['workdir'])`."""
  builder_class()  # registers the dataset's name in this process
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("lwc: %(message)s"))
  lwc_log = logging.getLogger("lwc")
  lwc_log.addHandler(handler)
  lwc_log.setLevel(logging.INFO)
  lwc_log.propagate = False
  from lwc import pipeline
  config = pipeline.Config.from_json(spec["config"])
  t0 = time.perf_counter()
  summary = pipeline.run(config, spec["workdir"])
  return {"seconds": time.perf_counter() - t0, "devices": _device_info(), "summary": summary}


WORKERS = {"throughput": throughput_worker, "data": data_worker, "pipeline": pipeline_worker}


def run_worker(spec_json: str) -> None:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and TFDS log every file at INFO
  spec = json.loads(spec_json)
  result = WORKERS[spec["kind"]](spec)
  tmp = spec["result"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, spec["result"])


# ------------------------------------------------------------------------------------------
# The parent: runs the sections one by one within the budget.


class Budget:
  def __init__(self, seconds: float, min_section: float):
    self.start, self.seconds, self.min_section = time.monotonic(), seconds, min_section

  def left(self) -> float:
    return self.seconds - (time.monotonic() - self.start)


class Runner:
  """Starts worker subprocesses, each logged to logs/<name>.log, bounded by the budget."""

  def __init__(self, out_dir: str, budget: Budget):
    self.out_dir, self.budget = out_dir, budget
    self.logs = os.path.join(out_dir, "logs")
    os.makedirs(self.logs, exist_ok=True)

  def __call__(self, name: str, spec: dict, limit: float | None = None,
               env: dict | None = None) -> dict:
    """{'status': ok | failed | killed | timeout | skipped, 'wall_s', 'result', 'note', ...}."""
    left = self.budget.left()
    if left < self.budget.min_section:
      return {"status": "skipped", "note": f"{max(left, 0):.0f} s of the budget left"}
    timeout = left if limit is None else min(left, limit)
    result_path = os.path.join(self.logs, f"{name}.json")
    if os.path.exists(result_path):
      os.remove(result_path)
    spec = {**spec, "result": result_path}
    log_path = os.path.join(self.logs, f"{name}.log")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", f"--worker={json.dumps(spec)}"]
    t0 = time.monotonic()
    print(f"[{name}] started ({timeout:.0f} s allowed)", flush=True)
    with open(log_path, "w") as log:
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              env={**os.environ, **(env or {})})
      try:
        rc = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        rc = None
      except BaseException:  # Ctrl-C: take the worker down too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
      if rc is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = {"wall_s": time.monotonic() - t0, "returncode": rc, "log": os.path.relpath(
        log_path, self.out_dir)}
    if rc is None:
      out.update(status="timeout", note=f"killed after {timeout:.0f} s (budget)")
    elif rc == 0 and os.path.exists(result_path):
      with open(result_path) as f:
        out.update(status="ok", result=json.load(f))
    elif rc == -signal.SIGKILL:
      out.update(status="killed")
    else:
      out.update(status="failed", note=_last_error(log_path))
    print(f"[{name}] {out['status']} in {out['wall_s']:.1f} s"
          + (f": {out['note']}" if out.get("note") else ""), flush=True)
    return out


def _last_error(log_path: str) -> str:
  with open(log_path, errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  for line in reversed(lines):
    if "Error" in line or line.startswith("error:"):
      return line[-400:]
  return lines[-1][-400:] if lines else "no output"


def throughput_section(runner: Runner, models: list[str], batches: list[int]) -> tuple[list, dict]:
  results, devices = [], {}
  for name, batch in zip(models, batches):
    size = SMOKE["image_size"][name] if FLAGS.smoke else DEFAULT_SIZE[name]
    widths = list(SMOKE["widths"][name]) if FLAGS.smoke else None
    row = {"model": name, "image_size": size, "batch_size": batch, "widths": widths,
           "steps_per_call": setting("steps_per_call")}
    for variant in VARIANTS:
      spec = {"kind": "throughput", "model": name, "variant": variant, "batch_size": batch,
              "image_size": size, "widths": widths, "steps_per_call": setting("steps_per_call"),
              "warmup": setting("warmup"), "repeats": setting("repeats"),
              "mask_density": FLAGS.mask_density, "seed": FLAGS.seed}
      run = runner(f"{name}_{variant}", spec, limit=setting("section_limit_s"))
      entry = {"status": run["status"], "wall_s": run.get("wall_s")}
      if run.get("note"):
        entry["note"] = run["note"]
      if run["status"] == "ok":
        r = run["result"]
        devices = devices or r["devices"]
        for k in ("ms_per_step", "images_per_s", "ms_per_step_samples", "compile_s",
                  "peak_bytes_in_use", "xla_memory_bytes", "state_bytes", "chunk_bytes", "loss",
                  "params_finite", "params", "mask_density"):
          entry[k] = r[k]
        if not r["params_finite"]:
          entry.update(status="failed", note="parameters not finite after the timed steps")
      row[variant] = entry
    d, m = row["dense"], row["masked"]
    row["masked_overhead_pct"] = (100 * (m["ms_per_step"] / d["ms_per_step"] - 1)
                                  if d["status"] == m["status"] == "ok" else None)
    results.append(row)
  return results, devices


def _checkpoint_iterations(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def e2e_section(runner: Runner) -> dict:
  """Data generation, then runs A-D of the module docstring; `checks` says what held."""
  name = FLAGS.e2e_model
  size = SMOKE["image_size"][name] if FLAGS.smoke else DEFAULT_SIZE[name]
  resize = SMOKE["resize_size"][name] if FLAGS.smoke else 256
  batch, per_call = setting("e2e_batch_size"), setting("e2e_steps_per_call")
  n_train, n_eval = setting("e2e_train_examples"), setting("e2e_eval_examples")
  out = {"model": name, "image_size": size, "resize_size": resize, "batch_size": batch,
         "train_examples": n_train, "eval_examples": n_eval, "steps_per_call": per_call,
         "steps_per_epoch": None, "runs": {}, "checks": {}, "notes": []}
  tfds_dir = os.path.join(runner.out_dir, "tfds")
  workdir = os.path.join(runner.out_dir, "e2e_workdir")
  shutil.rmtree(tfds_dir, ignore_errors=True)
  shutil.rmtree(workdir, ignore_errors=True)
  data = runner("e2e_data", {"kind": "data", "data_dir": tfds_dir, "num_train": n_train,
                             "num_eval": n_eval, "min_side": resize, "seed": FLAGS.seed})
  out["data"] = {k: v for k, v in data.items() if k != "result"}
  if data["status"] != "ok":
    out["status"] = "failed" if data["status"] == "failed" else "incomplete"
    return out
  out["data"].update(data["result"])

  config = {"model": name, "widths": list(SMOKE["widths"][name]) if FLAGS.smoke else [],
            "dataset": "imagenet2012", "tfds_name": BUILDER_NAME, "data_dir": tfds_dir,
            "download": False, "image_size": size, "resize_size": resize, "seed": FLAGS.seed,
            "batch_size": batch, "eval_batch_size": batch, "optimizer": "sgd", "momentum": 0.9,
            "learning_rate": E2E_LEARNING_RATE, "lr_schedule": "constant", "dense_epochs": 1,
            "retrain_epochs": 1, "retrain_lr_scale": 0.1, "iterations": 1, "qualities": [1.0],
            "dropout": 0.5, "dropout_layers": ["fc6", "fc7"], "regularization": "l2",
            "reg_strength": WEIGHT_DECAY, "retrain_regularization": "l2",
            "retrain_reg_strength": WEIGHT_DECAY, "steps_per_call": per_call,
            "checkpoint_every_steps": 0, "tensorboard": False, "log_every_seconds": 30.0}
  runs, checks, summaries = out["runs"], out["checks"], {}

  # Runs B-D compile what A compiled: a persistent compilation cache shared by the four
  # processes (in out_dir, emptied first) spares them most of it.
  cache = os.path.join(runner.out_dir, "jax_cache")
  shutil.rmtree(cache, ignore_errors=True)
  cache_env = ({"JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
               if FLAGS.e2e_compilation_cache else {})
  out["compilation_cache"] = cache if cache_env else None

  def pipeline_run(key, what, cfg, env=None):
    run = runner(f"e2e_{key}", {"kind": "pipeline", "config": cfg, "workdir": workdir},
                 env={**cache_env, **(env or {})})
    entry = {"what": what, "status": run["status"], "wall_s": run.get("wall_s"),
             "checkpoints_after": _checkpoint_iterations(workdir)}
    if run.get("note"):
      entry["note"] = run["note"]
    if run["status"] == "ok":
      summary = run["result"]["summary"]
      summaries[key] = summary["iterations"]
      out.setdefault("devices", run["result"]["devices"])
      entry["pipeline_s"] = run["result"]["seconds"]
      entry["summary_wall_seconds"] = summary.get("wall_seconds")
      entry["iterations"] = [
          {k: h.get(k) for k in ("iteration", "phase", "step", "seconds", "params_nonzero",
                                 "params_total", "compression", "test_error", "test_top5_error")}
          for h in summary["iterations"]]
    if "log" in run:
      with open(os.path.join(runner.out_dir, run["log"]), errors="replace") as f:
        entry["resume_log"] = [line.strip()[:300] for line in f if "resuming from" in line][:4]
    runs[key] = entry
    return run["status"]

  if pipeline_run("A", "iterations=1: dense, prune, retrain, checkpoints 0 and 1", config) != "ok":
    return _e2e_status(out)
  a = summaries["A"]
  # The pipeline sets part of the training split apart for validation: read the steps per epoch
  # off the dense phase (one epoch) instead of computing them.
  spe = out["steps_per_epoch"] = a[0]["step"]
  after_a = a[-1]["step"]
  checks["A_dense_pruned_retrained"] = (
      [h["iteration"] for h in a] == [0, 1] and a[1]["params_nonzero"] < a[0]["params_nonzero"]
      and after_a == 2 * spe and runs["A"]["checkpoints_after"] == [0, 1])
  if spe < 2 * per_call:
    out["notes"].append(f"e2e: {spe} steps per epoch is less than 2 calls of {per_call} steps: "
                        "no room for a mid-phase checkpoint before the kill; generate more "
                        "training images")
    return _e2e_status(out)
  save_step, kill_step = after_a + per_call, after_a + 2 * per_call
  resumed = {**config, "iterations": 2, "checkpoint_every_steps": per_call}
  status = pipeline_run("B", f"iterations=2, SIGKILL at step {kill_step} (iteration 2's "
                             f"retraining), after a mid-phase checkpoint at step {save_step}",
                        resumed, env={"LWC_FAULT": f"step:{kill_step}"})
  checks["B_killed_mid_iteration_2"] = (status == "killed"
                                        and runs["B"]["checkpoints_after"] == [0, 1])
  if status == "ok":
    out["notes"].append("e2e: run B was not killed: LWC_FAULT=step:N had no effect")
  if status not in ("ok", "killed"):
    return _e2e_status(out)
  if pipeline_run("C", "the same command again: resume and finish iteration 2", resumed) != "ok":
    return _e2e_status(out)
  c = summaries["C"]
  checks["C_resumed_kept_iterations_0_1"] = (
      [h["iteration"] for h in c] == [0, 1, 2] and _same(c[:2], a)
      and c[2]["step"] == after_a + spe and c[2]["params_nonzero"] < c[1]["params_nonzero"]
      and runs["C"]["checkpoints_after"] == [0, 1, 2])
  # Informative: the pipeline's log line says where it resumed from (a mid-phase checkpoint
  # lives under progress/).
  checks["C_resumed_mid_phase_logged"] = any(
      "progress" in line for line in runs["C"].get("resume_log", []))
  if pipeline_run("D", "once more: nothing left to train", resumed) == "ok":
    checks["D_nothing_retrained"] = _same(summaries["D"], c)
  return _e2e_status(out)


E2E_REQUIRED = ("A_dense_pruned_retrained", "B_killed_mid_iteration_2",
                "C_resumed_kept_iterations_0_1", "D_nothing_retrained")


def _e2e_status(out: dict) -> dict:
  checks, runs = out["checks"], out["runs"]
  if all(checks.get(k) for k in E2E_REQUIRED):
    out["status"] = "ok"
  elif (any(r["status"] in ("skipped", "timeout") for r in runs.values())
        and not any(v is False for v in checks.values())):
    out["status"] = "incomplete"
  else:
    out["status"] = "failed"
  return out


def _same(a, b) -> bool:
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _mib(n) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f}"


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
  d = report["devices"] or {}
  lines = [f"# gpu_check ({'smoke, ' if report['smoke'] else ''}{report['date']})", "",
           f"Devices: {d.get('count', '?')} x {d.get('kind', '?')} ({d.get('platform', '?')}); "
           f"jax {report['machine']['jax']}, flax {report['machine']['flax']}; "
           f"{report['wall_s']:.0f} s of a {report['time_limit_s']:.0f} s budget; "
           f"status **{report['status']}**.", "",
           "| model | image | batch | variant | images/s | ms/step | masked overhead | "
           "compile s | peak MiB | XLA temp MiB | status |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in report["throughput"]:
    for v in VARIANTS:
      o = r[v]
      overhead = (_num(r["masked_overhead_pct"], "+.1f") + "%"
                  if v == "masked" and r["masked_overhead_pct"] is not None else "")
      temp = (o.get("xla_memory_bytes") or {}).get("temp")
      lines.append(f"| {r['model']} | {r['image_size']} | {r['batch_size']} | {v} "
                   f"| {_num(o.get('images_per_s'), ',.1f')} | {_num(o.get('ms_per_step'), '.2f')} "
                   f"| {overhead} | {_num(o.get('compile_s'), '.1f')} "
                   f"| {_mib(o.get('peak_bytes_in_use'))} | {_mib(temp)} "
                   f"| {o['status']}{': ' + o['note'] if o.get('note') else ''} |")
  e = report.get("e2e")
  if e:
    lines += ["", f"End to end: {e['model']} at {e['image_size']} (resize {e['resize_size']}), "
              f"batch {e['batch_size']}, {e['train_examples']} + {e['eval_examples']} generated "
              f"images, {e['steps_per_epoch']} steps per epoch; status **{e['status']}**.", "",
              "| run | what | wall s | pipeline s | iterations (s each) | checkpoints | status |",
              "|---|---|---:|---:|---|---|---|"]
    if "data" in e:
      lines.append(f"| data | generate and prepare the TFDS dataset | "
                   f"{_num(e['data'].get('wall_s'), '.1f')} | | | | {e['data']['status']} |")
    for key, r in e["runs"].items():
      its = ", ".join(f"{h['iteration']} ({h['seconds']:.1f})" for h in r.get("iterations", []))
      lines.append(f"| {key} | {r['what']} | {_num(r.get('wall_s'), '.1f')} "
                   f"| {_num(r.get('pipeline_s'), '.1f')} | {its} "
                   f"| {','.join(map(str, r['checkpoints_after']))} "
                   f"| {r['status']}{': ' + r['note'] if r.get('note') else ''} |")
    lines += ["", "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                         for k, v in e["checks"].items())]
  if report["notes"]:
    lines += [""] + [f"- {n}" for n in report["notes"]]
  return "\n".join(lines) + "\n"


def main_check() -> int:
  models = FLAGS.models
  for name in models:
    if name not in DEFAULT_SIZE:
      raise ValueError(f"--models: unknown model '{name}', expected alexnet or vgg16")
  try:
    batches = [int(b) for b in setting("batch_sizes")]
  except ValueError:
    raise ValueError(f"--batch_sizes: {','.join(setting('batch_sizes'))} is not a list of "
                     "integers") from None
  if len(batches) == 1:
    batches *= len(models)
  if len(batches) != len(models):
    raise ValueError(f"--batch_sizes: give one value or one per model ({len(models)})")
  if FLAGS.e2e and FLAGS.e2e_model not in DEFAULT_SIZE:
    raise ValueError(f"--e2e_model must be alexnet or vgg16, got '{FLAGS.e2e_model}'")
  if min(batches, default=1) < 1 or min(setting("steps_per_call"), setting("repeats"),
                                        setting("e2e_batch_size"),
                                        setting("e2e_steps_per_call")) < 1:
    raise ValueError("batch sizes, --steps_per_call, --repeats, --e2e_batch_size and "
                     "--e2e_steps_per_call must be >= 1")
  out_dir = os.path.abspath(FLAGS.out_dir)
  os.makedirs(out_dir, exist_ok=True)
  budget = Budget(setting("time_limit_s"), setting("min_section_s"))
  runner = Runner(out_dir, budget)
  info = common.machine()
  print(f"machine: {json.dumps(info)}", flush=True)
  report = {"check": "gpu_check", "version": CHECK_VERSION, "smoke": FLAGS.smoke,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "time_limit_s": budget.seconds, "machine": info, "devices": None,
            "flags": {k: setting(k) for k in (
                "models", "batch_sizes", "steps_per_call", "warmup", "repeats", "mask_density",
                "e2e", "e2e_model", "e2e_batch_size", "e2e_train_examples", "e2e_eval_examples",
                "e2e_steps_per_call", "e2e_compilation_cache", "seed", "section_limit_s",
                "min_section_s")},
            "throughput": [], "e2e": None, "notes": []}
  report["throughput"], report["devices"] = throughput_section(runner, models, batches)
  if FLAGS.e2e:
    report["e2e"] = e2e_section(runner)
    report["devices"] = report["devices"] or report["e2e"].get("devices")
    report["notes"] += report["e2e"]["notes"]
  report["wall_s"] = time.monotonic() - budget.start
  statuses = [r[v]["status"] for r in report["throughput"] for v in VARIANTS]
  if report["e2e"]:
    statuses.append(report["e2e"]["status"])
  skipped = [s for s in statuses if s in ("skipped", "timeout", "incomplete")]
  failed = [s for s in statuses if s not in ("ok", "skipped", "timeout", "incomplete")]
  if skipped:
    report["notes"].append(f"{len(skipped)} section(s) skipped or cut short by the "
                           f"{budget.seconds:.0f} s budget")
  if (report["devices"] or {}).get("platform") == "cpu" and not FLAGS.smoke:
    report["notes"].append("no GPU: these are CPU figures")
  report["status"] = "failed" if failed else ("incomplete" if skipped else "ok")
  table = markdown(report)
  with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write(table)
  print(table, flush=True)
  print(f"wrote {os.path.join(out_dir, 'gpu_check.json')} and gpu_check.md", flush=True)
  return 1 if failed else 0


def main(argv) -> None:
  if FLAGS.worker:
    run_worker(FLAGS.worker)
    return
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  try:
    code = main_check()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
