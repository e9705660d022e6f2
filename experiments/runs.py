"""Runs: the budget a run is made under, what the settings decide for it, its configs and their check, its identity,
building its tasks, training it (resumed from its progress file) and its result file. What the runs of a command share
(data files, model checkpoints) is in store.py; which runs a command makes, in tables.py.

A run is one (task, mode, auxiliary corpora, seed). Its config (run_config) is everything that determines its result;
it is stored in the result file and compared on resume, so a result is never mixed in from other settings.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import glob
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import tartan

from .common import (PeakMemory, ReproduceError, atomic_write_json, describe_device, probe_writable, progress_bar,
                     set_seed, warn)
from .data import DATA_URL, corpus_file, file_digest
from .flags import CONFIG_FLAGS, STAGES, check_flag_config, option
from .keep import check_save_dir, predictions_path, save_model_atomic, write_predictions
from .launch import Finished, Shard
from .own import own_corpus_file
from . import resume, tasks
from .paper import (BUDGETS, PAPER_MAX_LENGTH, PAPER_WARM_HEAD, PRETRAIN_MODES, PRETRAIN_TEXT_MODES, QUICK, RELEASED,
                    TARTAN_MODES, TASKS, VISION, VISION_META, metric_field, tartan_mode)
from .store import Checkpoints, DataFiles, cache_path, corpus_texts, progress_path
from .vision import MAMMALS, WideResNet, mammals_tasks

@dataclass(frozen=True)
class Budget:
    """How a run departs from the paper's settings: --quick, a named --budget, and the config flags given
    (flags.CONFIG_FLAGS dests -> values), each applied in that order over the paper's values."""
    quick: bool = False
    name: str | None = None
    overrides: dict = field(default_factory=dict)
    no_final_finetune: bool = False
    precision: str = "auto"  # --precision: auto (bf16 on CUDA, fp32 on a CPU), bf16 (on a CPU too), fp32
    test_curves: bool = True  # --no-test-curves turns off a budget's test scores at every evaluation
    max_length: int | None = None
    limit: int | None = None
    warm_head_steps: int | None = None  # --warm-head-steps

    def __post_init__(self):
        if self.quick and self.name:  # each sets the lengths, steps and sizes: which wins would be a guess
            raise ReproduceError(f"--quick and --budget {self.name} both set the run's size: give one of them")

    @property
    def warm_head(self) -> dict | None:
        """How a checkpoint without an LM head gets one fitted before any MLM stage (models.warm_mlm_head): the
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
        for dest, flag in CONFIG_FLAGS.items():
            if stage in flag.stages and self.overrides.get(dest) is not None:
                values[flag.field] = self.overrides[dest]
        if self.precision != "auto":  # TrainConfig.bf16: None (auto), True, False
            values["bf16"] = self.precision == "bf16"
        if not self.test_curves:
            values["eval_test"] = False
        return values

    def describe(self) -> str:
        """The budget in the words of the command line, printed under a table."""
        given = [f"{option(k)} {self.overrides[k]}" for k in CONFIG_FLAGS if self.overrides.get(k) is not None]
        given += [f"{option(k)} {v}" for k, v in (("max_length", self.max_length), ("limit", self.limit))
                  if v is not None]
        if self.warm_head_steps is not None:
            given.append(f"--warm-head-steps {self.warm_head_steps}")
        if self.no_final_finetune:
            given.append("--no-final-finetune")
        if self.precision != "auto":
            given.append(f"--precision {self.precision}")
        if not self.test_curves:
            given.append("--no-test-curves")
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
    command: list | None = None  # the command line as given (None: sys.argv), recorded without local paths

    def __post_init__(self):
        if self.checkpoint_dir is not None and not os.path.isdir(self.checkpoint_dir):  # else the Hub, unasked
            raise ReproduceError(f"--checkpoint-dir {self.checkpoint_dir}: no such folder")

    # What the settings decide for one run, before anything is fetched or loaded.

    def task_folder(self, task: str) -> str:
        """The end-task's folder: relative to the data folder for the paper's tasks, absolute for a user's."""
        return self.own_tasks.get(task) or TASKS[task]["folder"]

    def task_metric(self, task: str) -> str:
        return self.metric if task in self.own_tasks else TASKS[task]["metric"]

    def corpus(self, task: str, name: str) -> str:
        """The file of one auxiliary corpus of a task (see data.corpus_file and own.own_corpus_file)."""
        if task in self.own_tasks:
            return own_corpus_file(self.own_tasks[task], name, self.extra_corpora)
        return corpus_file(task, name, self.extra_corpora)

    def released(self, run: Run) -> str | None:
        """The Hub id of the released checkpoint that stands for this run's Eq. 1 stages (Sec. 4), if it uses one."""
        if self.baselines == "retrain":
            return None
        ckpt = RELEASED.get((run.task, run.mode, run.aux))
        if ckpt is None and self.baselines == "released" and run.mode in PRETRAIN_TEXT_MODES:
            raise ReproduceError(f"--baselines released: there is no released checkpoint for {run} (there are for "
                                 f"TAPT, and for DAPT and DAPT+TAPT on the full domain corpus, --dapt-corpus full, "
                                 f"without --aux-file); use --baselines retrain")
        return ckpt

    def stages(self, run: Run) -> tuple[str, tuple[str, ...]]:
        """(tartan mode, auxiliary corpora actually trained on): a released checkpoint replaces the Eq. 1 stages."""
        return ("finetune", ()) if self.released(run) else (tartan_mode(run.mode), run.aux)

    def warm_head_plan(self, run: Run) -> dict | None:
        """The warmed-LM-head settings of a run (Budget.warm_head, fitted on the task's TAPT text), or None: the
        mode trains no MLM head or the budget fits none. They act only where the checkpoint has no LM head (see
        Workspace.warm_head); the plan does not depend on that, so that a config is known without loading the model."""
        plan = self.budget.warm_head
        if plan is None or run.task == "mammals" or not self.stages(run)[1]:
            return None
        return {**plan, "corpus": self.corpus(run.task, "tapt")}

    def shown(self, path: str) -> str:
        """A data file as result files name it: under the data folder, by its path there; a user's file by its task's
        name or its corpus name, and its file name; never by where it sits on this machine."""
        if not os.path.isabs(path):
            return path
        task = next((n for n, folder in self.own_tasks.items() if os.path.dirname(path) == folder), None)
        corpus = next((n for n, p in self.extra_corpora.items() if os.path.abspath(p) == path), "file")
        return f"{task}/{os.path.basename(path)}" if task else f"{corpus}: {os.path.basename(path)}"

    def run_files(self, run: Run) -> list[str]:
        """The data files a run reads (relative to the data folder, or a user's absolute paths)."""
        if run.task == "mammals":
            return ["cifar-100/cifar-100-python.tar.gz"]
        folder = self.task_folder(run.task)
        return [f"{folder}/{s}.jsonl" for s in ("train", "dev", "test")] + [self.corpus(run.task, n)
                                                                     for n in self.stages(run)[1]]


