"""SmolLM2-135M (slow): the FP8 export against what ModelOpt 0.47 wrote for the same model
(../shared/reference/modelopt_fp8_trtllm_export_smollm2.txt), and the round trip of every exported
format through the reader on a few windows. INT4 uses group 64: ModelOpt's INT4 AWQ export refuses
SmolLM2 at block 128 (576 is not a multiple), and one group size keeps a single layer config. AWQ
searches a 4-point grid on 64 tokens here: the export must carry whatever the engine produced."""

from __future__ import annotations

import json
import re

import pytest
import torch
from export_helpers import logits
from safetensors.torch import load_file

from quantaudit.data import load_windows
from quantaudit.export import export_checkpoint
from quantaudit.export.reader import load_trtllm_checkpoint
from quantaudit.quant import AWQOptions, QuantSpec, quantize

pytestmark = pytest.mark.slow


def parse_reference(text: str) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]], int]:
    config = json.loads(text.split("=== config.json ===")[1].split("=== rank0")[0])
    total = int(re.search(r"total tensors: (\d+)", text).group(1))
    tensors = {}
    for line in text.split("layers.0 tensors ===")[1].splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            tensors[parts[0]] = (parts[1], tuple(int(d) for d in re.findall(r"\d+", parts[2])))
    return config, tensors, total


@pytest.fixture(scope="module")
def smol_calib(smollm2, shared_dir):
    return load_windows(shared_dir / "data" / "wikitext2_valid_tokens.txt", smollm2.tokenizer, seq_len=64, n_windows=2,
                        role="calib")


@pytest.fixture(scope="module")
def smol_ids(smollm2, shared_dir):
    return load_windows(shared_dir / "data" / "wikitext2_raw_test.txt", smollm2.tokenizer, seq_len=64, n_windows=2,
                        bos="none").ids


def test_fp8_export_matches_the_modelopt_reference(smollm2, smol_calib, shared_dir, tmp_path):
    ref_config, ref_tensors, ref_total = parse_reference(
        (shared_dir / "reference" / "modelopt_fp8_trtllm_export_smollm2.txt").read_text())
    qm = quantize(smollm2.model, QuantSpec(format="fp8"), smol_calib, progress=False)
    export_checkpoint(qm, smollm2.config, tmp_path / "fp8", dtype="float16")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    # same keys in the same order; rotary_base is added (ModelOpt 0.47 loses rope_theta under transformers 5)
    assert [k for k in config if k != "rotary_base"] == list(ref_config)
    assert config["rotary_base"] == smollm2.config.rope_parameters["rope_theta"] == 100000.0
    for key, value in ref_config.items():
        assert config[key] == (value if key != "producer" else {"name": "quantaudit", "version": config[key]["version"]}), key
    tensors = load_file(tmp_path / "fp8" / "rank0.safetensors")
    assert len(tensors) == ref_total == 513
    ours = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items() if "layers." not in k or "layers.0." in k}
    assert ours == ref_tensors


FORMATS = [("fp8", "fp8"), ("fp8_pc_pt", "none"), ("int8_wo", "none"), ("int4_wo", "none"), ("int8_sq", "none"),
           ("int4_awq", "none"), ("int4_gptq", "none"), ("w4a8_awq", "none"), ("int8_sq_static", "none"),
           ("int8_w8a8_nosmooth", "none"), ("nvfp4", "none"), ("nvfp4_awq", "none"), ("w4a8_nvfp4_fp8", "none")]


@pytest.mark.parametrize("fmt,kv", FORMATS)
def test_every_format_round_trips_on_smollm2(fmt, kv, smollm2, smol_calib, smol_ids, tmp_path):
    spec = QuantSpec(format=fmt, kv_cache=kv, group_size=64, awq=AWQOptions(n_grid=4), search_tokens=64)
    qm = quantize(smollm2.model, spec, smol_calib, progress=False)
    path = tmp_path / fmt
    result = export_checkpoint(qm, smollm2.config, path, dtype="float32")
    # float32: the files hold the audited model (one K/V scale per layer and W8A16's load-time quantization
    # included); only W4A8's kernel-side float16 scale ratio is not simulated
    assert [n.split(":")[0] for n in result.notes] == (["W4A8_AWQ"] if fmt == "w4a8_awq" else [])
    assert torch.equal(logits(load_trtllm_checkpoint(path), smol_ids), logits(qm.model, smol_ids))
