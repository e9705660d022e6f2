"""Runs: the identity of one run, its configs from the budget flags, its result file, and resume."""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import tartan

from .common import ReproduceError, _bar, _peak_rss_mb, atomic_write_json, describe_device, set_seed, warn
from .data import (CIFAR_MD5, CIFAR_URL, corpus_file, download, ensure_file, file_digest, read_corpus,
                   read_text_task)
from .paper import BUDGETS, QUICK, TASKS, VISION, VISION_META
from .vision import MAMMALS, WideResNet, mammals_tasks, read_cifar100



FLAGS = {  # flag -> (config field, stages it sets)
    "batch_size": ("batch_size", ("train", "final")),
    "aux_batch_size": ("aux_batch_size", ("train", "pretrain")),
    "grad_accum": ("grad_accum", ("train", "pretrain", "final")),
    "epochs": ("epochs", ("train",)), "steps": ("max_steps", ("train",)),
    "lr": ("lr", ("train",)), "head_lr": ("head_lr", ("train",)),
    "eval_every": ("eval_every", ("train",)), "patience": ("patience", ("train",)),
    "meta_lr": ("meta_lr", ("train",)), "meta_batch_size": ("meta_batch_size", ("train",)),
    "meta_head_steps": ("meta_head_steps", ("train",)), "meta_head_lr": ("meta_head_lr", ("train",)),
    "pretrain_epochs": ("epochs", ("pretrain",)), "pretrain_steps": ("max_steps", ("pretrain",)),
    "pretrain_lr": ("lr", ("pretrain",)), "pretrain_head_lr": ("head_lr", ("pretrain",)),
    "final_epochs": ("epochs", ("final",)), "final_steps": ("max_steps", ("final",)),
    "final_lr": ("lr", ("final",)), "final_head_lr": ("head_lr", ("final",)),
}


def _with(cfg, values: dict):
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})


def stage_values(args, stage: str, eq2: bool = False) -> dict:
    """Config values of one stage: --quick or --budget first, then the flags given."""
    values = dict(QUICK[stage]) if args.quick else {}
    if args.budget:
        values.update(BUDGETS[args.budget][stage] or {})
        if eq2:
            values.update(BUDGETS[args.budget]["eq2"])
    for flag, (name, stages) in FLAGS.items():
        if stage in stages and getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    return values


def make_configs(args, task: str, mode: str, seed: int, n_pretrain: int):
    """(config of the end-task stage, [config of each Eq. 1 stage]) for one run; seed drives data order and masking."""
    vision = task == "mammals"
    common = dict(seed=seed, progress=args.progress)
    if mode in ("mt", "meta", "meta-samehead"):
        cfg = tartan.MetaConfig(same_head=mode == "meta-samehead") if mode != "mt" else tartan.TrainConfig()
        cfg = _with(cfg, {**(VISION if vision else {}), **(VISION_META if vision else {})})
        final = None
        no_final = args.no_final_finetune or (args.budget and BUDGETS[args.budget]["final"] is None)
        if not vision and not no_final:  # the optional Eq. 2 stage (released scripts' settings)
            final = _with(tartan.tartan_finetune(), {**stage_values(args, "final"), **common})
        cfg = _with(cfg, {**stage_values(args, "train"), **common, "final_finetune": final})
    else:
        cfg = _with(tartan.FinetuneConfig(), {**(VISION if vision else {}), **stage_values(args, "train", eq2=True),
                                              **common})
    pre = _with(tartan.PretrainConfig(), {**(VISION if vision else {}), "eval_every": -1,
                                           **stage_values(args, "pretrain"), **common})
    return cfg, [pre] * n_pretrain


def tartan_mode(mode: str) -> str:
    return {"tapt": "pretrain", "dapt": "pretrain", "dapt+tapt": "pretrain", "meta-samehead": "meta"}.get(mode, mode)


# ----------------------------------------------------------------------------------------------------------------------
# 5. One run: (task, mode, auxiliary corpora, seed) -> one JSON result file.


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
    spec = {"tapt": "tapt", "dapt": "dapt", "dapt+tapt": "dapt+tapt"}.get(mode)
    if mode in ("mt", "meta", "meta-samehead"):
        spec = aux or "tapt"
    names = [] if spec in (None, "none") else [f"dapt{dapt}" if s == "dapt" else s for s in spec.split("+")]
    if mode in ("tapt", "dapt", "dapt+tapt"):
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


