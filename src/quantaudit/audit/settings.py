"""Audit settings: every knob of ``quantaudit audit``, with its default, in one light module.

Kept free of torch imports so ``quantaudit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..quant.formats import KV_SCALES, get_format, get_kv_cache_format
from ..quant.gptq import SCALE_SEARCHES
from .budget import DEFAULT_BUDGET, Limit, parse_budget

DEFAULT_FORMATS = ("fp8", "int8_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq")
STREAMING_MODES = ("auto", "on", "off")


@dataclass
class AuditSettings:
    model: str = "smollm2-135m"
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    kv_cache: str = "none"
    kv_scales: str = "shared"  # quant.formats.KV_SCALES
    calib: str | None = None
    calib_size: int = 32
    calib_seq: int = 512
    eval: str | None = None
    windows: int | None = 16
    seq_len: int = 512
    bos: str = "auto"
    group_size: int = 128
    exclude: list[str] = field(default_factory=list)
    include_lm_head: bool = False
    smoothquant_alpha: float | str = 0.5  # or "search" (quant.smoothquant)
    act_order: bool = True  # GPTQ (quant.gptq: llm-compressor's actorder="static")
    gptq_scale: str = "mse"  # GPTQ group scales: MSE-searched shrink of amax, or plain amax
    plan: str | None = None  # a mixed-precision plan file (quant.plan), audited next to the formats
    budget: str = DEFAULT_BUDGET
    top_k: int | None = None  # None: exact full-vocabulary baseline (quantaudit.baseline); K: top-K lower bound
    drift_windows: int = 2
    # decoder: one replay per decoder layer (30 on SmolLM2); linear: one per linear layer (210 on
    # SmolLM2, ~4 min a format on 2 CPU cores, bench/bench_audit.py), opt-in for a finer ranking
    sensitivity: str = "decoder"  # linear | decoder | none
    sensitivity_windows: int = 1
    batch_size: int | None = None
    device: str = "cpu"
    # on: one decoder layer at a time from the safetensors files (quantaudit.stream); auto: when the
    # model would not fit in memory; off: load it whole
    streaming: str = "auto"
    stream_ram_mb: int | None = None  # boundary hidden states kept in memory up to this, then on disk (None: 1/4 of free)
    gpu: str | None = None  # add the advisor's memory/speed section for this GPU
    tasks: list[str] = field(default_factory=list)  # piqa, hellaswag, .jsonl paths, or lm_eval:NAME (quantaudit.tasks)
    task_data: str | None = None
    task_limit: int | float | None = None  # items per task: a count, or a fraction in (0, 1) as lm-eval's --limit
    task_seed: int | None = None
    task_strict: bool = False
    lm_eval_include: str | None = None  # lm-eval's include_path: a folder of the user's task YAMLs
    generate: str | None = None  # "default" (embedded prompts) or a prompts JSONL (quantaudit.fidelity)
    max_new_tokens: int = 128
    chat_template: str = "auto"  # auto: on when the tokenizer has one

    def fingerprint(self) -> str:
        """Identity of everything that changes a format's numbers (for --resume)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("formats", "budget", "batch_size", "device", "gpu",
                                                                  "streaming", "stream_ram_mb")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def at_least(flag: str, value: float | None, minimum: float) -> None:
    """A numeric flag's range (None: not given)."""
    if value is not None and not value >= minimum:
        raise UserError(f"{flag} must be at least {minimum:g} (got {value})")


def check_text_flags(s) -> None:
    """The window flags every quantizing command shares (``calib_size``, ``calib_seq``, ``windows``, ``seq_len``,
    ``batch_size``; absent ones skipped), then the device."""
    for flag, low in (("--calib-size", 1), ("--calib-seq", 2), ("--windows", 1), ("--seq-len", 2), ("--batch-size", 1)):
        at_least(flag, getattr(s, flag[2:].replace("-", "_"), None), low)
    check_device(s.device)


def check_device(device: str) -> None:
    """``--device`` names a torch device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    else:
        raise UserError(f"--device {device}: quantaudit runs on cpu, cuda or mps, not {dev.type}")


CHAT_TEMPLATE_MODES = ("auto", "on", "off")


def validate(settings: AuditSettings) -> list[Limit]:
    """Check every flag (formats, ranges, budget, GPU name, device) before anything is read or written."""
    from ..tasks.readers import check_limit

    check_text_flags(settings)
    for flag, value, low in (("--top-k", settings.top_k, 1), ("--drift-windows", settings.drift_windows, 0),
                             ("--sensitivity-windows", settings.sensitivity_windows, 1),
                             ("--stream-ram", settings.stream_ram_mb, 0),
                             ("--seed", settings.task_seed, 0), ("--max-new-tokens", settings.max_new_tokens, 1)):
        at_least(flag, value, low)
    check_limit(settings.task_limit)
    if settings.gpu:
        from ..advise.hardware import load_hardware

        load_hardware().gpu(settings.gpu)  # an unknown GPU fails now, not after the audit
    for name in settings.formats:
        get_format(name)
    if not settings.formats and not settings.plan:
        raise UserError("--formats is empty: name at least one format (see `quantaudit formats`) or give --plan")
    get_kv_cache_format(settings.kv_cache)
    if settings.kv_scales not in KV_SCALES:
        raise UserError(f"--kv-scales must be {' or '.join(KV_SCALES)} (got {settings.kv_scales!r})")
    if settings.group_size not in (64, 128):
        raise UserError(f"--group-size must be 64 or 128 (what TensorRT-LLM supports), got {settings.group_size}")
    if settings.sensitivity not in ("linear", "decoder", "none"):
        raise UserError("--sensitivity-granularity must be linear, decoder or none")
    if settings.streaming not in STREAMING_MODES:
        raise UserError(f"--streaming must be {', '.join(STREAMING_MODES)} (got {settings.streaming!r})")
    if settings.chat_template not in CHAT_TEMPLATE_MODES:
        raise UserError(f"--chat-template must be {', '.join(CHAT_TEMPLATE_MODES)} (got {settings.chat_template!r})")
    if settings.generate and settings.streaming == "on":
        raise UserError("--generate needs the whole model in memory (generation runs every layer per token); "
                        "use --streaming off or auto")
    return parse_budget(settings.budget)


def smoothquant_alpha(text: str) -> float | str:
    """``--smoothquant-alpha``: a migration strength in [0, 1], or ``search``."""
    if text == "search":
        return text
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'search', not {text!r}") from None
    if not 0 <= alpha <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {alpha}")
    return alpha


def add_algorithm_arguments(p: argparse.ArgumentParser) -> None:
    """The algorithm knobs ``audit`` and ``export`` share, so an export can repeat what was audited."""
    p.add_argument("--smoothquant-alpha", type=smoothquant_alpha, default=AuditSettings.smoothquant_alpha, metavar="A",
                   help="SmoothQuant migration strength (the paper's and ModelOpt's 0.5), or 'search' for a per-layer "
                        "grid search on the calibration data (default: %(default)s)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=AuditSettings.act_order,
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal, with static groups (no g_idx; "
                        "llm-compressor's default); --no-act-order sweeps columns in order (default: on)")
    p.add_argument("--gptq-scale", choices=SCALE_SEARCHES, default=AuditSettings.gptq_scale,
                   help="GPTQ group scales: mse shrinks each group's max |w| by up to 20%% where that lowers the "
                        "rounding error (llm-compressor's MSE observer), amax takes max |w| / 7 (default: %(default)s)")
