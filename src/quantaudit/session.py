"""The session every command opens: the shared settings, declared once, and what they name, loaded once.

Like nanoGPT's one configurator, each setting is one dataclass field carrying its command-line flag, help
and check (:func:`flag`); a command's settings class extends the shared ones (``audit``: :class:`EvalSettings`
plus :class:`TaskSettings` and :class:`GenerationSettings`; ``export``: :class:`QuantSettings`), adds its
flags with :func:`add_arguments` and reads them back with :meth:`Settings.from_args`. So ``--kv-cache``,
``--smoothquant-alpha`` or ``--act-order`` mean the same in ``audit``, ``autotune``, ``calib-check`` and
``export``, and :meth:`QuantSettings.quant_spec` is the only place a :class:`~quantaudit.quant.QuantSpec` is
built: what ``export`` writes comes from the spec the audit measured.

:func:`open_session` then reads the model (whole, or its checkpoint parts to stream) and the texts, every
input checked before a command touches its output folder. Kept free of torch at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .quant.formats import GROUP_SIZES, KV_CACHE_FORMATS, KV_SCALES, SCALE_SEARCHES, get_format, get_kv_cache_format

BOS_POLICIES = ("auto", "doc", "none")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")


def flag(name: str, default: Any = None, help: str = "", group: str | None = None, **argparse_kwargs) -> Any:
    """A settings field with its command-line flag. A list default makes a comma-separated flag; ``help`` may
    use ``%(default)s``; ``group`` names the ``--help`` section."""
    metadata = {"flag": name, "help": help, "group": group, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(flag_name: str, value: float | None, minimum: float) -> None:
    """A numeric flag's range (None: not given)."""
    if value is not None and not value >= minimum:
        raise UserError(f"{flag_name} must be at least {minimum:g} (got {value})")


def split_list(text: str) -> list[str]:
    """A comma-separated flag's items."""
    return [part.strip() for part in text.split(",") if part.strip()]


def smoothquant_alpha(text: str) -> float | str:
    """``--smoothquant-alpha``: a migration strength in [0, 1], or ``search``."""
    if text == "search":
        return text
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'search', not {text!r}") from None
    if not 0 <= alpha <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {alpha}")
    return alpha


def task_limit(text: str) -> int | float:
    """``--limit``: an integer count, or a fraction below 1 as lm-eval's (the range is checked with the tasks)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def check_device(device: str) -> None:
    """``--device`` names a torch device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    else:
        raise UserError(f"--device {device}: quantaudit runs on cpu, cuda or mps, not {dev.type}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """The flags of every field of ``cls`` (in declaration order) but those named in ``skip``."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "flag" not in meta or f.name in skip:
            continue
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = dict(meta["argparse"])
        if isinstance(default, list) and kwargs.get("action") not in ("append", "extend"):
            default = ",".join(default)  # a comma-separated flag (an appending one keeps its list)
        elif isinstance(default, bool) and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        target.add_argument(meta["flag"], dest=f.name, default=default, help=meta["help"], **kwargs)


@dataclass
class Settings:
    """Base of every command's settings: flags in, checks, and the comma-separated lists split."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra):
        """The settings an ``add_arguments(parser, cls)`` parser produced (``extra``: fields set otherwise)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in extra or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            is_list = f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), list)
            values[f.name] = split_list(value) if is_list and isinstance(value, str) else value
        return cls(**values, **extra)

    def check(self) -> None:
        """Every flag's value, before anything is read or written (each class checks its own fields)."""


