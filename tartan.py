"""TARTAN: end-task aware training (Dery, Michel, Talwalkar, Neubig, ICLR 2022, https://arxiv.org/abs/2109.07437).

Rather than continued pre-training (DAPT/TAPT, Eq. 1) then fine-tuning (Eq. 2), train the end-task T* with auxiliary
objectives T_1..T_n: MT-TARTAN (Eq. 3) with static weights w; META-TARTAN (Eq. 7, Algorithm 1) with weights learned
from cos(g_meta, g_i), g_meta the end-task validation gradient through a fitted meta head phi* (Sec. 3.3). Sections:
1 body and heads, 2 masking, 3 tasks, 4 configs, 5 the loop, 6 MT-TARTAN, 7 META-TARTAN, 8 entry points, 9 evaluation,
10 the permutation test (A.2); appendix: A data, B contracts, C plumbing. Shapes: B batch, T tokens, H hidden,
C classes, V vocabulary, M masked positions, P body parameters, K = n + 1 tasks (end-task first). Where the paper and
the authors' released code disagree, this file follows the paper except where it says otherwise (the README lists each
departure). Data order and masking use generators seeded by the config; initialisation and dropout use torch's global
generator, which the caller seeds.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# 1. Body and heads (Sec. 2: theta = [theta_body; phi^1..phi^n, phi']; Sec. 4 "Model details"). A head maps
#    (features, labels) to (logits, mean loss); features are (B, T, H) token features or (B, H).

class HFBody(nn.Module):
    """The shared body theta_body: a Hugging Face encoder, (input_ids, attention_mask) -> features (B, T, H)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.hidden_size = encoder, encoder.config.hidden_size

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)

class ClassificationHead(nn.Module):
    """phi', phi*: Sec. 4's MLP on the first-token feature, as the release: Dropout, Linear, Tanh, Dropout, Linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, features, labels=None):
        """(B, T, H) or (B, H) features, (B,) class ids or None -> (logits (B, C), mean loss or None)."""
        _require(features.dim() in (2, 3), f"a ClassificationHead takes body features (B, H) or token features "
                 f"(B, T, H), not {tuple(features.shape)}: pool or flatten them to (B, H) in the body's forward")
        x = features[:, 0] if features.dim() == 3 else features  # (B, H)
        h = self.mlp[1].in_features
        _require(x.shape[-1] == h, f"a ClassificationHead built for hidden_size={h} got body features "
                 f"{tuple(features.shape)}: build it with hidden_size={x.shape[-1]}")
        logits = self.mlp(x)  # (B, C)
        return logits, None if labels is None else F.cross_entropy(logits.float(), labels)

class MLMHead(nn.Module):
    """MLM head phi^i: the checkpoint's LM head (its decoder tied to the embeddings), only at masked positions."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, features, labels):
        """(B, T, H) features, (B, T) labels -> (logits (M, V), mean loss over the M masked positions)."""
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
        _require(tokenizer.mask_token_id is not None, f"tokenizer {type(tokenizer).__name__} has no mask token: it "
                 f"cannot drive an MLM task")
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))))

def mask_tokens(input_ids, attention_mask, masking: Masking, generator: torch.Generator):
    """(B, T) ids -> (corrupted ids, labels), driven only by `generator`."""
    special = torch.isin(input_ids, torch.tensor(masking.special_ids)) | (attention_mask == 0)
    chosen = (torch.rand(input_ids.shape, generator=generator) < masking.prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    v = torch.rand(input_ids.shape, generator=generator)  # splits the chosen tokens 80/10/10
    to_mask = chosen & (v < masking.mask_frac)
    to_random = chosen & (v >= masking.mask_frac) & (v < masking.mask_frac + masking.random_frac)
    random_ids = torch.randint(masking.vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, masking.mask_id), input_ids)
    return torch.where(to_random, random_ids, corrupted), labels

# ----------------------------------------------------------------------------------------------------------------------
# 3. Tasks: T = (loss, data) (Sec. 2). A task owns its head and its training data; the end-task also has dev/test.

@dataclass
class Task:
    name: str
    head: nn.Module                            # phi' (end-task) or phi^i: head(features, labels) -> (logits, loss)
    train: TextData | TensorData
    masking: Masking | None = None             # set for MLM tasks: batches are corrupted by mask_tokens
    dev: TextData | TensorData | None = None   # end-task only
    test: TextData | TensorData | None = None  # end-task only; scored for the selected model (eval_test: curves)
    num_labels: int = 0                        # classes C; META's phi* needs it
    metric: str = "macro_f1"                   # headline metric: "macro_f1" or "micro_f1" (Table 1)

