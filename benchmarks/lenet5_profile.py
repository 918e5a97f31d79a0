"""Where the LeNet-5 train step spends its time on XLA:CPU, and what makes it faster.

Three modes, on the masked train step of lwc.train (batch 100, SGD momentum, L2, all-ones
masks, random data: speed does not depend on the values):

  --mode=ops: runs the step under jax.profiler and sums the time of every XLA thunk (fusion,
    convolution, dot, YNNPACK fusion) over both worker threads, per step, with the HLO op it
    computes. Thread time, not wall time: it adds up the work of both cores. Eigen convolutions
    run asynchronously on their own thread pool and show up with a fraction of their cost.
  --mode=variants: wall milliseconds per step (median of --repeats samples of --steps steps,
    `float(loss)` after every call as the pipeline does) for model variants with the very same
    parameters (names, shapes, initial values), and for several steps per call:
      lwc            lwc.models.lenet.LeNet5 as it is (conv_valid, reshape-and-max pool)
      lax_conv       lax convolutions differentiated by JAX, reshape-and-max pool (what
                     LeNet5 was before conv_valid); the variants below change one thing of it:
      flax_pool      nn.max_pool (reduce_window; select_and_scatter backward)
      reshape_pool   the reshape-and-max 2x2 pool (= lax_conv)
      slice_pool     the 2x2 pool as the maximum of four strided slices
      nchw           lax convolutions with NCHW dimension numbers
      conv3d         each conv as a 3-D convolution with a unit third spatial dimension
                     (XLA's YNNPACK path takes 2-D convolutions only)
      im2col         each conv as 25 shifted slices stacked, then one matmul, autodiff
      im2col_vjp     im2col forward, custom backward: patches^T @ g, col2im(g @ kernel^T)
      dx_col2im      lax forward and kernel gradient, input gradient as col2im(g @ kernel^T)
      patches        each conv as lax.conv_general_dilated_patches, then one matmul
    `--per_call=1,4` times 1 step per call (lwc.train.train_steps, as the pipeline) and K steps
    per call both as lwc.train.train_steps (lax.scan) and unrolled (a Python loop under jit).

  --mode=convs: wall milliseconds (median of --repeats x 10 calls) of each convolution of the
    step alone, jitted, at batch 100: forward, kernel gradient, input gradient (conv2 only;
    conv1's input is the image), and of the two 2x2 poolings forward + backward.

--xla_flags=A,B runs the whole measurement again in a subprocess for each XLA_FLAGS value
(`none` = no flags), e.g. --xla_flags=none,--xla_cpu_experimental_ynn_fusion_type=

  python -m benchmarks.lenet5_profile --mode=variants --variants=lwc,slice_pool
  python -m benchmarks.lenet5_profile --mode=ops --top=25
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "variants", ["variants", "ops", "convs"],
                  "What to measure (see docstring).")
flags.DEFINE_list("variants", ["lwc"], "Model variants (see docstring).")
flags.DEFINE_list("per_call", ["1"], "Steps per call to time (K > 1: scanned and unrolled).")
flags.DEFINE_bool("forward", False, "variants mode: also time the forward pass alone (loss of "
                  "one batch, jitted, no gradient).")
flags.DEFINE_integer("steps", 40, "Steps per timed sample (variants) or profiled steps (ops).")
flags.DEFINE_integer("repeats", 7, "Timed samples per variant; the median is reported.")
flags.DEFINE_integer("top", 30, "ops mode: rows of the table.")
flags.DEFINE_list("xla_flags", [], "Run once per XLA_FLAGS value in a subprocess ('none' = "
                  "unset). Empty: run here with the environment as it is.")


def _sweep() -> None:
  """Runs this script once per --xla_flags value, with XLA_FLAGS set before JAX starts."""
  args = [a for a in sys.argv[1:] if not a.startswith("--xla_flags")]
  for value in FLAGS.xla_flags:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if value != "none":
      env["XLA_FLAGS"] = value
    print(f"=== XLA_FLAGS={env.get('XLA_FLAGS', '')}", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.lenet5_profile", *args], env=env,
                   check=True)


def _models():
  """Name -> LeNet-5 module; every one has lwc's parameter tree and computes the same function."""
  import flax.linen as nn
  import jax.numpy as jnp
  from jax import lax

  from lwc.models import lenet

  dn = ("NHWC", "HWIO", "NHWC")

  def conv_lax(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=dn)

  def conv_nchw(x, k):
    y = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), k, (1, 1), "VALID",
                                 dimension_numbers=("NCHW", "HWIO", "NCHW"))
    return y.transpose(0, 2, 3, 1)

  def conv_im2col(x, k):
    kh, kw, ci, co = k.shape
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    cols = jnp.stack([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], 3)
    return (cols.reshape(n * ho * wo, kh * kw * ci) @ k.reshape(-1, co)).reshape(n, ho, wo, co)

  def conv_patches(x, k):  # patches are ordered (c, i, j)
    kh, kw, ci, co = k.shape
    p = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "VALID", dimension_numbers=dn)
    return p @ k.transpose(2, 0, 1, 3).reshape(ci * kh * kw, co)

  def conv_3d(x, k):  # a unit third spatial dimension: XLA's YNNPACK path takes 2-D convs only
    y = lax.conv_general_dilated(x[:, :, :, None, :], k[:, :, None], (1, 1, 1), "VALID",
                                 dimension_numbers=("NHWDC", "HWDIO", "NHWDC"))
    return y[:, :, :, 0, :]

  def pool_slices(x):
    return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                       jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))

  def pool_reshape(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  def pool_flax(x):
    return nn.max_pool(x, (2, 2), (2, 2))

  class Conv(nn.Module):
    features: int
    conv: object

    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.lecun_normal(),
                     (5, 5, x.shape[-1], self.features))
      b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      return self.conv(x, k) + b

  class Variant(nn.Module):
    conv: object = conv_lax
    pool: object = pool_reshape

    @nn.compact
    def __call__(self, x, train=False):
      del train
      x = self.pool(Conv(20, self.conv, name="conv1")(x))
      x = self.pool(Conv(50, self.conv, name="conv2")(x))
      x = nn.relu(nn.Dense(500, name="fc1")(x.reshape(x.shape[0], -1)))
      return nn.Dense(10, name="fc2")(x)

  return {"lwc": lenet.LeNet5(), "lax_conv": Variant(), "flax_pool": Variant(pool=pool_flax),
          "reshape_pool": Variant(pool=pool_reshape), "slice_pool": Variant(pool=pool_slices),
          "im2col": Variant(conv=conv_im2col), "patches": Variant(conv=conv_patches),
          "nchw": Variant(conv=conv_nchw), "conv3d": Variant(conv=conv_3d),
          "im2col_vjp": Variant(conv=_im2col_vjp()), "dx_col2im": Variant(conv=_dx_col2im_vjp())}


