"""Tasks from files and from memory: the "Don't Stop Pretraining" JSONL format ({"text", "label", ...} a line) and
plain line files, read and checked (a bad line is a DataError naming file and line); tokenisation; and the builders of
tartan's Tasks: the end-task with a new head, an auxiliary classification task, an MLM task on a corpus."""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

from tartan import (ClassificationHead, DataError, Masking, MLMHead, Task, TensorData, TextData, check_classes,
                    new_mlm_head)
from tartan import _describe as describe


def read_jsonl(path: str) -> tuple[list[str], list[str | int], list[int]]:
    """Texts, labels and line numbers of a JSONL split. Blank lines are skipped; anything else malformed is an error."""
    texts, labels, lines, empty, kinds = [], [], [], [], {}  # kinds: is a string -> the first line of that kind
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys, parse_int=_integer)
        except json.JSONDecodeError as e:
            where = f"{e.msg.removesuffix(' at')} at character {e.pos + 1}"  # json's msg may end in a bare "at"
            cr = "; its lines end in CR alone: convert them to LF" if "\r" in line.rstrip("\r\n") else ""
            raise DataError(f"{path}, line {lineno}: malformed JSON ({where}){cr}") from None
        except (ValueError, RecursionError) as e:  # a key given twice, a number too long; arrays past Python's stack
            raise DataError(f"{path}, line {lineno}: {e if isinstance(e, ValueError) else 'JSON nested too deep'}") \
                from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object with 'text' and 'label'")
        missing = [key for key in ("text", "label") if key not in obj]
        if missing:
            raise DataError(f"{path}, line {lineno}: missing field '{missing[0]}'")
        if not isinstance(obj["text"], str):
            raise DataError(f"{path}, line {lineno}: 'text' must be a string")
        if not obj["text"].strip():  # kept: real splits have them (HYPERPARTISAN's dev.jsonl, line 22)
            empty.append(lineno)
        if not obj["text"].isascii() and not _encodes(obj["text"]):
            raise DataError(f"{path}, line {lineno}: 'text' holds an escape that is no character (a lone "
                            f"surrogate such as \\ud800), which no tokenizer takes")
        if not _is_label(obj["label"]):
            raise DataError(f"{path}, line {lineno}: 'label' must be a non-empty string or an integer, not "
                            f"{obj['label']!r}")
        kinds.setdefault(isinstance(obj["label"], str), lineno)
        if len(kinds) > 1:  # 1 and "1" would be one class
            here, there = ("a string", "an integer") if isinstance(obj["label"], str) else ("an integer", "a string")
            raise DataError(f"{path}, line {lineno}: label {obj['label']!r} is {here}, line "
                            f"{kinds[not isinstance(obj['label'], str)]}'s {there}: write every label one way")
        texts.append(obj["text"])
        labels.append(obj["label"])  # as written: integer labels stay integers (in predictions too)
        lines.append(lineno)
    if not texts:
        raise DataError(f"{path}: empty file (no examples)")
    if empty:
        warnings.warn(f"{path}: {len(empty)} example(s) with empty text (line {', '.join(map(str, empty[:5]))}"
                      f"{', ...' if len(empty) > 5 else ''}), kept: the model sees only its special tokens for them")
    return texts, labels, lines


def _unique_keys(pairs: list) -> dict:
    """A JSON object's keys and values, for json.loads; a key given twice (whose first value json would drop without
    a word) is an error."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object")
    return dict(pairs)


def _integer(digits: str) -> int:
    """A JSON integer, for json.loads; one longer than Python converts (sys.get_int_max_str_digits) is an error that
    says so, not Python's advice to raise the limit."""
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise ValueError(f"a number of more than {limit:,} digits")
    return int(digits)


def _encodes(text: str) -> bool:
    """Whether a string is Unicode text that UTF-8 can hold (JSON's \\u escapes can give lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _numbered_lines(path: str):
    """(line number, line) of a UTF-8 text file; a missing file, or a byte that is not UTF-8, is a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'a folder, not a' if os.path.isdir(path) else 'no such'} file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")  # a BOM is no text
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not UTF-8 text ({e.reason})") from None