def _placeless(arg: str) -> str:
    """A command-line word as a result file keeps it: an absolute path (also in --flag=PATH) by its last name."""
    flag, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
    return flag + eq + (os.path.basename(value.rstrip(os.sep)) or value if os.path.isabs(value) else value)


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


def check_configs(budget: Budget, runs: list[Run]) -> None:
    """tartan.check_config of every stage's config that the runs would train with (make_configs), before anything is
    fetched or loaded: a ReproduceError naming the flag (flags.check_flag_config)."""
    for run in runs:
        cfg, pre = make_configs(budget, run.task, run.mode, run.seed, 1)
        stages = {"train": cfg, "final": cfg.final_finetune, "pretrain": pre[0] if run.mode in PRETRAIN_MODES else None}
        for stage, c in stages.items():
            if c is not None:  # a stage the run has
                check_flag_config(c, stage, f"the {STAGES[stage]} of {run}")
            given = [d for d, f in CONFIG_FLAGS.items() if stage in f.stages and budget.overrides.get(d) is not None]
            epochs = [d for d in given if CONFIG_FLAGS[d].field == "epochs"]
            if c is not None and c.max_steps and epochs:  # tartan.train counts max_steps, not epochs, once it is set
                raise ReproduceError(f"{option(epochs[0])} does not apply to the {STAGES[stage]} of {run}: its steps "
                                     f"are set ({c.max_steps}, by --quick, --budget or a --steps flag)")
            patience = [d for d in given if CONFIG_FLAGS[d].field == "patience"]
            if c is not None and c.eval_every < 0 and patience:  # early stopping counts evaluations
                raise ReproduceError(f"{option(patience[0])} does not apply to the {STAGES[stage]} of {run}: it "
                                     f"never evaluates (--eval-every -1)")
            final = [d for d in given if CONFIG_FLAGS[d].stages == ("final",)]
            if c is None and final and run.mode in TARTAN_MODES and budget.no_final_finetune:
                raise ReproduceError(f"{option(final[0])} does not apply beside --no-final-finetune")


