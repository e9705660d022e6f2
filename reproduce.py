"""Run every table and figure of the TARTAN paper with tartan.py: one command each.

Dery, Michel, Talwalkar, Neubig. "Should We Be Pre-training? An Argument for End-task Aware Training as an
Alternative." ICLR 2022. https://arxiv.org/abs/2109.07437

    python reproduce.py --task aclarc --mode meta                 # META-TARTAN + TAPT on ACL-ARC, seeds 0-9
    python reproduce.py --task aclarc --mode tapt mt --seeds 0-2  # several modes, three seeds
    python reproduce.py --table 1                                 # Table 1 with the p-values of Table 6
    python reproduce.py --figure 3                                # meta-learned task weights, phi* vs phi'

Without overrides every run uses the paper's settings (Sec. 4; tartan's config dataclasses hold them) and the paper's
number of seeds, so a command is the paper's experiment. The budget flags (--max-length, --steps, ...) cut it down;
--quick is a tiny smoke budget. Every run writes one JSON file under --out (atomically); re-running skips runs whose
file is complete, so a killed sweep resumes where it stopped.

Contents:
  1. The paper's tables and figures: which runs each needs, and the paper's numbers
  2. Data: pinned download with SHA-256 checks; text end-tasks and MLM corpora; CIFAR-100 mammals (App. A.4)
  3. The WideResNet-16-2 body of the vision experiment
  4. Configs: the paper's values, --quick, and the budget flags
  5. One run: build body, heads and tasks, train with tartan, write the result file (resume)
  6. Tables (mean, std, permutation-test p-values) and figures (task weights, data efficiency)
  7. Speed benchmark (--bench)
  8. Offline demo (--task demo)
  9. Command line
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import pickle
import platform
import random
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tartan


class ReproduceError(RuntimeError):
    """A problem the user can fix (missing file, bad download, mismatched results): printed as one message."""


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# 1. The paper's tables and figures.

TASKS = {  # name -> upstream folder, display name, domain, headline metric (Table 1 caption; App. A.4: accuracy)
    "aclarc": dict(folder="citation_intent", title="ACL-ARC", domain="CS", metric="macro_f1"),
    "scierc": dict(folder="sciie", title="SCIERC", domain="CS", metric="macro_f1"),
    "chemprot": dict(folder="chemprot", title="CHEMPROT", domain="BIOMED", metric="micro_f1"),
    "hyperpartisan": dict(folder="hyperpartisan", title="HYPERPARTISAN", domain="NEWS", metric="macro_f1"),
    "mammals": dict(folder="cifar-100", title="Medium-Sized Mammals", domain="CIFAR-100", metric="accuracy"),
}
TEXT_MODES = ("finetune", "tapt", "dapt", "dapt+tapt", "mt", "meta", "meta-samehead")
VISION_MODES = ("finetune", "pretrain", "mt", "meta", "meta-samehead")
DAPT_FILES = {"1x": "domain.1xTAPT.txt", "10x": "domain.10xTAPT.txt", "full": "domain.full.txt"}


@dataclass(frozen=True)
class Column:
    label: str                 # the paper's column name
    mode: str                  # --mode
    aux: str | None = None     # --aux for mt/meta


@dataclass(frozen=True)
class Table:
    title: str
    tasks: tuple[str, ...]
    columns: tuple[Column, ...]
    baseline: tuple[str, ...] = ()   # p-values against this column (or the better-mean one of several, Table 8)
    baseline_name: str = ""          # how the p-value columns name the baseline
    seeds: int = 10                  # the paper's number of seeds
    dapt: str = "10x"                # DAPT corpus: n = 10 x |Train| (Table 2), or the full corpus (Table 3)
    note: str = ""


TAPT_COLS = (Column("TAPT", "tapt"), Column("MT-TARTAN", "mt", "tapt"), Column("META-TARTAN", "meta", "tapt"))
TABLES = {
    1: Table("Table 1 (p-values: Table 6). End-task aware training with TAPT as the auxiliary task",
             ("aclarc", "scierc", "chemprot"), (Column("RoBERTa", "finetune"),) + TAPT_COLS, baseline=("TAPT",)),
    7: Table("Table 7. HYPERPARTISAN", ("hyperpartisan",), (TAPT_COLS[0], TAPT_COLS[2]), baseline=("TAPT",)),
    2: Table("Table 2 (p-values: Table 8). DAPT at n = 10 x |Train|; TARTAN uses DAPT and TAPT",
             ("aclarc", "scierc", "chemprot"),
             (Column("DAPT", "dapt"), Column("DAPT+TAPT", "dapt+tapt"), Column("MT-TARTAN", "mt", "dapt+tapt"),
              Column("META-TARTAN", "meta", "dapt+tapt")), baseline=("DAPT", "DAPT+TAPT"),
             baseline_name="max(DAPT, DAPT+TAPT)"),
    3: Table("Table 3. DAPT and DAPT+TAPT on all domain data", ("aclarc", "scierc", "chemprot"),
             (Column("DAPT_full", "dapt"), Column("+TAPT_full", "dapt+tapt")), dapt="full",
             note="The paper's full DAPT corpora (S2ORC: 8.10B tokens CS, 7.55B BIOMED; Gururangan et al. 2020) are "
                  "not public: this table is run on whatever domain text is given (domain.full.txt placed by hand in "
                  "each task folder, or --dapt-corpus), and is not the paper's experiment unless that text is."),
    4: Table("Table 4. Only DAPT (n = 10 x |Train|) as the auxiliary task", ("aclarc", "scierc", "chemprot"),
             (Column("MT", "mt", "dapt"), Column("META", "meta", "dapt")), baseline=("MT",), seeds=3),
    5: Table("Table 5 (App. A.4). CIFAR-100 medium-sized mammals, the other 95 classes as auxiliary task",
             ("mammals",), (Column("Regular (Task-Agnostic) Pre-training", "pretrain"), Column("MT-TARTAN", "mt"),
                            Column("META-TARTAN", "meta")), baseline=("Regular (Task-Agnostic) Pre-training",),
             baseline_name="pre-training", seeds=3),
}
PAPER = {  # (table, task, column) -> (mean, std, p-value vs the baseline column or None); test set, x100
    (1, "aclarc", "RoBERTa"): (66.03, 3.55, None), (1, "aclarc", "TAPT"): (67.74, 3.68, None),
    (1, "aclarc", "MT-TARTAN"): (70.48, 4.42, 0.040), (1, "aclarc", "META-TARTAN"): (70.08, 4.70, 0.069),
    (1, "scierc", "RoBERTa"): (77.96, 2.96, None), (1, "scierc", "TAPT"): (79.53, 1.93, None),
    (1, "scierc", "MT-TARTAN"): (80.81, 0.74, 0.038), (1, "scierc", "META-TARTAN"): (81.48, 0.82, 0.005),
    (1, "chemprot", "RoBERTa"): (82.10, 0.98, None), (1, "chemprot", "TAPT"): (82.17, 0.65, None),  # Table 6: 0.065
    (1, "chemprot", "MT-TARTAN"): (84.29, 0.63, 0.000), (1, "chemprot", "META-TARTAN"): (84.49, 0.50, 0.000),
    (7, "hyperpartisan", "TAPT"): (93.39, 2.26, None), (7, "hyperpartisan", "META-TARTAN"): (96.84, 1.72, 0.003),
    (2, "aclarc", "DAPT"): (68.60, 2.62, None), (2, "aclarc", "DAPT+TAPT"): (69.12, 5.76, None),
    (2, "aclarc", "MT-TARTAN"): (71.58, 1.65, 0.110), (2, "aclarc", "META-TARTAN"): (71.05, 2.37, 0.174),
    (2, "scierc", "DAPT"): (76.44, 1.19, None), (2, "scierc", "DAPT+TAPT"): (77.62, 1.38, None),
    (2, "scierc", "MT-TARTAN"): (81.02, 1.24, 0.000), (2, "scierc", "META-TARTAN"): (81.41, 1.70, 0.000),
    (2, "chemprot", "DAPT"): (80.76, 0.54, None), (2, "chemprot", "DAPT+TAPT"): (78.22, 0.74, None),
    (2, "chemprot", "MT-TARTAN"): (83.77, 0.60, 0.000), (2, "chemprot", "META-TARTAN"): (83.38, 0.89, 0.000),
    (3, "aclarc", "DAPT_full"): (72.49, 3.28, None), (3, "aclarc", "+TAPT_full"): (73.79, 1.75, None),
    (3, "scierc", "DAPT_full"): (79.97, 2.11, None), (3, "scierc", "+TAPT_full"): (80.00, 1.08, None),
    (3, "chemprot", "DAPT_full"): (86.54, 1.05, None), (3, "chemprot", "+TAPT_full"): (87.24, 0.81, None),
    (4, "aclarc", "MT"): (69.27, 0.96, None), (4, "aclarc", "META"): (71.19, 4.88, None),
    (4, "scierc", "MT"): (81.53, 0.99, None), (4, "scierc", "META"): (82.08, 1.19, None),
    (4, "chemprot", "MT"): (80.26, 3.79, None), (4, "chemprot", "META"): (82.31, 0.75, None),
    (5, "mammals", "Regular (Task-Agnostic) Pre-training"): (46.7, 2.2, None),
    (5, "mammals", "MT-TARTAN"): (51.3, 1.2, None), (5, "mammals", "META-TARTAN"): (52.3, 3.8, None),
}
FIGURES = {  # figure -> (title, tasks, seeds); the runs are listed in figure_runs()
    2: ("Figure 2. Data efficiency: DAPT vs META-TARTAN (DAPT only) at n = 1x and 10x |Train|",
        ("aclarc", "scierc"), 3),
    3: ("Figure 3. Task weights of META-TARTAN on ACL-ARC with DAPT: separate meta head phi* vs the same head phi'",
        ("aclarc",), 3),
    4: ("Figure 4. Task weights of META-TARTAN with DAPT and TAPT across end-tasks",
        ("aclarc", "scierc", "chemprot"), 3),
}
N_PERMUTATIONS = 10_000  # App. A.2


# ----------------------------------------------------------------------------------------------------------------------
# 2. Data. The authors' copy of the end-task data, pinned to a commit, each file checked against its SHA-256.

DATA_URL = "https://raw.githubusercontent.com/ldery/TARTAN/471b8f21c006c443fca5db5678d283326534465c/datasets"
SHA256 = {  # ../shared/data/SHA256SUMS. No pinned hash is known for domain.10xTAPT.txt: it is not verified.
    "chemprot/dev.jsonl": "bfe8f39e5146ad4bb16b23707dade850546a305047bc666f6f6824c6a7e3df2f",
    "chemprot/domain.1xTAPT.txt": "7106a37fdaa02e62d060ae1d93dc7863349615d87a9115e4f65830f73e9d06ac",
    "chemprot/test.jsonl": "372249c85ffea6d9a18dc5168cf45841b3d79b03412d6c620381cfc0dd3d6d49",
    "chemprot/train.jsonl": "ab17b85c4fb869b2338d7c9617414e63f3c7225e5005920b18d9cd996f1049d8",
    "chemprot/train.txt": "56737b9918b8f48544474effd6891ab6a054f506716f1f4fe60b4fdb46aed350",
    "citation_intent/dev.jsonl": "bc456ac8caf40829dc2d3a44801a385ad8463c80682cbf002c19329b35812b5f",
    "citation_intent/domain.1xTAPT.txt": "a2caa22a5bf7aa0a0cab9d1d2ea56090200948adb5adfc30eae1b46f325fc69f",
    "citation_intent/test.jsonl": "749d083cc3141d54a2bf1475c02a5a1c020c664601d55fe2829bdf85f06db4bb",
    "citation_intent/train.jsonl": "58eef60d2bbfdabefc3de25191714f769db03134523ef67e87d864112c67908c",
    "citation_intent/train.txt": "7d98e80e195dd7618e851b55f5d2df6e283e0e19b825c5a5c554bc0d7257dda9",
    "hyperpartisan/dev.jsonl": "46e57a9e9a457804cf14af48bdb82723cb6dde887e082c8937122ebfc0f2dc4e",
    "hyperpartisan/dev.txt": "06344ed0d4430a0d40415cfe0cff51d737a9db129a998929d52d3ab1f6e3d96a",
    "hyperpartisan/test.jsonl": "055a0adfe0b6556068a3feabef6ba7fd011a7da07f75c316141c7a485ca3b63c",
    "hyperpartisan/test.txt": "8eededc90afd2ef9c50305b123f863f662bb14f87ece18bd84a8520c8784f0b5",
    "hyperpartisan/train.jsonl": "180cc9b1dad0e05b8dbc3ce866e6b371d5da0fccf41d249552d59c30c233e8f2",
    "hyperpartisan/train.txt": "d6948a06b9514160f257b5e8a931f9b29b50008bf5f273844e4b2c76a65a7736",
    "sciie/dev.jsonl": "9500a8e561f1ce50d972b8473525fe24ebae732bde653c381a4c65945965567a",
    "sciie/domain.1xTAPT.txt": "2114f88a2d3f6af976908da223215650fda7a9636f402291922af4e230a1aa77",
    "sciie/test.jsonl": "be4c06d2b8903783818a5e4cba08c71b954a86f00021907706f66ac3e26c58bd",
    "sciie/train.jsonl": "83d395d97de2c02dcb4898af3c6e34b5f5aa19771298fbc9f69ae435fa1258fb",
    "sciie/train.txt": "a8f11091d7167a6842e6d4eaabce6911db5d1ed49775d7bbc1cb6394cbf8ad11",
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NOT_PUBLIC = {"domain.full.txt"}  # never downloaded: the paper's full DAPT corpora are not public


def file_digest(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str, sha256: str | None = None, md5: str | None = None, timeout: float = 60,
             progress: bool = False) -> str:
    """Fetch url to dest through a temporary file in the same folder, check its digest, then rename: an interrupted
    or bad download leaves nothing at dest. Errors name the URL and say how to place the file by hand."""
    folder = os.path.dirname(os.path.abspath(dest))
    by_hand = (f"Download it by hand (e.g. `curl -L -o {dest} {url}`) or copy it there from elsewhere; files "
               f"already in the data folder are used as they are.")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _temp_file(folder, f".{os.path.basename(dest)}.", ".part")
    except OSError as e:
        raise ReproduceError(f"cannot write {dest} ({e.strerror}); choose a writable --data-dir. {by_hand}") from None
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            bar = _bar(total, progress and total > (1 << 22), f"download {os.path.basename(dest)}", unit="B")
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                for h in digests.values():
                    h.update(chunk)
                bar.update(len(chunk))
            bar.close()
        for name, want in (("sha256", sha256), ("md5", md5)):
            got = digests[name].hexdigest()
            if want is not None and got != want:
                raise ReproduceError(f"{url}: checksum mismatch ({name.upper()} {got}, expected {want}); the file was "
                                     f"not kept. {by_hand}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ReproduceError(f"could not download {url}: {reason}. {by_hand}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def ensure_file(data_dir: str, rel: str, base_url: str = DATA_URL, hashes: dict | None = None,
                progress: bool = False) -> str:
    """data_dir/rel, downloaded from base_url/rel on first use. A file already there is used as it is (a warning says
    when it differs from the pinned SHA-256)."""
    hashes = SHA256 if hashes is None else hashes
    path = os.path.join(data_dir, *rel.split("/"))
    want = hashes.get(rel)
    if os.path.isfile(path):
        if want is not None and file_digest(path) != want:
            warn(f"{path} differs from the authors' copy (SHA-256 {want}); using it as it is")
        return path
    if os.path.basename(rel) in NOT_PUBLIC:
        raise ReproduceError(f"{path} not found. The paper's full DAPT corpora are not public; place your own domain "
                             f"text there (one example per line), or pass --dapt-corpus 1x, 10x or a file.")
    download(f"{base_url}/{rel}", path, sha256=want, progress=progress)
    if want is None:
        warn(f"{rel}: no pinned SHA-256 is known for this file, so it was not verified (its SHA-256, "
             f"{file_digest(path)}, is recorded in each result file)")
    return path


# Text end-tasks and auxiliary MLM corpora ------------------------------------------------------------------------------


def corpus_file(task: str, label: str, extra: dict) -> str:
    """Relative path (under the data folder) or absolute path of an auxiliary corpus: tapt = the end-task's own
    training text (train.txt); dapt1x / dapt10x / daptfull = in-domain text of n = 1x / 10x |Train| / all."""
    folder = TASKS[task]["folder"]
    if label == "tapt":
        return f"{folder}/train.txt"
    if label.startswith("dapt") and label[4:] in DAPT_FILES:
        if task == "hyperpartisan":
            raise ReproduceError("hyperpartisan has no domain corpus in the authors' release: pass one with "
                                 "--dapt-corpus FILE")
        return f"{folder}/{DAPT_FILES[label[4:]]}"
    if label in extra:
        return os.path.abspath(extra[label])
    raise ReproduceError(f"unknown auxiliary corpus '{label}'")


def read_text_task(folder: str, tokenizer, max_length: int, limit: int | None) -> dict:
    """{train,dev,test}.jsonl -> tokenised TextData per split and the label vocabulary (tartan.read_end_task)."""
    data = tartan.read_end_task(folder)
    out = {"labels": data["labels"]}
    for split in ("train", "dev", "test"):
        texts, labels = data[split]
        keep = tartan.subset(len(texts), limit)
        ids = tartan.tokenize(tokenizer, [texts[i] for i in keep], max_length)
        out[split] = tartan.TextData(ids, [labels[i] for i in keep], tokenizer.pad_token_id)
    return out


def read_corpus(path: str, tokenizer, max_length: int, limit: int | None) -> tartan.TextData:
    lines = tartan.read_lines(path)
    lines = [lines[i] for i in tartan.subset(len(lines), limit)]
    return tartan.TextData(tartan.tokenize(tokenizer, lines, max_length), None, tokenizer.pad_token_id)


# CIFAR-100 medium-sized mammals (App. A.4), read from the python-format archive (no torchvision) -------------------

MAMMALS = (34, 63, 64, 66, 75)  # fine labels of the "medium-sized mammals" superclass: fox porcupine possum raccoon skunk


def read_cifar100(path: str) -> dict:
    """CIFAR-100 python archive (.tar.gz) -> {"train"|"test": (uint8 images (N, 3, 32, 32), fine labels (N,))}."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            out = {}
            for split in ("train", "test"):
                member = tar.extractfile(f"cifar-100-python/{split}")
                d = pickle.load(member, encoding="bytes")  # the official archive's format: pickled numpy arrays
                x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d[b"fine_labels"], dtype=np.int64)
                if len(x) != len(y) or y.min() < 0 or y.max() >= 100:
                    raise ValueError("images and fine labels do not match")
                out[split] = (x, y)
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
        raise tartan.DataError(f"{path}: not a CIFAR-100 python archive "
                               f"(cifar-100-python/{{train,test}} pickles): {e}") from None
    return out


