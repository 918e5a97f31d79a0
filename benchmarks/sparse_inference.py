"""Inference speed of pruned layers on CPU: dense BLAS against the sparse kernels of
lwc.sparse_kernels, side by side in one run (issue 15.1).

Cases:
* AlexNet's FC layers at Table 4's densities (fc6 9216x4096 and fc7 4096x4096 at 9%, fc8
  4096x1000 at 25%) and VGG-16's at Table 5's (fc6 25088x4096 and fc7 4096x4096 at 4%, fc8
  4096x1000 at 23%): random weights and uniformly random masks, each layer alone and the fc6-fc8
  stack with ReLUs (`--stacks`);
* pruned LeNet-300-100 / LeNet-5 exports (`python -m lwc.export`): the whole network and each
  layer alone on its own input (conv layers include their im2col); with `--data_dir`, also the
  predictions of every kernel on the 10,000 MNIST test images against the masked dense model
  (Flax, jitted);
* a break-even sweep (`--sweep`): one layer shape at densities x batch sizes, the default sparse
  kernel against the best dense one, to show where sparse stops paying.

Variants, all on the same float32 weights, activations feature-major (X (K, B) -> (N, B)) except
dense-jax and dense-numpy-xw (x (B, K) @ W):
* dense-numpy: NumPy's BLAS (OpenBLAS in the wheels), lwc.sparse_kernels kind "dense";
* dense-numpy-xw: x (B, K) @ W in NumPy, the other orientation of the same BLAS call (FC only);
* dense-mkl: MKL's cblas_sgemv / sgemm ("dense-mkl"; needs the mkl wheel);
* dense-jax: x @ W + b jitted by XLA (the masked dense Flax model for LeNets);
* sparse-numba: lwc's numba CSR kernels, 16-bit indices ("numba", the default);
* sparse-mkl: MKL's inspector-executor sparse BLAS ("mkl");
* sparse-scipy: scipy CSR kernels on a thread pool ("scipy", lwc.sparse.CsrMatrix, the previous
  default);
* sparse-torch: PyTorch CSR ("torch"), when installed.

Timing: each variant's calls per sample are calibrated to `--sample_seconds`; then `--repeats`
rounds in which every variant takes one sample in turn (ABCABC...), so a disturbance on this
shared machine hits all of them. A variant's time is the median of its samples; a speedup is the
median over rounds of the paired ratio (best dense variant's sample / sparse sample of the same
round), the best dense variant being the one of the lowest median. `foreign` = the CPU share
other processes took meanwhile (0 = quiet machine, 0.5 = one of two cores busy).

  python -m benchmarks.sparse_inference --lenet_300_100=runs/lenet300.npz \\
      --lenet5=runs/lenet5.npz --json_out=runs/sparse_inference.json
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import numpy as np

# Intel OpenMP (MKL's threads) spins 200 ms after each call by default, taking the other core
# from the variant timed next; 1 ms keeps MKL's own calls warm. Read when MKL first loads.
os.environ.setdefault("KMP_BLOCKTIME", "1")

from benchmarks import common  # noqa: E402
from lwc import sparse  # noqa: E402
from lwc import sparse_kernels as sk  # noqa: E402
from lwc.errors import UserError, run_cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("lenet_300_100", "", "Export (.npz) of a pruned LeNet-300-100 ('' = skip).")
flags.DEFINE_string("lenet5", "", "Export (.npz) of a pruned LeNet-5 ('' = skip).")
flags.DEFINE_string("data_dir", "", "MNIST IDX folder: check every kernel's predictions of the "
                    "exported LeNets on the test set against the dense model ('' = skip).")
flags.DEFINE_bool("alexnet", True, "AlexNet fc6-fc8 at Table 4 densities (random).")
flags.DEFINE_bool("vgg", True, "VGG-16 fc6-fc8 at Table 5 densities (random).")
flags.DEFINE_bool("stacks", True, "Also the fc6-fc8 stacks of AlexNet and VGG-16 end to end.")
flags.DEFINE_bool("layers", True, "Also each LeNet layer alone.")
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Batch sizes of the layer and network cases.")
flags.DEFINE_list("kinds", ["numba", "mkl", "scipy", "torch"],
                  "Sparse kernels to time (lwc.sparse_kernels kinds; missing libraries skipped).")
flags.DEFINE_bool("torch", True, "Time sparse-torch when it is in --kinds and installed.")
flags.DEFINE_list("dense", ["numpy", "numpy-xw", "mkl", "jax"], "Dense baselines to time.")
flags.DEFINE_integer("threads", 0, "Threads of the sparse kernels and dense-mkl (0 = one per "
                     "CPU); OpenBLAS and XLA take theirs from OPENBLAS_NUM_THREADS, XLA_FLAGS.")
flags.DEFINE_integer("repeats", 7, "Timed samples per variant (median reported).")
flags.DEFINE_float("sample_seconds", 0.1, "Target length of one timed sample.")
flags.DEFINE_bool("sweep", True, "Break-even sweep: densities x batch sizes on one layer.")
flags.DEFINE_list("sweep_shape", ["4096", "4096"], "Layer (inputs, outputs) of the sweep.")
flags.DEFINE_list("sweep_densities", ["1", "2", "4", "9", "15", "25", "35", "50", "70"],
                  "Kept weights, % (sweep).")
flags.DEFINE_list("sweep_batches", ["1", "2", "4", "8", "16", "64", "256"], "Batch sizes (sweep).")
flags.DEFINE_integer("sweep_repeats", 5, "Timed samples per variant and sweep point.")
flags.DEFINE_float("sweep_sample_seconds", 0.04, "Target length of one sweep sample.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights, masks and inputs.")
flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")
flags.DEFINE_bool("alexnet_sizes", False, "Also the size and energy tables of all AlexNet layers "
                  "at Table 4 densities (random masks).")
flags.DEFINE_float("sram_kib", 512.0, "On-chip SRAM for the AlexNet energy table, KiB.")

DEFAULT = f"sparse-{sk.DEFAULT_KIND}"
DENSE_NAMES = ("numpy", "numpy-xw", "mkl", "jax")
BATCH_MAJOR = ("dense-jax", "dense-numpy-xw")  # variants that take x (B, K)
# (network, layer, inputs, outputs, kept fraction): Table 4 (AlexNet) and Table 5 (VGG-16).
FC_LAYERS = (("AlexNet", "fc6", 9216, 4096, 0.09), ("AlexNet", "fc7", 4096, 4096, 0.09),
             ("AlexNet", "fc8", 4096, 1000, 0.25), ("VGG-16", "fc6", 25088, 4096, 0.04),
             ("VGG-16", "fc7", 4096, 4096, 0.04), ("VGG-16", "fc8", 4096, 1000, 0.23))
# Batch-1 targets of issue 15.1: (case, required speedup of the default kernel over best dense).
TARGETS = (("AlexNet fc6", 5.0), ("AlexNet fc7", 5.0), ("VGG-16 fc6", 8.0), ("VGG-16 fc7", 8.0))
# Every AlexNet layer (Caffe, grouped conv2/4/5): kernel shape (Flax layout), Table 4 kept
# fraction, output positions per image (for --alexnet_sizes).
ALEXNET = (("conv1", (11, 11, 3, 96), 0.84, 55 * 55), ("conv2", (5, 5, 48, 256), 0.38, 27 * 27),
           ("conv3", (3, 3, 256, 384), 0.35, 13 * 13), ("conv4", (3, 3, 192, 384), 0.37, 13 * 13),
           ("conv5", (3, 3, 192, 256), 0.37, 13 * 13), ("fc6", (9216, 4096), 0.09, 1),
           ("fc7", (4096, 4096), 0.09, 1), ("fc8", (4096, 1000), 0.25, 1))


# ---------------------------------------------------------------------------------------------
# Timing.


def time_variants(variants: dict[str, Callable[[], object]], repeats: int,
                  sample_seconds: float) -> dict[str, dict]:
  """Seconds per call of each variant: calls per sample calibrated, samples interleaved.

  Returns {variant: {median, min, max, n, samples (per round, seconds per call),
  calls_per_sample, foreign}}.
  """
  calls = {}
  for name, fn in variants.items():
    fn()
    fn()  # warm-up (compilation, caches)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < sample_seconds / 4 or n < 1:
      fn()
      n += 1
    per_call = (time.perf_counter() - start) / n
    calls[name] = max(1, int(sample_seconds / max(per_call, 1e-9)))
  samples = {name: [] for name in variants}
  with common.Watch() as watch:
    for _ in range(repeats):
      for name, fn in variants.items():
        t0 = time.perf_counter()
        for _ in range(calls[name]):
          fn()
        samples[name].append((time.perf_counter() - t0) / calls[name])
  return {name: {**common.summary(s), "samples": s, "calls_per_sample": calls[name],
                 "foreign": watch.foreign} for name, s in samples.items()}


def best_dense(timings: dict) -> str:
  return min((k for k in timings if k.startswith("dense")), key=lambda k: timings[k]["median"])


def paired_speedup(timings: dict, dense: str, variant: str) -> float:
  """Median over rounds of dense sample / variant sample (the same round)."""
  return statistics.median(d / s for d, s in zip(timings[dense]["samples"],
                                                 timings[variant]["samples"]))


def case_row(case: str, batch: int, density: float, timings: dict) -> dict:
  dense = best_dense(timings)
  speedups = {k: paired_speedup(timings, dense, k) for k in timings if k.startswith("sparse")}
  return {"case": case, "batch": batch, "density": density, "timings": timings,
          "best_dense": dense, "speedups": speedups,
          "speedup": speedups.get(DEFAULT, float("nan")),
          "best_sparse": max(speedups, key=speedups.get) if speedups else "",
          "foreign": timings[dense]["foreign"]}


# ---------------------------------------------------------------------------------------------
# Variants.


def sparse_kinds() -> list[str]:
  kinds = []
  for kind in FLAGS.kinds:
    if kind not in sk.SPARSE_KINDS:
      raise UserError(f"--kinds: '{kind}' is not one of {', '.join(sk.SPARSE_KINDS)}")
    if kind == "torch" and not FLAGS.torch:
      continue
    if sk.available(kind):
      kinds.append(kind)
    else:
      _note(f"sparse-{kind} skipped ({sk.PACKAGES[kind]} not installed)")
  return kinds


@functools.cache
def _note(text: str) -> None:
  print(f"note: {text}")


def dense_kinds() -> list[str]:
  out = []
  for name in FLAGS.dense:
    if name not in DENSE_NAMES:
      raise UserError(f"--dense: '{name}' is not one of {', '.join(DENSE_NAMES)}")
    if name == "mkl" and not sk.available("dense-mkl"):
      _note("dense-mkl skipped (mkl not installed)")
      continue
    out.append(name)
  if not out:
    raise UserError("--dense: no dense baseline to compare with")
  return out


def layer_variants(kernel: np.ndarray, bias: np.ndarray, mask: np.ndarray | None) -> dict:
  """{variant: callable} for one FC layer; 'dense-jax' takes x (B, K), the others X (K, B)."""
  out = {}
  for name in dense_kinds():
    if name == "jax":
      out["dense-jax"] = _jax_dense_stack([(kernel, bias)])
    elif name == "numpy-xw":
      out["dense-numpy-xw"] = _numpy_xw(kernel, bias, mask)
    else:
      out[f"dense-{name}"] = sk.make_matrix(kernel, bias, mask, threads=FLAGS.threads,
                                            kind="dense" if name == "numpy" else "dense-mkl")
  for kind in sparse_kinds():
    out[f"sparse-{kind}"] = sk.make_matrix(kernel, bias, mask, kind=kind, threads=FLAGS.threads)
  return out


def _jax_dense_stack(layers: list[tuple[np.ndarray, np.ndarray]]):
  """x (B, K) -> the FC stack with ReLUs between layers, one jitted XLA computation."""
  import jax
  import jax.numpy as jnp

  weights = [(jnp.asarray(k), jnp.asarray(b)) for k, b in layers]

  def forward(weights, x):
    for i, (w, b) in enumerate(weights):
      x = x @ w + b
      if i < len(weights) - 1:
        x = jax.nn.relu(x)
    return x
  f = jax.jit(forward)
  return lambda x: f(weights, x).block_until_ready()


def _numpy_xw(kernel: np.ndarray, bias: np.ndarray, mask: np.ndarray | None) -> Callable:
  """x (B, K) -> x @ W + b with NumPy (W (K, N) as stored: the other orientation of the same
  BLAS call, which OpenBLAS runs with another kernel)."""
  w = np.ascontiguousarray(kernel if mask is None else np.where(mask, kernel, 0), np.float32)
  b = np.asarray(bias, np.float32)
  return lambda x: np.add(x @ w, b)


def _stack(layers: list[Callable]) -> Callable:
  def run(x):
    for i, layer in enumerate(layers):
      x = layer(x)
      if i < len(layers) - 1:
        x = np.maximum(x, 0, out=x)
    return x
  return run


def bind_inputs(fns: dict, x_fm: np.ndarray) -> dict:
  """Zero-argument calls: BATCH_MAJOR variants on x (B, K), the others on X (K, B)."""
  x_bm = np.ascontiguousarray(x_fm.T)
  return {v: (lambda f=f, a=(x_bm if v in BATCH_MAJOR else x_fm): f(a)) for v, f in fns.items()}


# ---------------------------------------------------------------------------------------------
# Cases.


def random_layer(k: int, n: int, density: float, rng) -> tuple[np.ndarray, np.ndarray, float]:
  """(kernel (K, N) float32 zero where pruned, bias (N,), kept fraction): uniform random mask."""
  kernel = rng.standard_normal((k, n), dtype=np.float32)
  kernel *= np.float32(0.01)
  kernel[rng.random((k, n), dtype=np.float32) >= density] = 0
  bias = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
  return kernel, bias, float(np.count_nonzero(kernel)) / kernel.size


def fc_cases(network: str, batches: list[int], rng) -> list[dict]:
  """Each FC layer of `network` alone, then the fc6-fc8 stack, at every batch size."""
  layers = {name: random_layer(k, n, d, rng) for net, name, k, n, d in FC_LAYERS if net == network}
  fns = {name: layer_variants(kernel, bias, None) for name, (kernel, bias, _) in layers.items()}
  cases = [(f"{network} {name}", kernel.shape[0], layers[name][2], fns[name])
           for name, (kernel, _, _) in layers.items()]
  if FLAGS.stacks:
    stack = {v: _stack([fns[name][v] for name in layers]) for v in fns["fc6"] if v != "dense-jax"}
    if "dense-numpy-xw" in stack:  # batch-major all the way: ReLU between layers as well
      stack["dense-numpy-xw"] = _stack([fns[name]["dense-numpy-xw"] for name in layers])
    if "dense-jax" in fns["fc6"]:
      stack["dense-jax"] = _jax_dense_stack([(k, b) for k, b, _ in layers.values()])
    kept = sum(k.size * d for k, _, d in layers.values()) / sum(k.size for k, _, _ in
                                                                 layers.values())
    cases.append((f"{network} fc6-fc8", layers["fc6"][0].shape[0], kept, stack))
  rows = []
  for batch in batches:
    for case, width, density, variants in cases:
      x = np.maximum(rng.standard_normal((width, batch), dtype=np.float32), 0)
      timings = time_variants(bind_inputs(variants, x), FLAGS.repeats, FLAGS.sample_seconds)
      rows.append(case_row(case, batch, density, timings))
      print(row_text(rows[-1]), flush=True)
  return rows


def _jax_model(model_name: str, params: dict):
  import jax
  import jax.numpy as jnp

  from lwc.models import get_model

  model = get_model(model_name)
  p = jax.tree.map(jnp.asarray, params)
  f = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return lambda x: f(p, x).block_until_ready()


def lenet_models(export: sparse.Export) -> tuple[dict, dict]:
  """(params, {variant: NumpyModel or the jitted Flax model}) of an exported LeNet."""
  model_name = export.manifest["model"]
  params, _ = export.decode()
  models = {}
  for name in dense_kinds():
    if name == "jax":
      models["dense-jax"] = _jax_model(model_name, params)
    elif name == "numpy-xw":
      continue  # NumpyModel is feature-major throughout
    else:
      models[f"dense-{name}"] = sparse.NumpyModel(
          model_name, params, "dense" if name == "numpy" else "dense-mkl", threads=FLAGS.threads)
  for kind in sparse_kinds():
    models[f"sparse-{kind}"] = sparse.NumpyModel(model_name, params, kind, threads=FLAGS.threads)
  return params, models


def lenet_cases(name: str, export: sparse.Export, batches: list[int], rng) -> list[dict]:
  params, models = lenet_models(export)
  sizes = sparse.size_report(export)
  numpy_models = {v: m for v, m in models.items() if v != "dense-jax"}
  reference = next(iter(numpy_models.values()))
  rows = []
  for batch in batches:
    x = rng.random((batch, 28, 28, 1)).astype(np.float32)
    variants = {v: (lambda m=m: m(x)) for v, m in models.items()}
    timings = time_variants(variants, FLAGS.repeats, FLAGS.sample_seconds)
    rows.append(case_row(f"{name} (whole net)", batch, sizes["pruned_layers"]["density"],
                         timings))
    print(row_text(rows[-1]), flush=True)
    if not FLAGS.layers:
      continue
    # Each layer alone on its input in this forward pass (feature-major: (features, batch) for
    # FC, (channels, batch, H, W) for conv).
    for layer, inp in reference.layer_inputs(x).items():
      variants = {v: (lambda f=m.layers[layer], a=inp: f(a)) for v, m in numpy_models.items()}
      kernel, bias = params[layer]["kernel"], params[layer]["bias"]
      inp_t = np.ascontiguousarray(inp.T)
      if kernel.ndim == 2 and "dense-jax" in models:
        jax_layer = _jax_dense_stack([(kernel, bias)])
        variants["dense-jax"] = lambda f=jax_layer, a=inp_t: f(a)
      if kernel.ndim == 2 and "numpy-xw" in dense_kinds():
        variants["dense-numpy-xw"] = lambda f=_numpy_xw(kernel, bias, None), a=inp_t: f(a)
      timings = time_variants(variants, FLAGS.repeats, FLAGS.sample_seconds)
      density = sizes["leaves"][f"{layer}/kernel"]["density"]
      rows.append(case_row(f"{name} {layer}", batch, density, timings))
      print(row_text(rows[-1]), flush=True)
  return rows


def lenet_identity(name: str, export: sparse.Export, data_dir: str) -> dict:
  """Every kernel's predictions on the MNIST test set against the masked dense Flax model."""
  from lwc.data import mnist

  images = mnist.load_idx(data_dir).test.images
  params, models = lenet_models(export)
  jax_model = models.pop("dense-jax", None) or _jax_model(export.manifest["model"], params)
  want = np.concatenate([np.asarray(jax_model(images[s:s + 1000]))
                         for s in range(0, len(images), 1000)])
  out = {"images": int(len(images)), "kernels": {}}
  for variant, model in models.items():
    got = np.concatenate([model(images[s:s + 1000]) for s in range(0, len(images), 1000)])
    out["kernels"][variant] = {
        "equal_predictions": int((got.argmax(-1) == want.argmax(-1)).sum()),
        "max_abs_logit_diff": float(np.abs(got - want).max())}
  print(f"\n{name}: predictions against the masked dense model (Flax, jitted) on "
        f"{len(images):,} MNIST test images:")
  for variant, r in out["kernels"].items():
    print(f"  {variant}: {r['equal_predictions']:,}/{len(images):,} equal, "
          f"max |logit diff| {r['max_abs_logit_diff']:.2e}")
  return out