def batches(task: Task, batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs of (inputs, labels), MLM tasks masked; an epoch's last partial batch is dropped (unless
    the data is smaller than one batch)."""
    while True:
        order = torch.randperm(len(task.train), generator=generator).tolist()
        last = len(order) - batch_size + 1 if len(order) >= batch_size else 1
        for i in range(0, last, batch_size):
            inputs, labels = task.train.batch(order[i:i + batch_size])
            if task.masking is not None:
                inputs["input_ids"], labels = mask_tokens(inputs["input_ids"], inputs["attention_mask"],
                                                          task.masking, generator)
            yield inputs, labels

# ----------------------------------------------------------------------------------------------------------------------
# 4. Configs hold the paper's values (Sec. 4) and, where the paper is silent, those of the authors' launch scripts
#    ("release": ldery/TARTAN run_{mt,meta}_multiple.sh) or of Gururangan et al. (2020), App. B.

@dataclass
class TrainConfig:
    """MT-TARTAN (Eq. 3). Also the base of the other configs."""
    lr: float = 1e-4                  # beta_1, body learning rate (release's AdamW; Sec. 4 says "Adam")
    head_lr: float = 1e-3             # beta_2, head learning rate (release; in Sec. 4's grid {1e-3, 1e-4, 1e-5})
    weight_decay: float = 0.01        # body AdamW decay, none on biases and norm weights (release)
    head_weight_decay: float = 0.1    # heads (release)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (release)
    adam_eps: float = 1e-6            # AdamW (release)
    warmup_frac: float = 0.06         # linear warm-up over 6% of the steps, then linear decay to 0 (release)
    grad_clip: float = 1.0            # max global gradient norm, 0 = off (release)
    batch_size: int = 64              # |B*_tr|, end-task micro-batch (release)
    aux_batch_size: int = 64          # |B_i|, auxiliary micro-batch (release)
    grad_accum: int = 2               # micro-batches per step (64 x 2 = 128: the release's pick of Sec. 4's 128-512)
    epochs: float = 150               # passes over the largest training set (release; early stopping ends sooner)
    max_steps: int = 0                # optimizer steps; 0 = derived from epochs
    eval_every: int = 30              # steps between end-task dev evaluations (release); 0 = once per epoch; -1 = never
    patience: int = 20                # stop after this many evaluations without a strictly better dev score (release)
    eval_batch_size: int = 64
    weights: tuple[float, ...] | None = None  # Eq. 3's (w*, w_1..w_n), used as given; None = uniform 1/(n+1) (Sec. 4)
    seed: int = 0                     # data order and masking
    bf16: bool | None = None          # bf16 autocast: None = on CUDA only; True = also on a CPU with native bf16
    progress: bool = False            # tqdm progress bar
    eval_test: bool = False           # also score test at every evaluation, for learning curves only (never selects)
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
    """The optional Eq. 2 stage after MT/META (release: lr 5e-6, batch 64, <=10 epochs, patience 3)."""
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
    meta_head_steps: int = 10         # phi*'s full-batch steps (Sec. 4), from a new init at every step (Sec. 3.3)
    meta_head_lr: float = 1e-3        # phi* AdamW learning rate (Sec. 4)
    meta_head_wd: float = 0.1         # phi* decay 0.1 (Sec. 4 "l2 weight decay"), decoupled as in AdamW (release)
    meta_batch_size: int = 32         # rows that fit phi* (Sec. 4: {16, 32}); at most batch_size with "train" rows
    meta_val_batch_size: int = 0      # |B*_val|; 0 = meta_batch_size (the paper gives no size for B*_val)
    meta_head_data: str = "train"     # phi*'s rows: "train" = the first rows of B*_tr (Sec. 3.3, A.1); "dev" = a dev
    #                                   batch of their own (the release)
    meta_head_tol: float = 0.0        # > 0: phi*'s fit stops once 10 steps lower its loss by less than this fraction
    #                                   ("to convergence", Sec. 3.3); 0 = always meta_head_steps (Sec. 4)
    same_head: bool = False           # True: meta gradient through phi' itself (Eq. 6), the ablation of Fig. 3
    cos_eps: float = 1e-8             # epsilon in cos(a, b) = a.b / (|a||b| + eps)

    def head_rows_short(self) -> bool:  # phi* would need more rows than B*_tr holds
        return not self.same_head and self.meta_head_data == "train" and self.meta_batch_size > self.batch_size

# ----------------------------------------------------------------------------------------------------------------------
# 5. The training loop, one for every mode: Eq. 1 (no end-task), Eq. 2 (no auxiliary task), Eq. 3 and Algorithm 1.

def train(body: nn.Module, end: Task | None, aux: list[Task], cfg: TrainConfig, step_fn=None, hook=None) -> dict:
    """Evaluates dev every cfg.eval_every steps; keeps the best-dev body and head by end.metric (release; Sec. 3.1: dev
    loss); stops after cfg.patience evaluations without a new best; restores the best; NaN/inf loss: DivergedError.
    hook(event, loop): called with "start" before the first step (it may restore a saved Loop), "step" before each."""
    check_tasks(end, aux, cfg, meta=True if step_fn is meta_step else None, body=body)
    tasks = ([end] if end is not None else []) + list(aux)
    step_fn = step_fn or (meta_step if isinstance(cfg, MetaConfig) else multitask_step)
    device = _device(body)
    body.train()
    for t in tasks:
        t.head.to(device).train()
    # one generator per task (data order and masking): the end-task's batches do not depend on the other tasks
    streams = [Stream(t, cfg.batch_size if t is end else cfg.aux_batch_size, cfg.seed * 1009 + k)
               for k, t in enumerate(tasks)]
    total, eval_every = _budget(end, tasks, cfg)
    body_params, head_params = list(body.parameters()), [p for t in tasks for p in head_parameters(t.head, body)]
    opts = [make_optimizer(body_params, cfg.lr, cfg.weight_decay, cfg),
            make_optimizer(head_params, cfg.head_lr, cfg.head_weight_decay, cfg)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, _warmup_then_linear_decay(total, cfg.warmup_frac)) for o in opts]
    # the weighting, built before the loop (META: Algorithm 1's "Initialize"; MT: the static w of Eq. 3)
    state = meta_state(body, tasks, cfg) if isinstance(cfg, MetaConfig) else \
        MTWeighting(body, len(tasks), cfg.weights, cfg.grad_accum)
    weighting, meta_streams = (state.weighting, state.streams()) if isinstance(state, MetaState) else (state, [])
    names = [t.name for t in tasks]
    loop = Loop(cfg, names, [body] + [t.head for t in tasks], opts + scheds, weighting, streams + meta_streams,
                tokens=dict.fromkeys(names, 0))
    amp = autocast(device, cfg.bf16)
    if hook is not None:
        hook("start", loop)
    t0 = time.perf_counter() - loop.seconds
    bar = progress_bar(total, cfg.progress, "train", leave=False, initial=loop.step)
    while loop.step < total and loop.since_best < cfg.patience:
        if hook is not None:
            loop.seconds = time.perf_counter() - t0
            hook("step", loop)
        step = loop.step + 1
        info = step_fn(body, tasks, streams, state, cfg, amp, loop.tokens, sync=False)
        # the step's one read from the device; a diverged run must never become a result: stop before the optimizer
        info = read_step(info, grad_norm=clip_grad_norm(body_params + head_params, cfg.grad_clip))
        _check_step(info, info.pop("grad_norm"), names, f"at optimizer step {step} of {total}")
        for o, s in zip(opts, scheds):
            o.step()
            o.zero_grad(set_to_none=True)
            s.step()
        loop.step = step
        loop.log.append(info)
        bar.update(1)
        if end is not None and cfg.eval_every >= 0 and (step % eval_every == 0 or step == total):
            score = _evaluation(loop, body, end, t0)
            bar.set_postfix({f"dev_{end.metric}": f"{score:.4f}", "best": f"{loop.best:.4f}"})
    bar.close()
    if loop.best_state is not None:
        _restore(loop.best_state, body, end.head)
    # final_alpha: alpha at the last step; best_alpha: at the evaluation of the restored (best-dev) model
    return {"history": loop.history, "steps": loop.step,
            "best_dev": loop.best if loop.best_state is not None else None, "tokens": loop.tokens,
            "seconds": time.perf_counter() - t0, "final_alpha": dict(zip(names, loop.log[-1]["alpha"])),
            "best_alpha": loop.best_alpha, "trace": _trace(loop.log, names)}

# ----------------------------------------------------------------------------------------------------------------------
# 6. MT-TARTAN (Eq. 3): theta <- theta - beta * grad( w* L_T* + sum_i w_i L_Ti ), static w. The end-task alone: Eq. 2;
#    no end-task: Eq. 1. A weighting (MT or META) is called per micro-batch by any loop and returns the step's info
#    once the step's gradient is complete in .grad (None before): then step your optimizer.

class TaskWeighting:
    """What the weightings share: the body parameters whose .grad they fill, each task's micro-batches this step.
    scaler: fp16's torch.amp.GradScaler. A DistributedDataParallel body is averaged over the ranks once per step."""

    def __init__(self, body: nn.Module, n_tasks: int, grad_accum: int = 1, scaler=None, weights=None):
        _check_weighting(body, n_tasks, grad_accum, weights)
        self.body, self.scaler, self.n_tasks, self.grad_accum = body, scaler, n_tasks, grad_accum
        self.steps, self.group, self._undo = 0, _ddp_group(body), None  # steps done; DDP group; fp16 META's undo
        self._set_params([p for p in body.parameters() if p.requires_grad])
        self._new_step()

    def _set_params(self, params):
        self.params = params  # theta_body: picked up again when requires_grad changes (META: or the body is recast)
        self._kept = None  # within a step, per parameter: its .grad as this weighting left it, their versions

    def _new_step(self):
        self._micro = [0] * self.n_tasks      # micro-batches each task has given in this optimizer step
        self._losses = [0.0] * self.n_tasks   # each task's mean loss over them

    def task_backward(self, k: int, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """One micro-batch of task k (0 = end-task): backward of its unscaled mean loss now (divided by grad_accum)."""
        _check_task_backward(self, k, loss)
        self._backward(k, loss if self.scaler is None else self.scaler.scale(loss), retain_graph)
        self._kept = [(p.grad, p.grad._version if p.grad is not None else 0, p._version) for p in self.params]
        self._micro[k] += 1
        self._losses[k] = self._losses[k] + loss.detach() / self.grad_accum  # on the device: no sync

    def backward(self, losses, retain_graph: bool = False, **step_inputs) -> dict | None:
        """One micro-batch of every task (losses[k] unscaled, end-task first); the grad_accum-th call of a step
        returns step(**step_inputs). retain_graph=True when the losses share one forward pass."""
        _require(len(losses) == self.n_tasks, f"{len(losses)} losses for a weighting of {self.n_tasks} tasks "
                 f"(end-task first)")
        for k, loss in enumerate(losses):
            self.task_backward(k, loss, retain_graph and k < self.n_tasks - 1)
        return self.step(**step_inputs) if self._micro[0] == self.grad_accum else None

    def _finish(self) -> torch.Tensor:
        """The end of a complete step: returns its per-task losses (K,)."""
        _check_step_complete(self)
        losses, self.steps, self._kept = torch.stack(self._losses), self.steps + 1, None
        self._new_step()
        return losses

    def state_dict(self) -> dict:
        """What a resumed loop needs (taken between optimizer steps): w, the step count, and fp16 META's undo state."""
        _require(not any(self._micro), "state_dict() within an optimizer step: save after the step")
        return {"w": self.w.detach().cpu().clone(), "steps": self.steps, "undo": _undo_on(self._undo, "cpu"),
                "kind": type(self).__name__}  # MT's w are Eq. 3's weights, META's the logits of alpha

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        self.w, self.steps = torch.as_tensor(state["w"], dtype=torch.float64).to(self.w.device), state["steps"]
        self._w, self._undo = self.w.tolist(), _undo_on(state.get("undo"), self.w.device)  # _w: MT's loss scales

class MTWeighting(TaskWeighting):
    """Eq. 3 with static weights w = (w*, w_1..w_n) (default uniform 1/(n+1), Sec. 4): each task micro-batch adds
    grad(w_k L_Tk) / grad_accum to .grad, body and heads alike. step() returns {"losses", "alpha"} with alpha = w."""

    def __init__(self, body: nn.Module, n_tasks: int, weights=None, grad_accum: int = 1, scaler=None):
        super().__init__(body, n_tasks, grad_accum, scaler, weights)
        self.w = torch.tensor([1.0 / n_tasks] * n_tasks if weights is None else weights, dtype=torch.float64)
        self._w = self.w.tolist()  # python floats: scaling a loss by one needs no device work

    def _backward(self, k, loss, retain_graph):
        # grad(sum_k w_k L_k) = sum_k grad(w_k L_k): one backward per task micro-batch, at 1/K of the activation memory
        (self._w[k] / self.grad_accum * loss).backward(retain_graph=retain_graph)

    def step(self, sync: bool = True) -> dict:
        """The step's gradient is complete in .grad: {"losses": per-task mean losses, "alpha": w} (sync=False: on
        the device)."""
        _check_grads_kept(self)
        info = {"losses": self._finish(), "alpha": list(self._w)}
        if self.group is not None:  # one all-reduce: the body's gradient and the losses, averaged over the ranks
            info["losses"] = _mean_grads_over_ranks(self.params, info["losses"], self.group)
        return read_step(info) if sync else info

def multitask_step(body, tasks, streams, weighting: MTWeighting, cfg, amp, tokens, sync: bool = True) -> dict:
    """One step of Eq. 3 for tasks = [end-task, T_1..T_n]: leaves grad(sum_k w_k L_Tk) in .grad."""
    device = next(body.parameters()).device
    for _ in range(weighting.grad_accum):
        for k, (task, stream) in enumerate(zip(tasks, streams)):
            weighting.task_backward(k, _forward(body, task, stream, device, amp, tokens)[0])
    return weighting.step(sync=sync)

# ----------------------------------------------------------------------------------------------------------------------
# 7. META-TARTAN (Eq. 6-7, Sec. 3.3, Algorithm 1 of A.3). Per step, in Algorithm 1's order:
#      g_k        = grad_theta_body L_Tk             for the end-task (k = 0) and every auxiliary task
#      phi*       = estimate_meta_head(features of B*_tr)   fitted on cached features (Sec. 3.3, A.1)
#      g_meta     = grad_theta_body L_T*(theta_body, phi*, B*_val)                                    (Eq. 7)
#      w_k       += eta * cos(g_meta, g_k)
#      alpha      = softmax(w);   theta_body -= beta_1 * sum_k alpha_k g_k;   phi_k -= beta_2 * grad phi_k L_Tk
#    Unlike the released code: step t's weights include step t's cosines (Alg. 1's order and cosine ascent; Sec. 3.2's
#    prose and Eq. 6-7's dot products read otherwise); the cosine is over the body only, numerator and norms, with an
#    epsilon; phi* is fitted on end-task *training* features (Sec. 3.3, A.1), computed once, not by re-running the body.

class MetaWeighting(TaskWeighting):
    """Algorithm 1 as an object: w (logits, equal at first), G (K, P) the step's body gradients. step(head_data, val)
    fits phi* on head_data's (features, labels) first meta_batch_size rows, takes g_meta through phi* on val (a dev
    batch (inputs, labels), or val(head) -> loss), updates w (unless a gradient is non-finite) and writes sum_k alpha_k
    g_k into the body's .grad (heads keep their own). num_labels: phi*'s C; end_head: phi' (same_head); amp: g_meta's
    autocast (None: the one step ran in). Returns losses, alpha, cosines, val_loss, grad_norms, head_fit, skipped."""

    def __init__(self, body: nn.Module, n_tasks: int, num_labels: int = 0, cfg: MetaConfig | None = None,
                 end_head: nn.Module | None = None, amp=None, scaler=None):
        cfg = cfg or MetaConfig(grad_accum=1)  # without a config, one micro-batch a step, as MTWeighting
        super().__init__(body, n_tasks, cfg.grad_accum, scaler)
        _check_meta_head(cfg, num_labels, end_head, body)
        self.cfg, self.num_labels, self.end_head, self.amp = cfg, num_labels, end_head, amp
        self._warned, self._seen = False, _AutocastSeen.on(body)  # warned; the autocast the body's forwards run in
        self.w = torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64, device=self.G.device)  # beside G: no sync
        self._open = None  # the task whose gradient the body's .grad holds now (not yet moved into G)

    def _set_params(self, params):
        super()._set_params(params)
        self.G = torch.empty(self.n_tasks, sum(p.numel() for p in params), device=params[0].device,  # (K, P)
                             dtype=torch.promote_types(params[0].dtype, torch.float32))  # float64 body: float64
        self.w = self.w.to(self.G.device) if hasattr(self, "w") else None  # a body moved after building: w follows
        self._reached = [False] * len(params)

    def _new_step(self):
        super()._new_step()
        self._head_data = None  # phi*'s fitting data, the first given in this step
        self._filled = [False] * self.n_tasks  # whether G[k] holds a gradient of this step yet
        self._reached = [False] * len(self.params)  # whether any task's loss reached the parameter this step

    def _backward(self, k, loss, retain_graph):
        # [g_k, g_phi] <- [grad_theta, grad_phi] L_Tk; the body's part moves into G[k] when another task's backward
        # comes (a tied MLM decoder is the body's embedding: its gradient is part of that task's g_k)
        if self._open is not None and self._open != k:
            self._close()
        (loss / self.grad_accum).backward(retain_graph=retain_graph)
        self._open = k

    def _close(self):
        """Moves the open task's body gradient into G[k] (added to what its earlier micro-batches left there)."""
        k, self._open, self._kept = self._open, None, None  # already checked: _kept must not keep the moved .grad alive
        _flat_grad(self.params, [p.grad for p in self.params], self.G[k], add=self._filled[k])
        for i, p in enumerate(self.params):
            self._reached[i] |= p.grad is not None
            p.grad = None  # the next task's backward starts from zero
        self._filled[k] = True

    def backward(self, losses, retain_graph: bool = False, head_data=None, val=None) -> dict | None:
        """As TaskWeighting.backward; head_data: kept from the step's first call that gives it; val: used at its end."""
        if head_data is not None and self._head_data is None:
            self._head_data = _head_rows(self, *head_data)
        return super().backward(losses, retain_graph, val=val)

    def step(self, head_data=None, val=None, sync: bool = True) -> dict:
        """Algorithm 1's update for this step; see the class docstring (sync=False: values as tensors)."""
        _check_grads_kept(self)
        with torch.autocast(self.G.device.type, enabled=False), torch.enable_grad():  # G's math in fp32, always
            if self._open is not None:
                self._close()
            fit_data = _head_rows(self, *head_data) if head_data is not None else self._head_data
            _check_meta_step(self, val, fit_data)
            reached, losses = self._reached, self._finish()
            # DDP: G averaged over the ranks while phi* is fitted
            G = None if self.group is None else _mean_over_ranks(self.G, self.group, async_op=True)
            # phi* <- estimate_meta_head(B*_tr), a new head every step; the Eq. 6 ablation (same_head) uses phi'
            head_star, fit = (self.end_head, None) if self.cfg.same_head else \
                estimate_meta_head(*fit_data, self.num_labels, self.cfg)
            if G is not None and fit is not None:  # DDP: the first rank's phi* on every rank
                _broadcast_head(head_star, self.group)
            # g_meta <- grad_theta L_T*(theta, phi*, B*_val), B*_val ~ T*_val (Eq. 7; Eq. 6 with phi')
            amp = self.amp if self.amp is not None else torch.autocast(  # the training's autocast, as its forwards
                self.G.device.type, self._seen.dtype or torch.bfloat16, enabled=self._seen.dtype is not None)
            g_meta, val_loss = meta_gradient(self.body, head_star, val, self.params, amp, self.scaler)
            if G is not None:  # DDP: g_meta, its loss and the losses averaged over the ranks (a second all-reduce)
                g_meta, val_loss, losses, reached = _mean_meta_over_ranks(g_meta, val_loss, losses, reached, self.group)
                G.wait()
            # w_k <- w_k + eta * cos(g_meta, g_k); alpha = softmax(w); a non-finite cosine (fp16 overflow, which the
            # GradScaler skips) leaves w as it was, and so does a step the scaler skipped after a head overflowed
            w0 = _w_before_skipped_step(self)
            w, alpha, cos = update_task_weights(w0, self.G, g_meta, self.cfg.meta_lr, self.cfg.cos_eps)
            finite = cos.isfinite().all()
            self.w, alpha = torch.where(finite, w, w0), torch.where(finite, alpha, torch.softmax(w0, dim=0))
            # theta_body's gradient: sum_k alpha_k g_k (views into one buffer); the heads' gradients are already there
            combined = alpha.to(self.G.device, self.G.dtype) @ self.G  # (P,)
            for p, g, used in zip(self.params, combined.split([p.numel() for p in self.params]), reached):
                p.grad = g.view_as(p).to(p.dtype) if used else None  # as in MT: a parameter no task used is not decayed
            info = {"losses": losses, "alpha": alpha, "cosines": cos, "val_loss": val_loss,
                    "grad_norms": self.G.norm(dim=-1), "head_fit": fit, "skipped": ~finite}  # |g_k| beside cos
        return read_step(info) if sync else info

