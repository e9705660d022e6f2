"""The vision path (Table 5): CIFAR-100 archive, mammals split, WideResNet-16-2 through the same loops."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

import reproduce
import tartan
from experiments import vision



def fake_cifar(path, per_class_train, per_class_test, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", per_class_train), ("test", per_class_test)):
            y = np.repeat(np.arange(100), n)
            blob = pickle.dumps({b"data": rng.integers(0, 256, (len(y), 3072), dtype=np.uint8),
                                 b"fine_labels": y.tolist()})
            info = tarfile.TarInfo(f"cifar-100-python/{split}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_mammals_split_sizes_and_seeding():
    train_y, test_y = np.repeat(np.arange(100), 60), np.repeat(np.arange(100), 50)
    s = vision.mammals_split(train_y, test_y, seed=0)
    assert (len(s["train"]), len(s["dev"]), len(s["test"])) == (160, 40, 200)  # 200 images, 20% dev, 200 test
    assert set(train_y[s["train"]]) <= set(vision.MAMMALS) and set(test_y[s["test"]]) <= set(vision.MAMMALS)
    assert not set(s["train"]) & set(s["dev"]) and len(set(train_y[s["aux"]])) == 95 and len(s["aux"]) == 95 * 60
    again, other = vision.mammals_split(train_y, test_y, 0), vision.mammals_split(train_y, test_y, 1)
    assert all((again[k] == s[k]).all() for k in s) and not (other["train"] == s["train"]).all()
    big = vision.mammals_split(np.repeat(np.arange(100), 500), test_y, 0, n_train=400)
    assert len(big["dev"]) == 65  # ~20%, capped at 65


def test_wideresnet_16_2_shapes():
    torch.manual_seed(0)
    body = vision.WideResNet(16, 2, dropout=0.1)
    assert body.hidden_size == 128 and 0.6e6 < sum(p.numel() for p in body.parameters()) < 0.8e6  # WRN-16-2: 0.7M
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert body(x=x).shape == (4, 128)


def test_vision_path_through_the_same_loops(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    fake_cifar(os.path.join(data, "cifar-100", "cifar-100-python.tar.gz"), 6, 3)
    cifar = vision.read_cifar100(os.path.join(data, "cifar-100", "cifar-100-python.tar.gz"))
    assert cifar["train"][0].shape == (600, 3, 32, 32) and cifar["train"][0].dtype == np.uint8
    code = reproduce.main(["--task", "mammals", "--mode", "meta", "--seeds", "0", "--data-dir", data, "--out", out,
                           "--device", "cpu", "--quick", "--no-progress"])
    assert code == 0
    rec = json.load(open(os.path.join(out, "mammals", "meta__cifar95__seed0.json")))
    assert rec["headline"]["metric"] == "accuracy" and rec["headline"]["test"] == rec["test"]["micro_f1"]
    assert rec["data_sizes"]["train"] == 24 and rec["data_sizes"]["dev"] == 6 and rec["data_sizes"]["test"] == 15
    assert set(rec["history"][-1]["alpha"]) == {"mammals", "cifar95"} and rec["history"][-1]["cosines"]
    assert rec["config"]["train"]["meta_head_lr"] == 3e-2 and rec["config"]["body"].startswith("WideResNet-16-2")

    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(tartan.DataError, match="not a CIFAR-100 python archive"):
        vision.read_cifar100(str(tmp_path / "broken.tar.gz"))
