"""What an audit executor measures, typed: the contract between the executors (:mod:`.in_memory`,
:mod:`.streamed`) and the report (:func:`quantaudit.audit.run.format_entry` renders it, in one place).

An executor measures what it can and says what it could not, and why, in ``not_computed``; a measurement holds
no model weights (only each layer's format and byte counts), so finished candidates cost no memory.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..quant import QuantSpec


@dataclass(frozen=True)
class Candidate:
    """One thing the audit quantizes and judges: a uniform format, or the mixed-precision plan."""

    name: str
    spec: QuantSpec
    description: str
    trtllm_quant_algo: str | None


@dataclass(frozen=True)
class LayerFormat:
    """How one linear was quantized: its format, or why it was left unquantized."""

    format: str
    fallback_reason: str | None


@dataclass
class Measured:
    """Everything measured about one candidate."""

    candidate: Candidate
    layers: dict[str, LayerFormat]  # every linear, in model order
    decoder_layers: int
    weight_bytes: int
    kv_bytes_per_token: int
    calib: dict  # what calibration used (QuantizedModel.calib_info)
    stats: dict  # paired statistics against the baseline (evaluate.compare_to_baseline's summary)
    drift: dict  # {point: {"drift_rel", "cosine"}} (measure.drift)
    sensitivity: dict = field(default_factory=dict)  # {linear or decoder-layer path: KLD}
    tasks: list | None = None  # tasks.compare_task_results per task
    generation: dict | None = None  # fidelity.compare_generations
    not_computed: dict[str, str] = field(default_factory=dict)  # measurement -> why not
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: quantize, evaluate, drift, ...

    @classmethod
    def of(cls, candidate: Candidate, qm, **measured) -> Measured:
        """The measurement of ``qm`` (a ``QuantizedModel``): its layers and byte counts, and ``measured``."""
        layers = {name: LayerFormat(r.format, r.fallback_reason) for name, r in qm.layers.items()}
        return cls(candidate, layers, len(qm.model.model.layers), qm.weight_bytes(), qm.kv_bytes_per_token(),
                   qm.calib_info, **measured)


@dataclass
class BaselineMeasured:
    """Everything measured about the unquantized model, and how the audit ran."""

    model: dict  # name, source, fingerprint, architecture, params, decoder_layers, linear_layers
    ppl: dict  # the baseline's perplexity summary (metrics.PerplexityAccumulator)
    weight_bytes: int
    kv_bytes_per_token: int
    top_k: int | None  # the baseline's top-K cache, None when exact
    outliers: list[dict]  # measure.outliers.activation_outliers
    tasks: dict | None = None  # {task: summary}
    streaming: dict | None = None  # the streamed executor: what it did and did not compute
    distributed: dict | None = None  # the Ray executor: the cluster, and each job's attempts
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: baseline, outliers, tasks, ...


class StageClock:
    """Seconds per stage of an audit (the report's timing breakdown), summed over ``with clock("stage"):`` blocks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