def estimate_meta_head(features: torch.Tensor, labels: torch.Tensor, num_labels: int, cfg: MetaConfig):
    """phi*: a new ClassificationHead trained cfg.meta_head_steps full-batch AdamW steps on fixed features (B, H), at
    every step (Sec. 3.3). Returns (phi*, its loss at the first and last step as a (2,) tensor, or None)."""
    features = features.detach().to(torch.promote_types(features.dtype, torch.float32))  # bf16 fitted in float32
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
    return head, None if first is None else torch.stack([first, loss.detach()])

def meta_gradient(body: nn.Module, head_star: nn.Module, val, params: list[nn.Parameter], amp=None, scaler=None):
    """g_meta = grad_theta_body L_T*(theta_body, phi*, B*_val), flat (P,), and the loss; in train mode, as the g_k
    are, leaving .grad and the body's buffers (BatchNorm statistics) alone; fp16: scaled as the g_k by scaler."""
    device = params[0].device
    with _buffers_kept(body), amp if amp is not None else autocast(device, False):
        if callable(val):
            loss = val(head_star)
        else:  # a tensor is the body's one input; a dict its keyword arguments
            inputs, labels = (v.to(device) for v in val) if torch.is_tensor(val[0]) else to_device(*val, device)
            _, loss = head_star(_features(body(inputs) if torch.is_tensor(inputs) else body(**inputs)), labels)
        grads = _val_grads(loss, params, scaler)
    return _flat_grad(params, grads).to(torch.promote_types(params[0].dtype, torch.float32)), loss.detach()  # as G

def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a, b) of flat vectors; rows of a (K, P) against b (P,) give (K,)."""
    return (a @ b) / (a.norm(dim=-1) * b.norm() + eps)

def update_task_weights(w: torch.Tensor, task_grads: torch.Tensor, meta_grad: torch.Tensor, eta: float,
                        eps: float = 1e-8):
    """Algorithm 1: w_k <- w_k + eta * cos(g_meta, g_k) for every task, end-task included; alpha = softmax(w).
    task_grads (K, P), meta_grad (P,). Returns (new w, alpha, cosines)."""
    cos = cosine(task_grads, meta_grad, eps).to(w.device, w.dtype)
    w = w + eta * cos
    return w, torch.softmax(w, dim=0), cos

def meta_step(body, tasks, streams, state: MetaState, cfg: MetaConfig, amp, tokens, sync: bool = True) -> dict:
    """One iteration of Algorithm 1's loop for tasks = [end-task, T_1..T_n]: updates w and leaves its last two lines
    in .grad (body: sum_k alpha_k g_k; heads: their own gradients)."""
    # B*_tr ~ T*_train, B_i ~ T_i;  [g_k, g_phi^k] <- [grad_theta, grad_phi^k] L_Tk(theta, phi^k, B_k) for every k
    b_tr = task_gradients(body, tasks, streams, state.weighting, amp, tokens)
    # phi*'s data: B*_tr's features; with meta_head_data="dev" (the release), dev rows of their own
    head_data = b_tr if state.head_rows is None else _dev_features(body, state, amp, tokens, tasks[0].name)
    # B*_val ~ T*_val, counted apart from the training tokens: the extra pass META pays for
    b_val = _draw(state.val, tokens, tasks[0].name + ":val")
    # phi* <- estimate_meta_head(B*_tr); g_meta; w_k += eta cos(g_meta, g_k); the body's .grad <- sum_k alpha_k g_k
    return state.weighting.step(head_data, b_val, sync=sync)

def task_gradients(body, tasks, streams, weighting: MetaWeighting, amp, tokens) -> tuple:
    """Algorithm 1's "Get end-task grads" and "Get task grads": each task's grad_accum micro-batches in turn, through
    the weighting (which moves g_k into G). Returns phi*'s rows of the first micro-batch (B*_tr) and their labels."""
    b_tr = None
    for k, (task, stream) in enumerate(zip(tasks, streams)):
        for _ in range(weighting.grad_accum):
            loss, features, labels = _forward(body, task, stream, weighting.G.device, amp, tokens)
            weighting.task_backward(k, loss)
            b_tr = b_tr or _head_rows(weighting, features, labels)  # only phi*'s rows outlive the pass
    return b_tr

