"""Task accuracy: lm-eval style multiple-choice log-likelihood scoring (PIQA, HellaSwag, a user's
JSONL), exact-match generation, and paired comparison of a quantized model against the baseline.

Typical use::

    task = load_task("piqa", task_data="data", limit=200)
    base = evaluate_task(base_model, tokenizer, task, bos="auto")
    cand = evaluate_task(quant_model, tokenizer, task, bos="auto")
    comparison = compare_task_results(base, cand)  # recovery, acc_drop, flips, mcnemar_p
    tasks_summary([comparison, ...])  # worst task: what the budget checks
"""

from .compare import DEFAULT_TASK_BUDGET, compare_task_results, mcnemar_exact_p, paired_bootstrap_ci, tasks_summary
from .readers import BUILTIN_TASKS, GENERATION, MULTIPLE_CHOICE, Item, Task, load_task
from .scoring import TaskResult, evaluate_task

__all__ = [
    "BUILTIN_TASKS", "DEFAULT_TASK_BUDGET", "GENERATION", "MULTIPLE_CHOICE", "Item", "Task", "TaskResult",
    "compare_task_results", "evaluate_task", "load_task", "mcnemar_exact_p", "paired_bootstrap_ci", "tasks_summary",
]