@dataclass
class QuantSettings(Settings):
    """What every quantizing command shares: the model, the calibration text and how each format is applied."""

    model: str = flag("--model", "smollm2-135m", "HF folder, .gguf file or short name (default: %(default)s)")
    calib: str | None = flag("--calib", None, "calibration text, .txt or .jsonl (default: embedded, calib half)",
                             metavar="FILE")
    calib_size: int = flag("--calib-size", 32, "calibration samples (default: %(default)s)", type=int)
    calib_seq: int = flag("--calib-seq", 512, "tokens per calibration sample (default: %(default)s)", type=int)
    bos: str = flag("--bos", "auto", "BOS before each document: auto = what the tokenizer does by default (recorded)",
                    choices=BOS_POLICIES)
    group_size: int = flag("--group-size", 128, "INT4 group size, 128 or 64; layers not divisible fall back "
                           "(default: %(default)s)", type=int)
    kv_cache: str = flag("--kv-cache", "none", "KV-cache quantization applied with every format (default: %(default)s)",
                         choices=list(KV_CACHE_FORMATS))
    kv_scales: str = flag("--kv-scales", "shared", "shared: one scale per layer for K and V from max(K, V amax), what "
                          "TensorRT-LLM checkpoints hold and its engines run; separate: K and V each their own, as "
                          "HF/vLLM checkpoints can carry them (default: %(default)s)", choices=list(KV_SCALES))
    exclude: list[str] = flag("--exclude", [], "fnmatch patterns of layers to keep unquantized, comma-separated")
    include_lm_head: bool = flag("--include-lm-head", False,
                                 "quantize lm_head too (TensorRT-LLM and ModelOpt leave it unquantized by default)")
    smoothquant_alpha: float | str = flag(
        "--smoothquant-alpha", 0.5, "SmoothQuant migration strength (the paper's and ModelOpt's 0.5), or 'search' for "
        "a per-layer grid search on the calibration data (default: %(default)s)", type=smoothquant_alpha, metavar="A")
    act_order: bool = flag("--act-order", True, "GPTQ: quantize columns in order of decreasing Hessian diagonal, with "
                           "static groups (no g_idx; llm-compressor's default); --no-act-order sweeps columns in order "
                           "(default: on)")
    gptq_scale: str = flag("--gptq-scale", "mse", "GPTQ group scales: mse shrinks each group's max |w| by up to 20%% "
                           "where that lowers the rounding error (llm-compressor's MSE observer), amax takes max |w| / 7 "
                           "(default: %(default)s)", choices=SCALE_SEARCHES)
    device: str = flag("--device", "cpu", "torch device, e.g. cpu, cuda or cuda:1 (default: %(default)s)")

    def check(self) -> None:
        super().check()
        at_least("--calib-size", self.calib_size, 1)
        at_least("--calib-seq", self.calib_seq, 2)
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size must be 64 or 128 (what TensorRT-LLM supports), got {self.group_size}")
        get_kv_cache_format(self.kv_cache)
        if self.kv_scales not in KV_SCALES:
            raise UserError(f"--kv-scales must be {' or '.join(KV_SCALES)} (got {self.kv_scales!r})")
        check_device(self.device)

    def quant_spec(self, format: str, plan: dict[str, str] | None = None):
        """The one place a ``QuantSpec`` is built: ``format`` (with ``plan``'s per-layer overrides) applied the
        way these settings say."""
        from .quant import GPTQOptions, QuantSpec

        get_format(format)
        return QuantSpec(format=format, plan=plan, kv_cache=self.kv_cache, kv_scales=self.kv_scales,
                         group_size=self.group_size, exclude=tuple(self.exclude), include_lm_head=self.include_lm_head,
                         smoothquant_alpha=self.smoothquant_alpha,
                         gptq=GPTQOptions(act_order=self.act_order, scale_search=self.gptq_scale))


@dataclass
class EvalSettings(QuantSettings):
    """A quantizing command that also measures: the evaluation text and how it is cut and batched."""

    eval: str | None = flag("--eval", None, "evaluation text, .txt or .jsonl (default: embedded, eval half)",
                            metavar="FILE")
    windows: int | None = flag("--windows", 16, "evaluation windows (default: %(default)s)", type=int, metavar="N")
    seq_len: int = flag("--seq-len", 512, "tokens per evaluation window (default: %(default)s)", type=int)
    batch_size: int | None = flag("--batch-size", None, "windows per forward (default: automatic)", type=int)

    def check(self) -> None:
        super().check()
        at_least("--windows", self.windows, 1)
        at_least("--seq-len", self.seq_len, 2)
        at_least("--batch-size", self.batch_size, 1)


TASKS = "task accuracy (lm-evaluation-harness style)"


