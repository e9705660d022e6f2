"""Resuming an interrupted run: a progress file that tartan.train's loop saves to (through its hook) and a new process
continues from, and the stage runner with which tartan.run_end_task continues a run stage by stage. A continued run
gives the uninterrupted run's result on CPU (on CUDA, to within its kernels' nondeterminism)."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import pickle
import time
import warnings

import torch
import torch.nn as nn

import tartan

from .common import atomic_path


class ProgressFile:
    """A file that a run saves its state to (at most every `every` seconds: due()) and that a new process continues
    from; written atomically, so that a save cut off leaves the last one. A file that another run wrote (its `what`
    differs) is an error, never continued. clock: the run's start, moved back on resume by the wall and CPU seconds
    that the interrupted processes spent up to their last save ("before")."""

    def __init__(self, path: str, every: float = 600.0, clock: dict | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.every, self.last = path, every, time.perf_counter()
        self.clock = clock or {"wall": time.perf_counter(), "cpu": time.process_time(), "before": None}

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def save(self, state: dict, what, **more) -> None:
        if self.every == math.inf:  # an earlier save failed: the run goes on without saving
            return
        spent = time.perf_counter() - self.clock["wall"], time.process_time() - self.clock["cpu"]
        try:
            with atomic_path(self.path) as tmp:
                torch.save({**state, **more, "what": what, "spent": spent}, tmp)
        except (OSError, RuntimeError) as e:  # a full disk (torch's zip writer: a RuntimeError) must not end a run
            why = e.strerror if isinstance(e, OSError) and e.strerror else e  # the path is said once
            warnings.warn(f"could not save the progress file {self.path} ({why}); the run goes on without saving")
            self.every = math.inf
        self.last = time.perf_counter()

    def load(self, what) -> dict | None:
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)  # this run's own file
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut off (a crash, a full disk)
            warnings.warn(f"the progress file {self.path} cannot be read ({type(e).__name__}: {e}); this part of the "
                          f"run starts again, and its next save replaces the file")
            return None
        if saved.get("what") != what:
            other = saved.get("what") if isinstance(saved.get("what"), dict) else {}
            diff = [f"{k}: {other.get(k)} there" if k == "device" else k for k in sorted(set(other) | set(what))
                    if other.get(k) != what.get(k)]
            raise ValueError(f"{self.path} holds the progress of another run ({', '.join(diff)}): delete it, or give "
                             f"this run another progress file")
        wall, cpu = saved["spent"]
        self.clock.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                          before={"wall_seconds": wall, "cpu_seconds": cpu})
        self.last = time.perf_counter()
        return saved

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def settings(cfg: tartan.TrainConfig | None) -> dict | None:
    """A config as a progress file is checked against: its class and fields, without the progress bar (a continued run
    may turn it off: it changes no number)."""
    if cfg is None:
        return None
    return {"class": type(cfg).__name__, **dataclasses.asdict(dataclasses.replace(cfg, progress=False)),
            "final_finetune": settings(cfg.final_finetune)}


def training_state(modules: list[nn.Module], optimizers=(), weighting=None, streams=()) -> dict:
    """Modules and optimizers (schedules too) by state_dict, the weighting's w and step count, each stream's draws,
    and the random state: the CPU's, and that of the GPU the first module is on (only that one, so that a run
    continues on another GPU or a machine with fewer)."""
    device = next(modules[0].parameters()).device
    return {"modules": [m.state_dict() for m in modules], "optimizers": [o.state_dict() for o in optimizers],
            "weighting": None if weighting is None else (weighting.w, weighting.steps),
            "drawn": [s.drawn for s in streams], "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def load_training(saved: dict, modules: list[nn.Module], optimizers=(), weighting=None, streams=()) -> None:
    for m, sd in zip(modules, saved["modules"]):
        m.load_state_dict(sd)
    for o, sd in zip(optimizers, saved["optimizers"]):
        o.load_state_dict(sd)
    if saved["weighting"] is not None:
        w, weighting.steps = saved["weighting"]
        weighting.w = w.to(weighting.w.device)  # saved from the CPU's copy; META keeps w beside its gradients
    for stream, n in zip(streams, saved["drawn"]):
        while stream.drawn < n:  # the same data order, masking and generator state as the interrupted run's
            next(stream)
    torch.set_rng_state(saved["rng"])
    device = next(modules[0].parameters()).device
    if saved["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


# the fields of tartan.Loop that a continued loop takes back, besides its modules, optimizers, weighting and streams
LOOP_FIELDS = ("step", "log", "history", "tokens", "best", "best_state", "best_alpha", "since_best", "seconds",
               "test_seconds")


class LoopProgress:
    """tartan.train's hook: at "start" it puts back the loop saved in `file` (if there is one, of this loop), and
    before each step it saves the loop when the file is due."""

    def __init__(self, file: ProgressFile):
        self.file = file

    def __call__(self, event: str, loop: tartan.Loop) -> None:
        parts = loop.modules, loop.optimizers, loop.weighting, loop.streams
        if event == "start":  # what the file must hold: another loop's file, or another device's, is refused
            self.what = {"config": settings(loop.cfg), "tasks": loop.names,
                         "device": next(loop.modules[0].parameters()).device.type}
            saved = self.file.load(self.what)
            if saved is not None:
                load_training(saved, *parts)
                for name in LOOP_FIELDS:
                    setattr(loop, name, saved["loop"][name])
        elif self.file.due():
            self.file.save(training_state(*parts), self.what, loop={name: getattr(loop, name) for name in LOOP_FIELDS})


class Stages:
    """tartan.run_end_task's stage runner that resumes: stage i saves its loop to `path`.stage<i>, and when it ends,
    its result, the models and the random state go to `path`; a call after an interruption takes the finished
    stages' results from there and continues the unfinished stage from its own file."""

    def __init__(self, path: str, every: float, modules: list[nn.Module], what):
        self.path, self.every, self.modules, self.what, self.results = path, every, modules, what, []
        self.record = ProgressFile(path, every)
        saved = self.record.load(what)
        self.finished = saved["stages"] if saved else []
        if saved:
            load_training(saved, modules)

    def __call__(self, name: str, fn, *args) -> dict:
        i = len(self.results)
        if i < len(self.finished):
            self.results.append(self.finished[i])
            return self.results[-1]
        own = ProgressFile(f"{self.path}.stage{i}", self.every, self.record.clock)
        self.results.append({"stage": name, **fn(*args, hook=LoopProgress(own))})
        self.record.save(training_state(self.modules), self.what, stages=self.results)
        own.remove()
        return self.results[-1]


