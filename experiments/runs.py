"""Runs: the budget a run is made under, its configs, its identity and result file, and resume.

A run is one (task, mode, auxiliary corpora, seed). Its config (Workspace.config) is everything that determines its
result; it is stored in the result file and compared on resume, so a result is never mixed in from other settings.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import tartan

from .common import (PeakMemory, ReproduceError, atomic_path, atomic_write_json, describe_device, progress_bar,
                     set_seed, warn)
from .data import CIFAR_MD5, CIFAR_URL, DATA_URL, corpus_file, download, ensure_file, file_digest, model_identity
from .keep import predictions_path, save_model_atomic, write_predictions
from .launch import Finished, Shard
from .own import own_corpus_file
from .paper import (BUDGETS, PAPER_MAX_LENGTH, PAPER_WARM_HEAD, PRETRAIN_TEXT_MODES, QUICK, RELEASED, TARTAN_MODES,
                    TASKS, VISION, VISION_META, metric_field, tartan_mode)
from .vision import MAMMALS, WideResNet, mammals_tasks, read_cifar100

FLAGS = {  # budget flag -> (config field, stages it sets)
    "batch_size": ("batch_size", ("train", "final")),
    "aux_batch_size": ("aux_batch_size", ("train", "pretrain")),
    "grad_accum": ("grad_accum", ("train", "pretrain", "final")),
    "epochs": ("epochs", ("train",)), "steps": ("max_steps", ("train",)),
    "lr": ("lr", ("train",)), "head_lr": ("head_lr", ("train",)),
    "eval_every": ("eval_every", ("train",)), "patience": ("patience", ("train",)),
    "meta_lr": ("meta_lr", ("train",)), "meta_batch_size": ("meta_batch_size", ("train",)),
    "meta_head_steps": ("meta_head_steps", ("train",)), "meta_head_lr": ("meta_head_lr", ("train",)),
    "meta_head_data": ("meta_head_data", ("train",)), "meta_head_tol": ("meta_head_tol", ("train",)),
    "meta_val_batch_size": ("meta_val_batch_size", ("train",)),
    "pretrain_epochs": ("epochs", ("pretrain",)), "pretrain_steps": ("max_steps", ("pretrain",)),
    "pretrain_lr": ("lr", ("pretrain",)), "pretrain_head_lr": ("head_lr", ("pretrain",)),
    "final_epochs": ("epochs", ("final",)), "final_steps": ("max_steps", ("final",)),
    "final_lr": ("lr", ("final",)), "final_head_lr": ("head_lr", ("final",)),
}


@dataclass(frozen=True)
class Budget:
    """How a run departs from the paper's settings: --quick, a named --budget, and the budget flags given (FLAGS
    names -> values), each applied in that order over the paper's values."""
    quick: bool = False
    name: str | None = None
    overrides: dict = field(default_factory=dict)
    no_final_finetune: bool = False
    max_length: int | None = None
    limit: int | None = None
    warm_head_steps: int | None = None  # --warm-head-steps

    @property
    def warm_head(self) -> dict | None:
        """How a checkpoint without an LM head gets one fitted before any MLM stage (tartan.warm_mlm_head): the
        budget's, or the paper settings' default; --quick and budgets without one: none; --warm-head-steps sets the
        steps (0 = none)."""
        base = None if self.quick else BUDGETS[self.name].get("warm_head") if self.name else PAPER_WARM_HEAD
        if self.warm_head_steps is not None:
            base = dict(base or PAPER_WARM_HEAD, steps=self.warm_head_steps)
        return base if base and base["steps"] > 0 else None

    @property
    def length(self) -> int:
        """Tokens per example: --max-length, else --quick's, else the named budget's, else the paper's."""
        return self.max_length or (QUICK["max_length"] if self.quick else
                                   BUDGETS[self.name]["max_length"] if self.name else PAPER_MAX_LENGTH)

    @property
    def examples(self) -> int | None:
        """Examples kept per split and corpus (None: all)."""
        return self.limit if self.limit is not None else (QUICK["limit"] if self.quick else None)

    @property
    def final_stage(self) -> bool:
        """Whether MT/META runs end with the optional Eq. 2 stage."""
        return not self.no_final_finetune and not (self.name and BUDGETS[self.name]["final"] is None)

    def stage_values(self, stage: str, eq2: bool = False) -> dict:
        """Config values of one stage: --quick or --budget first, then the flags given."""
        values = dict(QUICK[stage]) if self.quick else {}
        if self.name:
            values.update(BUDGETS[self.name][stage] or {})
            if eq2:
                values.update(BUDGETS[self.name]["eq2"])
        for flag, (name, stages) in FLAGS.items():
            if stage in stages and self.overrides.get(flag) is not None:
                values[name] = self.overrides[flag]
        return values

    def describe(self) -> str:
        """The budget in the words of the command line, printed under a table."""
        given = [f"--{k.replace('_', '-')} {self.overrides[k]}" for k in FLAGS if self.overrides.get(k) is not None]
        given += [f"--{k.replace('_', '-')} {v}" for k, v in (("max_length", self.max_length),
                                                              ("limit", self.limit)) if v is not None]
        if self.warm_head_steps is not None:
            given.append(f"--warm-head-steps {self.warm_head_steps}")
        if self.no_final_finetune:
            given.append("--no-final-finetune")
        if self.quick:
            given.insert(0, "--quick")
        if self.name:
            given.insert(0, f"--budget {self.name} ({describe_budget(self.name)})")
        return "the paper's settings" if not given else "the paper's settings except " + " ".join(given)