# ----------------------------------------------------------------------------------------------------------------------
# 8. Entry points: the paper's objectives, and one row of a table. `hook` is train's.

def pretrain(body, aux: list[Task], cfg: PretrainConfig | None = None, hook=None) -> dict:
    """Eq. 1: theta_0 = argmin sum_i L_Ti, end-task agnostic (TAPT, DAPT; call twice, in order, for DAPT+TAPT)."""
    cfg = _mt_config(cfg or PretrainConfig())
    return train(body, None, aux, replace(cfg, weights=cfg.weights or (1.0,) * len(aux)), hook=hook)

def finetune(body, end: Task, cfg: FinetuneConfig | None = None, hook=None) -> dict:
    """Eq. 2: body and end-task head on the end-task alone, early stopping on dev (META fields unused)."""
    return train(body, end, [], _mt_config(cfg or FinetuneConfig()), multitask_step, hook)

def train_multitask(body, end: Task, aux: list[Task], cfg: TrainConfig | None = None, hook=None) -> dict:
    """MT-TARTAN (Eq. 3), static weights (default uniform); META fields and final_finetune (run_end_task's) unused."""
    return train(body, end, aux, _mt_config(cfg or TrainConfig()), multitask_step, hook)

def train_meta(body, end: Task, aux: list[Task], cfg: MetaConfig | None = None, hook=None) -> dict:
    """META-TARTAN (Algorithm 1); cfg.same_head=True gives the Eq. 6 ablation; final_finetune is run_end_task's."""
    return train(body, end, aux, cfg or MetaConfig(), meta_step, hook)

def run_end_task(body, end: Task, aux: list[Task], mode: str, cfg: TrainConfig | None = None,
                 pretrain_cfgs: list[PretrainConfig] | None = None, stage=None) -> dict:
    """One row of a table: "finetune" (Eq. 2), "pretrain" (Eq. 1 per auxiliary task, in order, then Eq. 2), "mt" or
    "meta" (then the Eq. 2 stage, kept if dev improves); then test, once. Returns dev and test metrics,
    test_predictions, the stages' results, the main stage's history, alphas and trace. stage(name, fn, *args) ->
    {"stage": name, **fn(*args, hook=...)} runs each stage (experiments/resume.py resumes through it)."""
    _require(mode in ("finetune", "pretrain", "mt", "meta"), f"unknown mode '{mode}' (finetune, pretrain, mt, meta)")
    cfg = cfg or {"meta": MetaConfig, "mt": TrainConfig}.get(mode, FinetuneConfig)()
    cfg = _mt_config(cfg) if mode == "mt" else cfg
    check_tasks(end, aux if mode in ("mt", "meta") else [], cfg, meta=True if mode == "meta" else None, body=body)
    _check_run(end, cfg if mode in ("mt", "meta") else None)
    pretrain_cfgs = pretrain_cfgs or [PretrainConfig()] * len(aux)
    if mode == "pretrain":
        _require(len(pretrain_cfgs) == len(aux), f"{len(pretrain_cfgs)} pre-training configs for {len(aux)} "
                 f"auxiliary tasks")
    stage, stages = stage or _run_stage, []
    if mode == "pretrain":
        for i, pcfg in enumerate(pretrain_cfgs):  # sub-stages follow the run's seed
            stages.append(stage(f"pretrain:{aux[i].name}", _pretrain_stage, body, aux, i, replace(pcfg, seed=cfg.seed)))
    if mode in ("pretrain", "finetune"):
        stages.append(stage("finetune", finetune, body, end, cfg))
    else:
        stages.append(stage(mode, train_meta if mode == "meta" else train_multitask, body, end, aux, cfg))
        if cfg.final_finetune is not None:
            stages.append(stage("final_finetune", _final_finetune, body, end, _final_config(cfg),
                                stages[-1]["best_dev"]))
    out = {"mode": mode, "stages": stages, "metric": end.metric,
           "dev": evaluate(body, end.head, end.dev, cfg.eval_batch_size, cfg.bf16),
           "test": evaluate(body, end.head, end.test, cfg.eval_batch_size, cfg.bf16, predictions=True)}
    out["test_predictions"] = out["test"].pop("predictions")  # the predicted class of every test example, in order
    main = next(s for s in reversed(stages) if s["stage"] in ("mt", "meta", "finetune"))
    return {**out, **{k: main[k] for k in ("history", "final_alpha", "best_alpha", "trace")}}

# ----------------------------------------------------------------------------------------------------------------------
# 9. Evaluation: macro-F1 and micro-F1 always both (micro-F1 = accuracy for single-label classification).

def f1_scores(y_true, y_pred) -> dict:
    """Macro-F1 over the classes present in gold or predictions (as scikit-learn), and micro-F1 (= accuracy)."""
    y_true, y_pred = _scores(y_true, "y_true"), _scores(y_pred, "y_pred", len(y_true))
    f1s = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"macro_f1": float(np.mean(f1s)), "micro_f1": float(np.mean(y_true == y_pred)), "n": int(len(y_true))}

@torch.no_grad()
def evaluate(body, head, data, batch_size: int = 64, bf16: bool | None = False, predictions: bool = False) -> dict:
    """f1_scores and the mean loss of body + head on a labelled split, in eval mode, without autograd, bf16 as
    autocast() takes it; the train/eval mode is restored. predictions=True adds every example's predicted class."""
    _require(data.labels is not None, "evaluate scores a labelled split; this one has no labels (an MLM task's text)")
    device, modes = next(body.parameters()).device, (body.training, head.training)
    body.eval(), head.eval()
    # text in batches of similar length (a stable sort: other data keeps its order); predictions go back in order
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]) if isinstance(data, TextData) else 0)
    preds, total_loss = [], 0.0
    with autocast(device, bf16):
        for i in range(0, len(data), batch_size):
            inputs, labels = to_device(*data.batch(order[i:i + batch_size]), device)
            logits, loss = head(_features(body(**inputs)), labels)
            preds.append(logits.argmax(-1))
            total_loss = total_loss + loss.double() * len(labels)  # on the device: read once, after the last batch
    body.train(modes[0]), head.train(modes[1])
    in_order = torch.empty(len(data), dtype=torch.long)
    in_order[order] = torch.cat(preds).cpu()
    return {**f1_scores(torch.as_tensor(data.labels).numpy(), in_order.numpy()), "loss": float(total_loss) / len(data),
            **({"predictions": in_order.tolist()} if predictions else {})}

# ----------------------------------------------------------------------------------------------------------------------
# 10. Significance (A.2's permutation test; unpaired and two-sample is this code's reading): per-seed scores.

def permutation_test(a, b, n_permutations: int = 10_000, seed: int = 0) -> dict:
    """H0: a's and b's scores share one distribution; statistic mean(a) - mean(b), over every split of the pooled
    scores if there are at most n_permutations, else n_permutations seeded random splits. Returns the difference, p
    two-sided, 'greater' (H1: a > b) and 'less' (the observed split counts), and the smallest p these sizes can give."""
    a, b = _scores(a, "permutation_test's a", finite=True), _scores(b, "permutation_test's b", finite=True)
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
    hits = {"p_two_sided": np.abs(diffs) >= abs(observed) - tol, "p_greater": diffs >= observed - tol,
            "p_less": diffs <= observed + tol}
    return {"diff": float(observed), **{k: float((h.sum() + extra) / (len(diffs) + extra)) for k, h in hits.items()},
            "n_permutations": int(len(diffs)), "exact": exact, "min_p_greater": 1 / (len(diffs) + extra),
            # exact: one split alone (two-sided with equal sizes: a split and its mirror); sampled: the observed alone
            "min_p_two_sided": (2 if n == len(b) else 1) / n_splits if exact else 1 / (n_permutations + 1)}


# ======================================================================================================================
# APPENDIX: what the method needs but the paper does not describe: (A) data and heads, (B) contracts, (C) plumbing.


# ----------------------------------------------------------------------------------------------------------------------
# A. Data and heads: the examples of a split (TextData, TensorData) and MLM heads from a masked-LM checkpoint.

@dataclass
class TextData:
    """Token ids of one split with special tokens (labels None for an MLM corpus); a batch pads to its longest row."""
    ids: list[list[int]]
    labels: list[int] | None
    pad_id: int

    def __post_init__(self):
        _require(not any(len(row) and self.pad_id in (row[0], row[-1]) for row in self.ids), f"TextData rows begin or "
                 f"end in pad_id={self.pad_id}: give them unpadded (a batch pads and masks them)")
        if self.labels is not None:
            self.labels = _class_ids(self.labels, "TextData", "ids", (len(self.ids),)).tolist()

    def __len__(self):
        return len(self.ids)

    def batch(self, idx) -> tuple[dict, torch.Tensor | None]:
        rows = [torch.tensor(self.ids[i], dtype=torch.long) for i in idx]
        input_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id)  # (B, T)
        attention_mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)  # (B, T)
        labels = None if self.labels is None else torch.tensor([self.labels[i] for i in idx])
        return {"input_ids": input_ids, "attention_mask": attention_mask}, labels

@dataclass
class TensorData:
    """Examples x for a plain torch body called as body(x=...), and their class ids 0..C-1 (kept as int64); tensors,
    numpy arrays or lists (a float64 x from numpy or a list becomes torch's default dtype)."""
    x: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        x = _as_tensor(self.x, "TensorData x", "the examples, one row each")
        x = x.to(torch.get_default_dtype()) if x.dtype == torch.float64 and not torch.is_tensor(self.x) else x
        self.x, self.labels = x, _class_ids(self.labels, "TensorData", "x", tuple(x.shape))

    def __len__(self):
        return len(self.x)

    def batch(self, idx) -> tuple[dict, torch.Tensor]:
        idx = torch.as_tensor(idx)
        return {"x": self.x[idx]}, self.labels[idx]

def split_masked_lm(model: nn.Module) -> tuple[HFBody, MLMHead]:
    """A transformers *ForMaskedLM model -> (body, MLM head); the tied decoder weight stays the body's embedding."""
    heads = [m for _, m in model.named_children() if m is not model.base_model]
    _require(len(heads) == 1, f"cannot find the LM head of {type(model).__name__}")
    return HFBody(model.base_model), MLMHead(heads[0])