def mammals_split(train_y, test_y, seed: int, n_train: int = 200, dev_frac: float = 0.2, dev_cap: int = 65,
                  n_test: int = 200) -> dict:
    """Indices of the end-task splits and the auxiliary task (notes on the authors' setup): at most n_train mammal
    training images, of which ~20% (at most dev_cap) are held out as dev; up to n_test mammal test images; the
    auxiliary task is every training image of the other 95 classes. Drawn from a generator seeded by `seed`."""
    g = np.random.default_rng(seed)
    is_mammal = np.isin(train_y, MAMMALS)
    picked = g.permutation(np.flatnonzero(is_mammal))[:n_train]
    n_dev = min(dev_cap, int(round(dev_frac * len(picked))))
    test = g.permutation(np.flatnonzero(np.isin(test_y, MAMMALS)))[:n_test]
    return {"train": np.sort(picked[n_dev:]), "dev": np.sort(picked[:n_dev]), "test": np.sort(test),
            "aux": np.flatnonzero(~is_mammal)}


def mammals_tasks(cifar: dict, seed: int, limit: int | None = None) -> tuple[tartan.Task, tartan.Task, dict]:
    """End-task (5-way, labels 0-4 in MAMMALS order) and auxiliary task (95-way) on TensorData, heads on H=128."""
    (x_tr, y_tr), (x_te, y_te) = cifar["train"], cifar["test"]
    idx = mammals_split(y_tr, y_te, seed)
    if limit:
        idx = {k: v[:limit] for k, v in idx.items()}
    to_end = {c: i for i, c in enumerate(MAMMALS)}
    others = [c for c in range(100) if c not in to_end]
    to_aux = {c: i for i, c in enumerate(others)}
    data = lambda x, y, ids, m: tartan.TensorData(torch.from_numpy(x[ids]), torch.tensor([m[int(c)] for c in y[ids]]))  # noqa
    if min(len(idx["train"]), len(idx["dev"]), len(idx["test"]), len(idx["aux"])) == 0:
        raise tartan.DataError("CIFAR-100 archive holds no images of some split of the mammals task")
    end = tartan.Task("mammals", tartan.ClassificationHead(WRN_WIDTH, len(MAMMALS)),
                      data(x_tr, y_tr, idx["train"], to_end), dev=data(x_tr, y_tr, idx["dev"], to_end),
                      test=data(x_te, y_te, idx["test"], to_end), num_labels=len(MAMMALS), metric="micro_f1")
    aux = tartan.Task("cifar95", tartan.ClassificationHead(WRN_WIDTH, len(others)),
                      data(x_tr, y_tr, idx["aux"], to_aux))
    sizes = {k: int(len(v)) for k, v in idx.items()}
    sizes["split_sha256"] = hashlib.sha256(b"".join(np.asarray(idx[k], np.int64).tobytes()
                                                    for k in ("train", "dev", "test"))).hexdigest()
    return end, aux, sizes


# ----------------------------------------------------------------------------------------------------------------------
# 3. WideResNet-16-2 (Zagoruyko & Komodakis 2016), the body theta_body of the vision experiment (App. A.4).

WRN_WIDTH = 128  # 64 * k with k = 2: the feature size H


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus a (1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k body: uint8 images (B, 3, 32, 32), normalised by the training-set channel mean and std, ->
    pooled features (B, H), H = 64 k. Called as body(x=...) by tartan's loops (tartan.TensorData)."""

    def __init__(self, depth: int = 16, widen: int = 2, dropout: float = 0.1, mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25)):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        layers, c_in = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            for b in range(n):
                layers.append(WideBlock(c_in, width, stride if b == 0 else 1, dropout))
                c_in = width
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.hidden_size = c_in
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float).view(1, 3, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        return self.net(x)  # (B, H)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Configs. tartan's dataclasses hold the paper's values; the vision budgets come from the authors' setup (notes).
#    A flag overrides one field in the stages named in its help; --quick sets a tiny budget under the flags.

VISION = dict(lr=3e-4, head_lr=3e-4, weight_decay=0.0, head_weight_decay=0.0, betas=(0.9, 0.999), adam_eps=1e-8,
              batch_size=64, aux_batch_size=64, grad_accum=1, epochs=30, eval_every=0, patience=30)  # Adam, 30 epochs
VISION_META = dict(meta_lr=5e-2, meta_head_lr=3e-2, meta_head_wd=0.1, meta_head_steps=10, meta_batch_size=16)
QUICK = {"max_length": 64, "limit": 64,
         "train": dict(max_steps=4, eval_every=2, patience=2, batch_size=8, aux_batch_size=8, grad_accum=1,
                       meta_batch_size=8, eval_batch_size=32),
         "pretrain": dict(max_steps=2, aux_batch_size=8, grad_accum=1),
         "final": dict(max_steps=2, eval_every=1, patience=1, batch_size=8, grad_accum=1, eval_batch_size=32)}
# --budget cpu: a small pretrained body (all-MiniLM-L6-v2 size) on a 2-core CPU, under which fine-tuning alone learns
# ACL-ARC. Every end-task stage stops early on dev (evaluated every 50 steps, patience 4) within its step cap; the
# Eq. 2 stages (finetune, and the fine-tuning after TAPT/DAPT) take the body learning rate chosen on dev from the grid
# in the README; no final fine-tuning after MT/META. Flags given beside --budget override single values.
BUDGETS = {"cpu": {"max_length": 64,
                   "train": dict(batch_size=16, aux_batch_size=16, grad_accum=1, max_steps=400, eval_every=50,
                                 patience=4, meta_batch_size=16, eval_batch_size=64),
                   "eq2": dict(lr=1e-4, head_lr=1e-3),
                   "pretrain": dict(max_steps=400, aux_batch_size=16, grad_accum=1),
                   "final": None}}
FLAGS = {  # flag -> (config field, stages it sets)
    "batch_size": ("batch_size", ("train", "final")),
    "aux_batch_size": ("aux_batch_size", ("train", "pretrain")),
    "grad_accum": ("grad_accum", ("train", "pretrain", "final")),
    "epochs": ("epochs", ("train",)), "steps": ("max_steps", ("train",)),
    "lr": ("lr", ("train",)), "head_lr": ("head_lr", ("train",)),
    "eval_every": ("eval_every", ("train",)), "patience": ("patience", ("train",)),
    "meta_lr": ("meta_lr", ("train",)), "meta_batch_size": ("meta_batch_size", ("train",)),
    "meta_head_steps": ("meta_head_steps", ("train",)), "meta_head_lr": ("meta_head_lr", ("train",)),
    "pretrain_epochs": ("epochs", ("pretrain",)), "pretrain_steps": ("max_steps", ("pretrain",)),
    "pretrain_lr": ("lr", ("pretrain",)), "pretrain_head_lr": ("head_lr", ("pretrain",)),
    "final_epochs": ("epochs", ("final",)), "final_steps": ("max_steps", ("final",)),
    "final_lr": ("lr", ("final",)), "final_head_lr": ("head_lr", ("final",)),
}


def _with(cfg, values: dict):
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})


def stage_values(args, stage: str, eq2: bool = False) -> dict:
    """Config values of one stage: --quick or --budget first, then the flags given."""
    values = dict(QUICK[stage]) if args.quick else {}
    if args.budget:
        values.update(BUDGETS[args.budget][stage] or {})
        if eq2:
            values.update(BUDGETS[args.budget]["eq2"])
    for flag, (name, stages) in FLAGS.items():
        if stage in stages and getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    return values


def make_configs(args, task: str, mode: str, seed: int, n_pretrain: int):
    """(config of the end-task stage, [config of each Eq. 1 stage]) for one run; seed drives data order and masking."""
    vision = task == "mammals"
    common = dict(seed=seed, progress=args.progress)
    if mode in ("mt", "meta", "meta-samehead"):
        cfg = tartan.MetaConfig(same_head=mode == "meta-samehead") if mode != "mt" else tartan.TrainConfig()
        cfg = _with(cfg, {**(VISION if vision else {}), **(VISION_META if vision else {})})
        final = None
        no_final = args.no_final_finetune or (args.budget and BUDGETS[args.budget]["final"] is None)
        if not vision and not no_final:  # the optional Eq. 2 stage (released scripts' settings)
            final = _with(tartan.tartan_finetune(), {**stage_values(args, "final"), **common})
        cfg = _with(cfg, {**stage_values(args, "train"), **common, "final_finetune": final})
    else:
        cfg = _with(tartan.FinetuneConfig(), {**(VISION if vision else {}), **stage_values(args, "train", eq2=True),
                                              **common})
    pre = _with(tartan.PretrainConfig(), {**(VISION if vision else {}), "eval_every": -1,
                                           **stage_values(args, "pretrain"), **common})
    return cfg, [pre] * n_pretrain


def tartan_mode(mode: str) -> str:
    return {"tapt": "pretrain", "dapt": "pretrain", "dapt+tapt": "pretrain", "meta-samehead": "meta"}.get(mode, mode)


# ----------------------------------------------------------------------------------------------------------------------
# 5. One run: (task, mode, auxiliary corpora, seed) -> one JSON result file.


@dataclass(frozen=True)
class Run:
    task: str
    mode: str
    aux: tuple[str, ...]  # auxiliary corpora, in order (Eq. 1 stages, or the tasks T_1..T_n of MT/META)
    seed: int

    @property
    def aux_label(self) -> str:
        return "+".join(self.aux) or "none"

    @property
    def key(self) -> dict:
        return {"task": self.task, "mode": self.mode, "aux": self.aux_label, "seed": self.seed}

    def path(self, out: str) -> str:
        return os.path.join(out, self.task, f"{self.mode}__{self.aux_label}__seed{self.seed}.json")

    def __str__(self):
        return f"{self.task} {self.mode}" + (f" aux={self.aux_label}" if self.aux else "") + f" seed {self.seed}"


