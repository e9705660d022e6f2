"""Offline demo of TARTAN's two claims: `python reproduce.py --task demo [--seeds ...] [--out DIR] [--quick]`.

Everything is made here, in code: no download, no GPU, a few minutes on a laptop CPU. Entry point: run_demo().

The synthetic world (demo_data)
-------------------------------
* Concepts: 4 concepts, each named by 6 interchangeable words ("c2w4" = synonym 4 of concept 2).
* End-task (low-resource, 48 labelled examples): a sentence of neutral filler words plus one concept word; the label
  is its concept. The labelled TRAIN set only uses synonyms 0 and 1 ("seen") of each concept; DEV and TEST use all
  six. The labels alone cannot tell what an unseen synonym means, so fine-tuning alone is at chance on test sentences
  with unseen synonyms (half of test; the table reports them separately).
* Helpful corpus (unlabelled text, the TAPT/DAPT analogue): every synonym of a concept, seen and unseen alike, next to
  cue words of its own concept ("k2q1" = cue 1 of concept 2). MLM can only predict a masked cue or word by learning
  which words share contexts, so this text carries exactly what the labels lack. The end-task never shows a cue, so
  the corpus can matter only through what it teaches about the concept words.
* Harmful corpus: the same words and cues, grouped ACROSS concepts: cue set g is shared by seen synonym 0 of concept
  g and seen synonym 1 of concept g-1, and the unseen synonyms of concept k share the cues of seen synonyms of k+1 and
  k+2. MLM on it teaches that differently-labelled words mean the same and that unseen synonyms mean what other
  concepts' words mean.
Claim 1 is testable: auxiliary text can lift the unseen-synonym sentences, and methods differ in how well they use
it when helpful and harmful text come together. Claim 2 is testable: META-TARTAN's weights start equal and only the
meta-gradient can separate the two corpora (the harmful one is as large and looks alike token by token).

Methods (rows of the table; per seed, all start from the same random initialisation)
* fine-tune only  : Eq. 2 on the end-task alone (the "RoBERTa" column; here the body has no prior knowledge).
* pretrain->finetune: Eq. 1 then Eq. 2, MLM on all the auxiliary text as one corpus (end-task agnostic pre-training
                    has no way to tell the helpful text from the harmful), then fine-tuning. The baseline.
* MT-TARTAN       : Eq. 3, end-task + helpful MLM + harmful MLM with static uniform weights (1/3 each).
* META-TARTAN     : Algorithm 1, the same three tasks with meta-learned weights (Eq. 7, separate meta head phi*).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import numpy as np
import torch

import tartan

from . import tasks
from .common import atomic_write_json, compare, markdown_table, mean_std, min_seeds, progress_bar, save_figure, set_seed


# ----------------------------------------------------------------------------------------------------------------------
# Settings, chosen on this very task so that 4 seeds x 4 methods run in a few minutes on a CPU and the task is
# informative: fine-tuning alone sits at chance on unseen synonyms
# (experiments/results/README.md, "The offline demo").
# * A tiny random-init BERT needs far larger learning rates than the paper's pretrained RoBERTa, and one layer.
# * Auxiliary sentences are a concept word and two cues, no fillers: every masked token is informative, and the only
#   difference between the two corpora's MLM gradients is the grouping, which is what the meta-gradient has to see.
# * No dropout: full-batch training on a few dozen examples needs no extra noise.
# * The end-task batch is the whole training set and the META meta-batch the whole dev set: phi* is fitted on all
#   training examples and g_meta carries no sampling noise, which matters with cosines of a few hundredths.
# * META-TARTAN: eta at the top of the paper's grid, so that weights move within a few hundred steps; phi* takes the
#   paper's 10 steps at a higher learning rate, as a fresh head on small features barely moves at the paper's.
# * Early stopping is off (patience above the number of evaluations): every run has the same, predictable cost; model
#   selection still restores the best-dev checkpoint. The optional final fine-tuning of MT/META is off: the comparison
#   is of Eq. 3 / Algorithm 1 themselves.


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
    meta_batch_size: int = 48      # rows phi* is fitted on: the whole end-task batch
    meta_val_batch_size: int = 96  # |B*_val|: the whole dev set
    meta_head_lr: float = 1e-2
    meta_head_steps: int = 10
    threads: int = 1               # torch CPU threads: the model is too small to gain from more


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
        return tartan.TextData(tasks.tokenize(tok, texts, max_len), labels, tok.pad_token_id)

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
    set_seed(seed)  # parameter initialisation (tartan.py leaves the global generator to the caller)
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
DEMO_SEEDS = (0, 1, 2, 3)  # the fewest seeds a side for which the one-sided test can give p < 0.05 (common.min_seeds)
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
                                      meta_batch_size=s.meta_batch_size, meta_val_batch_size=s.meta_val_batch_size,
                                      meta_head_lr=s.meta_head_lr,
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
        names = list(out["final_alpha"])
        record["final_alpha"] = out["final_alpha"]  # alpha = softmax(w) after the last step
        record["best_alpha"] = out["best_alpha"]  # alpha at the selected (best-dev) evaluation
        start = {"step": 0, **{n: 1.0 / len(names) for n in names}}  # Algorithm 1 starts from equal weights
        record["trajectory"] = [start] + [{"step": h["step"], **h["alpha"]} for h in out["history"]]
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Summary: per-method statistics, META's weights, and the two claims, all computed from the records.


def demo_summarize(records: list[dict]) -> dict:
    """Per method: per-seed scores, mean and sample std (ddof=1), permutation test against pretrain->finetune
    (common.compare: one-sided p_greater is the headline, the two-sided p is kept beside it)."""
    base = [r["test"] for r in records if r["method"] == "pretrain"]
    out = {}
    for m in DEMO_METHODS:
        rs = [r for r in records if r["method"] == m]
        entry = {"seeds": [r["seed"] for r in rs]}
        for key in ("test", "test_unseen", "test_seen", "dev"):
            entry[key] = [r[key] for r in rs]
        entry["mean"], entry["std"] = mean_std(entry["test"], ddof=1)
        entry["unseen_mean"], entry["unseen_std"] = mean_std(entry["test_unseen"], ddof=1)
        if m != "pretrain":
            entry["vs_pretrain"] = compare(entry["test"], base)
        out[m] = entry
    return out


def demo_meta_weights(records: list[dict]) -> dict:
    """META-TARTAN's final weights: per seed, per task/corpus, and their means."""
    metas = [r for r in records if r["method"] == "meta"]
    names = list(metas[0]["final_alpha"])
    by_task = {n: [r["final_alpha"][n] for r in metas] for n in names}
    # the time-average of each weight over training, averaged over seeds: the whole run's preference, not only its end
    average = {n: float(np.mean([np.mean([p[n] for p in r["trajectory"]]) for r in metas])) for n in names}
    return {"seeds": [r["seed"] for r in metas], "by_task": by_task,
            "mean": {n: float(np.mean(v)) for n, v in by_task.items()}, "average_over_training": average,
            "best": {n: [(r["best_alpha"] or {}).get(n) for r in metas] for n in names}}


