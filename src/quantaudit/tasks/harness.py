"""lm-evaluation-harness tasks (``--tasks lm_eval:NAME``), paired item by item like quantaudit's own tasks.

Needs the optional extra (``pip install 'quantaudit[lm-eval]'``, which pins :data:`LM_EVAL_VERSION`);
``lm_eval`` is imported only when an ``lm_eval:`` task is named. :func:`load_harness_tasks` checks
everything before a run writes anything: the extra, each name against lm-eval's task index (its
own tasks, groups and tags, plus the YAMLs under ``include_path``), and each task's items, which lm-eval
reads with ``datasets`` (a hub dataset that is neither cached nor downloadable, e.g. offline, is named
with its task). A task must report ``acc`` or ``exact_match``, which lm-eval scores 0 or 1 per item:
that is the outcome quantaudit pairs.

Each model (the baseline, every simulated format, in memory) is wrapped as lm-eval's ``HFLM`` and runs
the named tasks through ``simple_evaluate`` with per-sample logging, so every model answers the same
items with the same prompts (checked by a fingerprint of lm-eval's per-item document, prompt and
target hashes). Per leaf task, the paired outcome is ``acc`` (else ``exact_match``) under lm-eval's
first filter; the :class:`~quantaudit.tasks.scoring.TaskResult` also carries lm-eval's own results
entry for the task (every metric and filter, with lm-eval's stderrs), and :meth:`HarnessTasks.evaluate`
writes lm-eval's whole results dict (without the samples) in the layout ``lm-eval run`` writes.

BOS follows ``--bos`` as lm-eval's ``add_bos_token`` can express it: ``auto`` is the tokenizer's own
behaviour (lm-eval's default); ``none`` on a tokenizer that adds BOS turns its special tokens off;
``doc`` on one that adds none is refused (lm-eval can only ask the tokenizer for a BOS).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import resolve_bos
from ..errors import UserError
from ..fileio import atomic_write_text
from .readers import check_limit
from .scoring import TaskResult

PREFIX = "lm_eval:"
LM_EVAL_VERSION = "0.4.13"  # the extra's pin (pyproject.toml); the per-sample fields read below are its
INSTALL_HINT = "pip install 'quantaudit[lm-eval]'"
LIST_HINT = "`lm-eval ls tasks` lists them (add --include_path DIR for your own YAMLs)"
PAIRED_METRICS = ("acc", "exact_match")  # scored 0 or 1 per item by lm-eval; the first one a task has is paired
BATCH_SIZE = 8  # requests per forward: lm-eval computes full-vocabulary logits for every position


def is_harness_task(name: str) -> bool:
    return name.startswith(PREFIX)


def _import_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"lm_eval: tasks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise UserError(f"lm-evaluation-harness is installed but does not import ({exc}): "
                        f"{INSTALL_HINT} installs lm_eval=={LM_EVAL_VERSION}, which does") from None


@contextmanager
def _quiet():
    """lm-eval's info and warnings (e.g. that ``pretrained`` is a model object, as intended) would drown ours."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unknown_line(name: str, manager) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f"; close: {', '.join(close)}" if close else ""
    return f"unknown lm-eval task {name!r}: {LIST_HINT}{hint}"


def _data_line(exc: OSError, names: list[str]) -> str:
    """The task whose items could not be read, from the ``Task.download`` frame that raised, and its dataset."""
    from lm_eval.api.task import Task

    task, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Task):
            task = owner
        tb = tb.tb_next
    if task is None:
        return f"lm-eval task(s) {', '.join(names)}: reading their items failed: {exc}"
    dataset = task.DATASET_PATH + (f" ({task.DATASET_NAME})" if task.DATASET_NAME else "")
    advice = (": run it once with network access to cache it, or give a task YAML with dataset_path: json and local "
              "data_files in a --lm-eval-include folder") if isinstance(exc, ConnectionError) else ""
    return f"lm-eval task {task.config.task} needs dataset {dataset}, which cannot be read here ({exc}){advice}"


def harness_bos(tokenizer, bos: str) -> tuple[str, bool | None]:
    """The BOS policy that holds under lm-eval and its ``add_bos_token`` (see the module docstring)."""
    resolved, own = resolve_bos(tokenizer, bos), resolve_bos(tokenizer, "auto")
    if resolved == own:
        return resolved, None
    if resolved == "doc":
        raise UserError("--bos doc with lm_eval: tasks: this tokenizer adds no BOS itself, and lm-eval can only ask "
                        "the tokenizer for one; use --bos auto or none")
    return resolved, False


