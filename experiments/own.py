"""A user's own end-task (--task-dir): the folder, its corpora and its default baseline (report.own_table prints its
table). No paper numbers, no checksums, no downloads."""
from __future__ import annotations

import os

from .common import ReproduceError
from .paper import TASKS

SPLITS = ("train", "dev", "test")


def own_tasks(folders: list[str]) -> dict:
    """Run name (the folder's name) -> absolute folder, for each --task-dir; a missing folder or split is an error."""
    out = {}
    for folder in folders:
        path = os.path.abspath(os.path.expanduser(folder))
        name = os.path.basename(path.rstrip(os.sep))
        if not os.path.isdir(path):
            raise ReproduceError(f"--task-dir {folder}: no such folder")
        missing = [f"{s}.jsonl" for s in SPLITS if not os.path.isfile(os.path.join(path, f"{s}.jsonl"))]
        if missing:
            raise ReproduceError(f"--task-dir {folder}: missing {', '.join(missing)} (an end-task folder holds "
                                 f"train.jsonl, dev.jsonl and test.jsonl)")
        if name in TASKS or name == "demo":
            raise ReproduceError(f"--task-dir {folder}: the folder's name '{name}' is a task of the paper; rename "
                                 f"the folder (results are stored under its name)")
        if name in out and out[name] == path:
            raise ReproduceError(f"--task-dir {folder} is given twice: give each folder once")
        if name in out:
            raise ReproduceError(f"--task-dir: two folders are named '{name}' ({out[name]} and {path}); results are "
                                 f"stored under the folder's name, so rename one")
        out[name] = path
    return out


def own_corpus_file(folder: str, label: str, extra: dict) -> str:
    """Absolute path of an auxiliary corpus of a user's task: tapt = the folder's train.txt if there is one, else its
    train.jsonl (whose texts are the corpus); other corpora come from --aux-file / --dapt-corpus FILE."""
    if label == "tapt":
        txt = os.path.join(folder, "train.txt")
        if os.path.exists(txt) and not os.path.isfile(txt):  # not passed over for train.jsonl without a word
            raise ReproduceError(f"{txt}: not a file (the task's TAPT text, one example per line)")
        return txt if os.path.isfile(txt) else os.path.join(folder, "train.jsonl")
    if label in extra:
        return os.path.abspath(extra[label])
    raise ReproduceError(f"{folder} is a task of your own: it has no DAPT corpus of the paper; give one with "
                         f"--dapt-corpus FILE")


def default_baseline(modes) -> str | None:
    return "tapt" if "tapt" in modes else "finetune" if "finetune" in modes else None