# ---------------------------------------------------------------------------------------------
# Break-even sweep.


def _numbers(values: list[str], what: str, kind=int) -> list:
  try:
    out = [kind(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) <= 0:
    raise UserError(f"--{what}: {','.join(values)} is not a list of positive numbers")
  return out


def sweep(rng) -> dict:
  """Default sparse kernel vs the best dense one on a (K, N) layer, densities x batches."""
  k, n = _numbers(FLAGS.sweep_shape, "sweep_shape")
  densities = [d / 100 for d in _numbers(FLAGS.sweep_densities, "sweep_densities", float)]
  batches = _numbers(FLAGS.sweep_batches, "sweep_batches")
  dense = [d for d in dense_kinds() if d in ("numpy", "mkl")] or ["numpy"]
  points = []
  print(f"\nBreak-even sweep: {k}x{n} layer, speedup of {DEFAULT} over the best of "
        f"{', '.join('dense-' + d for d in dense)} (paired median; < 1: sparse loses)\n")
  print("| density | " + " | ".join(f"batch {b}" for b in batches) + " |")
  print("|---:|" + "---:|" * len(batches))
  for density in densities:
    kernel, bias, kept = random_layer(k, n, density, rng)
    fns = {f"dense-{d}": sk.make_matrix(kernel, bias, kind="dense" if d == "numpy" else
                                        "dense-mkl", threads=FLAGS.threads) for d in dense}
    fns[DEFAULT] = sk.make_matrix(kernel, bias, kind=sk.DEFAULT_KIND, threads=FLAGS.threads)
    cells = []
    for batch in batches:
      x = np.maximum(rng.standard_normal((k, batch), dtype=np.float32), 0)
      timings = time_variants(bind_inputs(fns, x), FLAGS.sweep_repeats,
                              FLAGS.sweep_sample_seconds)
      row = case_row(f"sweep {k}x{n}", batch, kept, timings)
      points.append({key: row[key] for key in ("batch", "density", "best_dense", "speedup",
                                               "foreign")} |
                    {"us": {v: t["median"] * 1e6 for v, t in timings.items()}})
      cells.append(f"{row['speedup']:.2f}x")
    print(f"| {100 * density:g}% | " + " | ".join(cells) + " |", flush=True)
  summary = break_even(points, densities, batches)
  print("\n" + summary["text"])
  return {"shape": [k, n], "points": points, **summary}


def break_even(points: list[dict], densities: list[float], batches: list[int]) -> dict:
  """Where sparse stops paying: per batch, the highest density tested at which the default
  kernel is still faster than dense, and per density the largest batch."""
  speed = {(p["batch"], round(p["density"], 4)): p["speedup"] for p in points}
  kept = sorted({round(p["density"], 4) for p in points})
  by_batch, by_density, lines = {}, {}, []
  for b in batches:
    wins = [d for d in kept if speed[(b, d)] > 1]
    by_batch[b] = max(wins) if wins else None
    lines.append(f"batch {b}: sparse faster up to {_pct(by_batch[b])} density"
                 + _first_loss([d for d in kept if speed[(b, d)] <= 1]))
  for d in kept:
    wins = [b for b in batches if speed[(b, d)] > 1]
    by_density[d] = max(wins) if wins else None
  return {"max_density_by_batch": by_batch, "max_batch_by_density": by_density,
          "text": "\n".join(lines)}


def _pct(d: float | None) -> str:
  return "no tested" if d is None else f"{100 * d:.1f}%"


def _first_loss(losses: list[float]) -> str:
  return f" (slower from {100 * min(losses):.1f}%)" if losses else " (faster at every density)"


# ---------------------------------------------------------------------------------------------
# Tables.


def alexnet_sizes(rng) -> dict:
  """Size report and energy of AlexNet with uniformly random masks at Table 4's densities."""
  from lwc import energy

  leaves = {}
  for name, shape, density, _ in ALEXNET:
    mask = rng.random(shape, dtype=np.float32) < density
    weights = np.where(mask, np.float32(1.0), np.float32(0.0))  # values do not change sizes
    bits = sparse.DEFAULT_INDEX_BITS[sparse.leaf_kind(shape)]
    leaves[f"{name}/kernel"] = sparse.encode_leaf(weights, mask, bits)
    leaves[f"{name}/bias"] = np.zeros(shape[-1], np.float32)
  export = sparse.Export(manifest={}, leaves=leaves)
  sizes = sparse.size_report(export)
  uses = {name: positions for name, _, _, positions in ALEXNET}
  work = energy.work_from_sizes(sizes["leaves"], uses)
  result = energy.estimate(work, FLAGS.sram_kib * 1024)
  sweep_ = energy.sram_sweep(work, [0.0, FLAGS.sram_kib, 8 * 1024.0, 64 * 1024.0, float("inf")])
  print("\nAlexNet at Table 4 densities (uniformly random masks):\n")
  print(sparse.format_size_table(sizes))
  print(energy.format_energy_table(result))
  print(energy.format_sram_sweep(sweep_))
  return {"sizes": sizes, "energy": result, "energy_by_sram": sweep_}


VARIANT_ORDER = ("dense-numpy", "dense-numpy-xw", "dense-mkl", "dense-jax", "sparse-numba",
                 "sparse-mkl", "sparse-scipy", "sparse-torch")


def columns() -> list[str]:
  names = [f"dense-{d}" for d in dense_kinds()] + [f"sparse-{k}" for k in sparse_kinds()]
  return [v for v in VARIANT_ORDER if v in names]


def header() -> str:
  cols = columns()
  return ("| case | batch | density | " + " | ".join(f"{c} µs" for c in cols)
          + f" | best dense | {DEFAULT} speedup | best sparse (speedup) | foreign |\n"
          + "|---|---:|---:|" + "---:|" * len(cols) + "---|---:|---|---:|")


def row_text(row: dict) -> str:
  t = row["timings"]
  cells = [f"{t[c]['median'] * 1e6:,.1f}" if c in t else "" for c in columns()]
  best = row["best_sparse"]
  return (f"| {row['case']} | {row['batch']} | {100 * row['density']:.1f}% | "
          + " | ".join(cells) + f" | {row['best_dense']} | {row['speedup']:.2f}x | "
          f"{best} ({row['speedups'].get(best, float('nan')):.2f}x) | {row['foreign']:.2f} |")


def targets(rows: list[dict], identity: dict) -> list[dict]:
  """The issue's targets with MET/MISSED: batch-1 speedups of the default kernel over the best
  dense variant (paired medians), and prediction identity of the exported LeNets."""
  out = []
  for case, required in TARGETS:
    row = next((r for r in rows if r["case"] == case and r["batch"] == 1), None)
    if row is None:
      out.append({"target": f"{case} batch 1: >= {required:g}x over dense", "verdict": "NOT RUN"})
      continue
    out.append({"target": f"{case} at {100 * row['density']:.0f}%, batch 1, "
                          f"{DEFAULT} >= {required:g}x over best dense",
                "measured": f"{row['speedup']:.2f}x ({row['best_dense']} "
                            f"{row['timings'][row['best_dense']]['median'] * 1e6:,.0f} µs, "
                            f"{DEFAULT} {row['timings'][DEFAULT]['median'] * 1e6:,.0f} µs, "
                            f"foreign {row['foreign']:.2f})",
                "verdict": "MET" if row["speedup"] >= required else "MISSED"})
  for name in ("lenet_300_100", "lenet5"):
    r = identity.get(name)
    if r is None:
      out.append({"target": f"{name}: {DEFAULT} predictions == masked dense model on every "
                            "MNIST test image", "verdict": "NOT RUN"})
      continue
    k = r["kernels"].get(DEFAULT)
    ok = k is not None and k["equal_predictions"] == r["images"]
    out.append({"target": f"{name}: {DEFAULT} predictions == masked dense model on every MNIST "
                          "test image",
                "measured": (f"{k['equal_predictions']:,}/{r['images']:,} equal (max abs "
                             f"logit diff {k['max_abs_logit_diff']:.1e})" if k else
                             "kernel not run"),
                "verdict": "MET" if ok else "MISSED"})
  return out


def print_targets(rows: list[dict]) -> None:
  print("\nTargets (issue 15.1):\n\n| target | measured | verdict |\n|---|---|---|")
  for r in rows:
    print(f"| {r['target']} | {r.get('measured', '')} | **{r['verdict']}** |")


def _json_safe(x):
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def machine_info() -> dict:
  machine = common.machine()
  machine.update({"scipy": common.version("scipy"), "numpy": common.version("numpy"),
                  "numba": common.version("numba"), "mkl": common.version("mkl"),
                  "numba_threading_layer": _numba_layer(),
                  **{v: os.environ.get(v, "") for v in (
                      "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                      "NUMBA_NUM_THREADS", "KMP_BLOCKTIME")}})
  return machine


def _numba_layer() -> str:
  if not sk.available("numba"):
    return ""
  sk.NumbaCsr(np.ones((8, 2), np.float32), threads=2, min_parallel_nnz=0)(
      np.ones((8, 1), np.float32))  # starts numba's thread pool
  return sk.numba.threading_layer()


def run() -> None:
  """The benchmark; bad input (flags, export files) raises UserError before anything is timed."""
  batches = _numbers(FLAGS.batch_sizes, "batch_sizes")
  if FLAGS.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.json_out))):
    raise UserError(f"--json_out={FLAGS.json_out}: folder "
                    f"{os.path.dirname(os.path.abspath(FLAGS.json_out))} does not exist")
  if FLAGS.json_out and os.path.isdir(FLAGS.json_out):
    raise UserError(f"--json_out={FLAGS.json_out} is a directory")
  if FLAGS.threads < 0:
    raise UserError(f"--threads must be >= 0, got {FLAGS.threads}")
  sparse_kinds(), dense_kinds()  # flag errors first
  exports = {name: sparse.load(getattr(FLAGS, name)) for name in ("lenet_300_100", "lenet5")
             if getattr(FLAGS, name)}
  machine = machine_info()
  print(f"machine: {json.dumps(machine)}")
  print(header(), flush=True)
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  for network, wanted in (("AlexNet", FLAGS.alexnet), ("VGG-16", FLAGS.vgg)):
    if wanted:
      rows += fc_cases(network, batches, rng)
  for name, export in exports.items():
    rows += lenet_cases(name, export, batches, rng)
  identity = {name: lenet_identity(name, export, FLAGS.data_dir)
              for name, export in exports.items()} if FLAGS.data_dir else {}
  swept = sweep(rng) if FLAGS.sweep else None
  verdicts = targets(rows, identity)
  print_targets(verdicts)
  sizes = alexnet_sizes(rng) if FLAGS.alexnet_sizes else None
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(_json_safe({"machine": machine, "rows": rows, "identity": identity,
                            "sweep": swept, "targets": verdicts, "alexnet_sizes": sizes,
                            "flags": {k: getattr(FLAGS, k) for k in (
                                "lenet_300_100", "lenet5", "data_dir", "alexnet", "vgg",
                                "stacks", "batch_sizes", "kinds", "dense", "threads", "repeats",
                                "sample_seconds", "sweep_shape", "sweep_densities",
                                "sweep_batches", "sweep_repeats", "sweep_sample_seconds",
                                "seed")}}), f, indent=1)


def main(argv) -> None:
  run_cli(argv, run)


if __name__ == "__main__":
  app.run(main)
