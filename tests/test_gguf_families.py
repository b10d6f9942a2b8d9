"""GGUF files of the families in quantaudit.arch: each loads where transformers' GGUF loader reads it as the model
it holds, and is refused in one line where it does not (quantaudit.gguf_check).

Nothing can be downloaded, so every file is written here: a tiny random-weight model of the family
(tiny_models.py) converted to an F32 GGUF as llama.cpp's converter would (gguf_writer.py), then loaded by quantaudit
from the file and compared with the model it was written from. The tiny models carry stories260K's SentencePiece
tokenizer, which llama.cpp writes as a ``llama`` vocabulary; Qwen's get a tiny byte-level BPE tokenizer instead, as
real Qwen models have, since quantaudit's cache reloads a Qwen tokenizer as Qwen's byte-level BPE.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import STORIES_HF, TEXT, assert_refused, run_cli, tiny_audit
from gguf_writer import write_gguf
from safetensors.torch import load_file, save_file
from tiny_models import TINY_FAMILIES, build_tiny_model

from quantaudit.arch import ARCHITECTURES, architecture
from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.gguf_check import GGUF_READ
from quantaudit.models import load_model, load_tokenizer
from quantaudit.quant import QuantSpec, quantize

# family -> its tiny model's config overrides: the values every real checkpoint of the family has, where
# transformers' GGUF loader takes them from its config class instead of the file (or where a GGUF cannot state them)
LOADS = {
    "llama": {},
    "mistral": {},  # a "llama" GGUF, as llama.cpp writes Mistral: it loads as a llama model, the same function
    "qwen2": {},
    "qwen3": {"head_dim": 128},  # qwen3.attention.key_length is not read: Qwen3Config's 128, every Qwen3's
    # qwen3moe.expert_feed_forward_length is not read (Qwen3MoeConfig's 768: Qwen3-30B-A3B); every layer sparse and
    # top-k weights renormalised, as in every Qwen3-MoE (llama.cpp and transformers' GGUF reader assume both)
    "qwen3_moe": {"moe_intermediate_size": 768, "mlp_only_layers": [], "norm_topk_prob": True},
    # A GGUF cannot state query_pre_attn_scalar: llama.cpp implies head_dim (below 27B), transformers assumes 256,
    # so only a head_dim of 256 (every Gemma 2/3 but 27B) reads the same both ways
    "gemma2": {"head_dim": 256},
    # Gemma 3's own five sliding layers to one global: what llama.cpp and transformers assume, a GGUF cannot say
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": None, "head_dim": 256},
    "phi3": {},
}
QWEN = ("qwen2", "qwen3", "qwen3_moe")
# (tiny model, config overrides, what the one-line refusal names)
REFUSALS = [
    ("gemma", {}, "GGUF architecture 'gemma': transformers has no GGUF reader"),
    ("granite", {}, "GGUF architecture 'granite': transformers has no GGUF reader"),
    ("olmo2", {}, "GGUF architecture 'olmo2': transformers has no GGUF reader"),
    ("gpt_oss", {}, "GGUF architecture 'gpt-oss': transformers' GGUF loader leaves its experts and attention sinks"),
    ("mixtral", {}, "drops its experts (a Mixtral stored as a llama GGUF)"),
    ("llama_untied_llama3_rope", {}, "drops its Llama 3 RoPE scaling (rope_freqs)"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "ignores its RoPE scaling (llama.rope.scaling.type linear)"),
    ("qwen3", {}, "ignores qwen3.attention.key_length (32) and assumes head_dim 128"),
    ("gemma2", {}, "does not state gemma2's query_pre_attn_scalar; llama.cpp implies 32"),
    ("qwen3_moe", {"mlp_only_layers": []},
     "ignores qwen3moe.expert_feed_forward_length (128) and assumes moe_intermediate_size 768"),
]
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "sliding_window",
         "layer_types", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
         "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar")
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside."


def _byte_level_bpe(folder):
    """Replace the folder's SentencePiece tokenizer by a byte-level BPE one as Qwen's (Qwen2Tokenizer, 512 tokens
    learned from the PTB sample, the config's ids 1 and 2 as BOS and EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([(TEXT.parent / "ptb_valid.txt").read_text()[:100_000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    for file in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (folder / file).unlink()
    Qwen2Tokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]], unk_token=None,
                   bos_token=specials[1], eos_token=specials[2], pad_token=specials[0]).save_pretrained(folder)


