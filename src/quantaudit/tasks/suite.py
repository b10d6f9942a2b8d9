"""The tasks a run names, each read by quantaudit's own readers or, for ``lm_eval:NAME``, by
lm-evaluation-harness (:mod:`.harness`), and scored on one model in one call.

:func:`load_tasks` keeps the order of ``--tasks``; all ``lm_eval:`` names are run together by one
:class:`~.harness.HarnessTasks` (one lm-eval evaluation per model), placed where the first of them stands.
:func:`evaluate_tasks` returns one :class:`~.scoring.TaskResult` per task (per leaf task of an lm-eval
group), in the same order for every model, so a baseline's and a candidate's results pair by position.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .harness import (
    PREFIX,
    HarnessTasks,
    harness_bos,
    is_harness_task,
    load_harness_tasks,
)
from .readers import Task, load_task
from .scoring import TaskResult, evaluate_task

LM_EVAL_RESULTS = "lm_eval"  # folder beside the report: lm-eval's own results layout, one file per model


def load_tasks(names: list[str], task_data: str | Path | None = None, limit: float | None = None,
               strict: bool = False, seed: int | None = None,
               lm_eval_include: str | None = None) -> list[Task | HarnessTasks]:
    """Read and check every task ``names`` lists (see the module docstring)."""
    harness = [name[len(PREFIX):] for name in names if is_harness_task(name)]
    if lm_eval_include is not None and not harness:
        raise UserError("--lm-eval-include is where lm-eval task YAMLs are found, but --tasks names no lm_eval:NAME task")
    if harness and seed is not None:
        raise UserError("--seed samples quantaudit's own tasks; lm-eval's --limit keeps the first items of each "
                        "lm_eval: task: drop --seed")
    tasks: list[Task | HarnessTasks] = []
    for name in names:
        if not is_harness_task(name):
            tasks.append(load_task(name, task_data, limit, strict, seed))
        elif name[len(PREFIX):] == harness[0]:
            tasks.append(load_harness_tasks(harness, lm_eval_include, limit))
    return tasks


def check_tasks_bos(tasks: list[Task | HarnessTasks], tokenizer, bos: str) -> None:
    """Refuse a BOS policy an lm-eval run cannot follow, before anything is scored (:func:`.harness.harness_bos`)."""
    if any(isinstance(task, HarnessTasks) for task in tasks):
        harness_bos(tokenizer, bos)


def evaluate_tasks(model, tokenizer, tasks: list[Task | HarnessTasks], bos: str = "auto",
                   results_dir: Path | None = None, label: str = "model") -> list[TaskResult]:
    """Every task scored on ``model``; with ``results_dir``, lm-eval's own results go to ``results_dir/label.json``."""
    results: list[TaskResult] = []
    for task in tasks:
        if isinstance(task, HarnessTasks):
            results += task.evaluate(model, tokenizer, bos, results_dir / f"{label}.json" if results_dir else None)
        else:
            results.append(evaluate_task(model, tokenizer, task, bos=bos))
    return results
