"""What every program of the runner shares, once each: the error type, warnings, the atomic writer, the progress bar,
seeding, the device resolver, the peak-memory reader, the one-sided comparison of per-seed scores, and the way scores,
seed lists and tables are written."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
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
def atomic_path(path: str, suffix: str = ".tmp", folder: bool = False):
    """Yields a temporary path in path's folder to write to (folder=True: an empty folder to fill); when the block ends
    without an error it is renamed to `path` (os.replace), else removed. A reader never sees a half-written file, and
    a failure leaves the previous file (if any) and no temporary file behind. The file gets the permissions a plain
    open() would give (mkstemp makes files private, and a result or data file renamed from it would stay unreadable
    to the rest of a group). A folder that replaces one is renamed in after the old one is moved aside, and the old
    one is removed last."""
    tmp = _beside(path, suffix, folder)
    if not folder:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        old = _beside(path, ".old", folder=True) if folder and os.path.exists(path) else None
        if old:
            os.replace(path, os.path.join(old, os.path.basename(path)))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _beside(path: str, suffix: str, folder: bool = False) -> str:
    """A new, hidden temporary file (or folder) in path's folder, named after path."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        if folder:
            return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=suffix)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    except OSError as e:  # named by the file meant, not by a temporary name (same type: callers tell them apart)
        raise type(e)(e.errno, e.strerror, path) from None
    os.close(fd)
    return tmp


def probe_writable(folder: str) -> None:
    """Makes `folder` (and its parents) and a file in it, removed at once: an OSError where nothing can be written,
    found before hours of training rather than after them."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure to `path` as PNG, atomically; the figure is closed whether or not the file could be
    written (an open figure keeps its memory for the rest of the command)."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def atomic_write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def progress_bar(total, enabled: bool, desc: str, unit: str = "it"):
    """tartan.progress_bar counting `unit` (bytes scaled to kB, MB, ...)."""
    return tartan.progress_bar(total, enabled, desc, unit=unit, unit_scale=unit == "B")


def set_seed(seed: int) -> None:
    """The global generators (parameter initialisation, dropout); tartan's loops seed their own data generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None): CUDA when torch sees it, else the CPU; 'cuda' without a CUDA device is an error. A CUDA device
    is made the process's current one."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReproduceError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(name)
    if device.type == "cuda":  # this process's GPU becomes the current one, before any CUDA work: code that asks for
        torch.cuda.set_device(device)  # the current device (autocast, libraries) then sees cuda:LOCAL_RANK, not cuda:0
    return device


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
    """tartan.permutation_test of per-seed scores a against b; its "min_p_greater" is the smallest one-sided p
    (H1: a > b) that this many seeds can give."""
    return tartan.permutation_test(list(a), list(b), n_permutations, seed)


def min_seeds(alpha: float = 0.05) -> int:
    """Fewest seeds a side for which the one-sided test of `compare` can give p < alpha."""
    n = 1
    while compare([0.0] * n, [0.0] * n)["min_p_greater"] >= alpha:
        n += 1
    return n


def alpha_of(entry: dict) -> dict | None:
    """alpha (task name -> weight) of a history entry or a trace; result files written before issue 18 call it
    "weights" (the history and trace keys) and keep reading so."""
    return entry["alpha"] if "alpha" in entry else entry.get("weights")


def mean_std(x, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of per-seed scores (ddof=1: the sample standard deviation)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=ddof)) if len(x) > ddof else 0.0


def fmt(mean_std, n: int | None = None) -> str:
    """(mean, std) of n scores as a table cell; one score has no spread to show."""
    return f"{mean_std[0]:.2f} (n=1)" if n == 1 else f"{mean_std[0]:.2f} ± {mean_std[1]:.2f}"


def seeds_str(seeds) -> str:
    """[0, 1, 2] -> "0-2"; a list with gaps -> "0,3"."""
    s = list(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 1 else ",".join(map(str, s))


def markdown_table(columns: list[str], rows: list, pad: bool = False) -> list[str]:
    """The lines of a Markdown table: a header of `columns`, then one line per row. A row is a dict {column: text}
    (a column it does not name is an empty cell, so a column can be added without touching the other rows) or a
    list of texts in column order. pad: every column as wide as its widest cell, for reading on a terminal."""
    cells = [[str(r.get(c, "")) for c in columns] if isinstance(r, dict) else [str(x) for x in r] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) if pad else 0 for i, c in enumerate(columns)]

    def line(texts):  # an empty cell of an unpadded table is "| |"
        return "|" + "|".join(f" {t.ljust(w)} " if t or w else " " for t, w in zip(texts, width)) + "|"
    return [line(columns), "|" + "|".join("-" * (w + 2) if pad else "---" for w in width) + "|", *map(line, cells)]
