"""Export a pruned checkpoint as relative-index sparse storage, with size and energy accounting.

  python -m lwc.export --workdir=DIR --out=FILE.npz [--data_dir=../shared/data/mnist]

Writes FILE.npz (format 2 of docs/sparse_format.md) and FILE.json (sizes per layer and total,
the chosen encoding and index width per layer, overhead next to the paper's 15.6%, compression
by count, by size and by file, energy per inference dense vs pruned, round-trip check, and with
--data_dir the sparse-vs-dense prediction check on the whole test set), and prints the same
tables. Each pruned layer gets the encoding (the paper's filler zeros or escape codes) and index
width of the fewest bytes, unless --encoding / --fc_index_bits / --conv_index_bits fix them.
Bad input: one `error:` line on stderr and exit status 2.

Any Linen or NNX model (not a pipeline workdir): `export_model(out, params, masks, model_state)`
writes the same format with the model's non-parameter collections (BatchNorm statistics, the NNX
state) and checks the read-back bit for bit; `load_model(out)` gives (params, masks, model_state)
back in their tree types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import app
from absl import flags
import numpy as np

from lwc import energy as energy_lib
from lwc import files
from lwc import sparse
from lwc.errors import UserError, run_cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/ (lwc.experiments).",
                      required=True)
  flags.DEFINE_string("out", None, "Export file to write (.npz).", required=True)
  flags.DEFINE_integer("iteration", None, "Checkpoint iteration to export (default: latest).",
                       lower_bound=0)
  flags.DEFINE_integer("fc_index_bits", None,
                       "Relative-index width of FC (2-D) kernels; the paper uses 5. Default: "
                       "chosen per layer to minimise its bytes.",
                       lower_bound=1, upper_bound=sparse.MAX_INDEX_BITS)
  flags.DEFINE_integer("conv_index_bits", None,
                       "Relative-index width of conv (4-D) kernels; the paper uses 8. Default: "
                       "chosen per layer to minimise its bytes.",
                       lower_bound=1, upper_bound=sparse.MAX_INDEX_BITS)
  flags.DEFINE_enum("encoding", "auto", ["auto", *sparse.ENCODINGS],
                    "Long gaps between kept weights: 'filler' (the paper's filler zeros), "
                    "'escape' (an all-ones index code skips, storing no value), or 'auto' (per "
                    "layer, whichever stores fewer bytes).")
  flags.DEFINE_enum("compression", "stored", list(sparse.COMPRESSIONS),
                    "Zip members stored (the file is the accounted payload plus the container) "
                    "or deflated.")
  flags.DEFINE_enum("value_dtype", "float32", list(sparse.VALUE_DTYPES),
                    "Stored dtype of the kept weights (float16 halves the values; the round "
                    "trip is then exact to float16).")
  flags.DEFINE_string("json_out", "", "Where to write the JSON report ('' = OUT with .json).")
  flags.DEFINE_float("sram_kib", 512.0, "On-chip SRAM for the energy estimate, KiB (inf = all "
                     "weights on chip, 0 = all in DRAM); weights that do not fit come from DRAM.",
                     lower_bound=0.0)
  flags.DEFINE_list("sweep_index_bits", [], "Also report each layer's sparse bytes re-encoded "
                    "at these index widths, e.g. 3,4,5,6,7,8 (the file keeps the chosen ones).")
  flags.DEFINE_string("data_dir", None, "If set: folder of the MNIST IDX files; the sparse "
                      "forward pass is then checked against the masked dense model on the whole "
                      "test set.")


@dataclasses.dataclass(frozen=True)
class Restored:
  model: str
  iteration: int
  params: dict  # nested dicts of float32 NumPy arrays
  masks: dict  # same structure, bool
  meta: dict
  model_state: dict = dataclasses.field(default_factory=dict)  # BatchNorm statistics etc.
  network: object = None  # the lwc.network.Network the checkpoint records


def _config_from_meta(meta: dict):
  """The run's pipeline.Config from checkpoint metadata."""
  from lwc import pipeline
  try:
    return pipeline.Config.from_json(dict(meta.get("config", {})))
  except TypeError as e:
    raise UserError(f"checkpoint metadata holds an unusable config ({e})") from None


def _model_fn(restored: Restored):
  """The model function of the run's network, built from what the checkpoint records."""
  import jax

  from lwc import network as network_lib
  return network_lib.build(restored.network, jax.random.PRNGKey(0), abstract=True).model_fn


