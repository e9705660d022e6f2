"""TARTAN: end-task aware training, in one readable module.

Dery, Michel, Talwalkar, Neubig. "Should We Be Pre-training? An Argument for End-task Aware Training as an
Alternative." ICLR 2022. https://arxiv.org/abs/2109.07437

Instead of continued pre-training on auxiliary text (DAPT/TAPT, Eq. 1) followed by fine-tuning (Eq. 2), train the
end-task T* together with the auxiliary objectives T_1..T_n:
  MT-TARTAN   (Eq. 3)            static task weights w, early stopping on end-task dev;
  META-TARTAN (Eq. 7, Alg. 1)    task weights meta-learned online from cos(g_meta, g_i), where g_meta is the
                                 end-task validation gradient through a freshly fitted meta head phi* (Sec. 3.3).

Contents, the method first, in the paper's order:
  1. Body and heads (Sec. 2, 4)   2. Masking (BERT, 15%; 80/10/10)   3. Tasks T = (loss, data) and their batches
  4. Configs (Sec. 4; the release where the paper is silent)   5. The training loop of Eq. 1, 2, 3 and Alg. 1
  6. MT-TARTAN (Eq. 3)   7. META-TARTAN (Eq. 6-7, Sec. 3.3, Alg. 1): MTWeighting and MetaWeighting are the weightings
     as objects that any training loop (tartan's own included) calls once per step
  8. Entry points: pretrain (Eq. 1), finetune (Eq. 2), train_multitask (Eq. 3), train_meta (Alg. 1), run_end_task
  9. Evaluation (macro-F1, micro-F1)   10. Significance: the permutation test (A.2)
Appendix: A. reading files and building tasks; B. contracts and divergence; C. plumbing (device, autocast, progress
bar, snapshots, checkpoints to resume from, clipping, head parameters, optimizers, the history's averages, the step
budget).

Shapes: B batch, T tokens, H hidden size, C classes, V vocabulary, M masked positions, P body parameters,
K = n + 1 tasks (end-task first).

Where the paper and the authors' released code disagree, this file follows the paper and says so in a comment.
Randomness: data order and masking come from a torch.Generator seeded by the config; parameter initialisation and
dropout use torch's global generator, which the caller seeds (reproduce.py, the tests).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import itertools
import json
import math
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# 1. Body and heads (Sec. 2: theta = [theta_body; phi^1..phi^n, phi']; Sec. 4 "Model details").


class HFBody(nn.Module):
    """The shared body theta_body: a Hugging Face encoder mapping a batch to last-layer features (B, T, H).
    The attention mask is always passed, so padding never changes a prediction."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.hidden_size = encoder, encoder.config.hidden_size

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)


class ClassificationHead(nn.Module):
    """End-task head phi' (and the meta head phi*): an MLP on the first-token ([CLS]/<s>) feature, as in Devlin et
    al. (2018) and the paper's Sec. 4: Dropout, Linear H->H, Tanh, Dropout, Linear H->C; mean cross-entropy.
    Works on token features (B, T, H) and on pooled features (B, H) from a non-transformer body."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, features, labels=None):
        if features.dim() not in (2, 3):  # e.g. a CNN's (B, C, H, W) map: which width to build the head for is moot
            raise ValueError(f"a ClassificationHead takes body features (B, H) or token features (B, T, H), not "
                             f"{tuple(features.shape)}: pool or flatten them to (B, H) in the body's forward")
        x = features[:, 0] if features.dim() == 3 else features  # (B, H)
        if x.shape[-1] != self.mlp[1].in_features:  # a shape, no device work: a clear error, not a matmul's
            raise ValueError(f"a ClassificationHead built for hidden_size={self.mlp[1].in_features} got body features "
                             f"{tuple(features.shape)}: build it with hidden_size={x.shape[-1]}, the width of the "
                             f"body's output (body.hidden_size for tartan.HFBody)")
        logits = self.mlp(x)  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss


class MLMHead(nn.Module):
    """Auxiliary MLM head phi^i. Wraps the checkpoint's own LM head (transform + decoder, decoder usually tied to the
    input embeddings) and computes vocabulary logits only at the masked positions (labels != -100)."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, features, labels):
        masked = labels != -100  # (B, T)
        logits = self.lm_head(features[masked])  # (M, V)
        if logits.shape[0] == 0:  # no position masked in this batch: a zero loss that keeps the graph
            return logits, features.sum() * 0.0
        return logits, F.cross_entropy(logits.float(), labels[masked])


# ----------------------------------------------------------------------------------------------------------------------
# 2. Masking (Devlin et al. 2018): 15% of the non-special, non-pad tokens are chosen; of those 80% become the mask
#    token, 10% a random token, 10% stay unchanged; labels are -100 everywhere else.


@dataclass
class Masking:
    mask_id: int                   # the tokenizer's mask token
    vocab_size: int                # random replacements are drawn from [0, vocab_size)
    special_ids: tuple[int, ...]   # never masked (CLS/SEP/PAD/...)
    prob: float = 0.15             # fraction of tokens chosen for prediction
    mask_frac: float = 0.8         # of the chosen: replaced by mask_id
    random_frac: float = 0.1       # of the chosen: replaced by a random token (the rest stay unchanged)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "Masking":
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token: it cannot drive an MLM task")
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))))