def _demo_verdict(test: dict) -> str:
    """Wording of a one-directional claim 'a > b' from a common.compare result (one-sided test, H1: a > b)."""
    if test["diff"] <= 0:
        return "NOT shown (not higher on average)"
    if test["p_greater"] < 0.05:
        return "shown (higher, p < 0.05)"
    if test["min_p_greater"] >= 0.05:
        return "higher on average; significance out of reach with this many seeds"
    return "higher on average, but not significant"


def demo_claims(summary: dict, weights: dict) -> dict:
    """The claims, computed from the results (never assumed)."""
    ft_unseen = summary["finetune"]["unseen_mean"]
    best = max(("pretrain", "mt", "meta"), key=lambda m: summary[m]["unseen_mean"])
    lower = [h < g for h, g in zip(weights["by_task"]["harmful"], weights["by_task"]["helpful"])]
    meta_vs_mt = compare(summary["meta"]["test"], summary["mt"]["test"])
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
            m: {"diff": summary[m]["vs_pretrain"]["diff"], "p_one_sided": summary[m]["vs_pretrain"]["p_greater"],
                "p_two_sided": summary[m]["vs_pretrain"]["p_two_sided"],
                "verdict": _demo_verdict(summary[m]["vs_pretrain"])} for m in ("mt", "meta")},
        "claim2_meta_downweights_harmful": {
            "harmful_below_helpful_per_seed": lower, "verdict": down,
            "meta_vs_mt": {"diff": meta_vs_mt["diff"], "p_one_sided": meta_vs_mt["p_greater"],
                           "p_two_sided": meta_vs_mt["p_two_sided"], "verdict": _demo_verdict(meta_vs_mt)}},
    }