def read_lines(path: str) -> list[str]:
    """One auxiliary MLM example per non-blank line (the TAPT/DAPT corpora)."""
    lines = [line.strip() for _, line in _numbered_lines(path) if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty file (no lines of text)")
    return lines


def read_end_task(folder: str) -> dict:
    """{train,dev,test}.jsonl of one end-task -> texts, integer labels and the label vocabulary (from train)."""
    splits = {s: read_jsonl(os.path.join(folder, f"{s}.jsonl")) for s in ("train", "dev", "test")}
    return _numbered(splits, "train.jsonl",
                     lambda s, i: f"{os.path.join(folder, s + '.jsonl')}, line {splits[s][2][i]}")


def _is_label(x) -> bool:
    """A class label as tartan takes it, from a file or in memory: a string with a character other than white space,
    or an integer (a bool is neither)."""
    return isinstance(x, (str, int, np.integer)) and not isinstance(x, bool) and not (isinstance(x, str) and
                                                                                     not x.strip())


def _numbered(splits: dict, train: str = "train", where=None) -> dict:
    """{split: (texts, labels, ...)} -> {"labels": the vocabulary, split: (texts, class ids)}: the one numbering of
    labels (strings or integers) as class ids 0..C-1, in sorted order of splits["train"]'s labels. A label that train
    lacks is a DataError naming where it stands, where(split, index) (default: the split and the example's index),
    and `train`."""
    vocab = sorted(set(splits["train"][1]))
    index = {label: i for i, label in enumerate(vocab)}
    for split, (_, labels, *_) in splits.items():
        for i, label in enumerate(labels):
            if label not in index:
                kind = (" as a string" if isinstance(label, str) else " as an integer") \
                    if str(label) in map(str, vocab) else ""  # 1 here, "1" there: write every label one way
                raise DataError(f"{where(split, i) if where else f'{split} split, example {i}'}: label {label!r} "
                                f"never appears{kind} in {train} (train labels: {', '.join(map(str, vocab))})")
    return {"labels": vocab, **{s: (v[0], [index[label] for label in v[1]]) for s, v in splits.items()}}


def check_tokenizer(tokenizer, what: str, first_position: bool = True) -> None:
    """A tokenizer tartan can batch with: it has a pad token, and (first_position: for a ClassificationHead, which
    reads the first position) it puts a CLS/BOS token first; otherwise a ValueError naming `what` and the fix."""
    name = type(tokenizer).__name__
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{what}: tokenizer {name} has no pad token, and batches are padded with it: set one before "
                         f"building the task, e.g. tokenizer.pad_token = tokenizer.eos_token (or unk_token)")
    if first_position:
        first = tokenizer("a")["input_ids"][:1]
        if not first or first[0] not in {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}:
            raise ValueError(f"{what}: tokenizer {name} puts no CLS/BOS token first (its first token is "
                             f"{tokenizer.convert_ids_to_tokens(first)}), and a ClassificationHead reads the first "
                             f"position, which would be the first word: use a tokenizer whose post-processor adds "
                             f"one (BERT, RoBERTa), or a body that pools its features to (B, H)")


def tokenize(tokenizer, texts: list[str], max_length: int, chunk: int = 2048) -> list[list[int]]:
    """Token ids with special tokens, truncated to max_length (no padding: batches are padded dynamically)."""
    ids = []
    for i in range(0, len(texts), chunk):
        ids += tokenizer(texts[i:i + chunk], truncation=True, max_length=max_length)["input_ids"]
    return ids


def _text_data(tokenizer, texts: list[str], labels: list[int] | None, max_length: int, limit: int | None) -> TextData:
    """A fixed random subset of at most `limit` examples (see subset), tokenised."""
    keep = subset(len(texts), limit)
    return TextData(tokenize(tokenizer, [texts[i] for i in keep], max_length),
                    None if labels is None else [labels[i] for i in keep], tokenizer.pad_token_id)


def subset(n: int, limit: int | None) -> list[int]:
    """A fixed (seed 0) random subset of at most `limit` of n example indices, in their original order (smoke runs)."""
    if not limit or n <= limit:
        return list(range(n))
    return sorted(np.random.default_rng(0).choice(n, limit, replace=False).tolist())


