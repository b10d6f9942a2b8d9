"""The ``quantaudit`` command line: thin argument parsing over the library.

Every subcommand maps a user's flags onto one library call and prints the result as a table;
errors a user can fix are one line on stderr with exit code 2, a failed audit budget is 3.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import EXIT_USAGE, UserError
from .fileio import atomic_write_json
from .progress import console

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="paired statistics of a candidate vs a base model",
                       description="KL divergence, top-1 agreement, delta-p and PPL ratio of --candidate "
                       "against --base on identical token windows (llama.cpp --kl-divergence statistics).")
    _add_model_arg(p, "--base", default=None)
    _add_model_arg(p, "--candidate", default=None)
    _add_window_args(p)
    p.add_argument("--json", metavar="OUT", help="write the statistics as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("formats", help="list the quantization formats",
                       description="The formats quantaudit simulates, named as ModelOpt's --qformat.")
    p.set_defaults(func=cmd_formats)
    return parser


def cmd_eval(args) -> int:
    from .data import load_windows
    from .evaluate import evaluate_perplexity
    from .models import load_model
    from .report.terminal import perplexity_table

    lm = load_model(args.model, device=args.device)
    windows = load_windows(args.data, lm.tokenizer, args.seq_len, args.windows, args.bos)
    result = {"model": lm.name, "eval": windows.describe(), **evaluate_perplexity(lm.model, windows, args.batch_size)}
    console.print(perplexity_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def cmd_compare(args) -> int:
    from .data import load_windows
    from .evaluate import compare_models
    from .models import check_same_tokenizer, load_model
    from .report.terminal import paired_table

    base = load_model(args.base, device=args.device)
    cand = load_model(args.candidate, device=args.device)
    check_same_tokenizer(base, cand)
    windows = load_windows(args.data, base.tokenizer, args.seq_len, args.windows, args.bos)
    stats = compare_models(base.model, cand.model, windows, batch_size=args.batch_size)
    result = {"base": base.name, "candidate": cand.name, "eval": windows.describe(), "stats": stats}
    console.print(paired_table(stats, title=f"{cand.name} vs {base.name}"))
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as exc:
        print(f"quantaudit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"quantaudit {args.command}: interrupted; finished outputs were kept, nothing half-written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
