"""Export what was audited: a TensorRT-LLM checkpoint or a ModelOpt-style unified HF checkpoint.

:func:`export_checkpoint` writes the codes and scales of a
:class:`~quantaudit.quant.engine.QuantizedModel` unchanged (layouts: :mod:`.layout`), with BUILD.md,
build.sh and ``quantaudit_export.json`` (what was exported, from what, every place where what the
target runtime loads or runs differs from the audited model, and what it may refuse to load). The folder appears atomically:
a failed export leaves nothing behind, and an existing non-empty folder is only replaced with
``force``. :mod:`.reader` loads the files back into a model for the round-trip proof.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text, check_out_dir, output_dir
from .build import EXPORT_RECORD, BuildSettings, build_files

TARGETS = ("trtllm", "hf")


@dataclass
class ExportResult:
    path: Path
    target: str
    quant_algo: str
    kv_cache_quant_algo: str | None
    files: list[str]
    notes: list[str] = field(default_factory=list)  # where the runtime's numbers differ from the audited ones
    warnings: list[str] = field(default_factory=list)  # what the runtime may not load


@contextmanager
def _fresh_directory(out: Path, force: bool) -> Iterator[Path]:
    """A folder that becomes ``out`` (replacing it whole) when the block finishes; ``out`` is untouched if it fails."""
    with output_dir(out, force) as tmp:
        yield tmp
        _usual_permissions(tmp)


def _usual_permissions(root: Path) -> None:
    """Temporary files are private (0600/0700); a checkpoint is shared like any file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        runnable = p.is_dir() or os.access(p, os.X_OK)
        p.chmod((0o777 if runnable else 0o666) & ~mask)


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def export_checkpoint(qm, base_config, out_dir: str | Path, target: str = "trtllm", tp: int = 1,
                      dtype: str = "float16", force: bool = False, tokenizer=None,
                      build: BuildSettings = BuildSettings(), source: dict | None = None) -> ExportResult:
    """Write ``qm`` (quantized from a model with config ``base_config``) to ``out_dir``.

    ``target``: ``"trtllm"`` (config.json + rank{r}.safetensors, ``tp`` ranks) or ``"hf"``
    (unified HF folder). ``dtype``: the checkpoint dtype of unquantized tensors (``float16``,
    ``bfloat16``; ``float32`` for exact round-trip verification). ``tokenizer`` is saved alongside
    (``tokenizer/`` for trtllm) so build.sh can benchmark; ``source`` is recorded as provenance.
    """
    from .hf import build_hf
    from .trtllm import build_trtllm

    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)} (got {target!r})")
    out = check_out_dir(out_dir, force)  # a file, or a non-empty folder without force: refused before any work
    if target == "trtllm":
        ck = build_trtllm(qm, base_config, dtype, tp, build.max_seq_len)
        quant, files = ck.config["quantization"], {"config.json": ck.config}
        if ck.quant_cfg:
            files["quant_cfg.json"] = ck.quant_cfg
        tensor_files = {f"rank{r}.safetensors": t for r, t in enumerate(ck.ranks)}
        notes, warnings = ck.notes, ck.warnings
    else:
        ck = build_hf(qm, base_config, dtype, tp)
        quant = ck.hf_quant_config["quantization"]
        files = {"config.json": ck.config, "hf_quant_config.json": ck.hf_quant_config}
        tensor_files, notes, warnings = {"model.safetensors": ck.tensors}, ck.notes, []
    algo, kv_algo = quant["quant_algo"], quant["kv_cache_quant_algo"]
    name = (source or {}).get("model", "model")
    summary = f"{name}: {qm.spec.format}{' (plan)' if qm.spec.plan else ''} as a {'TensorRT-LLM' if target == 'trtllm' else 'unified HF'} checkpoint"
    build_md, build_sh = build_files(target, algo, kv_algo, tp, dtype, notes, warnings, build, summary)
    provenance = {
        "quantaudit": __version__, "target": target, "dtype": dtype, "tp": tp, "quant_algo": algo,
        "kv_cache_quant_algo": kv_algo, "source": source or {}, "spec": qm.spec.describe(), "calib": qm.calib_info,
        "layers": {n: (r.format if r.quantized else None) for n, r in qm.layers.items()},
        "fallbacks": qm.fallbacks(), "differences_from_audit": notes, "warnings": warnings,
    }
    with _fresh_directory(out, force) as tmp:
        for fname, obj in files.items():
            atomic_write_json(tmp / fname, obj)
        for fname, tensors in tensor_files.items():
            _save(tensors, tmp / fname)
        atomic_write_text(tmp / "BUILD.md", build_md)
        atomic_write_text(tmp / "build.sh", build_sh)
        (tmp / "build.sh").chmod((tmp / "build.sh").stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        atomic_write_text(tmp / EXPORT_RECORD, json.dumps(provenance, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer") if target == "trtllm" else str(tmp))
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    return ExportResult(out, target, algo, kv_algo, written, notes, warnings)


__all__ = ["TARGETS", "BuildSettings", "ExportResult", "export_checkpoint"]
