"""Generated bad input for `quantaudit audit` (hypothesis): budgets, flag values, JSONL texts, plan files.

Whatever is generated, the run ends in exit 0 or 3 (with a report.json that is standard JSON), or in exit
2 with one line on stderr and the previous run in --out unchanged; never a traceback, never a leftover
staging folder or lock. The examples are fixed (``derandomize``) and few, so this runs in about a minute
on stories260K.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_helpers import TEXT, leftovers, run_cli, snapshot, tiny_audit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantaudit.measure.budget import METRICS

FIXED = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def previous(shared_dir, tmp_path_factory):
    from quantaudit.cli import main

    out = tmp_path_factory.mktemp("previous") / "run"
    assert main(tiny_audit(out)) in (0, 3)
    return out


def _not_standard(constant: str):
    raise AssertionError(f"report.json holds the non-standard JSON token {constant}")


def check_run(extra: list[str], previous: Path, tmp_path: Path, capsys) -> int:
    """Run the tiny audit with ``extra`` and --force over a copy of ``previous``; check the outcome (module docstring)."""
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "run"
    shutil.copytree(previous, out)
    before = snapshot(out)
    code, stdout, stderr = run_cli(tiny_audit(out, "--force", *extra), capsys)
    assert "Traceback" not in stdout + stderr, stderr
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert snapshot(out) == before
    else:
        assert code in (0, 3), (code, stderr)
        json.loads((out / "report.json").read_text(), parse_constant=_not_standard)
    assert leftovers(out) == []
    shutil.rmtree(out.parent)
    return code


NUMBERS = st.one_of(st.integers(-3, 3).map(str), st.floats().map(repr),
                    st.sampled_from(["1e999", "-1e999", "nan", "inf", "+-1", "1e", ".", "0x10", "", "1_0", "٣"]))
TERMS = st.one_of(
    st.builds("{}{}{!r}".format, st.sampled_from(sorted(METRICS)), st.sampled_from(["<=", ">=", "<", ">"]),
              st.floats(allow_nan=False, allow_infinity=False)),
    st.builds("{}{}{}".format, st.sampled_from([*METRICS, "KLD", "kld2", "", "top-1"]),
              st.sampled_from(["<=", ">=", "<", ">", "=", "=<", "==", " <= "]), NUMBERS),
    st.text(max_size=12),
)


@settings(FIXED, max_examples=40)
@given(budget=st.lists(TERMS, max_size=3).map(",".join))
def test_generated_budgets(budget, previous, tmp_path, capsys):
    check_run([f"--budget={budget}"], previous, tmp_path, capsys)


FLAG_VALUES = {
    **{flag: st.one_of(st.integers(-2, 40).map(str), st.sampled_from(["abc", "", "1.5", "1e3", "-0", "99999999999999999999"]))
       for flag in ("--calib-size", "--calib-seq", "--windows", "--seq-len", "--top-k", "--drift-windows",
                    "--sensitivity-windows", "--batch-size", "--stream-ram", "--limit", "--seed")},
    "--group-size": st.sampled_from(["64", "128", "32", "0", "-128", "x"]),
    "--smoothquant-alpha": st.one_of(st.floats().map(repr), st.sampled_from(["search", "0.5", "", "x"])),
    "--device": st.sampled_from(["cpu", "cpu:0", "cuda", "cuda:1", "cuda:-1", "mps", "meta", "xpu", "gpu", ""]),
    "--sensitivity-granularity": st.sampled_from(["decoder", "linear", "none", "layer"]),
    "--formats": st.sampled_from(["int8_wo", "fp8,int4_wo", "", ",", "int8_wo,int8_wo", "INT8_WO", "int3"]),
    "--streaming": st.sampled_from(["on", "off", "auto", "maybe"]),
    "--kv-cache": st.sampled_from(["none", "fp8", "int8", "fp4"]),
}


@settings(FIXED, max_examples=60)
@given(flags=st.lists(st.sampled_from(sorted(FLAG_VALUES)).flatmap(
    lambda flag: FLAG_VALUES[flag].map(lambda value: [f"{flag}={value}"])), min_size=1, max_size=3))
def test_generated_flag_values(flags, previous, tmp_path, capsys):
    check_run([arg for pair in flags for arg in pair], previous, tmp_path, capsys)


STORY = TEXT.read_text(encoding="utf-8").split("<|endoftext|>")[0].strip() if TEXT.is_file() else ""
LINES = st.one_of(
    st.text(max_size=200).map(lambda t: json.dumps({"text": t})),
    st.just(json.dumps({"text": STORY})),
    st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2),
              st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)).map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(['{"text": "\\ud800 a lone surrogate"}', '{"text": ["a"]}', '{"text": "a"', "", "   "]),
)


@settings(FIXED, max_examples=25)
@given(lines=st.lists(LINES, max_size=4), stories=st.integers(0, 2), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_generated_jsonl_texts(lines, stories, raw, previous, tmp_path, capsys):
    text = Path(tempfile.mkdtemp(dir=tmp_path)) / "text.jsonl"
    lines = [json.dumps({"text": STORY})] * stories + lines
    text.write_bytes(raw if raw is not None else "\n".join(lines).encode())
    check_run(["--eval", str(text), "--calib", str(text)], previous, tmp_path, capsys)


_FORMATS = st.one_of(st.sampled_from(["int8_wo", "fp8", "int4_wo", "int4_awq", "none"]), st.text(max_size=6), st.integers())
_LAYERS = st.one_of(
    st.builds("model.layers.{}.{}".format, st.integers(0, 5),
              st.sampled_from(["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])),
    st.sampled_from(["lm_head", "model.embed_tokens", ""]), st.text(max_size=12))
_WHOLE_GROUP = st.builds(lambda i, group, fmt: {f"model.layers.{i}.{p}": fmt for p in group}, st.integers(0, 4),
                         st.sampled_from([("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                          ("mlp.gate_proj", "mlp.up_proj")]),
                         st.sampled_from(["int8_wo", "fp8", "int4_wo"]))
_MAPPING = st.one_of(st.dictionaries(_LAYERS, _FORMATS, min_size=1, max_size=3), _WHOLE_GROUP)
PLANS = st.one_of(
    _MAPPING.map(lambda m: {"plan": m}),
    st.builds(lambda m, default: {"format": default, "layers": m}, _MAPPING, _FORMATS),
    _MAPPING,
    st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=10)),
).map(json.dumps)


@settings(FIXED, max_examples=40)
@given(plan=st.one_of(PLANS, st.text(max_size=30)), formats=st.sampled_from(["", "int8_wo"]))
def test_generated_plan_files(plan, formats, previous, tmp_path, capsys):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "plan.json"
    path.write_text(plan, encoding="utf-8")
    check_run(["--formats", formats, "--plan", str(path)], previous, tmp_path, capsys)