def describe_budget(name: str) -> str:
    b = BUDGETS[name]
    return (f"max length {b['max_length']}; end-task stages " + ", ".join(f"{k} {v}" for k, v in b["train"].items())
            + "; Eq. 2 stages " + ", ".join(f"{k} {v}" for k, v in b["eq2"].items()) + "; Eq. 1 "
            + ", ".join(f"{k} {v}" for k, v in b["pretrain"].items())
            + ("; no final fine-tuning" if b["final"] is None else
               "; final Eq. 2 " + ", ".join(f"{k} {v}" for k, v in b["final"].items()))
            + ("; a checkpoint without an LM head gets one fitted first ("
               + ", ".join(f"{k} {v}" for k, v in b["warm_head"].items()) + ")" if b.get("warm_head") else ""))


@dataclass(frozen=True)
class Settings:
    """What every run of one command shares, from the command line."""
    model: str
    data_dir: str
    out: str
    budget: Budget = Budget()
    data_url: str = DATA_URL
    extra_corpora: dict = field(default_factory=dict)  # corpus name -> path (--aux-file, --dapt-corpus FILE)
    progress: bool = True
    rerun: bool = False
    report_only: bool = False
    baselines: str = "retrain"  # "released": tapt/dapt/dapt+tapt fine-tune Gururangan et al.'s checkpoints (an error
    #                             where none exists); "auto": where one exists; "retrain": Eq. 1 here
    checkpoint_dir: str | None = None  # a folder holding Hub checkpoints by id (DIR/allenai/...), used before the Hub
    own_tasks: dict = field(default_factory=dict)  # run name -> absolute folder of a user's end-task (--task-dir)
    metric: str = "macro_f1"  # headline metric of the user's end-tasks (--metric)
    save_model: str | None = None  # folder that receives each run's selected body and end-task head (--save-model)
    shard: Shard = Shard(0, 1)  # this process's share of the run list (--shard, torchrun, SLURM array)
    download_only: bool = False  # fetch and check what the runs need, train nothing


def _with(cfg, values: dict):
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})


