"""Spreading the runs of one command over processes started by an existing launcher (torchrun, a SLURM array).

No scheduler of our own: every process builds the same full run list, takes every N-th run starting at its index K
(before finished runs are skipped, so shards started at different times never overlap or leave a gap), and writes
its result files into the shared --out. Runs are independent: no process group, no DDP inside a run.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from .common import ReproduceError


class ShardError(ReproduceError):
    """A shard given on the command line or by the launcher's environment that cannot be used."""


class Finished(Exception):
    """Raised when a command has done all it is to do before any table is made (a shard that finished its runs,
    --download-only): reproduce.py prints the message and exits 0."""


@dataclass(frozen=True)
class Shard:
    index: int                     # K: this process takes runs K, K + N, K + 2N, ... of the full list
    count: int                     # N: processes in the sweep
    local_rank: int | None = None  # GPU index on this node (torchrun's LOCAL_RANK); None: not set by a launcher
    source: str = "none"           # "--shard", "torchrun", "slurm", "slurm+torchrun" or "none"

    def take(self, runs: list) -> list:
        return runs[self.index::self.count]

    def __str__(self):
        return f"shard {self.index}/{self.count} ({self.source})"


def _int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ShardError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def parse_shard(spec: str | None, environ=None) -> Shard:
    """--shard K/N (0 <= K < N) if given, else a SLURM array's SLURM_ARRAY_TASK_ID / _COUNT (with _MIN and _STEP for
    arrays such as 1-8 or 0-14:2); torchrun's RANK / WORLD_SIZE / LOCAL_RANK alone, or inside either of them, splits
    that share again among the ranks. Nothing set: the whole list (0/1)."""
    environ = os.environ if environ is None else environ
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else None
    index, count, source = 0, 1, []
    if spec is not None:
        k, sep, n = spec.partition("/")
        if not sep or not k.strip().isdecimal() or not n.strip().isdecimal() or not 0 <= int(k) < int(n):
            raise ShardError(f"--shard {spec}: expected K/N with 0 <= K < N, e.g. 0/4")
        index, count = int(k), int(n)
        source.append("--shard")
    elif "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, n = _int(environ, "SLURM_ARRAY_TASK_ID"), _int(environ, "SLURM_ARRAY_TASK_COUNT")
        first = _int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        step = _int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
        if step < 1 or (task - first) % step or not 0 <= (task - first) // step < n:
            raise ShardError(f"SLURM array task {task} (min {first}, step {step}, count {n}) is not one of an evenly "
                             f"spaced range such as --array=0-{max(n - 1, 0)}: give --shard K/N instead")
        index, count = (task - first) // step, n
        source.append("slurm")
    if ("WORLD_SIZE" in environ) != ("RANK" in environ):  # half a launcher's environment: which share is unknown
        raise ShardError("RANK and WORLD_SIZE must be set together (torchrun sets both), or neither")
    if "WORLD_SIZE" in environ and "RANK" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ShardError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        index, count = index + rank * count, count * world  # rank r of share k takes runs[k::n][r::world]
        source.append("torchrun")
    return Shard(index, count, local_rank, "+".join(source) or "none")


def shard_device(requested: str, shard: Shard, cuda_count: int) -> str:
    """The device of this process: cuda:LOCAL_RANK (modulo the GPUs it sees) when a launcher set LOCAL_RANK and CUDA
    is asked for or available; else the requested one ('auto' resolves as usual)."""
    if shard.local_rank is None or requested == "cpu" or cuda_count == 0:
        return requested
    return f"cuda:{shard.local_rank % cuda_count}"


def ctrl_c_raises() -> None:
    """Ctrl-C raises KeyboardInterrupt again (which reproduce.main handles: runs kept, exit 130) where reproduce.py,
    run as a script, had its own handler (a lambda of __main__) end the process while the imports loaded; any other
    handler (SIGINT ignored in a background job, a caller's own) stays."""
    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__module__", None) == "__main__" and getattr(handler, "__name__", "") == "<lambda>" and \
            threading.current_thread() is threading.main_thread():  # only the main thread may set a handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