def run_end_task(body, end: tartan.Task, aux: list[tartan.Task], mode: str, cfg=None, pretrain_cfgs=None,
                 path: str | None = None, every: float = 600.0, keep: bool = False) -> dict:
    """tartan.run_end_task that saves its progress to the file `path` (at most every `every` seconds, and at each
    stage's end) and, if the file is there, continues from it to the uninterrupted result. "resumed": the wall and
    CPU seconds that interrupted calls spent up to their last save (None if none). The files go when the run is
    done, or with keep=True stay until the caller has stored the result and calls remove(path)."""
    if path is None:
        return {**tartan.run_end_task(body, end, aux, mode, cfg, pretrain_cfgs), "resumed": None}
    what = {"mode": mode, "config": settings(cfg), "tasks": [t.name for t in [end] + aux],
            "pretrain": [settings(c) for c in pretrain_cfgs or []] if mode == "pretrain" else None}
    stages = Stages(path, every, [body, end.head] + [t.head for t in aux], what)
    out = tartan.run_end_task(body, end, aux, mode, cfg, pretrain_cfgs, stage=stages)
    if not keep:
        remove(path)
    return {**out, "resumed": stages.record.clock["before"]}


def remove(path: str, stale: float = 3600.0) -> None:
    """Removes a run's progress files at `path`: the record of finished stages and each stage's own, and the
    temporary files of saves cut off (a killed process) over `stale` seconds ago."""
    for stage in sorted(glob.glob(glob.escape(path) + ".stage*")):
        if not stage.endswith(".tmp"):  # a save in progress (another process's) is its own
            with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                os.remove(stage)
    folder, name = os.path.split(path)
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}") + "*.tmp")):
        with contextlib.suppress(FileNotFoundError):  # a save takes seconds: one this old was cut off
            if time.time() - os.path.getmtime(tmp) > stale:
                os.remove(tmp)
    ProgressFile(path).remove()


def untouched(folder: str, days: float = 7.0) -> str | None:
    """A note on the progress files in `folder` not saved to for `days`: runs stopped and never resumed, or whose
    flags, data or code have changed since (no command will continue them). They are never removed unasked."""
    runs = {}  # a run's files: its record (KEY.pt) and its stages' (KEY.pt.stageI)
    for f in glob.glob(os.path.join(glob.escape(folder), "*.pt*")):
        with contextlib.suppress(FileNotFoundError):  # removed by a run finishing meanwhile
            runs.setdefault(os.path.basename(f).split(".pt")[0], []).append((os.path.getmtime(f), os.path.getsize(f)))
    old = sorted(key for key, files in runs.items() if time.time() - max(t for t, _ in files) > days * 86400)
    if not old:
        return None
    size = sum(n for key in old for _, n in runs[key]) / 2**30
    names = ", ".join(f"{key}.pt*" for key in old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
    return (f"note: {folder} holds the progress files of {len(old)} run(s), {size:.1f} GiB, not saved to for over "
            f"{days:g} days ({names}): runs never resumed, or whose flags, data or code changed; delete them unless "
            f"you will resume them")
