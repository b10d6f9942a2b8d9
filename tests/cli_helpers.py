"""Running the command line in-process on stories260K, and what a refused run must (not) leave behind."""

from __future__ import annotations

from pathlib import Path

from quantaudit.cli import main

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()  # as tests/conftest.py finds it
STORIES_HF = SHARED / "models" / "stories260K" / "hf"
TEXT = SHARED / "data" / "tinystories_sample.txt"


def tiny_audit(out: Path, *extra: str, model: Path | str = STORIES_HF) -> list[str]:
    """`audit` argv on stories260K that finishes in well under a second; later flags in ``extra`` win."""
    return ["audit", "--model", str(model), "--formats", "int8_wo", "--calib", str(TEXT), "--calib-size", "2",
            "--calib-seq", "32", "--eval", str(TEXT), "--windows", "2", "--seq-len", "32", "--drift-windows", "0",
            "--sensitivity-granularity", "none", "--out", str(out), *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``quantaudit ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a bad flag
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, fragment: str | None = None) -> None:
    """Exit 2 with one line on stderr (containing ``fragment``), and no traceback anywhere."""
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if fragment is not None:
        assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None] | None:
    """Every file's bytes (folders as None) under ``folder``, by relative path; None when it does not exist."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def leftovers(out: Path) -> list[str]:
    """Hidden siblings of ``out`` a run may use (its lock, its staging folder) that are still there."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
