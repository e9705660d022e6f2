"""Tests for tartan.py (and reproduce.py): offline, CPU, tiny models built from configs, data made here."""
import itertools
import json
import math
import os
import platform
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import tartan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

WORDS = [f"w{i}" for i in range(30)]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: a word-level tokenizer, a tiny BERT, a three-class task whose label is the word group of a sentence


def make_tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def make_model(tok, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    return tartan.split_masked_lm(transformers.AutoModelForMaskedLM.from_config(cfg))


def sentence(rng, label, n=8):
    return " ".join(rng.choice(WORDS[label * 10:(label + 1) * 10]) for _ in range(rng.randint(3, n)))


def write_task(folder, sizes=(48, 24, 24), seed=0):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in zip(("train", "dev", "test"), sizes):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                y = i % 3
                f.write(json.dumps({"text": sentence(rng, y), "label": f"c{y}", "metadata": {}}) + "\n")
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.write("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(48)) + "\n")
    return folder


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture()
def task_dir(tmp_path):
    return write_task(str(tmp_path / "task"))


def build(tok, task_dir, n_aux=1, dropout=0.1, seed=0):
    body, mlm = make_model(tok, dropout, seed)
    end = tartan.end_task("toy", task_dir, tok, body.hidden_size, max_length=32, dropout=dropout)
    aux = [tartan.mlm_task(f"aux{i}", os.path.join(task_dir, "train.txt"), tok, body, mlm, 32) for i in range(n_aux)]
    return body, end, aux


SMALL = dict(batch_size=8, aux_batch_size=8, grad_accum=1, max_steps=12, eval_every=4, lr=1e-3, head_lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# 1. data and bad input


def test_read_end_task_label_vocabulary_from_train(task_dir):
    data = tartan.read_end_task(task_dir)
    assert data["labels"] == ["c0", "c1", "c2"]
    assert len(data["train"][0]) == 48 and set(data["dev"][1]) == {0, 1, 2}


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "line 2: malformed JSON"),
    ('{"text": "a", "label": "x"}\n\n{"label": "x"}\n', "line 3: missing field 'text'"),
    ('{"text": "a"}\n', "line 1: missing field 'label'"),
    ('["a", "x"]\n', "line 1: expected a JSON object"),
    ("", "empty file"),
    ("\n\n", "empty file"),
    ('{"text": "a", "label": null}\n', "line 1: 'label' must be a string or an integer"),
    ('{"text": "a", "label": "x"}\n{"text": "\xff", "label": "x"}\n', "line 2: not UTF-8"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(tartan.DataError) as e:
        tartan.read_jsonl(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_unseen_dev_label_is_an_error(task_dir):
    with open(os.path.join(task_dir, "dev.jsonl"), "a") as f:
        f.write(json.dumps({"text": "w1 w2", "label": "never-in-train"}) + "\n")
    with pytest.raises(tartan.DataError, match=r"dev\.jsonl, line 25: label 'never-in-train' never appears"):
        tartan.read_end_task(task_dir)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(tartan.DataError, match="no such file"):
        tartan.read_end_task(str(tmp_path))
    (tmp_path / "aux.txt").write_text("\n  \n")
    with pytest.raises(tartan.DataError, match="aux.txt: empty file"):
        tartan.read_lines(str(tmp_path / "aux.txt"))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        tartan.from_pretrained(str(tmp_path / "not-there"))
    with pytest.raises(FileNotFoundError, match="could not be loaded from its local directory"):
        tartan.from_pretrained(str(tmp_path))  # exists but holds no model


def test_from_pretrained_local_directory_ties_new_mlm_head(tmp_path, tok):
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path)  # a checkpoint without MLM-head weights
    tok.save_pretrained(tmp_path)
    body, mlm, tok2, missing = tartan.from_pretrained(str(tmp_path))
    assert any("predictions" in k for k in missing)  # the head was newly initialised ...
    emb = body.encoder.get_input_embeddings().weight
    assert mlm.lm_head.predictions.decoder.weight is emb  # ... with the decoder tied to the input embeddings
    assert len(tok2) == len(tok)


def test_padding_does_not_change_predictions(tok, task_dir):
    body, end, _ = build(tok, task_dir)
    body.eval(), end.head.eval()
    short, long = end.dev.ids[0], max(end.dev.ids, key=len)
    assert len(long) > len(short)
    data = tartan.TextData([short, long], [0, 0], tok.pad_token_id)
    with torch.no_grad():
        alone = end.head(body(**data.batch([0])[0]))[0]
        padded = end.head(body(**data.batch([0, 1])[0]))[0][:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_evaluate_builds_no_graph_and_restores_train_mode(tok, task_dir):
    body, end, _ = build(tok, task_dir)
    body.train(), end.head.train()
    seen = []
    body.register_forward_hook(lambda m, i, out: seen.append((out.requires_grad, m.training)))
    metrics = tartan.evaluate(body, end.head, end.dev, batch_size=4)
    assert seen and all(s == (False, False) for s in seen)  # no autograd graph, dropout off
    assert body.training and end.head.training
    assert set(metrics) >= {"macro_f1", "micro_f1", "loss"} and 0 <= metrics["macro_f1"] <= 1


# ---------------------------------------------------------------------------------------------------------------------
# 2. heads and parameters


def test_mlm_logits_only_at_masked_positions_and_classifier_never_calls_decoder(tok, task_dir):
    body, end, aux = build(tok, task_dir)
    decoder = aux[0].head.lm_head.predictions.decoder
    rows = []
    decoder.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    inputs, labels = next(tartan.batches(aux[0], 8, torch.Generator().manual_seed(0)))
    logits, loss = aux[0].head(body(**inputs), labels)
    assert logits.shape == ((labels != -100).sum().item(), len(tok)) and rows == [logits.shape[0]]
    tartan.evaluate(body, end.head, end.dev)
    assert rows == [logits.shape[0]]  # the classifier path computed no vocabulary logits
    assert torch.isfinite(loss)


def test_each_aux_task_has_its_own_head_but_the_tied_decoder_stays_the_body_embedding(tok, task_dir):
    body, end, aux = build(tok, task_dir, n_aux=2)
    emb = body.encoder.get_input_embeddings().weight
    d0, d1 = (a.head.lm_head.predictions.decoder for a in aux)
    assert d0.weight is emb and d1.weight is emb
    assert aux[0].head.lm_head.predictions.transform.dense.weight is not aux[1].head.lm_head.predictions.transform.dense.weight
    head_ids = {id(p) for p in tartan.head_parameters(aux[0].head, body)}
    assert id(emb) not in head_ids and len(head_ids) > 0


def test_classification_head_shapes():
    head = tartan.ClassificationHead(16, 5)
    logits, loss = head(torch.randn(4, 7, 16), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 5) and loss.dim() == 0
    logits, loss = head(torch.randn(4, 16))  # pooled features of a non-transformer body
    assert logits.shape == (4, 5) and loss is None


# ---------------------------------------------------------------------------------------------------------------------
# 3. masking


def test_masking_rates_and_special_tokens():
    masking = tartan.Masking(mask_id=4, vocab_size=1000, special_ids=(0, 1, 2, 3, 4))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 128), generator=g)
    ids[:, 0], ids[:, 60] = 2, 3  # CLS, SEP
    attention = torch.ones_like(ids)
    attention[:, 100:] = 0
    ids[:, 100:] = 0  # padding
    corrupted, labels = tartan.mask_tokens(ids, attention, masking, torch.Generator().manual_seed(1))
    chosen = labels != -100
    eligible = (attention == 1) & ~torch.isin(ids, torch.tensor([0, 1, 2, 3, 4]))
    assert not chosen[~eligible].any()  # special and pad tokens never chosen
    assert (corrupted[~chosen] == ids[~chosen]).all()  # nothing changes outside the chosen positions
    assert (labels[chosen] == ids[chosen]).all()
    n = chosen.sum().item()
    assert abs(n / eligible.sum().item() - 0.15) < 0.005
    masked = (corrupted[chosen] == 4).float().mean().item()
    unchanged = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.01 and abs(unchanged - 0.1 - 0.001) < 0.01  # random may hit the same id (p=1e-3)
    assert abs(1 - masked - unchanged - 0.1) < 0.01


def test_masking_is_driven_by_the_generator():
    masking = tartan.Masking(mask_id=4, vocab_size=50, special_ids=(0, 1, 2, 3, 4))
    ids = torch.randint(5, 50, (8, 20))
    att = torch.ones_like(ids)
    a = tartan.mask_tokens(ids, att, masking, torch.Generator().manual_seed(3))
    b = tartan.mask_tokens(ids, att, masking, torch.Generator().manual_seed(3))
    c = tartan.mask_tokens(ids, att, masking, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[1], c[1])


# ---------------------------------------------------------------------------------------------------------------------
# 5. MT-TARTAN: the combined backward is the weighted sum of per-task gradients (Eq. 3)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_mt_step_gradient_equals_weighted_sum_of_task_gradients(tok, task_dir, grad_accum):
    body, end, aux = build(tok, task_dir, n_aux=2, dropout=0.0)
    end.head = tartan.ClassificationHead(body.hidden_size, 3, dropout=0.0)
    tasks, w = [end] + aux, (0.5, 0.3, 0.2)
    cfg = tartan.TrainConfig(batch_size=8, aux_batch_size=8, grad_accum=grad_accum, weights=w)
    streams = lambda: [tartan.batches(t, 8, torch.Generator().manual_seed(k)) for k, t in enumerate(tasks)]  # noqa
    tokens = dict.fromkeys([t.name for t in tasks], 0)
    tartan.multitask_step(body, tasks, streams(), {"w": torch.tensor(w)}, cfg, torch.autocast("cpu", enabled=False),
                          tokens)
    params = list(body.parameters())
    combined = [p.grad.clone() for p in params]
    expected = [torch.zeros_like(p) for p in params]
    for k, (t, s) in enumerate(zip(tasks, streams())):
        for _ in range(grad_accum):  # each task's micro-batches come from its own stream, in order: their mean
            inputs, labels = next(s)
            _, loss = t.head(body(**inputs), labels)
            for e, g in zip(expected, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    e += w[k] / grad_accum * g
    for c, e in zip(combined, expected):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-4)
    assert all(v > 0 for v in tokens.values())


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clip_grad_norm_matches_torch_and_leaves_small_gradients_untouched(scale):
    gen = torch.Generator().manual_seed(0)
    ours = [nn.Parameter(torch.zeros(n)) for n in (5, 7, 3)] + [nn.Parameter(torch.zeros(2))]  # last: no grad
    ref = [nn.Parameter(torch.zeros_like(p)) for p in ours]
    for a, b in zip(ours[:3], ref[:3]):
        a.grad = torch.randn(a.shape, generator=gen) * scale
        b.grad = a.grad.clone()
    before = [p.grad for p in ours[:3]]
    norm = tartan.clip_grad_norm(ours, 1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    for a, b in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[3].grad is None
    if scale < 1:  # under the threshold: the very same tensors, not rescaled copies
        assert all(torch.equal(a.grad, g) for a, g in zip(ours[:3], before)) and float(norm) < 1
    else:
        assert math.isclose(float(torch.cat([p.grad for p in ours[:3]]).norm()), 1.0, rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 6. META-TARTAN


def test_weight_update_against_hand_built_gradient_geometry():
    g_meta = torch.tensor([1.0, 0.0, 0.0, 0.0])
    G = torch.stack([torch.tensor([0.6, 0.8, 0.0, 0.0]),    # end-task: cos 0.6
                     torch.tensor([2.0, 0.0, 0.0, 0.0]),    # aligned auxiliary: cos 1
                     torch.tensor([-3.0, 0.0, 0.0, 0.0]),   # opposed auxiliary: cos -1
                     torch.tensor([0.0, 0.0, 5.0, 0.0])])   # orthogonal: cos 0
    w0 = torch.full((4,), 0.25)
    w, alpha, cos = tartan.update_task_weights(w0, G, g_meta, eta=0.1)
    torch.testing.assert_close(cos, torch.tensor([0.6, 1.0, -1.0, 0.0]))
    torch.testing.assert_close(w - w0, 0.1 * torch.tensor([0.6, 1.0, -1.0, 0.0]))
    torch.testing.assert_close(alpha, torch.softmax(w, 0))
    assert alpha[1] > alpha[0] > alpha[3] > alpha[2]  # aligned gains, opposed loses, end-task follows its cosine
    # the update uses cosines, not dot products: scaling a gradient changes nothing
    w2, _, _ = tartan.update_task_weights(w0, G * torch.tensor([[10.0], [0.1], [7.0], [3.0]]), g_meta * 5, eta=0.1)
    torch.testing.assert_close(w2, w)
    # a zero gradient gives cosine 0 (the epsilon), not NaN
    _, _, c0 = tartan.update_task_weights(w0, torch.zeros(1, 4), g_meta, eta=0.1)
    assert c0.item() == 0.0


@pytest.mark.parametrize("same_head", [True, False])
def test_meta_step_matches_an_independent_computation(tok, task_dir, same_head):
    """One META step against gradients computed separately: cosines with this step's gradients (Alg. 1 order), the
    softmax of the updated weights, body gradient sum_k alpha_k g_k, head gradients unweighted."""
    body, end, aux = build(tok, task_dir, n_aux=2, dropout=0.0)
    end.head = tartan.ClassificationHead(body.hidden_size, 3, dropout=0.0)
    tasks = [end] + aux
    cfg = tartan.MetaConfig(batch_size=8, aux_batch_size=8, grad_accum=1, meta_batch_size=8, same_head=same_head,
                            meta_lr=0.1)
    streams = lambda: [tartan.batches(t, 8, torch.Generator().manual_seed(k)) for k, t in enumerate(tasks)]  # noqa
    w0 = torch.tensor([0.2, -0.1, 0.3])
    state = {"w": w0.clone()}
    torch.manual_seed(5)  # phi* initialisation
    info = tartan.meta_step(body, tasks, streams(), state, cfg, torch.autocast("cpu", enabled=False),
                            dict.fromkeys([t.name for t in tasks], 0))
    params = list(body.parameters())
    got_body = torch.cat([p.grad.reshape(-1) for p in params])
    got_heads = [[p.grad.clone() for p in tartan.head_parameters(t.head, body)] for t in tasks]

    flat = lambda gs: torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(params, gs)])  # noqa
    G, head_grads = [], []
    for k, (t, s) in enumerate(zip(tasks, streams())):
        inputs, labels = next(s)
        features = body(**inputs)
        _, loss = t.head(features, labels)
        hp = tartan.head_parameters(t.head, body)
        grads = torch.autograd.grad(loss, params + hp, allow_unused=True)
        G.append(flat(grads[:len(params)]))
        head_grads.append(grads[len(params):])
        if k == 0:
            meta_x, meta_y = features[:, 0].detach(), labels
    torch.manual_seed(5)
    head_star = end.head if same_head else tartan.estimate_meta_head(meta_x, meta_y, 3, cfg)
    val_inputs, val_labels = next(tartan.batches(tartan.Task("v", end.head, end.dev), 8,
                                                 torch.Generator().manual_seed(1000)))
    _, val_loss = head_star(body(**val_inputs), val_labels)
    g_meta = flat(torch.autograd.grad(val_loss, params, allow_unused=True))
    G = torch.stack(G)
    cos = torch.stack([torch.dot(g, g_meta) / (g.norm() * g_meta.norm() + 1e-8) for g in G])
    alpha = torch.softmax(w0 + 0.1 * cos, 0)
    torch.testing.assert_close(torch.tensor(info["cosines"]), cos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(info["alpha"]), alpha, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_body, alpha @ G, atol=1e-6, rtol=1e-4)
    for got, want in zip(got_heads, head_grads):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _meta_run(tok, folder, same_head, seed, steps=60):
    body, end, aux = build(tok, folder, n_aux=1, dropout=0.0, seed=seed)
    cfg = tartan.MetaConfig(batch_size=32, aux_batch_size=32, meta_batch_size=32, grad_accum=1, lr=3e-4,
                            max_steps=steps, eval_every=steps, patience=99, same_head=same_head, meta_lr=0.1,
                            final_finetune=None)
    torch.manual_seed(seed)
    out = tartan.train_meta(body, end, aux, cfg)
    return out["final_weights"]["toy"], out["history"][-1]["cosines"]  # cosines: mean over the steps


@pytest.mark.parametrize("seed", [0, 1])
def test_same_head_rails_the_end_task_weight_and_the_meta_head_does_not(tok, tmp_path, seed):
    """Sec. 3.3 / Fig. 3: through phi' the training and validation gradients share a head, so the end-task cosine
    is biased up and w* rails towards 1; through a separately fitted phi* it is not."""
    folder = write_task(str(tmp_path / "task"), sizes=(192, 96, 24))
    alpha_same, cos_same = _meta_run(tok, folder, True, seed)
    alpha_sep, cos_sep = _meta_run(tok, folder, False, seed)
    assert cos_same["toy"] > cos_same["aux0"] + 0.08 and cos_same["toy"] > cos_sep["toy"] + 0.08
    assert alpha_same > 0.62  # from 0.5 in 60 steps
    assert abs(alpha_sep - 0.5) < 0.05
    assert alpha_same - 0.5 > 3 * abs(alpha_sep - 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# end to end: every mode returns metrics and history


@pytest.mark.parametrize("mode, n_aux, extra", [
    ("finetune", 0, {}), ("pretrain", 1, {}), ("pretrain", 2, {}),  # RoBERTa column, TAPT, DAPT+TAPT
    ("mt", 2, {}), ("meta", 2, {}), ("meta", 2, {"same_head": True}),
])
def test_every_mode_end_to_end(tok, task_dir, mode, n_aux, extra):
    body, end, aux = build(tok, task_dir, n_aux=n_aux)
    ft = tartan.FinetuneConfig(batch_size=8, epochs=2, lr=1e-3, head_lr=1e-3)
    if mode in ("finetune", "pretrain"):
        cfg = ft
    else:
        cfg = (tartan.MetaConfig if mode == "meta" else tartan.TrainConfig)(**SMALL, final_finetune=ft, **extra)
    torch.manual_seed(0)
    pre = [tartan.PretrainConfig(max_steps=3, aux_batch_size=8, grad_accum=1)] * n_aux
    out = tartan.run_end_task(body, end, aux, mode, cfg, pre)
    for split in ("dev", "test"):
        assert 0 <= out[split]["macro_f1"] <= 1 and 0 <= out[split]["micro_f1"] <= 1
        assert out[split]["n"] == 24
    assert out["metric"] == "macro_f1" and out["history"]
    stages = [s["stage"] for s in out["stages"]]
    if mode == "pretrain":
        assert stages == [f"pretrain:aux{i}" for i in range(n_aux)] + ["finetune"]
    elif mode in ("mt", "meta"):
        assert stages == [mode, "final_finetune"]
        h = out["history"][-1]
        assert set(h["weights"]) == {"toy", "aux0", "aux1"} and abs(sum(h["weights"].values()) - 1) < 1e-6
        assert (h["cosines"] is not None) == (mode == "meta")
        # the selected model is the best-dev one: the reported dev score is the best seen (or the kept fine-tune)
        best = max(x["dev"]["macro_f1"] for x in out["history"])
        assert out["dev"]["macro_f1"] >= best - 1e-9
    if mode == "mt":
        assert out["history"][-1]["weights"] == {"toy": 1 / 3, "aux0": 1 / 3, "aux1": 1 / 3}


def test_run_end_task_defaults_and_stage_configs(tok, task_dir):
    body, end, aux = build(tok, task_dir, n_aux=2)
    with pytest.raises(ValueError, match="1 pre-training configs for 2 auxiliary tasks"):
        tartan.run_end_task(body, end, aux, "pretrain", None, [tartan.PretrainConfig()])
    with pytest.raises(TypeError, match="needs a MetaConfig"):
        tartan.train_meta(body, end, aux, tartan.TrainConfig())
    with pytest.raises(ValueError, match="unknown mode"):
        tartan.run_end_task(body, end, aux, "tapt")
    assert tartan.TrainConfig().final_finetune.lr == 5e-6 and tartan.FinetuneConfig().final_finetune is None


def test_dapt_then_tapt_continues_the_lm_head(tok, task_dir):
    body, end, aux = build(tok, task_dir, n_aux=2)
    pre = [tartan.PretrainConfig(max_steps=2, aux_batch_size=8, grad_accum=1)] * 2
    seen = []
    orig = tartan.pretrain

    def spy(b, tasks, cfg):
        seen.append({k: v.clone() for k, v in tasks[0].head.state_dict().items()})
        out = orig(b, tasks, cfg)
        seen.append({k: v.clone() for k, v in tasks[0].head.state_dict().items()})
        return out
    tartan.pretrain = spy
    try:
        tartan.run_end_task(body, end, aux, "pretrain", tartan.FinetuneConfig(batch_size=8, epochs=1), pre)
    finally:
        tartan.pretrain = orig
    after_dapt, before_tapt = seen[1], seen[2]
    assert all(torch.equal(after_dapt[k], before_tapt[k]) for k in after_dapt)


def test_finetuning_learns_the_toy_task(tok, task_dir):
    body, end, _ = build(tok, task_dir)
    torch.manual_seed(0)
    out = tartan.run_end_task(body, end, [], "finetune",
                              tartan.FinetuneConfig(batch_size=8, epochs=15, lr=1e-3, head_lr=1e-3, patience=15))
    assert out["test"]["micro_f1"] >= 0.9  # chance is 1/3


def test_early_stopping_restores_the_best_dev_model(tok, task_dir):
    body, end, aux = build(tok, task_dir)
    cfg = tartan.TrainConfig(**{**SMALL, "max_steps": 400, "eval_every": 2, "patience": 3}, final_finetune=None)
    torch.manual_seed(0)
    out = tartan.train_multitask(body, end, aux, cfg)
    scores = [h["dev"]["macro_f1"] for h in out["history"]]
    assert out["steps"] < 400  # stopped early
    assert scores.index(max(scores)) == len(scores) - 1 - 3  # the last 3 evaluations brought no new best
    assert tartan.evaluate(body, end.head, end.dev)["macro_f1"] == pytest.approx(max(scores))


def test_same_seed_gives_identical_runs(tok, task_dir):
    def run():
        body, end, aux = build(tok, task_dir, n_aux=1)
        torch.manual_seed(0)
        return tartan.run_end_task(body, end, aux, "meta", tartan.MetaConfig(**SMALL, final_finetune=None))
    a, b = run(), run()
    strip = lambda h: [{k: v for k, v in x.items() if k != "seconds"} for x in h]  # noqa: E731
    assert a["dev"] == b["dev"] and a["test"] == b["test"] and strip(a["history"]) == strip(b["history"])


def test_meta_validation_pass_leaves_batchnorm_statistics_alone():
    """The validation forward of g_meta runs in train mode; dev batches must not leak into BatchNorm statistics."""
    torch.manual_seed(0)

    class BNBody(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.lin(x)))

    g = torch.Generator().manual_seed(0)
    train = tartan.TensorData(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    dev = tartan.TensorData(torch.randn(16, 4, generator=g) + 5.0, torch.randint(0, 2, (16,), generator=g))
    body = BNBody()
    end = tartan.Task("e", tartan.ClassificationHead(8, 2), train, dev=dev, num_labels=2)
    cfg = tartan.MetaConfig(batch_size=16, meta_batch_size=16, grad_accum=1)
    stream = [tartan.batches(end, 16, torch.Generator().manual_seed(0))]
    tartan.meta_step(body, [end], stream, {"w": torch.ones(1)}, cfg, torch.autocast("cpu", enabled=False), {"e": 0})
    expected = BNBody()
    expected.load_state_dict({k: v for k, v in body.state_dict().items() if "running" not in k and "num_b" not in k},
                             strict=False)
    expected(next(tartan.batches(end, 16, torch.Generator().manual_seed(0)))[0]["x"])  # the training forward only
    torch.testing.assert_close(body.bn.running_mean, expected.bn.running_mean)
    assert body.bn.num_batches_tracked.item() == 1


def test_plain_torch_module_body():
    """A non-transformer body (the paper's vision experiment uses a WideResNet) through the same loops."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU())

    class XBody(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = body

        def forward(self, x):
            return self.net(x)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, 2, 2, generator=g), torch.randint(0, 2, (60,), generator=g)
    x[y == 1] += 2.0
    data = tartan.TensorData(x, y)
    end = tartan.Task("img", tartan.ClassificationHead(16, 2), data, dev=data, test=data, num_labels=2,
                      metric="micro_f1")
    aux = [tartan.Task("aux", tartan.ClassificationHead(16, 3), tartan.TensorData(x, torch.randint(0, 3, (60,))))]
    cfg = tartan.MetaConfig(**{**SMALL, "max_steps": 60, "eval_every": 10, "lr": 1e-2, "head_lr": 1e-2}, final_finetune=None)
    out = tartan.run_end_task(XBody(), end, aux, "meta", cfg)
    assert out["test"]["micro_f1"] > 0.8 and out["history"][-1]["cosines"] is not None


# ---------------------------------------------------------------------------------------------------------------------
# 7. evaluation and 8. significance


def test_f1_scores_against_hand_computation():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    s = tartan.f1_scores(y_true, y_pred)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3) and s["micro_f1"] == pytest.approx(4 / 6)


def _brute_force(a, b):
    pooled, n = list(a) + list(b), len(a)
    obs = np.mean(a) - np.mean(b)
    diffs = []
    for pick in itertools.combinations(range(len(pooled)), n):
        xa = [pooled[i] for i in pick]
        xb = [pooled[i] for i in range(len(pooled)) if i not in pick]
        diffs.append(np.mean(xa) - np.mean(xb))
    diffs = np.array(diffs)
    return (np.mean(np.abs(diffs) >= abs(obs) - 1e-12), np.mean(diffs >= obs - 1e-12), np.mean(diffs <= obs + 1e-12))


@pytest.mark.parametrize("a, b", [([70.1, 68.2, 72.5], [66.0, 67.3, 65.9]), ([1, 2, 3, 4], [2, 3, 4, 5, 6]),
                                  ([5.0, 5.0, 6.0], [5.0, 6.0, 6.0, 7.0])])
def test_permutation_test_equals_exact_enumeration(a, b):
    r = tartan.permutation_test(a, b)
    assert r["exact"] and r["n_permutations"] == math.comb(len(a) + len(b), len(a))
    two, greater, less = _brute_force(a, b)
    assert (r["p_two_sided"], r["p_greater"], r["p_less"]) == pytest.approx((two, greater, less))
    # fewer permutations than splits: Monte Carlo, which approaches the exact value
    mc = tartan.permutation_test(a, b, n_permutations=r["n_permutations"] - 1, seed=1)
    assert not mc["exact"]
    assert mc["n_permutations"] == r["n_permutations"] - 1


def test_permutation_test_monte_carlo_and_known_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(80, 1, 10), rng.normal(75, 1, 10)  # 184756 splits: Monte Carlo with 10,000
    r = tartan.permutation_test(a, b, seed=0)
    assert not r["exact"] and r["n_permutations"] == 10_000
    assert r["p_two_sided"] < 1e-3 and r["p_greater"] < 1e-3 and r["p_less"] > 0.99
    assert r == tartan.permutation_test(a, b, seed=0)  # seeded
    same = tartan.permutation_test(rng.normal(0, 1, 10), rng.normal(0, 1, 10), seed=0)
    assert same["p_two_sided"] > 0.05
    # on a small problem (70 splits) Monte Carlo sampling of 5,000 splits approaches the exact p
    x, y = [3.1, 2.5, 4.0, 3.3], [2.0, 2.2, 3.0, 2.6]
    exact = tartan.permutation_test(x, y)
    assert exact["exact"] and exact["n_permutations"] == 70
    mc = tartan.permutation_test(x, y, n_permutations=69, seed=0)
    assert not mc["exact"]
    draws = np.mean([tartan.permutation_test(x, y, n_permutations=69, seed=s)["p_two_sided"] for s in range(60)])
    assert abs(draws - exact["p_two_sided"]) < 0.02


def test_mean_std_uses_sample_std():
    assert tartan.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert tartan.mean_std([1.0, 2.0, 3.0], ddof=0)[1] == pytest.approx(math.sqrt(2 / 3))


# ---------------------------------------------------------------------------------------------------------------------
# reproduce.py (issue 3)

import functools  # noqa: E402
import importlib.util  # noqa: E402
import hashlib  # noqa: E402
import http.server  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import threading  # noqa: E402

import reproduce  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(reproduce.__file__)), "reproduce.py")


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny BERT masked-LM saved as a local checkpoint, and a tiny ACL-ARC-shaped data folder


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


def common(model_dir, data_dir, out, *extra):
    return ["--model", model_dir, "--data-dir", data_dir, "--out", out, "--device", "cpu", "--quick",
            "--no-progress", *extra]


def results_in(out):
    return sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs
                  if f.endswith(".json"))


def leftovers(folder):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith((".tmp", ".part"))]


# ---------------------------------------------------------------------------------------------------------------------
# smoke runs in a subprocess: one mode, then one table (which reuses the mode's runs)


def test_smoke_one_mode_then_table_subprocess(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, SCRIPT, *a], capture_output=True, text=True, env=env,  # noqa
                                    timeout=300)
    p = run("--task", "aclarc", "--mode", "meta", "--seeds", "0-1", *common(model_dir, data_dir, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert results_in(out) == ["aclarc/meta__tapt__seed0.json", "aclarc/meta__tapt__seed1.json"]
    for seed in (0, 1):
        rec = json.load(open(os.path.join(out, "aclarc", f"meta__tapt__seed{seed}.json")))
        assert rec["complete"] and rec["key"] == {"task": "aclarc", "mode": "meta", "aux": "tapt", "seed": seed}
        assert rec["config"]["train"]["max_steps"] == 4 and rec["config"]["train"]["seed"] == seed  # --quick budget
        assert rec["config"]["model"] == model_dir and rec["config"]["max_length"] == 64
        for split in ("dev", "test"):
            assert 0 <= rec[split]["macro_f1"] <= 1 and 0 <= rec[split]["micro_f1"] <= 1 and rec[split]["n"] == 24
        assert rec["headline"] == {"metric": "macro_f1", "dev": rec["dev"]["macro_f1"],
                                   "test": rec["test"]["macro_f1"]}
        h = rec["history"][-1]
        assert set(h["weights"]) == {"aclarc", "tapt"} and abs(sum(h["weights"].values()) - 1) < 1e-6
        assert h["cosines"] is not None and rec["steps"] >= 4 and rec["wall_seconds"] > 0
        assert rec["tokens"]["aclarc"] > 0 and rec["tokens"]["tapt"] > 0
        assert rec["device"].startswith("cpu") and rec["versions"]["torch"] == torch.__version__
        assert set(rec["data_files"]) == {f"citation_intent/{f}" for f in
                                          ("train.jsonl", "dev.jsonl", "test.jsonl", "train.txt")}
    assert "aclarc meta (tapt): test macro_f1 x100" in p.stdout

    p = run("--table", "1", "--task", "aclarc", "--seeds", "0-1", *common(model_dir, data_dir, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 of 8 runs already complete" in p.stdout  # the meta runs above are reused, not re-run
    assert len(results_in(out)) == 8 and not leftovers(out)
    table = open(os.path.join(out, "table1.md")).read()
    assert table in p.stdout
    assert "| Domain | Task | RoBERTa | TAPT | MT-TARTAN | p vs TAPT | META-TARTAN | p vs TAPT |" in table
    assert "[70.48 ± 4.42]" in table and "[0.040]" in table  # the paper's MT-TARTAN cell and its p-value
    # every cell is the mean and sample std of its per-seed test scores, and the p-value is the permutation test's
    score = lambda mode, aux: [100 * json.load(open(os.path.join(out, "aclarc", f"{mode}__{aux}__seed{s}.json")))  # noqa
                               ["headline"]["test"] for s in (0, 1)]
    meta, tapt = score("meta", "tapt"), score("tapt", "tapt")
    assert reproduce.fmt(tartan.mean_std(meta)) + " [70.08" in table
    p_meta = tartan.permutation_test(meta, tapt, 10_000, seed=0)["p_two_sided"]
    assert f"[70.08 ± 4.70] | {p_meta:.3f} [0.069] |" in table
    assert "Warning:** with 2 and 2 seeds the smallest two-sided p-value this test can give is 0.333" in table
    assert "unpaired two-sided permutation test" in table


# ---------------------------------------------------------------------------------------------------------------------
# download: a local HTTP server on 127.0.0.1 serving files made here


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "served"
    (root / "citation_intent").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_checks_sha256_and_leaves_nothing_behind_on_failure(server, tmp_path):
    root, url = server
    payload = b'{"text": "w1 w2", "label": "c0"}\n' * 1000
    (root / "citation_intent" / "train.jsonl").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest_dir = tmp_path / "data"

    # good file: downloaded, checked, renamed into place
    path = reproduce.ensure_file(str(dest_dir), "citation_intent/train.jsonl", url, {"citation_intent/train.jsonl": good})
    assert open(path, "rb").read() == payload and not leftovers(str(dest_dir))
    # a file already there is used as it is (the server copy is not fetched again)
    (root / "citation_intent" / "train.jsonl").write_bytes(b"changed")
    assert open(reproduce.ensure_file(str(dest_dir), "citation_intent/train.jsonl", url,
                                      {"citation_intent/train.jsonl": good}), "rb").read() == payload

    # wrong checksum: a clear error naming the URL and how to place the file by hand; nothing left
    dest = str(tmp_path / "bad" / "train.jsonl")
    with pytest.raises(reproduce.ReproduceError) as e:
        reproduce.download(f"{url}/citation_intent/train.jsonl", dest, sha256="0" * 64)
    msg = str(e.value)
    assert f"{url}/citation_intent/train.jsonl" in msg and "checksum mismatch" in msg and "by hand" in msg
    assert os.listdir(tmp_path / "bad") == []

    # unreachable URL and a missing file (404): the same, nothing left
    for bad_url in (f"http://127.0.0.1:{closed_port()}/x/train.jsonl", f"{url}/citation_intent/nope.jsonl"):
        with pytest.raises(reproduce.ReproduceError, match="could not download " + bad_url.replace(".", r"\.")):
            reproduce.download(bad_url, dest, sha256=good, timeout=5)
        assert os.listdir(tmp_path / "bad") == []


def test_cli_download_with_wrong_checksum_exits_cleanly(server, model_dir, tmp_path, capsys):
    """The pinned SHA-256 of the authors' files cannot match test-made files: the run must stop before training."""
    root, url = server
    write_text_task(str(root))
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    code = reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0", "--data-url", url,
                           *common(model_dir, data, out)])
    err = capsys.readouterr().err
    assert code == 1 and "error: " in err and "checksum mismatch" in err and f"{url}/citation_intent/" in err
    assert not os.path.exists(out) and not leftovers(data)
    assert not any(f.endswith(".jsonl") for _, _, fs in os.walk(data) for f in fs)


# ---------------------------------------------------------------------------------------------------------------------
# resume, config mismatch, bad input


def test_resume_reruns_only_the_missing_seeds(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0-2", *common(model_dir, data_dir, out)]
    real, ran = reproduce.Workspace.execute, []

    def interrupted(self, run):  # the sweep is killed while seed 1 trains
        if run.seed == 1:
            raise KeyboardInterrupt
        return real(self, run)
    monkeypatch.setattr(reproduce.Workspace, "execute", interrupted)
    assert reproduce.main(argv) == 130
    assert results_in(out) == ["aclarc/mt__tapt__seed0.json"] and not leftovers(out)
    first = open(os.path.join(out, "aclarc", "mt__tapt__seed0.json"), "rb").read()

    def recording(self, run):
        ran.append(run.seed)
        return real(self, run)
    monkeypatch.setattr(reproduce.Workspace, "execute", recording)
    assert reproduce.main(argv) == 0
    assert ran == [1, 2]
    assert len(results_in(out)) == 3
    assert open(os.path.join(out, "aclarc", "mt__tapt__seed0.json"), "rb").read() == first  # untouched
    ran.clear()
    assert reproduce.main(argv) == 0 and ran == []  # all complete: nothing runs
    capsys.readouterr()

    # a result made with another budget is never mixed in silently
    assert reproduce.main(argv + ["--steps", "3"]) == 1
    assert "was made with a different config (train.max_steps: 3 here, 4 in the file)" in capsys.readouterr().err
    assert reproduce.main(argv + ["--steps", "3", "--rerun"]) == 0 and ran == [0, 1, 2]


def test_bad_input_gives_one_clear_message_and_no_result(model_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0",
                           *common(str(tmp_path / "no-model"), data_dir, out)]) == 1
    assert "no such local directory" in capsys.readouterr().err

    with open(os.path.join(data_dir, "citation_intent", "dev.jsonl"), "a") as f:
        f.write('{"text": "w1", "label": \n')
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0", *common(model_dir, data_dir, out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert "citation_intent/dev.jsonl, line 25: malformed JSON" in err
    assert not os.path.exists(out)

    with pytest.raises(SystemExit) as e:
        reproduce.main(["--task", "imagenet", "--mode", "mt"])
    assert e.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert reproduce.main(["--task", "aclarc", "--mode", "pretrain", *common(model_dir, data_dir, out)]) == 1
    assert "--mode pretrain does not apply to aclarc" in capsys.readouterr().err
    assert reproduce.main([]) == 0 and "usage: python reproduce.py" in capsys.readouterr().out


def test_no_arguments_prints_usage_pointing_to_the_demo(capsys):
    assert reproduce.main([]) == 0
    out = capsys.readouterr().out
    assert "python reproduce.py --task demo" in out.splitlines()[1]  # the demo first


def test_aux_file_adds_one_named_mlm_task(model_dir, data_dir, tmp_path):
    extra = tmp_path / "my_corpus.txt"
    extra.write_text("\n".join(" ".join(WORDS[i:i + 5]) for i in range(20)) + "\n")
    out = str(tmp_path / "out")
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0", "--aux-file", str(extra)]
    assert reproduce.main(argv + common(model_dir, data_dir, out)) == 0
    rec = json.load(open(os.path.join(out, "aclarc", "mt__tapt+file-my_corpus__seed0.json")))
    assert rec["history"][-1]["weights"] == {"aclarc": 1 / 3, "tapt": 1 / 3, "file-my_corpus": 1 / 3}  # 1/(1+n)
    assert rec["data_sizes"]["aux:file-my_corpus"] == 20 and rec["tokens"]["file-my_corpus"] > 0


def test_make_run_corpora_and_configs():
    r = reproduce.make_run("scierc", "dapt+tapt", None, 3, "10x")
    assert r.aux == ("dapt10x", "tapt") and r.path("o") == os.path.join("o", "scierc", "dapt+tapt__dapt10x+tapt__seed3.json")
    assert reproduce.make_run("aclarc", "meta", "dapt", 0, "1x").aux == ("dapt1x",)
    assert reproduce.make_run("aclarc", "mt", None, 0, "10x").aux == ("tapt",)  # Table 1's default
    assert reproduce.corpus_file("aclarc", "dapt10x", {}) == "citation_intent/domain.10xTAPT.txt"
    args = reproduce.build_parser().parse_args(["--task", "aclarc", "--mode", "meta", "--meta-lr", "0.1"])
    args.quick = False
    cfg, pre = reproduce.make_configs(args, "aclarc", "meta-samehead", 5, 0)
    assert isinstance(cfg, tartan.MetaConfig) and cfg.same_head and cfg.meta_lr == 0.1 and cfg.seed == 5
    assert cfg.lr == 1e-4 and cfg.batch_size == 64 and cfg.grad_accum == 2  # the paper's settings otherwise
    assert cfg.final_finetune.lr == 5e-6 and cfg.final_finetune.seed == 5
    ft, pre = reproduce.make_configs(args, "aclarc", "tapt", 0, 1)
    assert type(ft) is tartan.FinetuneConfig and ft.lr == 2e-5 and pre[0].epochs == 100 and pre[0].grad_accum == 4
    vis, _ = reproduce.make_configs(args, "mammals", "meta", 0, 1)
    assert (vis.lr, vis.batch_size, vis.epochs, vis.meta_head_lr, vis.meta_batch_size) == (3e-4, 64, 30, 3e-2, 16)
    assert vis.meta_lr == 0.1 and vis.final_finetune is None  # the flag still wins
    assert reproduce.parse_seeds("0-2,7") == [0, 1, 2, 7]


# ---------------------------------------------------------------------------------------------------------------------
# tables: means, the baseline of Table 8, and the seed-count warning, on hand-made results


def fake_results(table, scores):
    """{(task, column): per-seed scores} -> (cells, results) as run_table builds them."""
    cells, results = {}, {}
    for (task, label), xs in scores.items():
        col = next(c for c in reproduce.TABLES[table].columns if c.label == label)
        runs = [reproduce.make_run(task, col.mode, col.aux, s, "10x") for s in range(len(xs))]
        cells[(task, label)] = runs
        results.update({r: {"headline": {"test": x / 100}} for r, x in zip(runs, xs)})
    return cells, results


def test_table_cells_p_values_and_warnings():
    args = reproduce.build_parser().parse_args(["--table", "2"])
    rng = np.random.default_rng(0)
    scores = {("scierc", "DAPT"): rng.normal(76, 1, 10), ("scierc", "DAPT+TAPT"): rng.normal(78, 1, 10),
              ("scierc", "MT-TARTAN"): rng.normal(81, 1, 10), ("scierc", "META-TARTAN"): rng.normal(81.5, 1, 10)}
    cells, results = fake_results(2, scores)
    text = reproduce.render_table(2, cells, results, list(range(10)), args, "10x")
    mean, std = np.mean(scores["scierc", "MT-TARTAN"]), np.std(scores["scierc", "MT-TARTAN"], ddof=1)
    p = tartan.permutation_test(scores["scierc", "MT-TARTAN"], scores["scierc", "DAPT+TAPT"], 10_000, 0)["p_two_sided"]
    assert f"| {mean:.2f} ± {std:.2f} [81.02 ± 1.24] | {p:.3f} [0.000] |" in text
    assert "baseline = DAPT+TAPT (the higher mean of DAPT and DAPT+TAPT)" in text  # Table 8
    assert "Warning" not in text  # 10 vs 10 seeds can reach p < 0.05

    cells, results = fake_results(4, {("aclarc", "MT"): [69.0, 70.0, 71.0], ("aclarc", "META"): [72.0, 73.0, 74.0]})
    text = reproduce.render_table(4, cells, results, [0, 1, 2], args, "10x")
    assert "| CS | ACL-ARC | 70.00 ± 1.00 [69.27 ± 0.96] | 73.00 ± 1.00 [71.19 ± 4.88] | 0.100 |" in text
    assert "with 3 and 3 seeds the smallest two-sided p-value this test can give is 0.100" in text


# ---------------------------------------------------------------------------------------------------------------------
# the vision path (Table 5): CIFAR-100 archive, mammals split, WideResNet-16-2 through the same loops


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
    s = reproduce.mammals_split(train_y, test_y, seed=0)
    assert (len(s["train"]), len(s["dev"]), len(s["test"])) == (160, 40, 200)  # 200 images, 20% dev, 200 test
    assert set(train_y[s["train"]]) <= set(reproduce.MAMMALS) and set(test_y[s["test"]]) <= set(reproduce.MAMMALS)
    assert not set(s["train"]) & set(s["dev"]) and len(set(train_y[s["aux"]])) == 95 and len(s["aux"]) == 95 * 60
    again, other = reproduce.mammals_split(train_y, test_y, 0), reproduce.mammals_split(train_y, test_y, 1)
    assert all((again[k] == s[k]).all() for k in s) and not (other["train"] == s["train"]).all()
    big = reproduce.mammals_split(np.repeat(np.arange(100), 500), test_y, 0, n_train=400)
    assert len(big["dev"]) == 65  # ~20%, capped at 65


def test_wideresnet_16_2_shapes():
    torch.manual_seed(0)
    body = reproduce.WideResNet(16, 2, dropout=0.1)
    assert body.hidden_size == 128 and 0.6e6 < sum(p.numel() for p in body.parameters()) < 0.8e6  # WRN-16-2: 0.7M
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert body(x=x).shape == (4, 128)


def test_vision_path_through_the_same_loops(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    fake_cifar(os.path.join(data, "cifar-100", "cifar-100-python.tar.gz"), 6, 3)
    cifar = reproduce.read_cifar100(os.path.join(data, "cifar-100", "cifar-100-python.tar.gz"))
    assert cifar["train"][0].shape == (600, 3, 32, 32) and cifar["train"][0].dtype == np.uint8
    code = reproduce.main(["--task", "mammals", "--mode", "meta", "--seeds", "0", "--data-dir", data, "--out", out,
                           "--device", "cpu", "--quick", "--no-progress"])
    assert code == 0
    rec = json.load(open(os.path.join(out, "mammals", "meta__cifar95__seed0.json")))
    assert rec["headline"]["metric"] == "accuracy" and rec["headline"]["test"] == rec["test"]["micro_f1"]
    assert rec["data_sizes"]["train"] == 24 and rec["data_sizes"]["dev"] == 6 and rec["data_sizes"]["test"] == 15
    assert set(rec["history"][-1]["weights"]) == {"mammals", "cifar95"} and rec["history"][-1]["cosines"]
    assert rec["config"]["train"]["meta_head_lr"] == 3e-2 and rec["config"]["body"].startswith("WideResNet-16-2")

    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(tartan.DataError, match="not a CIFAR-100 python archive"):
        reproduce.read_cifar100(str(tmp_path / "broken.tar.gz"))


# ---------------------------------------------------------------------------------------------------------------------
# figures from stored histories


def test_figure_3_is_drawn_from_stored_histories(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "out")
    args = reproduce.build_parser().parse_args(["--figure", "3", "--out", out, "--report-only"])
    args.extra_corpora = {}
    ws = reproduce.Workspace(args, torch.device("cpu"))
    for (task, label), runs in reproduce.figure_runs(3, None, [0, 1]).items():
        for r in runs:
            w = [0.5 + 0.01 * i * (1 if r.mode == "meta" else -1) for i in range(5)]
            hist = [{"step": 10 * (i + 1), "weights": {"aclarc": w[i], "dapt10x": 1 - w[i]}} for i in range(5)]
            reproduce.atomic_write_json(r.path(out), {"complete": True, "key": r.key, "config": ws.config(r),
                                                      "headline": {"test": 0.5}, "history": hist})
    assert reproduce.main(["--figure", "3", "--out", out, "--report-only", "--seeds", "0-1"]) == 0
    png = os.path.join(out, "figure3.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    steps, mean, per_seed = reproduce.weight_curves([[{"step": 1, "weights": {"a": 0.2}}, {"step": 2, "weights":
                                                     {"a": 0.4}}], [{"step": 1, "weights": {"a": 0.4}}]])
    assert steps == [1] and mean["a"] == pytest.approx([0.3]) and per_seed["a"][0] == ([1, 2], [0.2, 0.4])


