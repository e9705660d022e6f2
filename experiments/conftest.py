"""Shared fixtures of the runner's tests: a tiny BERT masked-LM saved as a local checkpoint and a tiny
ACL-ARC-shaped data folder."""
import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

WORDS = [f"w{i}" for i in range(30)]
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reproduce.py")



@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """The tests' warmed heads and run checkpoints go to a folder of their own, never the user's cache."""
    os.environ["TARTAN_CACHE"] = str(tmp_path_factory.mktemp("tartan-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("model"))
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                                        + WORDS)})
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_text_task(data_dir, folder="citation_intent", sizes=(48, 24, 24), seed=0):
    """Three classes; the label is the word group a sentence draws from. Also train.txt (TAPT) and a DAPT file."""
    rng = random.Random(seed)
    sentence = lambda y: " ".join(rng.choice(WORDS[y * 10:(y + 1) * 10]) for _ in range(rng.randint(3, 8)))  # noqa
    path = os.path.join(data_dir, folder)
    os.makedirs(path, exist_ok=True)
    for split, n in zip(("train", "dev", "test"), sizes):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": sentence(i % 3), "label": f"c{i % 3}", "metadata": {}}) + "\n")
    for name in ("train.txt", "domain.10xTAPT.txt"):
        with open(os.path.join(path, name), "w") as f:
            f.write("\n".join(sentence(i % 3) for i in range(48)) + "\n")
    return data_dir


@pytest.fixture()
def data_dir(tmp_path):
    return write_text_task(str(tmp_path / "data"))


def cli_flags(model_dir, data_dir, out, *extra):
    return ["--model", model_dir, "--data-dir", data_dir, "--out", out, "--device", "cpu", "--quick",
            "--no-progress", *extra]


def results_in(out):
    return sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs
                  if f.endswith(".json"))


def leftovers(folder):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith((".tmp", ".part"))]


def write_own_task(parent, name="my_task"):
    """A user's end-task folder as the README shows it: train/dev/test.jsonl and no train.txt (TAPT then reads the
    texts of train.jsonl), plus one extra corpus beside it for --aux-file."""
    write_text_task(parent, folder=name, sizes=(36, 18, 18), seed=1)
    folder = os.path.join(parent, name)
    os.replace(os.path.join(folder, "domain.10xTAPT.txt"), os.path.join(parent, "reviews.txt"))
    os.remove(os.path.join(folder, "train.txt"))
    return folder


@pytest.fixture()
def own_dir(tmp_path):
    return write_own_task(str(tmp_path))


def own_flags(model_dir, out, *extra):
    """cli_flags without --data-dir, which a user's own task does not need."""
    return ["--model", model_dir, "--out", out, "--device", "cpu", "--quick", "--no-progress", *extra]
