"""Tiny random-weight models of every family in quantaudit.arch, built from transformers configs (no download):
hidden 128, 2 layers, 4 heads of 32 (2 KV heads), vocabulary 512 with stories260K's tokenizer beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.1)
TINY_FAMILIES = {
    "llama": ("llama", {"tie_word_embeddings": True}),
    "llama_untied_llama3_rope": ("llama", {"tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "granite": ("granite", {"embedding_multiplier": 6.0, "residual_multiplier": 0.3, "attention_multiplier": 0.05,
                            "logits_scaling": 4.0}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": 16}),  # layers alternate sliding (16 tokens) and global
    "gemma3_text": ("gemma3_text", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo2": ("olmo2", {}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    # Mixture of Experts: 4 experts, 2 per token
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                                "mlp_only_layers": [0]}),  # layer 0 dense, layer 1 sparse
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                            "layer_types": ["sliding_attention", "full_attention"],  # attention sinks, biases
                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False}}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def build_tiny_model(name: str, folder: Path, tokenizer_dir: Path, **overrides) -> Path:
    """Save the tiny model ``name`` (config overrides allowed) into ``folder`` with the tokenizer of
    ``tokenizer_dir``. Norm weights are randomised (Gemma's (1 + w) norms as much as the others) so that a
    scale folded into a norm the wrong way cannot go unnoticed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = TINY_FAMILIES[name]
    config = AutoConfig.for_model(model_type, **{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    for file in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / file, Path(folder) / file)
    return Path(folder)
