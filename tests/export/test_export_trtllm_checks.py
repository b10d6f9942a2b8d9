"""TensorRT-LLM checkpoint export of stories260K: tensor-parallel shards, mixed-precision plans,
build files, refusals and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import logits
from safetensors.torch import load_file

from quantaudit.errors import UserError
from quantaudit.export import export_checkpoint
from quantaudit.export.reader import load_trtllm_checkpoint


def export(qm, stories, tmp_path, name="ckpt", **kw):
    path = tmp_path / name
    result = export_checkpoint(qm, stories.config, path, **kw)
    return path, result


def ranks(path, tp=1):
    return [load_file(path / f"rank{r}.safetensors") for r in range(tp)]


@pytest.mark.parametrize("fmt,kv", [("fp8", "fp8"), ("int8_sq", "none")])
def test_tp2_splits_heads_columns_and_rows_and_reassembles(fmt, kv, quantized, stories, ids, tmp_path):
    qm = quantized(fmt, kv=kv)
    path, result = export(qm, stories, tmp_path, dtype="float32", tp=2)
    shards = ranks(path, tp=2)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    layer = qm.layers
    q, k, v = (layer[f"model.layers.1.self_attn.{p}_proj"].codes.float() for p in "qkv")
    o, gate, down = (layer[f"model.layers.1.{p}"].codes.float() for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    for r, t in enumerate(shards):
        p = "transformer.layers.1."
        # 4 of 8 query heads and 2 of 4 KV heads (8 rows each) per rank: GQA groups stay together
        assert torch.equal(t[p + "attention.qkv.weight"].float(),
                           torch.cat([q[32 * r: 32 * (r + 1)], k[16 * r: 16 * (r + 1)], v[16 * r: 16 * (r + 1)]]))
        assert torch.equal(t[p + "attention.dense.weight"].float(), o[:, 32 * r: 32 * (r + 1)])
        assert torch.equal(t[p + "mlp.fc.weight"].float(), gate[86 * r: 86 * (r + 1)])
        assert torch.equal(t[p + "mlp.proj.weight"].float(), down[:, 86 * r: 86 * (r + 1)])
        assert torch.equal(t["transformer.vocab_embedding.weight"], stories.model.model.embed_tokens.weight[256 * r: 256 * (r + 1)])
        assert torch.equal(t[p + "input_layernorm.weight"], qm.model.model.layers[1].input_layernorm.weight)
    if fmt == "int8_sq":
        s = layer["model.layers.1.mlp.down_proj"].details["smoothing_scale"]
        assert torch.equal(shards[1]["transformer.layers.1.mlp.proj.smoother"], s[86:].reshape(1, -1))
        assert torch.equal(shards[0]["transformer.layers.1.attention.qkv.per_channel_scale"][0, :32],
                           layer["model.layers.1.self_attn.q_proj"].weight_scale[:32, 0])
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(qm.model, ids))


def test_mixed_precision_plan_writes_quant_cfg_and_round_trips(quantized, stories, ids, tmp_path):
    plan = {f"model.layers.{n}.mlp.down_proj": "fp8" for n in range(5)} | {"model.layers.0.mlp.up_proj": "int4_wo",
                                                                          "model.layers.0.mlp.gate_proj": "int4_wo"}
    qm = quantized("int4_gptq", plan=plan)
    path, result = export(qm, stories, tmp_path, dtype="float32")
    assert json.loads((path / "config.json").read_text())["quantization"] == {"quant_algo": "MIXED_PRECISION",
                                                                              "kv_cache_quant_algo": None}
    layers = json.loads((path / "quant_cfg.json").read_text())["quantized_layers"]
    int4 = {"quant_algo": "W4A16_AWQ", "group_size": 64, "has_zero_point": False}
    assert layers["transformer.layers.0.mlp.proj"] == {"quant_algo": "FP8"}
    assert layers["transformer.layers.0.mlp.fc"] == layers["transformer.layers.3.attention.qkv"] == {**int4, "pre_quant_scale": False}
    provenance = json.loads((path / "quantaudit_export.json").read_text())["layers"]
    assert provenance["model.layers.0.mlp.gate_proj"] == "int4_wo" and provenance["model.layers.3.mlp.gate_proj"] == "int4_gptq"
    assert "lm_head" not in layers and len(layers) == 25
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(qm.model, ids))


def test_build_files_hold_the_trtllm_build_command(quantized, stories, tmp_path):
    qm = quantized("fp8", kv="fp8")
    path, result = export(qm, stories, tmp_path, tp=2)
    script = (path / "build.sh").read_text()
    build_line = next(line for line in script.splitlines() if line.startswith("trtllm-build"))
    assert "--checkpoint_dir . --output_dir engine --max_batch_size 8 --max_input_len 1024 --max_seq_len 2048" in build_line
    assert "--use_fp8_context_fmha enable" in build_line and "--workers 2" in build_line
    # FP8 gate/up hold one weight and activation scale: trtllm-build's default fused gate MLP (fuse_gate_mlp)
    # re-quantizes nothing, so no flag turns it off
    assert all(torch.equal(qm.layers[f"model.layers.{n}.mlp.gate_proj"].weight_scale,
                           qm.layers[f"model.layers.{n}.mlp.up_proj"].weight_scale) for n in range(5))
    assert "--use_fused_mlp" not in build_line
    assert (path / "build.sh").stat().st_mode & 0o100
    md = (path / "BUILD.md").read_text()
    assert build_line in md and all(n in md for n in result.notes)
    no_kv, _ = export(quantized("fp8"), stories, tmp_path, name="nokv")
    assert "--use_fp8_context_fmha" not in (no_kv / "build.sh").read_text()
    provenance = json.loads((path / "quantaudit_export.json").read_text())
    assert provenance["layers"]["model.layers.0.self_attn.q_proj"] == "fp8" and provenance["layers"]["lm_head"] is None
    assert provenance["calib"]["fingerprint"] == qm.calib_info["fingerprint"]


# ---------------------------------------------------------------- refusals and atomicity


def test_tp_that_does_not_divide_the_heads_is_refused(quantized, stories, tmp_path):
    with pytest.raises(UserError, match="--tp 3 does not divide the 8 attention heads"):
        export(quantized("fp8"), stories, tmp_path, tp=3)
    with pytest.raises(UserError, match="not whole groups of 64"):  # 64 inputs split in two are half a group
        export(quantized("int4_gptq"), stories, tmp_path, tp=2)
    assert not (tmp_path / "ckpt").exists()


def test_existing_output_is_refused_unless_forced(quantized, stories, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export(quantized("fp8"), stories, tmp_path)
    assert (out / "keep.txt").read_text() == "mine"
    export(quantized("fp8"), stories, tmp_path, force=True)
    assert not (out / "keep.txt").exists() and (out / "rank0.safetensors").is_file()


def test_a_failed_export_leaves_nothing_behind(quantized, stories, tmp_path, monkeypatch):
    import quantaudit.export as export_module

    def fail(tensors, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_save", fail)
    with pytest.raises(OSError, match="disk full"):
        export(quantized("fp8"), stories, tmp_path)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(OSError):
        export(quantized("fp8"), stories, tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (out / "old.txt").read_text() == "previous export"


def test_formats_tensorrt_llm_applies_to_whole_blocks_refuse_exclusions(quantized, stories, tmp_path):
    qm = quantized("int8_sq", exclude=("model.layers.0.mlp.down_proj",))
    with pytest.raises(UserError, match="whole attention/MLP blocks.*transformer.layers.0.mlp.proj is unquantized"):
        export(qm, stories, tmp_path)


def test_qkv_parts_in_different_formats_are_refused(quantized, stories, tmp_path):
    qm = quantized("fp8", plan={"model.layers.0.self_attn.k_proj": "int8_sq_static"})
    with pytest.raises(UserError, match="transformer.layers.0.attention.qkv is one linear.*k_proj=int8_sq_static"):
        export(qm, stories, tmp_path)


def test_other_architectures_are_refused(quantized, tmp_path):
    from transformers import GPT2Config

    with pytest.raises(UserError, match="writes the model types llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, "
                                        r"mixtral \(the decoders .*; this model is .gpt2.: quantaudit does not audit that family"):
        export_checkpoint(quantized("fp8"), GPT2Config(architectures=["GPT2LMHeadModel"]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_lm_head_is_refused_where_tensorrt_llm_leaves_it_unquantized(quantized, stories, tmp_path):
    with pytest.raises(UserError, match="W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN leaves lm_head unquantized"):
        export(quantized("int8_sq", include_lm_head=True), stories, tmp_path)


def test_quantized_lm_head_round_trips_in_fp8(quantized, stories, ids, tmp_path):
    qm = quantized("fp8", include_lm_head=True)
    path, _ = export(qm, stories, tmp_path, dtype="float32")
    (tensors,) = ranks(path)
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn and tensors["lm_head.weights_scaling_factor"].shape == (1,)
    assert json.loads((path / "config.json").read_text())["quantization"]["exclude_modules"] == []
    assert torch.equal(logits(load_trtllm_checkpoint(path), ids), logits(qm.model, ids))
