"""What a user keeps from a run besides its result file: the test predictions, one line per example, and the selected
model (body and end-task head) in a folder that loads back."""
from __future__ import annotations

import json
import os

import torch

import tartan

from . import models
from .common import ReproduceError, atomic_path, probe_writable

HEAD_FILE, INFO_FILE, BODY_FILE = "end_task_head.pt", "end_task.json", "body.pt"


def predictions_path(result_path: str) -> str:
    return result_path[:-len(".json")] + ".predictions.jsonl"


def write_predictions(path: str, end: tartan.Task, pred: list[int], lines: list[int] | None, labels: list[str]) -> None:
    """One JSON line per test example: its line in test.jsonl (or its index when there is no file), gold, predicted."""
    gold = end.test.labels if isinstance(end.test.labels, list) else end.test.labels.tolist()
    where = "line" if lines is not None else "index"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for i, (g, p) in enumerate(zip(gold, pred)):
            f.write(json.dumps({where: lines[i] if lines is not None else i, "gold": labels[g],
                                "predicted": labels[p]}) + "\n")


def check_save_dir(folder: str) -> None:
    """--save-model may replace a model it saved, never another folder: checked before training, and again when
    saving."""
    if os.path.exists(folder) and not os.path.isfile(os.path.join(folder, INFO_FILE)):
        raise ReproduceError(f"--save-model {folder}: the folder exists and is not a model saved by --save-model; "
                             f"choose a new folder")
    try:  # the model is written beside the folder, then renamed: where it goes must take a file
        probe_writable(os.path.dirname(os.path.abspath(folder)))
    except OSError as e:
        raise ReproduceError(f"--save-model {folder}: a model cannot be written there ({e}); choose another "
                             f"folder") from None


def save_model_atomic(folder: str, body, head, tokenizer, info: dict) -> None:
    """The selected body and end-task head in `folder`: for a Hugging Face body a directory that transformers (and
    models.from_pretrained) loads, plus the head's weights and the label list (end_task.json); for another body its
    state dict (body.pt). Written to a temporary folder beside it, then renamed (common.atomic_path): never half
    a model."""
    check_save_dir(folder)
    with atomic_path(folder, folder=True) as tmp:
        if isinstance(body, tartan.HFBody):
            body.encoder.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            torch.save(body.state_dict(), os.path.join(tmp, BODY_FILE))
        torch.save(head.state_dict(), os.path.join(tmp, HEAD_FILE))
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump({**info, "hidden_size": getattr(body, "hidden_size", None)}, f, indent=1)


def load_model(folder: str):
    """(body, end-task head, tokenizer, info) of a folder written by save_model_atomic for a Hugging Face body."""
    try:
        with open(os.path.join(folder, INFO_FILE)) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ReproduceError(f"{folder}: not a model saved by --save-model ({e})") from None
    body, _, tokenizer, _ = models.from_pretrained(folder)
    head = tartan.ClassificationHead(body.hidden_size, len(info["labels"]))
    head.load_state_dict(torch.load(os.path.join(folder, HEAD_FILE), map_location="cpu"))
    return body.eval(), head.eval(), tokenizer, info