def mask_tokens(input_ids, attention_mask, masking: Masking, generator: torch.Generator):
    """(B, T) ids -> (corrupted ids, labels). Random replacements are any vocabulary id (as in BERT). Driven only by
    `generator`, so reproducible."""
    special = torch.isin(input_ids, torch.tensor(masking.special_ids)) | (attention_mask == 0)
    chosen = (torch.rand(input_ids.shape, generator=generator) < masking.prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    v = torch.rand(input_ids.shape, generator=generator)  # splits the chosen tokens 80/10/10
    to_mask = chosen & (v < masking.mask_frac)
    to_random = chosen & (v >= masking.mask_frac) & (v < masking.mask_frac + masking.random_frac)
    random_ids = torch.randint(masking.vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, masking.mask_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


# ----------------------------------------------------------------------------------------------------------------------
# 3. Tasks: T = (loss, data) (Sec. 2). A task owns its head and its training data; the end-task also has dev/test.


@dataclass
class Task:
    name: str
    head: nn.Module                            # phi' for the end-task, phi^i for an auxiliary task:
    #                                            head(features, labels) -> (logits, mean loss)
    train: TextData | TensorData
    masking: Masking | None = None             # set for MLM tasks: batches are corrupted by mask_tokens
    dev: TextData | TensorData | None = None   # end-task only
    test: TextData | TensorData | None = None  # end-task only; touched once, for the selected model
    num_labels: int = 0                        # classes C (the task builders set it); META's phi* needs it
    metric: str = "macro_f1"                   # headline metric: "macro_f1" or "micro_f1" (Table 1)


def batches(task: Task, batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs of (inputs, labels) from a task's training data; MLM tasks are masked here. The last
    partial batch of an epoch is dropped (unless the data is smaller than one batch): every step sees full batches."""
    while True:
        order = torch.randperm(len(task.train), generator=generator).tolist()
        last = len(order) - batch_size + 1 if len(order) >= batch_size else 1
        for i in range(0, last, batch_size):
            inputs, labels = task.train.batch(order[i:i + batch_size])
            if task.masking is not None:
                inputs["input_ids"], labels = mask_tokens(inputs["input_ids"], inputs["attention_mask"],
                                                          task.masking, generator)
            yield inputs, labels


class Stream:
    """batches() that counts the batches it has given, so that a resumed run (Checkpoint) brings a new stream to the
    same place, data order, masking and generator state alike, by drawing as many again."""

    def __init__(self, task: Task, batch_size: int, seed: int):
        self.drawn, self._batches = 0, batches(task, batch_size, torch.Generator().manual_seed(seed))

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        return next(self._batches)

    def replay(self, drawn: int):
        while self.drawn < drawn:
            next(self)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Configs hold the paper's values (Sec. 4) and, where the paper is silent, those of the authors' launch scripts
#    ("release": ldery/TARTAN run_{mt,meta}_multiple.sh) or of Gururangan et al. (2020), App. B.


@dataclass
class TrainConfig:
    """MT-TARTAN (Eq. 3). Also the base of the other configs."""
    lr: float = 1e-4                  # beta_1, body learning rate (AdamW; release)
    head_lr: float = 1e-3             # beta_2, head learning rate (Sec. 4 grid {1e-3, 1e-4, 1e-5})
    weight_decay: float = 0.01        # body AdamW decay, none on biases and norm weights (release)
    head_weight_decay: float = 0.1    # heads (release)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (release)
    adam_eps: float = 1e-6            # AdamW (release)
    warmup_frac: float = 0.06         # linear warm-up over 6% of the steps, then linear decay to 0 (release)
    grad_clip: float = 1.0            # max global gradient norm, 0 = off (release)
    batch_size: int = 64              # |B*_tr|, end-task micro-batch (release)
    aux_batch_size: int = 64          # |B_i|, auxiliary micro-batch (release)
    grad_accum: int = 2               # micro-batches per optimizer step (64 x 2 = the paper's end-task batch 128)
    epochs: float = 150               # budget in passes over the largest training set (release; early stopping
    #                                   usually ends sooner)
    max_steps: int = 0                # optimizer steps; 0 = derived from epochs
    eval_every: int = 30              # evaluate end-task dev every this many steps (release); 0 = once per epoch;
    #                                   -1 = never
    patience: int = 20                # early stop after this many evaluations without a strictly better dev score,
    #                                   a tie is no improvement (release)
    eval_batch_size: int = 64
    weights: tuple[float, ...] | None = None  # w = (w*, w_1..w_n) of Eq. 3; None = uniform 1/(n+1) (Sec. 4)
    seed: int = 0                     # data order and masking
    bf16: bool = True                 # bf16 autocast, on CUDA only
    progress: bool = False            # tqdm progress bar
    eval_test: bool = False           # also score test at every evaluation, in the history for learning curves
    #                                   only: selection and early stopping never read it
    final_finetune: "FinetuneConfig | None" = field(default_factory=lambda: tartan_finetune())


@dataclass
class FinetuneConfig(TrainConfig):
    """Eq. 2 alone: the "RoBERTa" column and the stage after TAPT/DAPT (Gururangan et al. 2020, App. B)."""
    lr: float = 2e-5
    head_lr: float = 2e-5
    weight_decay: float = 0.1
    head_weight_decay: float = 0.1
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 10
    eval_every: int = 0               # once per epoch
    patience: int = 3
    final_finetune: "FinetuneConfig | None" = None


def tartan_finetune() -> FinetuneConfig:
    """The optional end-task-only stage after MT/META-TARTAN (release: lr 5e-6, batch 64, <=10 epochs, patience 3),
    kept only if it improves end-task dev."""
    return FinetuneConfig(lr=5e-6, head_lr=5e-6, batch_size=64)


@dataclass
class PretrainConfig(TrainConfig):
    """Eq. 1: end-task agnostic MLM on the auxiliary corpora (TAPT: Gururangan et al. 2020, App. B)."""
    lr: float = 1e-4
    head_lr: float = 1e-4
    weight_decay: float = 0.01
    head_weight_decay: float = 0.01   # Gururangan et al. (2020), App. B: 0.01 for the whole model, LM head included
    aux_batch_size: int = 64
    grad_accum: int = 4               # 64 x 4 = TAPT's batch 256
    epochs: float = 100
    eval_every: int = -1              # never: pre-training does not see the end-task
    final_finetune: "FinetuneConfig | None" = None


@dataclass
class MetaConfig(TrainConfig):
    """META-TARTAN (Eq. 7, Sec. 3.3, Algorithm 1)."""
    meta_lr: float = 1e-2             # eta, task-weight step size (Sec. 4 grid {1e-1, 5e-2, 3e-2, 1e-2}; release 1e-2)
    meta_head_steps: int = 10         # phi*'s full-batch steps (Sec. 4: "after 10 gradient descent steps"), from a
    #                                   new random init at every step (Sec. 3.3; see estimate_meta_head)
    meta_head_lr: float = 1e-3        # phi* AdamW learning rate (Sec. 4)
    meta_head_wd: float = 0.1         # phi* l2 weight decay (Sec. 4)
    meta_batch_size: int = 32         # rows that fit phi* (Sec. 4: {16, 32}); with meta_head_data="train" at most
    #                                   batch_size, the end-task micro-batch B*_tr they are taken from
    meta_val_batch_size: int = 0      # |B*_val|; 0 = meta_batch_size (the paper gives no size for B*_val)
    meta_head_data: str = "train"     # phi*'s rows: "train" = the first rows of B*_tr (Sec. 3.3, A.1: "a subset of
    #                                   the end-task training data"); "dev" = a dev batch of their own (the release)
    meta_head_tol: float = 0.0        # > 0: phi*'s fit stops early once 10 steps lower its loss by less than this
    #                                   fraction ("to convergence", Sec. 3.3); 0 = always meta_head_steps (Sec. 4)
    same_head: bool = False           # True: meta gradient through phi' itself (Eq. 6), the ablation of Fig. 3
    cos_eps: float = 1e-8             # epsilon in cos(a, b) = a.b / (|a||b| + eps)

    def head_rows_short(self) -> bool:
        """Whether phi* would need more rows than B*_tr holds: it is fitted on the first meta_batch_size rows of the
        end-task micro-batch (meta_head_data="train") unless it is phi' itself (same_head)."""
        return not self.same_head and self.meta_head_data == "train" and self.meta_batch_size > self.batch_size


# ----------------------------------------------------------------------------------------------------------------------
# 5. The training loop, one for every mode: Eq. 1 (no end-task), Eq. 2 (no auxiliary task), Eq. 3 and Algorithm 1.


def train(body: nn.Module, end: Task | None, aux: list[Task], cfg: TrainConfig, step_fn=None,
          checkpoint: "Checkpoint | str | None" = None) -> dict:
    """The loop shared by every mode: Eq. 1 (end=None), Eq. 2 (aux=[]), Eq. 3 (multitask_step) and Algorithm 1
    (meta_step). Evaluates end-task dev every cfg.eval_every steps, keeps the best-dev body and head, stops after
    cfg.patience evaluations without a new best, restores the best and returns the history. Selection uses the dev
    metric (end.metric), as the release does; the paper's Sec. 3.1 monitors the validation loss, recorded too.
    A NaN or infinite loss (training, META's validation, dev) stops the run with a DivergedError. The test split is
    run_end_task's. With a checkpoint, the loop saves its state there now and then and, if one is there already,
    continues from it: the result is the uninterrupted run's (the caller removes the file once it has the result)."""
    check_tasks(end, aux, cfg, meta=True if step_fn is meta_step else None)
    tasks = ([end] if end is not None else []) + list(aux)
    _check_tied_heads(body, tasks)
    if isinstance(checkpoint, (str, os.PathLike)):  # a path, as run_end_task takes
        checkpoint = Checkpoint(os.fspath(checkpoint))
    step_fn = step_fn or (meta_step if isinstance(cfg, MetaConfig) else multitask_step)  # as the config says
    first = next(body.parameters(), None)
    if first is None:
        raise ValueError(f"the body ({type(body).__name__}) has no parameters: there is nothing to train")
    device = first.device
    body.train()
    for t in tasks:
        t.head.to(device).train()
    # one generator per task (data order and masking), so the end-task's batches do not depend on the other tasks
    streams = [Stream(t, cfg.batch_size if t is end else cfg.aux_batch_size, cfg.seed * 1009 + k)
               for k, t in enumerate(tasks)]
    total, per_epoch = _budget(end, tasks, cfg)
    eval_every = per_epoch if cfg.eval_every == 0 else cfg.eval_every

    body_params, head_params = list(body.parameters()), [p for t in tasks for p in head_parameters(t.head, body)]
    opt_body = make_optimizer(body_params, cfg.lr, cfg.weight_decay, cfg)
    opt_heads = make_optimizer(head_params, cfg.head_lr, cfg.head_weight_decay, cfg)
    warmup = max(1, int(cfg.warmup_frac * total))
    # linear warm-up to the full rate at step `warmup`, then linear decay to 0 after the last step
    schedule = lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (opt_body, opt_heads)]

    # the weighting, built before the loop (META: a MetaState, Algorithm 1's "Initialize"; MT: the static w of Eq. 3)
    state = meta_state(body, tasks, cfg) if isinstance(cfg, MetaConfig) else \
        MTWeighting(body, len(tasks), cfg.weights, cfg.grad_accum)
    names = [t.name for t in tasks]
    # log: every optimizer step's info, the one record of the steps: the history's averages and the trace read it
    log, history, tokens, evaluated = [], [], dict.fromkeys(names, 0), 0
    analysis_seconds = 0.0  # time spent scoring the test split for the history (eval_test), not part of training
    best, best_state, best_alpha, since_best = -math.inf, None, None, 0
    amp = autocast(device, cfg.bf16)
    t0, first = time.perf_counter(), 1
    # what a checkpoint holds besides the loop's own variables (META: also B*_val's and phi*'s dev streams); a resumed
    # loop takes it back
    weighting, meta_streams = (state.weighting, state.streams()) if isinstance(state, MetaState) else (state, [])
    resumable = [body] + [t.head for t in tasks], [opt_body, opt_heads, *scheds], weighting, streams + meta_streams
    what = repr((_settings(cfg), names, device.type))  # a checkpoint of another loop, or another device, is refused
    saved = checkpoint.load(what) if checkpoint is not None else None
    if saved is not None:
        _load_training(saved, *resumable)
        step, log, history, tokens, evaluated, analysis_seconds, best, best_state, best_alpha, since_best, seconds = \
            saved["loop"]
        t0, first = time.perf_counter() - seconds, step + 1
    bar = progress_bar(total, cfg.progress, "train", leave=False, initial=first - 1)
    for step in range(first, total + 1):
        if checkpoint is not None and checkpoint.due():  # the state after step - 1 and its evaluation
            checkpoint.save(_training_state(*resumable), what,
                            loop=(step - 1, log, history, tokens, evaluated, analysis_seconds, best, best_state,
                                  best_alpha, since_best, time.perf_counter() - t0))
        info = step_fn(body, tasks, streams, state, cfg, amp, tokens)
        norm = clip_grad_norm(body_params + head_params, cfg.grad_clip)
        # a diverged run must never become a result: stop before the optimizer applies the step
        _check_step(info, float(norm), names, f"at optimizer step {step} of {total}")
        for o, s in zip((opt_body, opt_heads), scheds):
            o.step()
            o.zero_grad(set_to_none=True)
            s.step()
        log.append(info)
        bar.update(1)
        if end is None or cfg.eval_every < 0 or (step % eval_every and step != total):
            continue
        dev = evaluate(body, end.head, end.dev, cfg.eval_batch_size, cfg.bf16)
        _finite(dev["loss"], f"the dev loss of task '{end.name}'", f"at the evaluation after optimizer step {step}",
                "a diverged model, or a NaN in the dev data")
        curve = {}  # eval_test: the test score for learning curves only; nothing below reads it
        if cfg.eval_test and end.test is not None:
            t_test = time.perf_counter()
            curve["test"] = evaluate(body, end.head, end.test, cfg.eval_batch_size, cfg.bf16)
            analysis_seconds += time.perf_counter() - t_test
            curve["analysis_seconds"] = analysis_seconds
        history.append({"step": step, "alpha": dict(zip(names, info["alpha"])), **_averages(log[evaluated:], names),
                        "dev": dev, "seconds": time.perf_counter() - t0, **curve})
        evaluated = len(log)
        score = dev[end.metric]
        if score > best:
            best, since_best = score, 0
            best_state, best_alpha = _snapshot(body, end.head), history[-1]["alpha"]
        else:
            since_best += 1
        bar.set_postfix({f"dev_{end.metric}": f"{score:.4f}", "best": f"{best:.4f}"})
        if since_best >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        _restore(best_state, body, end.head)
    # final_alpha: alpha at the last step; best_alpha: at the evaluation of the restored (best-dev) model
    return {"history": history, "steps": step, "best_dev": best if best_state is not None else None,
            "tokens": tokens, "seconds": time.perf_counter() - t0, "final_alpha": dict(zip(names, info["alpha"])),
            "best_alpha": best_alpha, "trace": _trace(log, names)}


def _forward(body, task, stream, device, amp, tokens):
    """One micro-batch of a task: (loss, features, labels). Features are (B, T, H) or (B, H)."""
    inputs, labels = to_device(*_draw(stream, tokens, task.name), device)
    with amp:
        features = _features(body(**inputs))
        _, loss = task.head(features, labels)
    return loss, features, labels


# ----------------------------------------------------------------------------------------------------------------------
# 6. MT-TARTAN (Eq. 3): theta <- theta - beta * grad( w* L_T* + sum_i w_i L_Ti ), static w, the gradient accumulated
#    one task micro-batch at a time. The end-task alone: Eq. 2; no end-task: Eq. 1.
#    A weighting is a public object that any training loop (yours, or tartan.train) calls per micro-batch:
#    backward(losses) with every task's loss (end-task first), or task_backward(k, loss) one task at a time and then
#    step(). It writes the body's gradient into .grad (MT: sum_k w_k g_k; META: sum_k alpha_k g_k) and each head's
#    own through the ordinary backward (MT: scaled by its w_k; META: unweighted), refuses a body gradient it did not
#    put there, and returns the step's info once the step's gradient is complete (backward: None before): then step
#    your optimizer.


class TaskWeighting:
    """What MTWeighting and MetaWeighting share: the body parameters whose .grad they fill, each task's count of
    micro-batches in this optimizer step (grad_accum per task), the step's per-task losses, the check that no
    gradient they did not put there sits in the body."""

    def __init__(self, body: nn.Module, n_tasks: int, grad_accum: int = 1):
        _check_weighting(body, n_tasks, grad_accum)
        self.body = body
        self.params = [p for p in body.parameters() if p.requires_grad]  # theta_body: the parameters weighted here
        self.n_tasks, self.grad_accum = n_tasks, grad_accum
        self.steps = 0  # completed optimizer steps
        self._new_step()

    def _new_step(self):
        self._micro = [0] * self.n_tasks      # micro-batches each task has given in this optimizer step
        self._losses = [0.0] * self.n_tasks   # each task's mean loss over them

    def task_backward(self, k: int, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """One micro-batch of task k (0 = end-task): backward of its unscaled mean loss right away (the weighting
        divides by grad_accum), so that only this task's activations need be alive."""
        _check_task_backward(self, k, loss)
        self._backward(k, loss, retain_graph)
        self._micro[k] += 1
        self._losses[k] += loss.item() / self.grad_accum  # synchronises anyway: the loop checks it for NaN

    def backward(self, losses, retain_graph: bool = False, **step_inputs) -> dict | None:
        """One micro-batch of every task, losses[k] the unscaled mean loss of task k; at a step's grad_accum-th call,
        step(**step_inputs). retain_graph=True when the losses share a forward pass (several heads on one batch)."""
        if len(losses) != self.n_tasks:
            raise ValueError(f"{len(losses)} losses for a weighting of {self.n_tasks} tasks (end-task first)")
        for k, loss in enumerate(losses):
            self.task_backward(k, loss, retain_graph and k < self.n_tasks - 1)
        return self.step(**step_inputs) if self._micro[0] == self.grad_accum else None

    def _finish(self) -> list[float]:
        """The end of a step: checks that every task gave it grad_accum micro-batches; returns its per-task losses."""
        _check_step_complete(self)
        losses = self._losses
        self.steps += 1
        self._new_step()
        return losses


class MTWeighting(TaskWeighting):
    """Eq. 3 with static weights w = (w*, w_1..w_n) (default uniform 1/(n+1), Sec. 4): each task micro-batch adds
    grad(w_k L_Tk) / grad_accum to .grad, body and heads alike. step() returns {"losses", "alpha"} with alpha = w."""

    def __init__(self, body: nn.Module, n_tasks: int, weights=None, grad_accum: int = 1):
        super().__init__(body, n_tasks, grad_accum)
        if weights is not None and len(weights) != n_tasks:
            raise ValueError(f"weights has {len(weights)} entries for {n_tasks} tasks")
        self.w = torch.tensor([1.0 / n_tasks] * n_tasks if weights is None else weights, dtype=torch.float64)
        self._w = self.w.tolist()  # python floats: scaling a loss by one needs no device work

    def _backward(self, k, loss, retain_graph):
        # grad(sum_k w_k L_k) = sum_k grad(w_k L_k): one backward per task micro-batch (one backward of the weighted
        # sum would give the same gradient at K times the activation memory)
        (self._w[k] / self.grad_accum * loss).backward(retain_graph=retain_graph)

    def step(self) -> dict:
        """The step's gradient is complete in .grad; returns {"losses": per-task mean losses, "alpha": w}."""
        return {"losses": self._finish(), "alpha": list(self._w)}


def multitask_step(body, tasks, streams, weighting: MTWeighting, cfg, amp, tokens) -> dict:
    """One step of Eq. 3 for tasks = [end-task, T_1..T_n]: leaves grad(sum_k w_k L_Tk) in .grad for the optimizers."""
    device = next(body.parameters()).device
    for _ in range(weighting.grad_accum):
        for k, (task, stream) in enumerate(zip(tasks, streams)):
            weighting.task_backward(k, _forward(body, task, stream, device, amp, tokens)[0])
    return weighting.step()


# ----------------------------------------------------------------------------------------------------------------------
# 7. META-TARTAN (Eq. 6-7, Sec. 3.3, Algorithm 1 of A.3). Per step, in Algorithm 1's order:
#      g_k        = grad_theta_body L_Tk             for the end-task (k = 0) and every auxiliary task
#      phi*       = estimate_meta_head(features of B*_tr)   fitted on cached features (Sec. 3.3, A.1)
#      g_meta     = grad_theta_body L_T*(theta_body, phi*, B*_val)                                    (Eq. 7)
#      w_k       += eta * cos(g_meta, g_k)
#      alpha      = softmax(w);   theta_body -= beta_1 * sum_k alpha_k g_k;   phi_k -= beta_2 * grad phi_k L_Tk
#    Unlike the released code: the weights used at step t include the cosines of step t (Alg. 1 order); the cosine is
#    over the body parameters only, in numerator and norms alike, with an epsilon; phi* is fitted on end-task
#    *training* features (Sec. 3.3 and A.1 say training data; the release used validation data) computed once,
#    not by re-running the body 10 times.


class MetaWeighting(TaskWeighting):
    """Algorithm 1 as an object, one call per step inside any loop. It carries w (task-weight logits, "Initialize":
    equal), the (K, P) buffer G of this step's per-task body gradients, the step count and cfg (eta = meta_lr, phi*'s
    settings, meta_batch_size, cos_eps, same_head, grad_accum). Once every task's micro-batches have gone through
    task_backward (or backward), step(head_data=(features, labels), val=...) fits phi* on the first meta_batch_size
    rows of head_data (tartan.train gives B*_tr's features, or with meta_head_data="dev" a dev batch's, as the
    release; any labelled end-task batch will do), takes g_meta through phi* on `val`, updates w, and writes
    sum_k alpha_k g_k into the body's .grad; each head keeps its own, unweighted gradient. `val` is an end-task dev
    batch (inputs, labels), run as head(body(**inputs), labels) under `amp`, or a callable val(head) -> the
    validation loss through `head`. num_labels: phi*'s width C; end_head: phi', for the Eq. 6 ablation (same_head).
    Returns {"losses", "alpha", "cosines", "val_loss", "grad_norms" (|g_k|), "head_fit"}."""

    def __init__(self, body: nn.Module, n_tasks: int, num_labels: int = 0, cfg: MetaConfig | None = None,
                 end_head: nn.Module | None = None, amp=None):
        cfg = cfg or MetaConfig()
        super().__init__(body, n_tasks, cfg.grad_accum)
        _check_meta_head(cfg, num_labels, end_head)
        self.cfg, self.num_labels, self.end_head, self.amp = cfg, num_labels, end_head, amp
        self.w = torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64)  # w*, w_i = 1/(n+1); float64, CPU
        self.G = torch.empty(n_tasks, sum(p.numel() for p in self.params), device=self.params[0].device,  # (K, P)
                             dtype=torch.promote_types(self.params[0].dtype, torch.float32))  # float64 body: float64
        self._open = None  # the task whose gradient the body's .grad holds now (not yet moved into G)

    def _new_step(self):
        super()._new_step()
        self._head_data = None  # phi*'s fitting data, the first given in this step
        self._filled = [False] * self.n_tasks  # whether G[k] holds a gradient of this step yet
        self._reached = [False] * len(self.params)  # whether any task's loss reached the parameter this step

    def _backward(self, k, loss, retain_graph):
        # [g_k, g_phi] <- [grad_theta, grad_phi] L_Tk. Heads keep their gradient in .grad; the body's moves into G[k]
        # when another task's backward comes (or the step ends). The tied MLM decoder weight is the body's input
        # embedding: its gradient through the decoder is part of that MLM task's g_k.
        if self._open is not None and self._open != k:
            self._close()
        (loss / self.grad_accum).backward(retain_graph=retain_graph)
        self._open = k

    def _close(self):
        """Move the open task's body gradient into G[k] (added to what its earlier micro-batches left there)."""
        k, self._open = self._open, None
        _flat_grad(self.params, [p.grad for p in self.params], self.G[k], add=self._filled[k])
        for i, p in enumerate(self.params):
            self._reached[i] |= p.grad is not None
            p.grad = None  # the next task's backward starts from zero
        self._filled[k] = True

    def backward(self, losses, retain_graph: bool = False, head_data=None, val=None) -> dict | None:
        """As TaskWeighting.backward; head_data is kept from the first call of a step that gives it, val is used by
        the call that completes the step."""
        if head_data is not None and self._head_data is None:
            self._head_data = self._rows(*head_data)
        return super().backward(losses, retain_graph, val=val)

    def _rows(self, features, labels):
        """The first meta_batch_size rows of a batch's first-position features (B, H), detached."""
        _check_head_data(features, labels)
        x = features[:, 0] if features.dim() == 3 else features  # (B, H)
        return x[:self.cfg.meta_batch_size].detach(), labels[:self.cfg.meta_batch_size]

    def step(self, head_data=None, val=None) -> dict:
        """Algorithm 1's update for this step; see the class docstring."""
        if self._open is not None:
            self._close()
        fit_data = self._rows(*head_data) if head_data is not None else self._head_data
        _check_meta_step(val, fit_data, self.cfg)
        reached = self._reached
        losses = self._finish()
        # phi* <- estimate_meta_head(B*_tr), a new head every step; the Eq. 6 ablation (same_head) uses phi' itself
        head_star, fit = (self.end_head, None) if self.cfg.same_head else \
            estimate_meta_head(*fit_data, self.num_labels, self.cfg)
        # g_meta <- grad_theta L_T*(theta, phi*, B*_val), B*_val ~ T*_val (Eq. 7; Eq. 6 with phi')
        g_meta, val_loss = meta_gradient(self.body, head_star, val, self.params, self.amp)
        # w_k <- w_k + eta * cos(g_meta, g_k); alpha = softmax(w)
        self.w, alpha, cos = update_task_weights(self.w, self.G, g_meta, self.cfg.meta_lr, self.cfg.cos_eps)
        norms = self.G.norm(dim=-1)  # |g_k|, recorded beside the cosine: which task dominates the body's gradient
        # theta_body's gradient: sum_k alpha_k g_k (views into one buffer); the heads' gradients are already in place
        combined = alpha.to(self.G.device, self.G.dtype) @ self.G  # (P,)
        for p, g, used in zip(self.params, combined.split([p.numel() for p in self.params]), reached):
            p.grad = g.view_as(p) if used else None  # as in MT: a parameter no task used is not decayed either
        return {"losses": losses, "alpha": alpha.tolist(), "cosines": cos.tolist(), "val_loss": val_loss,
                "grad_norms": norms.tolist(),
                "head_fit": None if fit is None else fit.tolist()}  # read after g_meta's pass has synchronised


@dataclass
class MetaState:
    """What tartan.train's META step carries from step to step, built once before the loop by meta_state."""
    weighting: MetaWeighting            # w, G, the step count, phi*'s settings
    val: Stream                         # endless batches B*_val ~ D_val of the end-task
    head_rows: Stream | None = None     # meta_head_data="dev": endless dev batches that phi* is fitted on

    def streams(self) -> list[Stream]:
        return [s for s in (self.val, self.head_rows) if s is not None]


def meta_state(body: nn.Module, tasks: list[Task], cfg: MetaConfig) -> MetaState:
    """Algorithm 1's "Initialize" for tasks = [end-task, T_1..T_n]: the weighting (equal weights, the buffer G), the
    B*_val stream and, with meta_head_data="dev", phi*'s dev rows (their own generators, seeded by cfg.seed)."""
    end, device = tasks[0], next(body.parameters()).device
    weighting = MetaWeighting(body, len(tasks), end.num_labels, cfg, end_head=end.head, amp=autocast(device, cfg.bf16))
    dev = Task(end.name + ":val", end.head, train=end.dev)
    val = Stream(dev, cfg.meta_val_batch_size or cfg.meta_batch_size, cfg.seed * 1009 + 1000)
    head_rows = None if cfg.meta_head_data == "train" or cfg.same_head else \
        Stream(dev, cfg.meta_batch_size, cfg.seed * 1009 + 2000)  # apart from B*_val
    return MetaState(weighting, val, head_rows)


def estimate_meta_head(features: torch.Tensor, labels: torch.Tensor, num_labels: int, cfg: MetaConfig):
    """phi*: a new, randomly initialised classification head trained cfg.meta_head_steps full-batch AdamW steps on
    fixed body features (no graph) of end-task training examples. A new phi* at every step is what Sec. 3.3 says
    ("training the randomly initialized head phi* to convergence on a subset of the end-task training data. We do this
    every time we wish to estimate" the meta-gradient), what A.1 argues for (phi* stands in for a head fitted to the
    current body) and what the release does. Algorithm 1 can be read as a warm start (it initialises phi* once, before
    the loop); that reading is not followed, as Sec. 3.3 is explicit where the pseudo-code is not. Returns (phi*, its
    training loss at the first and last step as a (2,) tensor, None with no steps)."""
    features = features.detach()  # bf16 features (autocast) are fitted in float32; float64 ones stay float64
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    head = ClassificationHead(features.shape[-1], num_labels).to(features.device, features.dtype)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.meta_head_lr, weight_decay=cfg.meta_head_wd)
    first, seen = None, []
    for _ in range(cfg.meta_head_steps):
        _, loss = head(features, labels)
        first = loss.detach() if first is None else first
        if cfg.meta_head_tol > 0:  # "to convergence": stop once 10 steps gained less than the tolerance (a sync)
            seen.append(loss.item())
            if len(seen) > 10 and seen[-11] - seen[-1] < cfg.meta_head_tol * seen[-11]:
                break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # how far the fit went (Sec. 3.3 asks for convergence), as a tensor: reading it waits for no device work here
    return head, None if first is None else torch.stack([first, loss.detach()])


def meta_gradient(body: nn.Module, head_star: nn.Module, val, params: list[nn.Parameter], amp=None):
    """g_meta = grad_theta_body L_T*(theta_body, phi*, B*_val) as one flat (P,) vector, and the loss (a float); val
    as for MetaWeighting. Like the task gradients, and so comparable with them, it is taken in train mode (dropout on;
    the paper does not say). It leaves no trace: no .grad is touched and body buffers (BatchNorm statistics) are
    restored, so dev batches never move the model."""
    with _buffers_kept(body):  # restored after the backward pass, which may read them
        if callable(val):
            loss = val(head_star)
        else:
            inputs, labels = to_device(*val, params[0].device)
            with amp if amp is not None else autocast(params[0].device, False):
                _, loss = head_star(_features(body(**inputs)), labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return _flat_grad(params, grads), loss.item()


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a, b) of flat vectors; rows of a (K, P) against b (P,) give (K,)."""
    return (a @ b) / (a.norm(dim=-1) * b.norm() + eps)


def update_task_weights(w: torch.Tensor, task_grads: torch.Tensor, meta_grad: torch.Tensor, eta: float,
                        eps: float = 1e-8):
    """Algorithm 1: w_k <- w_k + eta * cos(g_meta, g_k) for every task, end-task included; alpha = softmax(w).
    task_grads (K, P), meta_grad (P,). Returns (new w, alpha, cosines)."""
    cos = cosine(task_grads, meta_grad, eps).to("cpu", w.dtype)
    w = w + eta * cos
    return w, torch.softmax(w, dim=0), cos


def meta_step(body, tasks, streams, state: MetaState, cfg: MetaConfig, amp, tokens) -> dict:
    """One iteration of Algorithm 1's loop for tasks = [end-task, T_1..T_n]: updates w and leaves the loop's last two
    lines in .grad (body: sum_k alpha_k g_k; heads: their own gradients) for the optimizers."""
    # B*_tr ~ T*_train, B_i ~ T_i;  [g_k, g_phi^k] <- [grad_theta, grad_phi^k] L_Tk(theta, phi^k, B_k) for every k
    b_tr = task_gradients(body, tasks, streams, state.weighting, amp, tokens)
    # phi*'s data: B*_tr's features; with meta_head_data="dev" (the release), dev rows of their own
    head_data = b_tr if state.head_rows is None else _dev_features(body, state, amp, tokens, tasks[0].name)
    # B*_val ~ T*_val, counted apart from the training tokens: the extra pass META pays for
    b_val = _draw(state.val, tokens, tasks[0].name + ":val")
    # phi* <- estimate_meta_head(B*_tr); g_meta <- grad_theta L_T*(theta, phi*, B*_val); w_k += eta cos(g_meta, g_k);
    # alpha = softmax(w); the body's .grad <- sum_k alpha_k g_k
    return state.weighting.step(head_data, b_val)


def task_gradients(body, tasks, streams, weighting: MetaWeighting, amp, tokens) -> tuple:
    """Algorithm 1's "Get end-task grads" and "Get task grads": each task's grad_accum micro-batches in turn, one
    backward each, through the weighting (which moves g_k into G). Returns B*_tr's (first micro-batch's) features and
    labels, which phi* is fitted on."""
    b_tr = None
    for k, (task, stream) in enumerate(zip(tasks, streams)):
        for _ in range(weighting.grad_accum):
            loss, features, labels = _forward(body, task, stream, weighting.G.device, amp, tokens)
            weighting.task_backward(k, loss)
            b_tr = b_tr or (features, labels)
    return b_tr


def _dev_features(body, state: MetaState, amp, tokens, end_name: str) -> tuple:
    """meta_head_data="dev": features and labels of a dev batch of phi*'s own, without a graph or a trace."""
    inputs, labels = to_device(*_draw(state.head_rows, tokens, end_name + ":head_rows"), state.weighting.G.device)
    with torch.no_grad(), amp, _buffers_kept(body):
        return _features(body(**inputs)).float(), labels


