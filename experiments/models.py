"""Models from the Hugging Face Hub or a local folder: (body, MLM head, tokenizer) with clear errors for a missing,
cut-off or incomplete checkpoint and for no network, and the LM head fitted for a checkpoint that has none."""
from __future__ import annotations

import itertools
import os
import pickle
import warnings

import numpy as np
import torch
import torch.nn as nn

from tartan import MLMHead, Task, batches, head_parameters, split_masked_lm, to_device


def from_pretrained(name_or_path: str):
    """(body, MLM head, tokenizer) from a hub id or a local directory, with fp32 weights whatever dtype it was saved in
    (mixed precision is autocast's). The MLM head is the checkpoint's pretrained LM head when it has one; when it has
    none (e.g. a sentence-embedding checkpoint) transformers initialises it newly, with the decoder tied to the input
    embeddings, from torch's global generator: seed it first so that the new head is the same in every run. Returns
    also the names of newly initialised weights, which one warning names (transformers' load report is not shown)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name_or_path = os.path.expanduser(name_or_path)
    local = os.path.isdir(name_or_path)
    if not local and os.path.exists(name_or_path):
        raise FileNotFoundError(f"model '{name_or_path}': a file, not a model directory")
    if not local and (name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path
                      or name_or_path.count("/") > 1 or os.path.isdir(name_or_path.split("/")[0])):
        raise FileNotFoundError(f"model '{name_or_path}': no such local directory")  # its folder is here: not a Hub id
    if local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"model '{name_or_path}': the directory has no config.json (not a model saved by "
                                f"transformers' save_pretrained)")
    offline = None if local else hub_unreachable()  # a Hub id with no network: the local cache only, at once
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing weights: one warning below says it
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=bool(offline))
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True,
                                                           local_files_only=bool(offline))
    # a weights file cut off or corrupt: safetensors' own error, or torch's unpickling one for a .bin
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        where = ("from its local directory" if local else
                 f"from the Hugging Face cache, and the Hub cannot be reached ({offline})" if offline else
                 "from the Hugging Face Hub (it is not a local directory)")
        raise FileNotFoundError(f"model '{name_or_path}' could not be loaded {where}"
                                + ("" if offline else f": {e}")) from None  # offline: the library's own text repeats it
    finally:
        hf_logging.set_verbosity(verbosity)
    # a folder without its tokenizer files loads an empty tokenizer (its special tokens alone), which would turn
    # every word into [UNK] without a word said
    if len(tokenizer) < getattr(model.config, "vocab_size", 0) // 2:
        raise FileNotFoundError(f"model '{name_or_path}': its tokenizer has {len(tokenizer)} tokens for the model's "
                                f"{model.config.vocab_size}: the tokenizer files are missing or are another model's")
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()  # a checkpoint saved in half precision trains with fp32 weights; bf16 comes from autocast
    body, mlm_head = split_masked_lm(model)
    missing = sorted(info["missing_keys"])
    if missing:
        warnings.warn(f"model '{name_or_path}' has no weights for {len(missing)} tensors (e.g. {missing[0]}): they are "
                      f"newly initialised, from torch's global generator")
    return body, mlm_head, tokenizer, missing


def hub_unreachable(timeout: float = 10.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, else None: one connection tried before a download, since with no
    network the library retries each file with back-off. Behind a proxy the Hub is taken to be reachable."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    if url.scheme in urllib.request.getproxies():  # the proxy, not this machine, connects
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e}"
    return None


def warm_mlm_head(body: nn.Module, head: MLMHead, task: "Task", steps: int, lr: float = 1e-3,
                  batch_size: int = 16, seed: int = 0, eval_batches: int = 8) -> dict:
    """Fits a newly initialised MLM head in place, with the body frozen, on an MLM task's text: the start that a
    checkpoint without an LM head lacks (the paper's RoBERTa has one), so that TAPT, MT and META all begin from one
    fitted head rather than each pushing a random head's gradient into the body. Only the head's own parameters train
    (the tied decoder is the body's embedding, left alone). Returns the mean MLM loss on `eval_batches` fixed masked
    batches before and after."""
    device, modes = next(body.parameters()).device, body.training
    opt = torch.optim.AdamW(head_parameters(head, body), lr=lr, weight_decay=0.01)
    fixed = list(itertools.islice(batches(task, batch_size, torch.Generator().manual_seed(seed + 1)), eval_batches))
    stream = batches(task, batch_size, torch.Generator().manual_seed(seed))
    body.eval()  # frozen: no dropout in the features the head learns from

    def loss_of(inputs, labels):
        inputs, labels = to_device(inputs, labels, device)
        with torch.no_grad():
            features = body(**inputs)
        return head(features, labels)[1]

    def held_out():
        with torch.no_grad():
            return float(np.mean([loss_of(*b).item() for b in fixed]))
    before = held_out()
    for _ in range(steps):
        loss = loss_of(*next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    body.train(modes)
    return {"loss_before": before, "loss_after": held_out(), "steps": steps}
