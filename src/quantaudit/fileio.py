"""Atomic file output: a reader (or a rerun after Ctrl-C / kill) never sees a half-written file.

Everything is written to a temporary sibling first and moved into place with ``os.replace``,
which is atomic on POSIX and Windows for paths on the same filesystem. A command's ``--out`` folder
is written the same way (:func:`output_dir`): checked before any work, locked for the run, built in
a hidden folder beside it and swapped in whole at the end, so a failed or killed run never leaves
it changed, let alone half-replaced.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block finishes.

    ``target`` must not exist yet (callers check and refuse, or remove it under ``--force``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def beside(out: Path, what: str) -> Path:
    """The hidden sibling ``.NAME.what`` of ``out`` (its lock, its staging folder)."""
    return out.with_name(f".{out.name}.{what}")


def check_out_dir(out: str | Path, force: bool, outputs: tuple[str, ...] | None = None, hint: str = "") -> Path:
    """Refuse an ``--out`` that cannot take this run, without writing anything (call it with the other checks).

    ``outputs``: the names the command writes there; anything else in the folder is refused even with
    ``force``, which replaces the whole folder. ``None``: the whole folder is the command's.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    if not Path(os.path.abspath(out)).name:
        raise UserError(f"--out {out} is the root folder; give a folder of its own")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    other = [name for name in entries if outputs is not None and name not in outputs]
    if other:
        raise UserError(f"--out {out} holds {other[0]!r}, which this command does not write: give a folder of its own")
    if entries and not force:
        raise UserError(f"--out {out} is not empty: pass --force to replace what it holds{hint}")
    return out


_HELD: set[Path] = set()  # lock files this process holds (a command's steps may each ask for its --out)


@contextmanager
def out_lock(out: str | Path) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock`` on ``.NAME.lock`` beside ``out``) for the run; a second run on the
    same folder is refused with the pid of the one holding it. The lock file is removed when the run ends."""
    out = Path(os.path.realpath(out))
    path = beside(out, "lock")
    if fcntl is None or path in _HELD:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"--out {out} is in use by another quantaudit run (pid {holder}); "
                            "wait for it to finish or give another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the last holder removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        path.unlink(missing_ok=True)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # every later write is an atomic replace (a new file): the original is never touched
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def output_dir(out: str | Path, force: bool = False, resume: bool = False, outputs: tuple[str, ...] | None = None,
               keep_partial: bool = False, merge: bool = False, hint: str = "") -> Iterator[Path]:
    """``--out`` for one run, entered once every input is checked: yields the folder to write into.

    Under :func:`out_lock`, the run writes into ``.NAME.incoming`` beside ``out``; when the block finishes,
    that folder becomes ``out`` in one atomic swap (the previous contents are then removed), or with
    ``merge`` each file in it replaces its namesake in ``out`` (for a command writing one file into a
    folder it shares). If the block fails, ``out`` is as it was; the staging folder is removed, or kept
    with ``keep_partial`` when it holds finished work, for ``resume``: a resumed run continues in it (else
    starts from a copy of ``out``). Without ``resume``, a staging folder left by a killed run is discarded.
    """
    out = Path(os.path.realpath(out))
    staging, replaced = beside(out, "incoming"), beside(out, "replaced")
    with out_lock(out):
        if replaced.exists():  # killed between the two renames of a swap without RENAME_EXCHANGE
            if out.exists():
                shutil.rmtree(replaced)
            else:
                os.rename(replaced, out)
        check_out_dir(out, force or resume or merge, None if merge else outputs, hint)  # again: a run may have ended
        if staging.exists() and not resume:
            shutil.rmtree(staging)
        if not staging.exists():
            if resume and out.is_dir():
                shutil.copytree(out, staging, copy_function=_link_or_copy)
            else:
                staging.mkdir()
        try:
            yield staging
        except BaseException:
            if not (keep_partial and any(p.is_file() for p in staging.rglob("*"))):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if merge:
            out.mkdir(exist_ok=True)
            for p in staging.iterdir():
                os.replace(p, out / p.name)
            staging.rmdir()
        elif not out.exists():
            os.rename(staging, out)
        else:
            if _exchange(staging, out):
                os.rename(staging, replaced)
            else:
                os.rename(out, replaced)
                os.rename(staging, out)
            shutil.rmtree(replaced)