def restore(workdir: str, iteration: int | None = None) -> Restored:
  """Params, masks and model state of checkpoint `iteration` (default: the latest) of a
  pipeline workdir, the network rebuilt from the checkpoint's own record.

  Raises UserError (nothing on disk is touched) when the workdir holds no checkpoints or not
  that iteration.
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"--workdir={workdir}: no checkpoints/ folder (not a pipeline workdir)")
  import jax  # imported late: bad flags fail in a fraction of a second

  from lwc import checkpoints as ckpt_lib
  from lwc import resume

  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    available = checkpoints.iterations()
    if not available:
      raise UserError(f"--workdir={workdir}: no complete checkpoint")
    if iteration is None:
      iteration = max(available)
    elif iteration not in available:
      raise UserError(f"--iteration={iteration}: {workdir} has iterations "
                      f"{', '.join(map(str, sorted(available)))}")
    meta = checkpoints.meta(iteration)
    state = resume.restore_from(checkpoints, iteration, _config_from_meta(meta))
  finally:
    checkpoints.close()

  def to_np(tree, dtype=None):
    return jax.tree.map(lambda x: np.asarray(x, dtype), dict(tree))
  return Restored(model=meta.get("model"), iteration=iteration,
                  params=to_np(state["params"], np.float32), masks=to_np(state["masks"], bool),
                  meta=meta, model_state=to_np(state.get("model_state", {})),
                  network=state["network"])


def output_positions(restored: Restored) -> dict[str, int]:
  """{layer: output positions per image}: H_out * W_out for conv layers, 1 for dense layers
  (the traced FLOP of each layer over 2 x its weights, lwc.stats)."""
  from lwc import layers as layers_lib
  from lwc import stats

  example = np.zeros((1, *restored.network.input_shape), np.float32)
  flops = stats.layer_flops(_model_fn(restored), restored.params, example,
                            restored.model_state or None)
  sizes = {name: int(np.size(leaf))
           for name, (_, leaf) in layers_lib.prunable_leaves(restored.params).items()}
  return {name: max(1, int(round(flops[name] / (2 * sizes[name])))) if sizes[name] else 1
          for name in flops}


def dense_logits(restored: Restored, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """Logits (N, classes) of the masked dense model (the checkpoint as trained), jitted."""
  import jax

  from lwc import train as train_lib
  fn = _model_fn(restored)
  state = restored.model_state or None
  apply = jax.jit(lambda p, x: train_lib.predict(fn, p, x, state))
  return np.concatenate([np.asarray(apply(restored.params, images[s:s + batch_size]))
                         for s in range(0, len(images), batch_size)])


def check_round_trip(restored: Restored, params: dict, masks: dict, value_dtype: str) -> dict:
  """Compares decoded params/masks with the checkpoint: bit for bit (values at `value_dtype`)."""
  want_p, got_p = sparse.flatten(restored.params), sparse.flatten(params)
  want_m, got_m = sparse.flatten(restored.masks), sparse.flatten(masks)
  bad_params, bad_masks = [], []
  for name, w in want_p.items():
    stored_sparse = sparse.is_sparse_leaf(name, want_m[name])
    expect = w.astype(value_dtype).astype(np.float32) if stored_sparse else w
    if got_p[name].shape != w.shape or not np.array_equal(
        got_p[name].view(np.uint32), np.ascontiguousarray(expect).view(np.uint32)):
      bad_params.append(name)
    if not np.array_equal(got_m[name], want_m[name]):
      bad_masks.append(name)
  return {"params_bit_identical": not bad_params, "masks_identical": not bad_masks,
          "value_dtype": value_dtype, "mismatched": sorted(set(bad_params + bad_masks))}


def _leaf_bits(x) -> tuple[str, tuple, bytes]:
  """(dtype, shape, bytes) of an array leaf; PRNG keys by their implementation and key data."""
  import jax
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return (f"key<{jax.random.key_impl(x)}>", tuple(x.shape),
            np.asarray(jax.random.key_data(x)).tobytes())
  a = np.asarray(x)
  return a.dtype.str, a.shape, np.array(a, copy=True, order="C").tobytes()


def compare_trees(want, got) -> list[str]:
  """Names (`/`-joined paths) of the leaves of `got` that differ from `want` in structure, dtype,
  shape or any bit; [] when the trees are identical ('<structure>' when the structures differ)."""
  import jax
  if jax.tree.structure(want) != jax.tree.structure(got):
    return ["<structure>"]
  bad = []
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    if _leaf_bits(a) != _leaf_bits(b):
      bad.append(jax.tree_util.keystr(path))
  return bad


def _index_bits(fc_index_bits: int | None, conv_index_bits: int | None, encoding: str,
                compression: str, prefix: str = "") -> dict[str, int | str]:
  """{'fc': b or 'auto', 'conv': ...} for sparse.encode_model; UserError for a bad setting."""
  for what, b in (("fc_index_bits", fc_index_bits), ("conv_index_bits", conv_index_bits)):
    if b is not None and not (isinstance(b, int) and not isinstance(b, bool)
                              and 1 <= b <= sparse.MAX_INDEX_BITS):
      raise UserError(f"{prefix}{what}={b}: must be an integer from 1 to {sparse.MAX_INDEX_BITS}"
                      " (or unset: chosen per layer)")
  if encoding not in ("auto", *sparse.ENCODINGS):
    raise UserError(f"{prefix}encoding={encoding}: must be one of auto, "
                    f"{', '.join(sparse.ENCODINGS)}")
  if compression not in sparse.COMPRESSIONS:
    raise UserError(f"{prefix}compression={compression}: must be one of "
                    f"{', '.join(sparse.COMPRESSIONS)}")
  return {"fc": "auto" if fc_index_bits is None else fc_index_bits,
          "conv": "auto" if conv_index_bits is None else conv_index_bits}


def export_model(out: str, params, masks=None, model_state=None, *,
                 fc_index_bits: int | None = None, conv_index_bits: int | None = None,
                 value_dtype: str = "float32", info: dict | None = None, is_prunable=None,
                 encoding: str = "auto", compression: str = "stored") -> dict:
  """Exports any Linen or NNX model (not only a pipeline workdir) to `out` (.npz, the format of
  docs/sparse_format.md): prunable leaves (lwc.layers) sparse, other params dense, `model_state`
  (Linen `{'batch_stats': ...}`, the NNX state in pure form from `lwc.nnx_model`: BatchNorm
  statistics, rng counts and keys) exactly. Reads the file back and checks that params (kept
  weights at `value_dtype`), masks and model state come back bit for bit, in the same tree
  types. Returns the report: file, format_version, sizes (`sparse.size_report`), round_trip.

  Index widths (fc_index_bits, conv_index_bits; None: chosen per leaf) and encoding ('auto',
  'filler', 'escape') as for `python -m lwc.export`; the file is format 2 (`compression`
  'stored' or 'deflated').

  masks None: nothing pruned (all True). Raises UserError for an unusable tree or output path,
  RuntimeError if the read-back differs (not expected).
  """
  import jax

  index_bits = _index_bits(fc_index_bits, conv_index_bits, encoding, compression)
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out) or not os.path.isdir(folder):
    raise UserError(f"{out}: " + ("is a directory" if os.path.isdir(out) else
                                  f"folder {folder} does not exist"))
  params, masks, model_state = jax.device_get((params, masks, model_state))
  if masks is None:
    masks = jax.tree.map(lambda w: np.ones(np.shape(w), bool), params)
  encoded = sparse.encode_model(params, masks, index_bits, value_dtype, info=info,
                                model_state=model_state, is_prunable=is_prunable,
                                encoding=encoding)
  file_bytes = sparse.save(encoded, out, sparse.FORMAT_VERSION, compression)
  loaded = sparse.load(out)
  got_params, got_masks, got_state = loaded.decode_all()
  stored_sparse = {e["name"] for e in loaded.manifest["leaves"] if e["storage"] == "sparse"}

  def expected(path, w):
    w = np.asarray(w, np.float32)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return w.astype(value_dtype).astype(np.float32) if name in stored_sparse else w

  want_params = jax.tree_util.tree_map_with_path(expected, params)
  want_masks = jax.tree.map(lambda m: np.asarray(m, bool), masks)
  round_trip = {"params_bit_identical": not compare_trees(want_params, got_params),
                "masks_identical": not compare_trees(want_masks, got_masks),
                "model_state_bit_identical": (got_state is None if model_state is None else
                                              not compare_trees(model_state, got_state)),
                "value_dtype": value_dtype}
  bad = (compare_trees(want_params, got_params) + compare_trees(want_masks, got_masks) +
         ([] if model_state is None else compare_trees(model_state, got_state)))
  round_trip["mismatched"] = sorted(set(bad))
  if bad:
    raise RuntimeError(f"round trip of {out} differs in {round_trip['mismatched']}")
  return {"file": os.path.abspath(out), "format_version": loaded.format_version,
          "sizes": sparse.size_report(loaded, file_bytes), "round_trip": round_trip}


def load_model(path: str):
  """(params, masks, model_state) of an export (`export_model`, or `python -m lwc.export`:
  model_state None), in the tree types they were exported from. UserError for a bad file."""
  return sparse.load(path).decode_all()


def check_predictions(model_name: str, restored: Restored, params: dict, test) -> dict:
  """Sparse (CSR) forward pass from the export vs the masked dense model, on the whole `test`
  split (`lwc.data.load_dataset`'s second value)."""
  dense = dense_logits(restored, test.images)
  model = sparse.NumpyModel(model_name, params, backend="csr")
  sparse_logits = np.concatenate([model(test.images[s:s + 1000])
                                  for s in range(0, len(test), 1000)])
  dense_pred, sparse_pred = dense.argmax(-1), sparse_logits.argmax(-1)
  return {"examples": len(test), "equal_predictions": int((dense_pred == sparse_pred).sum()),
          "dense_error": float((dense_pred != test.labels).mean()),
          "sparse_error": float((sparse_pred != test.labels).mean()),
          "max_abs_logit_diff": float(np.abs(dense - sparse_logits).max())}


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _check_output(name: str, path: str, workdir: str) -> None:
  """UserError unless `path` (called `name` in the message) can be written: its folder exists, it
  is not a folder, and it is not inside the workdir's checkpoints/ or progress/ (writing there
  would destroy a checkpoint)."""
  if os.path.isdir(path):
    raise UserError(f"{name} is a directory")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"{name}: folder {folder} does not exist")
  real = os.path.realpath(path)
  for sub in ("checkpoints", "progress"):
    guarded = os.path.join(workdir, sub)
    if os.path.commonpath([real, os.path.realpath(guarded)]) == os.path.realpath(guarded):
      raise UserError(f"{name} is inside the workdir's {sub} ({guarded})")


