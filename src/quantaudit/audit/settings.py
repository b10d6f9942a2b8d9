"""``quantaudit audit``'s settings: the shared ones (:mod:`quantaudit.session`) and the audit's own, each
with its default and flag in one place. Kept free of torch imports so ``quantaudit --help`` stays instant."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..cluster import ClusterSettings
from ..errors import UserError
from ..measure.budget import DEFAULT_BUDGET, METRICS, Limit, parse_budget
from ..quant.formats import get_format
from ..session import EvalSettings, GenerationSettings, TaskSettings, at_least, flag

DEFAULT_FORMATS = ["fp8", "int8_wo", "int8_sq", "int4_awq", "int4_gptq", "w4a8_awq"]
STREAMING_MODES = ("auto", "on", "off")
SENSITIVITY_GRANULARITIES = ("linear", "decoder", "none")
MEASURE = "what is measured"
STREAMING = "models larger than memory"
# settings that change how a run executes, not its numbers: left out of the --resume key
EXECUTION = ("formats", "budget", "batch_size", "device", "gpu", "streaming", "stream_ram_mb", "ray", "shared_dir")


@dataclass
class AuditSettings(GenerationSettings, TaskSettings, EvalSettings, ClusterSettings):
    formats: list[str] = flag("--formats", DEFAULT_FORMATS, "comma-separated formats (see `quantaudit formats`; "
                              "default: %(default)s)")
    plan: str | None = flag("--plan", None, "also audit this mixed-precision plan (autotune's plan.json, or "
                            "{layer: format}), reported as format 'plan' next to --formats (which may then be "
                            "empty: --formats '')", metavar="FILE")
    budget: str = flag("--budget", DEFAULT_BUDGET, f"accuracy budget, e.g. '%(default)s'; metrics: {', '.join(METRICS)}")
    # None: exact full-vocabulary baseline (quantaudit.baseline); K: top-K lower bound
    top_k: int | None = flag("--top-k", None, "keep only the baseline's top-K log-probs per token (a lower bound of "
                             "the KLD); default: exact full-vocabulary KLD from the cached final hidden states", MEASURE,
                             type=int, metavar="K")
    drift_windows: int = flag("--drift-windows", 2, "windows for layer drift (0 = skip; default: %(default)s)", MEASURE,
                              type=int)
    # decoder: one replay per decoder layer (30 on SmolLM2); linear: one per linear layer (210 on SmolLM2, ~4 min a
    # format on 2 CPU cores, bench/bench_audit.py), opt-in for a finer ranking
    sensitivity: str = flag("--sensitivity-granularity", "decoder", "quantize one linear or one decoder layer at a "
                            "time (default: %(default)s)", MEASURE, choices=SENSITIVITY_GRANULARITIES)
    sensitivity_windows: int = flag("--sensitivity-windows", 1, "windows for the sensitivity sweep (default: "
                                    "%(default)s)", MEASURE, type=int)
    gpu: str | None = flag("--gpu", None, "add memory and speed estimates for this GPU (see `quantaudit advise`)")
    # on: one decoder layer at a time from the safetensors files (quantaudit.stream); auto: when the model would not
    # fit in memory; off: load it whole
    streaming: str = flag("--streaming", "auto", "on: read one decoder layer at a time from the safetensors files, "
                          "never holding the model; auto: only when the model would not fit in free memory "
                          "(default: %(default)s)", STREAMING, choices=STREAMING_MODES)
    # boundary hidden states kept in memory up to this, then on disk (None: 1/4 of free)
    stream_ram_mb: int | None = flag("--stream-ram", None, "with streaming: keep layer-boundary hidden states in "
                                     "memory up to MIB, spill the rest to a temporary folder (default: a quarter of "
                                     "the free memory)", STREAMING, type=int, metavar="MIB")

    def fingerprint(self) -> str:
        """Identity of everything that changes a format's numbers (for --resume)."""
        fields = {k: v for k, v in asdict(self).items() if k not in EXECUTION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def check(self) -> None:
        super().check()
        for flag_name, value, low in (("--top-k", self.top_k, 1), ("--drift-windows", self.drift_windows, 0),
                                      ("--sensitivity-windows", self.sensitivity_windows, 1),
                                      ("--stream-ram", self.stream_ram_mb, 0)):
            at_least(flag_name, value, low)
        if self.gpu:
            from ..advise.hardware import load_hardware

            load_hardware().gpu(self.gpu)  # an unknown GPU fails now, not after the audit
        for name in self.formats:
            get_format(name)
        if not self.formats and not self.plan:
            raise UserError("--formats is empty: name at least one format (see `quantaudit formats`) or give --plan")
        if self.sensitivity not in SENSITIVITY_GRANULARITIES:
            raise UserError(f"--sensitivity-granularity must be {', '.join(SENSITIVITY_GRANULARITIES)}")
        if self.streaming not in STREAMING_MODES:
            raise UserError(f"--streaming must be {', '.join(STREAMING_MODES)} (got {self.streaming!r})")
        if self.ray and self.streaming == "on":
            raise UserError("--ray runs each format's job in memory; a layer-streamed audit runs in one process: "
                            "drop --ray or --streaming on")
        if self.generate and self.streaming == "on":
            raise UserError("--generate needs the whole model in memory (generation runs every layer per token); "
                            "use --streaming off or auto")

    def limits(self) -> list[Limit]:
        return parse_budget(self.budget)