def make_run(task: str, mode: str, aux: str | None, seed: int, dapt: str, aux_files: tuple[str, ...] = ()) -> Run:
    """The corpora of a run: the mode's own for tapt/dapt/dapt+tapt (DAPT before TAPT, as Gururangan et al. chain
    them), --aux for MT/META (default TAPT, Table 1), then the --aux-file corpora."""
    if task == "mammals":
        return Run(task, mode, () if mode == "finetune" else ("cifar95",), seed)
    spec = {"tapt": "tapt", "dapt": "dapt", "dapt+tapt": "dapt+tapt"}.get(mode)
    if mode in ("mt", "meta", "meta-samehead"):
        spec = aux or "tapt"
    names = [] if spec in (None, "none") else [f"dapt{dapt}" if s == "dapt" else s for s in spec.split("+")]
    if mode in ("tapt", "dapt", "dapt+tapt"):
        names = list(aux_files) + names  # extra corpora are further Eq. 1 stages, before the mode's own
    else:
        names += list(aux_files)
    return Run(task, mode, tuple(names), seed)


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


def load_result(path: str, run: Run | None = None) -> dict | None:
    """A complete result file (for `run`), or None when there is none or it is incomplete or unreadable."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("complete") is not True or (run is not None and rec.get("key") != run.key):
        return None
    return rec


def config_diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} here, {b!r} in the file"]


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


def versions() -> dict:
    import transformers
    here = os.path.dirname(os.path.abspath(tartan.__file__))
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "tartan.py_sha256": file_digest(os.path.join(here, "tartan.py"))}


class Workspace:
    """What every run of one invocation shares: the loaded checkpoint (a deep copy per run), tokenised data, files."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.max_length = args.max_length or (QUICK["max_length"] if args.quick else
                                              BUDGETS[args.budget]["max_length"] if args.budget else 512)
        self.limit = args.limit if args.limit is not None else (QUICK["limit"] if args.quick else None)
        self.extra = dict(args.extra_corpora)
        self._model, self._text, self._corpora, self._cifar, self.files = None, {}, {}, None, {}

    def file(self, rel: str) -> str:
        """A data file, fetched on first use; its SHA-256 is recorded in the result files."""
        if rel not in self.files:
            if os.path.isabs(rel):
                if not os.path.isfile(rel):
                    raise ReproduceError(f"{rel}: no such file")
                path = rel
            else:
                path = ensure_file(self.args.data_dir, rel, self.args.data_url, progress=self.args.progress)
            self.files[rel] = (path, file_digest(path))
        return self.files[rel][0]

    def model(self):
        if self._model is None:
            set_seed(0)  # newly initialised checkpoint weights (e.g. a missing MLM head) are the same for every run
            body, mlm, tokenizer, missing = tartan.from_pretrained(self.args.model)
            if missing:
                print(f"note: {self.args.model} has no weights for {len(missing)} tensors (e.g. {missing[0]}); they "
                      f"are newly initialised, the same for every seed")
            self._model = (body, mlm, tokenizer, missing)
        return self._model

    def prepare(self, run: Run):
        """Load and check everything a run needs, before any training (so bad input fails early)."""
        if run.task == "mammals":
            return self.cifar()
        tokenizer = self.model()[2]
        folder = TASKS[run.task]["folder"]
        if run.task not in self._text:
            for split in ("train", "dev", "test"):
                self.file(f"{folder}/{split}.jsonl")
            self._text[run.task] = read_text_task(os.path.join(self.args.data_dir, folder), tokenizer,
                                                  self.max_length, self.limit)
        for name in run.aux:
            if (run.task, name) not in self._corpora:
                path = self.file(corpus_file(run.task, name, self.extra))
                self._corpora[run.task, name] = read_corpus(path, tokenizer, self.max_length, self.limit)

    def cifar(self) -> dict:
        if self._cifar is None:
            path = os.path.join(self.args.data_dir, "cifar-100", "cifar-100-python.tar.gz")
            if not os.path.isfile(path):
                download(CIFAR_URL, path, md5=CIFAR_MD5, timeout=120, progress=self.args.progress)
            elif file_digest(path, "md5") != CIFAR_MD5:
                warn(f"{path} differs from the official archive (MD5 {CIFAR_MD5}); using it as it is")
            self.files["cifar-100/cifar-100-python.tar.gz"] = (path, file_digest(path))
            self._cifar = read_cifar100(path)
            x = self._cifar["train"][0]  # channel mean and std of the training images, in [0, 1]
            self._cifar["stats"] = tuple(zip(*[(float(c.mean()), float(c.std()))
                                               for c in (x[:, i].astype(np.float32) / 255.0 for i in range(3))]))
        return self._cifar

    def build(self, run: Run):
        """(body, end-task, auxiliary tasks, data sizes) for one run, on the device, after seeding the run."""
        set_seed(run.seed)
        if run.task == "mammals":
            cifar = self.cifar()
            mean, std = cifar["stats"]
            body = WideResNet(16, 2, dropout=0.1, mean=mean, std=std)
            end, aux, sizes = mammals_tasks(cifar, run.seed, self.limit)
            aux = [aux] if run.aux else []
        else:
            body0, mlm0, tokenizer, _ = self.model()
            body, mlm = copy.deepcopy((body0, mlm0))  # one deepcopy keeps the tied decoder weight shared
            data = self._text[run.task]
            end = tartan.Task(run.task, tartan.ClassificationHead(body.hidden_size, len(data["labels"])),
                              data["train"], dev=data["dev"], test=data["test"], num_labels=len(data["labels"]),
                              metric="micro_f1" if TASKS[run.task]["metric"] == "micro_f1" else "macro_f1")
            masking = tartan.Masking.for_tokenizer(tokenizer)
            chained = tartan_mode(run.mode) == "pretrain"  # DAPT+TAPT continues one model, LM head included
            aux = [tartan.Task(name, mlm if chained else tartan.new_mlm_head(mlm, body),
                               self._corpora[run.task, name], masking=masking) for name in run.aux]
            sizes = {"train": len(data["train"]), "dev": len(data["dev"]), "test": len(data["test"]),
                     **{f"aux:{name}": len(self._corpora[run.task, name]) for name in run.aux}}
        body.to(self.device)
        for t in [end] + aux:
            t.head.to(self.device)
        return body, end, aux, sizes

    def run_files(self, run: Run) -> list[str]:
        if run.task == "mammals":
            return ["cifar-100/cifar-100-python.tar.gz"]
        folder = TASKS[run.task]["folder"]
        return [f"{folder}/{s}.jsonl" for s in ("train", "dev", "test")] + [corpus_file(run.task, n, self.extra)
                                                                            for n in run.aux]

    def config(self, run: Run) -> dict:
        """Everything that determines a run's result (compared on resume); JSON-normalised."""
        cfg, pre = make_configs(self.args, run.task, run.mode, run.seed, len(run.aux))
        strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "progress"} if c else None  # noqa
        out = {**run.key, "aux": list(run.aux), "tartan_mode": tartan_mode(run.mode), "limit": self.limit,
               "train": strip(cfg), "pretrain": [strip(p) for p in pre] if tartan_mode(run.mode) == "pretrain" else []}
        if out["train"] and out["train"].get("final_finetune"):
            out["train"]["final_finetune"].pop("progress", None)
        if run.task == "mammals":
            out.update(body="WideResNet-16-2 (dropout 0.1)", split=dict(n_train=200, dev_frac=0.2, dev_cap=65,
                                                                         n_test=200, classes=MAMMALS))
        else:
            out.update(model=self.args.model, max_length=self.max_length,
                       metric=TASKS[run.task]["metric"], corpora={n: corpus_file(run.task, n, self.extra)
                                                                  for n in run.aux})
        return json.loads(json.dumps(out))

    def execute(self, run: Run) -> dict:
        """Train and evaluate one run and write its result file; nothing is written unless it completes."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        cfg, pre = make_configs(self.args, run.task, run.mode, run.seed, len(run.aux))
        self.prepare(run)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        body, end, aux, sizes = self.build(run)
        out = tartan.run_end_task(body, end, aux, tartan_mode(run.mode), cfg, pre)
        metric = TASKS[run.task]["metric"]
        field = "micro_f1" if metric == "accuracy" else metric
        tokens = {}
        for stage in out["stages"]:
            for name, n in stage.get("tokens", {}).items():
                tokens[name] = tokens.get(name, 0) + n
        record = {
            "complete": True, "key": run.key, "config": self.config(run),
            "dev": out["dev"], "test": out["test"],
            "headline": {"metric": metric, "dev": out["dev"][field], "test": out["test"][field]},
            "history": out["history"], "stages": out["stages"],
            "steps": sum(s["steps"] for s in out["stages"]), "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads(),
            "peak_memory_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                               else None),
            "peak_rss_mb_process": _peak_rss_mb(), "tokens": tokens, "data_sizes": sizes,
            "data_files": {rel: {"path": p, "sha256": h} for rel, (p, h) in self.files.items()
                           if rel in self.run_files(run)},
            "device": describe_device(self.device), "versions": versions(), "command": sys.argv,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(run.path(self.args.out), record)
        del body, end, aux
        gc.collect()
        return record


def _peak_rss_mb() -> float | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's high-water mark
    except (ImportError, OSError):
        return None


def execute_all(ws: Workspace, runs: list[Run]) -> dict[Run, dict]:
    """Run what is missing (resume), check that existing results were made with the same config, return all."""
    results, todo = {}, []
    for run in runs:
        rec = load_result(run.path(ws.args.out), run)
        if rec is not None and not ws.args.rerun:
            diff = config_diff(ws.config(run), rec["config"])
            if diff:
                raise ReproduceError(f"{run.path(ws.args.out)} was made with a different config ("
                                     + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
                                     + "). Use another --out, the same flags, or --rerun to replace it.")
            results[run] = rec
        else:
            todo.append(run)
    if ws.args.report_only:
        return results
    for run in todo:  # fail early on bad input: every model, data file and corpus is loaded before training
        ws.prepare(run)
    done = len(results)
    if done:
        print(f"{done} of {len(runs)} runs already complete in {ws.args.out}: skipped")
    bar = _bar(len(todo), ws.args.progress and len(todo) > 1, "runs")
    for i, run in enumerate(todo, 1):
        bar.set_description(str(run))
        rec = ws.execute(run)
        results[run] = rec
        h = rec["headline"]
        print(f"[{i}/{len(todo)}] {run}: dev {h['metric']} {h['dev']:.4f}, test {h['metric']} {h['test']:.4f}, "
              f"{rec['steps']} steps, {rec['wall_seconds']:.1f} s -> {run.path(ws.args.out)}", flush=True)
        bar.update(1)
    bar.close()
    return results


def _bar(total, enabled, desc, unit="it"):
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)

    class _Silent:
        update = set_description = set_postfix = close = lambda *a, **k: None
    return _Silent()


# ----------------------------------------------------------------------------------------------------------------------
# 6. Tables: mean and sample std (ddof=1) over seeds of the test headline metric x100, the paper's number beside it,
#    and the unpaired two-sided permutation test (App. A.2, tartan.permutation_test) against the baseline column.


def cell_scores(results: dict, run_list: list[Run]) -> list[float]:
    return [100 * results[r]["headline"]["test"] for r in run_list if r in results]


def fmt(mean_std) -> str:
    return f"{mean_std[0]:.2f} ± {mean_std[1]:.2f}"


def table_runs(number: int, tasks, modes, seeds, dapt) -> dict:
    table = TABLES[number]
    cols = [c for c in table.columns if not modes or c.mode in modes]
    return {(task, c.label): [make_run(task, c.mode, c.aux, s, dapt) for s in seeds]
            for task in table.tasks if not tasks or task in tasks for c in cols}


def render_table(number: int, cells: dict, results: dict, seeds, ws_args, dapt: str) -> str:
    """The paper's layout, as Markdown: one row per task, ours and [the paper's] per column, p-value columns."""
    table = TABLES[number]
    tasks = list(dict.fromkeys(t for t, _ in cells))
    cols = [c for c in table.columns if any((t, c.label) in cells for t in tasks)]
    last_base = max([i for i, c in enumerate(table.columns) if c.label in table.baseline], default=len(table.columns))
    tested = {c.label for c in table.columns[last_base + 1:]}  # p-values for the columns right of the baseline
    header = ["Domain", "Task"]
    for c in cols:
        header.append(c.label)
        if c.label in tested:
            header.append(f"p vs {table.baseline_name or table.baseline[0]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes, min_ps = [], set()
    for task in tasks:
        scores = {c.label: cell_scores(results, cells.get((task, c.label), [])) for c in cols}
        base = [b for b in table.baseline if len(scores.get(b, [])) >= 1]
        if len(base) > 1:  # Table 8: the p-values are against max(DAPT, DAPT+TAPT)
            best = max(base, key=lambda b: np.mean(scores[b]))
            notes.append(f"{TASKS[task]['title']}: baseline = {best} (the higher mean of {' and '.join(base)})")
            base = [best]
        row = [TASKS[task]["domain"], TASKS[task]["title"]]
        for c in cols:
            paper = PAPER.get((number, task, c.label))
            x = scores[c.label]
            ours = "not run" if not x else fmt(tartan.mean_std(x)) + (f" (n={len(x)})" if len(x) != len(seeds) else "")
            row.append(ours + (f" [{fmt(paper)}]" if paper else ""))
            if c.label in tested:
                pp = "" if not paper or paper[2] is None else f" [{paper[2]:.3f}]"
                if x and base:
                    test = tartan.permutation_test(x, scores[base[0]], N_PERMUTATIONS, seed=0)
                    min_ps.add((len(x), len(scores[base[0]]), test["min_p_two_sided"], test["exact"]))
                    row.append(f"{test['p_two_sided']:.3f}{pp}")
                else:
                    row.append("—" + pp)
        lines.append("| " + " | ".join(row) + " |")
    metric = "; ".join(sorted({f"{TASKS[t]['title']}: {TASKS[t]['metric']}" for t in tasks}))
    text = [f"### {table.title}", "",
            f"Test-set headline metric x100 ({metric}): mean ± standard deviation over seeds (sample std, ddof=1), "
            f"seeds {seeds_str(seeds)}; the paper's number in [brackets] (the paper used {table.seeds} seeds).", ""]
    text += lines + [""]
    if table.baseline:
        text.append(f"p: unpaired two-sided permutation test of the per-seed scores against the baseline column "
                    f"(App. A.2), exact over all splits when there are at most {N_PERMUTATIONS} of them, else "
                    f"{N_PERMUTATIONS} random permutations; the paper's p-value in [brackets].")
        for n_a, n_b, min_p, exact in sorted(min_ps):
            if min_p >= 0.05:
                text.append(f"**Warning:** with {n_a} and {n_b} seeds the smallest two-sided p-value this test can "
                            f"give is {min_p:.3f}: no difference can reach p < 0.05 (the paper used {table.seeds} "
                            f"seeds).")
    text += [f"- {n}" for n in notes]
    if table.note or (dapt != table.dapt and any(c.mode.startswith("dapt") or (c.aux or "").startswith("dapt")
                                                  for c in cols)):
        text.append(f"- DAPT corpus: {dapt}. {table.note}".rstrip())
    text.append(f"- Model: {ws_args.model if number != 5 else 'WideResNet-16-2'}; budget: {budget_str(ws_args)}.")
    return "\n".join(text) + "\n"


def seeds_str(seeds) -> str:
    s = list(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 1 else ",".join(map(str, s))


def budget_str(args) -> str:
    given = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in list(FLAGS) + ["max_length", "limit"]
             if getattr(args, k, None) is not None]
    if args.no_final_finetune:
        given.append("--no-final-finetune")
    if args.quick:
        given.insert(0, "--quick")
    if args.budget:
        b = BUDGETS[args.budget]
        given.insert(0, f"--budget {args.budget} (max length {b['max_length']}; end-task stages "
                        + ", ".join(f"{k} {v}" for k, v in b["train"].items()) + "; Eq. 2 stages "
                        + ", ".join(f"{k} {v}" for k, v in b["eq2"].items()) + "; Eq. 1 "
                        + ", ".join(f"{k} {v}" for k, v in b["pretrain"].items())
                        + ("; no final fine-tuning" if b["final"] is None else "") + ")")
    return "the paper's settings" if not given else "the paper's settings except " + " ".join(given)


def run_table(number: int, ws: Workspace, args) -> str:
    table = TABLES[number]
    seeds = args.seeds or list(range(table.seeds))
    dapt = args.dapt_corpus or table.dapt
    if args.aux_file:
        raise ReproduceError("--aux-file applies to single runs (--task/--mode), not to the paper's tables")
    if table.note:
        print(f"note: {table.note}")
    cells = table_runs(number, args.task, args.mode, seeds, dapt)
    if not cells:
        raise ReproduceError(f"Table {number} has no cell for --task {args.task} --mode {args.mode}")
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    text = render_table(number, cells, results, seeds, args, dapt)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"table{number}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print("\n" + text + f"\n(written to {path})")
    return text


# Figures, drawn from the stored histories ------------------------------------------------------------------------------


def figure_runs(number: int, tasks, seeds) -> dict:
    chosen = [t for t in FIGURES[number][1] if not tasks or t in tasks]
    if number == 2:
        return {(t, label, n): [make_run(t, mode, aux, s, n) for s in seeds] for t in chosen for n in ("1x", "10x")
                for label, mode, aux in (("DAPT", "dapt", None), ("META-TARTAN", "meta", "dapt"))}
    if number == 3:
        return {(t, label): [make_run(t, mode, "dapt", s, "10x") for s in seeds] for t in chosen
                for label, mode in (("separate head phi*", "meta"), ("same head phi'", "meta-samehead"))}
    return {(t, "META-TARTAN"): [make_run(t, "meta", "dapt+tapt", s, "10x") for s in seeds] for t in chosen}


def weight_curves(histories: list[list[dict]]) -> tuple[list[int], dict, dict]:
    """Task weights alpha per evaluation: (steps every seed reached, mean over seeds per task, per-seed (steps, values))."""
    n = min(len(h) for h in histories)
    steps = [e["step"] for e in histories[0][:n]]
    names = list(histories[0][0]["weights"])
    per_seed = {k: [([e["step"] for e in h], [e["weights"][k] for e in h]) for h in histories] for k in names}
    mean = {k: np.mean([v[:n] for _, v in per_seed[k]], axis=0).tolist() for k in names}
    return steps, mean, per_seed


def run_figure(number: int, ws: Workspace, args) -> str:
    title, _, n_seeds = FIGURES[number]
    seeds = args.seeds or list(range(n_seeds))
    cells = figure_runs(number, args.task, seeds)
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReproduceError("figures need matplotlib: pip install matplotlib") from None
    tasks = list(dict.fromkeys(k[0] for k in cells))
    panels = list(dict.fromkeys(k[:2] for k in cells)) if number == 3 else [(t,) for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if number == 2:
            for label in ("DAPT", "META-TARTAN"):
                pts = [(n, cell_scores(results, cells[(panel[0], label, n)])) for n in ("1x", "10x")]
                pts = [(float(n[:-1]), tartan.mean_std(x)) for n, x in pts if x]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                                marker="o", capsize=3, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("auxiliary data n (x |Train|)")
            ax.set_ylabel(f"test {TASKS[panel[0]]['metric']} x100")
        else:
            histories = [results[r]["history"] for r in cells[panel if number == 3 else (panel[0], "META-TARTAN")]
                         if r in results and results[r]["history"]]
            if histories:
                steps, mean, per_seed = weight_curves(histories)
                for k, color in zip(mean, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
                    for x, y in per_seed[k]:
                        ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                    ax.plot(steps, mean[k], color=color, lw=2, label=k)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("task weight alpha")
        ax.set_title(" / ".join([TASKS[panel[0]]["title"]] + list(panel[1:])))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"figure{number}.png")
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    print(f"{title}: seeds {seeds_str(seeds)}, from {len(results)} result files -> {path}")
    return path






# ----------------------------------------------------------------------------------------------------------------------
# 7. Speed benchmark (--bench): training steps against their floors, in one process (issue 5).
#
# What is timed, on identical synthetic batches (random token ids, no padding) and a config-built model with random
# weights (speed needs no pretrained weights):
#   floors      one forward+backward of body + head on one batch, nothing else:
#                 floor_end  end-task head on an end-task batch        floor_aux  MLM head on an auxiliary batch
#                 floor_val  end-task head on a validation batch of the meta batch size
#               and, apart, `optimizer`: gradient clipping + the two AdamW steps of tartan.train for body and all heads
#   steps       one full optimizer step of tartan.train itself (its step function, gradient clipping, both AdamW
#               steps, zero_grad, the schedulers): finetune (Eq. 2), pretrain (Eq. 1, MLM only), mt (Eq. 3),
#               meta (Alg. 1) and meta_same_head (Eq. 6), timed from one call of the step function inside
#               tartan.train to the next, so the real loop is what is measured.
# Ratios are paired: just before each step, inside the same loop, the floors that step is compared with run once each
# (timed apart, and taken out of the step's time), so every step has its own floors from a second earlier; a ratio
# is the median over steps of step / (its floors). For META: meta / (mt_over_floor x (its end + aux floors) + its val
# floor). Measured on a 2-core VM, timing the items one after the other instead gave mt_over_floor from 1.01 to 1.08
# across six processes (load and memory state drift between items); paired, 1.035-1.050 across four.
# Every configuration uses grad_accum = 1, so that a step holds exactly one micro-batch per task and compares like
# with like against the floors. Batches are prebuilt (the MLM batch masked once): tokenisation, collation and masking
# are not in any figure. An untimed pass of every item comes first; then rounds x steps, every item in each round;
# the per-round spread of the ratios is reported. Peak memory is measured after the timing, in one short pass per item
# from a reset (see _PeakMemory).
# Targets: mt <= 1.05 x (floor_end + n_aux x floor_aux); meta <= 1.10 x (mt + floor_val).
# On CPU the command line first makes glibc keep freed memory for reuse (tune_malloc; --default-malloc: not), which
# removes the page faults that otherwise dominate the step overheads; the report records which allocator setting ran.


BENCH_SHAPES = {  # RoBERTa-style encoders built from a config, random weights
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=50265),
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=50265),
}
# defaults per model: (end-task batch, auxiliary batch, meta batch, sequence length); roberta-base = the paper's values
BENCH_SIZES = {"tiny": (4, 4, 2, 16), "small": (16, 16, 8, 128), "roberta-base": (64, 64, 32, 512)}
# dense peak TFLOP/s (bf16 tensor core, fp32 without TF32) by device-name substring, first match wins
PEAK_TFLOPS = [("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H100", 989, 67), ("H200", 989, 67),
               ("A100", 312, 19.5), ("L40S", 362, 91.6), ("A10G", 70, 31.2), ("L4", 121, 30.3)]
FLOPS_FORMULA = ("model FLOPs per step = sum over the body passes of tokens x (6 x N + 12 x L x H x T); "
                 "N = body parameters without the embeddings, L layers, H hidden size, T sequence length "
                 "(6N: forward+backward matmuls; 12LHT: attention scores and values); heads are not counted")


class _FixedData:
    """Stands in for TextData: every batch drawn from it is the same prebuilt batch (one batch per epoch)."""

    def __init__(self, inputs: dict, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        return dict(self.inputs), self.labels


def _synthetic_batch(batch_size, length, vocab_size, gen):
    """Random ids between <s> (0) and </s> (2), no padding; ids 0-3 are the special tokens, vocab_size-1 the mask."""
    ids = torch.randint(4, vocab_size - 1, (batch_size, length), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory over a region: CUDA max_memory_allocated; on Linux CPU the process's peak RSS (VmHWM) after
    resetting it through /proc/self/clear_refs (the whole process, model and optimizer state included); else None.
    On CPU the reset first hands freed heap memory back to the OS (malloc_trim), so that the peak is the region's own
    even when tune_malloc has told glibc to keep freed memory; the refill page-faults, so the bench measures memory in
    a pass of its own after the timing rounds."""

    def __init__(self, device):
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

    def read_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            return int(hwm.split()[1]) / 1024
        except (OSError, StopIteration):
            return None


