"""``export --target trtllm`` of every decoder family ModelOpt writes for TensorRT-LLM, on tiny random-weight models
(tests/tiny_models.py): each tensor's name, dtype and shape, the family's config keys and stored values as
TensorRT-LLM's own converters write them (written here from ``tensorrt_llm/models/<family>/convert.py`` and
``config.py``, ``layers/moe.py`` and ModelOpt's ``layer_utils``, independently of quantaudit.arch), the bit-exact
round trip through the reader, and the one-line refusals of what a family's TensorRT-LLM decoder would run
differently."""

from __future__ import annotations

import json
import re

import pytest
import torch
from export_helpers import logits
from safetensors.torch import load_file
from tiny_models import build_tiny_model

from quantaudit.cli import main
from quantaudit.errors import UserError
from quantaudit.export import export_checkpoint
from quantaudit.export.build import BuildSettings
from quantaudit.export.reader import load_trtllm_checkpoint
from quantaudit.export.trtllm import check_trtllm_request
from quantaudit.quant import AWQOptions, QuantSpec, quantize

F16, F32, F8, I8, U8 = torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.uint8
H, INTER, HEADS, KV, HD, VOCAB = 128, 256, 4, 2, 32, 512  # tests/tiny_models.py
QKV = (HEADS + 2 * KV) * HD
# Engines of 64 tokens: the sliding windows of the Gemma 2/3 models below (64) never bind in them.
BUILD = BuildSettings(max_batch_size=8, max_input_len=32, max_output_len=32)
# Overrides making each tiny model one TensorRT-LLM runs as audited: q/k norms with TensorRT-LLM's eps (1e-5),
# sliding windows no shorter than the engine.
EXPORTABLE = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"rms_norm_eps": 1e-5}, "gemma": {},
    "gemma2": {"sliding_window": 64}, "gemma3_text": {"sliding_window": 64, "rms_norm_eps": 1e-5}, "phi3": {},
}

# Per family, from TensorRT-LLM: architecture, decoder (ModelOpt's decoder type), the layer's linears (GatedMLP:
# mlp.fc = gate_proj, mlp.gate = up_proj; Phi-3's MLP: one fused mlp.fc), its norms, lm_head written or shared.
GATED = {"attention.qkv": (QKV, H), "attention.dense": (H, HEADS * HD), "mlp.fc": (INTER, H), "mlp.gate": (INTER, H),
         "mlp.proj": (H, INTER)}