def check_released(settings: Settings, runs: list[Run]) -> None:
    """An Eq. 1 stage flag where a released checkpoint stands for every Eq. 1 stage of the runs does nothing: a
    ReproduceError naming it."""
    given = [d for d, f in CONFIG_FLAGS.items() if f.stages == ("pretrain",) and settings.budget.overrides.get(d)
             is not None]
    eq1 = [run for run in runs if run.mode in PRETRAIN_MODES]
    if given and eq1 and all(settings.released(run) for run in eq1):
        raise ReproduceError(f"{option(given[0])} does not apply: the released checkpoint "
                             f"{settings.released(eq1[0])} stands for the Eq. 1 stage of {eq1[0]} (--baselines "
                             f"retrain trains it)")


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

def _file_identity(path: str) -> tuple | None:
    """What tells a file from one written over it since: its inode, size and modification time (None: no file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_result(path: str, run: Run | None = None) -> dict | None:
    """A complete result file (for `run`), or None when there is none or it is incomplete or unreadable."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("complete") is not True or (run is not None and rec.get("key") != run.key):
        return None
    if "precision" not in rec:  # written when bf16=True meant bf16 on CUDA only, as bf16=None means now
        _bf16_as_now(rec["config"])
    return rec


def _bf16_as_now(config):
    """An older result file's configs with bf16=True read as None (both: bf16 autocast on CUDA, fp32 on a CPU)."""
    if isinstance(config, dict):
        for key, value in config.items():
            config[key] = None if key == "bf16" and value is True else value
            _bf16_as_now(value)
    elif isinstance(config, list):
        for value in config:
            _bf16_as_now(value)


# Fields added to tartan's configs after result files were committed, each with the value that does what those files
# ran: a run's stored config leaves a field out while it holds that value, so the older files still match on resume.
LATER_FIELDS = {"meta_val_batch_size": 0, "meta_head_data": "train", "meta_head_tol": 0.0, "eval_test": False}


def config_diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} here, {b!r} in the file"]


# the tartan.py this process imported, read now: the file may change on disk while a long run trains
TARTAN_SHA256 = file_digest(tartan.__file__)
# and the runner's modules that build and run a run (how data is read, subset, tokenised): a run resumes only under
# the code it began with; the modules that only print, plot or time are left out
_NOT_TRAINING = ("report.py", "analysis.py", "bench.py", "demo.py", "diagnose.py", "hf_trainer.py", "tables.py")
RUNNER_SHA256 = hashlib.sha256(" ".join(
    file_digest(f) for f in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py")))
    if not os.path.basename(f).startswith(("test_", "conftest")) and os.path.basename(f) not in _NOT_TRAINING
).encode()).hexdigest()


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "tartan.py_sha256": TARTAN_SHA256,
            "experiments_sha256": RUNNER_SHA256}


