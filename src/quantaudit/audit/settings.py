"""Audit settings: every knob of ``quantaudit audit``, with its default, in one light module.

Kept free of torch imports so ``quantaudit --help`` stays instant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..quant.formats import get_format, get_kv_cache_format
from .budget import DEFAULT_BUDGET, Limit, parse_budget

DEFAULT_FORMATS = ("fp8", "int8_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq")


@dataclass
class AuditSettings:
    model: str = "smollm2-135m"
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    kv_cache: str = "none"
    calib: str | None = None
    calib_size: int = 32
    calib_seq: int = 512
    eval: str | None = None
    windows: int | None = 16
    seq_len: int = 512
    bos: str = "auto"
    group_size: int = 128
    exclude: list[str] = field(default_factory=list)
    plan: str | None = None  # a mixed-precision plan file (quant.plan), audited next to the formats
    budget: str = DEFAULT_BUDGET
    top_k: int | None = None  # None: exact full-vocabulary baseline (quantaudit.baseline); K: top-K lower bound
    drift_windows: int = 2
    sensitivity: str = "linear"  # linear | decoder | none
    sensitivity_windows: int = 1
    batch_size: int | None = None
    device: str = "cpu"
    gpu: str | None = None  # add the advisor's memory/speed section for this GPU
    tasks: list[str] = field(default_factory=list)  # piqa, hellaswag, or .jsonl paths
    task_data: str | None = None
    task_limit: int | None = None
    task_seed: int | None = None
    task_strict: bool = False

    def fingerprint(self) -> str:
        """Identity of everything that changes a format's numbers (for --resume)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("formats", "budget", "batch_size", "device", "gpu")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def validate(settings: AuditSettings) -> list[Limit]:
    """Check every user-given choice before any slow work starts."""
    for name in settings.formats:
        get_format(name)
    if not settings.formats and not settings.plan:
        raise UserError("--formats is empty: name at least one format (see `quantaudit formats`) or give --plan")
    get_kv_cache_format(settings.kv_cache)
    if settings.group_size not in (64, 128):
        raise UserError(f"--group-size must be 64 or 128 (what TensorRT-LLM supports), got {settings.group_size}")
    if settings.sensitivity not in ("linear", "decoder", "none"):
        raise UserError("--sensitivity-granularity must be linear, decoder or none")
    return parse_budget(settings.budget)