NORMS = {"input_layernorm": (H,), "post_layernorm": (H,)}
QK_NORMS = {"attention.q_layernorm": (HD,), "attention.k_layernorm": (HD,)}  # RmsNorm over head_size
GEMMA2_NORMS = {**NORMS, "pre_feedforward_layernorm": (H,), "post_feedforward_layernorm": (H,)}
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", GATED, NORMS, True),
    "mistral": ("MistralForCausalLM", "llama", GATED, NORMS, True),
    "qwen2": ("Qwen2ForCausalLM", "qwen", GATED, NORMS, True),
    "qwen3": ("Qwen3ForCausalLM", "qwen", GATED, {**NORMS, **QK_NORMS}, True),
    "gemma": ("GemmaForCausalLM", "gemma", GATED, NORMS, False),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", GATED, GEMMA2_NORMS, False),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3", GATED, {**GEMMA2_NORMS, **QK_NORMS}, False),
    "phi3": ("Phi3ForCausalLM", "phi3", {"attention.qkv": (QKV, H), "attention.dense": (H, H),
                                         "mlp.fc": (2 * INTER, H), "mlp.proj": (H, INTER)}, NORMS, True),
}
# The keys each family's TensorRT-LLM config class reads beyond the common ones (models/qwen/config.py QWenConfig,
# models/gemma/config.py GemmaConfig + modeling_utils Gemma2/3ConfigGroup), with the tiny models' values.
FAMILY_KEYS = {
    "qwen2": {"qwen_type": "qwen2", "attn_bias": True, "mlp_bias": False, "seq_length": 8192, "use_logn_attn": False},
    "qwen3": {"qwen_type": "qwen3", "attn_bias": False, "mlp_bias": False, "seq_length": 8192, "use_logn_attn": False},
    "gemma": {"attn_bias": False, "mlp_bias": False},
    "gemma2": {"attn_bias": False, "mlp_bias": False, "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3_text": {"attn_bias": False, "mlp_bias": False, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
                    "_sliding_window_pattern": 2, "rope_local_base_freq": 10000.0, "sliding_window": 64},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_dir):
    """tiny(name, **overrides) -> LoadedModel, built once per module."""
    from quantaudit.models import load_model

    built = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in built:
            folder = build_tiny_model(name, tmp_path_factory.mktemp(name), shared_dir / "models/stories260K/hf", **overrides)
            built[key] = load_model(str(folder))
        return built[key]

    return get


@pytest.fixture(scope="module")
def windows(tiny, shared_dir):
    from quantaudit.data import load_windows

    return load_windows(shared_dir / "data/tinystories_sample.txt", tiny("llama").tokenizer, seq_len=32, n_windows=2,
                        role="calib")


def _quantize(lm, windows, fmt: str, kv: str = "fp8"):
    spec = QuantSpec(format=fmt, kv_cache=kv, group_size=64, awq=AWQOptions(n_grid=2))
    return quantize(lm.model, spec, windows, progress=False)


def expected_fp8_layout(name: str, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    _, _, linears, norms, lm_head = FAMILIES[name]
    out = {"transformer.vocab_embedding.weight": (dtype, (VOCAB, H)), "transformer.ln_f.weight": (dtype, (H,))}
    if lm_head:
        out["lm_head.weight"] = (dtype, (VOCAB, H))
    for n in range(2):
        p = f"transformer.layers.{n}."
        out.update({p + norm + ".weight": (dtype, shape) for norm, shape in norms.items()})
        for linear, shape in linears.items():
            out.update({p + linear + ".weight": (F8, shape), p + linear + ".weights_scaling_factor": (F32, (1,)),
                        p + linear + ".activation_scaling_factor": (F32, (1,))})
        if name == "qwen2":  # convert.py: qkv_b = concat(bq, bk, bv), in the checkpoint dtype
            out[p + "attention.qkv.bias"] = (dtype, (QKV,))
        for scale in ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor"):
            out[p + "attention." + scale] = (F32, (1,))
    return out


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_every_tensor_and_config_key_is_the_family_one(name, tiny, windows, tmp_path):
    lm = tiny(name, **EXPORTABLE[name])
    qm = _quantize(lm, windows, "fp8")
    path = tmp_path / "ckpt"
    export_checkpoint(qm, lm.config, path, dtype="float16", build=BUILD)
    tensors = load_file(path / "rank0.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected_fp8_layout(name, F16)
    cfg = json.loads((path / "config.json").read_text())
    architecture, decoder, _, _, lm_head = FAMILIES[name]
    assert (cfg["architecture"], cfg["decoder"], cfg["share_embedding_table"]) == (architecture, decoder, not lm_head)
    assert {k: cfg[k] for k in FAMILY_KEYS.get(name, {})} == FAMILY_KEYS.get(name, {})
    # Phi3Config: "swiglu" if hidden_act == "silu"; Gemma's gelu_pytorch_tanh as ModelOpt writes it
    assert cfg["hidden_act"] == {"phi3": "swiglu", "gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh",
                                 "gemma3_text": "gelu_pytorch_tanh"}.get(name, "silu")
    assert cfg["rotary_base"] == (1e6 if name == "gemma3_text" else 10000.0)  # Gemma 3: the global layers' base
    assert cfg["quantization"]["exclude_modules"] == ["lm_head"]


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "qwen3", "qwen2", "phi3"])
def test_stored_values_are_what_tensorrt_llm_converters_write(name, tiny, windows, tmp_path):
    """Gemma's norms (q/k norms too) hold 1 + w (gemma/convert.py: ``param + 1.0``), Qwen 3's q/k norms are the HF
    ones, Qwen 2's qkv bias is q, k, v's, Phi-3's mlp.fc is gate_up_proj with its halves swapped (phi3/convert.py)."""
    lm = tiny(name, **EXPORTABLE[name])
    qm = _quantize(lm, windows, "int8_sq" if name == "phi3" else "fp8")
    path = tmp_path / "ckpt"
    export_checkpoint(qm, lm.config, path, dtype="float32", build=BUILD)
    tensors = load_file(path / "rank0.safetensors")
    state = qm.model.state_dict()
    offset = 1.0 if name.startswith("gemma") else 0.0
    _, _, _, norms, _ = FAMILIES[name]
    hf_norms = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm",
                "pre_feedforward_layernorm": "pre_feedforward_layernorm",
                "post_feedforward_layernorm": "post_feedforward_layernorm",
                "attention.q_layernorm": "self_attn.q_norm", "attention.k_layernorm": "self_attn.k_norm"}
    for n in range(2):
        for norm in norms:
            stored = tensors[f"transformer.layers.{n}.{norm}.weight"]
            assert torch.equal(stored, state[f"model.layers.{n}.{hf_norms[norm]}.weight"] + offset), norm
        if name == "qwen2":
            bias = torch.cat([state[f"model.layers.{n}.self_attn.{x}_proj.bias"] for x in "qkv"])
            assert torch.equal(tensors[f"transformer.layers.{n}.attention.qkv.bias"], bias)
        if name == "phi3":
            codes = qm.layers[f"model.layers.{n}.mlp.gate_up_proj"].codes
            assert torch.equal(tensors[f"transformer.layers.{n}.mlp.fc.weight"], torch.cat([codes[INTER:], codes[:INTER]]))
            assert torch.equal(tensors[f"transformer.layers.{n}.attention.qkv.weight"],
                               qm.layers[f"model.layers.{n}.self_attn.qkv_proj"].codes)
    assert torch.equal(tensors["transformer.ln_f.weight"], state["model.norm.weight"] + offset)


