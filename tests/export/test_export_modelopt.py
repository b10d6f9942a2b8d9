"""Optional: our TensorRT-LLM export against NVIDIA ModelOpt's own, run live on stories260K (CPU).

Runs only where ModelOpt is importable (``nvidia-modelopt``, not a project dependency; it needs no GPU
and no tensorrt_llm for this). Each format is quantized by ModelOpt (``mtq.quantize``) and by quantaudit
on the same calibration windows, exported by both (``export_tensorrt_llm_checkpoint(model,
decoder_type="llama", dtype=torch.float16, inference_tensor_parallel=1)`` and :func:`export_checkpoint`
with ``dtype="float16"``), and the two checkpoints must hold the same tensor names, each with the same
dtype and shape, and the same config.json, the ``quantization`` block included.

- FP8: ``mtq.FP8_DEFAULT_CFG`` unchanged. Both sides calibrate per-tensor maxima on the same tokens, so
  every tensor is also bit-identical.
- INT4 AWQ: ``mtq.INT4_AWQ_CFG`` cannot be exported for stories260K as shipped, so the test uses a copy
  with two changes, both matching what quantaudit's ``QuantSpec(format="int4_awq", group_size=64)`` does:
  (1) weight block size 64 instead of 128: ModelOpt 0.47 quantizes at 128 but its export refuses the
  64-wide layers ("Weight shape 64 of each TP tp=1 is not divisible for block size 128");
  (2) ``*mlp.down_proj*`` quantizers disabled: its input size 172 is not a multiple of 64 (nor of any
  block size >= 8), so ModelOpt's export refuses it at 64 too ("Weight shape 172 ... not divisible for
  block size 64"), while quantaudit's engine deliberately keeps such a layer 16-bit ("input size 172 is
  not a multiple of group size 64; kept unquantized", quant/engine.py) and lists it in
  ``exclude_modules``. With those, both sides describe the same quantization plan. The codes and scales
  differ by design (ModelOpt's awq_lite search vs ours), so instead of their values the test checks the
  layout's meaning: our reader, given ModelOpt's files, rebuilds ModelOpt's own fake-quantized model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from export_helpers import logits
from safetensors.torch import load_file

from quantaudit.export import export_checkpoint
from quantaudit.export.reader import load_trtllm_checkpoint

SKIP = ("NVIDIA ModelOpt (nvidia-modelopt) is not installed: the live comparison with its TensorRT-LLM export "
        "is optional")
mtq = pytest.importorskip("modelopt.torch.quantization", reason=SKIP)
mte = pytest.importorskip("modelopt.torch.export", reason=SKIP)

# Documented, intended differences in config.json, excluded below:
# - "producer" names the tool that wrote the file;
# - "rotary_base": quantaudit always writes the model's rope_theta, ModelOpt 0.47 loses it under
#   transformers 5 (see test_export_smollm2.py; stories260K's 10000.0 is also TensorRT-LLM's default).
OWN_KEYS = {"producer", "rotary_base"}


def modelopt_config(fmt: str) -> dict:
    if fmt == "fp8":
        return mtq.FP8_DEFAULT_CFG
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    weight = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
    assert len(weight) == 1 and weight[0]["cfg"]["block_sizes"][-1] == 128, cfg
    weight[0]["cfg"]["block_sizes"][-1] = 64  # (1) in the module docstring
    cfg["quant_cfg"].append({"quantizer_name": "*mlp.down_proj*", "enable": False})  # (2)
    return cfg


def layout(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(v.dtype), tuple(v.shape)) for k, v in load_file(path / "rank0.safetensors").items()}


@pytest.fixture
def exported(stories, calib, quantized, tmp_path):
    """exported(fmt) -> (ModelOpt's fake-quantized model, ModelOpt's folder, our folder)."""

    def run(fmt: str):
        model = copy.deepcopy(stories.model).eval()  # mtq.quantize works in place

        def forward_loop(m):
            with torch.no_grad():
                for row, n in zip(calib.ids, calib.lengths):
                    m(row[None, :n])

        mtq.quantize(model, modelopt_config(fmt), forward_loop)
        theirs = tmp_path / "modelopt"
        mte.export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.float16,
                                           inference_tensor_parallel=1, export_dir=theirs)
        ours = tmp_path / "quantaudit"
        export_checkpoint(quantized(fmt), stories.config, ours, dtype="float16")  # int4_awq: group_size=64
        return model, theirs, ours

    return run


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # torch.equal has no float8 kernel


def assert_same_files(theirs, ours) -> None:
    assert layout(ours) == layout(theirs)
    mine, ref = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert [k for k in mine if k not in OWN_KEYS] == [k for k in ref if k not in OWN_KEYS]
    for key in ref.keys() - OWN_KEYS - {"quantization"}:
        assert mine[key] == ref[key], key
    assert ref["producer"]["name"] == "modelopt" and mine["producer"]["name"] == "quantaudit"
    q, rq = mine["quantization"], ref["quantization"]
    assert list(q) == list(rq)
    # exclude_modules is a set of name patterns to TensorRT-LLM; ModelOpt lists lm_head among the layers
    assert sorted(q["exclude_modules"]) == sorted(rq["exclude_modules"])
    rest = [{k: v for k, v in d.items() if k != "exclude_modules"} for d in (q, rq)]
    assert rest[0] == rest[1]


def test_fp8_export_matches_modelopt(exported):
    _, theirs, ours = exported("fp8")
    assert_same_files(theirs, ours)
    assert json.loads((ours / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    mine, ref = load_file(ours / "rank0.safetensors"), load_file(theirs / "rank0.safetensors")
    assert len(ref) == 88
    assert [k for k in ref if not torch.equal(bits(mine[k]), bits(ref[k]))] == []


def test_int4_awq_export_matches_modelopt(exported, stories, ids):
    model, theirs, ours = exported("int4_awq")
    assert_same_files(theirs, ours)
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["group_size"], q["pre_quant_scale"]) == ("W4A16_AWQ", 64, True)
    assert sorted(q["exclude_modules"]) == sorted(["lm_head"] + [f"transformer.layers.{i}.mlp.proj" for i in range(5)])
    mine, ref = load_file(ours / "rank0.safetensors"), load_file(theirs / "rank0.safetensors")
    assert len(ref) == 78
    # what neither side quantizes is the same float16 tensor
    plain = [k for k in ref if ref[k].dtype == torch.float16 and "prequant" not in k]
    assert len(plain) == 1 + 1 + 1 + 5 * 3  # embedding, ln_f, lm_head; two norms and down_proj per layer
    assert [k for k in plain if not torch.equal(mine[k], ref[k])] == []
    # the packed INT4 codes and their scales mean the same to both: read by our reader, ModelOpt's files give
    # ModelOpt's fake-quantized model (up to the float16 storage), far closer than INT4's own error; a
    # transposed or nibble-swapped layout would be off by as much as the quantization error or more
    fake, base = logits(model, ids), logits(stories.model, ids)
    error = (fake - base).abs().max().item()
    read = (logits(load_trtllm_checkpoint(theirs), ids) - fake).abs().max().item()
    assert error > 1 and read < 0.1, (error, read)


# Families of the architecture table whose unified HF checkpoint is compared with ModelOpt's own
# (``export_hf_checkpoint``), FP8 (``mtq.FP8_DEFAULT_CFG``, per-tensor maxima on the same tokens), both written
# in float32 (ModelOpt keeps the unquantized tensors in the model's own dtype).
HF_FAMILIES = ["llama_untied_llama3_rope", "qwen3", "gemma3_text", "mixtral"]


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_fp8_hf_export_of_each_family_matches_modelopt(name, tiny_model_dir, shared_dir, tmp_path):
    """Same tensor names, dtypes and shapes as ModelOpt's unified HF export of the same tiny model (ModelOpt
    quantizes transformers' own model, 3-D experts included; ours the per-expert linears of quantaudit.moe,
    written under the family's checkpoint names)."""
    from transformers import AutoModelForCausalLM

    from quantaudit.data import load_windows
    from quantaudit.models import load_model
    from quantaudit.quant import QuantSpec, quantize

    folder = tiny_model_dir(name)
    lm = load_model(str(folder))
    calib = load_windows(shared_dir / "data" / "tinystories_sample.txt", lm.tokenizer, seq_len=32, n_windows=2,
                         role="calib")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def forward_loop(m):
        with torch.no_grad():
            for row, n in zip(calib.ids, calib.lengths):
                m(row[None, :n])

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    theirs, ours = tmp_path / "modelopt", tmp_path / "quantaudit"
    mte.export_hf_checkpoint(model, dtype=torch.float32, export_dir=theirs)
    export_checkpoint(quantize(lm.model, QuantSpec(format="fp8"), calib, progress=False), lm.config, ours,
                      target="hf", dtype="float32")

    def hf_layout(path):
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update({k: (str(v.dtype), tuple(v.shape)) for k, v in load_file(f).items()})
        return out

    assert hf_layout(ours) == hf_layout(theirs)
