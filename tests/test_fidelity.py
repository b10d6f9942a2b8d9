"""Generation fidelity: the paired statistics on hand-made sequences, prompts files, and real generation."""

from __future__ import annotations

import json

import pytest
import torch

from quantaudit.data import default_documents
from quantaudit.errors import UserError
from quantaudit.fidelity import (
    Generations,
    Prompt,
    compare_generations,
    continuations,
    cut_at_stop,
    default_prompts,
    distinct_2,
    encode_prompts,
    first_divergence,
    generate,
    in_loop,
    load_prompts,
    median_divergence,
    rouge_l,
    survival,
)
from quantaudit.quant import QuantSpec, quantize
from quantaudit.quant.formats import get_kv_cache_format
from quantaudit.quant.kvcache import install_kv_quantizers


def test_first_divergence_and_survival_on_hand_made_sequences():
    base = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [7]]
    quant = [[1, 2, 3, 4], [1, 9, 3, 4], [1, 2, 3], [6, 6], [7]]
    divergences = [first_divergence(a, b) for a, b in zip(base, quant)]
    assert divergences == [None, 1, 3, 0, None]  # one ending early counts as a divergence at its end
    curve = survival(divergences, 4)
    # S(t): agree on the first t tokens; t=0 all, t=1 loses the prompt diverging at 0, ...
    assert curve == [1.0, 0.8, 0.6, 0.6, 0.4]
    assert median_divergence(curve) == 4
    assert median_divergence([1.0, 0.9, 0.7]) is None  # more than half never diverge within the horizon


