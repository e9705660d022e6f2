"""What the runs of one command read and share: the data files (each fetched and checked once, its SHA-256 kept for
the result files), CIFAR-100, and the checkpoints (each loaded once, named so that result files travel, and the LM
head fitted for one that has none)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import warnings

import numpy as np
import torch

import tartan

from . import models, tasks
from .common import ReproduceError, atomic_path, set_seed, warn
from .data import CIFAR_MD5, CIFAR_URL, DATA_URL, download, ensure_file, file_digest, model_identity
from .vision import read_cifar100


def cache_path(*parts: str) -> str:
    """A path under TARTAN_CACHE (default ~/.cache/tartan): the warmed LM heads, the progress files of unfinished runs."""
    return os.path.join(os.environ.get("TARTAN_CACHE", os.path.expanduser("~/.cache/tartan")), *parts)


def progress_path(config: dict, code_sha256) -> str:
    """Where a run saves its progress (resume.run_end_task's progress file): named by its config and the digests of
    its code (tartan.py's and the runner's), so that only the same run, by the same code, ever continues from it."""
    key = hashlib.sha256(json.dumps([config, code_sha256], sort_keys=True).encode()).hexdigest()[:24]
    os.makedirs(cache_path("runs"), exist_ok=True)
    return cache_path("runs", f"{key}.pt")


def corpus_texts(path: str) -> list[str] | str:
    """What tasks.mlm_task takes for an auxiliary corpus file: the texts of a JSONL split (a task of your own with
    no train.txt, or a .jsonl --aux-file: one {"text", "label"} object a line), else the path of a line file."""
    return tasks.read_jsonl(path)[0] if path.lower().endswith(".jsonl") else path


class DataFiles:
    """The data files of one command, fetched on first use and read once before any training (bad input fails
    early), each with its SHA-256 for the result files; CIFAR-100 with the channel statistics of its training images."""

    def __init__(self, data_dir: str, data_url: str = DATA_URL, progress: bool = True):
        self.data_dir, self.data_url, self.progress = data_dir, data_url, progress
        self.files = {}  # relative path under data_dir (or a user's absolute path) -> (path, SHA-256)
        self._checked, self._cifar = set(), None
        self._local = {}  # relative path -> SHA-256 of a file read here but not fetched (local_sha256)

    def file(self, rel: str) -> str:
        """A data file, fetched on first use; its SHA-256 is recorded in the result files."""
        if rel not in self.files:
            if os.path.isabs(rel):
                if not os.path.isfile(rel):
                    raise ReproduceError(f"{rel}: no such file")
                path = rel
            else:
                path = ensure_file(self.data_dir, rel, self.data_url, progress=self.progress)
            # a file local_sha256 has hashed already is not read a second time
            self.files[rel] = (path, self._local.get(rel) or file_digest(path))
        return self.files[rel][0]

    def sha256(self, rel: str) -> str:
        return self.files[rel][1]

    def local_sha256(self, rel: str) -> str | None:
        """The SHA-256 of a data file already here, without fetching it; None when it is not here."""
        if rel in self.files:
            return self.files[rel][1]
        path = rel if os.path.isabs(rel) else os.path.join(self.data_dir, *rel.split("/"))
        if not os.path.isfile(path):
            return None
        if rel not in self._local:
            self._local[rel] = file_digest(path)
        return self._local[rel]

    def check_end_task(self, folder: str) -> None:
        """Fetch an end-task's three splits and read them once (labels, JSON), before any run trains on them."""
        if folder not in self._checked:
            for split in ("train", "dev", "test"):
                self.file(f"{folder}/{split}.jsonl")
            tasks.read_end_task(os.path.join(self.data_dir, folder))
            self._checked.add(folder)

    def check_corpus(self, rel: str) -> None:
        """Fetch an auxiliary corpus and read it once, as the run will (corpus_texts)."""
        if rel not in self._checked:
            texts = corpus_texts(self.file(rel))
            if isinstance(texts, str):
                tasks.read_lines(texts)
            self._checked.add(rel)

    def end_task_dir(self, folder: str) -> str:
        """Where an end-task's files are (fetched)."""
        return os.path.dirname(self.file(f"{folder}/train.jsonl"))

    def labels(self, folder: str) -> list[str]:
        """An end-task's label names, in the order of the head's outputs."""
        return tasks.read_end_task(self.end_task_dir(folder))["labels"]

    def test_lines(self, folder: str, limit: int | None) -> list[int]:
        """The line in test.jsonl of each test example a run evaluates."""
        lines = tasks.read_jsonl(self.file(f"{folder}/test.jsonl"))[2]
        return [lines[i] for i in tasks.subset(len(lines), limit)]  # the subset tasks.end_task keeps

    def cifar(self) -> dict:
        if self._cifar is None:
            path = os.path.join(self.data_dir, "cifar-100", "cifar-100-python.tar.gz")
            if not os.path.isfile(path):
                download(CIFAR_URL, path, md5=CIFAR_MD5, timeout=120, progress=self.progress)
            elif file_digest(path, "md5") != CIFAR_MD5:
                warn(f"{path} differs from the official archive (MD5 {CIFAR_MD5}); using it as it is")
            self.files["cifar-100/cifar-100-python.tar.gz"] = (path, file_digest(path))
            self._cifar = read_cifar100(path)
            x = self._cifar["train"][0]  # channel mean and std of the training images, in [0, 1]
            self._cifar["stats"] = tuple(zip(*[(float(c.mean()), float(c.std()))
                                               for c in (x[:, i].astype(np.float32) / 255.0 for i in range(3))]))
        return self._cifar


class Checkpoints:
    """The checkpoints of one command: each loaded once (a run takes a deep copy), what names each in result files,
    and the LM head fitted for one that has none (models.warm_mlm_head), shared by every arm."""

    def __init__(self, model: str, checkpoint_dir: str | None, device: torch.device):
        self.model, self.checkpoint_dir, self.device = model, checkpoint_dir, device
        self._loaded, self._identity, self._warm = {}, {}, {}  # name -> checkpoint; name -> identity; key -> head

    def load(self, name: str | None = None):
        """(body, MLM head, tokenizer, missing weights) of --model, or of another checkpoint (a released baseline);
        a Hub id is looked up under --checkpoint-dir first."""
        name = name or self.model
        if name not in self._loaded:
            local = os.path.join(self.checkpoint_dir or "", name)
            set_seed(0)  # newly initialised checkpoint weights (e.g. a missing MLM head) are the same for every run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its warning of new weights: the note below says how they are drawn
                body, mlm, tokenizer, missing = models.from_pretrained(
                    local if self.checkpoint_dir and os.path.isdir(local) else name)
            if missing:
                print(f"note: {name} has no weights for {len(missing)} tensors (e.g. {missing[0]}); "
                      f"they are newly initialised, the same for every seed")
            self._loaded[name] = (body, mlm, tokenizer, missing)
        return self._loaded[name]

    def identity(self, name: str | None = None) -> str:
        """What names the model in result files (data.model_identity), computed once per model."""
        name = name or self.model
        if name not in self._identity:
            self._identity[name] = model_identity(name)
        return self._identity[name]

    def warm_head(self, name: str, plan: dict, corpus: str, corpus_sha256: str, max_length: int,
                  limit: int | None) -> dict:
        """{"state": the warmed head's own tensors, "info": its MLM loss before/after and digest} of checkpoint
        `name`, fitted on `corpus` (plan["corpus"], fetched) with the body frozen: once per process, and cached on disk
        (TARTAN_CACHE, default ~/.cache/tartan) under a key of everything that determines it."""
        import transformers
        key_fields = {"model": self.identity(name), "corpus_sha256": corpus_sha256, "max_length": max_length,
                      "limit": limit, "torch": str(torch.__version__), "transformers": transformers.__version__,
                      "device": self.device.type, **{k: v for k, v in plan.items() if k != "corpus"}}
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
        if key not in self._warm:
            cache = cache_path("warm-mlm-heads", f"{key}.pt")
            try:
                self._warm[key] = torch.load(cache, weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # none yet, or unreadable: fit it
                self._warm[key] = self._fit_warm_head(name, corpus, plan, key_fields, max_length, limit)
                try:
                    with atomic_path(cache) as tmp:
                        torch.save(self._warm[key], tmp)
                except (OSError, RuntimeError) as e:  # a full disk (torch's zip writer: a RuntimeError)
                    warn(f"could not cache the warmed LM head in {cache} ({e}); it is fitted again next time")
        return self._warm[key]

    def _fit_warm_head(self, name: str, corpus: str, plan: dict, key_fields: dict, max_length: int,
                       limit: int | None) -> dict:
        body0, mlm0, tokenizer, _ = self.load(name)
        body, mlm = copy.deepcopy((body0, mlm0))
        body.to(self.device), mlm.to(self.device)
        texts = corpus_texts(corpus)
        task = tasks.mlm_task("warm", texts, tokenizer, body, mlm, max_length, limit=limit)
        task = dataclasses.replace(task, head=mlm)
        print(f"fitting an LM head for {name} on {plan['corpus']} ({plan['steps']} steps, body frozen) ...",
              flush=True)
        info = models.warm_mlm_head(body, mlm, task, plan["steps"], plan["lr"], plan["batch_size"])
        state = {n: p.detach().cpu().clone() for n, p in mlm.named_parameters()
                 if id(p) in {id(q) for q in tartan.head_parameters(mlm, body)}}
        digest = hashlib.sha256(b"".join(state[n].numpy().tobytes() for n in sorted(state))).hexdigest()
        print(f"  MLM loss {info['loss_before']:.3f} -> {info['loss_after']:.3f}", flush=True)
        return {"state": state, "info": {**info, "sha256": digest, "key": key_fields}}
