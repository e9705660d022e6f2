"""experiments/tasks.py and models.py: tasks from files and from memory, models from a folder or the Hub; bad input
gets one message naming the file and line, or the fix."""
import json
import logging
import os

import numpy as np
import pytest
import torch

import tartan
from experiments import models, store, tasks
from test_tartan import Lin, build, small_config, task_dir, tok, transformers  # noqa: F401 (fixtures)


def test_read_end_task_label_vocabulary_from_train(task_dir):
    data = tasks.read_end_task(task_dir)
    assert data["labels"] == ["c0", "c1", "c2"]
    assert len(data["train"][0]) == 48 and set(data["dev"][1]) == {0, 1, 2}


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n',
     "line 2: malformed JSON (Expecting value at character 25)"),
    ('{"text": "a\tb", "label": "x"}\n', "line 1: malformed JSON (Invalid control character at character 12)"),
    ('{"text": "a", "label": "x"}\n\n{"label": "x"}\n', "line 3: missing field 'text'"),
    ('{"text": "a"}\n', "line 1: missing field 'label'"),
    ('["a", "x"]\n', "line 1: expected a JSON object"),
    ("", "empty file"),
    ("\n\n", "empty file"),
    ('{"text": "a", "label": null}\n', "line 1: 'label' must be a non-empty string or an integer"),
    ('{"text": "a", "label": ""}\n', "line 1: 'label' must be a non-empty string or an integer, not ''"),
    ('{"text": "a", "label": "x", "label": "y"}\n', "line 1: the key 'label' appears twice in one object"),
    ('{"text": "a", "label": "x", "metadata": {"k": 1, "k": 2}}\n', "line 1: the key 'k' appears twice"),
    ('{"text": "a \\ud800", "label": "x"}\n', "line 1: 'text' holds an escape that is no character"),
    ('{"text": "a", "label": "x", "metadata": ' + "[" * 100000 + "]" * 100000 + '}\n',
     "line 1: JSON nested too deep"),
    ('{"text": "a", "label": "x"}\n{"text": "\xff", "label": "x"}\n', "line 2: not UTF-8"),
    pytest.param('{"text": "a", "label": ' + "9" * 5000 + '}\n', "line 1: a number of more than 4,300 digits",
                 id="5000-digit label"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(tartan.DataError) as e:
        tasks.read_jsonl(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_an_empty_text_is_kept_and_warned_about(tmp_path):
    """Real splits hold empty texts (HYPERPARTISAN's dev.jsonl): kept, as the split has them, with one warning."""
    path = tmp_path / "dev.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": " ", "label": "y"}\n')
    with pytest.warns(UserWarning, match=r"dev\.jsonl: 1 example\(s\) with empty text \(line 2\), kept"):
        assert tasks.read_jsonl(str(path)) == (["a", " "], ["x", "y"], [1, 2])


def test_unseen_dev_label_is_an_error(task_dir):
    with open(os.path.join(task_dir, "dev.jsonl"), "a") as f:
        f.write(json.dumps({"text": "w1 w2", "label": "never-in-train"}) + "\n")
    with pytest.raises(tartan.DataError, match=r"dev\.jsonl, line 25: label 'never-in-train' never appears"):
        tasks.read_end_task(task_dir)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(tartan.DataError, match="no such file"):
        tasks.read_end_task(str(tmp_path))
    with pytest.raises(tartan.DataError, match=f"{tmp_path}: a folder, not a file"):
        tasks.read_lines(str(tmp_path))
    (tmp_path / "aux.txt").write_text("\n  \n")
    with pytest.raises(tartan.DataError, match="aux.txt: empty file"):
        tasks.read_lines(str(tmp_path / "aux.txt"))
    (tmp_path / "bom.txt").write_text("\ufeffw1 w2\nw3\n", encoding="utf-8")  # saved by an editor that adds a BOM
    assert tasks.read_lines(str(tmp_path / "bom.txt")) == ["w1 w2", "w3"]  # it stayed in line 1's first word
    (tmp_path / "bom-only.txt").write_text("\ufeff\n", encoding="utf-8")
    with pytest.raises(tartan.DataError, match="bom-only.txt: empty file"):
        tasks.read_lines(str(tmp_path / "bom-only.txt"))


def test_a_jsonl_split_with_a_bom_mixed_label_kinds_or_cr_line_ends(tmp_path):
    rows = [{"text": "w1 w2", "label": 1}, {"text": "w3", "label": 2}]
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + "\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")  # an editor's BOM
    assert tasks.read_jsonl(str(bom))[:2] == (["w1 w2", "w3"], [1, 2])  # integer labels stay integers
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(map(json.dumps, rows + [{"text": "w4", "label": "1"}])) + "\n")
    with pytest.raises(tartan.DataError, match=r"mixed.jsonl, line 3: label '1' is a string, line 1's an integer: "
                                               r"write every label one way"):
        tasks.read_jsonl(str(mixed))
    folder = tmp_path / "task"  # across a task's files: 1 in train, "1" in dev
    folder.mkdir()
    for split, labels in (("train", (1, 2)), ("dev", ("1", "2")), ("test", (2, 1))):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": "w", "label": x}) for x in labels))
    with pytest.raises(tartan.DataError, match=r"dev.jsonl, line 1: label '1' never appears as a string in "
                                               r"train.jsonl \(train labels: 1, 2\)"):
        tasks.read_end_task(str(folder))
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes("\r".join(map(json.dumps, rows)).encode() + b"\r")
    with pytest.raises(tartan.DataError, match=r"cr.jsonl, line 1: malformed JSON \(Extra data at character 31\); its "
                                               r"lines end in CR alone: convert them to LF"):
        tasks.read_jsonl(str(cr))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        models.from_pretrained(str(tmp_path / "not-there"))
    # a relative path in a folder that is here, and a file: "the Hub cannot be reached" named neither
    (tmp_path / "scratch").mkdir(), (tmp_path / "scratch" / "notes.txt").write_text("x")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match="model 'scratch/nomodel': no such local directory"):
            models.from_pretrained("scratch/nomodel")
        with pytest.raises(FileNotFoundError, match="model 'scratch/notes.txt': a file, not a model directory"):
            models.from_pretrained("scratch/notes.txt")
    finally:
        monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="the directory has no config.json"):
        models.from_pretrained(str(tmp_path))  # exists but holds no model


