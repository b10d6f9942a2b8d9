"""The process's memory as the C library hands it out: what is free, and giving freed memory back.

A streamed audit is judged by its peak resident memory (bench/bench_stream.py). glibc keeps freed
heap memory for reuse instead of returning it, so a large transient (the Rust tokenizer's per-token
records while a whole text file is tokenized; a streamed audit's few-MiB temporaries) would stay
resident for the rest of the run. The two glibc calls do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MMAP_THRESHOLD = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _glibc(name: str):
    """The C library function ``name``, or None where this C library has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def return_large_frees() -> bool:
    """Have glibc serve every allocation of ``MMAP_THRESHOLD`` bytes or more by its own mmap, so freeing it
    returns the memory to the system. By default glibc raises that threshold to the largest block freed so
    far (up to 32 MiB): a streamed audit's many few-MiB temporaries (logit blocks, per-layer states) then
    come from the heap, where the small tensors that outlive them pin the freed space, and the resident
    memory grew by ~4 MiB per block of logits (SmolLM2) until it held every block ever computed. Returns
    False where the C library has no ``mallopt`` (not glibc): nothing to do there."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, or None when the platform does not say.

    Linux: ``MemAvailable`` of /proc/meminfo, capped by a cgroup v2 ``memory.max`` (containers);
    other POSIX systems: free physical pages from ``os.sysconf``.
    """
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except OSError:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found = min(found, int(limit) - used) if found is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return found


def trim_heap() -> bool:
    """Return the free pages of glibc's heaps to the system (``malloc_trim(0)``), e.g. after tokenizing a
    large text: the Rust tokenizer's per-token records (~500 bytes a token) are freed but stay resident
    otherwise. False where there is no ``malloc_trim``."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))