def make_configs(budget: Budget, task: str, mode: str, seed: int, n_pretrain: int, progress: bool = False):
    """(config of the end-task stage, [config of each Eq. 1 stage]) for one run; seed drives data order and masking."""
    vision = task == "mammals"
    common = dict(seed=seed, progress=progress)
    if mode in TARTAN_MODES:
        cfg = tartan.MetaConfig(same_head=mode == "meta-samehead") if mode != "mt" else tartan.TrainConfig()
        cfg = _with(cfg, {**(VISION if vision else {}), **(VISION_META if vision else {})})
        final = None
        if not vision and budget.final_stage:  # the optional Eq. 2 stage (released scripts' settings)
            final = _with(tartan.tartan_finetune(), {**budget.stage_values("final"), **common})
        cfg = _with(cfg, {**budget.stage_values("train"), **common, "final_finetune": final})
    else:
        cfg = _with(tartan.FinetuneConfig(), {**(VISION if vision else {}), **budget.stage_values("train", eq2=True),
                                              **common})
    pre = _with(tartan.PretrainConfig(), {**(VISION if vision else {}), "eval_every": -1,
                                           **budget.stage_values("pretrain"), **common})
    return cfg, [pre] * n_pretrain


@dataclass(frozen=True)
class Run:
    task: str
    mode: str
    aux: tuple[str, ...]  # auxiliary corpora, in order (Eq. 1 stages, or the tasks T_1..T_n of MT/META)
    seed: int

    @property
    def aux_label(self) -> str:
        return "+".join(self.aux) or "none"

    @property
    def key(self) -> dict:
        return {"task": self.task, "mode": self.mode, "aux": self.aux_label, "seed": self.seed}

    def path(self, out: str) -> str:
        return os.path.join(out, self.task, f"{self.mode}__{self.aux_label}__seed{self.seed}.json")

    def __str__(self):
        return f"{self.task} {self.mode}" + (f" aux={self.aux_label}" if self.aux else "") + f" seed {self.seed}"


def make_run(task: str, mode: str, aux: str | None, seed: int, dapt: str, aux_files: tuple[str, ...] = ()) -> Run:
    """The corpora of a run: the mode's own for tapt/dapt/dapt+tapt (DAPT before TAPT, as Gururangan et al. chain
    them), --aux for MT/META (default TAPT, Table 1), then the --aux-file corpora."""
    if task == "mammals":
        return Run(task, mode, () if mode == "finetune" else ("cifar95",), seed)
    spec = mode if mode in PRETRAIN_TEXT_MODES else None  # each Eq. 1 mode is named after its corpora
    if mode in TARTAN_MODES:
        spec = aux or "tapt"
    names = [] if spec in (None, "none") else [f"dapt{dapt}" if s == "dapt" else s for s in spec.split("+")]
    if mode in PRETRAIN_TEXT_MODES:
        names = list(aux_files) + names  # extra corpora are further Eq. 1 stages, before the mode's own
    else:
        names += list(aux_files)
    return Run(task, mode, tuple(names), seed)