def test_a_broken_model_folder_is_a_clear_error(tmp_path, tok):
    """Weights cut off, or tokenizer files missing (which transformers answers with a tokenizer of its special
    tokens alone, every word [UNK]): one message naming the folder, never a traceback or a silent [UNK] run."""
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    for name in ("cut", "no-tokenizer"):
        transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FileNotFoundError, match="model '.*cut' could not be loaded from its local directory: "):
        models.from_pretrained(str(tmp_path / "cut"))
    with pytest.raises(FileNotFoundError, match=f"its tokenizer has [0-9] tokens for the model's {len(tok)}: the "
                                                f"tokenizer files are missing"):
        models.from_pretrained(str(tmp_path / "no-tokenizer"))


def test_a_hub_id_with_no_network_fails_at_once(monkeypatch):
    import socket
    import urllib.request

    from huggingface_hub import constants

    tries = []

    def no_network(address, *args, **kwargs):
        tries.append(address)
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    assert models.hub_unreachable() == "huggingface.co: Network is unreachable"
    # not in the local cache either: one message, without the library's minutes of retries
    with pytest.raises(FileNotFoundError, match=r"'tartan-tests/no-such-model' could not be loaded from the Hugging "
                                                r"Face cache, and the Hub cannot be reached \(huggingface.co: Network"):
        models.from_pretrained("tartan-tests/no-such-model")
    # hub_unreachable's one try, here and in from_pretrained, and at most huggingface_hub's once-per-process fetch of
    # its agent registry: no download tried (with the library's retries, each file is tried again and again)
    assert 2 <= len(tries) <= 3 and set(tries) == {("huggingface.co", 443)}
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    assert models.hub_unreachable() is None  # behind a proxy, the proxy connects: no verdict from here