# ----------------------------------------------------------------------------------------------------------------------
# 8. Entry points: the paper's objectives, and one row of a table.


def pretrain(body, aux: list[Task], cfg: PretrainConfig | None = None, checkpoint=None) -> dict:
    """Eq. 1: theta_0 = argmin sum_i L_Ti, end-task agnostic (TAPT, DAPT; call twice, in order, for DAPT+TAPT)."""
    cfg = _mt_config(cfg or PretrainConfig())  # a MetaConfig's META fields have nothing to weight here
    return train(body, None, aux, replace(cfg, weights=cfg.weights or (1.0,) * len(aux)), checkpoint=checkpoint)


def finetune(body, end: Task, cfg: FinetuneConfig | None = None, checkpoint=None) -> dict:
    """Eq. 2: fine-tune body and end-task head on the end-task alone, early stopping on dev. A MetaConfig's META
    fields are ignored (one task has nothing to weight)."""
    return train(body, end, [], _mt_config(cfg or FinetuneConfig()), multitask_step, checkpoint)


def train_multitask(body, end: Task, aux: list[Task], cfg: TrainConfig | None = None, checkpoint=None) -> dict:
    """MT-TARTAN (Eq. 3) with static weights (default uniform). A MetaConfig is accepted: its TrainConfig fields are
    used and its META fields (meta_lr, phi*'s settings, the meta batch sizes, same_head) are ignored."""
    return train(body, end, aux, _mt_config(cfg or TrainConfig()), multitask_step, checkpoint)


