"""The vision experiment (App. A.4): CIFAR-100 medium-sized mammals and the WideResNet-16-2 body."""
from __future__ import annotations

import hashlib
import pickle
import tarfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tartan

from .paper import TASKS, metric_field

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
                      test=data(x_te, y_te, idx["test"], to_end), num_labels=len(MAMMALS),
                      metric=metric_field(TASKS["mammals"]["metric"]))
    aux = tartan.Task("cifar95", tartan.ClassificationHead(WRN_WIDTH, len(others)),
                      data(x_tr, y_tr, idx["aux"], to_aux))
    sizes = {k: int(len(v)) for k, v in idx.items()}
    sizes["split_sha256"] = hashlib.sha256(b"".join(np.asarray(idx[k], np.int64).tobytes()
                                                    for k in ("train", "dev", "test"))).hexdigest()
    return end, aux, sizes


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