def new_mlm_head(template: MLMHead, body: nn.Module, init: str = "checkpoint") -> MLMHead:
    """A copy of `template` for one auxiliary task (phi^i), still sharing the body's weights (the tied decoder);
    init="random" re-initialises the weights it owns, loose biases to zero (Algorithm 1), "checkpoint" keeps them."""
    _require(init in ("checkpoint", "random"), f"init must be 'checkpoint' or 'random', not '{init}'")
    body_ids, done = {id(p) for p in body.parameters()}, set()
    head = copy.deepcopy(template, {id(p): p for p in body.parameters()})  # shared weights stay shared
    if init == "checkpoint":
        return head
    for m in head.modules():  # a layer that holds a body weight (the tied decoder) is not reset
        own = list(m.parameters(recurse=False))
        if own and hasattr(m, "reset_parameters") and not any(id(p) in body_ids for p in own):
            m.reset_parameters()
            done |= {id(p) for p in own}
    for name, p in head.named_parameters():  # left over: parameters outside any resettable layer
        if id(p) not in body_ids | done:
            _require(p.dim() <= 1, f"cannot re-initialise the MLM head weight '{name}': it is in no layer with "
                     f"reset_parameters")
            p.detach().zero_()  # a loose bias, e.g. the vocabulary bias of the tied decoder
    return head


# ----------------------------------------------------------------------------------------------------------------------
# B. Contracts and divergence: checked before the first step, and at every step.

class DataError(ValueError):
    """Bad input data: the message names where (the file and line, or the task)."""

class DivergedError(RuntimeError):
    """A training loss turned NaN or infinite: the run stops, and no result of it should be reported."""

def _require(ok, message: str, error=ValueError):
    if not ok:
        raise error(message)

def check_tasks(end: Task | None, aux: list[Task], cfg: TrainConfig, meta: bool | None = None, body=None) -> None:
    """Before the first step: a ValueError (TypeError) naming the task and what is wrong. meta None: a MetaConfig's;
    body: the HFBody whose tied embedding the MLM heads must hold."""
    meta = isinstance(cfg, MetaConfig) if meta is None else meta
    _require(not meta or isinstance(cfg, MetaConfig), f"META-TARTAN (train_meta) needs a MetaConfig, not "
             f"{type(cfg).__name__}", TypeError)
    check_config(cfg, meta)
    _require(isinstance(aux, (list, tuple)), f"aux must be a list of Tasks, not {type(aux).__name__}", TypeError)
    _require(not meta or cfg.weights is None, "META-TARTAN starts from equal weights (Algorithm 1); leave weights=None")
    tasks, heads = ([end] if end is not None else []) + list(aux), {}  # heads: id(head) -> task name
    for t in tasks:  # names key the weights, losses and token counts: a repeated one would merge two tasks
        _require(t.name not in heads.values(), f"two tasks are named '{t.name}': task names must be unique")
        _require(id(t.head) not in heads, f"tasks '{heads.get(id(t.head))}' and '{t.name}' share one head object: "
                 f"each task needs its own head (tartan.new_mlm_head makes one per MLM task)")
        heads[id(t.head)] = t.name
        splits = {"train": t.train, "dev": t.dev, "test": t.test}
        for split, data in splits.items():
            _require(data is None or all(hasattr(data, a) for a in ("batch", "labels", "__len__")), f"task "
                     f"'{t.name}': its {split} split is a {type(data).__name__}, not a dataset as TextData and "
                     f"TensorData are", TypeError)
        _require(len(t.train), f"task '{t.name}': its train split is empty")
        _require(t.masking is not None or t.train.labels is not None, f"task '{t.name}': its training data has no "
                 f"labels and the task has no masking")
        # classes C: num_labels, else the width of a ClassificationHead (a task built by hand may not set it)
        out = t.head.mlp[-1].out_features if isinstance(t.head, ClassificationHead) else None
        C = t.num_labels or out or 0
        for split, data in splits.items():
            labels = torch.as_tensor(data.labels if C and data is not None and data.labels is not None else [])
            bad = labels[(labels < 0) | (labels >= C)]
            if len(bad):
                why = f"num_labels={C}" if t.num_labels else f"its head predicts {C} classes; num_labels is not set"
                raise ValueError(f"task '{t.name}': its {split} split has label {bad[0].item()}, outside 0..{C - 1} "
                                 f"({why})")
        kind = "end-task" if t is end else "task"
        _require(not (t.num_labels and out is not None and out != t.num_labels), f"{kind} '{t.name}': its head "
                 f"predicts {out} classes but num_labels={t.num_labels}")
        if t is end and C > 0:
            check_classes(t.name, C)
    _require(cfg.weights is None or len(cfg.weights) == len(tasks), f"weights has {len(cfg.weights or ())} entries "
             f"for {len(tasks)} tasks ({[t.name for t in tasks]})")
    if end is not None:
        _require(end.dev is not None and len(end.dev) or (cfg.eval_every < 0 and not meta), f"end-task '{end.name}' "
                 f"has {'no' if end.dev is None else 'an empty'} dev split: model selection needs one"
                 + (", and META-TARTAN draws B*_val from it" if meta else ""))
        _require(end.metric in ("macro_f1", "micro_f1"), f"end-task '{end.name}': metric must be 'macro_f1' or "
                 f"'micro_f1', not '{end.metric}'")
        _require(not meta or cfg.same_head or end.num_labels >= 1, f"end-task '{end.name}' has num_labels="
                 f"{end.num_labels}: META-TARTAN fits its meta head phi* with one output per class: set "
                 f"Task(..., num_labels=C)")
    for t in tasks:
        _check_tied_head(body, t)
        _check_head_body(body, t)
        _check_lengths(body, t)
        _check_takes_x(body, t)

def check_classes(name: str, C: int) -> None:
    """An end-task with one class has a loss of 0 and an F1 of 1 whatever the body does: a DataError."""
    _require(C >= 2, f"end-task '{name}': its train split has one class: a classifier needs at least two", DataError)

def _check_run(end: Task, cfg: TrainConfig | None) -> None:
    """run_end_task scores the selected model on dev and test: both must be there; MT/META's final fine-tune config
    is checked with the run, not after its main stage."""
    for split, data in (("dev", end.dev), ("test", end.test)):
        _require(data is not None and len(data), f"end-task '{end.name}' has {'no' if data is None else 'an empty'} "
                 f"{split} split: run_end_task scores the selected model on it")
    if cfg is not None and cfg.final_finetune is not None:
        check_config(cfg.final_finetune, False)

def _scores(x, name: str, n: int | None = None, finite: bool = False) -> np.ndarray:
    """x as a 1-D array of at least one value (n of them if given; finite if asked), else a ValueError naming it."""
    x = np.asarray(x, dtype=float if finite else None)
    _require(x.ndim == 1 and len(x) >= 1 and len(x) == (n or len(x)), f"{name} must be a flat list of at least one "
             f"value{f' ({n}, one per y_true)' if n else ''}, not one of shape {x.shape}")
    _require(not finite or np.isfinite(x).all(), f"{name} has a non-finite score ({x.tolist()}): leave a run "
             f"without a score out, rather than giving NaN")
    return x

def _check_tied_head(body: nn.Module | None, t: Task) -> None:
    """A ValueError for an MLM head that should be tied to this HFBody's input embedding but holds another body's."""
    if isinstance(body, HFBody) and getattr(body.encoder.config, "tie_word_embeddings", False) and \
            isinstance(t.head, MLMHead):
        params, embedding = list(t.head.parameters()), body.encoder.get_input_embeddings().weight
        _require(any(p is embedding for p in params) or not any(p.shape == embedding.shape for p in params),
                 f"task '{t.name}': its MLM head's decoder is not tied to this body's input embedding, as the "
                 f"checkpoint's config says: it was built for another body (build it again with this body)")

def _check_lengths(body: nn.Module | None, t: Task) -> None:
    """A ValueError for TextData rows longer than an HFBody's learned position embeddings take (an obscure failure
    inside the model otherwise)."""
    table = getattr(getattr(getattr(body, "encoder", None), "embeddings", None), "position_embeddings", None)
    if isinstance(body, HFBody) and isinstance(table, nn.Embedding):
        pad = getattr(body.encoder.embeddings, "padding_idx", None)  # RoBERTa: positions padding_idx + 1 on
        limit = table.num_embeddings - (0 if pad is None else pad + 1)
        for split, data in {"train": t.train, "dev": t.dev, "test": t.test}.items():
            longest = max(map(len, data.ids), default=0) if isinstance(data, TextData) else 0
            _require(longest <= limit, f"task '{t.name}': its {split} split has a row of {longest} tokens, more than "
                     f"the body's {limit} positions: truncate the rows (tokenizer truncation=True, max_length={limit})")

def _check_takes_x(body: nn.Module | None, t: Task) -> None:
    """A TypeError for a body whose forward has no argument x, which a TensorData batch is passed as (body(x=...))."""
    if body is not None and isinstance(t.train, TensorData):
        try:
            takes = inspect.signature(body.forward).parameters.values()
        except ValueError:  # a forward without a signature to read: left to the first call
            return
        _require(any(p.name == "x" or p.kind is p.VAR_KEYWORD for p in takes), f"task '{t.name}': its TensorData "
                 f"batches call body(x=...), but {type(body).__name__}.forward takes no x: wrap the body in a module "
                 f"whose forward(self, x) calls it", TypeError)

class _TrainedWith:
    """A head's mark: the body it trained with, weakly (a pickled or copied head forgets it)."""

    def __init__(self, body: nn.Module):
        self.body = weakref.ref(body)

    def __reduce__(self):
        return object.__new__, (_TrainedWith,)

def _check_head_body(body: nn.Module | None, t: Task) -> None:
    """A head that trained with another body (a Task reused across runs) would start this run trained: refused; the
    head is marked with this body."""
    if body is not None:
        seen = getattr(getattr(t.head, "_tartan_trained_with", None), "body", None)
        _require(seen is None or seen() is body, f"task '{t.name}': its head has trained with another body (a Task "
                 f"reused across runs?): build the tasks again for each run")
        t.head._tartan_trained_with = _TrainedWith(body)