def _patches(x, kh, kw):
  """(N, H, W, C) -> (N*Ho*Wo, kh*kw*C), columns ordered (i, j, c) like an HWIO kernel's rows."""
  import jax.numpy as jnp
  n, h, w, c = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  cols = jnp.stack([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], 3)
  return cols.reshape(n * ho * wo, kh * kw * c)


def _col2im(dp, kh, kw):
  """Adjoint of _patches: (N, Ho, Wo, kh, kw, C) -> (N, Ho+kh-1, Wo+kw-1, C), rows then columns."""
  import jax.numpy as jnp
  pad = lambda a, hw: jnp.pad(a, ((0, 0), hw[0], hw[1], (0, 0)))
  rows = [sum(pad(dp[:, :, :, i, j], ((0, 0), (j, kw - 1 - j))) for j in range(kw))
          for i in range(kh)]
  return sum(pad(rows[i], ((i, kh - 1 - i), (0, 0))) for i in range(kh))


def _im2col_vjp():
  """Conv with a custom VJP: forward as patches @ kernel (patches kept), d kernel = patches^T @ g,
  d x = col2im(g @ kernel^T). Plain lax convolution when not differentiated."""
  import jax
  from jax import lax

  @jax.custom_vjp
  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def fwd(x, k):
    kh, kw, _, co = k.shape
    n, h, w, _ = x.shape
    p = _patches(x, kh, kw)
    return (p @ k.reshape(-1, co)).reshape(n, h - kh + 1, w - kw + 1, co), (p, k)

  def bwd(res, g):
    p, k = res
    kh, kw, ci, co = k.shape
    g2 = g.reshape(-1, co)
    dp = (g2 @ k.reshape(-1, co).T).reshape(*g.shape[:3], kh, kw, ci)
    return _col2im(dp, kh, kw), (p.T @ g2).reshape(k.shape)

  conv.defvjp(fwd, bwd)
  return conv