def run_config(settings: Settings, models: Checkpoints, run: Run) -> dict:
    """Everything that determines a run's result (compared on resume); JSON-normalised."""
    mode, corpora = settings.stages(run)
    cfg, pre = make_configs(settings.budget, run.task, run.mode, run.seed, len(corpora))
    strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items()  # noqa: E731
                       if k != "progress" and (k not in LATER_FIELDS or v != LATER_FIELDS[k])} if c else None
    out = {**run.key, "aux": list(run.aux), "tartan_mode": mode, "limit": settings.budget.examples,
           "train": strip(cfg), "pretrain": [strip(p) for p in pre] if mode == "pretrain" else []}
    if settings.released(run):
        out["released_checkpoint"] = settings.released(run)
    if settings.warm_head_plan(run):
        plan = settings.warm_head_plan(run)
        out["warm_mlm_head"] = {**plan, "corpus": settings.shown(plan["corpus"])}
    if out["train"] and out["train"].get("final_finetune"):
        out["train"]["final_finetune"].pop("progress", None)
    if run.task == "mammals":
        out.update(body="WideResNet-16-2 (dropout 0.1)", split=dict(n_train=200, dev_frac=0.2, dev_cap=65,
                                                                     n_test=200, classes=MAMMALS))
    else:
        out.update(model=models.identity(), max_length=settings.budget.length, metric=settings.task_metric(run.task),
                   corpora={n: settings.shown(settings.corpus(run.task, n)) for n in corpora})
    return json.loads(json.dumps(out))


def vision_run(cifar: dict, run: Run, limit: int | None):
    """(body, end-task, auxiliary tasks, data sizes) of a mammals run (App. A.4): a fresh WideResNet-16-2."""
    mean, std = cifar["stats"]
    body = WideResNet(16, 2, dropout=0.1, mean=mean, std=std)
    end, aux, sizes = mammals_tasks(cifar, run.seed, limit)
    return body, end, [aux] if run.aux else [], sizes


def text_run(settings: Settings, data: DataFiles, checkpoint: tuple, warm: dict | None, run: Run):
    """(body, end-task, auxiliary tasks, data sizes) of a text run: a deep copy of the checkpoint, its LM head set to
    the warmed one if there is one, the end-task and one MLM task per auxiliary corpus."""
    body0, mlm0, tokenizer, _ = checkpoint
    body, mlm = copy.deepcopy((body0, mlm0))  # one deepcopy keeps the tied decoder weight shared
    if warm is not None:  # every MLM task of every arm starts from this one fitted head
        with torch.no_grad():
            for n, p in mlm.named_parameters():
                if n in warm["state"]:
                    p.copy_(warm["state"][n])
    length, limit = settings.budget.length, settings.budget.examples
    positions = getattr(body0.encoder.config, "max_position_embeddings", None) or tokenizer.model_max_length
    most = min(positions, tokenizer.model_max_length)  # RoBERTa: 512 of its 514 positions
    if not 3 <= length <= most:  # [CLS] a token [SEP] at the least; beyond the position embeddings the body fails
        raise ReproduceError(f"max length {length} (--max-length, or the budget's): the model takes 3 to {most} tokens "
                             f"a row; give --max-length within that")
    end = tasks.end_task(run.task, data.end_task_dir(settings.task_folder(run.task)), tokenizer, body.hidden_size,
                          length, metric_field(settings.task_metric(run.task)), limit=limit)
    mode, corpora = settings.stages(run)
    chained = mode == "pretrain"  # DAPT+TAPT continues one model, LM head included
    aux = []
    for name in corpora:
        path = data.file(settings.corpus(run.task, name))
        texts = corpus_texts(path)
        task = tasks.mlm_task(name, texts, tokenizer, body, mlm, length, limit=limit)
        aux.append(dataclasses.replace(task, head=mlm) if chained else task)
    sizes = {"train": len(end.train), "dev": len(end.dev), "test": len(end.test),
             **{f"aux:{t.name}": len(t.train) for t in aux}}
    return body, end, aux, sizes


