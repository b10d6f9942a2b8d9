"""Rich tables for the terminal. Each function turns one result dict into one table."""

from __future__ import annotations

from rich.table import Table

from ..quant.formats import FORMATS


def dtype_label(q) -> str:
    """'fp8' or 'int4' for a WeightQuant/ActQuant."""
    return "fp8" if q.kind == "fp8" else f"int{q.bits}"


def formats_table() -> Table:
    table = Table(title="quantization formats (ModelOpt --qformat names)")
    for col in ("name", "weights", "activations", "algorithm", "TensorRT-LLM quant_algo"):
        table.add_column(col)
    for f in FORMATS.values():
        w = f"{dtype_label(f.weight)} per {f.weight.granularity}" if f.weight else "-"
        a = f"{dtype_label(f.act)} per {f.act.granularity} ({'dynamic' if f.act.dynamic else 'static'})" if f.act else "-"
        table.add_row(f.name, w, a, f.algorithm, f.trtllm_quant_algo or "-")
    return table