def config_diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} here, {b!r} in the file"]

def versions() -> dict:
    import transformers
    here = os.path.dirname(os.path.abspath(tartan.__file__))
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "tartan.py_sha256": file_digest(os.path.join(here, "tartan.py"))}


class Workspace:
    """What every run of one invocation shares: the loaded checkpoint (a deep copy per run), tokenised data, files."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.max_length = args.max_length or (QUICK["max_length"] if args.quick else
                                              BUDGETS[args.budget]["max_length"] if args.budget else 512)
        self.limit = args.limit if args.limit is not None else (QUICK["limit"] if args.quick else None)
        self.extra = dict(args.extra_corpora)
        self._model, self._text, self._corpora, self._cifar, self.files = None, {}, {}, None, {}

    def file(self, rel: str) -> str:
        """A data file, fetched on first use; its SHA-256 is recorded in the result files."""
        if rel not in self.files:
            if os.path.isabs(rel):
                if not os.path.isfile(rel):
                    raise ReproduceError(f"{rel}: no such file")
                path = rel
            else:
                path = ensure_file(self.args.data_dir, rel, self.args.data_url, progress=self.args.progress)
            self.files[rel] = (path, file_digest(path))
        return self.files[rel][0]

    def model(self):
        if self._model is None:
            set_seed(0)  # newly initialised checkpoint weights (e.g. a missing MLM head) are the same for every run
            body, mlm, tokenizer, missing = tartan.from_pretrained(self.args.model)
            if missing:
                print(f"note: {self.args.model} has no weights for {len(missing)} tensors (e.g. {missing[0]}); they "
                      f"are newly initialised, the same for every seed")
            self._model = (body, mlm, tokenizer, missing)
        return self._model

    def prepare(self, run: Run):
        """Load and check everything a run needs, before any training (so bad input fails early)."""
        if run.task == "mammals":
            return self.cifar()
        tokenizer = self.model()[2]
        folder = TASKS[run.task]["folder"]
        if run.task not in self._text:
            for split in ("train", "dev", "test"):
                self.file(f"{folder}/{split}.jsonl")
            self._text[run.task] = read_text_task(os.path.join(self.args.data_dir, folder), tokenizer,
                                                  self.max_length, self.limit)
        for name in run.aux:
            if (run.task, name) not in self._corpora:
                path = self.file(corpus_file(run.task, name, self.extra))
                self._corpora[run.task, name] = read_corpus(path, tokenizer, self.max_length, self.limit)

    def cifar(self) -> dict:
        if self._cifar is None:
            path = os.path.join(self.args.data_dir, "cifar-100", "cifar-100-python.tar.gz")
            if not os.path.isfile(path):
                download(CIFAR_URL, path, md5=CIFAR_MD5, timeout=120, progress=self.args.progress)
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
            body0, mlm0, tokenizer, _ = self.model()
            body, mlm = copy.deepcopy((body0, mlm0))  # one deepcopy keeps the tied decoder weight shared
            data = self._text[run.task]
            end = tartan.Task(run.task, tartan.ClassificationHead(body.hidden_size, len(data["labels"])),
                              data["train"], dev=data["dev"], test=data["test"], num_labels=len(data["labels"]),
                              metric="micro_f1" if TASKS[run.task]["metric"] == "micro_f1" else "macro_f1")
            masking = tartan.Masking.for_tokenizer(tokenizer)
            chained = tartan_mode(run.mode) == "pretrain"  # DAPT+TAPT continues one model, LM head included
            aux = [tartan.Task(name, mlm if chained else tartan.new_mlm_head(mlm, body),
                               self._corpora[run.task, name], masking=masking) for name in run.aux]
            sizes = {"train": len(data["train"]), "dev": len(data["dev"]), "test": len(data["test"]),
                     **{f"aux:{name}": len(self._corpora[run.task, name]) for name in run.aux}}
        body.to(self.device)
        for t in [end] + aux:
            t.head.to(self.device)
        return body, end, aux, sizes

    def run_files(self, run: Run) -> list[str]:
        if run.task == "mammals":
            return ["cifar-100/cifar-100-python.tar.gz"]
        folder = TASKS[run.task]["folder"]
        return [f"{folder}/{s}.jsonl" for s in ("train", "dev", "test")] + [corpus_file(run.task, n, self.extra)
                                                                            for n in run.aux]

    def config(self, run: Run) -> dict:
        """Everything that determines a run's result (compared on resume); JSON-normalised."""
        cfg, pre = make_configs(self.args, run.task, run.mode, run.seed, len(run.aux))
        strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "progress"} if c else None  # noqa
        out = {**run.key, "aux": list(run.aux), "tartan_mode": tartan_mode(run.mode), "limit": self.limit,
               "train": strip(cfg), "pretrain": [strip(p) for p in pre] if tartan_mode(run.mode) == "pretrain" else []}
        if out["train"] and out["train"].get("final_finetune"):
            out["train"]["final_finetune"].pop("progress", None)
        if run.task == "mammals":
            out.update(body="WideResNet-16-2 (dropout 0.1)", split=dict(n_train=200, dev_frac=0.2, dev_cap=65,
                                                                         n_test=200, classes=MAMMALS))
        else:
            out.update(model=self.args.model, max_length=self.max_length,
                       metric=TASKS[run.task]["metric"], corpora={n: corpus_file(run.task, n, self.extra)
                                                                  for n in run.aux})
        return json.loads(json.dumps(out))

    def execute(self, run: Run) -> dict:
        """Train and evaluate one run and write its result file; nothing is written unless it completes."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        cfg, pre = make_configs(self.args, run.task, run.mode, run.seed, len(run.aux))
        self.prepare(run)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        body, end, aux, sizes = self.build(run)
        out = tartan.run_end_task(body, end, aux, tartan_mode(run.mode), cfg, pre)
        metric = TASKS[run.task]["metric"]
        field = "micro_f1" if metric == "accuracy" else metric
        tokens = {}
        for stage in out["stages"]:
            for name, n in stage.get("tokens", {}).items():
                tokens[name] = tokens.get(name, 0) + n
        record = {
            "complete": True, "key": run.key, "config": self.config(run),
            "dev": out["dev"], "test": out["test"],
            "headline": {"metric": metric, "dev": out["dev"][field], "test": out["test"][field]},
            "history": out["history"], "stages": out["stages"],
            "steps": sum(s["steps"] for s in out["stages"]), "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads(),
            "peak_memory_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                               else None),
            "peak_rss_mb_process": _peak_rss_mb(), "tokens": tokens, "data_sizes": sizes,
            "data_files": {rel: {"path": p, "sha256": h} for rel, (p, h) in self.files.items()
                           if rel in self.run_files(run)},
            "device": describe_device(self.device), "versions": versions(), "command": sys.argv,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(run.path(self.args.out), record)
        del body, end, aux
        gc.collect()
        return record

def execute_all(ws: Workspace, runs: list[Run]) -> dict[Run, dict]:
    """Run what is missing (resume), check that existing results were made with the same config, return all."""
    results, todo = {}, []
    for run in runs:
        rec = load_result(run.path(ws.args.out), run)
        if rec is not None and not ws.args.rerun:
            diff = config_diff(ws.config(run), rec["config"])
            if diff:
                raise ReproduceError(f"{run.path(ws.args.out)} was made with a different config ("
                                     + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
                                     + "). Use another --out, the same flags, or --rerun to replace it.")
            results[run] = rec
        else:
            todo.append(run)
    if ws.args.report_only:
        return results
    for run in todo:  # fail early on bad input: every model, data file and corpus is loaded before training
        ws.prepare(run)
    done = len(results)
    if done:
        print(f"{done} of {len(runs)} runs already complete in {ws.args.out}: skipped")
    bar = _bar(len(todo), ws.args.progress and len(todo) > 1, "runs")
    for i, run in enumerate(todo, 1):
        bar.set_description(str(run))
        rec = ws.execute(run)
        results[run] = rec
        h = rec["headline"]
        print(f"[{i}/{len(todo)}] {run}: dev {h['metric']} {h['dev']:.4f}, test {h['metric']} {h['test']:.4f}, "
              f"{rec['steps']} steps, {rec['wall_seconds']:.1f} s -> {run.path(ws.args.out)}", flush=True)
        bar.update(1)
    bar.close()
    return results
