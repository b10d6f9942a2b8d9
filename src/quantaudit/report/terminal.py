"""Rich tables for the terminal. Each function turns one result dict into one table."""

from __future__ import annotations

from rich.table import Table

from ..quant.formats import FORMATS

_KIND_LABEL = {"int": lambda q: f"int{q.bits}", "fp8": lambda q: "fp8", "fp4": lambda q: "fp4 e2m1"}
_BLOCK_SCALE_LABEL = {"e4m3": "e4m3 scale x fp32 global", "e8m0": "e8m0 scale", "fp32": "fp32 scale"}


def dtype_label(q) -> str:
    """'fp8', 'int4' or 'fp4 e2m1' for a WeightQuant/ActQuant."""
    return _KIND_LABEL[q.kind](q)


def granularity_label(q) -> str:
    """'per channel', or for block formats 'per block of 16 (e4m3 scale x fp32 global)'."""
    b = q.block
    if b is None:
        return f"per {q.granularity}"
    size = f"{b.rows}x{b.size}" if b.rows > 1 else str(b.size)
    return f"per block of {size} ({_BLOCK_SCALE_LABEL[b.scale]})"


def formats_table() -> Table:
    table = Table(title="quantization formats (ModelOpt --qformat names)")
    for col in ("name", "weights", "activations", "algorithm", "TensorRT-LLM quant_algo"):
        table.add_column(col)
    for f in FORMATS.values():
        w = f"{dtype_label(f.weight)} {granularity_label(f.weight)}" if f.weight else "-"
        mode = "dynamic" if f.act and f.act.dynamic else ("dynamic blocks, static global" if f.act and f.act.block else "static")
        a = f"{dtype_label(f.act)} {granularity_label(f.act)} ({mode})" if f.act else "-"
        table.add_row(f.name, w, a, f.algorithm, f.trtllm_quant_algo or "-")
    return table


def _pm(value: float, unc: float | None, fmt: str = ".4f") -> str:
    return f"{value:{fmt}} ± {unc:{fmt}}" if unc is not None else f"{value:{fmt}}"


def perplexity_table(result: dict) -> Table:
    ev = result["eval"]
    table = Table(title=f"{result['model']} on {ev['source']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", _pm(result["ppl"], result["ppl_unc"]))
    table.add_row("tokens scored", f"{result['tokens']:,} ({ev['windows']} windows × ≤{ev['seq_len']}, BOS: {ev['bos']})")
    table.add_row("tokens/s", f"{result['tokens_per_s']:,.0f}")
    return table


