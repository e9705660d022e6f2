"""Helpers every program of the runner shares: one error type, warnings, the atomic JSON writer, the progress
bar, seeding, the device resolver and the peak-memory reader."""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile

import numpy as np
import torch



class ReproduceError(RuntimeError):
    """A problem the user can fix (missing file, bad download, mismatched results): printed as one message."""


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _temp_file(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    """mkstemp in `folder`, with the permissions a plain open() would give (mkstemp makes files private, and a result
    or data file renamed from it would stay unreadable to the rest of a group)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_write_json(path: str, obj) -> None:
    """Write to a temporary file in the same folder, then os.replace: a reader never sees a half-written file, and a
    failure while writing leaves the previous file (if any) and no temporary file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _temp_file(folder, ".", ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def set_seed(seed: int) -> None:
    """The global generators (parameter initialisation, dropout); tartan's loops seed their own data generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReproduceError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"

def _peak_rss_mb() -> float | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's high-water mark
    except (ImportError, OSError):
        return None

def _bar(total, enabled, desc, unit="it"):
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)

    class _Silent:
        update = set_description = set_postfix = close = lambda *a, **k: None
    return _Silent()
