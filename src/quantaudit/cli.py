"""The ``quantaudit`` command line: thin argument parsing over the library.

Every subcommand maps a user's flags onto one library call and prints the result as a table;
errors a user can fix are one line on stderr with exit code 2, a failed audit budget is 3; anything
else is a bug, reported in one line with the path of its saved traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import EXIT_BUG, EXIT_USAGE, UserError, save_traceback
from .fileio import atomic_write_json
from .progress import console
from .session import GenerationSettings, TaskSettings, add_arguments

EPILOG = """\
examples:
  quantaudit audit                                   # embedded default model and text
  quantaudit eval --model ../shared/models/stories260K/hf --data ../shared/data/tinystories_sample.txt
  quantaudit compare --base smollm2-135m --candidate ./my-quantized-hf --data eval.txt --json cmp.json
  quantaudit formats                                 # the formats, as TensorRT-LLM names them

models (--model/--base/--candidate): a Hugging Face folder, a .gguf file, or smollm2-135m
text (--data/--eval/--calib): .txt (documents split on <|endoftext|>) or .jsonl ({"text": ...});
  omitted, the embedded default text is used (Python's reference docs from the standard library)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_arg(p: argparse.ArgumentParser, flag: str = "--model", default: str | None = "smollm2-135m") -> None:
    p.add_argument(flag, default=default, required=default is None,
                   help="HF folder, .gguf file or short name (default: %(default)s)")


def _add_window_args(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    p.add_argument(data_flag, default=None, metavar="FILE",
                   help="evaluation text, .txt or .jsonl (default: embedded Python docs, eval half)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=None, metavar="N", help="use only the first N windows")
    p.add_argument("--bos", choices=["auto", "doc", "none"], default="auto",
                   help="BOS before each document: auto = what the tokenizer does by default (recorded)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")


def _lm_eval_dir(json_out: str | None):
    """Where ``eval``/``compare`` put lm-eval's own results: a folder beside ``--json`` (none without it)."""
    from pathlib import Path

    from .tasks import LM_EVAL_RESULTS

    return Path(json_out).parent / LM_EVAL_RESULTS if json_out else None


def _load_tasks(args):
    """The flags ``eval`` and ``compare`` share checked, then their tasks read."""
    from .session import TaskSettings, at_least, check_device

    for flag, low in (("--windows", 1), ("--seq-len", 2), ("--batch-size", 1)):
        at_least(flag, getattr(args, flag[2:].replace("-", "_")), low)
    check_device(args.device)
    tasks = TaskSettings.from_args(args)
    tasks.check()
    return tasks.load_tasks()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quantaudit",
        description="Quantize a causal LM to TensorRT-LLM formats, audit each against the baseline, "
        "recommend one, and export what was audited.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"quantaudit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity (and tokens/s) of one model",
                       description="Perplexity of one model on fixed token windows, with tokens/s.")
    _add_model_arg(p)
    _add_window_args(p)
    add_arguments(p, TaskSettings)
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="paired statistics of a candidate vs a base model",
                       description="KL divergence, top-1 agreement, delta-p and PPL ratio of --candidate "
                       "against --base on identical token windows (llama.cpp --kl-divergence statistics).")
    _add_model_arg(p, "--base", default=None)
    _add_model_arg(p, "--candidate", default=None)
    _add_window_args(p)
    add_arguments(p, TaskSettings)
    add_arguments(p, GenerationSettings)
    p.add_argument("--json", metavar="OUT", help="write the statistics as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "audit", help="quantize to every candidate format and audit each (the main job)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize --model to each of --formats (calibrated on --calib), compare each with the "
        "baseline on the same --eval windows, measure layer drift, per-layer sensitivity and activation "
        "outliers, and write DIR/report.json, report.md and report.html. Exit code 0: the recommended "
        "format meets --budget; 3: no format does; 2: bad input.",
        epilog="example:\n  quantaudit audit --model smollm2-135m --formats fp8,int8_sq,int4_awq "
        "--calib calib.txt --eval eval.txt --budget 'kld<=0.05' --out audit-out")
    add_audit_arguments(p, out_default="audit-out")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("demo", help="`audit` on the embedded default model and text, into ./audit-out",
                       description="The README's main command: audit SmolLM2-135M on the default text.")
    add_audit_arguments(p, out_default="audit-out")
    p.set_defaults(func=cmd_audit)

    from .advise import DESCRIPTION as ADVISE_DESCRIPTION
    from .advise import HELP as ADVISE_HELP
    from .advise import add_advise_arguments, run_advise

    p = sub.add_parser("advise", help=ADVISE_HELP, description=ADVISE_DESCRIPTION)
    add_advise_arguments(p)
    p.set_defaults(func=run_advise)

    from .calibcheck.command import add_calib_check_arguments, run_calib_check
    from .export.command import add_export_arguments, run_export
    from .tune.cli import add_autotune_arguments, run_autotune

    for name, add, run, summary, description in (
        ("export", add_export_arguments, run_export,
         "write the audited model as a TensorRT-LLM or HF quantized checkpoint",
         "Quantize exactly as the audit does and write a TensorRT-LLM checkpoint (config.json + rank*.safetensors, "
         "BUILD.md, build.sh) or a Hugging Face ModelOpt checkpoint."),
        ("autotune", add_autotune_arguments, run_autotune,
         "mixed precision: the cheapest per-layer plan meeting a budget",
         "Start from the most aggressive format, raise the most sensitive layers to a fallback until the measured "
         "budget holds; every plan is verified by evaluation."),
        ("calib-check", add_calib_check_arguments, run_calib_check,
         "measure what the choice of calibration set costs, per format",
         "Quantize each of --formats with --calib and every --calib2 set, measure the KLD on --eval against one "
         "baseline, and say per format whether calibration matters (pairs more than 2 paired standard errors "
         "apart) and which set is best; plus the KLD after 1, 4, 16, 64 samples of --calib, and the coverage "
         "figures as explanations. Example: quantaudit calib-check --calib wiki.txt --calib2 ptb.txt code.txt "
         "--eval prod.txt --out cc"),
    ):
        p = sub.add_parser(name, help=summary, description=description)
        add(p)
        p.set_defaults(func=run)

    p = sub.add_parser("formats", help="list the quantization formats",
                       description="The formats quantaudit simulates, named as ModelOpt's --qformat.")
    p.set_defaults(func=cmd_formats)
    return parser


def add_audit_arguments(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    from .audit.settings import AuditSettings

    add_arguments(p, AuditSettings)
    p.add_argument("--out", default=out_default, required=out_default is None, metavar="DIR",
                   help="output directory for report.json/.md/.html")
    p.add_argument("--force", action="store_true",
                   help="replace the previous run in --out (once this one has finished; kept if it fails)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (else the run in --out), reusing the formats it finished")


def cmd_audit(args) -> int:
    from pathlib import Path

    from .audit.run import run_audit
    from .audit.settings import AuditSettings
    from .report.terminal import audit_table, generation_table, timing_table

    settings = AuditSettings.from_args(args)
    report = run_audit(settings, Path(args.out), force=args.force, resume=args.resume)
    console.print(audit_table(report))
    for table in (generation_table(report), timing_table(report)):
        if table is not None:
            console.print(table)
    rec = report["recommendation"]
    console.print(("[green]" if rec["passed"] else "[red]") + rec["reason"])
    console.print(f"reports: {args.out}/report.html, report.md, report.json")
    return rec["exit_code"]


def cmd_eval(args) -> int:
    """Perplexity on --data (skipped when only --tasks are asked for), and task accuracy."""
    from .data import load_windows
    from .evaluate import evaluate_perplexity
    from .models import load_model
    from .report.terminal import perplexity_table, task_table
    from .stream.source import check_model_files
    from .tasks import check_tasks_bos, evaluate_tasks

    tasks = _load_tasks(args)
    check_model_files(args.model)
    lm = load_model(args.model, device=args.device)
    check_tasks_bos(tasks, lm.tokenizer, args.bos)
    result: dict = {"model": lm.name}
    if args.data or not tasks:
        windows = load_windows(args.data, lm.tokenizer, args.seq_len, args.windows, args.bos)
        result.update({"eval": windows.describe(), **evaluate_perplexity(lm.model, windows, args.batch_size)})
        console.print(perplexity_table(result))
    if tasks:
        results = evaluate_tasks(lm.model, lm.tokenizer, tasks, args.bos, _lm_eval_dir(args.json), "model")
        result["tasks"] = {r.task: r.summary for r in results}
        console.print(task_table(result["tasks"]))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def cmd_compare(args) -> int:
    from .data import load_windows
    from .evaluate import compare_models
    from .fidelity import compare_generations, continuations, prompt_set
    from .models import check_same_tokenizer, load_model
    from .report.terminal import generation_table, paired_table, task_comparison_table
    from .session import at_least
    from .stream.source import check_model_files
    from .tasks import check_tasks_bos, compare_task_results, evaluate_tasks

    tasks = _load_tasks(args)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    check_model_files(args.base)
    check_model_files(args.candidate)
    base = load_model(args.base, device=args.device)
    cand = load_model(args.candidate, device=args.device)
    check_same_tokenizer(base, cand)
    check_tasks_bos(tasks, base.tokenizer, args.bos)
    windows = load_windows(args.data, base.tokenizer, args.seq_len, args.windows, args.bos)
    stats = compare_models(base.model, cand.model, windows, batch_size=args.batch_size)
    result = {"base": base.name, "candidate": cand.name, "eval": windows.describe(), "stats": stats}
    console.print(paired_table(stats, title=f"{cand.name} vs {base.name}"))
    if tasks:
        results = [evaluate_tasks(m.model, m.tokenizer, tasks, args.bos, _lm_eval_dir(args.json), label)
                   for m, label in ((base, "base"), (cand, "candidate"))]
        result["tasks"] = [compare_task_results(b, c) for b, c in zip(*results)]
        console.print(task_comparison_table(result["tasks"]))
    if args.generate:
        prompts = prompt_set(args.generate, base.tokenizer, args.chat_template, args.max_new_tokens)
        generated = [continuations(m.model, m.tokenizer, prompts.prompts, prompts.ids, prompts.max_new_tokens,
                                   f"generating ({m.name})") for m in (base, cand)]
        result["generation"] = {**prompts.describe(),
                                **compare_generations(*generated, prompts.prompts, prompts.max_new_tokens)}
        console.print(generation_table({"formats": [{"name": cand.name, "generation": result["generation"]}]}))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def cmd_formats(args) -> int:
    from .report.terminal import formats_table

    console.print(formats_table())
    return 0


def _quiet_libraries() -> None:
    """transformers' own progress bars and advice would drown ours."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 3 the audit's budget failed, 2 bad input (one line on stderr),
    1 a bug (one line naming the saved traceback), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad flag: one line and SystemExit(2) (_Parser.error)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    command = f"quantaudit {args.command}"
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file the checks above did not foresee (permissions, a full disk): one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{command}: error: {_one_line(exc.strerror or exc)}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted; --out was left as it was (finished formats of an audit are kept for --resume)",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback saved for the bug report
        print(f"{command}: internal error, this is a bug ({type(exc).__name__}: {_one_line(exc)[:200]}); "
              f"please report it with the traceback saved in {save_traceback(args.command)}", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