def export(workdir: str, out: str, iteration: int | None = None,
           fc_index_bits: int | None = None, conv_index_bits: int | None = None,
           value_dtype: str = "float32", sram_kib: float = 512.0,
           data_dir: str | None = None, json_out: str = "",
           sweep_index_bits: tuple[int, ...] = (), encoding: str = "auto",
           compression: str = "stored") -> dict:
  """Restores, encodes, writes `out`, reads it back, checks it; returns the JSON report.

  fc_index_bits / conv_index_bits None: each layer's width is chosen to minimise its bytes;
  encoding 'auto': each layer's encoding too (see sparse.best_encoding).
  """
  index_bits = _index_bits(fc_index_bits, conv_index_bits, encoding, compression, "--")
  for b in sweep_index_bits:
    if not 1 <= b <= sparse.MAX_INDEX_BITS:
      raise UserError(f"--sweep_index_bits: {b} is outside 1..{sparse.MAX_INDEX_BITS}")
  if data_dir and not os.path.isdir(data_dir):
    raise UserError(f"--data_dir={data_dir}: no such directory")
  _check_output(f"--out={out}", out, workdir)
  json_path = json_out or os.path.splitext(out)[0] + ".json"
  json_name = f"--json_out={json_out}" if json_out else f"the report {json_path} (from --out)"
  _check_output(json_name, json_path, workdir)
  if os.path.realpath(json_path) == os.path.realpath(out):
    raise UserError(f"{json_name} is the same file as --out={out}")
  test = None
  if data_dir:  # read (and validated) before anything is written
    from lwc.data import load_dataset

    _, test = load_dataset("mnist", data_dir, download=False)
  restored = restore(workdir, iteration)
  t0 = time.perf_counter()
  encoded = sparse.encode_model(
      restored.params, restored.masks, index_bits, value_dtype, encoding=encoding,
      info={"model": restored.model, "network": restored.network.to_json(),
            "source": {"workdir": os.path.abspath(workdir), "iteration": restored.iteration}},
      model_state=restored.model_state or None)
  file_bytes = sparse.save(encoded, out, sparse.FORMAT_VERSION, compression)
  encode_seconds = time.perf_counter() - t0
  loaded = sparse.load(out)
  params, masks = loaded.decode()
  round_trip = check_round_trip(restored, params, masks, value_dtype)
  if not (round_trip["params_bit_identical"] and round_trip["masks_identical"]):
    raise RuntimeError(f"round trip of {out} differs from the checkpoint in "
                       f"{round_trip['mismatched']}")
  sizes = sparse.size_report(loaded, file_bytes)
  uses = output_positions(restored)
  work = energy_lib.work_from_sizes(sizes["leaves"], uses)
  energy = energy_lib.estimate(work, sram_kib * 1024)
  sram_kibs = sorted({0.0, float(sram_kib), math.inf})
  report = {"file": os.path.abspath(out), "model": restored.model,
            "workdir": os.path.abspath(workdir), "iteration": restored.iteration,
            "settings": {"fc_index_bits": index_bits["fc"], "conv_index_bits": index_bits["conv"],
                         "encoding": encoding, "compression": compression,
                         "value_dtype": value_dtype, "sram_kib": sram_kib},
            "format_version": loaded.format_version, "sizes": sizes,
            "chosen": chosen_encodings(loaded),
            "output_positions": uses, "energy": energy,
            "energy_by_sram": energy_lib.sram_sweep(work, sram_kibs), "round_trip": round_trip,
            "encode_seconds": encode_seconds}
  if sweep_index_bits:
    report["index_width_sweep"] = sparse.index_width_sweep(loaded, list(sweep_index_bits))
  if test is not None and restored.model in ("lenet_300_100", "lenet5"):
    report["predictions"] = check_predictions(restored.model, restored, params, test)
  elif test is not None:
    report["predictions"] = {"skipped": "the NumPy sparse forward pass covers the LeNets; "
                                        f"{restored.model} is checked by its round trip"}
  files.atomic_write_json(json_path, _json_safe(report), indent=1)
  report["json"] = json_path
  return report