def load_result(path: str, run: Run | None = None) -> dict | None:
    """A complete result file (for `run`), or None when there is none or it is incomplete or unreadable."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("complete") is not True or (run is not None and rec.get("key") != run.key):
        return None
    return rec


# Fields added to tartan's configs after result files were committed, each with the value that does what those files
# ran: a run's stored config leaves a field out while it holds that value, so the older files still match on resume.
LATER_FIELDS = {"meta_val_batch_size": 0, "meta_head_data": "train", "meta_head_tol": 0.0, "eval_test": False}


def config_diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} here, {b!r} in the file"]


# the tartan.py this process imported, read now: the file may change on disk while a long run trains
TARTAN_SHA256 = file_digest(tartan.__file__)


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "tartan.py_sha256": TARTAN_SHA256}


class Workspace:
    """What every run of one command shares: the loaded checkpoint (a deep copy per run), the data files and their
    checksums, CIFAR-100."""

    def __init__(self, settings: Settings, device: torch.device):
        self.settings, self.device = settings, device
        self.max_length, self.limit = settings.budget.length, settings.budget.examples
        self._models, self._checked, self._cifar, self.files = {}, set(), None, {}
        self._identity, self._warm = {}, {}  # model -> model_identity; (model, task) -> warmed LM head
        self.save_dirs = {}  # run -> folder of its saved model (--save-model), set by execute_all

    def released(self, run: Run) -> str | None:
        """The Hub id of the released checkpoint that stands for this run's Eq. 1 stages (Sec. 4), if it uses one."""
        if self.settings.baselines == "retrain":
            return None
        ckpt = RELEASED.get((run.task, run.mode, run.aux))
        if ckpt is None and self.settings.baselines == "released" and run.mode in PRETRAIN_TEXT_MODES:
            raise ReproduceError(f"--baselines released: there is no released checkpoint for {run} (there are for "
                                 f"TAPT, and for DAPT and DAPT+TAPT on the full domain corpus, --dapt-corpus full, "
                                 f"without --aux-file); use --baselines retrain")
        return ckpt

    def stages(self, run: Run) -> tuple[str, tuple[str, ...]]:
        """(tartan mode, auxiliary corpora actually trained on): a released checkpoint replaces the Eq. 1 stages."""
        return ("finetune", ()) if self.released(run) else (tartan_mode(run.mode), run.aux)

    def file(self, rel: str) -> str:
        """A data file, fetched on first use; its SHA-256 is recorded in the result files."""
        if rel not in self.files:
            if os.path.isabs(rel):
                if not os.path.isfile(rel):
                    raise ReproduceError(f"{rel}: no such file")
                path = rel
            else:
                path = ensure_file(self.settings.data_dir, rel, self.settings.data_url,
                                   progress=self.settings.progress)
            self.files[rel] = (path, file_digest(path))
        return self.files[rel][0]

    def task_folder(self, task: str) -> str:
        """The end-task's folder: relative to the data folder for the paper's tasks, absolute for a user's."""
        return self.settings.own_tasks.get(task) or TASKS[task]["folder"]

    def task_metric(self, task: str) -> str:
        return self.settings.metric if task in self.settings.own_tasks else TASKS[task]["metric"]

    def corpus(self, task: str, name: str) -> str:
        """The file of one auxiliary corpus of a task (see data.corpus_file and own.own_corpus_file)."""
        if task in self.settings.own_tasks:
            return own_corpus_file(self.settings.own_tasks[task], name, self.settings.extra_corpora)
        return corpus_file(task, name, self.settings.extra_corpora)

    def model(self, name: str | None = None):
        """(body, MLM head, tokenizer, missing weights) of --model, or of another checkpoint (a released baseline);
        a Hub id is looked up under --checkpoint-dir first."""
        name = name or self.settings.model
        if name not in self._models:
            local = os.path.join(self.settings.checkpoint_dir or "", name)
            set_seed(0)  # newly initialised checkpoint weights (e.g. a missing MLM head) are the same for every run
            body, mlm, tokenizer, missing = tartan.from_pretrained(
                local if self.settings.checkpoint_dir and os.path.isdir(local) else name)
            if missing:
                print(f"note: {name} has no weights for {len(missing)} tensors (e.g. {missing[0]}); "
                      f"they are newly initialised, the same for every seed")
            self._models[name] = (body, mlm, tokenizer, missing)
        return self._models[name]

    def identity(self, name: str | None = None) -> str:
        """What names the model in result files (data.model_identity), computed once per model."""
        name = name or self.settings.model
        if name not in self._identity:
            self._identity[name] = model_identity(name)
        return self._identity[name]

    def warm_head_plan(self, run: Run) -> dict | None:
        """The warmed-LM-head settings of a run (Budget.warm_head, fitted on the task's TAPT text), or None: the
        mode trains no MLM head or the budget fits none. They act only where the checkpoint has no LM head (see
        warm_head); the plan does not depend on that, so that a config is known without loading the model."""
        plan = self.settings.budget.warm_head
        if plan is None or run.task == "mammals" or not self.stages(run)[1]:
            return None
        return {**plan, "corpus": self.corpus(run.task, "tapt")}

    def warm_head(self, run: Run) -> dict | None:
        """{"state": the warmed head's own tensors, "info": its MLM loss before/after and digest} for a run whose
        plan has one: fitted once per (model, task) with the body frozen, cached on disk (TARTAN_CACHE, default
        ~/.cache/tartan) under a key of everything that determines it, and loaded by every arm."""
        plan = self.warm_head_plan(run)
        name = self.released(run) or self.settings.model
        if plan is None or not self.model(name)[3]:  # no plan, or the checkpoint has its own LM head
            return None
        corpus = self.file(plan["corpus"])
        key_fields = {"model": self.identity(name), "corpus_sha256": self.files[plan["corpus"]][1],
                      "max_length": self.max_length, "limit": self.limit, "torch": str(torch.__version__),
                      **{k: v for k, v in plan.items() if k != "corpus"}}
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
        if key not in self._warm:
            cache = os.path.join(os.environ.get("TARTAN_CACHE", os.path.expanduser("~/.cache/tartan")),
                                 "warm-mlm-heads", f"{key}.pt")
            try:
                self._warm[key] = torch.load(cache, weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # none yet, or unreadable: fit it
                self._warm[key] = self._fit_warm_head(name, corpus, plan, key_fields)
                try:
                    with atomic_path(cache) as tmp:
                        torch.save(self._warm[key], tmp)
                except OSError as e:
                    warn(f"could not cache the warmed LM head in {cache} ({e}); it is fitted again next time")
        return self._warm[key]

    def _fit_warm_head(self, name: str, corpus: str, plan: dict, key_fields: dict) -> dict:
        body0, mlm0, tokenizer, _ = self.model(name)
        body, mlm = copy.deepcopy((body0, mlm0))
        body.to(self.device), mlm.to(self.device)
        texts = tartan.read_jsonl(corpus)[0] if corpus.endswith(".jsonl") else corpus
        task = tartan.mlm_task("warm", texts, tokenizer, body, mlm, self.max_length, limit=self.limit)
        task = dataclasses.replace(task, head=mlm)
        print(f"fitting an LM head for {name} on {plan['corpus']} ({plan['steps']} steps, body frozen) ...",
              flush=True)
        info = tartan.warm_mlm_head(body, mlm, task, plan["steps"], plan["lr"], plan["batch_size"])
        state = {n: p.detach().cpu().clone() for n, p in mlm.named_parameters()
                 if id(p) in {id(q) for q in tartan.head_parameters(mlm, body)}}
        digest = hashlib.sha256(b"".join(state[n].numpy().tobytes() for n in sorted(state))).hexdigest()
        print(f"  MLM loss {info['loss_before']:.3f} -> {info['loss_after']:.3f}", flush=True)
        return {"state": state, "info": {**info, "sha256": digest, "key": key_fields}}

    def prepare(self, run: Run):
        """Fetch and read everything a run needs, before any training (so that bad input fails early)."""
        if run.task == "mammals":
            return self.cifar()
        self.model(self.released(run))
        folder = self.task_folder(run.task)
        if run.task not in self._checked:
            for split in ("train", "dev", "test"):
                self.file(f"{folder}/{split}.jsonl")
            tartan.read_end_task(os.path.join(self.settings.data_dir, folder))
            self._checked.add(run.task)
        for name in self.stages(run)[1]:
            rel = self.corpus(run.task, name)
            if rel not in self._checked:
                tartan.read_lines(self.file(rel))
                self._checked.add(rel)
        self.warm_head(run)

    def cifar(self) -> dict:
        if self._cifar is None:
            path = os.path.join(self.settings.data_dir, "cifar-100", "cifar-100-python.tar.gz")
            if not os.path.isfile(path):
                download(CIFAR_URL, path, md5=CIFAR_MD5, timeout=120, progress=self.settings.progress)
            elif file_digest(path, "md5") != CIFAR_MD5:
                warn(f"{path} differs from the official archive (MD5 {CIFAR_MD5}); using it as it is")
            self.files["cifar-100/cifar-100-python.tar.gz"] = (path, file_digest(path))
            self._cifar = read_cifar100(path)
            x = self._cifar["train"][0]  # channel mean and std of the training images, in [0, 1]
            self._cifar["stats"] = tuple(zip(*[(float(c.mean()), float(c.std()))
                                               for c in (x[:, i].astype(np.float32) / 255.0 for i in range(3))]))
        return self._cifar

    def build(self, run: Run):
        """(body, end-task, auxiliary tasks, data sizes) for one run, on the device, after seeding the run."""
        set_seed(run.seed)
        if run.task == "mammals":
            cifar = self.cifar()
            mean, std = cifar["stats"]
            body = WideResNet(16, 2, dropout=0.1, mean=mean, std=std)
            end, aux, sizes = mammals_tasks(cifar, run.seed, self.limit)
            aux = [aux] if run.aux else []
        else:
            body0, mlm0, tokenizer, _ = self.model(self.released(run))
            body, mlm = copy.deepcopy((body0, mlm0))  # one deepcopy keeps the tied decoder weight shared
            warm = self.warm_head(run)
            if warm is not None:  # every MLM task of every arm starts from this one fitted head
                with torch.no_grad():
                    for n, p in mlm.named_parameters():
                        if n in warm["state"]:
                            p.copy_(warm["state"][n])
            folder = os.path.dirname(self.file(f"{self.task_folder(run.task)}/train.jsonl"))
            end = tartan.end_task(run.task, folder, tokenizer, body.hidden_size, self.max_length,
                                  metric_field(self.task_metric(run.task)),
                                  limit=self.limit)
            mode, corpora = self.stages(run)
            chained = mode == "pretrain"  # DAPT+TAPT continues one model, LM head included
            aux = []
            for name in corpora:
                path = self.file(self.corpus(run.task, name))
                texts = tartan.read_jsonl(path)[0] if path.endswith(".jsonl") else path  # a user's task: its texts
                task = tartan.mlm_task(name, texts, tokenizer, body, mlm, self.max_length, limit=self.limit)
                aux.append(dataclasses.replace(task, head=mlm) if chained else task)
            sizes = {"train": len(end.train), "dev": len(end.dev), "test": len(end.test),
                     **{f"aux:{t.name}": len(t.train) for t in aux}}
        body.to(self.device)
        for t in [end] + aux:
            t.head.to(self.device)
        return body, end, aux, sizes

    def run_files(self, run: Run) -> list[str]:
        if run.task == "mammals":
            return ["cifar-100/cifar-100-python.tar.gz"]
        folder = self.task_folder(run.task)
        return [f"{folder}/{s}.jsonl" for s in ("train", "dev", "test")] + [self.corpus(run.task, n)
                                                                     for n in self.stages(run)[1]]

    def labels(self, run: Run) -> list[str]:
        """The end-task's label names, in the order of the head's outputs."""
        if run.task == "mammals":
            return list(MAMMALS)
        return tartan.read_end_task(os.path.dirname(self.file(f"{self.task_folder(run.task)}/train.jsonl")))["labels"]

    def test_lines(self, run: Run) -> list[int] | None:
        """The line in test.jsonl of each test example the run evaluates (None for mammals: examples by index)."""
        if run.task == "mammals":
            return None
        lines = tartan.read_jsonl(self.file(f"{self.task_folder(run.task)}/test.jsonl"))[2]
        return [lines[i] for i in tartan.subset(len(lines), self.limit)]  # the subset tartan.end_task keeps

    def config(self, run: Run) -> dict:
        """Everything that determines a run's result (compared on resume); JSON-normalised."""
        mode, corpora = self.stages(run)
        cfg, pre = make_configs(self.settings.budget, run.task, run.mode, run.seed, len(corpora))
        strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items()  # noqa: E731
                           if k != "progress" and (k not in LATER_FIELDS or v != LATER_FIELDS[k])} if c else None
        out = {**run.key, "aux": list(run.aux), "tartan_mode": mode, "limit": self.limit,
               "train": strip(cfg), "pretrain": [strip(p) for p in pre] if mode == "pretrain" else []}
        if self.released(run):
            out["released_checkpoint"] = self.released(run)
        if self.warm_head_plan(run):
            out["warm_mlm_head"] = self.warm_head_plan(run)
        if out["train"] and out["train"].get("final_finetune"):
            out["train"]["final_finetune"].pop("progress", None)
        if run.task == "mammals":
            out.update(body="WideResNet-16-2 (dropout 0.1)", split=dict(n_train=200, dev_frac=0.2, dev_cap=65,
                                                                         n_test=200, classes=MAMMALS))
        else:
            out.update(model=self.identity(), max_length=self.max_length, metric=self.task_metric(run.task),
                       corpora={n: self.corpus(run.task, n) for n in corpora})
            if run.task in self.settings.own_tasks:
                out["task_dir"] = self.settings.own_tasks[run.task]
        return json.loads(json.dumps(out))

    def execute(self, run: Run) -> dict:
        """Train and evaluate one run and write its result file, its test predictions beside it and (--save-model,
        into self.save_dirs[run]) its selected model; nothing is written unless it completes, the result file last."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        if os.path.exists(run.path(self.settings.out)):  # --rerun: the old result goes first, so that no new
            os.remove(run.path(self.settings.out))       # predictions or model ever sit beside it
        mode, corpora = self.stages(run)
        cfg, pre = make_configs(self.settings.budget, run.task, run.mode, run.seed, len(corpora),
                                self.settings.progress)
        self.prepare(run)
        peak = PeakMemory(self.device)
        if self.device.type == "cuda":
            peak.reset()
        body, end, aux, sizes = self.build(run)
        out = tartan.run_end_task(body, end, aux, mode, cfg, pre)
        metric = self.task_metric(run.task)
        tokens = {}
        for stage in out["stages"]:
            for name, n in stage.get("tokens", {}).items():
                tokens[name] = tokens.get(name, 0) + n
        record = {
            "complete": True, "key": run.key, "config": self.config(run),
            "dev": out["dev"], "test": out["test"],
            "headline": {"metric": metric, "dev": out["dev"][metric_field(metric)],
                         "test": out["test"][metric_field(metric)]},
            "history": out["history"], "stages": out["stages"],
            "steps": sum(s["steps"] for s in out["stages"]), "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads(),
            "peak_memory_mb": peak.read_mb() if self.device.type == "cuda" else None,
            "peak_rss_mb_process": PeakMemory.process_peak_rss_mb(), "tokens": tokens, "data_sizes": sizes,
            "data_files": {rel: {"sha256": h} for rel, (p, h) in self.files.items()
                           if rel in self.run_files(run)},
            "warm_mlm_head": (self.warm_head(run) or {}).get("info"),
            "device": describe_device(self.device), "versions": versions(),
            "command": [self.identity() if a == self.settings.model else a for a in sys.argv],  # no local path
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        labels = self.labels(run)
        write_predictions(predictions_path(run.path(self.settings.out)), end, out["test_predictions"],
                          self.test_lines(run), labels)
        if self.save_dirs.get(run):
            save_model_atomic(self.save_dirs[run], body, end.head,
                              self.model(self.released(run))[2] if run.task != "mammals" else None,
                              {"task": run.task, "labels": labels, "metric": metric, "key": run.key})
        atomic_write_json(run.path(self.settings.out), record)
        del body, end, aux
        gc.collect()
        return record


def execute_all(ws: Workspace, runs: list[Run]) -> dict[Run, dict]:
    """Run what is missing (resume), check that existing results were made with the same config, return all. A shard
    (Settings.shard) runs its share of the list and raises launch.Finished; --download-only fetches and raises it."""
    out, shard = ws.settings.out, ws.settings.shard
    if ws.settings.download_only:
        fetch_all(ws, runs)
    ws.save_dirs = {run: save_dir(ws.settings.save_model, run, len(runs) > 1) for run in runs}
    if shard.count > 1 and not ws.settings.report_only:
        runs = shard.take(runs)  # the full list is split before finished runs are skipped: shards never overlap
    results, todo = {}, []
    for run in runs:
        rec = load_result(run.path(out), run)
        if rec is not None and not ws.settings.rerun:
            diff = config_diff(ws.config(run), rec["config"])
            if diff:
                raise ReproduceError(f"{run.path(out)} was made with a different config ("
                                     + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
                                     + "). Use another --out, the same flags, or --rerun to replace it.")
            results[run] = rec
        else:
            todo.append(run)
    if ws.settings.report_only:
        return results
    for run in todo:  # fail early on bad input: every model, data file and corpus is read before training
        ws.prepare(run)
    if results:
        print(f"{len(results)} of {len(runs)} runs already complete in {out}: skipped")
    bar = progress_bar(len(todo), ws.settings.progress and len(todo) > 1, "runs")
    for i, run in enumerate(todo, 1):
        bar.set_description(str(run))
        rec = ws.execute(run)
        results[run] = rec
        h = rec["headline"]
        print(f"[{i}/{len(todo)}] {run}: dev {h['metric']} {h['dev']:.4f}, test {h['metric']} {h['test']:.4f}, "
              f"{rec['steps']} steps, {rec['wall_seconds']:.1f} s -> {run.path(out)}", flush=True)
        bar.update(1)
    bar.close()
    if results and len(results) > len(todo) and ws.settings.save_model:
        warn(f"{len(results) - len(todo)} run(s) were complete already and were not trained again: --save-model saved "
             f"no model for them (--rerun trains them again)")
    if shard.count > 1:
        raise Finished(shard_summary(shard, runs, results, todo))
    return results


def save_dir(root: str | None, run: Run, several: bool) -> str | None:
    """Where --save-model puts a run's model: the folder itself for a single run, else one subfolder per run."""
    if root is None:
        return None
    return os.path.join(root, run.task, os.path.basename(run.path(""))[:-len(".json")]) if several else root