def _gguf(tmp_path, name, overrides, drop=None):
    """The tiny model ``name`` (``drop``: without that tensor) and its GGUF file, named tiny-<name>: transformers reads
    a llama GGUF whose general.name is exactly "mistral" as a Mistral one and fails (gguf-py has no such architecture),
    while llama.cpp names its files "Mistral 7B ..." and the like."""
    folder = build_tiny_model(name, tmp_path / f"tiny-{name}", STORIES_HF, **overrides)
    if TINY_FAMILIES[name][0] in QWEN:
        _byte_level_bpe(folder)
    if drop:
        tensors = load_file(folder / "model.safetensors")
        del tensors[drop]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, write_gguf(folder, tmp_path / f"tiny-{name}.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTAUDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_family_either_loads_or_is_refused():
    """The table of quantaudit.arch is covered: each family is shown to load from GGUF, or to be refused."""
    families = {t for a in ARCHITECTURES for t in a.model_types}
    assert set(LOADS) | {TINY_FAMILIES[name][0] for name, *_ in REFUSALS} == families
    assert {f for names in GGUF_READ.values() for f in names} == set(LOADS)


@pytest.mark.parametrize("family", LOADS)
def test_gguf_loads_as_the_model_it_was_written_from(family, tmp_path, cache, shared_dir):
    """Same config, the same logits (F32: to 1e-6 relative), the same tokens; quantizing the loaded model gives the
    very codes and scales quantizing the original gives."""
    folder, path = _gguf(tmp_path, family, LOADS[family])
    written = load_model(str(folder))
    loaded = load_model(str(path))
    as_type = "llama" if family == "mistral" else family  # llama.cpp writes Mistral as a llama GGUF
    assert loaded.source.startswith(str(cache))
    assert loaded.config.model_type == architecture(loaded.model).family == as_type
    for attr in SIZES:
        want, got = getattr(written.config, attr, None), getattr(loaded.config, attr, None)
        assert got == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), attr
    head_dims = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                 for c in (loaded.config, written.config)]
    assert head_dims[0] == head_dims[1]

    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than any window (16)
    with torch.no_grad():
        want, got = written.model(ids).logits, loaded.model(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-6

    tokenizer = load_tokenizer(folder)
    vocab = loaded.tokenizer.get_vocab()
    text = STORY
    if family.startswith("gemma"):
        # GemmaTokenizer adds Gemma's special tokens, which stories260K's vocabulary lacks, above the model's
        # vocabulary (text never maps to them), and no space in front of the text (llama.cpp writes
        # add_space_prefix false for Gemma)
        assert {t: i for t, i in vocab.items() if i >= 512} == {"<bos>": 512, "<eos>": 513, "<pad>": 514, "<mask>": 515}
        vocab = {t: i for t, i in vocab.items() if i < 512}
        text = " " + STORY
    assert vocab == tokenizer.get_vocab()
    assert loaded.tokenizer(text).input_ids == tokenizer(STORY).input_ids

    calib = load_windows(TEXT, tokenizer, seq_len=32, n_windows=2, role="calib")
    spec = QuantSpec(format="fp8")
    a = quantize(written.model, spec, calib, progress=False).layers
    b = quantize(loaded.model, spec, calib, progress=False).layers
    quantized = [n for n, r in a.items() if r.quantized]
    assert quantized == [n for n, r in b.items() if r.quantized]
    assert len(quantized) == len(architecture(written.model).linear_names(written.model.model.layers))
    for name in quantized:
        assert torch.equal(a[name].codes.float(), b[name].codes.float()), name
        assert torch.equal(a[name].weight_scale, b[name].weight_scale), name
        assert torch.equal(a[name].act_scale, b[name].act_scale), name


@pytest.mark.parametrize("name, overrides, fragment", REFUSALS, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(REFUSALS)])
def test_a_gguf_transformers_reads_wrong_is_refused_in_one_line(name, overrides, fragment, tmp_path, cache,
                                                                 shared_dir):
    _, path = _gguf(tmp_path, name, overrides)
    with pytest.raises(UserError, match="quantaudit reads the GGUF files of llama, mistral, qwen2") as info:
        load_model(str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not any(cache.rglob("config.json"))  # nothing cached


def test_a_gguf_missing_a_weight_is_refused_not_left_random(tmp_path, cache, shared_dir):
    """transformers would initialise a weight the file lacks at random; quantaudit names it and stops."""
    _, path = _gguf(tmp_path, "llama", {}, drop="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(UserError, match=r"left 1 weights unfilled or misshapen \(model.layers.1.mlp.down_proj.weight\)"):
        load_model(str(path))
    assert not any(cache.rglob("config.json"))


def test_cli_audits_a_gguf_and_refuses_an_unreadable_one(tmp_path, cache, shared_dir, capsys):
    """`audit` on a Qwen3 GGUF finishes with real statistics; on a Granite GGUF it exits 2 with one line."""
    _, path = _gguf(tmp_path, "qwen3", LOADS["qwen3"])
    code, _, err = run_cli(tiny_audit(tmp_path / "run", model=path), capsys)
    assert code in (0, 3), err
    formats = json.loads((tmp_path / "run/report.json").read_text())["formats"]
    assert [f["name"] for f in formats] == ["int8_wo"] and formats[0]["kld"]["mean"] > 0
    _, granite = _gguf(tmp_path, "granite", {})
    assert_refused(*run_cli(tiny_audit(tmp_path / "refused", model=granite), capsys), "GGUF architecture 'granite'")
    assert not (tmp_path / "refused").exists()