def check_config(cfg: TrainConfig, meta: bool) -> None:
    """A ValueError for settings no run can train with, or that would silently train something else."""
    at_least_one = ["batch_size", "aux_batch_size", "grad_accum", "eval_batch_size", "patience"]
    at_least_zero = ["max_steps", "lr", "head_lr", "weight_decay", "head_weight_decay", "adam_eps", "grad_clip"]
    if meta:
        at_least_one += ["meta_batch_size"] + ([] if cfg.same_head else ["meta_head_steps"])
        at_least_zero += ["meta_lr", "meta_val_batch_size", "meta_head_lr", "meta_head_wd", "meta_head_tol"]
    name = type(cfg).__name__
    for key in at_least_one + at_least_zero:
        value, low = getattr(cfg, key), 1 if key in at_least_one else 0
        _require(isinstance(value, (int, float)) and math.isfinite(value) and value >= low,
                 f"{name}.{key}={value!r}: must be a number of at least {low}")
    counts = {"batch_size", "aux_batch_size", "grad_accum", "eval_batch_size", "patience", "max_steps", "eval_every",
              "meta_batch_size", "meta_val_batch_size", "meta_head_steps"}
    for key in sorted(counts & {f.name for f in fields(cfg)}):
        _require(isinstance(getattr(cfg, key), int), f"{name}.{key}={getattr(cfg, key)!r}: a count: must be an int")
    _require(cfg.max_steps or (math.isfinite(cfg.epochs) and cfg.epochs > 0),
             f"{name}.epochs={cfg.epochs!r}: must be above 0 (or set max_steps)")
    _require(cfg.eval_every >= -1, f"{name}.eval_every={cfg.eval_every}: steps between evaluations, 0 = once per "
             f"epoch, -1 = never")
    _require(0 <= cfg.warmup_frac <= 1, f"{name}.warmup_frac={cfg.warmup_frac}: a fraction of the steps, in [0, 1]")
    _require(cfg.weights is None or all(math.isfinite(w) and w >= 0 for w in cfg.weights),
             f"weights={cfg.weights}: Eq. 3's task weights must be finite and non-negative")
    if meta:
        _require(cfg.meta_head_data in ("train", "dev"), f"meta_head_data must be 'train' or 'dev', not "
                 f"'{cfg.meta_head_data}'")
        _require(not cfg.head_rows_short(), f"meta_batch_size={cfg.meta_batch_size} > batch_size={cfg.batch_size}: "
                 f"phi* is fitted on rows of the end-task micro-batch B*_tr: lower it, or set meta_head_data='dev'")

def _finite(value: float, what: str, where: str, hint: str = ""):
    _require(math.isfinite(value), f"{what} is {value} {where}{f' ({hint})' if hint else ''}; the run is stopped",
             DivergedError)

def _check_step(info: dict, norm: float, names: list[str], where: str):
    """A DivergedError if a step's task loss, META's validation loss or cosine, or the gradient norm is not finite."""
    for name, loss in zip(names, info["losses"]):
        _finite(loss, f"the loss of task '{name}'", where, "learning rate too high?")
    if "val_loss" in info:
        _finite(info["val_loss"], f"META's validation loss of task '{names[0]}' (for g_meta, on B*_val)", where)
        for name, c in zip(names, info["cosines"]):
            _finite(c, f"cos(g_meta, g_k) of task '{name}'", where, "a gradient turned NaN or infinite")
    _finite(norm, f"the gradient norm of tasks {names}", where, "learning rate too high?")

def _check_weighting(body, n_tasks: int, grad_accum: int, weights):
    _require(isinstance(body, nn.Module), f"body must be the shared torch module (nn.Module), not "
             f"{type(body).__name__}", TypeError)
    _require(n_tasks >= 1 and grad_accum >= 1, f"n_tasks={n_tasks} and grad_accum={grad_accum} must both be at least 1")
    fsdp = ("FullyShardedDataParallel", "FSDPModule")  # FSDP 1 and 2 (fully_shard), around the body or in it
    _require(not any(c.__name__ in fsdp for m in body.modules() for c in type(m).__mro__), "an FSDP body holds a shard "
             "of each task's gradient on each rank; the weighting needs them whole: wrap the body in "
             "DistributedDataParallel instead", TypeError)
    _require(any(p.requires_grad for p in body.parameters()), "body has no parameter that requires a gradient: "
             "there is nothing to weight")
    _require(not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in body.modules()), "the body "
             "has an embedding with sparse=True: the weighting needs dense gradients (sparse=False)", TypeError)
    _require(weights is None or hasattr(weights, "__len__"), f"weights={weights!r}: one number per task (grad_accum "
             f"is given by name: MTWeighting(body, n_tasks, grad_accum=N))", TypeError)
    _require(weights is None or len(weights) == n_tasks, f"weights has {len(weights or ())} entries for {n_tasks} "
             f"tasks")

def _check_task_backward(weighting, k: int, loss):
    """Task k's loss: a scalar with a graph, k < n_tasks, within grad_accum; at a step's start, .grad zeros or None."""
    micro, name, step = weighting._micro, type(weighting).__name__, weighting.steps + 1
    _require(isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad, f"the loss of task {k} must be "
             f"a scalar tensor with a graph (the mean loss of its micro-batch, not detached, not .item()), not "
             f"{_describe(loss)}", TypeError)
    _require(0 <= k < len(micro), f"task index {k}: this weighting has {len(micro)} tasks (0 = end-task)", IndexError)
    _require(micro[k] < weighting.grad_accum, f"task {k} gave more than grad_accum={weighting.grad_accum} "
             f"micro-batches in one optimizer step: call step() (or let backward() call it) before the next one")
    now = [p for p in weighting.body.parameters() if p.requires_grad]  # picked up between steps, refused within one
    G = getattr(weighting, "G", None)  # META: a body cast or moved after building needs a G of its dtype and device
    recast = G is not None and (now[0].device != G.device or torch.promote_types(now[0].dtype, G.dtype) != G.dtype)
    if recast or len(now) != len(weighting.params) or any(a is not b for a, b in zip(now, weighting.params)):
        _require(not any(micro), f"requires_grad of a body parameter changed within step {step}: freeze or unfreeze "
                 f"parameters between optimizer steps (tie, cast or move them too)")
        weighting._set_params(now)
    _check_grads_kept(weighting)
    held = [p.grad for p in weighting.params if p.grad is not None] if not any(micro) else []
    _require(not held or not torch.stack([g.ne(0).any() for g in held]).any(), f"the body's .grad already holds a "
             f"gradient that this {name} did not put there (step {step}): clear gradients after each optimizer step, "
             f"and give the weighting every loss, unscaled (grad_accum=N to accumulate)")

def _check_grads_kept(weighting):
    """Within a step, the body's parameters and .grad must be as the weighting left them: not written since."""
    kept, name, step = weighting._kept or [], type(weighting).__name__, weighting.steps + 1
    _require(all(p._version == v for p, (_, _, v) in zip(weighting.params, kept)), f"the body's parameters changed "
             f"within step {step}: step the optimizer only when the {name} returns the step's info (its "
             f"grad_accum={weighting.grad_accum}-th call)")
    _require(all(p.grad is g and (g is None or g._version == v) for p, (g, v, _) in zip(weighting.params, kept)),
             f"the body's .grad changed between this {name}'s calls in step {step} (a backward of your own, or "
             f"zero_grad() within the step): zero gradients only after the optimizer step, and add any other loss (a "
             f"regulariser) to a task's loss")

def _check_step_complete(weighting):
    micro = weighting._micro
    short = [k for k, m in enumerate(micro) if m != weighting.grad_accum]
    _require(not short, f"step() with tasks {short} short of grad_accum={weighting.grad_accum} micro-batches (got "
             f"{[micro[k] for k in short]})")

def _check_meta_head(cfg: MetaConfig, num_labels: int, end_head, body):
    _require(not any(isinstance(m, (ClassificationHead, MLMHead)) for m in body.modules()), "the body holds a task "
             "head: META would weight the heads' gradients by alpha and count them in the cosines: give the body alone")
    _require(not cfg.same_head or end_head is not None, "cfg.same_head=True takes g_meta through the end-task head "
             "phi' (Eq. 6): give end_head")
    _require(cfg.same_head or num_labels >= 1, f"num_labels={num_labels}: phi* has one output per end-task class, "
             f"so give num_labels=C (the end-task's number of classes)")

def _val_grads(loss, params: list[nn.Parameter], scaler=None) -> tuple:
    """The body's gradients of val's loss (scaled as the training's, fp16), which must reach the body."""
    _require(isinstance(loss, torch.Tensor) and loss.dim() == 0, f"val(head) must return the validation loss alone, a "
             f"scalar tensor, not {_describe(loss)} (a head returns (logits, loss): return head(...)[1])", TypeError)
    _require(loss.requires_grad, "val(head)'s loss has no graph: g_meta needs it (no torch.no_grad, no detach)")
    grads = torch.autograd.grad(loss if scaler is None else scaler.scale(loss), params, allow_unused=True)
    _require(any(g is not None for g in grads), "val's loss does not reach the body: g_meta needs the body's forward "
             "with a graph (no torch.no_grad or detach around body(...) in val)")
    return grads

def _check_state(weighting, state: dict):
    name, kind = type(weighting).__name__, state.get("kind", type(weighting).__name__)
    _require(kind == name, f"load_state_dict() of a {name} got a {kind}'s state: MT's w are Eq. 3's weights, META's "
             f"the logits of alpha")
    _require(len(state["w"]) == weighting.n_tasks, f"a saved weighting of {len(state['w'])} tasks into one of "
             f"{weighting.n_tasks}")
    _require(not any(weighting._micro), "load_state_dict() within an optimizer step: load before the step")

