"""Windows: document-bounded, BOS explicit, identical for every model; bad text is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from quantaudit.data import default_documents, load_windows, read_documents
from quantaudit.errors import UserError


def test_tinystories_windows_are_per_story_with_bos(stories, shared_dir):
    w = load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer)
    assert w.bos == "doc" and w.n == 5  # 5 stories, each shorter than 512 tokens
    assert (w.ids[:, 0] == stories.tokenizer.bos_token_id).all()
    targets, mask = w.targets()
    assert mask.sum().item() == w.scored_tokens == int((w.lengths - 1).sum())
    # padded positions are never targets
    for i, length in enumerate(w.lengths.tolist()):
        assert mask[i, : length - 1].all() and not mask[i, length - 1 :].any()


def test_single_document_is_cut_into_full_windows(stories, tmp_path):
    text = " ".join(["Lily saw a big red ball in the park."] * 200)
    path = tmp_path / "one.txt"
    path.write_text(text)
    w = load_windows(path, stories.tokenizer, seq_len=64, n_windows=3, bos="none")
    assert w.ids.shape == (3, 64) and (w.lengths == 64).all()
    stream = torch.tensor(stories.tokenizer(text, add_special_tokens=False).input_ids)
    assert torch.equal(w.ids.reshape(-1), stream[: 3 * 64])


def test_jsonl_records_are_documents(stories, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Story {i}. " * 60}) for i in range(3)) + "\n")
    assert len(read_documents(path)) == 3
    w = load_windows(path, stories.tokenizer, seq_len=128)
    assert (w.ids[:, 0] == stories.tokenizer.bos_token_id).sum() == 3


def test_default_text_halves_are_disjoint():
    calib, evaluation = default_documents("calib"), default_documents("eval")
    assert calib and evaluation and not set(calib) & set(evaluation)
    assert sum(map(len, evaluation)) > 100_000  # real prose, enough for 16 x 512 tokens


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty"),
        (b"\n\n  \n", "is empty"),
        (b"caf\xe9 au lait " * 50, "not UTF-8"),
        (b"Once upon a time.", "fewer than one window"),
    ],
)
def test_bad_text_files(stories, tmp_path, content, fragment):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=fragment):
        load_windows(path, stories.tokenizer, seq_len=512)


def test_bad_jsonl_line_names_the_line(stories, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_windows(path, stories.tokenizer)


def test_calibration_too_short_names_the_count(stories, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("A short calibration text.")
    with pytest.raises(UserError, match=r"fewer than one window of 256.*--calib-seq"):
        load_windows(path, stories.tokenizer, seq_len=256, role="calib")


def test_calibration_samples_are_packed_full_windows(stories, shared_dir):
    w = load_windows(shared_dir / "data" / "tinystories_sample.txt", stories.tokenizer, seq_len=256, role="calib")
    assert (w.lengths == 256).all() and w.n == 1809 // 256  # 5 stories, 1809 tokens with BOS
    assert (w.ids == stories.tokenizer.bos_token_id).sum() >= 4  # story boundaries inside samples