@dataclass
class TaskSettings(Settings):
    """Task accuracy, as lm-evaluation-harness names its flags (``audit``, ``eval``, ``compare``)."""

    tasks: list[str] = flag("--tasks", [], "comma-separated: piqa, hellaswag, .jsonl files ({context, choices, "
                            "answer} for multiple choice, {prompt, answer} for exact-match generation), or "
                            "lm_eval:NAME, an lm-evaluation-harness task, group or tag (pip install "
                            "'quantaudit[lm-eval]')", TASKS, metavar="LIST")
    task_data: str | None = flag("--task-data", None, "folder with piqa_valid.jsonl, piqa_valid_labels.lst, "
                                 "hellaswag_val.txt.bz2", TASKS, metavar="DIR")
    lm_eval_include: str | None = flag("--lm-eval-include", None, "folder of your own lm-eval task YAMLs (lm-eval's "
                                       "include_path), for lm_eval:NAME", TASKS, metavar="DIR")
    task_limit: int | float | None = flag("--limit", None, "first N items of each task (or sampled, with --seed), or "
                                          "a fraction below 1 of them, as lm-eval's", TASKS, type=task_limit,
                                          metavar="N")
    task_seed: int | None = flag("--seed", None, "sample --limit items at random with this seed instead of the "
                                 "first N", TASKS, type=int)
    task_strict: bool = flag("--strict", False, "refuse a task file with bad items instead of skipping them", TASKS)

    def check(self) -> None:
        from .tasks.readers import check_limit

        super().check()
        at_least("--seed", self.task_seed, 0)
        check_limit(self.task_limit)

    def load_tasks(self) -> list:
        """The tasks, read and checked."""
        from .tasks import load_tasks

        return load_tasks(self.tasks, self.task_data, self.task_limit, self.task_strict, self.task_seed,
                          self.lm_eval_include)


GENERATION = "free-running generation"


@dataclass
class GenerationSettings(Settings):
    """Greedy generation compared between two models (``audit``, ``compare``; :mod:`quantaudit.fidelity`)."""

    generate: str | None = flag("--generate", None, "also compare free-running greedy generation: 'default' (64 "
                                "paragraph openings of the evaluation text) or a JSONL of {\"prompt\": ..., optional "
                                "\"regex\", \"json\": true, \"stop\": [...]}; reports identical outputs, first "
                                "divergence, degeneration, check pass rates", GENERATION, metavar="PROMPTS")
    max_new_tokens: int = flag("--max-new-tokens", 128, "tokens generated per prompt with --generate "
                               "(default: %(default)s)", GENERATION, type=int)
    chat_template: str = flag("--chat-template", "auto", "wrap --generate prompts in the tokenizer's chat template "
                              "(auto: when it has one)", GENERATION, choices=CHAT_TEMPLATE_MODES)

    def check(self) -> None:
        super().check()
        at_least("--max-new-tokens", self.max_new_tokens, 1)
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise UserError(f"--chat-template must be {', '.join(CHAT_TEMPLATE_MODES)} (got {self.chat_template!r})")


@dataclass
class Session:
    """What the settings name, read and checked: the model (``lm`` in memory, or the checkpoint ``parts`` to
    stream), its tokenizer, the calibration windows and, for a measuring command, the evaluation windows."""

    lm: Any  # models.LoadedModel | None
    parts: Any  # stream.source.CheckpointParts | None
    tokenizer: Any
    calib: Any  # data.Windows
    eval: Any = None  # data.Windows | None

    @property
    def model(self):
        """The model in memory, or the meta-device skeleton of the streamed one (names and shapes only)."""
        return self.lm.model if self.lm is not None else self.parts.skeleton

    def check_spec(self, spec):
        """What quantizing with ``spec`` would refuse on this model (a plan naming an excluded layer, a KV-cache
        format the head size cannot take, ...), refused now, before any output is touched; returns the
        engine's ``LayerPlan`` (what each linear becomes, whether calibration is read)."""
        from .quant.engine import plan_layers

        return plan_layers(self.model, spec, self.calib)


def open_session(settings: QuantSettings, streamed: bool = False) -> Session:
    """Read the model and the texts ``settings`` name (``streamed``: only the checkpoint's skeleton, its layers
    read later); a bad input fails here with one line, before any output is touched."""
    from .arch import decoder_layers
    from .data import load_windows
    from .models import load_model, load_tokenizer
    from .stream.source import CheckpointParts, check_model_files

    folder = check_model_files(settings.model)
    if streamed:
        lm, parts = None, CheckpointParts(folder, settings.device)
        tokenizer = load_tokenizer(folder)
    else:
        lm, parts = load_model(settings.model, device=settings.device), None
        tokenizer = lm.tokenizer
    session = Session(lm, parts, tokenizer, None)
    decoder_layers(session.model)
    session.calib = load_windows(settings.calib, tokenizer, settings.calib_seq, settings.calib_size, settings.bos,
                                 role="calib")
    if isinstance(settings, EvalSettings):
        session.eval = load_windows(settings.eval, tokenizer, settings.seq_len, settings.windows, settings.bos)
    return session
