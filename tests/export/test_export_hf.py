"""Unified HF checkpoint export of stories260K: names, dtypes and shapes as ModelOpt's
unified_export_hf writes them and TensorRT-LLM's PyTorch backend / vLLM read them (written here
independently of quantaudit.export.layout), the configs, the exact round trip, and refusals."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from export_helpers import logits, quant_linears
from safetensors.torch import load_file

from quantaudit.errors import UserError
from quantaudit.export import export_checkpoint
from quantaudit.export.hf import build_hf
from quantaudit.export.reader import load_hf_checkpoint

F32, I8, U8, F8 = torch.float32, torch.int8, torch.uint8, torch.float8_e4m3fn
CKPT = "checkpoint dtype"
# quant_algo -> {suffix: (dtype, shape(out, in))}; "unfused:" entries only on o_proj/down_proj.
DOCUMENTED = {
    "FP8": {"weight": (F8, lambda o, i: (o, i)), "weight_scale": (F32, lambda o, i: ()), "input_scale": (F32, lambda o, i: ())},
    "FP8_PER_CHANNEL_PER_TOKEN": {"weight": (F8, lambda o, i: (o, i)), "weight_scale": (F32, lambda o, i: (o,))},
    "W8A16": {"weight": (I8, lambda o, i: (o, i)), "weight_scale": (F32, lambda o, i: (o,))},
    "W4A16_AWQ": {"weight": (U8, lambda o, i: (o // 2, i)), "weight_scale": (F32, lambda o, i: (o, i // 64)),
                  "unfused:pre_quant_scale": (CKPT, lambda o, i: (i,))},
    "W4A8_AWQ": {"weight": (U8, lambda o, i: (o // 2, i)), "weight_scale": (F32, lambda o, i: (o, i // 64)),
                 "weight_scale_2": (F32, lambda o, i: ()), "input_scale": (F32, lambda o, i: ()),
                 "unfused:pre_quant_scale": (CKPT, lambda o, i: (i,))},
}
ALGO = {"fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN", "int8_wo": "W8A16", "int4_wo": "W4A16_AWQ",
        "int4_gptq": "W4A16_AWQ", "int4_awq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ"}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (172, 64), "mlp.up_proj": (172, 64), "mlp.down_proj": (64, 172)}


def expected_layout(fmt: str, dtype: torch.dtype, kv: bool) -> dict:
    algo = ALGO[fmt]
    out = {"model.embed_tokens.weight": (dtype, (512, 64)), "model.norm.weight": (dtype, (64,))}  # lm_head tied: absent
    for n in range(5):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (dtype, (64,))
        if kv:
            out[p + "self_attn.k_proj.k_scale"] = out[p + "self_attn.v_proj.v_scale"] = (F32, ())
        for name, (o, i) in LINEARS.items():
            if algo.startswith("W4") and i % 64:
                out[p + name + ".weight"] = (dtype, (o, i))
                continue
            for suffix, (dt, shape) in DOCUMENTED[algo].items():
                if suffix.startswith("unfused:"):
                    if name not in ("self_attn.o_proj", "mlp.down_proj"):
                        continue
                    suffix = suffix[len("unfused:"):]
                out[p + name + "." + suffix] = (dtype if dt == CKPT else dt, shape(o, i))
    return out


@pytest.mark.parametrize("fmt", list(ALGO))
def test_hf_tensors_configs_and_exact_round_trip(fmt, quantized, stories, ids, tmp_path):
    kv = "fp8" if fmt in ("fp8", "int4_awq") else "none"
    qm = quantized(fmt, kv=kv)
    path = tmp_path / "hf"
    result = export_checkpoint(qm, stories.config, path, target="hf", dtype="float32", tokenizer=stories.tokenizer)
    tensors = load_file(path / "model.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected_layout(fmt, F32, kv != "none")

    algo = ALGO[fmt]
    excluded = ["lm_head"] + ([f"model.layers.{n}.mlp.down_proj" for n in range(5)] if algo.startswith("W4") else [])
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant["exclude_modules"] == excluded
    assert quant["kv_cache_quant_algo"] == ("FP8" if kv == "fp8" else None)
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["ignore"]) == ("modelopt", algo, excluded)
    assert ("kv_cache_scheme" in qc) == (kv == "fp8") and config["tie_word_embeddings"] is True
    assert (path / "tokenizer.json").is_file()
    if algo.startswith("W4"):
        assert (quant["group_size"], qc["group_size"], quant["pre_quant_scale"]) == (64, 64, fmt in ("int4_awq", "w4a8_awq"))

    expected = copy.deepcopy(qm.model)  # what the checkpoint defines: AWQ scales of norm-fed linears folded into the norm
    for n, layer in enumerate(expected.model.layers):
        for norm, names in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                            (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
            linears = [getattr(layer.self_attn if n_ in ("q_proj", "k_proj", "v_proj") else layer.mlp, n_) for n_ in names]
            if getattr(linears[0], "pre_quant_scale", None) is not None:
                norm.weight.data = norm.weight.data * linears[0].pre_quant_scale
                for linear in linears:
                    linear.pre_quant_scale = None
    rebuilt = load_hf_checkpoint(path)
    assert torch.equal(logits(rebuilt, ids), logits(expected, ids))
    for name, module in quant_linears(rebuilt).items():
        assert torch.equal(module.codes, qm.layers[name].codes)
    if kv == "fp8":  # K and V scales as vLLM reads them: the audited ones (one per layer by default)
        for n, layer in enumerate(rebuilt.model.layers):
            assert layer.self_attn.kv_quantizer.k_scale.item() == qm.kv_scales[n].k_scale.item()
            assert layer.self_attn.kv_quantizer.v_scale.item() == qm.kv_scales[n].v_scale.item()
    assert any("folded" in n for n in result.notes) == (fmt in ("int4_awq", "w4a8_awq"))
    assert any("scale 1.0" in n for n in result.notes) == (kv == "fp8")  # TensorRT-LLM's PyTorch FP8 KV cache


@pytest.mark.parametrize("fmt", ["w4a8_awq", "fp8"])
def test_fused_linears_hold_one_scale_each_of_what_the_loader_requires_equal(fmt, quantized, stories):
    """q/k/v and gate/up are one GEMM in TensorRT-LLM's PyTorch backend and vLLM: W4A8's weight_scale_2 and
    input_scale (asserted equal there) and FP8's weight_scale and input_scale (else re-quantized to the larger)
    are one value per group, the largest, written unchanged."""
    qm = quantized(fmt)
    tensors = build_hf(qm, stories.config, "float16").tensors
    p = "model.layers.2."
    role = "weight_scale_2" if fmt == "w4a8_awq" else "weight_scale"
    for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        records = [qm.layers[p + x] for x in parts]
        first = [r.codes.float() * (r.weight_scale.float().repeat_interleave(64, 1) if fmt == "w4a8_awq" else 1)
                 for r in records]
        if fmt == "fp8":
            first = [stories.model.get_submodule(r.name).weight.detach() for r in records]
        shared = max(f.abs().max().item() for f in first) / 448
        for x, record in zip(parts, records):
            assert tensors[p + f"{x}.{role}"].item() == getattr(record, role).item() == pytest.approx(shared, rel=1e-6)
            assert tensors[p + f"{x}.input_scale"].item() == records[0].act_scale.item()


def test_fused_linears_with_different_scales_are_refused(quantized, stories):
    """The exporter never averages or re-quantizes: parts of one GEMM that disagree are refused."""
    qm = copy.copy(quantized("w4a8_awq"))
    qm.layers = dict(qm.layers)
    up = qm.layers["model.layers.0.mlp.up_proj"]
    qm.layers[up.name] = copy.copy(up)
    qm.layers[up.name].weight_scale_2 = up.weight_scale_2 * 2
    with pytest.raises(UserError, match=r"mlp.\{gate_proj,up_proj\} \(one GEMM in TensorRT-LLM's PyTorch backend\)"):
        build_hf(qm, stories.config)


def test_separate_kv_scales_are_written_separately(quantized, stories, ids, tmp_path):
    qm = quantized("fp8", kv="fp8", kv_scales="separate")
    path = tmp_path / "hf"
    export_checkpoint(qm, stories.config, path, target="hf", dtype="float32")
    tensors = load_file(path / "model.safetensors")
    for n, s in qm.kv_scales.items():
        p = f"model.layers.{n}.self_attn."
        assert tensors[p + "k_proj.k_scale"].item() == (s.k_amax / 448).item()
        assert tensors[p + "v_proj.v_scale"].item() == (s.v_amax / 448).item() != tensors[p + "k_proj.k_scale"].item()
    assert torch.equal(logits(load_hf_checkpoint(path), ids), logits(qm.model, ids))


@pytest.mark.parametrize("fmt", ["int8_sq", "int8_sq_static", "int8_w8a8_nosmooth"])
def test_smoothquant_has_no_hf_form(fmt, quantized, stories, tmp_path):
    with pytest.raises(UserError, match=f"{fmt} has no ModelOpt unified-checkpoint form.*--target trtllm"):
        export_checkpoint(quantized(fmt), stories.config, tmp_path / "hf", target="hf")
    assert not (tmp_path / "hf").exists()


def test_hf_refuses_tp_mixed_plans_and_int8_kv(quantized, stories):
    with pytest.raises(UserError, match="--tp applies to --target trtllm"):
        build_hf(quantized("fp8"), stories.config, tp=2)
    plan = {"model.layers.0.mlp.down_proj": "fp8_pc_pt"}
    with pytest.raises(UserError, match="mixed-precision plans .* export only to --target trtllm"):
        build_hf(quantized("fp8", plan=plan), stories.config)
    with pytest.raises(UserError, match="KV cache FP8 only"):
        build_hf(quantized("fp8", kv="int8"), stories.config)


def test_hf_refuses_two_group_sizes(stories):
    records = {"a": SimpleNamespace(quantized=True, format="int4_gptq", group_size=64),
               "b": SimpleNamespace(quantized=True, format="int4_gptq", group_size=128)}
    with pytest.raises(UserError, match=r"one INT4 group size but the layers use \[64, 128\].*--group-size 64"):
        build_hf(SimpleNamespace(layers=records, spec=SimpleNamespace(kv_cache="none")), stories.config)