def _peak_tflops(device, bf16, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak_bf16, peak_fp32 in PEAK_TFLOPS:
        if key in name:
            return peak_bf16 if bf16 else peak_fp32
    return None


def bench(model=None, device=None, batch_size=None, aux_batch_size=None, meta_batch_size=None, max_length=None,
              n_aux=1, steps=None, warmup=None, rounds=None, out_dir="results", quick=False, bf16=True,
              peak_tflops=None, threads=None, num_labels=6, seed=0, malloc=None, progress=False, log=print) -> dict:
    """Times the floors and the training steps (see the comment above) and writes bench[_quick].json to out_dir.
    model: "small" | "roberta-base" (default: roberta-base on CUDA, small on CPU; --quick: a tiny model).
    threads: torch CPU threads for the run (default: torch's; --quick: 1, as a tiny model gains nothing from more).
    malloc: what tune_malloc did to this process, recorded in the report (None: not known)."""
    threads = threads or (1 if quick else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(model, device, batch_size, aux_batch_size, meta_batch_size, max_length, n_aux, steps,
                          warmup, rounds, out_dir, quick, bf16, peak_tflops, num_labels, seed, malloc, progress, log)
    finally:
        torch.set_num_threads(saved_threads)


def _run_bench(model, device, batch_size, aux_batch_size, meta_batch_size, max_length, n_aux, steps, warmup, rounds,
               out_dir, quick, bf16, peak_tflops, num_labels, seed, malloc, progress, log):
    from transformers import AutoModelForMaskedLM, RobertaConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else \
        torch.device(device)
    model = "tiny" if quick else (model or ("roberta-base" if device.type == "cuda" else "small"))
    B, A, M, T = [given or default for given, default in
                  zip((batch_size, aux_batch_size, meta_batch_size, max_length), BENCH_SIZES[model])]
    steps, warmup, rounds = steps or (2 if quick else 5), warmup or (1 if quick else 2), rounds or (1 if quick else 3)
    bf16 = bf16 and device.type == "cuda"
    if M > B:
        raise ReproduceError(f"--meta-batch-size {M} exceeds the end-task batch {B} (phi* is fitted on end-task "
                             f"batch rows)")

    torch.manual_seed(seed)
    shape = BENCH_SHAPES[model]
    config = RobertaConfig(max_position_embeddings=T + 2, type_vocab_size=1, **shape)  # RoBERTa positions start at 2
    body, mlm_head = tartan.split_masked_lm(AutoModelForMaskedLM.from_config(config).to(device))
    V, H, L = shape["vocab_size"], shape["hidden_size"], shape["num_hidden_layers"]

    gen = torch.Generator().manual_seed(seed)
    masking = tartan.Masking(mask_id=V - 1, vocab_size=V, special_ids=(0, 1, 2, 3))
    aux_inputs = _synthetic_batch(A, T, V, gen)
    aux_inputs["input_ids"], aux_labels = tartan.mask_tokens(aux_inputs["input_ids"], aux_inputs["attention_mask"],
                                                             masking, gen)
    end = tartan.Task("end", tartan.ClassificationHead(H, num_labels).to(device),
                      train=_FixedData(_synthetic_batch(B, T, V, gen), torch.randint(num_labels, (B,), generator=gen)),
                      dev=_FixedData(_synthetic_batch(M, T, V, gen), torch.randint(num_labels, (M,), generator=gen)),
                      num_labels=num_labels)
    aux = [tartan.Task(f"aux{i}", tartan.new_mlm_head(mlm_head, body), train=_FixedData(aux_inputs, aux_labels))
           for i in range(n_aux)]
    heads = [end.head] + [t.head for t in aux]

    autocast = tartan.autocast(device, bf16)  # as tartan.train builds it
    peak = _PeakMemory(device)
    common = dict(batch_size=B, aux_batch_size=A, grad_accum=1, eval_every=-1, bf16=bf16, seed=seed,
                  final_finetune=None)
    cfg_train, cfg_meta = tartan.TrainConfig(**common), tartan.MetaConfig(meta_batch_size=M, **common)

    def one_pass(head, data):
        """One forward+backward of body + head on one batch, the way tartan._forward runs it; returns seconds."""
        _sync(device)
        t0 = time.perf_counter()
        inputs, labels = tartan.to_device(*data.batch(None), device)
        with autocast:
            _, loss = head(body(**inputs), labels)
        loss.backward()
        _sync(device)
        seconds = time.perf_counter() - t0
        for m in (body, head):
            m.zero_grad(set_to_none=True)
        return seconds

    floors = {"floor_end": (end.head, end.train), "floor_aux": (aux[0].head, aux[0].train),
              "floor_val": (end.head, end.dev)}

    def optimizer_step(n_warm, n_time):
        """Gradient clipping and the two AdamW steps of tartan.train for body + all heads, with every gradient set."""
        params = list(body.parameters())
        head_params = [p for h in heads for p in tartan.head_parameters(h, body)]
        opts = [tartan.make_optimizer(params, cfg_train.lr, cfg_train.weight_decay, cfg_train),
                tartan.make_optimizer(head_params, cfg_train.head_lr, cfg_train.head_weight_decay, cfg_train)]
        times = []
        for i in range(n_warm + n_time):
            for p in params + head_params:
                p.grad = torch.zeros_like(p)
            _sync(device)
            t0 = time.perf_counter()
            tartan.clip_grad_norm(params + head_params, cfg_train.grad_clip)
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return {"step": times[n_warm:]}

    def step(end_task, aux_tasks, cfg, step_fn, paired, n_warm, n_time):
        """Runs tartan.train for n_warm + n_time + 1 steps. A step is the time between the starts of two consecutive
        calls of its step function, less the floors run there: before each step, each floor in `paired` runs (count
        times, timed apart), so that every step has its own floors from a second earlier. Returns {"step": durations,
        floor name: summed durations} over the timed steps."""
        marks, inline = [], {name: [] for name in paired}

        def timed(*args):
            for name, count in paired.items():  # count: passes per step (n_aux for the auxiliary floor)
                inline[name].append(sum(one_pass(*floors[name]) for _ in range(count)))
            _sync(device)
            marks.append(time.perf_counter())
            return step_fn(*args)
        tartan.train(body, end_task, aux_tasks, dataclasses.replace(cfg, max_steps=n_warm + n_time + 1), timed)
        after = [sum(inline[name][i] for name in paired) for i in range(len(marks))]  # floors before step i's mark
        steps_ = [marks[i + 1] - marks[i] - after[i + 1] for i in range(len(marks) - 1)]
        return {"step": steps_[n_warm:], **{name: inline[name][n_warm:n_warm + n_time] for name in paired}}

    meta_same = dataclasses.replace(cfg_meta, same_head=True)
    both = {"floor_end": 1, "floor_aux": n_aux}
    items = {  # name: (run, training tokens per step, body tokens per step)
        "optimizer": (optimizer_step, 0, 0),
        "finetune": (lambda *n: step(end, [], cfg_train, tartan.multitask_step, {"floor_end": 1}, *n), B * T, B * T),
        "pretrain": (lambda *n: step(None, aux, dataclasses.replace(cfg_train, weights=(1.0,) * n_aux),
                                     tartan.multitask_step, {"floor_aux": n_aux}, *n), n_aux * A * T, n_aux * A * T),
        "mt": (lambda *n: step(end, aux, cfg_train, tartan.multitask_step, both, *n), (B + n_aux * A) * T,
               (B + n_aux * A) * T),
        "meta": (lambda *n: step(end, aux, cfg_meta, tartan.meta_step, {**both, "floor_val": 1}, *n),
                 (B + n_aux * A) * T, (B + n_aux * A + M) * T),
        "meta_same_head": (lambda *n: step(end, aux, meta_same, tartan.meta_step, {**both, "floor_val": 1}, *n),
                           (B + n_aux * A) * T, (B + n_aux * A + M) * T),
    }
    log(f"bench: {model} on {device} ({_device_name(device)}), batches end {B} / aux {n_aux} x {A} / meta {M}, "
        f"length {T}, bf16 {bf16}, grad_accum 1; {rounds} rounds x {steps} steps after {warmup} warm-up; "
        f"malloc: {malloc or 'not set here'}")
    samples = {name: [] for name in items}  # per item: one dict per round {"step": [...], floor: [...]}
    t_start = time.perf_counter()
    for run, _, _ in items.values():  # untimed: caches, lazy init and the heap reach their working state
        run(1, 1)
    bar = _bar(rounds * len(items), progress, "bench")
    for r in range(rounds):  # timing: nothing resets memory in between (on CPU a reset hands the heap back to the
        for name, (run, _, _) in items.items():  # OS, and the page faults of its refill would be timed)
            samples[name].append(run(warmup, steps))
            bar.update(1)
        log(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s)")
    bar.close()
    peaks = {}
    for name, (run, _, _) in items.items():  # peak memory: one short untimed pass per item, each from a reset
        peak.reset()
        run(1, 1)
        peaks[name] = peak.read_mb()
    for name, (head_, data_) in floors.items():
        peak.reset()
        one_pass(head_, data_)
        peaks[name] = peak.read_mb()

    n_flop = sum(p.numel() for n, p in body.named_parameters() if "embeddings" not in n)
    peak_tf = _peak_tflops(device, bf16, peak_tflops)
    flat = {name: sum((s["step"] for s in samples[name]), []) for name in items}
    for f in floors:  # every inline sample of a floor (per pass), from whichever loop ran it
        flat[f] = [x / (n_aux if f == "floor_aux" else 1) for name in items for s in samples[name] if f in s
                   for x in s[f]]
    tokens = {"floor_end": (B * T, B * T), "floor_aux": (A * T, A * T), "floor_val": (M * T, M * T),
              **{name: (tt, bt) for name, (_, tt, bt) in items.items()}}
    res = {}
    for name in list(floors) + list(items):
        train_tokens, body_tokens = tokens[name]
        sec = float(np.median(flat[name]))
        flops = body_tokens * (6 * n_flop + 12 * L * H * T)
        res[name] = {"seconds": sec, "samples": len(flat[name]),
                     "tokens_per_step": train_tokens, "tokens_per_s": train_tokens / sec if train_tokens else None,
                     "peak_memory_mb": peaks[name],
                     "tflops": flops / sec / 1e12, "mfu": flops / sec / 1e12 / peak_tf if peak_tf and flops else None}

    def ratios(round_=None):
        """Medians of per-step ratios over all rounds (or one): each step against the floors run just before it."""
        rounds_of = lambda name: samples[name] if round_ is None else [samples[name][round_]]  # noqa: E731

        def per_step(name, denominator):  # denominator: {floor name: seconds before this step} -> seconds
            return float(np.median([s["step"][i] / denominator({f: v[i] for f, v in s.items() if f != "step"})
                                    for s in rounds_of(name) for i in range(len(s["step"]))]))
        total = lambda floors_: sum(floors_.values())  # noqa: E731
        mt = per_step("mt", total)
        # a META step against an MT step estimated from its own floors: mt x (end + aux floors) + val floor
        mt_plus_val = lambda fl: mt * (fl["floor_end"] + fl["floor_aux"]) + fl["floor_val"]  # noqa: E731
        step_median = lambda name: float(np.median(sum((s["step"] for s in rounds_of(name)), [])))  # noqa: E731
        return {"mt_over_floor": mt,
                "meta_over_mt_plus_val": per_step("meta", mt_plus_val),
                "meta_over_mt": step_median("meta") / step_median("mt"),
                "meta_same_head_over_mt_plus_val": per_step("meta_same_head", mt_plus_val),
                "mt_over_floor_plus_optimizer": res["mt"]["seconds"] / (
                    res["floor_end"]["seconds"] + n_aux * res["floor_aux"]["seconds"] + res["optimizer"]["seconds"]),
                "finetune_over_floor": per_step("finetune", total),
                "pretrain_over_floor": per_step("pretrain", total)}
    main = ratios()
    per_round = [ratios(r) for r in range(rounds)]
    mem_meta_over_mt = (res["meta"]["peak_memory_mb"] / res["mt"]["peak_memory_mb"]
                        if res["mt"]["peak_memory_mb"] else None)
    report = {
        **main,
        "targets": {"mt_over_floor": 1.05, "meta_over_mt_plus_val": 1.10},
        "targets_hold": {"mt_over_floor": main["mt_over_floor"] <= 1.05,
                         "meta_over_mt_plus_val": main["meta_over_mt_plus_val"] <= 1.10},
        "ratios_per_round": per_round,
        "ratio_spread": {k: [min(r[k] for r in per_round), max(r[k] for r in per_round)] for k in main},
        "peak_memory_meta_over_mt": mem_meta_over_mt,
        "items": res,
        "config": {"model": model, **shape, "max_length": T, "batch_size": B, "aux_batch_size": A,
                   "meta_batch_size": M, "n_aux": n_aux, "grad_accum": 1, "meta_head_steps": cfg_meta.meta_head_steps,
                   "steps": steps, "warmup": warmup, "rounds": rounds, "bf16": bf16, "seed": seed,
                   "body_parameters": sum(p.numel() for p in body.parameters()), "body_parameters_no_emb": n_flop},
        "machine": {"device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "peak_tflops": peak_tf, "malloc": malloc},
        "notes": {"grad_accum": "1 in every configuration: a step holds one micro-batch per task, as the floors",
                  "seconds": "median over rounds x steps; a step = one iteration of tartan.train's loop; floors: "
                             "every pass run beside the steps",
                  "ratios": "paired: per step, step / (the floors run just before it in the same loop); median over "
                            "steps. META: meta / (mt_over_floor x (end + aux floors) + val floor)",
                  "tokens_per_s": "training tokens (end-task + auxiliary batches) per second; META's validation "
                                  "tokens are counted in its FLOPs, not in its tokens",
                  "peak_memory_mb": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                                     "peak RSS of the whole process (VmHWM reset via /proc/self/clear_refs)"),
                  "flops": FLOPS_FORMULA,
                  "excluded": "tokenisation, collation, masking and evaluation (batches are prebuilt)"},
        "seconds_total": time.perf_counter() - t_start,
    }
    _print_bench(report, log)
    path = os.path.join(out_dir, "bench_quick.json" if quick else "bench.json")
    atomic_write_json(path, report)
    report["path"] = path
    log(f"wrote {path}")
    return report


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def _print_bench(report, log):
    mem_name = "peak MB" if report["machine"]["device"].startswith("cuda") else "peak RSS MB"
    log(f"{'':16s} {'s/step':>9s} {'tokens/s':>10s} {mem_name:>12s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name, r in report["items"].items():
        mem = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        log(f"{name:16s} {r['seconds']:9.4f} {tps:>10s} {mem:>12s} {r['tflops']:8.3f} {mfu:>6s}")
    for key, target in [("mt_over_floor", 1.05), ("meta_over_mt_plus_val", 1.10), ("meta_over_mt", None),
                        ("meta_same_head_over_mt_plus_val", None), ("mt_over_floor_plus_optimizer", None),
                        ("finetune_over_floor", None),
                        ("pretrain_over_floor", None)]:
        lo, hi = report["ratio_spread"][key]
        verdict = "" if target is None else f"  target <= {target:.2f}: {'holds' if report[key] <= target else 'MISSED'}"
        log(f"{key:32s} {report[key]:.3f}  (rounds {lo:.3f}-{hi:.3f}){verdict}")
    if report["peak_memory_meta_over_mt"] is not None:
        log(f"{'peak_memory_meta_over_mt':32s} {report['peak_memory_meta_over_mt']:.3f}")
    log(f"MFU: {FLOPS_FORMULA}; device peak {report['machine']['peak_tflops'] or 'unknown'} TFLOP/s")


def tune_malloc(enabled: bool = True) -> str:
    """Makes glibc's free() keep memory for reuse instead of handing it back to the OS; returns what was done.

    PyTorch on CPU takes its large tensors (activations, gradients, the MLM logits) straight from malloc. glibc serves
    allocations above its mmap threshold (adaptive, at most 32 MB) with fresh pages and unmaps them on free, so every
    training step page-faults hundreds of MB back in, and a step that holds more at once (MT, META) pays more of it
    than the single passes it is compared with. Measured with `--bench` on the 2-core VM of the README: see there.
    Same as running under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647; the cost is that the process keeps its
    peak memory until it exits. Linux/glibc only; elsewhere, or with enabled=False, nothing changes. Process-wide,
    so it lives here in the command-line runner and never in tartan.py."""
    if not enabled:
        return "glibc default"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
            return "glibc default (mallopt refused)"
    except (OSError, AttributeError):
        return "system default (not glibc)"
    return "kept for reuse (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def _add_option(parser, *flags, **kwargs):
    """Adds a flag unless the caller's parser already has it (--quick, --out, --device are shared with reproduce.py)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_bench_args(parser: argparse.ArgumentParser):
    _add_option(parser, "--bench", action="store_true", help="time training steps against their floors (issue 5)")
    _add_option(parser, "--quick", action="store_true", help="a tiny, fast run")
    _add_option(parser, "--out", default="results", help="results folder")
    _add_option(parser, "--device", default="auto", choices=("auto", "cpu", "cuda"))
    # batch sizes and length: reproduce.py's own flags where it has them (default None = the bench's defaults)
    _add_option(parser, "--batch-size", type=int, help="end-task micro-batch (bench: GPU 64, CPU 16)")
    _add_option(parser, "--aux-batch-size", type=int, help="auxiliary MLM micro-batch (bench: GPU 64, CPU 16)")
    _add_option(parser, "--meta-batch-size", type=int, help="meta / validation batch (bench: GPU 32, CPU 8)")
    _add_option(parser, "--max-length", type=int, help="sequence length (bench: GPU 512, CPU 128)")
    g = parser.add_argument_group("benchmark (--bench)")
    g.add_argument("--bench-model", choices=["small", "roberta-base"], default=None,
                   help="default: roberta-base on CUDA, small on CPU")
    g.add_argument("--bench-n-aux", type=int, default=1, help="number of auxiliary MLM tasks")
    g.add_argument("--bench-steps", type=int, default=None, help="timed steps per item and round")
    g.add_argument("--bench-warmup", type=int, default=None, help="untimed steps per item and round")
    g.add_argument("--bench-rounds", type=int, default=None, help="rounds, each timing every item")
    g.add_argument("--bench-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--bench-peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    _add_option(parser, "--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    _add_option(parser, "--default-malloc", action="store_true",
                help="leave glibc's malloc as it is (default: freed memory is kept for reuse, see tune_malloc)")


def run_bench(args) -> int:
    """`--bench`: runs the benchmark from parsed flags (add_bench_args); returns the exit status 0."""
    bench(model=args.bench_model, device=args.device, batch_size=args.batch_size,
              aux_batch_size=args.aux_batch_size, meta_batch_size=args.meta_batch_size, max_length=args.max_length,
              n_aux=args.bench_n_aux, steps=args.bench_steps, warmup=args.bench_warmup, rounds=args.bench_rounds,
              out_dir=args.out, quick=args.quick, bf16=getattr(args, "bf16", True),
              peak_tflops=args.bench_peak_tflops, threads=args.bench_threads, malloc=getattr(args, "malloc", None),
              progress=getattr(args, "progress", False))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# 8. Offline demo (--task demo, issue 4).
# Offline demo of TARTAN's two claims (issue 4): `python reproduce.py --task demo [--seeds ...] [--out DIR] [--quick]`.
#
# Everything is made here, in code: no download, no GPU, a few minutes on a laptop CPU. Entry point: run_demo().
#
# The synthetic world (demo_data)
# -------------------------------
# * Concepts: 4 concepts, each named by 6 interchangeable words ("c2w4" = synonym 4 of concept 2).
# * End-task (low-resource, 48 labelled examples): a sentence of neutral filler words plus one concept word; the label
#   is its concept. The labelled TRAIN set only uses synonyms 0 and 1 ("seen") of each concept; DEV and TEST use all
#   six. The labels alone cannot tell what an unseen synonym means, so fine-tuning alone is at chance on test sentences
#   with unseen synonyms (half of test; the table reports them separately).
# * Helpful corpus (unlabelled text, the TAPT/DAPT analogue): every synonym of a concept, seen and unseen alike, next to
#   cue words of its own concept ("k2q1" = cue 1 of concept 2). MLM can only predict a masked cue or word by learning
#   which words share contexts, so this text carries exactly what the labels lack. The end-task never shows a cue, so
#   the corpus can matter only through what it teaches about the concept words.
# * Harmful corpus: the same words and cues, grouped ACROSS concepts: cue set g is shared by seen synonym 0 of concept
#   g and seen synonym 1 of concept g-1, and the unseen synonyms of concept k share the cues of seen synonyms of k+1 and
#   k+2. MLM on it teaches that differently-labelled words mean the same and that unseen synonyms mean what other
#   concepts' words mean.
# Claim 1 is testable: auxiliary text can lift the unseen-synonym sentences, and methods differ in how well they use
# it when helpful and harmful text come together. Claim 2 is testable: META-TARTAN's weights start equal and only the
# meta-gradient can separate the two corpora (the harmful one is as large and looks alike token by token).
#
# Methods (rows of the table; per seed, all start from the same random initialisation)
# * fine-tune only  : Eq. 2 on the end-task alone (the "RoBERTa" column; here the body has no prior knowledge).
# * pretrain->finetune: Eq. 1 then Eq. 2, MLM on all the auxiliary text as one corpus (end-task agnostic pre-training
#                     has no way to tell the helpful text from the harmful), then fine-tuning. The baseline.
# * MT-TARTAN       : Eq. 3, end-task + helpful MLM + harmful MLM with static uniform weights (1/3 each).
# * META-TARTAN     : Algorithm 1, the same three tasks with meta-learned weights (Eq. 7, separate meta head phi*).


# ----------------------------------------------------------------------------------------------------------------------
# Settings. Chosen by trying a few on this very task, so that 3 seeds x 4 methods run in well under 3 minutes on 2 CPU
# cores and the task is informative: fine-tuning alone sits at chance on unseen synonyms, while pre-training on the
# helpful corpus alone lifts them to 100% and on the harmful corpus alone sinks them to 0% (checked by hand; the demo
# itself runs only the four methods above).
# * A tiny random-init BERT needs far larger learning rates than the paper's 1e-4 for a pretrained RoBERTa: 2e-3 here
#   (1e-3 leaves MLM on its unigram plateau for most of the budget; 3e-3 and above stalled).
# * One transformer layer: as good as two on this task, at about half the time per step.
# * Auxiliary sentences are a concept word and two cues, no fillers: every masked token is informative, so MLM learns
#   the word groups within a few hundred steps, and the only difference between the two corpora's MLM gradients is
#   the grouping, which is what the meta-gradient has to see.
# * No dropout: full-batch training on 48 examples needs no extra noise, and the tiny model learns faster without.
# * The end-task batch is the whole training set (48) and the META meta-batch the whole dev set (96): phi* is fitted
#   on all training examples and g_meta carries no sampling noise, which matters with cosines of a few hundredths.
# * META-TARTAN: eta = 0.1 (top of the paper's grid {1e-1, 5e-2, 3e-2, 1e-2}, so that weights move within 300 steps;
#   0.3 railed the weights to 0/1 within a few evaluations); phi* is trained 10 AdamW steps (paper) at lr 1e-2 (the
#   paper's 1e-3 barely moves a fresh head on 64-dim features in 10 steps, leaving g_meta close to random).
# * Early stopping is off (patience above the number of evaluations): every run has the same, predictable cost; model
#   selection still restores the best-dev checkpoint. The optional final fine-tuning stage of MT/META is off: the
#   comparison is of Eq. 3 / Algorithm 1 themselves.


@dataclasses.dataclass
class DemoSettings:
    # the synthetic world
    n_concepts: int = 4            # = end-task classes
    n_synonyms: int = 6            # words per concept
    n_seen: int = 2                # synonyms per concept that the labelled train set uses
    n_cues: int = 4                # context words per concept in the auxiliary text
    cues_per_sentence: int = 2     # cue words next to the concept word in an auxiliary sentence
    n_fillers: int = 16            # neutral words of the end-task sentences
    n_train: int = 48              # labelled end-task examples (low-resource)
    n_dev: int = 96
    n_test: int = 480              # half with seen synonyms, half with unseen ones
    n_aux: int = 1000              # sentences per auxiliary corpus
    task_length: tuple = (5, 8)    # tokens per end-task sentence (min, max)
    aux_length: tuple = (3, 3)     # tokens per auxiliary sentence (min, max): concept word + cues (+ fillers)
    mask_prob: float = 0.15        # MLM: fraction of tokens chosen for prediction (BERT's 15%, then 80/10/10)
    data_seed: int = 1234          # the data is fixed; seeds vary initialisation, data order and masking
    # the body: a small BERT from a config
    hidden: int = 64
    layers: int = 1
    heads: int = 2
    ffn: int = 128
    dropout: float = 0.0
    init_range: float = 0.02       # std of the initial weights (BERT's)
    # optimisation (shared by all methods)
    lr: float = 2e-3               # body (AdamW; 6% warm-up then linear decay, as tartan.py)
    head_lr: float = 2e-3
    batch_size: int = 48           # end-task batch: the whole training set
    aux_batch_size: int = 64       # per auxiliary corpus and step (the pre-training baseline gets 2x: same text seen)
    steps: int = 300               # optimizer steps of MT/META, and of the pre-training stage
    finetune_steps: int = 120      # end-task-only steps (fine-tune only, and after pre-training)
    eval_every: int = 15           # end-task dev evaluation interval (model selection, weight trajectory points)
    patience: int = 1000           # i.e. no early stopping
    meta_lr: float = 0.1           # eta
    meta_batch_size: int = 96      # |B*_val| (the whole dev set); phi* is fitted on the whole end-task batch
    meta_head_lr: float = 1e-2
    meta_head_steps: int = 10
    threads: int = 1               # torch CPU threads: the model is too small to gain from more, and extra threads
    #                                spin-wait badly when the cores are shared (2 threads ran several times slower)


def quick_settings() -> DemoSettings:
    """The reduced demo (--quick, the tests): the same world and model, half the training steps."""
    return dataclasses.replace(DemoSettings(), steps=150, finetune_steps=60)


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic data.

DEMO_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def demo_words(s: DemoSettings) -> dict:
    """The demo vocabulary: concept words [concept][synonym], cues [concept][i], fillers."""
    return {"concept": [[f"c{k}w{j}" for j in range(s.n_synonyms)] for k in range(s.n_concepts)],
            "cue": [[f"k{k}q{i}" for i in range(s.n_cues)] for k in range(s.n_concepts)],
            "filler": [f"f{i}" for i in range(s.n_fillers)]}


def _demo_sentence(rng: random.Random, words: dict, content: list[str], length: int) -> str:
    """`content` words at random places among neutral fillers, `length` tokens in all."""
    tokens = [rng.choice(words["filler"]) for _ in range(length - len(content))]
    for w in content:
        tokens.insert(rng.randrange(len(tokens) + 1), w)
    return " ".join(tokens)


def demo_end_task_split(rng, words, s: DemoSettings, n: int, synonyms: range) -> tuple[list[str], list[int]]:
    """n labelled sentences, classes balanced, each with one concept word drawn from `synonyms`."""
    texts, labels = [], []
    for i in range(n):
        k = i % s.n_concepts
        texts.append(_demo_sentence(rng, words, [words["concept"][k][rng.choice(synonyms)]],
                                    rng.randint(*s.task_length)))
        labels.append(k)
    return texts, labels


def demo_helpful_tie(k: int, j: int, s: DemoSettings) -> int:
    """Whose cues synonym j of concept k appears with in the helpful corpus: its own concept's."""
    return k


def demo_harmful_tie(k: int, j: int, s: DemoSettings) -> int:
    """Whose cues synonym j of concept k appears with in the harmful corpus. Seen synonym 0 of k -> cues of k, seen
    synonym 1 of k -> cues of k+1 (so cue set g groups two differently-labelled seen words); unseen synonyms of k ->
    cues of k+2 (grouped with seen words of k+1 and k+2, never of k)."""
    return (k + j) % s.n_concepts if j < s.n_seen else (k + 2) % s.n_concepts


def demo_corpus(rng, words, s: DemoSettings, n: int, tie) -> list[str]:
    """n unlabelled sentences: a concept word (any synonym, uniformly) with cues of concept tie(k, j)."""
    out = []
    for _ in range(n):
        k, j = rng.randrange(s.n_concepts), rng.randrange(s.n_synonyms)
        cues = rng.sample(words["cue"][tie(k, j, s)], s.cues_per_sentence)
        out.append(_demo_sentence(rng, words, [words["concept"][k][j]] + cues, rng.randint(*s.aux_length)))
    return out


def demo_data(s: DemoSettings) -> dict:
    """All texts and labels of the demo, from s.data_seed. Test = seen-synonym half + unseen-synonym half."""
    if not 0 < s.n_seen < s.n_synonyms or s.n_concepts < 3:
        raise ValueError("the demo needs 0 < n_seen < n_synonyms and at least 3 concepts")
    rng = random.Random(s.data_seed)
    words = demo_words(s)
    seen, unseen, every = range(s.n_seen), range(s.n_seen, s.n_synonyms), range(s.n_synonyms)
    data = {"words": words,
            "train": demo_end_task_split(rng, words, s, s.n_train, seen),
            "dev": demo_end_task_split(rng, words, s, s.n_dev, every),
            "test_seen": demo_end_task_split(rng, words, s, s.n_test // 2, seen),
            "test_unseen": demo_end_task_split(rng, words, s, s.n_test // 2, unseen),
            "helpful": demo_corpus(rng, words, s, s.n_aux, demo_helpful_tie),
            "harmful": demo_corpus(rng, words, s, s.n_aux, demo_harmful_tie)}
    data["test"] = tuple(a + b for a, b in zip(data["test_seen"], data["test_unseen"]))
    data["mixed"] = data["helpful"] + data["harmful"]  # the end-task agnostic baseline's single corpus
    return data


def demo_tokenizer(words: dict):
    """A word-level BERT tokenizer over the demo vocabulary (offline: the vocabulary is given as a dict)."""
    from transformers import BertTokenizer

    vocab = DEMO_SPECIAL + [w for group in words["concept"] + words["cue"] for w in group] + words["filler"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def demo_prepare(s: DemoSettings) -> dict:
    """Texts -> tokenizer -> token ids, once for all runs (TextData is only read by the training loops)."""
    data = demo_data(s)
    tok = demo_tokenizer(data["words"])
    max_len = max(s.task_length[1], s.aux_length[1]) + 2  # + [CLS], [SEP]

    def text_data(texts, labels=None):
        return tartan.TextData(tartan.tokenize(tok, texts, max_len), labels, tok.pad_token_id)

    ids = {split: text_data(*data[split]) for split in ("train", "dev", "test", "test_seen", "test_unseen")}
    ids.update({name: text_data(data[name]) for name in ("helpful", "harmful", "mixed")})
    return {"data": data, "tokenizer": tok, "ids": ids, "max_length": max_len}


# ----------------------------------------------------------------------------------------------------------------------
# Builder: data and tokenizer once (demo_prepare), then a fresh body and fresh tasks for every (seed, method).


def build_demo(seed: int, s: DemoSettings | None = None, prepared: dict | None = None) -> dict:
    """Everything one run needs: the tokenizer, a small random-init BERT body (initialised from `seed`), the end-task
    with a new head phi', and the auxiliary MLM tasks with their own heads phi^i: helpful, harmful, and the two as
    one corpus ("mixed", for the pre-training baseline). `prepared` (demo_prepare) avoids re-tokenising."""
    from transformers import AutoModelForMaskedLM, BertConfig

    s = s or DemoSettings()
    prepared = prepared or demo_prepare(s)
    tok, ids = prepared["tokenizer"], prepared["ids"]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=s.hidden, num_hidden_layers=s.layers,
                     num_attention_heads=s.heads, intermediate_size=s.ffn,
                     max_position_embeddings=prepared["max_length"], hidden_dropout_prob=s.dropout,
                     attention_probs_dropout_prob=s.dropout, initializer_range=s.init_range)
    torch.manual_seed(seed)  # parameter initialisation (tartan.py leaves the global generator to the caller)
    body, mlm_head = tartan.split_masked_lm(AutoModelForMaskedLM.from_config(cfg))
    end = tartan.Task("end-task", tartan.ClassificationHead(s.hidden, s.n_concepts, s.dropout), ids["train"],
                      dev=ids["dev"], test=ids["test"], num_labels=s.n_concepts, metric="macro_f1")
    masking = dataclasses.replace(tartan.Masking.for_tokenizer(tok), prob=s.mask_prob)
    aux = {name: tartan.Task(name, tartan.new_mlm_head(mlm_head, body), ids[name], masking=masking)
           for name in ("helpful", "harmful", "mixed")}
    return {"tokenizer": tok, "body": body, "end": end, "aux": aux, "test_seen": ids["test_seen"],
            "test_unseen": ids["test_unseen"]}


# ----------------------------------------------------------------------------------------------------------------------
# One run = one (method, seed) cell.

DEMO_METHODS = ("finetune", "pretrain", "mt", "meta")
DEMO_LABELS = {"finetune": "fine-tune only", "pretrain": "pretrain->finetune", "mt": "MT-TARTAN",
               "meta": "META-TARTAN"}


def demo_configs(s: DemoSettings, seed: int) -> dict:
    """tartan configs of every stage (seed: data order and masking). Weight decay 0.01 on body and heads alike: the
    tiny model needs no stronger regularisation in a few hundred steps."""
    common = dict(lr=s.lr, head_lr=s.head_lr, weight_decay=0.01, head_weight_decay=0.01, batch_size=s.batch_size,
                  aux_batch_size=s.aux_batch_size, grad_accum=1, eval_every=s.eval_every, patience=s.patience,
                  seed=seed, progress=False, final_finetune=None)
    return {"finetune": tartan.FinetuneConfig(**{**common, "max_steps": s.finetune_steps}),
            # pre-training sees as many auxiliary sentences as MT/META do (they take one batch per corpus per step)
            "pretrain": tartan.PretrainConfig(**{**common, "max_steps": s.steps, "eval_every": -1,
                                                 "aux_batch_size": 2 * s.aux_batch_size}),
            "mt": tartan.TrainConfig(**{**common, "max_steps": s.steps}),
            "meta": tartan.MetaConfig(**{**common, "max_steps": s.steps}, meta_lr=s.meta_lr,
                                      meta_batch_size=s.meta_batch_size, meta_head_lr=s.meta_head_lr,
                                      meta_head_steps=s.meta_head_steps)}


def demo_run_one(method: str, seed: int, s: DemoSettings, prepared: dict) -> dict:
    """Train one method from the seed's initialisation; test macro-F1 overall and on each half of test."""
    b = build_demo(seed, s, prepared)
    cfgs = demo_configs(s, seed)
    two = [b["aux"]["helpful"], b["aux"]["harmful"]]
    t0 = time.perf_counter()
    if method == "finetune":
        out = tartan.run_end_task(b["body"], b["end"], [], "finetune", cfgs["finetune"])
    elif method == "pretrain":
        out = tartan.run_end_task(b["body"], b["end"], [b["aux"]["mixed"]], "pretrain", cfgs["finetune"],
                                  pretrain_cfgs=[cfgs["pretrain"]])
    else:
        out = tartan.run_end_task(b["body"], b["end"], two, method, cfgs[method])
    # the body and head are the selected (best-dev) model that run_end_task tested
    seen = tartan.evaluate(b["body"], b["end"].head, b["test_seen"])
    unseen = tartan.evaluate(b["body"], b["end"].head, b["test_unseen"])
    record = {"method": method, "seed": seed, "test": out["test"]["macro_f1"], "dev": out["dev"]["macro_f1"],
              "test_seen": seen["macro_f1"], "test_unseen": unseen["macro_f1"],
              "steps": sum(st["steps"] for st in out["stages"]), "seconds": time.perf_counter() - t0}
    if method == "meta":
        stage = out["stages"][0]
        names = list(stage["final_weights"])
        record["final_weights"] = stage["final_weights"]  # alpha = softmax(w) after the last step
        record["best_weights"] = stage.get("best_weights")  # alpha at the selected (best-dev) evaluation
        start = {"step": 0, **{n: 1.0 / len(names) for n in names}}  # Algorithm 1 starts from equal weights
        record["trajectory"] = [start] + [{"step": h["step"], **h["weights"]} for h in stage["history"]]
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Summary: per-method statistics, META's weights, and the two claims, all computed from the records.


def demo_min_seeds(alpha: float = 0.05) -> int:
    """Fewest seeds per method for which the exact two-sided permutation test can give p < alpha."""
    n = 1
    while 2 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n


def demo_summarize(records: list[dict]) -> dict:
    """Per method: per-seed scores, mean and sample std (ddof=1), permutation test against pretrain->finetune."""
    base = [r["test"] for r in records if r["method"] == "pretrain"]
    out = {}
    for m in DEMO_METHODS:
        rs = [r for r in records if r["method"] == m]
        entry = {"seeds": [r["seed"] for r in rs]}
        for key in ("test", "test_unseen", "test_seen", "dev"):
            entry[key] = [r[key] for r in rs]
        entry["mean"], entry["std"] = tartan.mean_std(entry["test"], ddof=1)
        entry["unseen_mean"], entry["unseen_std"] = tartan.mean_std(entry["test_unseen"], ddof=1)
        if m != "pretrain":
            entry["vs_pretrain"] = tartan.permutation_test(entry["test"], base)
        out[m] = entry
    return out


def demo_meta_weights(records: list[dict]) -> dict:
    """META-TARTAN's final weights: per seed, per task/corpus, and their means."""
    metas = [r for r in records if r["method"] == "meta"]
    names = list(metas[0]["final_weights"])
    by_task = {n: [r["final_weights"][n] for r in metas] for n in names}
    # the time-average of each weight over training, averaged over seeds: the whole run's preference, not only its end
    average = {n: float(np.mean([np.mean([p[n] for p in r["trajectory"]]) for r in metas])) for n in names}
    return {"seeds": [r["seed"] for r in metas], "by_task": by_task,
            "mean": {n: float(np.mean(v)) for n, v in by_task.items()}, "average_over_training": average,
            "best": {n: [(r["best_weights"] or {}).get(n) for r in metas] for n in names}}


def _demo_verdict(test: dict) -> str:
    """Wording of a one-directional claim 'a > b' from a tartan.permutation_test result."""
    if test["diff"] <= 0:
        return "NOT shown (not higher on average)"
    if test["p_two_sided"] < 0.05:
        return "shown (higher, p < 0.05)"
    if test["min_p_two_sided"] >= 0.05:
        return "higher on average; significance out of reach with this many seeds"
    return "higher on average, but not significant"


def demo_claims(summary: dict, weights: dict) -> dict:
    """The claims, computed from the results (never assumed)."""
    ft_unseen = summary["finetune"]["unseen_mean"]
    best = max(("pretrain", "mt", "meta"), key=lambda m: summary[m]["unseen_mean"])
    lower = [h < g for h, g in zip(weights["by_task"]["harmful"], weights["by_task"]["helpful"])]
    meta_vs_mt = tartan.permutation_test(summary["meta"]["test"], summary["mt"]["test"])
    n = len(lower)
    if all(lower):
        down = f"shown in all {n} seeds"
    elif 2 * sum(lower) > n:
        down = f"partly shown: in {sum(lower)} of {n} seeds"
    else:
        down = f"NOT shown: harmful below helpful in only {sum(lower)} of {n} seeds"
    return {
        "aux_carries_information": {
            "finetune_unseen": ft_unseen, "best_method": best, "best_unseen": summary[best]["unseen_mean"],
            "shown": summary[best]["unseen_mean"] > ft_unseen},
        "claim1_end_task_aware_beats_pretraining": {
            m: {"diff": summary[m]["vs_pretrain"]["diff"], "p_two_sided": summary[m]["vs_pretrain"]["p_two_sided"],
                "verdict": _demo_verdict(summary[m]["vs_pretrain"])} for m in ("mt", "meta")},
        "claim2_meta_downweights_harmful": {
            "harmful_below_helpful_per_seed": lower, "verdict": down,
            "meta_vs_mt": {"diff": meta_vs_mt["diff"], "p_two_sided": meta_vs_mt["p_two_sided"],
                           "verdict": _demo_verdict(meta_vs_mt)}},
    }


def demo_report(summary: dict, weights: dict, claims: dict, seeds, seconds: float) -> str:
    """The paper-style table, META's final weights and the claims, as printed."""
    n = len(seeds)
    any_test = summary["mt"]["vs_pretrain"]
    lines = [f"TARTAN offline demo: test macro-F1 x100, mean ± std over {n} seed(s) {', '.join(map(str, seeds))} "
             f"(std: sample, ddof=1)",
             f"{'method':<20} {'test macro-F1':>14} {'unseen synonyms':>16} {'seen synonyms':>14} {'p vs pretrain':>14}"]
    for m in DEMO_METHODS:
        e = summary[m]
        seen_mean, seen_std = tartan.mean_std(e["test_seen"], ddof=1)
        p = "(baseline)" if m == "pretrain" else f"{e['vs_pretrain']['p_two_sided']:.3f}"
        lines.append(f"{DEMO_LABELS[m]:<20} {100 * e['mean']:>7.1f} ± {100 * e['std']:<4.1f} "
                     f"{100 * e['unseen_mean']:>8.1f} ± {100 * e['unseen_std']:<5.1f} "
                     f"{100 * seen_mean:>6.1f} ± {100 * seen_std:<5.1f} {p:>14}")
    kind = "exact" if any_test["exact"] else f"{any_test['n_permutations']} random"
    lines.append(f"p: unpaired two-sided permutation test ({kind} splits) of per-seed test macro-F1 against "
                 f"pretrain->finetune (tartan.permutation_test).")
    if any_test["min_p_two_sided"] >= 0.05:
        lines.append(f"   With {n} seed(s) per method the smallest p this test can give is "
                     f"{any_test['min_p_two_sided']:.3f}: p < 0.05 cannot be reached; it needs >= {demo_min_seeds()} "
                     f"seeds per method (e.g. --seeds 0-{demo_min_seeds() - 1}).")
    lines.append("Unseen/seen synonyms: macro-F1 on the half of test whose concept word the labelled train set never "
                 "shows / shows (chance: 25).")
    lines += ["", "META-TARTAN final task weights (softmax alpha after the last step):",
              f"{'seed':<6}" + "".join(f"{name:>10}" for name in weights["by_task"])]
    for i, seed in enumerate(weights["seeds"]):
        lines.append(f"{seed:<6}" + "".join(f"{v[i]:>10.3g}" for v in weights["by_task"].values()))
    lines.append(f"{'mean':<6}" + "".join(f"{v:>10.3g}" for v in weights["mean"].values()))
    if "average_over_training" in weights:
        lines.append("(averaged over training and seeds: " + ", ".join(
            f"{n} {v:.3f}" for n, v in weights["average_over_training"].items()) + ")")
    c0 = claims["aux_carries_information"]
    c1 = claims["claim1_end_task_aware_beats_pretraining"]
    c2 = claims["claim2_meta_downweights_harmful"]
    lines += ["", "What the numbers show (computed from the runs above):",
              f"- The auxiliary text carries what the labels lack: fine-tune only scores {100 * c0['finetune_unseen']:.1f}"
              f" on unseen synonyms, {DEMO_LABELS[c0['best_method']]} {100 * c0['best_unseen']:.1f} -> "
              + ("shown" if c0["shown"] else "NOT shown"),
              "- Claim 1 (Sec. 5.1): end-task aware training beats end-task agnostic pre-training on the same text:"]
    for m in ("mt", "meta"):
        lines.append(f"    {DEMO_LABELS[m]} vs pretrain->finetune: {100 * c1[m]['diff']:+.1f} points, "
                     f"p = {c1[m]['p_two_sided']:.3f} -> {c1[m]['verdict']}")
    lines += [f"- Claim 2 (Sec. 3.2, 5.3): META-TARTAN down-weights the harmful corpus (final weight harmful < "
              f"helpful): {c2['verdict']} (mean {weights['mean']['harmful']:.3g} vs {weights['mean']['helpful']:.3g})",
              f"    and so uses mixed-quality text better than MT-TARTAN: {100 * c2['meta_vs_mt']['diff']:+.1f} points,"
              f" p = {c2['meta_vs_mt']['p_two_sided']:.3f} -> {c2['meta_vs_mt']['verdict']}",
              f"Wall time of the runs: {seconds:.0f} s."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: the weight-trajectory figure (optional) and the JSON summary (atomic).


def demo_plot_weights(records: list[dict], path: str) -> str | None:
    """META-TARTAN's task weights over training as a PNG: left, every weight (one line per task and seed); right,
    log(alpha_helpful / alpha_harmful) = w_helpful - w_harmful, which is above 0 where the harmful corpus is
    down-weighted relative to the helpful one. Returns None (and says so) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        print("matplotlib is not installed: no weight-trajectory figure (pip install matplotlib for one).")
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = {"end-task": "tab:blue", "helpful": "tab:green", "harmful": "tab:red"}
    for i, r in enumerate(r for r in records if r["method"] == "meta"):
        steps = [p["step"] for p in r["trajectory"]]
        for name in r["final_weights"]:
            left.plot(steps, [p[name] for p in r["trajectory"]], color=colors.get(name), alpha=0.75,
                      label=name if i == 0 else None)
        right.plot(steps, [math.log(p["helpful"] / p["harmful"]) for p in r["trajectory"]], alpha=0.75,
                   label=f"seed {r['seed']}")
    left.set(xlabel="training step", ylabel="task weight alpha (softmax of w)",
             title="META-TARTAN task weights (one line per seed)")
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set(xlabel="training step", ylabel="log(alpha_helpful / alpha_harmful)",
              title="> 0: harmful corpus down-weighted vs helpful")
    left.legend()
    right.legend()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Entry point.


def demo(seeds, out_dir: str, quick: bool = False, progress: bool = True,
         settings: DemoSettings | None = None) -> dict:
    """Runs the four methods over `seeds`, prints the table, META's weights and the claims, writes
    out_dir/demo_summary.json (and demo_weights.png with matplotlib). Returns the JSON summary."""
    import transformers

    seeds = list(seeds)
    if not seeds:
        raise ValueError("the demo needs at least one seed")
    s = settings or (quick_settings() if quick else DemoSettings())
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    transformers.logging.set_verbosity_error()  # building a model from a config warns about nothing useful here
    try:
        t0 = time.perf_counter()
        prepared = demo_prepare(s)
        records = []
        bar = _bar(len(seeds) * len(DEMO_METHODS), progress, "demo runs")
        for seed in seeds:
            for method in DEMO_METHODS:
                bar.set_postfix({"seed": seed, "method": method})
                records.append(demo_run_one(method, seed, s, prepared))
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    summary = demo_summarize(records)
    weights = demo_meta_weights(records)
    claims = demo_claims(summary, weights)
    if len(seeds) < 3:
        print(f"Note: {len(seeds)} seed(s); the paper-style comparison wants at least 3.")
    print(demo_report(summary, weights, claims, seeds, seconds))
    os.makedirs(out_dir, exist_ok=True)
    figure = demo_plot_weights(records, os.path.join(out_dir, "demo_weights.png"))
    result = {"task": "demo", "quick": quick, "seeds": seeds, "settings": dataclasses.asdict(s),
              "metric": "test macro-F1", "std_ddof": 1,
              "methods": {m: {"label": DEMO_LABELS[m], **summary[m]} for m in DEMO_METHODS},
              "meta_final_weights": {"per_seed": {str(sd): {n: v[i] for n, v in weights["by_task"].items()}
                                                  for i, sd in enumerate(weights["seeds"])},
                                     "mean": weights["mean"],
                                     "average_over_training": weights["average_over_training"]},
              "meta_best_weights": weights["best"],
              "meta_weight_trajectories": {str(r["seed"]): r["trajectory"] for r in records if r["method"] == "meta"},
              "claims": claims, "runs": [{k: v for k, v in r.items() if k != "trajectory"} for r in records],
              "figure": figure, "seconds": seconds, "threads": s.threads,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    path = os.path.join(out_dir, "demo_summary.json")
    atomic_write_json(path, result)
    print(f"Summary: {path}" + (f"; figure: {figure}" if figure else ""))
    return result


def run_demo(args) -> int:
    """--task demo: the offline synthetic demo, seeds 0-2 unless --seeds says otherwise."""
    demo(args.seeds or [0, 1, 2], args.out, quick=args.quick, progress=args.progress)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# 9. Command line.


def run_family(ws: Workspace, args) -> dict:
    """--task ... --mode ...: every (task, mode, seed) combination."""
    seeds = args.seeds or list(range(10))
    runs = []
    for task in args.task:
        valid = VISION_MODES if task == "mammals" else TEXT_MODES
        for mode in args.mode:
            if mode not in valid:
                raise ReproduceError(f"--mode {mode} does not apply to {task} (choose from {', '.join(valid)})")
            if args.aux and mode not in ("mt", "meta", "meta-samehead"):
                raise ReproduceError(f"--aux picks the auxiliary tasks of mt/meta; --mode {mode} names its own")
            if task == "mammals" and (args.aux or args.aux_file):
                raise ReproduceError("mammals has one auxiliary task (the other 95 CIFAR-100 classes): no --aux")
            if args.aux_file and mode == "finetune":
                raise ReproduceError("--mode finetune uses no auxiliary data: --aux-file does not apply")
            if args.aux == "none" and not args.aux_file:
                raise ReproduceError("--aux none needs at least one --aux-file")
            runs += [make_run(task, mode, args.aux, s, args.dapt_corpus or "10x", tuple(args.extra_corpora))
                     for s in seeds]
    results = execute_all(ws, runs)
    for task in args.task:
        for mode in args.mode:
            x = [r for r in runs if r.task == task and r.mode == mode and r in results]
            if x:
                scores = [100 * results[r]["headline"]["test"] for r in x]
                print(f"{task} {mode} ({x[0].aux_label}): test {TASKS[task]['metric']} x100 = "
                      f"{fmt(tartan.mean_std(scores))} over {len(x)} seed(s) (ddof=1)")
    return results


def parse_seeds(text: str) -> list[int]:
    seeds = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a seed list such as 0-9, 3 or 0,2,5") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' gives no non-negative seeds")
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the experiments of 'Should We Be Pre-training?' (TARTAN, ICLR 2022) with tartan.py. "
                    "Defaults are the paper's settings; the budget flags cut them down.",
        epilog="tables: 1 (with the p-values of Table 6), 2 (with Table 8), 3 (needs full DAPT corpora, not public), "
               "4, 5 (CIFAR-100), 7.  figures: 2 (data efficiency), 3 (phi* vs phi'), 4 (weights across tasks).\n"
               "Each run writes OUT/<task>/<mode>__<aux>__seed<k>.json; re-running skips complete runs.")
    what = p.add_argument_group("what to run")
    what.add_argument("--task", nargs="+", choices=list(TASKS) + ["demo"],
                      help="end-task(s) T*: aclarc (ACL-ARC), scierc (SCIERC), chemprot (CHEMPROT), hyperpartisan, "
                           "mammals (CIFAR-100, App. A.4); demo = the offline synthetic demo. With --table/--figure: "
                           "only these rows")
    what.add_argument("--mode", nargs="+", choices=sorted(set(TEXT_MODES + VISION_MODES)),
                      help="finetune = Eq. 2 alone (the 'RoBERTa' column); tapt, dapt, dapt+tapt = Eq. 1 on the "
                           "task's / domain text, then Eq. 2; mt = MT-TARTAN (Eq. 3); meta = META-TARTAN (Alg. 1, "
                           "meta head phi*); meta-samehead = META with the end-task head phi' (Eq. 6, Fig. 3); "
                           "pretrain = mammals only, Eq. 1 on the 95-way task. With --table: only these columns")
    what.add_argument("--aux", choices=("tapt", "dapt", "dapt+tapt", "none"),
                      help="auxiliary MLM tasks T_aux of mt/meta (default tapt, as Table 1); none = only --aux-file")
    what.add_argument("--aux-file", action="append", default=[], metavar="PATH",
                      help="one more MLM auxiliary task on this text file (one example per line), named after the "
                           "file; repeatable. For tapt/dapt modes: one more Eq. 1 stage, run first")
    what.add_argument("--dapt-corpus", metavar="1x|10x|full|PATH",
                      help="DAPT text: n = 1x or 10x |Train| of in-domain text (domain.{1x,10x}TAPT.txt; default "
                           "10x, as Tables 2 and 4), 'full' (domain.full.txt, placed by hand: Table 3), or a file")
    what.add_argument("--seeds", type=parse_seeds, metavar="0-9",
                      help="seeds, e.g. 0-9 or 0,3 (default: the paper's number, 10; 3 for Tables 4, 5, figures)")
    what.add_argument("--table", type=int, choices=sorted(TABLES), help="run a whole table of the paper and print it")
    what.add_argument("--figure", type=int, choices=sorted(FIGURES), help="run a figure's runs and draw it to PNG")
    what.add_argument("--bench", action="store_true", help="speed benchmark of the training steps")
    where = p.add_argument_group("model, data, results")
    where.add_argument("--model", default="roberta-base",
                       help="body theta_body: Hugging Face hub id or local directory of a masked-LM checkpoint "
                            "(default roberta-base, Sec. 4)")
    where.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "tartan", "data"),
                       help="data folder (default ~/.cache/tartan/data); files already there are used as they are, "
                            "missing ones are downloaded from the authors' pinned copy and checked (SHA-256)")
    where.add_argument("--data-url", default=DATA_URL, help=argparse.SUPPRESS)  # tests and mirrors
    where.add_argument("--out", default="results", help="results folder: one JSON per run, tables, figures")
    where.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    where.add_argument("--rerun", action="store_true", help="re-run and replace runs whose result file exists")
    where.add_argument("--report-only", action="store_true",
                       help="print tables / draw figures from the result files already in --out; train nothing")
    where.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    budget = p.add_argument_group(
        "budget (default: the paper's value for the mode; 'end-task stage' = Eq. 2 for finetune/tapt/dapt, Eq. 3 or "
        "Alg. 1 for mt/meta; 'Eq. 1' = the TAPT/DAPT pre-training; 'final' = the optional Eq. 2 after MT/META)")
    budget.add_argument("--quick", action="store_true",
                        help="tiny smoke budget: max length 64, 64 examples per split and corpus, 4 steps (2 for "
                             "Eq. 1 and final), batches of 8; not the paper's experiment")
    budget.add_argument("--budget", choices=sorted(BUDGETS),
                        help="a named reduced budget: cpu = a small pretrained body on a CPU (max length 64, batches "
                             "16, early stopping on dev for every end-task stage, Eq. 2 lr from a dev grid; the "
                             "values are printed under the table and stored in each result file)")
    budget.add_argument("--max-length", type=int, metavar="T", help="tokens per example, all data (paper 512)")
    budget.add_argument("--limit", type=int, metavar="N",
                        help="use a fixed random N examples of each split and N lines of each corpus (smoke runs)")
    budget.add_argument("--batch-size", type=int, help="|B*_tr|, end-task micro-batch of the end-task and final "
                                                       "stages (paper: 64 x 2 accumulation for MT/META, 16 for Eq. 2)")
    budget.add_argument("--aux-batch-size", type=int, help="|B_i|, auxiliary micro-batch, Eq. 1 and MT/META (64)")
    budget.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step, every stage (MT/META 2, "
                                                       "Eq. 1 4, Eq. 2 1)")
    budget.add_argument("--epochs", type=float, help="end-task stage: passes over the largest training set "
                                                     "(MT/META 150 with early stopping, Eq. 2 10)")
    budget.add_argument("--steps", type=int, help="end-task stage: optimizer steps (overrides --epochs)")
    budget.add_argument("--lr", type=float, help="beta_1, body learning rate of the end-task stage (MT/META 1e-4, "
                                                 "Eq. 2 2e-5)")
    budget.add_argument("--head-lr", type=float, help="beta_2, head learning rate of the end-task stage "
                                                      "(MT/META 1e-3, Eq. 2 2e-5)")
    budget.add_argument("--eval-every", type=int, help="end-task stage: evaluate dev every this many steps "
                                                       "(MT/META 30; 0 = once per epoch, Eq. 2)")
    budget.add_argument("--patience", type=int, help="end-task stage: stop after this many evaluations without a "
                                                     "new best dev score (MT/META 20, Eq. 2 3)")
    budget.add_argument("--meta-lr", type=float, help="eta, task-weight step size of META (1e-2; vision 5e-2)")
    budget.add_argument("--meta-batch-size", type=int, help="|B*_tr| = |B*_val| for the meta head phi* (32)")
    budget.add_argument("--meta-head-steps", type=int, help="steps to fit phi* from a fresh init (10)")
    budget.add_argument("--meta-head-lr", type=float, help="phi* learning rate (1e-3; vision 3e-2)")
    budget.add_argument("--pretrain-epochs", type=float, help="Eq. 1: passes over the corpus (100, TAPT's; used "
                                                               "for DAPT too)")
    budget.add_argument("--pretrain-steps", type=int, help="Eq. 1: optimizer steps (overrides --pretrain-epochs)")
    budget.add_argument("--pretrain-lr", type=float, help="Eq. 1: body learning rate (1e-4)")
    budget.add_argument("--pretrain-head-lr", type=float, help="Eq. 1: MLM head learning rate (1e-4)")
    budget.add_argument("--final-epochs", type=float, help="final Eq. 2 after MT/META: epochs (10)")
    budget.add_argument("--final-steps", type=int, help="final Eq. 2 after MT/META: steps (overrides epochs)")
    budget.add_argument("--final-lr", type=float, help="final Eq. 2 after MT/META: body learning rate (5e-6)")
    budget.add_argument("--final-head-lr", type=float, help="final Eq. 2 after MT/META: head learning rate (5e-6)")
    budget.add_argument("--no-final-finetune", action="store_true",
                        help="skip the optional Eq. 2 stage after MT/META (it is kept only if dev improves)")
    add_bench_args(p)  # its flags that reproduce.py already has (--quick, --out, ...) are shared
    return p


USAGE = """TARTAN (end-task aware training). Start here, offline, a few minutes on a laptop CPU:
       python reproduce.py --task demo
usage: python reproduce.py --task {aclarc,scierc,chemprot,hyperpartisan,mammals} --mode MODE [--seeds 0-9]
       python reproduce.py --table {1,2,3,4,5,7} | --figure {2,3,4}
       python reproduce.py --bench [--quick]
  e.g. python reproduce.py --task aclarc --mode meta          (META-TARTAN with TAPT on ACL-ARC, 10 seeds)
       python reproduce.py --table 1 --quick                   (a smoke run of Table 1)
  python reproduce.py --help lists every option."""


def _check_run_args(parser, args):
    """The checks of a training command (not --bench, not the demo); also collects args.extra_corpora."""
    if args.table and args.figure:
        parser.error("choose one of --table and --figure")
    if not (args.table or args.figure) and not (args.task and args.mode):
        parser.error("give --task and --mode, or --table, or --figure")
    args.extra_corpora = {}
    for path in args.aux_file:
        name = "file-" + os.path.splitext(os.path.basename(path))[0]
        if name in args.extra_corpora:
            parser.error(f"two --aux-file corpora are both named '{name}'")
        if not os.path.isfile(path):
            parser.error(f"--aux-file {path}: no such file")
        args.extra_corpora[name] = path
    if args.dapt_corpus and args.dapt_corpus not in DAPT_FILES:
        if not os.path.isfile(args.dapt_corpus):
            parser.error(f"--dapt-corpus {args.dapt_corpus}: neither 1x, 10x, full nor an existing file")
        name = "dapt-" + os.path.splitext(os.path.basename(args.dapt_corpus))[0]
        args.extra_corpora[name], args.dapt_corpus = args.dapt_corpus, name[4:]


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(USAGE)
        return 0
    args = parser.parse_args(argv)
    args.malloc = tune_malloc(not args.default_malloc)
    for flag in ("max_length", "limit", "batch_size", "aux_batch_size", "grad_accum", "steps", "meta_batch_size",
                 "meta_head_steps", "pretrain_steps", "final_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    demo = bool(args.task and "demo" in args.task)
    if demo and len(args.task) > 1:
        parser.error("--task demo runs alone")
    if not (args.bench or demo):
        _check_run_args(parser, args)
    try:
        if args.bench:
            return run_bench(args) or 0
        if demo:
            return run_demo(args) or 0
        import transformers
        transformers.logging.set_verbosity_error()
        if not args.progress:
            transformers.logging.disable_progress_bar()
        ws = Workspace(args, resolve_device(args.device))
        if args.table:
            run_table(args.table, ws, args)
        elif args.figure:
            run_figure(args.figure, ws, args)
        else:
            run_family(ws, args)
    except (ReproduceError, tartan.DataError, FileNotFoundError, ValueError) as e:  # bad input: one message
        where = ""
        if isinstance(e, ValueError) and not isinstance(e, tartan.DataError):  # may be a bug, not bad input: where
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f" (raised at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
        print(f"error: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted" + ("" if args.bench or demo else
                                 ": finished runs are kept; the same command resumes from there"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