def _head_rows(weighting: MetaWeighting, features, labels) -> tuple:
    """phi*'s data from a batch's (features, labels): a copy of the first meta_batch_size rows of its first-position
    features (B, H), and their labels; warns once if the batch is shorter."""
    _require(isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor), f"head_data must be (features, "
             f"labels) tensors, not ({_describe(features)}, {_describe(labels)})", TypeError)
    x, cfg = features[:, 0] if features.dim() == 3 else features, weighting.cfg  # (B, H)
    if x.dtype in (torch.bfloat16, torch.float16) and weighting._seen.dtype is None:  # a half body, no autocast:
        weighting._seen.dtype = x.dtype  # g_meta's pass autocasts, for phi*'s float32 weights
    if len(x) < cfg.meta_batch_size and not (weighting._warned or cfg.same_head):  # Eq. 6 fits no phi*
        weighting._warned = True
        warnings.warn(f"head_data has {len(x)} rows, fewer than meta_batch_size={cfg.meta_batch_size}: phi* is "
                      f"fitted on {len(x)} (give a larger batch, or lower meta_batch_size)")
    return x[:cfg.meta_batch_size].detach().clone(), labels[:cfg.meta_batch_size]

def _check_meta_step(weighting: MetaWeighting, val, fit_data):
    """val and phi*'s data as META's step needs them; at the first step, a warning if ranks run without DDP."""
    dist, cfg = torch.distributed, weighting.cfg
    if weighting.steps == 0 and weighting.group is None and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1:  # e.g. ddp.module given, or DDP that torch.compile wraps
        warnings.warn(f"torch.distributed has {dist.get_world_size()} ranks but META's body is not wrapped in "
                      f"DistributedDataParallel: each rank learns its own w (give the weighting the DDP-wrapped body)")
    _require(callable(val) or isinstance(val, (tuple, list)) and len(val) == 2 and isinstance(val[1], torch.Tensor)
             and isinstance(val[0], (dict, torch.Tensor)), f"META's step needs val: an end-task dev batch (inputs, "
             f"labels), inputs a dict of the body's arguments or its one tensor, or a callable val(head) -> the "
             f"validation loss through head; not {_describe(val)}", TypeError)
    _require(fit_data is not None or cfg.same_head, "META's step needs head_data=(features, labels) of an end-task "
             "batch, to fit phi*")


# ----------------------------------------------------------------------------------------------------------------------
# C. Plumbing: the loop's state, devices, autocast, batches, snapshots, clipping, optimizers, logs, META state, stages.

@dataclass
class Loop:
    """train's state between optimizer steps: what a hook reads, and all that a resumed loop takes back."""
    cfg: TrainConfig
    names: list[str]                 # task names, end-task first
    modules: list[nn.Module]         # the body, then each task's head
    optimizers: list                 # the body's and the heads' AdamW, then their schedules
    weighting: "TaskWeighting"
    streams: list[Stream]            # each task's batches (META: then B*_val's and phi*'s dev rows)
    step: int = 0                    # optimizer steps done
    log: list[dict] = field(default_factory=list)      # every step's info
    history: list[dict] = field(default_factory=list)  # every evaluation
    tokens: dict = field(default_factory=dict)         # tokens seen, per task and per META pass
    best: float = -math.inf          # the best dev score so far,
    best_state: list | None = None   # the body and end-task head that scored it,
    best_alpha: dict | None = None   # and alpha then
    since_best: int = 0              # evaluations since the best
    seconds: float = 0.0             # time since the run began, as of the last hook call
    test_seconds: float = 0.0        # of which scoring test for the curves (eval_test)

def _evaluation(loop: Loop, body, end: Task, t0: float) -> float:
    """Scores end-task dev after loop.step into the history (cfg.eval_test: test too, for curves); keeps the best."""
    cfg = loop.cfg
    dev = evaluate(body, end.head, end.dev, cfg.eval_batch_size, cfg.bf16)
    _finite(dev["loss"], f"the dev loss of task '{end.name}'", f"at the evaluation after optimizer step {loop.step}",
            "a diverged model, or a NaN in the dev data")
    curve, started = {}, time.perf_counter()
    if cfg.eval_test and end.test is not None:
        curve["test"] = evaluate(body, end.head, end.test, cfg.eval_batch_size, cfg.bf16)
        loop.test_seconds += time.perf_counter() - started
        curve["analysis_seconds"] = loop.test_seconds
    since = loop.history[-1]["step"] if loop.history else 0  # the steps since the last evaluation
    loop.history.append({"step": loop.step, "alpha": dict(zip(loop.names, loop.log[-1]["alpha"])),
                         **_averages(loop.log[since:], loop.names), "dev": dev, "seconds": time.perf_counter() - t0,
                         **curve})
    score = dev[end.metric]
    if score > loop.best:  # strictly better: keep this model
        loop.best, loop.since_best = score, 0
        loop.best_state, loop.best_alpha = _snapshot(body, end.head), loop.history[-1]["alpha"]
    else:
        loop.since_best += 1
    return score

class Stream:
    """batches() that counts what it has given (a resumed run draws as many again)."""

    def __init__(self, task: Task, batch_size: int, seed: int):
        self.drawn, self._batches = 0, batches(task, batch_size, torch.Generator().manual_seed(seed))

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        return next(self._batches)

def _device(body: nn.Module) -> torch.device:
    first = next(body.parameters(), None)
    _require(first is not None, f"the body ({type(body).__name__}) has no parameters: there is nothing to train")
    return first.device

def to_device(inputs: dict, labels, device):
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, labels.to(device, non_blocking=True)

def autocast(device: torch.device, bf16: bool | None):
    """bf16 autocast for training and evaluation alike where bf16_enabled says so; a disabled context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(device, bf16))

def bf16_enabled(device: torch.device, bf16: bool | None) -> bool:
    """None: on CUDA only. True on a CPU without native bf16 (avx512_bf16, AMX) is fp32, with a warning."""
    if bf16 is None:
        return device.type == "cuda"
    native = any(getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in ("avx512_bf16", "amx_tile"))
    if bf16 and device.type == "cpu" and not native:
        warnings.warn("bf16 was asked for, but this CPU has no native bf16 (avx512_bf16, AMX): the run goes on in fp32")
    return bool(bf16) and (device.type != "cpu" or native)

def _features(out) -> torch.Tensor:
    """The body's output, which must be the features tensor itself (B, T, H) or (B, H), else a TypeError."""
    if isinstance(out, torch.Tensor):
        return out
    fix = "return outputs.last_hidden_state (tartan.HFBody does)" if hasattr(out, "last_hidden_state") else \
        "return the features tensor alone (e.g. outputs[0])"
    raise TypeError(f"the body returned {_describe(out)}, but tartan's heads take one features tensor (B, T, H) or "
                    f"(B, H): make the body's forward {fix}")

def _describe(x) -> str:
    """A value's type, and its shape and dtype for a tensor or array, for error messages."""
    shape = getattr(x, "shape", None)
    return type(x).__name__ + ("" if shape is None else f" of shape {tuple(shape)}, dtype {getattr(x, 'dtype', '?')}")

def _as_tensor(value, name: str, what: str) -> torch.Tensor:
    """A tensor from a tensor, numpy array or (nested) list of numbers; a TypeError naming `name` otherwise."""
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be numbers ({what}) as a tensor, numpy array or list, not "
                        f"{_describe(value)}") from None

def _class_ids(value, data: str, rows: str, shape: tuple) -> torch.Tensor:
    """Labels as int64 class ids, one per row (of `rows`, of this shape), else a TypeError or ValueError naming them."""
    labels = _as_tensor(value, f"{data} labels", "integer class ids 0..C-1")
    _require(labels.dtype != torch.bool and not labels.is_complex() and torch.equal(labels, labels.round()),
             f"{data} labels must be integer class ids 0..C-1, not {_describe(value)}", TypeError)
    _require(labels.dim() == 1 and len(labels) == shape[0], f"{data} labels must be one class id per row of {rows}: "
             f"labels {tuple(labels.shape)}, {rows} {shape}")
    return labels.long()

def _draw(stream, tokens: dict, key: str) -> tuple:
    """The next batch of a stream; its tokens (rows, without an attention mask) counted under `key` in `tokens`."""
    inputs, labels = next(stream)
    n = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else len(next(iter(inputs.values())))
    tokens[key] = tokens.get(key, 0) + n
    return inputs, labels

class _Silent:
    """A progress bar that shows nothing: every method does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

def progress_bar(total, enabled: bool, desc: str, **tqdm_args):
    """A tqdm bar (tqdm_args passed on); not enabled, one that shows nothing (tqdm is then not imported)."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, **tqdm_args)

def _snapshot(body, head):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (body, head)]

def _restore(snapshot, body, head):
    for m, sd in zip((body, head), snapshot):
        m.load_state_dict(sd)

def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ without a sync (under max_norm, the factor is exactly 1; max_norm 0: none) -> the norm tensor."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm

def read_step(info: dict, **more) -> dict:
    """A step's info (and `more`) with every tensor as Python numbers, read from the device in one transfer."""
    info = {**info, **more}
    keys = [k for k, v in info.items() if isinstance(v, torch.Tensor)]
    flat = torch.cat([info[k].detach().reshape(-1).to(torch.float64) for k in keys]).tolist() if keys else []
    for k in keys:
        n, kind = info[k].numel(), bool if info[k].dtype == torch.bool else float  # a flag stays a bool
        info[k], flat = (flat[:n] if info[k].dim() else kind(flat[0])), flat[n:]
    return info

def head_parameters(head: nn.Module, body: nn.Module) -> list[nn.Parameter]:
    """Parameters of a head that are not body parameters (a tied decoder weight belongs to the body)."""
    body_ids = {id(p) for p in body.parameters()}
    return [p for p in head.parameters() if id(p) not in body_ids]

@contextlib.contextmanager
def _buffers_kept(body: nn.Module):
    """Restores the body's buffers (e.g. BatchNorm running statistics) after a forward pass on dev rows."""
    saved = [(b, b.clone()) for b in body.buffers()]
    yield
    for b, value in saved:
        b.detach().copy_(value)

