"""Write a Hugging Face model folder as an F32 GGUF file the way llama.cpp's converter writes that family.

Nothing may be downloaded, so the GGUF files quantaudit has to read are written here, from the tiny models of
tiny_models.py, with the ``gguf`` package's ``GGUFWriter``. What each family's converter in llama.cpp
(``convert_hf_to_gguf.py``, now ``conversion/<family>.py`` in ggml-org/llama.cpp) does is data in
:data:`FAMILIES`; :func:`write_gguf` applies it:

* metadata: the keys every ``TextModel`` writes (block count, context, widths, heads, RoPE base, RMS eps, experts,
  ``key_length``/``value_length`` from ``head_dim``) plus the family's own (``LlamaModel``: vocab size and RoPE
  dimensions; Gemma 2: soft-capping and sliding window; Granite: its four multipliers; ...);
* the vocabulary as ``TextModel._set_vocab_sentencepiece`` writes a ``tokenizer.model`` (tokenizer model ``llama``:
  pieces, scores, token types), or, for a folder with only a ``tokenizer.json``, as ``_set_vocab_gpt2`` writes a
  byte-level BPE (``gpt2``: tokens, token types, merges); then ``gguf.SpecialVocab`` for the special ids and the
  add-BOS/EOS flags;
* tensors under their GGUF names (``gguf.get_tensor_name_map``), with the family's rewrites: ``LlamaModel.permute``
  of the q/k rows into GGML's rotary layout (Llama, Mistral, Mixtral, Granite), norms stored as ``1 + w`` (Gemma
  1/2/3), per-expert matrices stacked into one 3-D tensor per projection (Mixtral, Qwen3-MoE), GPT-OSS's
  interleaved ``gate_up_proj`` split into gate and up and transposed, its ``sinks`` named ``sinks.weight``, and a
  tied ``lm_head`` left out (Gemma: ``filter_tensors``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one model_type."""

    arch: gguf.MODEL_ARCH
    # (GGUFWriter method, config key) written after TextModel's common keys; a key the config lacks is skipped
    keys: tuple[tuple[str, str], ...] = ()
    permute_qk: bool = False  # LlamaModel.permute on q_proj / k_proj rows (transformers' LlamaTensorProcessor undoes it)
    norm_shift: float = 0.0  # added to every "*norm.weight" (Gemma's RMSNorm multiplies by 1 + w)
    drop_lm_head: bool = False  # GemmaModel / Gemma2Model.filter_tensors skip lm_head.weight
    fused_experts: bool = False  # GptOssModel: 3-D gate_up_proj (gate, up interleaved) and down_proj, transposed
    rope_freqs: bool = False  # LlamaModel.generate_extra_tensors: Llama 3 RoPE scaling as per-frequency factors
    # tokenizer.ggml.pre of a byte-level BPE vocabulary: llama.cpp names it by hashing how the tokenizer splits a
    # test string; a tiny tokenizer's hash names nothing, so the family's own value is data here
    bpe_pre: str = "default"


_LLAMA_KEYS = (("add_vocab_size", "vocab_size"), ("add_rope_dimension_count", "rope_dim"))
_LLAMA = Family(A.LLAMA, _LLAMA_KEYS, permute_qk=True, rope_freqs=True)
FAMILIES = {
    # LlamaModel registers LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM: all three are "llama" GGUFs
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "granite": Family(A.GRANITE, (*_LLAMA_KEYS, ("add_embedding_scale", "embedding_multiplier"),
                                  ("add_residual_scale", "residual_multiplier"),
                                  ("add_attention_scale", "attention_multiplier"), ("add_logit_scale", "logits_scaling")),
                      permute_qk=True),
    "qwen2": Family(A.QWEN2, bpe_pre="qwen2"),
    "qwen3": Family(A.QWEN3, bpe_pre="qwen2"),
    "qwen3_moe": Family(A.QWEN3MOE, (("add_expert_feed_forward_length", "moe_intermediate_size"),), bpe_pre="qwen2"),
    "gemma": Family(A.GEMMA, norm_shift=1.0, drop_lm_head=True),
    "gemma2": Family(A.GEMMA2, (("add_attn_logit_softcapping", "attn_logit_softcapping"),
                                ("add_final_logit_softcapping", "final_logit_softcapping"),
                                ("add_sliding_window", "sliding_window")), norm_shift=1.0, drop_lm_head=True),
    "gemma3_text": Family(A.GEMMA3, (("add_final_logit_softcapping", "final_logit_softcapping"),
                                     ("add_sliding_window", "sliding_window")), norm_shift=1.0),
    "olmo2": Family(A.OLMO2),
    "phi3": Family(A.PHI3, (("add_rope_dimension_count", "rope_dim"), ("add_sliding_window", "sliding_window"))),
    "gpt_oss": Family(A.GPT_OSS, (("add_sliding_window", "sliding_window"),
                                  ("add_expert_feed_forward_length", "intermediate_size")), fused_experts=True),
}
# TextModel.set_gguf_parameters: written for every family where the config has the value
_COMMON_KEYS = (("add_context_length", "max_position_embeddings"), ("add_embedding_length", "hidden_size"),
                ("add_feed_forward_length", "intermediate_size"), ("add_head_count", "num_attention_heads"),
                ("add_head_count_kv", "num_key_value_heads"), ("add_rope_freq_base", "rope_theta"),
                ("add_layer_norm_rms_eps", "rms_norm_eps"), ("add_expert_count", "num_local_experts"),
                ("add_expert_count", "num_experts"), ("add_expert_used_count", "num_experts_per_tok"),
                ("add_key_length", "head_dim"), ("add_value_length", "head_dim"))