@dataclass
class HarnessTasks:
    """The ``lm_eval:`` tasks of a run, checked (:func:`load_harness_tasks`); each evaluation has lm-eval read
    their items again, from the same files or ``datasets`` cache the check read."""

    names: list[str]  # lm-eval task, group or tag names, without the prefix
    limit: float | None
    manager: Any  # lm_eval.tasks.TaskManager, its index built once
    output_types: dict[str, str]  # leaf task -> lm-eval output_type

    def evaluate(self, model, tokenizer, bos: str = "auto", results_file: Path | None = None,
                 batch_size: int = BATCH_SIZE) -> list[TaskResult]:
        """Per leaf task a :class:`TaskResult` of ``model``; lm-eval's results (all but the samples, in its own
        layout: ``results.<task>."acc,none"``, ...) are written to ``results_file`` when given."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import handle_non_serializable

        bos, add_bos_token = harness_bos(tokenizer, bos)
        with _quiet():
            # a copy: HFLM gives a tokenizer without one a pad token, which the rest of the audit must not see
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      add_bos_token=add_bos_token)
            out = simple_evaluate(lm, tasks=self.names, limit=self.limit, log_samples=True, task_manager=self.manager)
        samples = out.pop("samples")
        if results_file is not None:
            atomic_write_text(results_file, json.dumps(out, indent=2, default=handle_non_serializable) + "\n")
        return [self._result(name, _plain(out["results"][name], handle_non_serializable), samples[name], bos)
                for name in self.output_types]

    def _result(self, name: str, entry: dict, samples: list[dict], bos: str) -> TaskResult:
        key = next(k for metric in PAIRED_METRICS for k in entry if k.split(",")[0] == metric)
        metric, filter_key = key.split(",")
        rows = sorted((s for s in samples if s["filter"] == filter_key), key=lambda s: s["doc_id"])
        correct, correct_norm = _binary(rows, metric, name), None
        if f"acc_norm,{filter_key}" in entry:
            correct_norm = _binary(rows, "acc_norm", name)
        kind = self.output_types[name]
        if kind == "multiple_choice":
            loglikelihoods = [[float(ll) for ll, _ in s["filtered_resps"]] for s in rows]
            predictions = [max(range(len(lls)), key=lls.__getitem__) for lls in loglikelihoods]
        else:  # generate_until: the answer its filters extracted; loglikelihood: (log-prob, is greedy)
            loglikelihoods, predictions = None, [s["filtered_resps"][0] for s in rows]
        identity = [(s["doc_id"], s["doc_hash"], s["prompt_hash"], s["target_hash"]) for s in rows]
        fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        yaml_path = getattr(self.manager.task_index.get(name), "yaml_path", None)
        summary = {
            "task": PREFIX + name, "kind": kind, "source": str(yaml_path) if yaml_path else f"lm-eval {name}",
            "n": len(rows), "fingerprint": fingerprint, "limit": self.limit, "metric": key,
            "acc": entry[key], "acc_stderr": _number(entry.get(f"{metric}_stderr,{filter_key}")),
            "acc_norm": entry.get(f"acc_norm,{filter_key}"),
            "acc_norm_stderr": _number(entry.get(f"acc_norm_stderr,{filter_key}")),
            "bos": bos, "lm_eval": entry,
        }
        return TaskResult(task=PREFIX + name, kind=kind, fingerprint=fingerprint, bos=bos,
                          lines=[s["doc_id"] for s in rows], correct=correct, correct_norm=correct_norm,
                          predictions=predictions, loglikelihoods=loglikelihoods, summary=summary)


def _plain(entry: dict, default) -> dict:
    """lm-eval's results entry in standard JSON types (numpy scalars made plain, a non-finite number None)."""
    plain = json.loads(json.dumps(entry, default=default))
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in plain.items()}


def _number(value) -> float | None:
    """lm-eval writes ``"N/A"`` for a stderr it did not compute."""
    return value if isinstance(value, int | float) else None


def _binary(rows: list[dict], metric: str, task: str) -> list[bool]:
    values = [s[metric] for s in rows]
    odd = [v for v in values if v not in (0, 1)]
    if odd:
        raise UserError(f"lm-eval task {task}: {metric} per item is {odd[0]!r}, not 0 or 1, so items cannot be paired")
    return [bool(v) for v in values]


def load_harness_tasks(names: list[str], include_path: str | None = None,
                       limit: float | None = None) -> HarnessTasks:
    """Check the ``lm_eval:`` names (given without the prefix) and read their items; see the module docstring."""
    _import_lm_eval()
    check_limit(limit)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--lm-eval-include {include_path}: not a folder (give the folder that holds your task YAMLs)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"lm-eval task {repeated[0]} is named twice in --tasks")
    from lm_eval.tasks import TaskManager

    with _quiet():
        manager = TaskManager(include_path=include_path)
        for name in names:
            if name not in manager.all_tasks:
                raise UserError(_unknown_line(name, manager))
        try:
            loaded = manager.load(names)
        except OSError as exc:  # datasets: not cached and no network, or a data_files path that is not there
            raise UserError(_data_line(exc, names)) from None
        except ValueError as exc:  # e.g. one task in two of the named groups
            raise UserError(f"lm-eval cannot load {', '.join(names)}: {exc}") from None
    output_types = {}
    for leaf, task in loaded["tasks"].items():
        metrics = list(task.aggregation())
        if not any(m in metrics for m in PAIRED_METRICS):
            raise UserError(f"lm-eval task {leaf} reports {', '.join(metrics)}; quantaudit pairs items by "
                            f"{' or '.join(PAIRED_METRICS)} (0 or 1 per item), which it does not report")
        output_types[leaf] = task.OUTPUT_TYPE
    return HarnessTasks(names, limit, manager, output_types)