def fetch_all(ws: Workspace, runs: list[Run]):
    """--download-only: fetch and check every model, data file and corpus the runs need (all of them, whatever the
    shard), then stop."""
    for run in runs:
        ws.prepare(run)
    names = sorted({rel for run in runs for rel in ws.run_files(run)})
    models = sorted({ws.released(r) or ws.settings.model for r in runs if r.task != "mammals"})
    model = f"model(s) {', '.join(models)} and " if models else ""
    raise Finished(f"--download-only: {model}{len(names)} data file(s) of {len(runs)} run(s) are in place and "
                   f"readable:\n" + "\n".join(f"  {ws.files[n][0] if n in ws.files else n}" for n in names))


def shard_summary(shard: Shard, runs: list[Run], results: dict, todo: list[Run]) -> str:
    """What a shard prints when its runs are done: only its own runs, and how to make the table of all shards."""
    lines = [f"{shard}: {len(runs)} run(s) of the command are this shard's; {len(todo)} trained now, "
             f"{len(runs) - len(todo)} complete already."]
    for run in runs:
        h = results[run]["headline"]
        lines.append(f"  {run}: test {h['metric']} {h['test']:.4f}")
    lines.append("When every shard has finished, the same command with --report-only (and no --shard) prints the "
                 "table of all of them.")
    return "\n".join(lines)
