"""The GPU table (``gpus.toml``, every figure with its datasheet source) and what runs natively where.

A format runs natively on a GPU when TensorRT-LLM has kernels for its ``trtllm_quant_algo`` on the
GPU's architecture *and* the GPU has tensor-core throughput in the dtype its GEMMs use (the format's
``compute`` dtype in ``gpus.toml``). Users add GPUs with a TOML file of their own
(``--hardware-file``) in the same layout; its tables are merged over the built-in ones.

Memory is the datasheet's GB taken as 10^9 bytes. The cards hold binary GiB (about 7% more), a margin
this planner leaves for the CUDA context and runtime buffers it does not model.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..quant.formats import FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat

COMPUTE_DTYPES = ("fp16", "fp8", "int8", "fp4")
DEGRADATION_ORDER = ("none", "very_low", "low", "medium", "high")  # expected accuracy loss, best first
GPU_FIELDS = {"name", "aliases", "arch", "memory_gb", "bandwidth_gbs", "tflops"}
ARCH_FIELDS = {"sm", "trtllm_quant_algos", "kv_cache"}
FORMAT_FIELDS = {"compute", "degradation"}


@dataclass(frozen=True)
class Architecture:
    name: str
    trtllm_quant_algos: frozenset[str]  # may list algorithms quantaudit does not produce (never matched)
    kv_cache: frozenset[str]  # KV_CACHE_FORMATS names


@dataclass(frozen=True)
class FormatFacts:
    """Advisor facts about one quantaudit format, keyed by its FORMATS name."""

    compute: str  # dtype its GEMMs run in
    degradation: str  # expected accuracy loss class, one of DEGRADATION_ORDER


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    aliases: tuple[str, ...]
    arch: Architecture
    memory_bytes: float
    bandwidth: float  # bytes/s
    flops: dict[str, float]  # dense tensor FLOP/s (OP/s for int8) per compute dtype

    def runs(self, fmt: QuantFormat, facts: FormatFacts) -> bool:
        algo_ok = fmt.trtllm_quant_algo is None or fmt.trtllm_quant_algo in self.arch.trtllm_quant_algos
        return algo_ok and facts.compute in self.flops

    def runs_kv(self, kv: KVCacheFormat) -> bool:
        return kv.name in self.arch.kv_cache

    def describe(self) -> dict:
        return {
            "key": self.key, "name": self.name, "arch": self.arch.name,
            "memory_gb": self.memory_bytes / 1e9, "bandwidth_gbs": self.bandwidth / 1e9,
            "dense_tflops": {k: v / 1e12 for k, v in self.flops.items()},
            "native_trtllm_quant_algos": sorted(self.arch.trtllm_quant_algos),
            "native_kv_cache": sorted(self.arch.kv_cache),
        }


@dataclass(frozen=True)
class HardwareTable:
    gpus: dict[str, GPU]
    formats: dict[str, FormatFacts]

    def gpu(self, name: str) -> GPU:
        """Look a GPU up by key or alias (case, spaces and underscores ignored)."""
        wanted = _normal(name)
        for gpu in self.gpus.values():
            if wanted == gpu.key or wanted in gpu.aliases:
                return gpu
        raise UserError(
            f"unknown GPU {name!r}; known GPUs: {', '.join(self.gpus)} "
            "(add one with --hardware-file; quantaudit/advise/gpus.toml shows the layout)"
        )

    def facts(self, fmt_name: str) -> FormatFacts | None:
        return self.formats.get(fmt_name)


def load_hardware(hardware_file: str | Path | None = None) -> HardwareTable:
    """The built-in table, with ``hardware_file``'s tables merged over it."""
    builtin = tomllib.loads(resources.files(__package__).joinpath("gpus.toml").read_text(encoding="utf-8"))
    layers = [("gpus.toml", builtin)]
    if hardware_file is not None:
        layers.append((str(hardware_file), _read_toml(Path(hardware_file))))
    merged: dict[str, dict] = {"architectures": {}, "formats": {}, "gpus": {}}
    origin: dict[tuple[str, str], str] = {}
    for where, data in layers:
        unknown = sorted(set(data) - set(merged))
        if unknown:
            raise UserError(f"{where}: unknown table [{unknown[0]}]; allowed: {', '.join(merged)}")
        for section, entries in data.items():
            for key, entry in entries.items():
                merged[section][key] = entry
                origin[(section, key)] = where
    archs = {k: _architecture(k, e, origin[("architectures", k)]) for k, e in merged["architectures"].items()}
    formats = {k: _format_facts(k, e, origin[("formats", k)]) for k, e in merged["formats"].items()}
    gpus = {}
    for key, entry in merged["gpus"].items():
        gpu = _gpu(key, entry, archs, origin[("gpus", key)])
        gpus[gpu.key] = gpu
    return HardwareTable(gpus=gpus, formats=formats)


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"hardware file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"hardware file {path} is not valid TOML: {exc}") from None


def _check_fields(where: str, entry, allowed: set[str], required: set[str]) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a table")
    unknown = sorted(set(entry) - allowed)
    missing = sorted(required - set(entry))
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r}")


def _architecture(name: str, entry: dict, where: str) -> Architecture:
    here = f"{where} [architectures.{name}]"
    _check_fields(here, entry, ARCH_FIELDS, ARCH_FIELDS - {"sm"})
    if not set(entry["kv_cache"]) <= set(KV_CACHE_FORMATS) or "none" not in entry["kv_cache"]:
        raise UserError(f"{here}: kv_cache must include \"none\" (fp16) and list only {', '.join(KV_CACHE_FORMATS)}")
    return Architecture(name, frozenset(entry["trtllm_quant_algos"]), frozenset(entry["kv_cache"]))


def _format_facts(name: str, entry: dict, where: str) -> FormatFacts:
    here = f"{where} [formats.{name}]"
    _check_fields(here, entry, FORMAT_FIELDS, FORMAT_FIELDS)
    if name not in FORMATS:
        raise UserError(f"{here}: no quantaudit format {name!r}; formats: {', '.join(FORMATS)}")
    if entry["compute"] not in COMPUTE_DTYPES or entry["degradation"] not in DEGRADATION_ORDER:
        raise UserError(f"{here}: compute must be one of {COMPUTE_DTYPES}, degradation one of {DEGRADATION_ORDER}")
    return FormatFacts(entry["compute"], entry["degradation"])


def _gpu(key: str, entry: dict, archs: dict[str, Architecture], where: str) -> GPU:
    here = f"{where} [gpus.{key}]"
    _check_fields(here, entry, GPU_FIELDS, GPU_FIELDS - {"aliases"})
    if entry["arch"] not in archs:
        raise UserError(f"{here}: unknown arch {entry['arch']!r}; known: {', '.join(archs)} (or add an [architectures] table)")
    tflops = entry["tflops"]
    if not isinstance(tflops, dict) or "fp16" not in tflops or not set(tflops) <= set(COMPUTE_DTYPES):
        raise UserError(f"{here}: tflops must be a table with fp16 and any of {', '.join(COMPUTE_DTYPES)}")
    for field, value in {"memory_gb": entry["memory_gb"], "bandwidth_gbs": entry["bandwidth_gbs"], **tflops}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{here}: {field} must be a positive number (got {value!r})")
    return GPU(
        key=_normal(key),
        name=entry["name"],
        aliases=tuple(_normal(a) for a in entry.get("aliases", ())),
        arch=archs[entry["arch"]],
        memory_bytes=entry["memory_gb"] * 1e9,
        bandwidth=entry["bandwidth_gbs"] * 1e9,
        flops={dtype: value * 1e12 for dtype, value in tflops.items()},
    )
