"""A Hugging Face checkpoint read one part at a time from its safetensors files, never whole.

This is llm-compressor's sequential onloading (``pipelines/sequential``: only the subgraph being
calibrated is on the device) and GPTQ's layer-wise pass (IST-DASLab/gptq ``llama_sequential``:
one decoder layer at a time), applied to a model that is not even loaded: the model exists as a
*skeleton* on the meta device (every module with its shapes, no storage), and a part of it (the
token embedding, one decoder layer, the final norm, lm_head) gets real tensors only while it runs.

``safetensors.safe_open`` memory-maps each shard; ``get_tensor`` returns a view of the private
(copy-on-write) mapping, so nothing is copied, an in-place edit never reaches the file, and only
pages that are touched become resident: the embedding lookup reads just the rows of the tokens
used. While one layer computes, a background thread builds the next one and touches each of its
pages once, so the disk read overlaps the compute instead of stalling it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..arch import architecture_for_config
from ..errors import UserError
from ..moe import is_fused_experts, linear_experts

PAGE_BYTES = 4096


def _open(shard: Path, device: str = "cpu"):
    """``safe_open``, with a missing, truncated or damaged file reported as one line naming it."""
    try:
        return safe_open(shard, framework="pt", device=device)
    except Exception as exc:  # noqa: BLE001 - SafetensorError or OSError: the user's file, not a bug
        raise UserError(f"cannot read the weights file {shard} ({exc}): is it truncated or damaged? "
                        "Save or copy the model again") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard holding it (``model.safetensors.index.json``'s weight_map, else every shard's keys)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is damaged ({type(exc).__name__}: {exc}): it needs a \"weight_map\" "
                            "of tensor name -> file") from None
    files = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with _open(shard) as f:
            files.update((name, shard) for name in f.keys())
    if not files:
        raise UserError(f"{folder} has no .safetensors weights: layer streaming reads safetensors only")
    return files


def _touch(tensors: list[torch.Tensor]) -> None:
    """Read one value per page of each CPU tensor: brings a mapped file's pages in without copying them."""
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            t.reshape(-1)[:: max(1, PAGE_BYTES // t.element_size())].sum()


def checkpoint_fp32_bytes(folder: Path) -> int:
    """What the checkpoint's tensors take in float32, from the safetensors headers alone."""
    numel = 0
    for shard in set(_tensor_files(Path(folder)).values()):
        with _open(shard) as f:
            numel += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return 4 * numel


def check_model_files(spec: str) -> Path:
    """``spec``'s model folder (:func:`quantaudit.models.model_folder`) with its safetensors checked, before it is loaded."""
    from ..models import model_folder

    folder, _ = model_folder(spec)
    check_safetensors(folder)
    return folder


def check_safetensors(folder: Path) -> None:
    """Every safetensors file of ``folder`` opens, and each tensor has the shape the model's config gives it:
    else one line naming the file or the tensor (transformers' own message names neither). A folder without
    safetensors, or a config transformers cannot build, is left to the loader to report."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        return
    files = _tensor_files(folder)
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - reported by the loader, with its own words
        return
    for shard in dict.fromkeys(files.values()):
        with _open(shard) as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    raise UserError(f"{shard}: tensor {name} has shape {list(shape)}, but {folder}/config.json makes it "
                                    f"{list(expected[name])}: the weights do not belong to this config")


class CheckpointParts:
    """The skeleton of a Llama-family checkpoint and its parts, loaded on ``device`` when asked for."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.device = torch.device(device)
        self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        self.arch = architecture_for_config(self.config)  # every family of the table streams
        # Parameters on the meta device, buffers real: rotary tables and Gemma's embedding scale are built from
        # the config, not stored in the checkpoint.
        with init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32).eval()
        self.skeleton.tie_weights()  # as from_pretrained does
        # MoE: the skeleton holds per-expert linears (quantaudit.moe) like a loaded model; where the checkpoint
        # stores the 3-D experts (arch.SparseMoE.checkpoint_experts None), their meta modules are kept to read them.
        self._fused_experts: dict[int, tuple[str, nn.Module]] = {}
        for name, module in list(self.skeleton.named_modules()):
            if is_fused_experts(module):
                if self.arch.moe.checkpoint_experts is None:
                    self._fused_experts[int(name.split(".")[2])] = (name.split(".", 3)[3], module)
                self.skeleton.set_submodule(name, linear_experts(module))
        self.n_layers = len(self.arch.check_layers(self.skeleton))
        self.files = _tensor_files(self.folder)
        for buffer_owner in self.skeleton.modules():
            for name, buffer in list(buffer_owner.named_buffers(recurse=False)):
                if buffer is not None and buffer.device.type != "meta":
                    setattr(buffer_owner, name, buffer.to(self.device))
        self._meta_embedding = self.skeleton.model.embed_tokens

    def fp32_bytes(self) -> int:
        """What the whole model takes in float32 (a tied lm_head counted once, as a loaded model holds it)."""
        return 4 * sum(p.numel() for p in self.skeleton.parameters())

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise UserError(f"{self.folder}: tensor {missing[0]} is not in its safetensors files")
        out = {}
        for shard in dict.fromkeys(self.files[n] for n in names):
            with _open(shard, device=str(self.device)) as f:
                out.update((n, f.get_tensor(n).to(torch.float32)) for n in names if self.files[n] == shard)
        return out

    def _load(self, prefix: str, template: nn.Module, rename=lambda name: name, skip: str | None = None) -> nn.Module:
        """A copy of the meta ``template`` holding the checkpoint's tensors ``prefix + rename(name)`` (those under
        ``skip`` excepted: the caller loads them)."""
        module = copy.deepcopy(template)
        names = [n for n in template.state_dict() if skip is None or not n.startswith(skip + ".")]
        tensors = self._read([prefix + rename(name) for name in names])
        module.load_state_dict({name: tensors[prefix + rename(name)] for name in names}, assign=True,
                               strict=skip is None)
        return module.eval()

    @torch.no_grad()
    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights, pages read in."""
        moe = self.arch.moe
        fused = self._fused_experts.get(index)
        layer = self._load(f"model.layers.{index}.", self.skeleton.model.layers[index],
                           moe.checkpoint_name if moe else (lambda name: name), fused[0] if fused else None)
        if fused:  # the checkpoint's 3-D experts, read as the loaded model's module and split per expert
            path, template = fused
            layer.set_submodule(path, linear_experts(self._load(f"model.layers.{index}.{path}.", template)))
        _touch(list(layer.state_dict().values()))
        return layer

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Every decoder layer in order; the next one is read in the background while the caller uses this one."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantaudit-layer-reader") as reader:
            pending = reader.submit(self.layer, 0)
            for index in range(self.n_layers):
                layer = pending.result()
                pending = reader.submit(self.layer, index + 1) if index + 1 < self.n_layers else None
                yield index, layer
                del layer

    @contextmanager
    def with_embedding(self) -> Iterator[nn.Module]:
        """The skeleton with its real token embedding while the block runs (for ``calibrate.first_layer_inputs``)."""
        inner = self.skeleton.model
        inner.embed_tokens = self._load("model.embed_tokens.", self._meta_embedding)
        try:
            yield self.skeleton
        finally:
            inner.embed_tokens = self._meta_embedding

    def final_norm(self) -> nn.Module:
        return self._load("model.norm.", self.skeleton.model.norm)

    def lm_head_weight(self) -> torch.Tensor:
        """lm_head's weight; the embedding's when the checkpoint ties them."""
        name = "lm_head.weight"
        if name not in self.files and getattr(self.config, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        return self._read([name])[name]

