"""`quantaudit export` argument handling: it quantizes as the audit does, writes the checkpoint, says
plainly that it cannot build here, and refuses bad input before any slow work."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import parse
from safetensors.torch import load_file

from quantaudit.data import load_windows
from quantaudit.errors import UserError
from quantaudit.export.command import run_export
from quantaudit.quant import QuantSpec, quantize


def test_export_quantizes_like_the_audit_and_says_it_cannot_build_here(common, stories, shared_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code = run_export(parse(*common, "--format", "fp8", "--kv-cache", "fp8", "--out", str(out), "--tp", "2", "--build"))
    printed = capsys.readouterr().out
    assert code == 0
    assert "--build/--bench skipped: tensorrt_llm is not installed here" in printed
    assert "differs from the audit" in printed and "float16" in printed  # the 16-bit embeddings and norms
    assert "KV" not in printed.split("differs from the audit", 1)[1]  # the one K/V scale is the audited one
    calib = load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, 32, 2, role="calib")
    qm = quantize(stories.model, QuantSpec(format="fp8", kv_cache="fp8"), calib, progress=False)
    rank1 = load_file(out / "rank1.safetensors")
    o = qm.layers["model.layers.4.self_attn.o_proj"]
    assert torch.equal(rank1["transformer.layers.4.attention.dense.weight"].float(), o.codes.float()[:, 32:])
    assert rank1["transformer.layers.4.attention.kv_cache_scaling_factor"].item() == qm.kv_scales[4].k_scale.item() == (
        max(qm.kv_scales[4].k_amax, qm.kv_scales[4].v_amax) / 448).item()
    provenance = json.loads((out / "quantaudit_export.json").read_text())
    assert provenance["calib"]["fingerprint"] == calib.fingerprint and provenance["tp"] == 2
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_plan_file_makes_a_mixed_precision_checkpoint(common, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "int4_gptq", "layers": {"model.layers.1.mlp.down_proj": "fp8"}}))
    assert run_export(parse(*common, "--plan", str(plan), "--group-size", "64", "--out", str(tmp_path / "mixed"))) == 0
    cfg = json.loads((tmp_path / "mixed" / "quant_cfg.json").read_text())["quantized_layers"]
    assert cfg["transformer.layers.1.mlp.proj"] == {"quant_algo": "FP8"}
    assert "transformer.layers.2.mlp.proj" not in cfg  # 172 inputs: INT4 fell back to unquantized
    assert cfg["transformer.layers.2.mlp.fc"]["quant_algo"] == "W4A16_AWQ"


def test_autotune_plan_file_exports_and_unnamed_layers_stay_unquantized(common, tmp_path):
    plan = tmp_path / "plan.json"  # the shape autotune writes
    plan.write_text(json.dumps({"plan": {"model.layers.1.mlp.down_proj": "fp8", "model.layers.0.self_attn.o_proj": "int8_wo"}}))
    assert run_export(parse(*common, "--plan", str(plan), "--out", str(tmp_path / "mixed"))) == 0
    cfg = json.loads((tmp_path / "mixed" / "quant_cfg.json").read_text())["quantized_layers"]
    assert cfg == {"transformer.layers.1.mlp.proj": {"quant_algo": "FP8"},
                   "transformer.layers.0.attention.dense": {"quant_algo": "W8A16"}}
    plan.write_text(json.dumps({"plan": {"model.layers.9.mlp.down_proj": "fp8"}}))
    with pytest.raises(UserError, match="names layer 'model.layers.9.mlp.down_proj', which this model does not have"):
        run_export(parse(*common, "--plan", str(plan), "--out", str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_bad_input_is_refused_before_loading_anything(common, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    with pytest.raises(UserError, match="not empty.*--force"):
        run_export(parse(*common, "--format", "fp8", "--out", str(full)))
    with pytest.raises(UserError, match="unknown format 'fp9'"):
        run_export(parse(*common, "--format", "fp9", "--out", str(tmp_path / "a")))
    with pytest.raises(UserError, match="plan file not found"):
        run_export(parse(*common, "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "b")))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds no plan"):
        run_export(parse(*common, "--plan", str(bad), "--out", str(tmp_path / "c")))
    with pytest.raises(SystemExit):
        parse(*common, "--format", "fp8", "--plan", str(bad), "--out", str(tmp_path / "d"))
    with pytest.raises(UserError, match="--group-size must be 64 or 128"):
        run_export(parse(*common, "--format", "int4_awq", "--group-size", "32", "--out", str(tmp_path / "f")))
    with pytest.raises(UserError, match="nothing to export"):
        run_export(parse(*common, "--format", "none", "--out", str(tmp_path / "g")))
    with pytest.raises(UserError, match="int8_sq has no ModelOpt unified-checkpoint form"):
        run_export(parse(*common, "--format", "int8_sq", "--target", "hf", "--out", str(tmp_path / "h")))
    with pytest.raises(UserError, match="--tp applies to --target trtllm"):
        run_export(parse(*common, "--format", "fp8", "--target", "hf", "--tp", "2", "--out", str(tmp_path / "e")))
    with pytest.raises(UserError, match="--kv-scales separate: a TensorRT-LLM checkpoint holds one KV-cache scale"):
        run_export(parse(*common, "--format", "fp8", "--kv-cache", "fp8", "--kv-scales", "separate", "--out",
                         str(tmp_path / "k")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "full"] and (full / "x").read_text() == "keep"


def test_kv_scales_flag_is_on_the_commands_that_take_kv_cache():
    """--kv-scales next to --kv-cache on audit, demo and export, defaulting to what TensorRT-LLM runs."""
    from quantaudit.cli import build_parser

    parser = build_parser()
    for command in ("audit", "demo", "export"):
        sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
        text = " ".join(sub.format_help().split())
        assert "--kv-scales {shared,separate}" in text and "max(K, V amax)" in text and "(default: shared)" in text
    args = parser.parse_args(["audit", "--kv-cache", "fp8", "--kv-scales", "separate", "--out", "x"])
    assert (args.kv_cache, args.kv_scales) == ("fp8", "separate")
