"""`quantaudit audit --streaming`: the report a streamed run writes, the automatic choice, and a run killed mid-way."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from quantaudit.audit import streamed as stream_module
from quantaudit.audit.run import run_audit
from quantaudit.audit.settings import AuditSettings
from quantaudit.audit.streamed import NOT_STREAMED, in_memory_bytes, use_streaming
from quantaudit.cli import main
from quantaudit.stream.source import checkpoint_fp32_bytes
from quantaudit.stream.spill import PREFIX

FORMATS = ["int8_wo", "int4_awq", "int4_gptq"]


def _settings(stories_dir, text, **overrides) -> AuditSettings:
    base = dict(model=str(stories_dir), formats=FORMATS, calib=str(text), calib_size=3, calib_seq=128, eval=str(text),
                windows=4, seq_len=200, drift_windows=1, sensitivity="decoder", budget="kld<=0.05")
    return AuditSettings(**{**base, **overrides})


@pytest.fixture
def private_dirs(tmp_path, monkeypatch):
    """A private cache and temporary folder, to see everything a run leaves behind."""
    monkeypatch.setenv("QUANTAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def test_streamed_report_matches_the_in_memory_one(stories_dir, text, private_dirs):
    out = private_dirs / "streamed"
    code = main(["audit", "--model", str(stories_dir), "--formats", ",".join(FORMATS), "--calib", str(text),
                 "--calib-size", "3", "--calib-seq", "128", "--eval", str(text), "--windows", "4", "--seq-len", "200",
                 "--drift-windows", "1", "--budget", "kld<=0.05", "--streaming", "on", "--stream-ram", "0",
                 "--out", str(out)])
    assert code in (0, 3)
    streamed = json.loads((out / "report.json").read_text())
    assert not list((private_dirs / "tmp").glob(PREFIX + "*"))  # spill folder removed
    assert not (private_dirs / "cache").exists()  # a streamed run caches nothing (no baseline)
    in_memory = run_audit(_settings(stories_dir, text, streaming="off"), private_dirs / "in-memory")
    assert "streaming" not in in_memory
    assert streamed["streaming"]["mode"] == "on" and streamed["streaming"]["spilled_bytes"] > 0
    assert streamed["streaming"]["not_computed"] == {"sensitivity": NOT_STREAMED}
    # the outlier audit, from the calibration states as they stream past: the in-memory one's figures
    assert [o["name"] for o in streamed["outliers"]] == [o["name"] for o in in_memory["outliers"]]
    assert len(streamed["outliers"]) == in_memory["model"]["linear_layers"] - 1  # every linear input but lm_head's
    for s, m in zip(streamed["outliers"], in_memory["outliers"]):
        assert (s["flag"], s["channels"], s["top_channels"][0][0]) == (m["flag"], m["channels"], m["top_channels"][0][0])
        for key in ("max_abs", "median_channel_max", "ratio", "kurtosis"):
            assert s[key] == pytest.approx(m[key], rel=1e-5), (s["name"], key)
    for key in ("model", "eval", "calib"):
        assert streamed[key] == in_memory[key], key
    assert streamed["baseline"]["ppl"] == pytest.approx(in_memory["baseline"]["ppl"], rel=1e-5)
    assert streamed["baseline"]["weight_bytes"] == in_memory["baseline"]["weight_bytes"]
    for s, m in zip(streamed["formats"], in_memory["formats"]):
        assert s["name"] == m["name"]
        assert s["kld"]["mean"] == pytest.approx(m["kld"]["mean"], rel=1e-5)
        assert s["kld"]["p99"] == pytest.approx(m["kld"]["p99"], rel=1e-5)
        assert s["ppl_ratio"] == pytest.approx(m["ppl_ratio"], rel=1e-5) and s["top1"] == pytest.approx(m["top1"], rel=1e-5)
        assert (s["weight_bytes"], s["compression"], s["passed"]) == (m["weight_bytes"], m["compression"], m["passed"])
        assert s["fallback_layers"] == m["fallback_layers"]
        assert [d["drift_rel"] for d in s["decoder_layers"]] == pytest.approx([d["drift_rel"] for d in m["decoder_layers"]], rel=1e-4)
        # sensitivity: said to be missing, never filled in
        assert s["not_computed"] == {"sensitivity": NOT_STREAMED} and "not_computed" not in m
        assert all(l["sensitivity_kld"] is None for l in s["layers"]) and "decoder_sensitivity" not in s
        assert any(l["sensitivity_kld"] is not None for l in m["layers"]) and m["decoder_sensitivity"]
    assert json.loads((out / "formats" / "int4_gptq.json").read_text())["entry"]["kld"] == streamed["formats"][2]["kld"]


def test_killed_run_leaves_no_report_no_cache_and_no_spill(stories_dir, text, private_dirs, monkeypatch):
    seen = []
    step = stream_module._FormatRun.step

    def interrupted(self, index, *args, **kwargs):
        if index == 2:
            seen.extend((folder, list(folder.iterdir())) for folder in (private_dirs / "tmp").glob(PREFIX + "*"))
            raise KeyboardInterrupt
        return step(self, index, *args, **kwargs)

    monkeypatch.setattr(stream_module._FormatRun, "step", interrupted)
    settings = _settings(stories_dir, text, streaming="on", stream_ram_mb=0, formats=["int8_wo", "int4_gptq"])
    out = private_dirs / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(settings, out)
    (folder, files), = seen
    assert files  # it had spilled hidden states ...
    assert not folder.exists() and not list((private_dirs / "tmp").iterdir())  # ... and removed them
    assert not out.exists()  # nothing finished: --out is never created (formats are staged beside it)
    assert not (private_dirs / "cache").exists()
    monkeypatch.setattr(stream_module._FormatRun, "step", step)
    resumed = run_audit(settings, out, resume=True)  # nothing half-written to trip over
    assert [f["name"] for f in resumed["formats"]] == ["int8_wo", "int4_gptq"]
    assert all(f["kld"]["mean"] > 0 for f in resumed["formats"])


def test_resume_streams_only_the_unfinished_formats(stories_dir, text, private_dirs, monkeypatch):
    settings = _settings(stories_dir, text, streaming="on", formats=["int8_wo"], sensitivity="none", drift_windows=0)
    first = run_audit(settings, private_dirs / "r")
    asked = []
    real = stream_module.stream_audit
    monkeypatch.setattr(stream_module, "stream_audit", lambda parts, specs, *a, **k: asked.append(list(specs)) or real(parts, specs, *a, **k))
    settings.formats = ["int8_wo", "fp8"]
    second = run_audit(settings, private_dirs / "r", resume=True)
    assert asked == [["fp8"]]
    assert second["formats"][0]["kld"] == first["formats"][0]["kld"] and second["formats"][1]["name"] == "fp8"
    assert second["baseline"]["ppl"] == first["baseline"]["ppl"]


def test_auto_streams_only_when_the_model_would_not_fit(stories, stories_dir, text, monkeypatch):
    weights = checkpoint_fp32_bytes(stories_dir)
    assert weights == 4 * sum(p.numel() for p in stories.model.parameters())
    needed = in_memory_bytes(weights)
    settings = _settings(stories_dir, text)
    assert settings.streaming == "auto"
    monkeypatch.setattr(stream_module, "available_memory", lambda: needed + 1)
    assert not use_streaming(settings)
    monkeypatch.setattr(stream_module, "available_memory", lambda: needed - 1)
    assert use_streaming(settings)
    monkeypatch.setattr(stream_module, "available_memory", lambda: None)  # unknown: load it as usual
    assert not use_streaming(settings)
    assert use_streaming(_settings(stories_dir, text, streaming="on"))
    assert not use_streaming(_settings(stories_dir, text, streaming="off"))


def test_bad_streaming_flags_are_refused(stories_dir, text, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["audit", "--model", str(stories_dir), "--streaming", "sometimes", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "--streaming" in capsys.readouterr().err
    from quantaudit.errors import UserError

    with pytest.raises(UserError, match="--stream-ram"):
        _settings(stories_dir, text, stream_ram_mb=-1).check()


def test_streamed_audit_scores_multiple_choice_tasks_as_the_in_memory_one(stories_dir, text, private_dirs):
    """Task items are extra windows carried through the same layer-by-layer pass: the same choices, log-likelihoods
    and paired comparisons as the in-memory scorer; a generation task, which needs the whole model per new token,
    is named as not computed."""
    items = [
        {"context": "Once upon a time, there was a little girl named", "choices": ["Lily.", "table.", "blue."], "answer": 0},
        {"context": "The cat was hungry, so it wanted to eat some", "choices": ["rocks.", "food."], "answer": 1},
        {"context": "One day, Ben went to the park to play with his", "choices": ["friends.", "sky.", "loud."], "answer": 0},
        {"context": "The sun was shining and the birds were", "choices": ["singing.", "eating the house."], "answer": 0},
    ]
    choice = private_dirs / "choice.jsonl"
    choice.write_text("".join(json.dumps(item) + "\n" for item in items))
    generation = private_dirs / "generation.jsonl"
    generation.write_text(json.dumps({"prompt": "Once upon a time, there was a little", "answer": "girl"}) + "\n")
    common = dict(formats=["int8_wo", "int4_gptq"], sensitivity="none", drift_windows=0)
    streamed = run_audit(_settings(stories_dir, text, streaming="on", tasks=[str(choice)], **common),
                         private_dirs / "streamed")
    in_memory = run_audit(_settings(stories_dir, text, streaming="off", tasks=[str(choice)], **common),
                          private_dirs / "in-memory")
    assert "tasks" not in streamed["streaming"]["not_computed"]
    assert streamed["tasks"] == in_memory["tasks"]  # acc, acc_norm, stderr, n, bos: the baseline's summary
    for s, m in zip(streamed["formats"], in_memory["formats"], strict=True):
        assert len(s["tasks"]) == 1
        got, want = s["tasks"][0], m["tasks"][0]
        assert got == want, (got, want)  # the paired comparison: acc, recovery, flips, McNemar, bootstrap
        assert s["tasks_summary"] == m["tasks_summary"]
    both = run_audit(_settings(stories_dir, text, streaming="on", tasks=[str(choice), str(generation)], **common),
                     private_dirs / "both")
    reason = both["streaming"]["not_computed"]["tasks"]
    assert str(generation) in reason and str(choice) not in reason
    assert [t["task"] for t in both["formats"][0]["tasks"]] == [str(choice)]


def test_streamed_continuation_logprobs_equal_the_in_memory_scorer(stories, stories_dir, calib, eval_windows):
    """stream_audit's task sequences: each continuation's summed log-prob, in the baseline and a format, equals
    tasks.scoring.score_sequences on the model in memory (and on the quantized model)."""
    from quantaudit.data import Windows
    from quantaudit.quant import QuantSpec, quantize
    from quantaudit.stream.source import CheckpointParts
    from quantaudit.stream.spill import SpillStore
    from quantaudit.tasks.scoring import score_sequences

    seqs = [[1, 403, 407, 261, 378, 383, 286, 261], [1, 465, 441, 431, 302], [1, 286, 261, 376, 268, 414, 422]]
    conts = [3, 2, 4]
    ids = torch.zeros(3, 8, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    windows = Windows(ids, torch.tensor([len(s) for s in seqs]), "items", "doc", 20)
    spec = QuantSpec(format="int8_wo")
    with SpillStore(2**30) as store:
        result = stream_module.stream_audit(CheckpointParts(stories_dir), {"int8_wo": spec}, calib, eval_windows,
                                            store, progress=False, sequences=windows,
                                            continuation_lengths=torch.tensor(conts))
    want_base = score_sequences(stories.model, seqs, conts, batch_size=2)
    want_quant = score_sequences(quantize(stories.model, spec, calib, progress=False).model, seqs, conts, batch_size=2)
    assert torch.allclose(result.continuation_logprobs["baseline"], want_base, rtol=1e-5, atol=1e-6)
    assert torch.allclose(result.continuation_logprobs["int8_wo"], want_quant, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want_base, want_quant, rtol=1e-7, atol=0)  # the format changed them