def result_record(run: Run, config: dict, out: dict, metric: str, sizes: dict, data_files: dict, warm: dict | None,
                  device: torch.device, started: tuple[float, float], peak: PeakMemory, command: list[str]) -> dict:
    """The result file of a run: its key and config, tartan.run_end_task's scores, history and stages, the headline
    metric, cost (steps, time, memory, tokens), the data files' digests, the warmed head, device and versions. The
    time of a resumed run counts its interrupted processes up to their last save ("resumed")."""
    tokens, before = {}, out.get("resumed") or {}  # before: the interrupted processes' time
    for stage in out["stages"]:
        for name, n in stage.get("tokens", {}).items():
            tokens[name] = tokens.get(name, 0) + n
    return {
        "complete": True, "key": run.key, "config": config,
        "dev": out["dev"], "test": out["test"],
        "headline": {"metric": metric, "dev": out["dev"][metric_field(metric)],
                     "test": out["test"][metric_field(metric)]},
        "history": out["history"], "stages": out["stages"],
        "steps": sum(s["steps"] for s in out["stages"]),
        "wall_seconds": time.perf_counter() - started[0] + before.get("wall_seconds", 0.0),
        "cpu_seconds": time.process_time() - started[1] + before.get("cpu_seconds", 0.0),
        "resumed": out.get("resumed"), "threads": torch.get_num_threads(),
        "peak_memory_mb": peak.read_mb() if device.type == "cuda" else None,
        "peak_rss_mb_process": PeakMemory.process_peak_rss_mb(), "tokens": tokens, "data_sizes": sizes,
        "data_files": data_files, "warm_mlm_head": (warm or {}).get("info"),
        "device": describe_device(device), "versions": versions(), "command": command,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class Workspace:
    """What every run of one command shares (the settings, the data files, the loaded checkpoints, the device), and
    the steps of one run: its config, fetching what it needs, building its tasks, training it and writing its files."""

    def __init__(self, settings: Settings, device: torch.device):
        self.settings, self.device = settings, device
        self.data = DataFiles(settings.data_dir, settings.data_url, settings.progress)
        self.models = Checkpoints(settings.model, settings.checkpoint_dir, device)
        self.save_dirs = {}  # run -> folder of its saved model (--save-model), set by execute_all
        self.meanwhile = set()  # runs whose result another process wrote while this command ran (not trained here)

    def config(self, run: Run) -> dict:
        return run_config(self.settings, self.models, run)

    def warm_head(self, run: Run) -> dict | None:
        """The warmed LM head of a run whose plan has one and whose checkpoint has no LM head (Checkpoints.warm_head),
        else None."""
        plan = self.settings.warm_head_plan(run)
        name = self.settings.released(run) or self.settings.model
        if plan is None or not self.models.load(name)[3]:  # no plan, or the checkpoint has its own LM head
            if plan is not None and self.settings.budget.warm_head_steps:
                raise ReproduceError(f"--warm-head-steps: {self.models.identity(name)} has its own LM head, so no "
                                     f"head is warmed; drop the flag")
            return None
        corpus = self.data.file(plan["corpus"])
        return self.models.warm_head(name, plan, corpus, self.data.sha256(plan["corpus"]), self.settings.budget.length,
                                     self.settings.budget.examples)

    def prepare(self, run: Run) -> None:
        """Fetch and read everything a run needs, before any training (so that bad input fails early)."""
        if run.task == "mammals":
            self.data.cifar()
            return
        self.models.load(self.settings.released(run))
        self.data.check_end_task(self.settings.task_folder(run.task))
        for name in self.settings.stages(run)[1]:
            self.data.check_corpus(self.settings.corpus(run.task, name))
        self.warm_head(run)

    def build(self, run: Run):
        """(body, end-task, auxiliary tasks, data sizes) for one run, on the device, after seeding the run."""
        set_seed(run.seed)
        if run.task == "mammals":
            body, end, aux, sizes = vision_run(self.data.cifar(), run, self.settings.budget.examples)
        else:
            checkpoint = self.models.load(self.settings.released(run))
            body, end, aux, sizes = text_run(self.settings, self.data, checkpoint, self.warm_head(run), run)
        body.to(self.device)
        for t in [end] + aux:
            t.head.to(self.device)
        return body, end, aux, sizes

    def finished(self, run: Run) -> dict | None:
        """The run's complete result file in --out, unless --rerun is given; one made with another config is an
        error, and so (for a command that trains) is one made from data files that differ from those here now."""
        path = run.path(self.settings.out)
        rec = None if self.settings.rerun else load_result(path, run)
        diff = config_diff(self.config(run), rec["config"]) if rec is not None else []
        if diff:
            raise ReproduceError(f"{path} was made with a different config (" + "; ".join(diff[:4])
                                 + ("; ..." if len(diff) > 4 else "") + ("). --report-only: give the flags it was run "
                                 "with" if self.settings.report_only else "). Use another --out, the same flags, or "
                                 "--rerun to replace it") + ".")
        # --report-only re-prints what was measured, whatever data sits here; a command that trains takes the file
        # as its own run, so each data file it recorded and that is here must be the one it trained on
        if rec is not None and not self.settings.report_only:
            here = {self.settings.shown(f): f for f in self.settings.run_files(run)}
            for rel, made in (rec.get("data_files") or {}).items():
                now = self.data.local_sha256(here.get(rel, rel))
                if now is not None and now != made["sha256"]:
                    raise ReproduceError(f"{path} was made from another {rel} (SHA-256 {made['sha256'][:12]}..., "
                                         f"{now[:12]}... here). Use another --out, or --rerun to replace it.")
        return rec

    def _kept(self, run: Run, rec: dict) -> dict:
        """Another process's result for `run`, kept and said to be so; the run counts as not trained here."""
        print(f"{run}: finished meanwhile by another process; its result {run.path(self.settings.out)} is kept",
              flush=True)
        self.meanwhile.add(run)
        return rec

    def execute(self, run: Run) -> dict:
        """Train and evaluate one run and write its result file, its test predictions beside it and (--save-model,
        into self.save_dirs[run]) its selected model; nothing is written unless it completes, the result file last.
        A result that another process (a shard, an overlapping command) has written since the command began is kept,
        not trained again."""
        started = time.perf_counter(), time.process_time()
        path = run.path(self.settings.out)
        if (done := self.finished(run)) is not None:
            return self._kept(run, done)
        replaced = _file_identity(path)  # --rerun's old result (or a file cut off): kept until this run has trained
        mode, corpora = self.settings.stages(run)
        cfg, pre = make_configs(self.settings.budget, run.task, run.mode, run.seed, len(corpora),
                                self.settings.progress)
        self.prepare(run)
        peak = PeakMemory(self.device)
        if self.device.type == "cuda":
            peak.reset()
        body, end, aux, sizes = self.build(run)
        config = self.config(run)
        files = {self.settings.shown(rel): {"sha256": h} for rel, (_, h) in self.data.files.items()
                 if rel in self.settings.run_files(run)}
        # an interrupted run continues from its last save (every 10 minutes, and each stage's end), if its config,
        # its data files' contents and its code (tartan.py, the runner's modules) are the same
        progress = progress_path({**config, "files": files}, [TARTAN_SHA256, RUNNER_SHA256])
        # its record and stage files; a .tmp is a save that was cut off, which is never loaded
        saved = [f for f in glob.glob(glob.escape(progress) + "*") if not f.endswith(".tmp")]
        if saved:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(map(os.path.getmtime, saved))))
            print(f"{run}: resuming from its progress file {progress} (last saved {when})", flush=True)
        out = resume.run_end_task(body, end, aux, mode, cfg, pre, progress, keep=True)
        theirs = load_result(path, run) if _file_identity(path) != replaced else None
        if theirs is not None:  # an overlapping command finished it while this one trained
            if diff := config_diff(config, theirs["config"]):
                raise ReproduceError(f"{path} was written by another process while {run} trained here, with another "
                                     f"config ({'; '.join(diff[:2])}): it is kept, this result is not (another --out)")
            resume.remove(progress)
            return self._kept(run, theirs)
        metric = self.settings.task_metric(run.task)
        command = [self.models.identity() if a == self.settings.model else _placeless(a)
                   for a in self.settings.command or sys.argv]
        record = result_record(run, config, out, metric, sizes, files, self.warm_head(run), self.device,
                               started, peak, command)
        record["precision"] = "bf16" if tartan.bf16_enabled(self.device, cfg.bf16) else "fp32"  # what autocast ran
        if run.task == "mammals":  # examples by index, labels the five CIFAR-100 fine-label numbers
            labels, lines = list(MAMMALS), None
        else:
            folder = self.settings.task_folder(run.task)
            labels, lines = self.data.labels(folder), self.data.test_lines(folder, self.settings.budget.examples)
        for old in (path, predictions_path(path)):  # the old result goes first, its predictions with it, so that
            if os.path.exists(old):                 # no new predictions or model ever sit beside it
                os.remove(old)
        if self.save_dirs.get(run):  # before the predictions: a model that cannot be saved leaves nothing behind
            tokenizer = self.models.load(self.settings.released(run))[2] if run.task != "mammals" else None
            save_model_atomic(self.save_dirs[run], body, end.head, tokenizer,
                              {"task": run.task, "labels": labels, "metric": metric, "key": run.key})
        write_predictions(predictions_path(path), end, out["test_predictions"], lines, labels)
        atomic_write_json(path, record)
        resume.remove(progress)  # only now: had anything above failed, a new call takes the result from it
        del body, end, aux
        gc.collect()
        return record