# ---------------------------------------------------------------------------------------------------------------------
# reproduce.py --bench (issue 5): runs with --quick and writes its ratios; no timing is asserted


def test_quick_bench_prints_and_writes_its_ratios(tmp_path, capsys):
    assert reproduce.main(["--bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "bench_quick.json") as f:
        saved = json.load(f)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bench-")]  # the temporary file was renamed
    for key in ("mt_over_floor", "meta_over_mt_plus_val", "meta_over_mt"):
        assert key in out and math.isfinite(saved[key]) and saved[key] > 0, key
    for name in ("floor_end", "floor_aux", "floor_val", "finetune", "pretrain", "mt", "meta", "meta_same_head"):
        assert saved["items"][name]["seconds"] > 0 and saved["items"][name]["tokens_per_s"] > 0, name
    assert saved["config"]["grad_accum"] == 1
    assert isinstance(saved["machine"]["malloc"], str)  # what tune_malloc did is on record
    # the floors are measured beside the steps they pair with: every step of mt brought one end and one aux pass
    assert saved["items"]["floor_aux"]["samples"] >= saved["items"]["mt"]["samples"] > 0
    assert saved["notes"]["ratios"].startswith("paired")


def test_bench_bad_sizes_give_one_message_and_no_file(tmp_path, capsys):
    assert reproduce.main(["--bench", "--quick", "--meta-batch-size", "99", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --meta-batch-size 99 exceeds the end-task batch") and "Traceback" not in err
    assert not (tmp_path / "bench_quick.json").exists()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_keeps_freed_memory_in_its_own_process():
    # process-wide, so in child processes: once warm, allocating and freeing 64 MB tensors must not page-fault
    code = ("import sys, torch, reproduce, resource\n"
            "print(reproduce.tune_malloc(sys.argv[1] == 'tuned'))\n"
            "for _ in range(3): torch.ones(2**24).sum()\n"  # warm-up: the heap grows to its working size
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(3): torch.ones(2**24).sum()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = {}
    for mode in ("tuned", "default"):
        out[mode] = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split("\n")
    assert out["tuned"][0].startswith("kept for reuse") and out["default"][0] == "glibc default"
    pages = 3 * 2**26 // 4096  # three fresh 64 MB tensors
    assert int(out["default"][1]) >= pages // 2  # glibc's default hands them back and faults them in again
    assert int(out["tuned"][1]) < pages // 16


# ---------------------------------------------------------------------------------------------------------------------
# reproduce.py --task demo (issue 4)

from reproduce import (DemoSettings, build_demo, demo_claims, demo_harmful_tie, demo_helpful_tie,  # noqa: E402
                       demo_meta_weights, demo_min_seeds, demo_prepare, demo_summarize,
                       quick_settings)

# ----------------------------------------------------------------------------------------------------------------------
# The synthetic world: cheap checks that it is built as the docstring says (no training).


@pytest.fixture(scope="module")
def prepared():
    return demo_prepare(DemoSettings())


def _concept_words(text):
    return [w for w in text.split() if w.startswith("c")]


def test_train_shows_only_seen_synonyms_dev_and_test_all(prepared):
    s, data = DemoSettings(), prepared["data"]
    synonym = lambda text: int(_concept_words(text)[0].split("w")[1])  # noqa: E731
    assert {synonym(t) for t in data["train"][0]} == set(range(s.n_seen))
    assert {synonym(t) for t in data["dev"][0]} == set(range(s.n_synonyms))
    assert {synonym(t) for t in data["test_unseen"][0]} == set(range(s.n_seen, s.n_synonyms))
    assert len(data["test"][0]) == len(data["test_seen"][0]) + len(data["test_unseen"][0])
    for text, label in zip(*data["train"]):  # one concept word per sentence, and it names the label; no cue
        (word,) = _concept_words(text)
        assert word.startswith(f"c{label}w") and not any(w.startswith("k") for w in text.split())


def test_corpora_tie_words_to_the_intended_cues(prepared):
    s, data = DemoSettings(), prepared["data"]
    for name, tie in (("helpful", demo_helpful_tie), ("harmful", demo_harmful_tie)):
        for text in data[name]:
            (word,) = _concept_words(text)
            k, j = map(int, word[1:].split("w"))
            cues = [w for w in text.split() if w.startswith("k")]
            assert len(cues) == s.cues_per_sentence and all(c.startswith(f"k{tie(k, j, s)}q") for c in cues)
    # the harmful tie never groups an unseen synonym with a seen synonym of its own concept, and it groups seen
    # synonyms of different concepts together
    for k in range(s.n_concepts):
        own_seen = {demo_harmful_tie(k, j, s) for j in range(s.n_seen)}
        assert all(demo_harmful_tie(k, j, s) not in own_seen for j in range(s.n_seen, s.n_synonyms))
    groups = {}
    for k in range(s.n_concepts):
        for j in range(s.n_seen):
            groups.setdefault(demo_harmful_tie(k, j, s), set()).add(k)
    assert all(len(concepts) > 1 for concepts in groups.values())


def test_tokenizer_knows_every_word(prepared):
    tok, ids = prepared["tokenizer"], prepared["ids"]
    for split in ("train", "dev", "test", "helpful", "harmful"):
        assert all(tok.unk_token_id not in row for row in ids[split].ids)
    assert len(ids["mixed"]) == len(ids["helpful"]) + len(ids["harmful"])


def test_build_demo_is_seeded_and_runs(prepared):
    a, b, c = (build_demo(seed, DemoSettings(), prepared) for seed in (0, 0, 1))
    pa, pb, pc = (dict(x["body"].named_parameters()) for x in (a, b, c))
    assert all((pa[n] == pb[n]).all() for n in pa)
    assert any((pa[n] != pc[n]).any() for n in pa)
    inputs, labels = a["end"].train.batch([0, 1, 2])
    logits, loss = a["end"].head(a["body"](**inputs), labels)
    assert logits.shape == (3, DemoSettings().n_concepts) and math.isfinite(loss.item())
    # separate MLM heads per corpus, sharing the body's (tied) input embedding
    emb = a["body"].encoder.get_input_embeddings().weight
    heads = [t.head for t in a["aux"].values()]
    assert len({id(h) for h in heads}) == 3
    assert all(any(p is emb for p in h.parameters()) for h in heads)


# ----------------------------------------------------------------------------------------------------------------------
# The reduced demo, run once for the module: the claims' plumbing and the META-TARTAN weights.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = reproduce.demo([0], str(out), quick=True, progress=False)
    return result, out


def test_reduced_demo_meta_downweights_harmful_corpus(demo):
    """Sec. 3.2/5.3 on the demo. Robustness checked before relying on it: with the quick settings, seeds 0-9 all
    ended with harmful < helpful (helpful/harmful ratio 1.08 to 2.93); the full settings, seeds 0-2, likewise."""
    result, _ = demo
    final = result["meta_final_weights"]["per_seed"]["0"]
    assert set(final) == {"end-task", "helpful", "harmful"}
    assert abs(sum(final.values()) - 1) < 1e-5
    assert final["harmful"] < final["helpful"]
    assert result["claims"]["claim2_meta_downweights_harmful"]["harmful_below_helpful_per_seed"] == [True]


def test_reduced_demo_world_behaves(demo):
    """Fine-tuning alone learns the seen synonyms but cannot know the unseen ones (the premise of claim 1)."""
    result, _ = demo
    ft = result["methods"]["finetune"]
    assert ft["test_seen"][0] > 0.9
    assert ft["test_unseen"][0] < 0.5


def test_reduced_demo_json(demo):
    result, out = demo
    path = out / "demo_summary.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["seeds"] == [0] and on_disk["quick"] is True
    for m in ("finetune", "pretrain", "mt", "meta"):
        entry = on_disk["methods"][m]
        assert entry["seeds"] == [0] and len(entry["test"]) == 1 and 0 <= entry["test"][0] <= 1
        assert entry["mean"] == pytest.approx(entry["test"][0])
    assert on_disk["meta_final_weights"] == result["meta_final_weights"]
    traj = on_disk["meta_weight_trajectories"]["0"]
    assert traj[0]["step"] == 0 and traj[0]["harmful"] == pytest.approx(1 / 3)
    assert traj[-1]["step"] == quick_settings().steps
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic write left nothing behind


def test_reduced_demo_figure_when_matplotlib(demo):
    result, out = demo
    if importlib.util.find_spec("matplotlib") is None:
        assert result["figure"] is None and not (out / "demo_weights.png").exists()
    else:
        assert (out / "demo_weights.png").read_bytes()[:4] == b"\x89PNG"


def test_reduced_demo_prints_table(demo, capsys):
    # the table was printed when the fixture ran; check its rows through a second, cheap rendering instead
    result, _ = demo
    from reproduce import demo_report
    weights = {"seeds": [0], "by_task": {n: [v] for n, v in result["meta_final_weights"]["per_seed"]["0"].items()},
               "mean": result["meta_final_weights"]["mean"]}
    summary = {m: result["methods"][m] for m in ("finetune", "pretrain", "mt", "meta")}
    text = demo_report(summary, weights, result["claims"], [0], 1.0)
    for row in ("fine-tune only", "pretrain->finetune", "MT-TARTAN", "META-TARTAN", "p vs pretrain", "ddof=1"):
        assert row in text
    assert "cannot be reached" in text  # one seed: no p-value can be below 0.05


# ----------------------------------------------------------------------------------------------------------------------
# The verdicts follow the numbers (nothing is hard-coded): synthetic records in, claims out.


def _records(scores: dict, weights: list[tuple[float, float, float]]):
    recs = []
    for m, per_seed in scores.items():
        for seed, x in enumerate(per_seed):
            r = {"method": m, "seed": seed, "test": x, "test_unseen": x / 2, "test_seen": 1.0, "dev": x}
            if m == "meta":
                e, h, b = weights[seed]
                r["final_weights"] = {"end-task": e, "helpful": h, "harmful": b}
                r["best_weights"] = None
                r["trajectory"] = [{"step": 0, "end-task": 1 / 3, "helpful": 1 / 3, "harmful": 1 / 3},
                                   {"step": 10, **r["final_weights"]}]
            recs.append(r)
    return recs


def _claims(scores, weights):
    recs = _records(scores, weights)
    summary = demo_summarize(recs)
    return demo_claims(summary, demo_meta_weights(recs))


def test_claims_follow_the_numbers():
    good = {"finetune": [.5, .5, .5, .5], "pretrain": [.6, .61, .62, .6], "mt": [.7, .71, .72, .7],
            "meta": [.8, .81, .82, .8]}
    c = _claims(good, [(.2, .6, .2)] * 4)
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"].startswith("shown")
    assert c["claim2_meta_downweights_harmful"]["verdict"] == "shown in all 4 seeds"
    assert c["aux_carries_information"]["shown"]

    bad = {"finetune": [.9, .9, .9, .9], "pretrain": [.8, .81, .82, .8], "mt": [.7, .71, .72, .7],
           "meta": [.6, .61, .62, .6]}
    c = _claims(bad, [(.2, .2, .6)] * 3 + [(.2, .6, .2)])
    assert c["claim1_end_task_aware_beats_pretraining"]["mt"]["verdict"].startswith("NOT shown")
    assert c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"].startswith("NOT shown")
    assert c["claim2_meta_downweights_harmful"]["verdict"].startswith("NOT shown")
    assert c["claim2_meta_downweights_harmful"]["meta_vs_mt"]["verdict"].startswith("NOT shown")
    assert not c["aux_carries_information"]["shown"]

    three = {m: v[:3] for m, v in good.items()}
    c = _claims(three, [(.2, .6, .2)] * 3)
    assert "out of reach" in c["claim1_end_task_aware_beats_pretraining"]["meta"]["verdict"]


def test_min_seeds_matches_permutation_test():
    n = demo_min_seeds()
    assert tartan.permutation_test(range(n), range(n, 2 * n))["min_p_two_sided"] < 0.05
    assert tartan.permutation_test(range(n - 1), range(n - 1, 2 * n - 2))["min_p_two_sided"] >= 0.05


def test_write_json_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "s.json"
    reproduce.atomic_write_json(str(path), {"a": 1})
    circular = {"a": 2}
    circular["self"] = circular
    with pytest.raises(ValueError):
        reproduce.atomic_write_json(str(path), circular)  # fails half-way through writing
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["s.json"]
    umask = os.umask(0o022)
    try:
        reproduce.atomic_write_json(str(path), {"a": 3})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's private 0o600


def test_no_matplotlib_no_figure(tmp_path, monkeypatch, capsys):
    from reproduce import demo_plot_weights
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail as if not installed
    recs = [{"method": "meta", "seed": 0, "final_weights": {"helpful": .5, "harmful": .5},
             "trajectory": [{"step": 0, "helpful": .5, "harmful": .5}]}]
    assert demo_plot_weights(recs, str(tmp_path / "w.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "w.png").exists()
