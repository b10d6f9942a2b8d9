"""Where the hidden states at the current layer boundary wait: in memory up to a budget, on disk beyond.

A streamed audit holds, between two layers, every evaluation and calibration window's hidden state
for the baseline and for each candidate format. Past ``budget`` bytes they go to files in a private
temporary folder, written and read with plain file I/O rather than ``numpy.memmap``: pages of a
mapped file count in the process's resident memory for as long as they stay mapped, which is
exactly what spilling is meant to avoid.

The folder is removed when the store closes, on success, on an exception and on Ctrl-C; while a
store is open, SIGTERM (``kill``) exits through the same cleanup. Only SIGKILL can leave a folder
behind; its name carries the owner's process id, and the next store removes folders whose owner
is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

PREFIX = "quantaudit-spill-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_orphans(parent: Path) -> None:
    """Spill folders of processes that no longer exist (killed with SIGKILL)."""
    for folder in parent.glob(PREFIX + "*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class SpillStore:
    """Tensors by key: kept as they are while the total stays within ``budget`` bytes, else in a file.

    A key's tensor may be replaced by one of any size; :meth:`get` returns it on the device it came from.
    """

    def __init__(self, budget: int, directory: str | Path | None = None):
        self.budget = budget
        self.parent = Path(directory or tempfile.gettempdir())
        self.folder: Path | None = None  # created on the first spill
        self.ram_bytes = 0
        self.spilled_bytes = 0  # the most ever on disk at once
        self._ram: dict = {}
        self._disk: dict = {}  # key -> (file, shape, dtype, device, nbytes)
        self._files = 0
        self._old_handler = None

    def __enter__(self) -> "SpillStore":
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self.ram_bytes = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def _on_disk(self) -> int:
        return sum(entry[4] for entry in self._disk.values())

    def put(self, key, tensor: torch.Tensor) -> None:
        self.pop(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self.ram_bytes + nbytes <= self.budget:
            self._ram[key] = tensor
            self.ram_bytes += nbytes
            return
        if self.folder is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            _remove_orphans(self.parent)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.parent))
        file = self.folder / f"{self._files}.bin"
        self._files += 1
        tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(file)
        self._disk[key] = (file, tensor.shape, tensor.dtype, tensor.device, nbytes)
        self.spilled_bytes = max(self.spilled_bytes, self._on_disk())

    def get(self, key) -> torch.Tensor:
        if key in self._ram:
            return self._ram[key]
        file, shape, dtype, device, _ = self._disk[key]
        raw = torch.from_numpy(np.fromfile(file, dtype=np.uint8))
        return raw.view(dtype).reshape(shape).to(device)

    def pop(self, key) -> None:
        """Forget ``key`` (no error when absent)."""
        tensor = self._ram.pop(key, None)
        if tensor is not None:
            self.ram_bytes -= tensor.numel() * tensor.element_size()
        entry = self._disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

