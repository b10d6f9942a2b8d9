"""Which GGUF files quantaudit reads, and the one-line refusals for the others.

A GGUF file is read by transformers' GGUF loader (:func:`quantaudit.models.model_folder`). That loader has no
reader for some of the families in :mod:`quantaudit.arch`, and for others it drops part of what the file states
and builds another model without a word (a random MLP, the wrong RoPE). quantaudit therefore refuses, in one line
and before anything is cached, every file it knows the loader gets wrong (:func:`check_gguf`, from the metadata
alone; :func:`check_loading_info`, facts the built config lost) and any weight the loader left unfilled or
misshapen. What the loader reads correctly is shown in tests/test_gguf_families.py, which writes each family's
GGUF as llama.cpp's converter does (tests/gguf_writer.py) and loads it to the logits of the model it was written
from. Facts from transformers 5.24
(``modeling_gguf_pytorch_utils``, ``integrations/ggml.py``, ``integrations/gguf``).
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

# GGUF architecture (general.architecture, as llama.cpp writes it) -> the quantaudit families stored as it
GGUF_READ = {
    "llama": ("llama", "mistral"),  # llama.cpp writes Mistral (and Mixtral) as "llama"
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "qwen3moe": ("qwen3_moe",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text",),
    "phi3": ("phi3",),
}
_NO_READER = "transformers has no GGUF reader for it (no GGUF_CONFIG_MAPPING entry)"
# GGUF architectures of quantaudit families that transformers cannot read as the model they hold, and why
GGUF_REFUSED = {
    "gemma": _NO_READER,
    "granite": _NO_READER,
    "olmo2": _NO_READER,
    # its GptOssTensorProcessor is registered as "gpt_oss", never matches a file's "gpt-oss", and expects tensor
    # names llama.cpp does not write
    "gpt-oss": "transformers' GGUF loader leaves its experts and attention sinks unread (random weights)",
}
# Tensors transformers' GGUF loader skips without a word, per GGUF architecture: (part of the name, what is lost)
GGUF_DROPPED_TENSORS = {
    "llama": (("rope_freqs", "its Llama 3 RoPE scaling (rope_freqs)"),
              ("_exps", "its experts (a Mixtral stored as a llama GGUF): it would load as a dense Llama")),
    "phi3": (("rope_factors_", "its LongRoPE scaling (rope_factors_long/short)"),),
}
# Facts a file states that transformers' loader may not read, taking the config class's default instead:
# (GGUF key below the architecture, config attribute). Checked against the config it built.
GGUF_STATED = (("attention.key_length", "head_dim"), ("expert_feed_forward_length", "moe_intermediate_size"),
               ("attn_logit_softcapping", "attn_logit_softcapping"),
               ("final_logit_softcapping", "final_logit_softcapping"))

# A GGUF cannot state Gemma 2/3's query_pre_attn_scalar; llama.cpp derives the query scale from the model size
# (src/llama-model.cpp, LLM_ARCH_GEMMA2/GEMMA3: 1/sqrt(n_embd / n_head) for the 27B models, recognised by their
# layer count, else 1/sqrt(head_dim)), while transformers takes the config class's default (256). Checked.
GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _readable() -> str:
    return ", ".join(f for families in GGUF_READ.values() for f in families)


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"cannot load model {path}: {why}; quantaudit reads the GGUF files of {_readable()} "
                     "(give the Hugging Face folder otherwise)")


def check_gguf(path: Path) -> dict:
    """Refuse ``path`` in one line if transformers cannot read its architecture, or would drop its RoPE scaling or
    its experts; reads only the metadata and tensor names, and returns the metadata."""
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, tensors = read_gguf_metadata(str(path))
    arch = metadata["general.architecture"]
    if arch in GGUF_REFUSED:
        raise _refuse(path, f"GGUF architecture {arch!r}: {GGUF_REFUSED[arch]}")
    for part, what in GGUF_DROPPED_TENSORS.get(arch, ()):
        if any(part in name for name in tensors):
            raise _refuse(path, f"transformers' GGUF loader drops {what}")
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if arch in GGUF_READ and scaling not in (None, "none"):
        raise _refuse(path, f"transformers' GGUF loader ignores its RoPE scaling ({arch}.rope.scaling.type {scaling})")
    return metadata


def check_loading_info(path: Path, metadata: dict, config, info: dict) -> None:
    """After ``from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)``: refuse a model whose
    config lost a fact the file (``metadata``) states, or with weights the file did not fill (left random) or did
    not fit."""
    arch = metadata["general.architecture"]
    for key, attr in GGUF_STATED:
        stated = metadata.get(f"{arch}.{key}")
        if stated is None or not hasattr(config, attr):
            continue
        built = getattr(config, attr)
        if built is None or not math.isclose(stated, built, rel_tol=1e-6):
            raise _refuse(path, f"transformers' GGUF loader ignores {arch}.{key} ({stated}) and assumes "
                                f"{attr} {built}")
    if arch in GGUF_27B_LAYERS:
        big = metadata.get(f"{arch}.block_count") == GGUF_27B_LAYERS[arch]
        implied = config.hidden_size / config.num_attention_heads if big else config.head_dim
        if not math.isclose(config.query_pre_attn_scalar, implied):
            raise _refuse(path, f"a GGUF does not state {arch}'s query_pre_attn_scalar; llama.cpp implies {implied:g} "
                                f"for this model, transformers' GGUF loader assumes {config.query_pre_attn_scalar}")
    unfilled = sorted(info.get("missing_keys") or ()) + sorted(k for k, *_ in info.get("mismatched_keys") or ())
    if unfilled:
        raise _refuse(path, f"transformers' GGUF loader left {len(unfilled)} weights unfilled or misshapen "
                            f"({', '.join(unfilled[:3])}{', ...' if len(unfilled) > 3 else ''})")