# RoPE scaling as metadata (LlamaModel and Gemma3Model: linear; Qwen2Model and GptOssModel: YaRN)
_ROPE_SCALING = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}
_PER_EXPERT = re.compile(r"(?P<stem>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from HF's rotate-half order to GGML's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """LlamaModel.generate_extra_tensors: what Llama 3's RoPE scaling divides each frequency by (rope_freqs)."""
    freqs = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    return torch.where(wavelen < context / high, 1.0,
                       torch.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))


def _tensors(folder: Path, cfg: dict, family: Family) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the HF names llama.cpp maps, rewritten as the family's converter does."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in load_file(folder / "model.safetensors").items():
        t = t.float()
        if family.drop_lm_head and name == "lm_head.weight":
            continue
        if family.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _permute(t, cfg["num_attention_heads"])
        if family.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _permute(t, cfg["num_key_value_heads"])
        if name.endswith("norm.weight"):
            t = t + family.norm_shift
        if m := _PER_EXPERT.match(name):
            experts.setdefault(f"{m['stem']}.{m['proj']}.weight", {})[int(m["e"])] = t
            continue
        if family.fused_experts and ".experts." in name:
            stem, _, kind = name.rpartition(".")
            bias = kind.endswith("_bias")
            if not bias:
                t = t.transpose(-1, -2)  # (experts, in, out) -> (experts, out, in)
            suffix = ".bias" if bias else ".weight"
            if kind.startswith("gate_up_proj"):
                out[f"{stem}.gate_proj{suffix}"], out[f"{stem}.up_proj{suffix}"] = t[:, ::2], t[:, 1::2]
            else:
                out[f"{stem}.down_proj{suffix}"] = t
            continue
        if name.endswith(".sinks"):
            name += ".weight"
        out[name] = t
    for name, per_expert in experts.items():
        out[name] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def _write_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int, bpe_pre: str) -> None:
    """TextModel._set_vocab_sentencepiece for a folder with a tokenizer.model, else _set_vocab_gpt2 (the byte-level
    BPE of tokenizer.json: tokens in id order, added ones CONTROL if special, ids it lacks as UNUSED [PAD{i}])."""
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = zip(*gguf.SentencePieceVocab(folder).all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(list(scores))
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    else:
        spec = json.loads((folder / "tokenizer.json").read_text())
        added = {t["id"]: t for t in spec["added_tokens"]}
        by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
        T = gguf.TokenType
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
        types = [T.UNUSED if i not in by_id else T.NORMAL if i not in added else
                 T.CONTROL if added[i]["special"] else T.USER_DEFINED for i in range(n_vocab)]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    special.add_to_gguf(writer, quiet=True)


def write_gguf(folder: Path, path: Path) -> Path:
    """Write the HF model in ``folder`` (config.json, model.safetensors, a tokenizer) as the F32 GGUF ``path``,
    named (``general.name``) after the folder, as llama.cpp's converter of its model_type would."""
    folder, path = Path(folder), Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    family = FAMILIES[cfg["model_type"]]
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' RoPE
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hp = {**cfg, "rope_theta": rope.get("rope_theta"),
          "rope_dim": int(head_dim * rope.get("partial_rotary_factor", 1.0))}

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(folder.name)
    writer.add_block_count(cfg["num_hidden_layers"])
    for method, key in (*_COMMON_KEYS, *family.keys):
        if hp.get(key) is not None:
            getattr(writer, method)(hp[key])
    if (scaling := _ROPE_SCALING.get(rope.get("rope_type"))) is not None:
        writer.add_rope_scaling_type(scaling)
        writer.add_rope_scaling_factor(rope["factor"])
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    _write_vocab(writer, folder, cfg["vocab_size"], family.bpe_pre)

    if family.rope_freqs and rope.get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(rope, head_dim).numpy())
    names = gguf.get_tensor_name_map(family.arch, cfg["num_hidden_layers"])
    for hf_name, t in _tensors(folder, cfg, family).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name} in llama.cpp's {family.arch.name} tensor map")
        writer.add_tensor(gguf_name, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