def _mt_config(cfg: TrainConfig) -> TrainConfig:
    """The TrainConfig part of a MetaConfig; any other config as it is."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}) if isinstance(cfg, MetaConfig) \
        else cfg


def train_meta(body, end: Task, aux: list[Task], cfg: MetaConfig | None = None, checkpoint=None) -> dict:
    """META-TARTAN (Algorithm 1); cfg.same_head=True gives the Eq. 6 ablation."""
    return train(body, end, aux, cfg or MetaConfig(), meta_step, checkpoint)


def run_end_task(body, end: Task, aux: list[Task], mode: str, cfg: TrainConfig | None = None,
                 pretrain_cfgs: list[PretrainConfig] | None = None, checkpoint: str | None = None,
                 checkpoint_every: float = 600.0, keep_checkpoint: bool = False) -> dict:
    """One row of a table: mode in {finetune, pretrain, mt, meta}, then (for mt/meta) the optional Eq. 2 stage kept
    only if dev improves, then the test set, once, on the selected model. `pretrain` runs Eq. 1 on each auxiliary
    task in order (DAPT then TAPT for DAPT+TAPT) and then Eq. 2.
    Returns dev and test metrics; from the main stage (mt/meta, else the Eq. 2 stage) its history (per evaluation),
    final_alpha (alpha after the last step), best_alpha (alpha at the selected evaluation) and trace (per step);
    and every stage's own result under "stages". checkpoint: a file path where the run saves its progress (at most
    every checkpoint_every seconds, at each stage's end) and from which, if it is there, an interrupted call with the
    same arguments continues, to the uninterrupted result ("resumed": the wall and CPU seconds the interrupted calls
    spent up to their last save); the files go once the run is done, or with keep_checkpoint stay until the caller
    has stored the result and calls remove_checkpoint(checkpoint) (a call meanwhile takes the result from them)."""
    if mode not in ("finetune", "pretrain", "mt", "meta"):
        raise ValueError(f"unknown mode '{mode}' (finetune, pretrain, mt, meta)")
    cfg = cfg or {"meta": MetaConfig, "mt": TrainConfig}.get(mode, FinetuneConfig)()
    cfg = _mt_config(cfg) if mode == "mt" else cfg  # MT with a MetaConfig: its META fields are unused
    # before any stage runs, pre-training included
    check_tasks(end, aux if mode in ("mt", "meta") else [], cfg, meta=True if mode == "meta" else None)
    if end.test is None or not len(end.test):
        raise ValueError(f"end-task '{end.name}' has {'no' if end.test is None else 'an empty'} test split: "
                         f"run_end_task scores the selected model on it")
    seeded = lambda c: replace(c, seed=cfg.seed)  # sub-stages follow the run's seed  # noqa: E731
    if mode == "pretrain":
        pretrain_cfgs = pretrain_cfgs or [PretrainConfig()] * len(aux)
        if len(pretrain_cfgs) != len(aux):
            raise ValueError(f"{len(pretrain_cfgs)} pre-training configs for {len(aux)} auxiliary tasks")
    out = {"mode": mode, "stages": []}
    stage = _Stages(checkpoint, checkpoint_every, [body, end.head] + [t.head for t in aux],
                    repr((mode, _settings(cfg), [_settings(c) for c in pretrain_cfgs] if mode == "pretrain" else None,
                          [t.name for t in [end] + aux])), out["stages"])
    if mode == "pretrain":
        for i, (task, pcfg) in enumerate(zip(aux, pretrain_cfgs)):
            stage(f"pretrain:{task.name}", _pretrain_stage, body, aux, i, seeded(pcfg))
    if mode in ("pretrain", "finetune"):
        stage("finetune", finetune, body, end, cfg)
    else:
        main = stage(mode, train_meta if mode == "meta" else train_multitask, body, end, aux, cfg)
        if cfg.final_finetune is not None:
            stage("final_finetune", _final_finetune, body, end, seeded(cfg.final_finetune), main["best_dev"])
    out["dev"] = evaluate(body, end.head, end.dev, cfg.eval_batch_size, cfg.bf16)
    out["test"] = evaluate(body, end.head, end.test, cfg.eval_batch_size, cfg.bf16, predictions=True)
    out["test_predictions"] = out["test"].pop("predictions")  # the predicted class of every test example, in order
    out["metric"] = end.metric
    main = next(s for s in reversed(out["stages"]) if s["stage"] in ("mt", "meta", "finetune"))
    out.update({k: main[k] for k in ("history", "final_alpha", "best_alpha", "trace")})
    out["resumed"] = stage.done(remove=not keep_checkpoint)
    return out


def _pretrain_stage(body, aux: list[Task], i: int, cfg: PretrainConfig, checkpoint=None) -> dict:
    """Eq. 1 on aux[i]; DAPT+TAPT: TAPT continues DAPT's LM head."""
    if i > 0 and isinstance(aux[i].head, MLMHead) and isinstance(aux[i - 1].head, MLMHead):
        aux[i].head.load_state_dict(aux[i - 1].head.state_dict())
    return pretrain(body, [aux[i]], cfg, checkpoint=checkpoint)