def end_task(name: str, data, tokenizer, hidden_size: int, max_length: int = 512,
             metric: str = "macro_f1", dropout: float = 0.1, limit: int | None = None) -> Task:
    """The end-task T* with a new classification head phi'. `data` is a folder of {train,dev,test}.jsonl, or, in
    memory, a dict {"train": ..., "dev": ..., "test": ...} of either (texts, labels) pairs (labels strings or
    integers, numbered in sorted order of train's labels, as for a folder) or (x, labels) pairs of tensors, numpy
    arrays or lists for a body called as body(x=...) (tartan.TensorData; labels are class ids 0..C-1, C = the
    largest in train + 1; the tokenizer is not used and may be None). `limit` keeps a fixed random subset of at most
    that many examples per split."""
    if metric not in ("macro_f1", "micro_f1"):
        raise ValueError(f"metric must be 'macro_f1' or 'micro_f1', not '{metric}'")
    names = ("train", "dev", "test")
    if isinstance(data, str):
        splits = read_end_task(data)
    elif isinstance(data, dict) and sorted(data) == ["dev", "test", "train"]:
        if not isinstance(data["train"][0], (list, tuple)) or not all(isinstance(t, str) for t in data["train"][0]):
            tensors = [TensorData(*data[s]) for s in names]  # (x, labels), checked there
            if not len(tensors[0]):
                raise DataError(f"end-task '{name}': its train split is empty")
            C = 1 + int(tensors[0].labels.max())  # classes: ids 0..C-1, as train has them
            for s, d in zip(names[1:], tensors[1:]):
                if len(d) and int(d.labels.max()) >= C:  # a class the head would never be trained on
                    raise DataError(f"end-task '{name}', {s} split: label {int(d.labels.max())} never appears in "
                                    f"train (its class ids are 0..{C - 1})")
            check_classes(name, C)
            kept = [(d, torch.tensor(subset(len(d), limit), dtype=torch.long)) for d in tensors]
            train, dev, test = (TensorData(d.x[idx], d.labels[idx]) for d, idx in kept)
            return Task(name, ClassificationHead(hidden_size, C, dropout), train, dev=dev, test=test, num_labels=C,
                        metric=metric)
        splits = _numbered({s: _text_pairs(f"end-task '{name}', {s} split", data[s]) for s in names}, "train",
                           lambda s, i: f"end-task '{name}', {s} split, example {i}")
    else:
        raise TypeError(f"end-task '{name}': data must be a folder of {{train,dev,test}}.jsonl or a dict with keys "
                        f"'train', 'dev', 'test' of (texts, labels) or (x, labels), not {describe(data)}"
                        + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    check_tokenizer(tokenizer, f"end-task '{name}'")
    check_classes(name, len(splits["labels"]))
    train, dev, test = (_text_data(tokenizer, *splits[s], max_length, limit) for s in names)
    return Task(name, ClassificationHead(hidden_size, len(splits["labels"]), dropout), train, dev=dev, test=test,
                num_labels=len(splits["labels"]), metric=metric)


def _text_pairs(what: str, data) -> tuple[list[str], list]:
    """(texts, labels) given in memory, checked: as many labels as texts, at least one, texts strings, labels all
    strings or all integers."""
    texts, labels = (list(x) for x in data)
    if len(texts) != len(labels):
        raise DataError(f"{what}: {len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise DataError(f"{what} has no examples")
    bad = [x for x in labels if not _is_label(x)]
    if bad or len({isinstance(x, str) for x in labels}) > 1:
        raise DataError(f"{what}: labels must be all non-empty strings or all integers"
                        + (f", not {bad[0]!r}" if bad else ""))
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{what}: every text must be a string")
    return texts, [x if isinstance(x, str) else int(x) for x in labels]


def classification_task(name: str, data, tokenizer, hidden_size: int, max_length: int = 512, dropout: float = 0.1,
                        limit: int | None = None) -> Task:
    """An auxiliary classification task T_i on text, with its own new head phi^i (ClassificationHead). `data` is a
    JSONL file ({"text", "label"} per line), a folder holding train.jsonl, or a pair (texts, labels). Labels are
    strings or integers, numbered in sorted order (as end_task does). `limit` keeps a fixed random subset of at most
    that many examples."""
    if isinstance(data, str):
        texts, labels, _ = read_jsonl(os.path.join(data, "train.jsonl") if os.path.isdir(data) else data)
    else:
        texts, labels = _text_pairs(f"classification task '{name}'", data)
    check_tokenizer(tokenizer, f"classification task '{name}'")
    split = _numbered({"train": (texts, labels)})
    return Task(name, ClassificationHead(hidden_size, len(split["labels"]), dropout),
                _text_data(tokenizer, *split["train"], max_length, limit), num_labels=len(split["labels"]))


def mlm_task(name: str, texts_or_path, tokenizer, body: nn.Module, mlm_head: MLMHead, max_length: int = 512,
             limit: int | None = None, head_init: str = "checkpoint") -> Task:
    """An auxiliary MLM task T_i on a corpus (a path to a line file, or a list of texts), with its own head phi^i.
    `limit` keeps a fixed random subset of at most that many lines. head_init: see below and new_mlm_head."""
    check_tokenizer(tokenizer, f"MLM task '{name}'", first_position=False)
    texts = read_lines(texts_or_path) if isinstance(texts_or_path, str) else list(texts_or_path)
    if not texts:
        raise DataError(f"auxiliary corpus '{name}' is empty")
    # Departure from Algorithm 1 ("randomly initialize phi^i"): by default phi^i starts from the checkpoint's LM head,
    # the better start when the checkpoint has one: the MLM loss starts where pre-training left it, not at chance, so
    # the first gradients into the shared body come through a fitted head. head_init="random" follows Algorithm 1.
    return Task(name, new_mlm_head(mlm_head, body, head_init), _text_data(tokenizer, texts, None, max_length, limit),
                masking=Masking.for_tokenizer(tokenizer))