ROUND_TRIP = ("int8_wo", "fp8", "int4_awq", "int4_gptq", "nvfp4", "int8_sq")
# TensorRT-LLM's SmoothQuant plugin makes every RmsNorm quantize its output: refused where a norm feeds no linear
NO_SQ = ("qwen3", "gemma2", "gemma3_text")


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_reader_reproduces_the_audited_logits_exactly(name, tiny, windows, tmp_path):
    """float32 checkpoint, FP8 KV cache: the checkpoint read back computes the audited logits bit for bit, in every
    format the family's TensorRT-LLM decoder runs as audited."""
    lm = tiny(name, **EXPORTABLE[name])
    for fmt in ROUND_TRIP:
        if fmt == "int8_sq" and name in NO_SQ:
            continue
        qm = _quantize(lm, windows, fmt)
        export_checkpoint(qm, lm.config, tmp_path / fmt, dtype="float32", build=BUILD)
        assert torch.equal(logits(load_trtllm_checkpoint(tmp_path / fmt), windows.ids), logits(qm.model, windows.ids)), fmt


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma", "gemma3_text"])
def test_tp2_reassembles_to_the_audited_logits(name, tiny, windows, tmp_path):
    """Biases split with their heads, q/k and Gemma norms replicated, the shared embedding split on the vocabulary."""
    lm = tiny(name, **EXPORTABLE[name])
    qm = _quantize(lm, windows, "fp8")
    export_checkpoint(qm, lm.config, tmp_path / "ckpt", dtype="float32", tp=2, build=BUILD)
    shards = [load_file(tmp_path / "ckpt" / f"rank{r}.safetensors") for r in range(2)]
    assert shards[0]["transformer.vocab_embedding.weight"].shape == (VOCAB // 2, H)
    assert shards[0]["transformer.layers.1.attention.qkv.weight"].shape == (QKV // 2, H)
    if name == "qwen2":
        q, k, v = (qm.model.model.layers[1].self_attn.get_submodule(f"{x}_proj").bias for x in "qkv")
        assert torch.equal(shards[1]["transformer.layers.1.attention.qkv.bias"],
                           torch.cat([q[HEADS * HD // 2:], k[KV * HD // 2:], v[KV * HD // 2:]]))
    assert torch.equal(logits(load_trtllm_checkpoint(tmp_path / "ckpt"), windows.ids), logits(qm.model, windows.ids))


def test_a_refused_sliding_window_leaves_no_folder(tiny, windows, tmp_path):
    """Gemma 2 with a 64-token window, exported for trtllm-build's default 2048 tokens: refused, nothing written."""
    lm = tiny("gemma2", **EXPORTABLE["gemma2"])
    qm = _quantize(lm, windows, "fp8", kv="none")
    with pytest.raises(UserError, match=r"1 of the 2 layers of this gemma2 model attend to a sliding window of 64 "
                                        r"tokens.*now 2048"):
        export_checkpoint(qm, lm.config, tmp_path / "ckpt", dtype="float32")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name, overrides, flags, expected", [
    # layers/attention.py: the q/k RmsNorms of TensorRT-LLM's qwen and gemma3 decoders use eps 1e-05
    ("qwen3", {}, [], r"qwen decoder normalises queries and keys with eps 1e-05 .* with 1e-06"),
    ("gemma3_text", {"sliding_window": 64}, [], r"gemma3 decoder normalises queries and keys with eps 1e-05"),
    ("gemma2", {"sliding_window": 16}, [], r"attend to a sliding window of 16 tokens.*now 64"),
    ("gemma3_text", {"sliding_window": 64, "rms_norm_eps": 1e-5,
                     "layer_types": ["full_attention", "sliding_attention"]}, [], r"not one full layer every 1 layers"),
    ("qwen3", {"rms_norm_eps": 1e-5}, ["--format", "int8_sq"],
     r"int8_sq \(W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN\).*attention.q_layernorm, attention.k_layernorm feed no linear"),
    ("gemma2", {"sliding_window": 64}, ["--format", "fp8_pc_pt"],
     r"fp8_pc_pt .*gemma2's post_layernorm, post_feedforward_layernorm feed no linear"),
    ("phi3", {}, ["--tp", "2"], r"--tp 2: quantaudit writes phi3 models for one rank only"),
    ("granite", {}, [], (r"writes the model types llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, "
                         r"mixtral .*this model is 'granite'")),
    ("olmo2", {}, [], r"this model is 'olmo2': use --target hf"),
    # TensorRT-LLM's TensorRT-engine MoE decoders are not written for these (their PyTorch backend reads --target hf)
    ("qwen3_moe", {}, [], r"this model is 'qwen3_moe': use --target hf"),
    ("gpt_oss", {}, [], r"this model is 'gpt_oss': quantaudit exports it to neither target yet"),
    # layers/moe.py: no SmoothQuant path; preprocess_perlayer_weights keeps expert 0's AWQ pre-quant scale for all
    ("mixtral", {}, ["--format", "int4_awq"],
     r"MoE layer .* runs mixtral experts as audited in fp8, int8_wo, int4_wo, int4_gptq, nvfp4 only, not int4_awq"),
    ("mixtral", {}, ["--format", "int8_sq"], r"runs mixtral experts as audited in .* only, not int8_sq"),
    ("mixtral", {}, ["--tp", "2"], r"--tp 2: quantaudit writes mixtral models for one rank only"),
    # found once quantized (--exclude patterns meet the layer names there), before anything is written
    ("mixtral", {}, ["--exclude", "*.experts.*"], r"builds the MoE layers .* in the checkpoint's one quant_algo"),
])
def test_what_tensorrt_llm_would_run_differently_is_refused_in_one_line(name, overrides, flags, expected, shared_dir,
                                                                        tmp_path, capsys):
    """`quantaudit export --target trtllm` refuses before quantizing: one line, exit code 2, no --out folder."""
    model = build_tiny_model(name, tmp_path / "model", shared_dir / "models/stories260K/hf", **overrides)
    args = ["export", "--model", str(model), "--calib", str(shared_dir / "data/tinystories_sample.txt"),
            "--calib-size", "1", "--calib-seq", "32", "--max-input-len", "32", "--max-output-len", "32",
            "--out", str(tmp_path / "out"), "--target", "trtllm"]
    flags = flags if "--format" in flags else ["--format", "fp8", *flags]
    capsys.readouterr()
    code = main([*args, *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


# Mixtral as TensorRT-LLM's llama decoder with MixtureOfExperts reads it (layers/moe.py MOEWeightWrapper, after
# modeling_utils.preprocess_weights) from what ModelOpt's layer_utils.build_moe_config writes: mlp.fc stacks per expert
# [w3; w1] = [up_proj; gate_proj] rows, mlp.proj down_proj, each expert's tensors on a leading experts axis; one
# activation scale for all experts; mlp.router [experts, hidden] in float32 (a float32 RowLinear), unquantized.
EXPERTS, TOP_K = 4, 2  # tests/tiny_models.py
FC, PROJ = (EXPERTS, 2 * INTER, H), (EXPERTS, H, INTER)
MOE_TENSORS = {  # per format: the stacked tensors of mlp.fc and mlp.proj
    # FP8: MOEWeightWrapper weights_scaling_factor (experts, 1), activation_scaling_factor (1,)
    "fp8": lambda w: {"weight": (F8, w), "weights_scaling_factor": (F32, (EXPERTS, 1)), "activation_scaling_factor": (F32, (1,))},
    # W8A16: the float weight, which convert_utils.weight_only_quantize quantizes per expert at load
    "int8_wo": lambda w: {"weight": (F32, w)},
    # W4A16_AWQ without pre-quant scale: INT4 pairs of output rows in int8 bytes, (experts, out, in / 64) group scales
    "int4_gptq": lambda w: {"weight": (I8, (EXPERTS, w[1] // 2, w[2])), "weights_scaling_factor": (F32, (EXPERTS, w[1], w[2] // 64))},
    # NVFP4: E2M1 pairs of inputs, E4M3 block scales of 16, one weights_scaling_factor_2 per expert (alpha (experts,))
    "nvfp4": lambda w: {"weight": (U8, (EXPERTS, w[1], w[2] // 2)), "weights_scaling_factor": (F8, (EXPERTS, w[1], w[2] // 16)),
                        "weights_scaling_factor_2": (F32, (EXPERTS,)), "activation_scaling_factor": (F32, (1,))},
}


def expected_mixtral_fp8_layout(dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    out = {"transformer.vocab_embedding.weight": (dtype, (VOCAB, H)), "transformer.ln_f.weight": (dtype, (H,)),
           "lm_head.weight": (dtype, (VOCAB, H))}
    for n in range(2):
        p = f"transformer.layers.{n}."
        out.update({p + norm + ".weight": (dtype, shape) for norm, shape in NORMS.items()})
        for linear in ("attention.qkv", "attention.dense"):  # Llama's
            out.update({p + linear + ".weight": (F8, GATED[linear]), p + linear + ".weights_scaling_factor": (F32, (1,)),
                        p + linear + ".activation_scaling_factor": (F32, (1,))})
        for linear, shape in (("mlp.fc", FC), ("mlp.proj", PROJ)):
            out.update({p + linear + "." + k: v for k, v in MOE_TENSORS["fp8"](shape).items()})
        out[p + "mlp.router.weight"] = (F32, (EXPERTS, H))
        for scale in ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor"):
            out[p + "attention." + scale] = (F32, (1,))
    return out


def test_mixtral_is_the_llama_decoder_with_tensorrt_llms_moe_layer(tiny, windows, tmp_path):
    """Tensor names, dtypes and shapes, config keys (tensorrt_llm_utils.convert_to_tensorrt_llm_config's ``moe`` and
    ``moe_tp_size`` / ``moe_ep_size``; LLaMAConfig.from_hugging_face's swiglu and RENORMALIZE for Mixtral) and the
    stored values: each expert's audited codes and weight scale, the one activation scale, the float32 router."""
    lm = tiny("mixtral")
    qm = _quantize(lm, windows, "fp8")
    path = tmp_path / "ckpt"
    export_checkpoint(qm, lm.config, path, dtype="float16", build=BUILD)
    tensors = load_file(path / "rank0.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected_mixtral_fp8_layout(F16)
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["architecture"], cfg["decoder"], cfg["hidden_act"], cfg["intermediate_size"]) == (
        "MixtralForCausalLM", "llama", "swiglu", INTER)
    assert cfg["moe"] == {"num_experts": EXPERTS, "top_k": TOP_K, "normalization_mode": 1}
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 1}
    # an explicit exclude_modules replaces quantize_layers' default "*router": the routers must be listed
    assert cfg["quantization"]["exclude_modules"] == ["lm_head", "transformer.layers.0.mlp.router",
                                                      "transformer.layers.1.mlp.router"]
    state = qm.model.state_dict()
    for n in range(2):
        p, hf = f"transformer.layers.{n}.mlp.", f"model.layers.{n}.mlp."
        records = [{proj: qm.layers[f"{hf}experts.{e}.{proj}"] for proj in ("gate_proj", "up_proj", "down_proj")}
                   for e in range(EXPERTS)]
        for e, record in enumerate(records):
            fc = torch.cat([record["up_proj"].codes, record["gate_proj"].codes])
            assert torch.equal(tensors[p + "fc.weight"][e].view(U8), fc.view(U8))
            assert torch.equal(tensors[p + "proj.weight"][e].view(U8), record["down_proj"].codes.view(U8))
            assert float(tensors[p + "fc.weights_scaling_factor"][e]) == float(record["gate_proj"].weight_scale)
            assert float(tensors[p + "fc.weights_scaling_factor"][e]) == float(record["up_proj"].weight_scale)
            assert float(tensors[p + "proj.weights_scaling_factor"][e]) == float(record["down_proj"].weight_scale)
        assert float(tensors[p + "fc.activation_scaling_factor"]) == float(records[3]["gate_proj"].act_scale)
        assert float(tensors[p + "proj.activation_scaling_factor"]) == float(records[3]["down_proj"].act_scale)
        assert torch.equal(tensors[p + "router.weight"], state[hf + "gate.weight"].float())


MIXTRAL_FORMATS = ("fp8", "int8_wo", "int4_gptq", "nvfp4")


def test_mixtral_reads_back_to_the_audited_logits_exactly(tiny, windows, tmp_path):
    """float32 checkpoint, FP8 KV cache: in every format TensorRT-LLM's MoE layer runs as audited, the stacked
    experts have the shapes MOEWeightWrapper's preprocessing takes, and the checkpoint computes the audited logits."""
    lm = tiny("mixtral")
    for fmt in MIXTRAL_FORMATS:
        qm = _quantize(lm, windows, fmt)
        export_checkpoint(qm, lm.config, tmp_path / fmt, dtype="float32", build=BUILD)
        tensors = load_file(tmp_path / fmt / "rank0.safetensors")
        for linear, shape in (("mlp.fc", FC), ("mlp.proj", PROJ)):
            stored = {k.rsplit(".", 1)[1]: (v.dtype, tuple(v.shape)) for k, v in tensors.items()
                      if k.startswith(f"transformer.layers.1.{linear}.")}
            assert stored == MOE_TENSORS[fmt](shape), (fmt, linear)
        assert torch.equal(logits(load_trtllm_checkpoint(tmp_path / fmt), windows.ids), logits(qm.model, windows.ids)), fmt


@pytest.mark.parametrize("formats, expected", [
    ({"fp8", "int8_wo"}, r"in the checkpoint's one quant_algo .*no mixed-precision plan"),
    ({"w4a8_awq"}, r"not w4a8_awq: .*one AWQ pre-quant scale to every expert"),
    ({"nvfp4_awq"}, r"not nvfp4_awq"),
    ({"fp8_pc_pt"}, r"not fp8_pc_pt: it has no SmoothQuant, FP8 per-channel or W4A8_NVFP4_FP8 path"),
])
def test_mixtral_formats_are_checked_before_quantizing(formats, expected):
    from transformers import AutoConfig

    config = AutoConfig.for_model("mixtral", num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=None)
    with pytest.raises(UserError, match=expected):
        check_trtllm_request(config, 1, 64, formats)