def _flat_grad(params, grads, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """Per-parameter gradients -> one (P,) vector, zeros where there is none: new, or written (added) into `out`."""
    flat = [torch.zeros(p.numel(), device=p.device, dtype=p.dtype) if g is None else g.reshape(-1)
            for p, g in zip(params, grads)]
    if out is None:
        return torch.cat(flat)
    return out.add_(torch.cat(flat)) if add else torch.cat(flat, out=out)

def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, cfg: TrainConfig):
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, norm weights: no decay
    try:  # the fused kernel: one pass over the parameters rather than a loop over them
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.adam_eps)

def _warmup_then_linear_decay(total: int, warmup_frac: float):
    """The learning-rate factor at step s: linear warm-up to 1 over warmup_frac of the steps, then to 0 at the end."""
    warmup = max(1, int(warmup_frac * total))

    def factor(s):
        return min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    return factor

def _column(log: list[dict], key: str) -> list:
    """One value of the per-step log over its steps, where the step has it (META's keys: only META steps)."""
    return [info[key] for info in log if info.get(key) is not None]

def _averages(log: list[dict], names: list[str]) -> dict:
    """Averages over `log` (the steps since the evaluation before): task losses; META: cos(g_meta, g_k), B*_val's loss,
    phi*'s first and last fitting loss."""
    cos, val, fit = (_column(log, key) for key in ("cosines", "val_loss", "head_fit"))
    return {"losses": dict(zip(names, np.mean(_column(log, "losses"), axis=0).tolist())),
            "cosines": dict(zip(names, np.mean(cos, axis=0).tolist())) if cos else None,
            "meta_val_loss": float(np.mean(val)) if val else None,
            "meta_head_fit_loss": np.mean(fit, axis=0).tolist() if fit else None}

def _trace(log: list[dict], names: list[str]) -> dict:
    """Per task, alpha (META: also cos(g_meta, g_k) and |g_k|) at every step s, at index s - 1; META's B*_val loss."""
    trace = {key: {n: list(v) for n, v in zip(names, zip(*_column(log, key)))} or None
             for key in ("alpha", "cosines", "grad_norms")}
    return {**trace, "meta_val_loss": _column(log, "val_loss") or None}

def _budget(end: Task | None, tasks: list[Task], cfg: TrainConfig) -> tuple[int, int]:
    """(total optimizer steps, steps between evaluations, -1 = never); an epoch: a pass over the task with the most
    batches."""
    sizes = [math.ceil(len(t.train) / (cfg.batch_size if t is end else cfg.aux_batch_size)) for t in tasks]
    per_epoch = max(1, math.ceil(max(sizes) / cfg.grad_accum))
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch)), cfg.eval_every or per_epoch

@dataclass
class MetaState:
    """What tartan.train's META step carries from step to step, built once before the loop by meta_state."""
    weighting: MetaWeighting            # w, G, the step count, phi*'s settings
    val: Stream                         # endless batches B*_val ~ D_val of the end-task
    head_rows: Stream | None = None     # meta_head_data="dev": endless dev batches that phi* is fitted on

    def streams(self) -> list[Stream]:
        return [s for s in (self.val, self.head_rows) if s is not None]

def meta_state(body: nn.Module, tasks: list[Task], cfg: MetaConfig) -> MetaState:
    """Algorithm 1's "Initialize" (tasks: end-task first): the weighting, B*_val's and phi*'s dev streams, own seeds."""
    end, device = tasks[0], next(body.parameters()).device
    weighting = MetaWeighting(body, len(tasks), end.num_labels, cfg, end_head=end.head, amp=autocast(device, cfg.bf16))
    dev = Task(end.name + ":val", end.head, train=end.dev)
    val = Stream(dev, cfg.meta_val_batch_size or cfg.meta_batch_size, cfg.seed * 1009 + 1000)
    head_rows = None if cfg.meta_head_data == "train" or cfg.same_head else \
        Stream(dev, cfg.meta_batch_size, cfg.seed * 1009 + 2000)  # apart from B*_val
    return MetaState(weighting, val, head_rows)

def _forward(body, task, stream, device, amp, tokens):
    """One micro-batch of a task: (loss, features, labels)."""
    inputs, labels = to_device(*_draw(stream, tokens, task.name), device)
    with amp:
        features = _features(body(**inputs))
        out = task.head(features, labels)
    _require(isinstance(out, tuple) and len(out) == 2, f"task '{task.name}': its head must return (logits, mean loss),"
             f" not {_describe(out)}", TypeError)
    return out[1], features, labels

def _dev_features(body, state: MetaState, amp, tokens, end_name: str) -> tuple:
    """meta_head_data="dev": features and labels of a dev batch of phi*'s own, without a graph."""
    inputs, labels = to_device(*_draw(state.head_rows, tokens, end_name + ":head_rows"), state.weighting.G.device)
    with torch.no_grad(), amp, _buffers_kept(body):
        return _features(body(**inputs)).float(), labels

def _mt_config(cfg: TrainConfig) -> TrainConfig:
    """The TrainConfig part of a MetaConfig; any other config as it is."""
    return TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}) if isinstance(cfg, MetaConfig) \
        else cfg

def _run_stage(name: str, fn, *args) -> dict:
    return {"stage": name, **fn(*args)}

def _pretrain_stage(body, aux: list[Task], i: int, cfg: PretrainConfig, hook=None) -> dict:
    """Eq. 1 on aux[i]; DAPT+TAPT: TAPT continues DAPT's LM head."""
    if i > 0 and isinstance(aux[i].head, MLMHead) and isinstance(aux[i - 1].head, MLMHead):
        aux[i].head.load_state_dict(aux[i - 1].head.state_dict())
    return pretrain(body, [aux[i]], cfg, hook=hook)

def _final_finetune(body, end: Task, cfg: FinetuneConfig, main_best_dev, hook=None) -> dict:
    """The optional Eq. 2 stage after MT/META (Sec. 3.1), kept only if it improves end-task dev."""
    before = _snapshot(body, end.head)
    ft = finetune(body, end, cfg, hook)
    ft["kept"] = ft["best_dev"] is not None and (main_best_dev is None or ft["best_dev"] > main_best_dev)
    if not ft["kept"]:
        _restore(before, body, end.head)
    return ft

def _final_config(cfg: TrainConfig) -> FinetuneConfig:
    """The Eq. 2 stage after MT/META: its own config, with the run's seed, and the run's bf16 unless it sets one."""
    final = cfg.final_finetune
    return replace(final, seed=cfg.seed, bf16=cfg.bf16 if final.bf16 is None else final.bf16)

def _ddp_group(body: nn.Module):
    """A DistributedDataParallel body's process group, its all-reduce at each backward turned off (as under
    no_sync): the weighting averages what it needs over the ranks once per step. None for any other body."""
    body = getattr(body, "_orig_mod", body)  # torch.compile(DDP(body)), the order torch recommends
    if not isinstance(body, nn.parallel.DistributedDataParallel):
        return None
    body.require_backward_grad_sync = False
    return body.process_group

def _mean_over_ranks(flat: torch.Tensor, group, async_op: bool = False):
    """flat <- its mean over the ranks of group, in place: one all-reduce (async_op: returns its handle)."""
    flat.div_(torch.distributed.get_world_size(group))
    return torch.distributed.all_reduce(flat, group=group, async_op=async_op)

def _mean_grads_over_ranks(params: list[nn.Parameter], losses: torch.Tensor, group) -> torch.Tensor:
    """The body's .grad and the losses (K,) averaged over the ranks in one all-reduce, a parameter's wherever a rank
    has one (a layer one rank skipped too); returns the losses."""
    had = torch.tensor([p.grad is not None for p in params], device=losses.device)
    grads, losses, had = _mean_all_over_ranks([_flat_grad(params, [p.grad for p in params]), losses, had], group)
    for p, g, any_rank in zip(params, grads.split([p.numel() for p in params]), had.tolist()):
        p.grad = g.view_as(p).to(p.dtype) if any_rank else None
    return losses

def _mean_meta_over_ranks(g_meta, val_loss, losses, reached: list[bool], group) -> tuple:
    """META: g_meta, its loss and the losses averaged over the ranks in one all-reduce, and the parameters that any
    rank's tasks reached."""
    flags = torch.tensor(reached, dtype=g_meta.dtype, device=g_meta.device)
    g_meta, val_loss, losses, flags = _mean_all_over_ranks([g_meta, val_loss, losses, flags], group)
    return g_meta, val_loss, losses, (flags > 0).tolist()

def _broadcast_head(head: nn.Module, group) -> None:
    """The first rank's head (phi*) on every rank of group."""
    phi = torch.nn.utils.parameters_to_vector(head.parameters())
    torch.distributed.broadcast(phi, torch.distributed.get_global_rank(group, 0), group=group)
    torch.nn.utils.vector_to_parameters(phi, head.parameters())

def _mean_all_over_ranks(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The tensors averaged over the ranks in one all-reduce, in the first one's dtype."""
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    _mean_over_ranks(flat, group)
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

class _AutocastSeen:
    """A forward pre-hook on META's body: the autocast dtype of its last forward with autograd on (None: no autocast),
    on its parameters' device, whether the loop calls the weighting inside the autocast block or after it."""
    dtype = None

    @classmethod
    def on(cls, body: nn.Module) -> "_AutocastSeen":
        body.register_forward_pre_hook(seen := cls())
        return seen

    def __call__(self, module, args):
        if torch.is_grad_enabled():  # not an evaluation (which need not pay for the lookup below)
            device = next(module.parameters()).device.type
            self.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

def _undo_on(undo, device: torch.device) -> tuple | None:
    """fp16 META's GradScaler scale and w before its last step (to undo it if the scaler skipped it), on device."""
    return None if undo is None else tuple(t.to(device) for t in undo)

def _w_before_skipped_step(weighting: MetaWeighting) -> torch.Tensor:
    """META's w to update; fp16: if the GradScaler lowered its scale it skipped the last step (a head overflowed),
    so w goes back to what it was before that step."""
    w, scale, undo = weighting.w, getattr(weighting.scaler, "_scale", None), weighting._undo
    if scale is not None:
        w = w if undo is None else torch.where(scale < undo[0], undo[1], w)
        weighting._undo = (scale.clone(), w)
    return w