def _final_finetune(body, end: Task, cfg: FinetuneConfig, main_best_dev, checkpoint=None) -> dict:
    """The optional Eq. 2 stage after MT/META (Sec. 3.1), kept only if it improves end-task dev."""
    before = _snapshot(body, end.head)
    ft = finetune(body, end, cfg, checkpoint)
    ft["kept"] = ft["best_dev"] is not None and (main_best_dev is None or ft["best_dev"] > main_best_dev)
    if not ft["kept"]:
        _restore(before, body, end.head)
    return ft


# ----------------------------------------------------------------------------------------------------------------------
# 9. Evaluation: macro-F1 and micro-F1 always both (micro-F1 = accuracy for single-label classification).


def f1_scores(y_true, y_pred) -> dict:
    """Macro-F1 over the classes present in gold or predictions (as scikit-learn), and micro-F1 (= accuracy)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"macro_f1": float(np.mean(f1s)), "micro_f1": float(np.mean(y_true == y_pred)), "n": int(len(y_true))}


@torch.no_grad()
def evaluate(body, head, data, batch_size: int = 64, bf16: bool = False, predictions: bool = False) -> dict:
    """Metrics of body + head on a labelled split, in eval mode (no dropout), without autograd; bf16 autocast on CUDA
    when asked (train passes its cfg.bf16). Restores the previous train/eval mode. predictions=True adds the
    predicted class of every example, in order."""
    if data.labels is None:
        raise ValueError("evaluate scores a labelled split; this one has no labels (an MLM task's text)")
    device, modes = next(body.parameters()).device, (body.training, head.training)
    body.eval(), head.eval()
    preds, total_loss = [], 0.0
    for i in range(0, len(data), batch_size):
        inputs, labels = to_device(*data.batch(list(range(i, min(i + batch_size, len(data))))), device)
        with autocast(device, bf16):
            logits, loss = head(_features(body(**inputs)), labels)
        preds.append(logits.argmax(-1).cpu())
        total_loss += loss.float().item() * len(labels)
    body.train(modes[0]), head.train(modes[1])
    gold = data.labels if isinstance(data.labels, list) else data.labels.tolist()
    preds = torch.cat(preds).numpy()
    return {**f1_scores(gold, preds), "loss": total_loss / len(data),
            **({"predictions": preds.tolist()} if predictions else {})}


# ----------------------------------------------------------------------------------------------------------------------
# 10. Significance (A.2): unpaired two-sample permutation test of per-seed scores.


def permutation_test(a, b, n_permutations: int = 10_000, seed: int = 0) -> dict:
    """H0: the scores of a and b come from one distribution. Statistic: mean(a) - mean(b). Enumerates every split
    of the pooled scores when there are at most n_permutations of them (exact), else draws n_permutations random
    splits (numpy Generator seeded by `seed`). p-values: two-sided, 'greater' (H1: a > b) and 'less' (H1: a < b),
    each counting the splits at least as extreme as the observed one (the observed split is among them); and
    min_p_greater, min_p_two_sided: the smallest p that this many scores a side can give."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 1 or len(b) < 1:
        raise ValueError("permutation_test needs at least one score on each side")
    pooled, n = np.concatenate([a, b]), len(a)
    observed = a.mean() - b.mean()
    n_splits = math.comb(len(pooled), n)
    exact = n_splits <= n_permutations
    picks = np.array(list(itertools.combinations(range(len(pooled)), n))) if exact else \
        np.random.default_rng(seed).permuted(np.tile(np.arange(len(pooled)), (n_permutations, 1)), axis=1)[:, :n]
    in_a = np.zeros((len(picks), len(pooled)), dtype=bool)  # (S, n + len(b)): the scores each split gives a
    np.put_along_axis(in_a, picks, True, axis=1)
    diffs = (in_a @ pooled) / n - (~in_a @ pooled) / (len(pooled) - n)
    tol, extra = 1e-12 * max(1.0, abs(observed)), int(not exact)  # sampled: the observed split counts once more
    p = lambda hits: float((hits.sum() + extra) / (len(diffs) + extra))  # noqa: E731
    return {"diff": float(observed), "p_two_sided": p(np.abs(diffs) >= abs(observed) - tol),
            "p_greater": p(diffs >= observed - tol), "p_less": p(diffs <= observed + tol),
            "n_permutations": int(len(diffs)), "exact": exact,
            # the smallest p these sample sizes can give: of one split alone (exact; two-sided, with equal sizes, a
            # split and its mirror), or of the observed split alone (sampled)
            "min_p_greater": 1 / (len(diffs) + extra),
            "min_p_two_sided": (2 if n == len(b) else 1) / n_splits if exact else 1 / (n_permutations + 1)}


# ======================================================================================================================
# APPENDIX: what the method needs but the paper does not describe. (A) reading files and building tasks,
# (B) contracts and divergence, (C) plumbing.


# ----------------------------------------------------------------------------------------------------------------------
# A. Reading files and building tasks: the "Don't Stop Pretraining" JSONL format ({"text", "label", ...} per
#    line), plain line files, tokenisation, and the task builders.


def read_jsonl(path: str) -> tuple[list[str], list[str], list[int]]:
    """Texts, labels and line numbers of a JSONL split. Blank lines are skipped; anything else malformed is an error."""
    texts, labels, lines, empty = [], [], [], []
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            where = f"{e.msg.removesuffix(' at')} at character {e.pos + 1}"  # json's msg may end in a bare "at"
            raise DataError(f"{path}, line {lineno}: malformed JSON ({where})") from None
        except (ValueError, RecursionError) as e:  # a key given twice; arrays nested past Python's stack
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
        texts.append(obj["text"])
        labels.append(str(obj["label"]))
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
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
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
    """A class label as tartan takes it, from a file or in memory: a non-empty string or an integer (a bool is
    neither)."""
    return isinstance(x, (str, int, np.integer)) and not isinstance(x, bool) and x != ""


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
                raise DataError(f"{where(split, i) if where else f'{split} split, example {i}'}: label {label!r} "
                                f"never appears in {train} (train labels: {', '.join(map(str, vocab))})")
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