def _dx_col2im_vjp():
  """Conv with a custom VJP: lax forward and d kernel, d x = col2im(g @ kernel^T) (no padded
  full convolution)."""
  import jax
  from jax import lax

  def lax_conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.custom_vjp
  def conv(x, k):
    return lax_conv(x, k)

  def bwd(res, g):
    x, k = res
    kh, kw, ci, co = k.shape
    dk = jax.vjp(lambda k: lax_conv(x, k), k)[1](g)[0]
    dp = (g.reshape(-1, co) @ k.reshape(-1, co).T).reshape(*g.shape[:3], kh, kw, ci)
    return _col2im(dp, kh, kw), dk

  conv.defvjp(lambda x, k: (lax_conv(x, k), (x, k)), bwd)
  return conv


def _setup(model):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from lwc import masks as masks_lib
  from lwc import optim
  from lwc import train as train_lib

  parallel = train_lib.Parallel.over_local_devices()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  tx = optim.masked(optax.sgd(0.01, momentum=0.9), "l2", 5e-4)
  state = parallel.replicate(train_lib.TrainState.create(
      model.apply, jax.tree.map(np.array, params), masks_lib.init_masks(params), tx))
  rng = np.random.default_rng(0)
  images = parallel.replicate(jnp.asarray(rng.random((60000, 28, 28, 1), np.float32)))
  labels = parallel.replicate(jnp.asarray(rng.integers(0, 10, 60000).astype(np.int32)))
  batches = rng.integers(0, 60000, (FLAGS.steps, 100)).astype(np.int32)
  return parallel, params, state, images, labels, batches


def _unrolled_fn(parallel):
  """K steps in one call as a Python loop under jit (no lax.scan), same step as lwc.train."""
  import functools

  import jax

  from lwc import train as train_lib

  def steps(state, images, labels, batch_indices, rng):
    for k in range(batch_indices.shape[0]):
      state, metrics = train_lib.train_steps(state, images, labels, batch_indices[k:k + 1], rng,
                                             batch_sharding=parallel.batch)
    return state, metrics

  del functools
  return jax.jit(steps, donate_argnums=0)