def test_rouge_l_distinct_2_and_loops():
    assert rouge_l([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * 3 / 7)  # LCS 1,3,4
    assert rouge_l([], []) == 1.0 and rouge_l([1], []) == 0.0
    assert distinct_2([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)
    assert in_loop([9, 8, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # period 3, three times
    assert in_loop([5] * 6) and not in_loop([5] * 5)  # a period-1 loop needs six tokens
    assert not in_loop([1, 2, 3, 4, 5, 6, 7, 8, 9])


def test_compare_generations_counts_checks_and_flips():
    prompts = [Prompt("a", regex=r"\d+"), Prompt("b", json=True), Prompt("c"), Prompt("d", regex="yes")]
    base = Generations([[1], [2], [3], [4]], ["42", '{"x": 1}', "hi", "yes"])
    quant = Generations([[1], [2], [5], [6]], ["42", '{"x": 1}', "ho", "no"])
    result = compare_generations(base, quant, prompts, max_new_tokens=1)
    assert result["identical"] == 0.5 and result["first_divergence"] == [None, None, 0, 0]
    checks = result["checks"]
    assert checks["n"] == 3 and checks["base_pass"] == 1.0 and checks["quant_pass"] == pytest.approx(2 / 3)
    assert (checks["right_to_wrong"], checks["wrong_to_right"]) == (1, 0) and checks["mcnemar_p"] == 1.0


def test_cut_at_stop_keeps_the_tokens_before_the_stop_string():
    vocab = {1: "The", 2: " answer", 3: ":", 4: " 4", 5: "\n", 6: "more"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert cut_at_stop([1, 2, 3, 4, 5, 6], decode, ("\n",)) == [1, 2, 3, 4]
    assert cut_at_stop([1, 2, 3, 4], decode, ("\n",)) == [1, 2, 3, 4]
    assert cut_at_stop([5, 6], decode, ("\n",)) == []


@pytest.mark.parametrize("line, message", [
    ("", "holds no prompts"),
    ('{"prompt": 3}', "needs a non-empty string"),
    ('{"prompt": "x", "regex": "("}', "invalid regex"),
    ("not json", "not JSON"),
    ('{"prompt": "x", "stop": "\\n"}', "must be a list"),
])
def test_bad_prompts_files_are_named_in_one_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_prompts_file_and_default_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Say yes.", "regex": "yes", "stop": ["\n"]}) + "\n\n"
                    + json.dumps({"prompt": "JSON please", "json": True}) + "\n")
    assert load_prompts(path) == [Prompt("Say yes.", "yes", False, ("\n",)), Prompt("JSON please", None, True)]
    prompts = default_prompts(default_documents("eval"), 64)
    assert len(prompts) == 64 and len({p.text for p in prompts}) == 64
    assert all(50 <= len(p.text) <= 240 and not p.checked for p in prompts)


def test_generation_with_an_identity_quantizer_never_diverges(stories):
    """The format-none copy with a pass-through KV hook continues every prompt exactly as the model does."""
    prompts = default_prompts(default_documents("eval"), 12)
    ids = encode_prompts(prompts, stories.tokenizer, chat_template=False)
    identity = quantize(stories.model, QuantSpec(format="none"), None, progress=False).model
    install_kv_quantizers(identity, [layer.self_attn for layer in identity.model.layers], get_kv_cache_format("fp8"))
    base = continuations(stories.model, stories.tokenizer, prompts, ids, 24, "base")
    same = continuations(identity, stories.tokenizer, prompts, ids, 24, "identity")
    result = compare_generations(base, same, prompts, 24)
    assert result["identical"] == 1.0 and result["median_divergence"] is None
    assert result["survival"] == [1.0] * 25 and result["rouge_l_after_divergence"] is None
    assert all(len(t) > 0 for t in base.tokens)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(stories):
    prompts = default_prompts(default_documents("eval"), 8)
    ids = encode_prompts(prompts, stories.tokenizer, chat_template=False)
    assert len({len(i) for i in ids}) > 1  # different lengths: the batch is really padded
    tok = stories.tokenizer
    batched = generate(stories.model, ids, 20, tok.eos_token_id, tok.pad_token_id, batch_size=8)
    single = generate(stories.model, ids, 20, tok.eos_token_id, tok.pad_token_id, batch_size=1)
    assert batched == single


def test_a_real_quantization_diverges_somewhere(stories):
    prompts = default_prompts(default_documents("eval"), 8)
    ids = encode_prompts(prompts, stories.tokenizer, chat_template=False)
    qm = quantize(stories.model, QuantSpec(format="int4_wo", group_size=64), None, progress=False)
    base = continuations(stories.model, stories.tokenizer, prompts, ids, 32, "base")
    quant = continuations(qm.model, stories.tokenizer, prompts, ids, 32, "int4_wo")
    result = compare_generations(base, quant, prompts, 32)
    assert result["identical"] < 1.0
    curve = result["survival"]
    assert curve[0] == 1.0 and all(a >= b for a, b in zip(curve, curve[1:]))  # a survival curve never rises
    assert 0.0 <= result["rouge_l_after_divergence"] <= 1.0
    assert torch.is_tensor(qm.model.lm_head.weight)


def test_audit_reports_generation_and_gates_on_it(stories, shared_dir, tmp_path):
    """``audit --generate``: per format the paired generation entry, its budget keys, the survival plot."""
    from quantaudit.audit.run import run_audit
    from quantaudit.audit.settings import AuditSettings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "regex": r"\w"}) for p in
                                 ("Once upon a time", "The little dog", "Lily and Tom", "One day")) + "\n")
    settings = AuditSettings(model=str(shared_dir / "models/stories260K/hf"), formats=["int8_wo", "int4_wo"],
                             windows=2, seq_len=64, calib_size=2, calib_seq=64, drift_windows=0, sensitivity="none",
                             generate=str(prompts), max_new_tokens=16,
                             budget="gen_identical>=0.5,gen_check_drop<=0.5")
    report = run_audit(settings, tmp_path / "out", force=True)
    entries = {f["name"]: f for f in report["formats"]}
    for name, entry in entries.items():
        g = entry["generation"]
        assert g["prompts"] == 4 and len(g["survival"]) == 17 and g["checks"]["n"] == 4
        assert entry["passed"] == (g["identical"] >= 0.5 and g["checks"]["drop"] <= 0.5), name
    assert entries["int8_wo"]["generation"]["identical"] >= entries["int4_wo"]["generation"]["identical"]
    html = (tmp_path / "out/report.html").read_text()
    assert 'data-plot="survival"' in html and "Generation fidelity" in (tmp_path / "out/report.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--generate", "default", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--generate", "default", "--streaming", "on"], "--generate needs the whole model in memory"),
    (["--generate", "missing.jsonl"], "prompts file not found"),
])
def test_generation_bad_input_is_one_line_and_writes_nothing(flags, message, shared_dir, tmp_path, capsys):
    from quantaudit.cli import main

    out = tmp_path / "out"
    code = main(["audit", "--model", str(shared_dir / "models/stories260K/hf"), "--formats", "int8_wo",
                 "--windows", "1", "--seq-len", "32", "--calib-size", "1", "--calib-seq", "32", "--out", str(out),
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