@dataclass
class TextData:
    """Tokenised examples of one split (labels None for an MLM corpus); batches are padded to their longest row."""
    ids: list[list[int]]
    labels: list[int] | None
    pad_id: int

    def __len__(self):
        return len(self.ids)

    def batch(self, idx) -> tuple[dict, torch.Tensor | None]:
        rows = [self.ids[i] for i in idx]
        input_ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):
            input_ids[r, :len(row)] = torch.tensor(row)
            attention_mask[r, :len(row)] = 1
        labels = None if self.labels is None else torch.tensor([self.labels[i] for i in idx])
        return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def _text_data(tokenizer, texts: list[str], labels: list[int] | None, max_length: int, limit: int | None) -> TextData:
    """A fixed random subset of at most `limit` examples (see subset), tokenised."""
    keep = subset(len(texts), limit)
    return TextData(tokenize(tokenizer, [texts[i] for i in keep], max_length),
                    None if labels is None else [labels[i] for i in keep], tokenizer.pad_token_id)


@dataclass
class TensorData:
    """Examples already in a tensor (e.g. images) for a plain torch module body called as body(x=...). x and labels
    may also be numpy arrays or lists (x in float64 from numpy or a list becomes torch's default float dtype; a torch
    tensor keeps its dtype). labels are class ids 0..C-1: any integer dtype, or whole-number floats, become int64
    (what cross-entropy needs); anything else is a TypeError naming the argument."""
    x: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        x = _as_tensor(self.x, "TensorData x", "the examples, one row each")
        if not isinstance(self.x, torch.Tensor) and x.dtype == torch.float64:
            x = x.to(torch.get_default_dtype())  # numpy's and Python's float64 -> the dtype torch modules have
        labels = _as_tensor(self.labels, "TensorData labels", "integer class ids 0..C-1")
        if labels.dtype == torch.bool or labels.is_complex() or (
                labels.is_floating_point() and not torch.equal(labels, labels.round())):
            raise TypeError(f"TensorData labels must be integer class ids 0..C-1, not {_describe(self.labels)} "
                            f"(map each class to an integer first, e.g. with sorted(set(labels)))")
        if labels.dim() != 1 or len(labels) != len(x):
            raise ValueError(f"TensorData labels must be one class id per row of x: labels {tuple(labels.shape)}, "
                             f"x {tuple(x.shape)}")
        self.x, self.labels = x, labels.long()

    def __len__(self):
        return len(self.x)

    def batch(self, idx) -> tuple[dict, torch.Tensor]:
        idx = torch.as_tensor(idx)
        return {"x": self.x[idx]}, self.labels[idx]


def _as_tensor(value, name: str, what: str) -> torch.Tensor:
    """A tensor from a tensor, numpy array or (nested) list of numbers; a TypeError naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be numbers ({what}) as a tensor, numpy array or list, not "
                        f"{_describe(value)}") from None


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
            _check_classes(name, C)
            kept = [(d, torch.tensor(subset(len(d), limit), dtype=torch.long)) for d in tensors]
            train, dev, test = (TensorData(d.x[idx], d.labels[idx]) for d, idx in kept)
            return Task(name, ClassificationHead(hidden_size, C, dropout), train, dev=dev, test=test, num_labels=C,
                        metric=metric)
        splits = _numbered({s: _text_pairs(f"end-task '{name}', {s} split", data[s]) for s in names}, "train",
                           lambda s, i: f"end-task '{name}', {s} split, example {i}")
    else:
        raise TypeError(f"end-task '{name}': data must be a folder of {{train,dev,test}}.jsonl or a dict with keys "
                        f"'train', 'dev', 'test' of (texts, labels) or (x, labels), not {_describe(data)}"
                        + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    check_tokenizer(tokenizer, f"end-task '{name}'")
    _check_classes(name, len(splits["labels"]))
    train, dev, test = (_text_data(tokenizer, *splits[s], max_length, limit) for s in names)
    return Task(name, ClassificationHead(hidden_size, len(splits["labels"]), dropout), train, dev=dev, test=test,
                num_labels=len(splits["labels"]), metric=metric)


def _check_classes(name: str, C: int) -> None:
    """An end-task with one class has a loss of 0 whatever the body does, and an F1 of 1: nothing to learn."""
    if C < 2:
        raise DataError(f"end-task '{name}': its train split has one class: a classifier needs at least two")


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


def new_mlm_head(template: MLMHead, body: nn.Module, init: str = "checkpoint") -> MLMHead:
    """A separate MLM head phi^i per auxiliary task, copied from `template` (the checkpoint's head); weights shared
    with the body (the tied decoder, the body's input embedding) stay shared and are never reset. init="checkpoint"
    keeps the checkpoint's weights; init="random" re-initialises every weight the head owns (torch's default layer
    initialisation, loose biases zero) from torch's global generator, as Algorithm 1 says ("randomly initialize
    phi^i")."""
    if init not in ("checkpoint", "random"):
        raise ValueError(f"init must be 'checkpoint' or 'random', not '{init}'")
    head = copy.deepcopy(template, {id(p): p for p in body.parameters()})
    if init == "random":
        body_ids, done = {id(p) for p in body.parameters()}, set()
        for m in head.modules():  # a layer that holds a body weight (the tied decoder) is not reset
            own = list(m.parameters(recurse=False))
            if own and hasattr(m, "reset_parameters") and not any(id(p) in body_ids for p in own):
                m.reset_parameters()
                done |= {id(p) for p in own}
        with torch.no_grad():
            for name, p in head.named_parameters():  # left over: parameters outside any resettable layer
                if id(p) in body_ids or id(p) in done:
                    continue
                if p.dim() > 1:
                    raise ValueError(f"cannot re-initialise the MLM head weight '{name}': it is in no layer with "
                                     f"reset_parameters")
                p.zero_()  # a loose bias, e.g. the vocabulary bias of the (tied) decoder
    return head


def from_pretrained(name_or_path: str):
    """(body, MLM head, tokenizer) from a hub id or a local directory. The MLM head is the checkpoint's pretrained
    LM head when it has one; when it has none (e.g. a sentence-embedding checkpoint) transformers initialises it
    newly, with the decoder tied to the input embeddings, from torch's global generator: seed it first so that the
    new head is the same in every run. Returns also the names of newly initialised weights."""
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    name_or_path = os.path.expanduser(name_or_path)
    local = os.path.isdir(name_or_path)
    if not local and (name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path
                      or name_or_path.count("/") > 1):
        raise FileNotFoundError(f"model '{name_or_path}': no such local directory")
    if local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"model '{name_or_path}': the directory has no config.json (not a model saved by "
                                f"transformers' save_pretrained)")
    offline = None if local else hub_unreachable()  # a Hub id with no network: the local cache only, at once
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
    # a folder without its tokenizer files loads an empty tokenizer (its special tokens alone), which would turn
    # every word into [UNK] without a word said
    if len(tokenizer) < getattr(model.config, "vocab_size", 0) // 2:
        raise FileNotFoundError(f"model '{name_or_path}': its tokenizer has {len(tokenizer)} tokens for the model's "
                                f"{model.config.vocab_size}: the tokenizer files are missing or are another model's")
    body, mlm_head = split_masked_lm(model)
    return body, mlm_head, tokenizer, sorted(info["missing_keys"])


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


def split_masked_lm(model: nn.Module) -> tuple[HFBody, MLMHead]:
    """A transformers *ForMaskedLM model -> (body, MLM head). The head keeps the tied decoder weight, which is the
    body's input embedding: that parameter is counted as body (see head_parameters)."""
    heads = [m for _, m in model.named_children() if m is not model.base_model]
    if len(heads) != 1:
        raise ValueError(f"cannot find the LM head of {type(model).__name__}")
    return HFBody(model.base_model), MLMHead(heads[0])


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


# ----------------------------------------------------------------------------------------------------------------------
# B. Contracts and divergence: checked before the first step, and at every step.