def test_from_pretrained_local_directory_ties_new_mlm_head(tmp_path, tok):
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path)  # a checkpoint without MLM-head weights
    tok.save_pretrained(tmp_path)
    records, seen = [], logging.Handler()
    seen.emit = records.append  # every record transformers logs during the load
    level, logged = transformers.logging.get_verbosity(), logging.getLogger("transformers")
    transformers.logging.set_verbosity_warning()  # as in a fresh process (another test may have quieted it)
    logged.addHandler(seen)
    try:
        with pytest.warns(UserWarning, match=r"has no weights for \d+ tensors \(e.g. cls.predictions"):
            body, mlm, tok2, missing = models.from_pretrained(str(tmp_path))
    finally:
        transformers.logging.set_verbosity(level)
        logged.removeHandler(seen)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]  # one warning, not its load report
    assert any("predictions" in k for k in missing)  # the head was newly initialised ...
    emb = body.encoder.get_input_embeddings().weight
    assert mlm.lm_head.predictions.decoder.weight is emb  # ... with the decoder tied to the input embeddings
    assert len(tok2) == len(tok)


def test_classification_task_builder(tok, task_dir, tmp_path):
    from_folder = tasks.classification_task("cls", task_dir, tok, 32, max_length=32)
    from_file = tasks.classification_task("cls", os.path.join(task_dir, "train.jsonl"), tok, 32, max_length=32)
    texts, labels, _ = tasks.read_jsonl(os.path.join(task_dir, "train.jsonl"))
    assert from_folder.num_labels == 3 and from_folder.head.mlp[-1].out_features == 3
    assert from_folder.train.ids == from_file.train.ids == tasks.tokenize(tok, texts, 32)
    assert from_folder.train.labels == [int(y[1]) for y in labels]  # "c0" < "c1" < "c2"
    assert from_folder.masking is None and from_folder.dev is None
    pair = tasks.classification_task("pair", (["w1 w2", "w11", "w3", "w25 w1"], [7, 2, 7, 30]), tok, 32, limit=3)
    assert pair.num_labels == 3 and len(pair.train) == 3 and set(pair.train.labels) <= {0, 1, 2}  # 2, 7, 30 -> 0, 1, 2
    full = tasks.classification_task("pair", (["w1 w2", "w11", "w3", "w25 w1"], [7, 2, 7, 30]), tok, 32)
    assert full.train.labels == [1, 0, 1, 2]
    for bad, message in [((["a", "b"], [0]), "2 texts but 1 labels"), (([], []), "has no examples"),
                         ((["a", "b"], [0, "x"]), "all non-empty strings or all integers"),
                         ((["a"], [None]), "all non-empty strings or all integers, not None"),
                         ((["a"], [""]), "all non-empty strings or all integers, not ''")]:
        with pytest.raises(tartan.DataError, match=message):
            tasks.classification_task("bad", bad, tok, 32)
    # an auxiliary classification task trains beside the end-task, with its own head, in MT and META alike
    for train in (tartan.train_multitask, tartan.train_meta):
        body, end, _ = build(tok, task_dir)
        aux = tasks.classification_task("cls", task_dir, tok, body.hidden_size, max_length=32)
        before = [p.clone() for p in aux.head.parameters()]
        cfg = small_config(train is tartan.train_meta, max_steps=3, final_finetune=None)
        out = train(body, end, [aux], cfg)
        assert set(out["final_alpha"]) == {"toy", "cls"} and out["tokens"]["cls"] > 0
        assert all(not torch.equal(a, b) for a, b in zip(before, aux.head.parameters()))