def paired_table(stats: dict, title: str) -> Table:
    """llama.cpp's ``--kl-divergence`` summary, one statistic a row."""
    table = Table(title=title)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    kld, rev, dp = stats["kld"], stats["kld_reverse"], stats["delta_p"]
    rows = [
        ("tokens", f"{stats['tokens']:,}"),
        ("PPL(base)", _pm(stats["ppl_base"], stats["ppl_base_unc"])),
        ("PPL(candidate)", _pm(stats["ppl"], stats["ppl_unc"])),
        ("PPL ratio", _pm(stats["ppl_ratio"], stats["ppl_ratio_unc"], ".5f")),
        ("ln(PPL ratio)", _pm(stats["ln_ppl_ratio"], stats["ln_ppl_ratio_unc"], ".5f")),
        ("log-prob correlation", f"{stats['logprob_correlation']:.5f}" if stats["logprob_correlation"] is not None else "-"),
        ("mean KLD(base‖cand)", _pm(kld["mean"], kld["unc"], ".6f")),
    ]
    rows += [(f"  KLD {k}", f"{kld[k]:.6f}") for k in ("max", "p99.9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "p0.1", "min")]
    rows += [
        ("mean KLD(cand‖base)", _pm(rev["mean"], rev["unc"], ".6f")),
        ("  KLD(cand‖base) p99 / max", f"{rev['p99']:.6f} / {rev['max']:.6f}"),
        ("same top-1", f"{100 * stats['top1']:.3f} ± {100 * stats['top1_unc']:.3f} %"),
        ("mean Δp", f"{100 * dp['mean']:.3f} ± {100 * dp['unc']:.3f} %"),
        ("RMS Δp", f"{100 * dp['rms']:.3f} ± {100 * dp['rms_unc']:.3f} %"),
    ]
    rows += [(f"  Δp {k}", f"{100 * dp[k]:.3f} %") for k in ("max", "p99", "p95", "p90", "median", "p10", "p5", "p1", "min")]
    if stats.get("baseline_top_k"):
        rows.append(("baseline kept", f"top-{stats['baseline_top_k']} log-probs + tail bin"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def audit_table(report: dict) -> Table:
    base = report["baseline"]
    table = Table(title=f"audit of {report['model']['name']}: baseline PPL {base['ppl']:.3f}, "
                        f"{base['weight_bytes'] / 2**20:.1f} MiB fp16 weights")
    for col in ("format", "PPL", "PPL ratio", "mean KLD", "KLD p99", "top-1", "RMS Δp", "weights MiB", "×", "verdict"):
        table.add_column(col, justify="left" if col in ("format", "verdict") else "right")
    recommended = report["recommendation"].get("format")
    for f in report["formats"]:
        verdict = "[green]PASS[/green]" if f["passed"] else "[red]FAIL[/red] " + ",".join(
            reason.split()[0] for reason in f["failed"])
        name = f"[bold]{f['name']}[/bold] ★" if f["name"] == recommended else f["name"]
        table.add_row(name, f"{f['ppl']:.3f}", f"{f['ppl_ratio']:.4f}", f"{f['kld']['mean']:.5f}",
                      f"{f['kld']['p99']:.4f}", f"{100 * f['top1']:.2f}%", f"{100 * f['delta_p']['rms']:.2f}%",
                      f"{f['weight_bytes'] / 2**20:.1f}", f"{f['compression']:.2f}", verdict)
    return table


def _text_table(title: str, headers: list[str], rows: list[list[str]]) -> Table | None:
    """Rows of text under ``headers`` (the first column left-aligned, the figures right), or None without rows."""
    if not rows:
        return None
    table = Table(title=title)
    for i, col in enumerate(headers):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def timing_table(report: dict) -> Table | None:
    """Seconds per stage of the audit (report.markdown.timing_rows), or None without timings."""
    from .markdown import timing_rows

    return _text_table("where the time went (seconds)", *timing_rows(report))


def generation_table(report: dict) -> Table | None:
    """--generate results (report.markdown.generation_rows), or None without them."""
    from .markdown import GENERATION_HEADERS, generation_rows

    return _text_table("generation fidelity (greedy, paired with the baseline)", GENERATION_HEADERS,
                       generation_rows(report))


def task_table(summaries: dict) -> Table:
    table = Table(title="task accuracy")
    for col in ("task", "n", "acc", "acc_norm", "BOS"):
        table.add_column(col, justify="left" if col in ("task", "BOS") else "right")
    for name, s in summaries.items():
        norm = _pm(s["acc_norm"], s["acc_norm_stderr"]) if s.get("acc_norm") is not None else "-"
        table.add_row(name, str(s["n"]), _pm(s["acc"], s["acc_stderr"]), norm, s["bos"])
    return table


def task_comparison_table(comparisons: list[dict]) -> Table:
    table = Table(title="task accuracy, candidate vs base (paired)")
    for col in ("task", "n", "acc base", "acc cand", "recovery", "right→wrong", "wrong→right", "McNemar p"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for c in comparisons:
        recovery = f"{c['recovery']:.4f}" if c["recovery"] is not None else "-"
        table.add_row(c["task"], str(c["n"]), f"{c['acc_base']:.4f}", f"{c['acc_quant']:.4f}", recovery,
                      str(c["right_to_wrong"]), str(c["wrong_to_right"]), f"{c['mcnemar_p']:.3g}")
    return table