def chosen_encodings(loaded: sparse.Export) -> dict[str, dict]:
  """{sparse leaf: {'encoding', 'index_bits'}} as written (the manifest's choice per layer)."""
  return {e["name"]: {"encoding": e["encoding"], "index_bits": e["index_bits"]}
          for e in loaded.manifest["leaves"] if e["storage"] == "sparse"}


def describe(report: dict) -> str:
  """The printed summary: size table, energy table, round trip, predictions."""
  settings = report.get("settings", {})
  how = (f"encoding {settings.get('encoding', 'filler')}, index bits fc "
         f"{settings.get('fc_index_bits')} / conv {settings.get('conv_index_bits')}, "
         f"{settings.get('compression', 'stored')}")
  lines = [f"{report['model']} iteration {report['iteration']} -> {report['file']} "
           f"(format {report['format_version']}; {how})", "",
           sparse.format_size_table(report["sizes"]),
           energy_lib.format_energy_table(report["energy"]),
           "energy per inference by on-chip SRAM size:", "",
           energy_lib.format_sram_sweep(report["energy_by_sram"])]
  if "index_width_sweep" in report:
    lines += ["sparse bytes by index width (each layer in its own encoding):", "",
              sparse.format_sweep_table(report["index_width_sweep"])]
  rt = report["round_trip"]
  against = ("the checkpoint" if rt["value_dtype"] == "float32" else
             f"the checkpoint with kept weights rounded to {rt['value_dtype']}")
  lines.append(f"round trip: params bit-identical to {against}: {rt['params_bit_identical']}; "
               f"masks identical: {rt['masks_identical']}")
  if "predictions" in report:
    p = report["predictions"]
    lines.append(f"predictions: sparse == dense on {p['equal_predictions']}/{p['examples']} "
                 f"test images; error dense {100 * p['dense_error']:.2f}% sparse "
                 f"{100 * p['sparse_error']:.2f}%; max |logit diff| "
                 f"{p['max_abs_logit_diff']:.2e}")
  lines.append(f"report: {report['json']}")
  return "\n".join(lines)


def _ints(values: list[str], what: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UserError(f"{what}: {','.join(values)} is not a list of integers") from None


def main(argv) -> None:
  def run():
    sweep = tuple(_ints(FLAGS.sweep_index_bits, "--sweep_index_bits"))
    return export(FLAGS.workdir, FLAGS.out, FLAGS.iteration, FLAGS.fc_index_bits,
                  FLAGS.conv_index_bits, FLAGS.value_dtype, FLAGS.sram_kib, FLAGS.data_dir,
                  FLAGS.json_out, sweep, FLAGS.encoding, FLAGS.compression)

  print(describe(run_cli(argv, run)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