def execute_all(ws: Workspace, runs: list[Run]) -> dict[Run, dict]:
    """Run what is missing (resume), check that existing results were made with the same config, return all. A shard
    (Settings.shard) runs its share of the list and raises launch.Finished; --download-only fetches and raises it."""
    out, shard = ws.settings.out, ws.settings.shard
    if not ws.settings.report_only:  # --report-only trains nothing and takes the result files as they are
        check_configs(ws.settings.budget, runs)
        check_released(ws.settings, runs)
    if ws.settings.download_only:
        fetch_all(ws, runs)
    ws.save_dirs = {run: save_dir(ws.settings.save_model, run, len(runs) > 1) for run in runs}
    if shard.count > 1 and not ws.settings.report_only:
        runs = shard.take(runs)  # the full list is split before finished runs are skipped: shards never overlap
    results, todo = {}, []
    for run in runs:
        rec = ws.finished(run)
        if rec is not None:
            results[run] = rec
        else:
            todo.append(run)
    if ws.settings.report_only:
        if not results:  # a mistyped --out must not print a table of empty cells as if it were one
            raise ReproduceError(f"--report-only: none of the {len(runs)} run(s) has a result file in {out} (drop "
                                 f"--report-only to run them, or give the --out they used)")
        return results
    for run in todo:  # fail early on bad input: every run's model folder, then every model, data file and corpus
        if ws.save_dirs.get(run):
            check_save_dir(ws.save_dirs[run])
    for run in todo:
        ws.prepare(run)
    for folder in sorted({os.path.dirname(run.path(out)) for run in todo}):  # and where results go, before training
        try:
            probe_writable(folder)
        except OSError as e:
            raise ReproduceError(f"--out {out}: results cannot be written there ({e})") from None
    if results:
        print(f"{len(results)} of {len(runs)} runs already complete in {out}: skipped")
    if todo and (note := resume.untouched(cache_path("runs"))):
        print(note, flush=True)
    bar = progress_bar(len(todo), ws.settings.progress and len(todo) > 1, "runs")
    for i, run in enumerate(todo, 1):
        bar.set_description(str(run))
        rec = ws.execute(run)
        results[run] = rec
        h = rec["headline"]
        if run not in ws.meanwhile:  # which said so itself (Workspace._kept)
            print(f"[{i}/{len(todo)}] {run}: dev {h['metric']} {h['dev']:.4f}, test {h['metric']} {h['test']:.4f}, "
                  f"{rec['steps']} steps, {rec['wall_seconds']:.1f} s -> {run.path(out)}", flush=True)
        bar.update(1)
    bar.close()
    trained = [r for r in todo if r not in ws.meanwhile]
    if results and (skipped := len(results) - len(trained)) and ws.settings.save_model:
        warn(f"{skipped} run(s) were complete already and were not trained again: --save-model saved "
             f"no model for them (--rerun trains them again)")
    if shard.count > 1:
        raise Finished(shard_summary(shard, runs, results, trained))
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
    names = sorted({rel for run in runs for rel in ws.settings.run_files(run)})
    models = sorted({ws.settings.released(r) or ws.settings.model for r in runs if r.task != "mammals"})
    model = f"model(s) {', '.join(models)} and " if models else ""
    raise Finished(f"--download-only: {model}{len(names)} data file(s) of {len(runs)} run(s) are in place and "
                   f"readable:\n" + "\n".join(f"  {ws.data.files[n][0] if n in ws.data.files else n}" for n in names))


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
