"""Task sets for accuracy audits, read into one item shape: PIQA, HellaSwag, or a user's JSONL.

Prompts follow lm-evaluation-harness (zero-shot):

- ``piqa``: context ``"Question: {goal}\\nAnswer:"``, choices ``sol1``/``sol2`` (lm-eval's
  ``piqa.yaml``); files ``piqa_valid.jsonl`` + ``piqa_valid_labels.lst`` (label line i belongs to
  record line i).
- ``hellaswag``: 6 lines per item (context, correct index 0-3, four endings), ``hellaswag_val.txt.bz2``
  or plain ``hellaswag_val.txt``. lm-eval builds the query as
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` and preprocesses each
  ending (``tasks/hellaswag/utils.py``). Our file's context line is already
  ``activity_label: ctx_a ctx_b`` with WikiHow's ``[title]`` markers replaced, but ``ctx_b`` is not
  capitalized. We re-apply lm-eval's ``preprocess`` (idempotent, and it also drops the few
  bracketed leftovers such as ``[www.kiddio.org]`` that lm-eval drops) and capitalize ``ctx_b``
  recovered as the fragment after the last sentence end. WikiHow items have an empty ``ctx_b`` and
  their context ends with ".", so they are left alone. Where ``ctx_b`` itself holds a sentence end,
  our split point differs from lm-eval's; none of the 3,243 ActivityNet items in the shipped file
  has a fragment that ``str.capitalize`` would change beyond its first letter.
- a path to ``.jsonl``: one record per line, either multiple choice
  ``{"context": str, "choices": [str, ...], "answer": int}`` (each choice is scored as
  ``" " + choice``, lm-eval's default ``target_delimiter``) or generation
  ``{"prompt": str, "answer": str}`` (greedy decoding, exact match after stripping whitespace). The
  first parseable record decides the kind; records of the other kind are bad items.

Bad items (fewer than two choices, an answer index out of range, an empty context, choice or
prompt, a record that is not valid JSON or has wrong field types) are listed with their line number
and skipped with one warning line, or refused with ``strict=True``; they are never scored.
``limit`` keeps the first N valid items, as lm-eval's ``--limit`` does (a fraction below 1 keeps
``ceil(fraction * valid items)``, as lm-eval's does); with ``seed`` it draws N items at random instead
(seeded, kept in file order), and the choice is recorded in ``meta``.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..progress import status_console

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
TASK_DATA_ENV = "QUANTAUDIT_TASK_DATA"
HELLASWAG_ENDINGS = 4
_MAX_LISTED = 10  # bad items named in one warning / error line
_BRACKETED = re.compile(r"\[.*?\]")


@dataclass(frozen=True)
class Item:
    """One scored unit. ``line`` is where it starts in its source file (1-based)."""

    line: int
    context: str  # multiple choice: the text the choices continue; generation: the prompt
    answer: int | str  # multiple choice: index of the right choice; generation: the expected text
    choices: tuple[str, ...] = ()


@dataclass
class Task:
    name: str
    kind: str  # MULTIPLE_CHOICE or GENERATION
    items: list[Item]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, what was wrong)
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        """Identity of the exact items, so two results are only paired over the same questions."""
        payload = [(it.line, it.context, list(it.choices), it.answer) for it in self.items]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"task": self.name, "kind": self.kind, "source": self.source, "n": self.n,
                "skipped": len(self.skipped), "fingerprint": self.fingerprint, **self.meta}


def mc_problem(context: str, choices, answer) -> str | None:
    """What makes a multiple-choice item unscorable, or None."""
    if not isinstance(context, str) or not context.strip():
        return "empty context"
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        return "'choices' must be a list of strings"
    if len(choices) < 2:
        return f"{len(choices)} choice(s), need at least 2"
    empty = [j for j, c in enumerate(choices) if not c.strip()]
    if empty:
        return f"choice {empty[0]} is empty"
    if not isinstance(answer, int) or isinstance(answer, bool):
        return f"answer {answer!r} is not an integer index"
    if not 0 <= answer < len(choices):
        return f"answer {answer} out of range 0..{len(choices) - 1}"
    return None


def generation_problem(prompt, answer) -> str | None:
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty prompt"
    if not isinstance(answer, str):
        return f"answer {answer!r} is not a string"
    return None


def _read_text(path: Path) -> str:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:  # e.g. a corrupt .bz2
        raise UserError(f"cannot read {path}: {exc}") from None


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_piqa(data_dir: Path) -> tuple[str, list[Item], list[tuple[int, str]]]:
    records_path = _find(data_dir, "piqa", ("piqa_valid.jsonl",))
    labels_path = _find(data_dir, "piqa", ("piqa_valid_labels.lst",))
    records, labels = _lines(_read_text(records_path)), _lines(_read_text(labels_path))
    if len(records) != len(labels):
        raise UserError(f"{records_path} has {len(records)} lines but {labels_path} has {len(labels)}: "
                        "they must match line by line")
    items, bad = [], []
    for lineno, (raw, label) in enumerate(zip(records, labels), 1):
        try:
            rec = json.loads(raw)
            goal, choices = rec["goal"], [rec["sol1"], rec["sol2"]]
        except (json.JSONDecodeError, TypeError, KeyError):
            bad.append((lineno, "not a JSON object with goal, sol1, sol2"))
            continue
        answer = int(label) if label.strip().lstrip("-").isdigit() else label
        problem = mc_problem(goal, choices, answer)
        if problem:
            bad.append((lineno, problem))
        else:
            items.append(Item(lineno, f"Question: {goal}\nAnswer:", answer, tuple(choices)))
    return str(records_path), items, bad


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow's bracket artifacts out, spaces tidied."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def hellaswag_query(context: str) -> str:
    """lm-eval's query from our file's full context: capitalize ``ctx_b``, then preprocess."""
    if not context.rstrip().endswith((".", "!", "?")):
        cut = max(context.rfind(". "), context.rfind("! "), context.rfind("? "), context.find(": "))
        start = cut + 2 if cut >= 0 else 0
        context = context[:start] + context[start:].capitalize()
    return hellaswag_preprocess(context)


def read_hellaswag(data_dir: Path) -> tuple[str, list[Item], list[tuple[int, str]]]:
    path = _find(data_dir, "hellaswag", ("hellaswag_val.txt.bz2", "hellaswag_val.txt"))
    lines = _lines(_read_text(path))
    block = 2 + HELLASWAG_ENDINGS
    if len(lines) % block:
        raise UserError(f"{path} has {len(lines)} lines, not a multiple of {block} "
                        f"(context, correct index, {HELLASWAG_ENDINGS} endings per item)")
    items, bad = [], []
    for start in range(0, len(lines), block):
        context, label, endings = lines[start], lines[start + 1].strip(), lines[start + 2 : start + block]
        answer = int(label) if label.isdigit() else label
        problem = mc_problem(context, endings, answer)
        if problem:
            bad.append((start + 1, problem))
        else:
            choices = tuple(hellaswag_preprocess(e) for e in endings)
            items.append(Item(start + 1, hellaswag_query(context), answer, choices))
    return str(path), items, bad


def read_jsonl_task(path: Path) -> tuple[str, list[Item], list[tuple[int, str]]]:
    """A user's own task file; returns its kind with the items (see the module docstring)."""
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    kind, items, bad = None, [], []
    for lineno, raw in enumerate(_lines(_read_text(path)), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append((lineno, f"not valid JSON ({exc.msg})"))
            continue
        rec_kind = (MULTIPLE_CHOICE if "choices" in rec else GENERATION if "prompt" in rec else None) \
            if isinstance(rec, dict) else None
        if rec_kind is None:
            bad.append((lineno, 'neither {"context","choices","answer"} nor {"prompt","answer"}'))
            continue
        kind = kind or rec_kind
        if rec_kind != kind:
            bad.append((lineno, f"a {rec_kind} record in a {kind} file"))
            continue
        if kind == MULTIPLE_CHOICE:
            problem = mc_problem(rec.get("context"), rec["choices"], rec.get("answer"))
            item = None if problem else Item(lineno, rec["context"], rec["answer"], tuple(rec["choices"]))
        else:
            problem = generation_problem(rec["prompt"], rec.get("answer"))
            item = None if problem else Item(lineno, rec["prompt"], rec["answer"])
        if problem:
            bad.append((lineno, problem))
        else:
            items.append(item)
    return kind or MULTIPLE_CHOICE, items, bad


BUILTIN_TASKS = {"piqa": read_piqa, "hellaswag": read_hellaswag}  # all multiple choice


def default_task_data() -> Path:
    """Where built-in task files are looked for when no folder is given: ``$QUANTAUDIT_TASK_DATA`` or ./task_data."""
    return Path(os.environ.get(TASK_DATA_ENV) or "task_data")


def _find(data_dir: Path, task: str, names: tuple[str, ...]) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    wanted = " or ".join(names)
    raise UserError(f"task {task} needs {wanted}, not found in {data_dir.resolve()}: "
                    f"point the task data folder (or ${TASK_DATA_ENV}) at the folder that holds it")


def _bad_items_line(name: str, bad: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"line {line}: {why}" for line, why in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return f"{name}: {len(bad)} bad item(s): {listed}{more}"


def check_limit(limit: float | None) -> None:
    """lm-eval's ``--limit``: a count of at least 1, or a fraction in (0, 1) of each task's items."""
    if limit is not None and not (isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit < 1):
        raise UserError(f"--limit must be at least 1 (items per task) or a fraction between 0 and 1 (got {limit})")


def _item_count(limit: float, n: int) -> int:
    """How many of ``n`` items ``limit`` keeps (lm-eval's ``get_sample_size``)."""
    return math.ceil(n * limit) if isinstance(limit, float) else limit


def _select(items: list[Item], limit: float | None, seed: int | None) -> list[Item]:
    if limit is not None:
        limit = _item_count(limit, len(items))
    if limit is None or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_task(name: str, task_data: str | Path | None = None, limit: float | None = None,
              strict: bool = False, seed: int | None = None) -> Task:
    """Read a task by name ("piqa", "hellaswag") or path to a ``.jsonl`` file; see the module docstring."""
    check_limit(limit)
    if name in BUILTIN_TASKS:
        data_dir = Path(task_data) if task_data is not None else default_task_data()
        source, items, bad = BUILTIN_TASKS[name](data_dir)
        kind = MULTIPLE_CHOICE
    elif name.endswith(".jsonl"):
        kind, items, bad = read_jsonl_task(Path(name))
        source = name
    else:
        known = ", ".join(BUILTIN_TASKS)
        raise UserError(f"unknown task {name!r}: use {known}, a path to a .jsonl task file, or lm_eval:NAME "
                        "for an lm-evaluation-harness task")
    if bad:
        message = _bad_items_line(name, bad)
        if strict:
            raise UserError(f"{message} (strict: fix or remove them)")
        status_console.print(f"warning: {message}; skipped", markup=False, highlight=False, soft_wrap=True)
    if not items:
        raise UserError(f"task {name} has no valid items to score ({source})")
    selected = _select(items, limit, seed)
    meta = {"limit": limit, "sample_seed": seed if len(selected) < len(items) else None,
            "valid_items": len(items)}
    return Task(name=name, kind=kind, items=selected, source=source, skipped=bad, meta=meta)