def demo_report(summary: dict, weights: dict, claims: dict, seeds, seconds: float) -> str:
    """The paper-style table, META's final weights and the claims, as printed."""
    n = len(seeds)
    any_test = summary["mt"]["vs_pretrain"]
    lines = [f"TARTAN offline demo: test macro-F1 x100, mean ± std over {n} seed(s) {', '.join(map(str, seeds))} "
             f"(std: sample, ddof=1)", ""]
    cell = lambda x: "{:.1f} ± {:.1f}".format(*(100 * v for v in mean_std(x, ddof=1)))  # noqa: E731
    rows = [[DEMO_LABELS[m], cell(summary[m]["test"]), cell(summary[m]["test_unseen"]), cell(summary[m]["test_seen"]),
             "(baseline)" if m == "pretrain" else f"{summary[m]['vs_pretrain']['p_greater']:.3f}"]
            for m in DEMO_METHODS]
    lines += markdown_table(["method", "test macro-F1", "unseen synonyms", "seen synonyms", "p vs pretrain"], rows,
                            pad=True) + [""]
    kind = "exact" if any_test["exact"] else f"{any_test['n_permutations']} random"
    lines.append(f"p: one-sided unpaired permutation test ({kind} splits; H1: the method beats pretrain->finetune) of "
                 f"per-seed test macro-F1 (tartan.permutation_test; the two-sided p is in the JSON summary).")
    if any_test["min_p_greater"] >= 0.05:
        lines.append(f"   With {n} seed(s) per method the smallest p this test can give is "
                     f"{any_test['min_p_greater']:.3f}: p < 0.05 cannot be reached; it needs >= {min_seeds()} "
                     f"seeds per method (e.g. --seeds 0-{min_seeds() - 1}).")
    lines.append("Unseen/seen synonyms: macro-F1 on the half of test whose concept word the labelled train set never "
                 "shows / shows (chance: 25).")
    rows = [[seed] + [f"{v[i]:.3g}" for v in weights["by_task"].values()] for i, seed in enumerate(weights["seeds"])]
    rows.append(["mean"] + [f"{v:.3g}" for v in weights["mean"].values()])
    lines += ["", "META-TARTAN final task weights (softmax alpha after the last step):", "",
              *markdown_table(["seed", *weights["by_task"]], rows, pad=True), ""]
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
                     f"p = {c1[m]['p_one_sided']:.3f} -> {c1[m]['verdict']}")
    lines += [f"- Claim 2 (Sec. 3.2, 5.3): META-TARTAN down-weights the harmful corpus (final weight harmful < "
              f"helpful): {c2['verdict']} (mean {weights['mean']['harmful']:.3g} vs {weights['mean']['helpful']:.3g})",
              f"    and so uses mixed-quality text better than MT-TARTAN: {100 * c2['meta_vs_mt']['diff']:+.1f} points,"
              f" p = {c2['meta_vs_mt']['p_one_sided']:.3f} -> {c2['meta_vs_mt']['verdict']}",
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
        for name in r["final_alpha"]:
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
    save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Entry point.


def run_demo(seeds=DEMO_SEEDS, out_dir: str = "results", quick: bool = False, progress: bool = True,
         settings: DemoSettings | None = None) -> dict:
    """Runs the four methods over `seeds`, prints the table, META's weights and the claims, writes
    out_dir/demo_summary.json (and demo_weights.png with matplotlib; --quick: demo_quick_*, beside the full demo's).
    Returns the JSON summary."""
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
        bar = progress_bar(len(seeds) * len(DEMO_METHODS), progress, "demo runs")
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
    name = "demo_quick" if quick else "demo"
    figure = demo_plot_weights(records, os.path.join(out_dir, f"{name}_weights.png"))
    result = {"task": "demo", "quick": quick, "seeds": seeds, "settings": dataclasses.asdict(s),
              "metric": "test macro-F1", "std_ddof": 1,
              "methods": {m: {"label": DEMO_LABELS[m], **summary[m]} for m in DEMO_METHODS},
              "meta_final_alpha": {"per_seed": {str(sd): {n: v[i] for n, v in weights["by_task"].items()}
                                                  for i, sd in enumerate(weights["seeds"])},
                                     "mean": weights["mean"],
                                     "average_over_training": weights["average_over_training"]},
              "meta_best_alpha": weights["best"],
              "meta_alpha_trajectories": {str(r["seed"]): r["trajectory"] for r in records if r["method"] == "meta"},
              "claims": claims, "runs": [{k: v for k, v in r.items() if k != "trajectory"} for r in records],
              "figure": figure, "seconds": seconds, "threads": s.threads,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    path = os.path.join(out_dir, f"{name}_summary.json")
    atomic_write_json(path, result)
    print(f"Summary: {path}" + (f"; figure: {figure}" if figure else ""))
    return result