def test_in_memory_end_tasks_match_the_folder(tok, task_dir):
    """end_task from (texts, labels) per split gives the very task the JSONL folder gives; from tensors, a TensorData
    task with num_labels = the largest class id + 1. Unseen dev labels and a missing split are clear errors."""
    data = tasks.read_end_task(task_dir)
    names = data["labels"]
    pairs = {s: (data[s][0], [names[i] for i in data[s][1]]) for s in ("train", "dev", "test")}
    from_folder = tasks.end_task("toy", task_dir, tok, 32, max_length=32)
    from_memory = tasks.end_task("toy", pairs, tok, 32, max_length=32)
    for s in ("train", "dev", "test"):
        a, b = getattr(from_folder, s), getattr(from_memory, s)
        assert a.ids == b.ids and a.labels == b.labels
    assert from_memory.num_labels == 3 and from_memory.head.mlp[-1].out_features == 3
    ints = tasks.end_task("toy", {s: (t, [20 - int(y[1]) * 10 for y in ys]) for s, (t, ys) in pairs.items()}, tok,
                           32)  # c0, c1, c2 -> 20, 10, 0, which come first in train in that order: numbered sorted
    assert ints.train.labels == [2 - y for y in from_folder.train.labels]  # 0 < 10 < 20 -> 0, 1, 2
    g = np.random.default_rng(0)
    arrays = {s: (g.normal(size=(n, 4)), np.arange(n) % 3) for s, n in (("train", 12), ("dev", 6), ("test", 6))}
    t = tasks.end_task("img", arrays, None, 4, limit=9)
    assert isinstance(t.train, tartan.TensorData) and len(t.train) == 9 and len(t.dev) == 6 and t.num_labels == 3
    assert t.train.x.dtype == torch.float32 and t.head.mlp[1].in_features == 4
    out = tartan.run_end_task(Lin(), t, [], "finetune", tartan.FinetuneConfig(batch_size=4, max_steps=2))
    assert out["test"]["n"] == 6
    with pytest.raises(tartan.DataError, match="end-task 'toy', dev split, example 0: label 'new' never appears in train"):
        tasks.end_task("toy", {**pairs, "dev": (["w1"], ["new"])}, tok, 32)
    with pytest.raises(TypeError, match="a dict with keys 'train', 'dev', 'test' .* with keys \\['dev', 'train'\\]"):
        tasks.end_task("toy", {"train": pairs["train"], "dev": pairs["dev"]}, tok, 32)


def test_the_readme_own_code_example_runs_as_printed(model_dir, task_dir, capsys):
    """README "Using tartan.py from your own code": its first code block, run as printed but for the model and task
    folder (local stand-ins for roberta-base and ACL-ARC) and a config of a few steps in place of the paper's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Using tartan.py from your own code")[1]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    given = 'MODEL, DATA = "roberta-base", "data/citation_intent"'
    assert given in code and "tartan.MetaConfig()" in code
    code = code.replace(given, f"MODEL, DATA = {model_dir!r}, {task_dir!r}").replace(
        "tartan.MetaConfig()", "tartan.MetaConfig(max_steps=3, batch_size=8, aux_batch_size=8, grad_accum=1, "
                               "eval_every=1, meta_batch_size=8, final_finetune=None)")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    macro_f1, final_alpha = printed.split(" ", 1)[0], printed.split(" ", 1)[1]
    assert 0 <= float(macro_f1) <= 1 and "'aclarc'" in final_alpha and "'tapt'" in final_alpha


def test_a_jsonl_corpus_is_read_as_jsonl_whatever_the_case_of_its_extension(tmp_path):
    upper = tmp_path / "corpus.JSONL"
    upper.write_text(json.dumps({"text": "w1 w2", "label": "a"}) + "\n")  # not one MLM example of raw JSON
    assert store.corpus_texts(str(upper)) == ["w1 w2"]
    assert store.corpus_texts(str(tmp_path / "corpus.txt")) == str(tmp_path / "corpus.txt")  # a line file: its path