def check_tasks(end: Task | None, aux: list[Task], cfg: TrainConfig, meta: bool | None = None) -> None:
    """The contracts the loops rely on, checked before the first step: a broken one is a ValueError naming the task
    and what is wrong (rather than an IndexError deep in a step, or tasks silently merged). meta: whether META-TARTAN
    runs (None: whether cfg is a MetaConfig)."""
    meta = isinstance(cfg, MetaConfig) if meta is None else meta
    if meta and not isinstance(cfg, MetaConfig):
        raise TypeError(f"META-TARTAN (train_meta) needs a MetaConfig, not {type(cfg).__name__}")
    _check_config(cfg, meta)
    if not isinstance(aux, (list, tuple)):
        raise TypeError(f"aux must be a list of Tasks, not {type(aux).__name__}")
    if meta and cfg.weights is not None:
        raise ValueError("META-TARTAN starts from equal weights (Algorithm 1); leave weights=None")
    tasks = ([end] if end is not None else []) + list(aux)
    names, heads = set(), {}
    for t in tasks:
        if t.name in names:  # names key the weights, losses and token counts: a repeated one would merge two tasks
            raise ValueError(f"two tasks are named '{t.name}': task names must be unique")
        names.add(t.name)
        if id(t.head) in heads:
            raise ValueError(f"tasks '{heads[id(t.head)]}' and '{t.name}' share one head object: each task needs its "
                             f"own head (tartan.new_mlm_head makes one per MLM task)")
        heads[id(t.head)] = t.name
        for split, data in (("train", t.train), ("dev", t.dev), ("test", t.test)):
            if data is not None and not all(hasattr(data, a) for a in ("batch", "labels", "__len__")):
                raise TypeError(f"task '{t.name}': its {split} split is a {type(data).__name__}, not a dataset as "
                                f"TextData and TensorData are (tartan.TensorData(x, labels) wraps tensors)")
        if not len(t.train):
            raise ValueError(f"task '{t.name}': its train split is empty")
        if t.masking is None and t.train.labels is None:
            raise ValueError(f"task '{t.name}': its training data has no labels and the task has no masking (an MLM "
                             f"task needs Masking; tartan.mlm_task sets it)")
        # classes C: num_labels, else the width of a ClassificationHead (a task built by hand may not set it)
        out = t.head.mlp[-1].out_features if isinstance(t.head, ClassificationHead) else None
        C = t.num_labels or out or 0
        for split, data in (("train", t.train), ("dev", t.dev), ("test", t.test)):
            if C > 0 and data is not None and data.labels is not None and len(data):
                labels = torch.as_tensor(data.labels)
                bad = labels[(labels < 0) | (labels >= C)]
                if len(bad):
                    raise ValueError(f"task '{t.name}': its {split} split has label {bad[0].item()}, outside "
                                     f"0..{C - 1} (" + (f"num_labels={C}" if t.num_labels else
                                                        f"its head predicts {C} classes; num_labels is not set")
                                     + ")")
        if t.num_labels > 0 and out is not None and out != t.num_labels:
            raise ValueError(f"{'end-task' if t is end else 'task'} '{t.name}': its head predicts {out} classes but "
                             f"num_labels={t.num_labels}")
        if t is end and C > 0:  # a task built by hand: a one-class end-task has nothing to learn
            _check_classes(t.name, C)
    if cfg.weights is not None and len(cfg.weights) != len(tasks):
        raise ValueError(f"weights has {len(cfg.weights)} entries for {len(tasks)} tasks ({[t.name for t in tasks]})")
    if end is None:
        return
    if (end.dev is None or not len(end.dev)) and (cfg.eval_every >= 0 or meta):
        raise ValueError(f"end-task '{end.name}' has {'no' if end.dev is None else 'an empty'} dev split: model "
                         f"selection needs one" + (", and META-TARTAN draws B*_val from it" if meta else ""))
    if end.metric not in ("macro_f1", "micro_f1"):
        raise ValueError(f"end-task '{end.name}': metric must be 'macro_f1' or 'micro_f1', not '{end.metric}'")
    if meta and cfg.meta_head_data not in ("train", "dev"):
        raise ValueError(f"meta_head_data must be 'train' or 'dev', not '{cfg.meta_head_data}'")
    if meta and cfg.head_rows_short():
        raise ValueError(f"meta_batch_size={cfg.meta_batch_size} > batch_size={cfg.batch_size}: phi* is fitted on "
                         f"rows of the end-task micro-batch B*_tr, which has only {cfg.batch_size} (a larger B*_val "
                         f"is meta_val_batch_size)")
    if meta and not cfg.same_head and end.num_labels < 1:
        raise ValueError(f"end-task '{end.name}' has num_labels={end.num_labels}: META-TARTAN fits its meta head "
                         f"phi* with one output per class, so set Task(..., num_labels=C) (end_task sets it)")


def _check_tied_heads(body: nn.Module, tasks: list[Task]) -> None:
    """An MLM head whose decoder should be tied to this body's input embedding (an HFBody whose config ties them)
    but holds another body's: an MLM task built for another body (mlm_task ties to the body it is given), which would
    train that body's embedding, not this one's."""
    encoder = getattr(body, "encoder", None)
    if not (isinstance(body, HFBody) and getattr(encoder.config, "tie_word_embeddings", False)):
        return
    embedding = encoder.get_input_embeddings().weight
    for t in tasks:
        if isinstance(t.head, MLMHead) and not any(p is embedding for p in t.head.parameters()) and any(
                p.shape == embedding.shape for p in t.head.parameters()):
            raise ValueError(f"task '{t.name}': its MLM head's decoder is not tied to this body's input embedding, "
                             f"as the checkpoint's config says: it was built for another body (build the MLM task "
                             f"again with this body: tartan.mlm_task(..., body, ...))")


def _check_config(cfg: TrainConfig, meta: bool) -> None:
    """Settings no run can train with (a negative batch would loop forever, a zero one divide by zero), or that
    would silently train something else (patience 0 stops at the first evaluation, improved or not)."""
    at_least_one = ["batch_size", "aux_batch_size", "grad_accum", "eval_batch_size", "patience"]
    if meta:
        at_least_one += ["meta_batch_size"] + ([] if cfg.same_head else ["meta_head_steps"])
    at_least_zero = ["max_steps", "lr", "head_lr", "weight_decay", "head_weight_decay", "adam_eps", "grad_clip"]
    if meta:
        at_least_zero += ["meta_lr", "meta_val_batch_size", "meta_head_lr", "meta_head_wd", "meta_head_tol"]
    for name in at_least_one + at_least_zero:
        value = getattr(cfg, name)
        low = 1 if name in at_least_one else 0
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            raise ValueError(f"{type(cfg).__name__}.{name}={value!r}: must be a number of at least {low}")
    if cfg.max_steps == 0 and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"{type(cfg).__name__}.epochs={cfg.epochs!r}: must be above 0 (or set max_steps)")
    if cfg.eval_every < -1:
        raise ValueError(f"{type(cfg).__name__}.eval_every={cfg.eval_every}: steps between evaluations, 0 = once "
                         f"per epoch, -1 = never")
    if not 0 <= cfg.warmup_frac <= 1:
        raise ValueError(f"{type(cfg).__name__}.warmup_frac={cfg.warmup_frac}: a fraction of the steps, in [0, 1]")
    if cfg.weights is not None and not all(math.isfinite(w) and w >= 0 for w in cfg.weights):
        raise ValueError(f"weights={cfg.weights}: Eq. 3's task weights must be finite and non-negative")


class DataError(ValueError):
    """Bad input data. The message names the file and, where there is one, the line."""


class DivergedError(RuntimeError):
    """A training loss turned NaN or infinite: the run stops, and no result of it should be reported."""


def _finite(value: float, what: str, where: str, hint: str = ""):
    if not math.isfinite(value):
        raise DivergedError(f"{what} is {value} {where}{f' ({hint})' if hint else ''}; the run is stopped")


def _check_step(info: dict, norm: float, names: list[str], where: str):
    """A DivergedError if a step's task loss, META's validation loss or cosine, or the gradient norm is not finite."""
    for name, loss in zip(names, info["losses"]):
        _finite(loss, f"the loss of task '{name}'", where, "learning rate too high?")
    if "val_loss" in info:
        _finite(info["val_loss"], f"META's validation loss of task '{names[0]}' (for g_meta, on B*_val)", where)
        for name, c in zip(names, info["cosines"]):
            _finite(c, f"cos(g_meta, g_k) of task '{name}'", where, "a gradient turned NaN or infinite")
    _finite(norm, f"the gradient norm of tasks {names}", where, "learning rate too high?")


def _check_weighting(body, n_tasks: int, grad_accum: int):
    if not isinstance(body, nn.Module):
        raise TypeError(f"body must be the shared torch module (nn.Module), not {type(body).__name__}")
    if n_tasks < 1 or grad_accum < 1:
        raise ValueError(f"n_tasks={n_tasks} and grad_accum={grad_accum} must both be at least 1")
    if not any(p.requires_grad for p in body.parameters()):
        raise ValueError("body has no parameter that requires a gradient: there is nothing to weight")


def _check_task_backward(weighting, k: int, loss):
    """A micro-batch's loss as task_backward needs it: a scalar with a graph, of a task the weighting has, that has
    not yet given its grad_accum micro-batches this step; at a step's first backward, no foreign body gradient."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise TypeError(f"the loss of task {k} must be a scalar tensor with a graph (the mean loss of its "
                        f"micro-batch, not detached, not .item()), not {_describe(loss)}")
    if not 0 <= k < weighting.n_tasks:
        raise IndexError(f"task index {k}: this weighting has {weighting.n_tasks} tasks (0 = end-task)")
    if weighting._micro[k] >= weighting.grad_accum:
        raise ValueError(f"task {k} gave more than grad_accum={weighting.grad_accum} micro-batches in one optimizer "
                         f"step: call step() (or let backward() call it) before the next one")
    # a body gradient the weighting did not put there (your own backward, or the last step's not cleared) would be
    # mixed silently into the weighted sum; zeros (zero_grad(set_to_none=False)) are fine: only then is there a sync
    held = [p.grad for p in weighting.params if p.grad is not None] if not any(weighting._micro) else []
    if held and bool(torch.stack([g.ne(0).any() for g in held]).any()):
        raise ValueError(
            f"the body's .grad already holds a gradient that this {type(weighting).__name__} did not put there "
            f"(step {weighting.steps + 1}): clear gradients after each optimizer step (optimizer.zero_grad()), "
            f"backward nothing into the body yourself, and for gradient accumulation give the weighting "
            f"grad_accum=N and call it once per micro-batch with unscaled losses")


def _check_step_complete(weighting):
    short = [k for k, m in enumerate(weighting._micro) if m != weighting.grad_accum]
    if short:
        raise ValueError(f"step() with tasks {short} short of grad_accum={weighting.grad_accum} micro-batches "
                         f"(got {[weighting._micro[k] for k in short]}): every task gives each step grad_accum "
                         f"micro-batches")


def _check_meta_head(cfg: MetaConfig, num_labels: int, end_head):
    if cfg.same_head and end_head is None:
        raise ValueError("cfg.same_head=True takes g_meta through the end-task head phi' (Eq. 6): give end_head")
    if not cfg.same_head and num_labels < 1:
        raise ValueError(f"num_labels={num_labels}: phi* has one output per end-task class, so give "
                         f"num_labels=C (the end-task's number of classes)")


def _check_head_data(features, labels):
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"head_data must be (features, labels) tensors, not ({_describe(features)}, "
                        f"{_describe(labels)})")


def _check_meta_step(val, fit_data, cfg: MetaConfig):
    if val is None:
        raise ValueError("META's step needs val: a batch (inputs, labels) of end-task dev data B*_val, or a "
                         "callable val(head) -> the end-task validation loss through head")
    if fit_data is None and not cfg.same_head:
        raise ValueError("META's step needs head_data=(features, labels): end-task features of B*_tr (or of "
                         "another labelled end-task batch) and their labels, to fit phi*")


# ----------------------------------------------------------------------------------------------------------------------
# C. Plumbing: devices, autocast, token counts, the progress bar, snapshots, checkpoints to resume from, clipping,
#    head parameters, the flat gradient, the optimizers, the per-step log's history averages, and the step budget.


def to_device(inputs: dict, labels, device):
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, labels.to(device, non_blocking=True)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked, for training and evaluation alike; a disabled context elsewhere (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def _features(out) -> torch.Tensor:
    """The body's output, which must be the features tensor itself (B, T, H) or (B, H), else a TypeError."""
    if isinstance(out, torch.Tensor):
        return out
    fix = "return outputs.last_hidden_state (tartan.HFBody wraps a Hugging Face encoder so)" \
        if hasattr(out, "last_hidden_state") else "return the features tensor alone (e.g. outputs[0])"
    raise TypeError(f"the body returned {_describe(out)}, but tartan's heads take one features tensor (B, T, H) or "
                    f"(B, H): make the body's forward {fix}")


