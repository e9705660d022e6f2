"""What every program of the runner shares, once each: the error type, warnings, the atomic writer, the progress bar,
seeding, the device resolver, the peak-memory reader and the one-sided comparison of per-seed scores."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile

import numpy as np
import torch

import tartan


class ReproduceError(RuntimeError):
    """A problem the user can fix (missing file, bad download, mismatched results): printed as one message."""


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yields a temporary path in path's folder to write to; when the block ends without an error it is renamed to
    `path` (os.replace), else removed. A reader never sees a half-written file, and a failure leaves the previous file
    (if any) and no temporary file behind. The file gets the permissions a plain open() would give (mkstemp makes
    files private, and a result or data file renamed from it would stay unreadable to the rest of a group)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def progress_bar(total, enabled: bool, desc: str, unit: str = "it"):
    """A tqdm bar, or an object with the same methods that shows nothing."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)

    class _Silent:
        update = set_description = set_postfix = close = lambda *a, **k: None
    return _Silent()


def set_seed(seed: int) -> None:
    """The global generators (parameter initialisation, dropout); tartan's loops seed their own data generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None): CUDA when torch sees it, else the CPU; 'cuda' without a CUDA device is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReproduceError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                             platform.machine() or "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {device_name(device)}"
    return f"cpu: {device_name(device)}, {torch.get_num_threads()} threads"


class PeakMemory:
    """Peak memory over a region: on CUDA torch.cuda.max_memory_allocated; on Linux CPU the process's peak RSS (VmHWM)
    since the last reset through /proc/self/clear_refs (the whole process, model and optimizer state included); else
    None. On CPU, reset() first hands freed heap memory back to the OS (malloc_trim), so that the peak is the region's
    own even when glibc was told to keep freed memory; the refill page-faults, so do not time a region that is
    measured this way."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def read_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.process_peak_rss_mb()

    @staticmethod
    def process_peak_rss_mb() -> float | None:
        """The process's resident-memory high-water mark (VmHWM; since the last reset), in MB."""
        try:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            return int(hwm.split()[1]) / 1024
        except (OSError, StopIteration, ValueError):
            return None


def compare(a, b, n_permutations: int = 10_000, seed: int = 0) -> dict:
    """tartan.permutation_test of per-seed scores a against b, plus "min_p_greater": the smallest one-sided p
    (H1: a > b) that this many seeds can give."""
    a, b = list(a), list(b)
    test = tartan.permutation_test(a, b, n_permutations, seed)
    n_splits = math.comb(len(a) + len(b), len(a))
    test["min_p_greater"] = 1 / n_splits if test["exact"] else 1 / (test["n_permutations"] + 1)
    return test


def min_seeds(alpha: float = 0.05) -> int:
    """Fewest seeds a side for which the exact one-sided permutation test can give p < alpha."""
    n = 1
    while 1 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n
