"""Energy per inference, dense vs pruned, from the 45 nm table the paper cites (its Figure 1,
Horowitz): 32-bit DRAM read 640 pJ, 32-bit SRAM read 5 pJ, 32-bit float multiply 3.7 pJ, 32-bit
float add 0.9 pJ.

Model (one inference, batch 1), per layer:
* Weight storage is read once per inference in 32-bit words: dense = one word per weight; pruned
  = the stored bits (values, relative indices, fillers, zero_kept) / 32, rounded up. Biases are
  dense words in both. A conv weight is read once and reused at every output position.
* Where the words live: the on-chip SRAM (`sram_bytes`) is filled with the layers' words in
  forward order (weights, then bias, layer by layer); whatever does not fit is read from DRAM.
* Arithmetic: one multiply and one add per connection use: dense = weights x output positions;
  pruned = stored entries x output positions (fillers are counted as work: a simple decoder
  multiplies them by their 0.0 value) - plus one add per output for the bias.
Not counted: activations' memory traffic, index decoding logic, control, nonlinearities, pooling.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math

from lwc import layers as layers_lib

# pJ per 32-bit operation, 45 nm (the paper's Figure 1, from Horowitz).
ENERGY_PJ = {"dram_read": 640.0, "sram_read": 5.0, "fmul": 3.7, "fadd": 0.9}


@dataclasses.dataclass(frozen=True)
class LayerWork:
  """What one inference does with one layer.

  weights: dense kernel entries; entries: stored entries when pruned (kept + fillers);
  uses: times each weight is used (output positions: 1 for FC, H_out * W_out for conv);
  outputs: output units (bias entries); sparse_bits: stored bits of the pruned kernel.
  """

  name: str
  weights: int
  entries: int
  uses: int
  outputs: int
  sparse_bits: int


def _words(bits: int) -> int:
  return (bits + 31) // 32


def _variant(layers: list[LayerWork], sram_words: int, pruned: bool,
             table: Mapping[str, float]) -> dict:
  rows, free = {}, sram_words
  for layer in layers:
    kernel_words = _words(layer.sparse_bits) if pruned else layer.weights
    words = kernel_words + layer.outputs
    in_sram = min(words, free)
    free -= in_sram
    macs = (layer.entries if pruned else layer.weights) * layer.uses
    bias_adds = layer.outputs * layer.uses
    memory = in_sram * table["sram_read"] + (words - in_sram) * table["dram_read"]
    arithmetic = macs * (table["fmul"] + table["fadd"]) + bias_adds * table["fadd"]
    rows[layer.name] = {"words": words, "sram_words": in_sram, "dram_words": words - in_sram,
                        "macs": macs, "memory_pj": memory, "arithmetic_pj": arithmetic,
                        "total_pj": memory + arithmetic}
  total = {k: sum(r[k] for r in rows.values()) for k in ("words", "sram_words", "dram_words",
                                                         "macs", "memory_pj", "arithmetic_pj",
                                                         "total_pj")}
  return {"layers": rows, "total": total}


def estimate(layers: list[LayerWork], sram_bytes: float,
             table: Mapping[str, float] = ENERGY_PJ) -> dict:
  """Energy per inference (pJ), dense vs pruned, for on-chip SRAM of `sram_bytes` (inf = all).

  Returns {'sram_bytes', 'table_pj', 'dense': {...}, 'pruned': {...}, 'ratio'}: each variant has
  per-layer and total words read (SRAM / DRAM), MACs, memory, arithmetic and total pJ; ratio is
  dense total / pruned total.
  """
  if not sram_bytes >= 0:
    raise ValueError(f"sram_bytes must be >= 0, got {sram_bytes}")
  sram_words = math.inf if math.isinf(sram_bytes) else int(sram_bytes) // 4
  dense = _variant(layers, sram_words, pruned=False, table=table)
  pruned = _variant(layers, sram_words, pruned=True, table=table)
  return {"sram_bytes": sram_bytes, "table_pj": dict(table), "dense": dense, "pruned": pruned,
          "ratio": dense["total"]["total_pj"] / pruned["total"]["total_pj"]}


def _leaf_path(name: str) -> tuple[str, ...]:
  """'fc1/kernel' (a `lwc.sparse` leaf name) as the path `lwc.layers` names layers by."""
  return tuple(name.split("/"))


def work_from_sizes(leaves: Mapping[str, dict], uses: Mapping[str, int]) -> list[LayerWork]:
  """LayerWork per sparse (pruned) leaf from `lwc.sparse.size_report(...)['leaves']`.

  Layers are named by `lwc.layers.layer_name` (`fc1` for 'fc1/kernel', `embed` for
  'embed/embedding'); uses: {layer: output positions} (missing layers: 1; `uses_from_flops`
  derives them for any model). Bias sizes come from the layer's leaf named `bias`.
  """
  biases = {}
  for name, row in leaves.items():
    if layers_lib.leaf_name(_leaf_path(name)) == "bias":
      biases[layers_lib.layer_name(_leaf_path(name))] = row["weights"]
  out = []
  for name, row in leaves.items():
    if row["storage"] != "sparse":
      continue
    layer = layers_lib.layer_name(_leaf_path(name))
    out.append(LayerWork(name=layer, weights=row["weights"], entries=row["entries"],
                         uses=int(uses.get(layer, 1)), outputs=biases.get(layer, 0),
                         sparse_bits=row["sparse_bits"]))
  return out


def uses_from_flops(flops: Mapping[str, int], weights: Mapping[str, int]) -> dict[str, int]:
  """{layer: times each weight is used per inference} from `lwc.stats.layer_flops` (2 FLOP per
  multiply-add) and the layers' weight counts: output positions for a convolution, 1 for a dense
  layer, the sequence length for an attention projection, 0 for an embedding lookup."""
  return {name: int(round(flops[name] / (2 * weights[name]))) if weights.get(name) else 0
          for name in flops}


def format_energy_table(result: dict) -> str:
  """Markdown: per layer and total, dense vs pruned energy (nJ) and where the words come from."""
  def nj(pj):
    return f"{pj / 1000:,.1f}"
  sram = result["sram_bytes"]
  sram_text = "unlimited" if math.isinf(sram) else f"{sram / 1024:,.0f} KiB"
  lines = [f"SRAM {sram_text}; pJ per 32-bit op: {result['table_pj']}", "",
           ("| layer | dense words (SRAM/DRAM) | dense memory nJ | dense arith nJ | dense nJ | "
            "pruned words (SRAM/DRAM) | pruned memory nJ | pruned arith nJ | pruned nJ | "
            "dense/pruned |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  names = list(result["dense"]["layers"]) + ["total"]
  for name in names:
    d = result["dense"]["total" if name == "total" else "layers"]
    p = result["pruned"]["total" if name == "total" else "layers"]
    d, p = (d, p) if name == "total" else (d[name], p[name])
    lines.append(
        f"| {name} | {d['sram_words']:,}/{d['dram_words']:,} | {nj(d['memory_pj'])} | "
        f"{nj(d['arithmetic_pj'])} | {nj(d['total_pj'])} | {p['sram_words']:,}/"
        f"{p['dram_words']:,} | {nj(p['memory_pj'])} | {nj(p['arithmetic_pj'])} | "
        f"{nj(p['total_pj'])} | {d['total_pj'] / p['total_pj']:.1f}x |")
  return "\n".join(lines) + "\n"


def sram_sweep(layers: list[LayerWork], sram_kibs: list[float],
               table: Mapping[str, float] = ENERGY_PJ) -> list[dict]:
  """Totals per SRAM size: [{'sram_kib', 'dense_pj', 'pruned_pj', 'ratio', ...}]."""
  rows = []
  for kib in sram_kibs:
    r = estimate(layers, kib * 1024, table)
    d, p = r["dense"]["total"], r["pruned"]["total"]
    rows.append({"sram_kib": kib, "dense_pj": d["total_pj"], "pruned_pj": p["total_pj"],
                 "dense_memory_pj": d["memory_pj"], "pruned_memory_pj": p["memory_pj"],
                 "dense_dram_words": d["dram_words"], "pruned_dram_words": p["dram_words"],
                 "ratio": r["ratio"]})
  return rows


def format_sram_sweep(rows: list[dict]) -> str:
  """Markdown: total energy per inference (nJ), dense vs pruned, for each SRAM size."""
  lines = [("| on-chip SRAM | dense nJ (memory) | pruned nJ (memory) | "
            "DRAM words dense / pruned | dense / pruned |"), "|---|---:|---:|---:|---:|"]
  for r in rows:
    kib = r["sram_kib"]
    label = "unlimited" if math.isinf(kib) else f"{kib:g} KiB"
    lines.append(f"| {label} | {r['dense_pj'] / 1000:,.1f} ({r['dense_memory_pj'] / 1000:,.1f}) | "
                 f"{r['pruned_pj'] / 1000:,.1f} ({r['pruned_memory_pj'] / 1000:,.1f}) | "
                 f"{r['dense_dram_words']:,} / {r['pruned_dram_words']:,} | {r['ratio']:.1f}x |")
  return "\n".join(lines) + "\n"
