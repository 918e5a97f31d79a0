"""Inference speed, dense vs sparse, at batch 1 and 64 on CPU.

Cases:
* pruned LeNet-300-100 and LeNet-5 from exports (`python -m lwc.export`): the whole network and
  each layer alone (conv layers include their im2col);
* AlexNet's FC layers at Table 4's densities (fc6 9216x4096 at 9%, fc7 4096x4096 at 9%, fc8
  4096x1000 at 25%), random weights and uniformly random masks, each alone and as the fc6-fc8
  stack with ReLUs.

Variants, all on the same weights, float32:
* dense-numpy: x @ W + b with NumPy/OpenBLAS (lwc.sparse.DenseMatrix);
* dense-jax: the masked dense model jitted with XLA (Flax `apply` for LeNets, x @ W + b for
  AlexNet layers), result blocked on every call;
* sparse-csr: scipy CSR of W.T, compiled csr_matvec / csr_matvecs (lwc.sparse.CsrMatrix);
* sparse-bcoo (with --jax_sparse): jax.experimental.sparse BCOO, jitted;
* sparse-torch (with --torch, when installed): torch.sparse_csr_tensor of W.T, `torch.mv` at
  batch 1 and `torch.sparse.mm` at batch B (MKL sparse BLAS in the CPU wheels).
Speedup = best dense / sparse-csr. Variants alternate within each repeat (ABCABC...) so a
disturbance on a shared machine hits all; the median over repeats is reported with the other
processes' share of the CPU during the case (`foreign`, 0 = quiet machine).

  python -m benchmarks.sparse_inference --lenet_300_100=runs/lenet300.npz \
      --lenet5=runs/lenet5.npz --json_out=runs/sparse_inference.json
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common
from lwc import sparse
from lwc.errors import UserError, run_cli

FLAGS = flags.FLAGS
flags.DEFINE_string("lenet_300_100", "", "Export (.npz) of a pruned LeNet-300-100 ('' = skip).")
flags.DEFINE_string("lenet5", "", "Export (.npz) of a pruned LeNet-5 ('' = skip).")
flags.DEFINE_bool("alexnet", True, "Also AlexNet fc6-fc8 at Table 4 densities (random).")
flags.DEFINE_bool("layers", True, "Also each LeNet layer alone.")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes.")
flags.DEFINE_integer("repeats", 7, "Timed samples per variant (median reported).")
flags.DEFINE_float("sample_seconds", 0.1, "Target length of one timed sample.")
flags.DEFINE_bool("jax_sparse", False, "Also time jax.experimental.sparse BCOO.")
flags.DEFINE_bool("torch", True, "Also time PyTorch CSR (MKL) when torch is installed.")
flags.DEFINE_integer("csr_threads", 0, "Threads of the scipy CSR kernel (0 = one per CPU).")
flags.DEFINE_integer("seed", 0, "Seed of the AlexNet weights, masks and inputs.")
flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")

flags.DEFINE_bool("alexnet_sizes", True, "Also the size and energy tables of all AlexNet layers "
                  "at Table 4 densities (random masks).")
flags.DEFINE_float("sram_kib", 512.0, "On-chip SRAM for the AlexNet energy table, KiB.")

# AlexNet FC layers (Caffe names fc6, fc7, fc8; Table 4 calls them fc1..fc3), kept fraction.
ALEXNET_FC = (("fc6", 9216, 4096, 0.09), ("fc7", 4096, 4096, 0.09), ("fc8", 4096, 1000, 0.25))
# Every AlexNet layer (Caffe, grouped conv2/4/5): kernel shape (Flax layout), Table 4 kept
# fraction, output positions per image.
ALEXNET = (("conv1", (11, 11, 3, 96), 0.84, 55 * 55), ("conv2", (5, 5, 48, 256), 0.38, 27 * 27),
           ("conv3", (3, 3, 256, 384), 0.35, 13 * 13), ("conv4", (3, 3, 192, 384), 0.37, 13 * 13),
           ("conv5", (3, 3, 192, 256), 0.37, 13 * 13), ("fc6", (9216, 4096), 0.09, 1),
           ("fc7", (4096, 4096), 0.09, 1), ("fc8", (4096, 1000), 0.25, 1))


def time_variants(variants: dict[str, Callable[[], object]], repeats: int,
                  sample_seconds: float) -> dict[str, dict]:
  """Seconds per call of each variant: calls per sample calibrated, samples interleaved."""
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
  return {name: {**common.summary(s), "calls_per_sample": calls[name],
                 "foreign": watch.foreign} for name, s in samples.items()}


def _jax_dense_layer(kernel: np.ndarray, bias: np.ndarray):
  import jax
  import jax.numpy as jnp

  w, b = jnp.asarray(kernel), jnp.asarray(bias)
  f = jax.jit(lambda w, b, x: x @ w + b)
  return lambda x: f(w, b, x).block_until_ready()


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


def _jax_bcoo_layer(kernel: np.ndarray, bias: np.ndarray):
  import jax
  import jax.numpy as jnp
  from jax.experimental import sparse as jsparse

  w, b = jsparse.BCOO.fromdense(jnp.asarray(kernel)), jnp.asarray(bias)
  f = jax.jit(lambda w, b, x: x @ w + b)
  return lambda x: f(w, b, x).block_until_ready()


def _torch_layer(kernel: np.ndarray, bias: np.ndarray):
  import torch

  w = torch.from_numpy(np.ascontiguousarray(kernel.T)).to_sparse_csr()
  b = torch.from_numpy(np.asarray(bias, np.float32))

  def run(x):
    with torch.inference_mode():
      xt = torch.from_numpy(x)
      if x.shape[0] == 1:
        return (torch.mv(w, xt[0]) + b)[None].numpy()
      return (torch.sparse.mm(w, xt.T.contiguous()).T + b).numpy()
  return run


def _torch_available() -> bool:
  if not FLAGS.torch:
    return False
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  import warnings
  warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
  return True


def _jax_model(model_name: str, params: dict):
  import jax
  import jax.numpy as jnp

  from lwc.models import get_model

  model = get_model(model_name)
  p = jax.tree.map(jnp.asarray, params)
  f = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return lambda x: f(p, x).block_until_ready()


def _stack(layers: list[Callable]) -> Callable:
  def run(x):
    for i, layer in enumerate(layers):
      x = layer(x)
      if i < len(layers) - 1:
        x = np.maximum(x, 0)
    return x
  return run


def _case_row(case: str, batch: int, density: float, timings: dict) -> dict:
  best_dense = min(t["median"] for k, t in timings.items() if k.startswith("dense"))
  return {"case": case, "batch": batch, "density": density, "timings": timings,
          "speedup": best_dense / timings["sparse-csr"]["median"],
          "foreign": statistics.median(t["foreign"] for t in timings.values())}


def lenet_cases(name: str, export: sparse.Export, batches: list[int], rng) -> list[dict]:
  model_name = export.manifest["model"]
  params, _ = export.decode()
  dense = sparse.NumpyModel(model_name, params, "dense")
  csr = sparse.NumpyModel(model_name, params, "csr", FLAGS.csr_threads or None)
  jax_model = _jax_model(model_name, params)
  sizes = sparse.size_report(export)
  rows = []
  for batch in batches:
    x = rng.random((batch, 28, 28, 1)).astype(np.float32)
    variants = {"dense-numpy": lambda x=x: dense(x), "dense-jax": lambda x=x: jax_model(x),
                "sparse-csr": lambda x=x: csr(x)}
    timings = time_variants(variants, FLAGS.repeats, FLAGS.sample_seconds)
    rows.append(_case_row(f"{name} (whole net)", batch, sizes["pruned_layers"]["density"],
                          timings))
    print(_row_text(rows[-1]), flush=True)
    if not FLAGS.layers:
      continue
    # Each layer alone, on its input in this forward pass (feature-major, as NumpyModel keeps
    # activations: (features, batch) for FC, (channels, batch, H, W) for conv).
    for layer, inp in dense.layer_inputs(x).items():
      kernel, bias = params[layer]["kernel"], params[layer]["bias"]
      variants = {"dense-numpy": lambda f=dense.layers[layer], a=inp: f(a),
                  "sparse-csr": lambda f=csr.layers[layer], a=inp: f(a)}
      if kernel.ndim == 2:
        jax_layer, inp_t = _jax_dense_layer(kernel, bias), np.ascontiguousarray(inp.T)
        variants["dense-jax"] = lambda f=jax_layer, a=inp_t: f(a)
      timings = time_variants(variants, FLAGS.repeats, FLAGS.sample_seconds)
      density = sizes["leaves"][f"{layer}/kernel"]["density"]
      rows.append(_case_row(f"{name} {layer}", batch, density, timings))
      print(_row_text(rows[-1]), flush=True)
  return rows


def alexnet_cases(batches: list[int], rng) -> list[dict]:
  layers = {}
  for name, k, n, density in ALEXNET_FC:
    mask = rng.random((k, n), dtype=np.float32) < density
    kernel = np.where(mask, rng.standard_normal((k, n), dtype=np.float32) * 0.01, np.float32(0))
    bias = rng.standard_normal(n, dtype=np.float32) * 0.01
    layers[name] = (kernel, bias, float(mask.mean()))
    del mask
  dense = {name: sparse.DenseMatrix(k, b) for name, (k, b, _) in layers.items()}
  csr = {name: sparse.CsrMatrix(k, b, FLAGS.csr_threads or None)
         for name, (k, b, _) in layers.items()}
  torch_layers = ({name: _torch_layer(k, b) for name, (k, b, _) in layers.items()}
                  if _torch_available() else {})
  jax_dense = {name: _jax_dense_layer(k, b) for name, (k, b, _) in layers.items()}
  bcoo = ({name: _jax_bcoo_layer(k, b) for name, (k, b, _) in layers.items()}
          if FLAGS.jax_sparse else {})
  rows = []
  total = sum(k.size for k, _, _ in layers.values())
  kept = sum(k.size * d for k, _, d in layers.values())
  for batch in batches:
    for name, (kernel, _, density) in list(layers.items()) + [("fc6-fc8", (None, None,
                                                                            kept / total))]:
      if name == "fc6-fc8":
        fns = {"dense-numpy": _stack(list(dense.values())),
               "dense-jax": _jax_dense_stack([(k, b) for k, b, _ in layers.values()]),
               "sparse-csr": _stack(list(csr.values()))}
        if bcoo:
          fns["sparse-bcoo"] = _stack(list(bcoo.values()))
        if torch_layers:
          fns["sparse-torch"] = _stack(list(torch_layers.values()))
        width = ALEXNET_FC[0][1]
      else:
        fns = {"dense-numpy": dense[name], "dense-jax": jax_dense[name], "sparse-csr": csr[name]}
        if bcoo:
          fns["sparse-bcoo"] = bcoo[name]
        if torch_layers:
          fns["sparse-torch"] = torch_layers[name]
        width = kernel.shape[0]
      x = np.maximum(rng.standard_normal((batch, width), dtype=np.float32), 0)
      x_t = np.ascontiguousarray(x.T)  # feature-major, as lwc.sparse's matrices take it
      variants = {v: (lambda f=f, a=(x_t if v in ("dense-numpy", "sparse-csr") else x): f(a))
                  for v, f in fns.items()}
      timings = time_variants(variants, FLAGS.repeats, FLAGS.sample_seconds)
      rows.append(_case_row(f"AlexNet {name}", batch, density, timings))
      print(_row_text(rows[-1]), flush=True)
  return rows


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
  sweep = energy.sram_sweep(work, [0.0, FLAGS.sram_kib, 8 * 1024.0, 64 * 1024.0, float("inf")])
  print("\nAlexNet at Table 4 densities (uniformly random masks):\n")
  print(sparse.format_size_table(sizes))
  print(energy.format_energy_table(result))
  print(energy.format_sram_sweep(sweep))
  return {"sizes": sizes, "energy": result, "energy_by_sram": sweep}


def _us(t: dict | None) -> str:
  return "" if t is None else f"{t['median'] * 1e6:,.1f}"


def _row_text(row: dict) -> str:
  t = row["timings"]
  return (f"| {row['case']} | {row['batch']} | {100 * row['density']:.1f}% | "
          f"{_us(t.get('dense-numpy'))} | {_us(t.get('dense-jax'))} | {_us(t['sparse-csr'])} | "
          f"{_us(t.get('sparse-torch'))} | {_us(t.get('sparse-bcoo'))} | {row['speedup']:.2f}x | "
          f"{row['foreign']:.2f} |")


HEADER = ("| case | batch | density | dense-numpy µs | dense-jax µs | sparse-csr µs | "
          "sparse-torch µs | sparse-bcoo µs | speedup (best dense / csr) | foreign |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _json_safe(x):
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _batches(values: list[str]) -> list[int]:
  try:
    batches = [int(b) for b in values]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1:
    raise UserError(f"--batch_sizes: {','.join(values)} is not a list of positive integers")
  return batches


def run() -> None:
  """The benchmark; bad input (flags, export files) raises UserError before anything is timed."""
  batches = _batches(FLAGS.batch_sizes)
  if FLAGS.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.json_out))):
    raise UserError(f"--json_out={FLAGS.json_out}: folder "
                    f"{os.path.dirname(os.path.abspath(FLAGS.json_out))} does not exist")
  if FLAGS.json_out and os.path.isdir(FLAGS.json_out):
    raise UserError(f"--json_out={FLAGS.json_out} is a directory")
  exports = {name: sparse.load(getattr(FLAGS, name)) for name in ("lenet_300_100", "lenet5")
             if getattr(FLAGS, name)}
  machine = common.machine()
  machine.update({"scipy": common.version("scipy"), "numpy": common.version("numpy"),
                  "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")})
  print(f"machine: {json.dumps(machine)}")
  print(HEADER, flush=True)
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  for name, export in exports.items():
    rows += lenet_cases(name, export, batches, rng)
  if FLAGS.alexnet:
    rows += alexnet_cases(batches, rng)
  sizes = alexnet_sizes(rng) if FLAGS.alexnet_sizes else None
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"machine": machine, "rows": rows, "alexnet_sizes": _json_safe(sizes),
                 "flags": {k: getattr(FLAGS, k) for k in (
                     "lenet_300_100", "lenet5", "alexnet", "batch_sizes", "repeats",
                     "sample_seconds", "jax_sparse", "seed")}}, f, indent=1)



def main(argv) -> None:
  run_cli(argv, run)


if __name__ == "__main__":
  app.run(main)