def _forward_only(name, model, params, images, labels, batches) -> None:
  import statistics

  import jax

  from benchmarks import common
  from lwc import train as train_lib

  @jax.jit
  def loss(params, idx):
    return train_lib.cross_entropy(model.apply({"params": params}, images[idx]), labels[idx])

  times = []
  for sample in range(FLAGS.repeats + 1):
    with common.Watch() as w:
      for start in range(FLAGS.steps):
        float(loss(params, batches[start]))
    if sample:
      times.append(1e3 * w.seconds / FLAGS.steps)
  print(json.dumps({"variant": name, "forward_only_ms_median": round(statistics.median(times), 2),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)


def variants() -> None:
  import statistics

  import jax
  import jax.numpy as jnp

  from benchmarks import common

  models = _models()
  x = jnp.asarray(jax.random.uniform(jax.random.PRNGKey(3), (100, 28, 28, 1)))
  ref_model = models["lwc"]
  ref_params = ref_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  ref = ref_model.apply({"params": ref_params}, x)
  for name in FLAGS.variants:
    model = models[name]
    parallel, params, state, images, labels, batches = _setup(model)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, ref_params))
    diff = float(jnp.abs(model.apply({"params": params}, x) - ref).max())
    if FLAGS.forward:
      _forward_only(name, model, params, images, labels, batches)
    for per_call in (int(k) for k in FLAGS.per_call):
      kinds = [("scan" if per_call > 1 else "call", parallel.train_steps_fn())]
      if per_call > 1:
        kinds.append(("unrolled", _unrolled_fn(parallel)))
      for kind, fn in kinds:
        rng = jax.random.PRNGKey(1)
        times, foreign, cpu = [], [], []
        for sample in range(FLAGS.repeats + 1):  # sample 0: compilation and warm-up
          with common.Watch() as w:
            for start in range(0, FLAGS.steps - per_call + 1, per_call):
              chunk = parallel.shard_indices(batches[start:start + per_call])
              state, metrics = fn(state, images, labels, chunk, rng)
              float(metrics["loss"])
          if sample:
            times.append(1e3 * w.seconds / (FLAGS.steps // per_call * per_call))
            foreign.append(w.foreign)
            cpu.append(1e3 * w.cpu_seconds / (FLAGS.steps // per_call * per_call))
        print(json.dumps({
            "variant": name, "steps_per_call": per_call, "kind": kind,
            "ms_per_step_median": round(statistics.median(times), 2),
            "ms_per_step_min": round(min(times), 2),
            "epoch_seconds_at_median": round(0.6 * statistics.median(times), 2),
            "cpu_ms_per_step_median": round(statistics.median(cpu), 2),
            "other_processes_cpu_median": round(statistics.median(foreign), 2),
            "same_params": same, "max_logit_diff_vs_lwc": diff,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)


def ops() -> None:
  import jax
  from jax._src.lib import _profile_data

  model = _models()[FLAGS.variants[0]]
  parallel, _, state, images, labels, batches = _setup(model)
  fn = parallel.train_steps_fn()
  rng = jax.random.PRNGKey(1)
  chunk = parallel.shard_indices(batches[:1])
  hlo = fn.lower(state, images, labels, chunk, rng).compile().as_text().split("ENTRY")[-1]
  what = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
    if m:
      op = re.search(r'op_name="([^"]+)"', line)
      what[m.group(1)] = (m.group(2), op.group(1).replace("jit(train_steps)/", "") if op else "")
  for _ in range(3):
    state, metrics = fn(state, images, labels, chunk, rng)
    float(metrics["loss"])
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for start in range(FLAGS.steps):
      state, metrics = fn(state, images, labels, parallel.shard_indices(batches[start:start + 1]),
                          rng)
      float(metrics["loss"])
    jax.profiler.stop_trace()
    space = _profile_data.ProfileData.from_file(
        glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  total = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if "Eigen" not in line.name and "PjRtCpuClient" not in line.name:
        continue  # XLA's worker threads only
      for event in line.events:
        if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          total[event.name] += event.duration_ns / 1e6 / FLAGS.steps
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} variant={FLAGS.variants[0]}: "
        f"thunks {sum(total.values()):.2f} ms/step (both threads)")
  for name, ms in total.most_common(FLAGS.top):
    shape, op = what.get(name, ("", ""))
    print(f"{ms:7.3f} ms  {name:28s} {shape:32s} {op[:80]}")


def convs() -> None:
  import statistics

  import jax
  import numpy as np
  from jax import lax

  from benchmarks import common
  from lwc.models import lenet

  rng = np.random.default_rng(0)
  arr = lambda *shape: jax.numpy.asarray(rng.standard_normal(shape), np.float32)

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def timed(label, fn, *args):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    samples, foreign = [], []
    for _ in range(FLAGS.repeats):
      with common.Watch() as w:
        for _ in range(10):
          jax.block_until_ready(fn(*args))
      samples.append(w.seconds / 10 * 1e3)
      foreign.append(w.foreign)
    print(json.dumps({"op": label, "ms_median": round(statistics.median(samples), 3),
                      "ms_min": round(min(samples), 3),
                      "other_processes_cpu_median": round(statistics.median(foreign), 2),
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)

  for name, x, k in (("conv1", arr(100, 28, 28, 1), arr(5, 5, 1, 20)),
                     ("conv2", arr(100, 12, 12, 20), arr(5, 5, 20, 50))):
    g = arr(*conv(x, k).shape)
    timed(f"{name} forward", conv, x, k)
    timed(f"{name} kernel gradient", lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g), x, k, g)
    if name == "conv2":
      timed(f"{name} input gradient", lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g),
            x, k, g)
  for name, y in (("pool1", arr(100, 24, 24, 20)), ("pool2", arr(100, 8, 8, 50))):
    g = arr(y.shape[0], y.shape[1] // 2, y.shape[2] // 2, y.shape[3])
    timed(f"{name} forward+backward", lambda y, g: jax.vjp(lenet.max_pool_2x2, y)[1](g), y, g)


def main(argv):
  del argv
  if FLAGS.xla_flags:
    _sweep()
  elif FLAGS.mode == "variants":
    variants()
  elif FLAGS.mode == "convs":
    convs()
  else:
    ops()


if __name__ == "__main__":
  app.run(main)