def _describe(x) -> str:
    """A value's type, and its shape and dtype for a tensor or array, for error messages."""
    shape = getattr(x, "shape", None)
    return type(x).__name__ + ("" if shape is None else f" of shape {tuple(shape)}, dtype {getattr(x, 'dtype', '?')}")


def _draw(stream, tokens: dict, key: str) -> tuple:
    """The next batch (inputs, labels) of a stream, its tokens (or rows, without an attention mask) counted under
    `key` in `tokens` (a task's name, or one of META's extra passes); on the CPU, before the batch moves."""
    inputs, labels = next(stream)
    n = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else len(next(iter(inputs.values())))
    tokens[key] = tokens.get(key, 0) + n
    return inputs, labels


def progress_bar(total, enabled: bool, desc: str, **tqdm_args):
    """A tqdm bar (tqdm_args passed on), or, not enabled, an object with the same methods that shows nothing."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, **tqdm_args)

    class _Silent:
        update = set_description = set_postfix = close = lambda *a, **k: None
    return _Silent()


def _snapshot(body, head):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (body, head)]


def _restore(snapshot, body, head):
    for m, sd in zip((body, head), snapshot):
        m.load_state_dict(sd)


class Checkpoint:
    """A file that a training loop saves its state to (at most every `every` seconds: due()) and that a new process
    resumes from; written atomically, so that an interrupted save leaves the last one. A file that another run wrote
    (its `what` differs) is an error, never resumed. clock: the run's start, moved back on resume by the wall and CPU
    seconds that interrupted processes spent up to their last save ("before")."""

    def __init__(self, path: str, every: float = 600.0, clock: dict | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # now, not as a warning at the first save
        self.path, self.every, self.last = path, every, time.perf_counter()
        self.clock = clock or {"wall": time.perf_counter(), "cpu": time.process_time(), "before": None}

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def save(self, state: dict, what: str, **more) -> None:
        if self.every == math.inf:  # an earlier save failed: the run goes on without saving
            return
        spent = time.perf_counter() - self.clock["wall"], time.process_time() - self.clock["cpu"]
        tmp = None
        try:
            # a temporary file of this save's own: two processes saving one path never write into one file
            fd, tmp = tempfile.mkstemp(".tmp", os.path.basename(self.path) + ".", os.path.dirname(self.path) or ".")
            with os.fdopen(fd, "wb") as f:
                torch.save({**state, **more, "what": what, "spent": spent}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk must not end a run that can finish without its checkpoint
            warnings.warn(f"could not save the checkpoint {self.path} ({e}); the run goes on without saving")
            self.every = math.inf
            if tmp is not None:  # mkstemp itself may have failed, leaving no file to clean up
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        self.last = time.perf_counter()

    def load(self, what: str) -> dict | None:
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)  # this run's own file: Python objects
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # cut off (a crash, a full disk)
            warnings.warn(f"the checkpoint {self.path} cannot be read ({type(e).__name__}: {e}); this part of the run "
                          f"starts again, and its next save replaces the file")
            return None
        if saved.get("what") != what:
            raise ValueError(f"{self.path} holds the progress of another run (other arguments or tasks): delete it, "
                             f"or give this run another checkpoint path")
        wall, cpu = saved["spent"]
        self.clock.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                          before={"wall_seconds": wall, "cpu_seconds": cpu})
        self.last = time.perf_counter()
        return saved

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _Stages:
    """run_end_task's stages, in order: stage i runs with a Checkpoint of its own (`path`.stage<i>) and is saved at its
    end (its result, the models, the random state) to `path`; or, if an interrupted call saved it, its result is taken
    from there."""

    def __init__(self, path: str | None, every: float, modules: list[nn.Module], what: str, results: list):
        self.path, self.every, self.modules, self.what, self.results = path, every, modules, what, results
        self.record = Checkpoint(path, every) if path else None
        saved = self.record.load(what) if path else None
        self.finished = saved["stages"] if saved else []
        if saved:
            _load_training(saved, modules)

    def _inner(self, i: int) -> Checkpoint | None:
        return Checkpoint(f"{self.path}.stage{i}", self.every, self.record.clock) if self.path else None

    def __call__(self, name: str, fn, *args) -> dict:
        i = len(self.results)
        self.results.append(self.finished[i] if i < len(self.finished) else
                            {"stage": name, **fn(*args, checkpoint=self._inner(i))})
        if self.record is not None and i >= len(self.finished):
            self.record.save(_training_state(self.modules), self.what, stages=self.results)
            self._inner(i).remove()
        return self.results[-1]

    def done(self, remove: bool = True) -> dict | None:
        """Removes the files (remove_checkpoint); the time the interrupted calls spent (None if there were none, or no
        checkpoint)."""
        if self.record is None:
            return None
        if remove:
            remove_checkpoint(self.path)
        return self.record.clock["before"]


def remove_checkpoint(path: str) -> None:
    """Removes run_end_task's checkpoint files at `path`: the record of finished stages and each stage's own."""
    for stage in sorted(glob.glob(glob.escape(path) + ".stage*")):
        if not stage.endswith(".tmp"):  # a save in progress (another process's) is its own
            with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                os.remove(stage)
    Checkpoint(path).remove()


def _settings(cfg: TrainConfig | None) -> TrainConfig | None:
    """cfg as a checkpoint is checked against: without the progress bar, which changes no number (a resumed run may
    turn it off)."""
    if cfg is None:
        return None
    return replace(cfg, progress=False, final_finetune=_settings(cfg.final_finetune))


def _training_state(modules, optimizers=(), weighting: TaskWeighting | None = None, streams=()) -> dict:
    """What a resumed loop needs: modules and optimizers (schedulers too) by state_dict, the weighting's w and step
    count, each stream's number of draws, the random state (dropout, initialisation): the CPU's, and the GPU's that
    the body is on (that one only, so that a run resumes on another GPU, or on a machine with fewer)."""
    device = next(modules[0].parameters()).device
    return {"modules": [m.state_dict() for m in modules], "optimizers": [o.state_dict() for o in optimizers],
            "weighting": None if weighting is None else (weighting.w, weighting.steps),
            "drawn": [s.drawn for s in streams], "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _load_training(saved: dict, modules, optimizers=(), weighting: TaskWeighting | None = None, streams=()) -> None:
    for m, sd in zip(modules, saved["modules"]):
        m.load_state_dict(sd)
    for o, sd in zip(optimizers, saved["optimizers"]):
        o.load_state_dict(sd)
    if saved["weighting"] is not None:
        weighting.w, weighting.steps = saved["weighting"]
    for stream, n in zip(streams, saved["drawn"]):
        stream.replay(n)
    torch.set_rng_state(saved["rng"])
    device = next(modules[0].parameters()).device
    if saved["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, but gradients are touched only when clipping happens (torch multiplies them by
    min(1, max_norm / norm) always, to spare a sync; the loop syncs on the losses anyway). Returns the norm."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if 0 < max_norm < norm:  # max_norm 0: no clipping, the norm only
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def head_parameters(head: nn.Module, body: nn.Module) -> list[nn.Parameter]:
    """Parameters of a head that are not body parameters (a tied decoder weight belongs to the body)."""
    body_ids = {id(p) for p in body.parameters()}
    return [p for p in head.parameters() if id(p) not in body_ids]


@contextlib.contextmanager
def _buffers_kept(body: nn.Module):
    """Restores the body's buffers (e.g. BatchNorm running statistics) after a forward pass on dev rows."""
    saved = [(b, b.clone()) for b in body.buffers()]
    yield
    with torch.no_grad():
        for b, value in saved:
            b.copy_(value)


def _flat_grad(params, grads, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """Per-parameter gradients -> one (P,) vector, zeros for a parameter without one: a new tensor, or written into
    `out` (add=True: added to it)."""
    flat = [torch.zeros(p.numel(), device=p.device, dtype=p.dtype) if g is None else g.reshape(-1)
            for p, g in zip(params, grads)]
    if out is None:
        return torch.cat(flat)
    return out.add_(torch.cat(flat)) if add else torch.cat(flat, out=out)


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, cfg: TrainConfig):
    decay = [p for p in params if p.dim() >= 2]  # biases and LayerNorm/BatchNorm weights get no decay
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:  # the fused kernel: the same update in one pass over the parameters rather than a loop over them
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.adam_eps)


def _column(log: list[dict], key: str) -> list:
    """One value of the per-step log over its steps, where the step has it (META's keys: only META steps)."""
    return [info[key] for info in log if info.get(key) is not None]


def _averages(log: list[dict], names: list[str]) -> dict:
    """A history entry's per-step values averaged since the evaluation before: task losses; META: cos(g_meta, g_k),
    the loss on B*_val, and phi*'s training loss at its first and last fitting step."""
    cos, val, fit = (_column(log, key) for key in ("cosines", "val_loss", "head_fit"))
    return {"losses": dict(zip(names, np.mean(_column(log, "losses"), axis=0).tolist())),
            "cosines": dict(zip(names, np.mean(cos, axis=0).tolist())) if cos else None,
            "meta_val_loss": float(np.mean(val)) if val else None,
            "meta_head_fit_loss": np.mean(fit, axis=0).tolist() if fit else None}


def _trace(log: list[dict], names: list[str]) -> dict:
    """Per task, alpha (META: also cos(g_meta, g_k) and |g_k|) at every optimizer step, step s at index s - 1; and
    META's validation loss per step."""
    per_task = lambda key: {n: list(v) for n, v in zip(names, zip(*_column(log, key)))} or None  # noqa: E731
    return {"alpha": per_task("alpha"), "cosines": per_task("cosines"), "grad_norms": per_task("grad_norms"),
            "meta_val_loss": _column(log, "val_loss") or None}


def _budget(end: Task | None, tasks: list[Task], cfg: TrainConfig) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch); an epoch is a pass over the task with the most batches."""
    sizes = [math.ceil(len(t.train) / (cfg.batch_size if t is end else cfg.aux_batch_size)) for t in tasks]
    per_epoch = max(1, math.ceil(max(sizes) / cfg.grad_accum))
    return (cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))), per_epoch
