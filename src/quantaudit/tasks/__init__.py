"""Task accuracy: lm-eval style multiple-choice log-likelihood scoring (PIQA, HellaSwag, a user's
JSONL), exact-match generation, lm-evaluation-harness itself for ``lm_eval:NAME`` tasks (optional extra,
:mod:`.harness`), and paired comparison of a quantized model against the baseline.

Typical use::

    task = load_task("piqa", task_data="data", limit=200)
    base = evaluate_task(base_model, tokenizer, task, bos="auto")
    cand = evaluate_task(quant_model, tokenizer, task, bos="auto")
    comparison = compare_task_results(base, cand)  # recovery, acc_drop, flips, mcnemar_p
    tasks_summary([comparison, ...])  # worst task: what the budget checks

or, for a run's ``--tasks`` list (built-in and ``lm_eval:`` names)::

    tasks = load_tasks(["piqa", "lm_eval:arc_easy"], task_data="data", limit=200)
    base = evaluate_tasks(base_model, tokenizer, tasks)  # one TaskResult per (leaf) task
    comparisons = [compare_task_results(b, c) for b, c in zip(base, evaluate_tasks(quant_model, tokenizer, tasks))]
"""

from .compare import DEFAULT_TASK_BUDGET, compare_task_results, mcnemar_exact_p, paired_bootstrap_ci, tasks_summary
from .readers import BUILTIN_TASKS, GENERATION, MULTIPLE_CHOICE, Item, Task, load_task
from .scoring import TaskResult, evaluate_task
from .suite import LM_EVAL_RESULTS, check_tasks_bos, evaluate_tasks, load_tasks

__all__ = [
    "BUILTIN_TASKS", "DEFAULT_TASK_BUDGET", "GENERATION", "LM_EVAL_RESULTS", "MULTIPLE_CHOICE", "Item", "Task",
    "TaskResult", "check_tasks_bos", "compare_task_results", "evaluate_task", "evaluate_tasks", "load_task",
    "load_tasks", "mcnemar_exact_p", "paired_bootstrap_ci", "tasks_summary",
]
