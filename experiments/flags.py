"""The command line's flags as data, in one table: for each flag (its argparse dest) the commands and modes it applies
to, the config field it sets and in which stages, and whether it applies to text tasks only or is a count taken from 1.
reproduce.py builds its parser beside the table and checks the flags given against it; runs.Budget reads the config
fields from it. The configs that the flags make are checked by tartan.check_config alone; check_flag_config says its
refusal in the words of the command line."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import tartan

from .common import ReproduceError
from .paper import META_MODES, PRETRAIN_MODES, PRETRAIN_TEXT_MODES, TARTAN_MODES, WITH_AUX

# The commands: runs = --task/--mode, a table, a figure, the demo, the benchmark, META's diagnostics.
RUNS, TABLE, FIGURE, DEMO, BENCH, DIAGNOSE = "runs", "table", "figure", "demo", "bench", "diagnostics"
TRAINING = (RUNS, TABLE, FIGURE)
STAGES = {"train": "end-task stage", "pretrain": "Eq. 1 stage", "final": "final Eq. 2 stage"}  # a config's stage


@dataclass(frozen=True)
class Flag:
    commands: tuple[str, ...]             # the commands it applies to
    modes: tuple[str, ...] | None = None  # of a training command, the modes it changes something in (None: every one)
    field: str | None = None              # the config field it sets,
    stages: tuple[str, ...] = ()          # in the configs of these stages (STAGES)
    text: bool = False                    # it does nothing for the vision experiment (mammals)
    positive: bool = False                # taken from 1 (of a config field, only where check_config allows 0)


def _stage_flags(prefix: str, stage: str, modes) -> dict:
    """The four flags every training stage takes: --<prefix>epochs, steps, lr, head-lr (--steps of 0 would mean
    "derive from epochs", which leaving it out says)."""
    return {f"{prefix}{name}": Flag(TRAINING, modes, field, (stage,), positive=name == "steps")
            for name, field in (("epochs", "epochs"), ("steps", "max_steps"), ("lr", "lr"), ("head_lr", "head_lr"))}


FLAGS = {
    # what to run
    "task": Flag(TRAINING + (DEMO,)), "mode": Flag((RUNS, TABLE)), "task_dir": Flag((RUNS,)),
    "metric": Flag((RUNS,)), "baseline": Flag((RUNS,)),
    "aux": Flag((RUNS,), TARTAN_MODES, text=True), "aux_file": Flag((RUNS,), WITH_AUX, text=True),
    "dapt_corpus": Flag((RUNS, TABLE), text=True), "seeds": Flag(TRAINING + (DEMO,)), "table": Flag((TABLE,)),
    "figure": Flag((FIGURE,)), "diagnostics": Flag((DIAGNOSE,)), "bench": Flag((BENCH,)),
    # model, data, results
    "model": Flag(TRAINING, text=True), "baselines": Flag(TRAINING, PRETRAIN_TEXT_MODES, text=True),
    "checkpoint_dir": Flag(TRAINING, text=True), "data_dir": Flag(TRAINING), "data_url": Flag(TRAINING),
    "out": Flag(TRAINING + (DEMO, BENCH)), "device": Flag(TRAINING + (BENCH,)), "rerun": Flag(TRAINING),
    "report_only": Flag(TRAINING), "save_model": Flag((RUNS,)), "shard": Flag(TRAINING),
    "download_only": Flag(TRAINING), "progress": Flag(TRAINING + (DEMO, BENCH)),
    # budget; runs.Budget.describe lists the config flags given in this order
    "quick": Flag(TRAINING + (DEMO, BENCH)), "budget": Flag(TRAINING),
    "max_length": Flag(TRAINING + (BENCH,), text=True, positive=True), "limit": Flag(TRAINING, positive=True),
    "batch_size": Flag(TRAINING + (BENCH,), None, "batch_size", ("train", "final")),
    "aux_batch_size": Flag(TRAINING + (BENCH,), WITH_AUX, "aux_batch_size", ("train", "pretrain")),
    "grad_accum": Flag(TRAINING, None, "grad_accum", ("train", "pretrain", "final")),
    **_stage_flags("", "train", None),
    "eval_every": Flag(TRAINING, None, "eval_every", ("train",)),
    "patience": Flag(TRAINING, None, "patience", ("train",)),
    "meta_lr": Flag(TRAINING, META_MODES, "meta_lr", ("train",)),
    "meta_batch_size": Flag(TRAINING + (BENCH,), META_MODES, "meta_batch_size", ("train",)),
    "meta_head_steps": Flag(TRAINING, META_MODES, "meta_head_steps", ("train",)),
    "meta_head_lr": Flag(TRAINING, META_MODES, "meta_head_lr", ("train",)),
    "meta_head_data": Flag(TRAINING, ("meta",), "meta_head_data", ("train",)),
    "meta_head_tol": Flag(TRAINING, ("meta",), "meta_head_tol", ("train",)),
    "meta_val_batch_size": Flag(TRAINING, META_MODES, "meta_val_batch_size", ("train",)),
    **_stage_flags("pretrain_", "pretrain", PRETRAIN_MODES),
    **_stage_flags("final_", "final", TARTAN_MODES),
    "warm_head_steps": Flag(TRAINING, WITH_AUX, text=True),
    "no_final_finetune": Flag(TRAINING, TARTAN_MODES, stages=("final",)),
    "precision": Flag(TRAINING, stages=("train", "pretrain", "final")),
    "no_test_curves": Flag(TRAINING, stages=("train", "final")),
    # the benchmark
    "bench_model": Flag((BENCH,)), "bench_n_aux": Flag((BENCH,), positive=True),
    "bench_steps": Flag((BENCH,), positive=True), "bench_warmup": Flag((BENCH,), positive=True),
    "bench_rounds": Flag((BENCH,), positive=True), "bench_threads": Flag((BENCH,), positive=True),
    "bench_peak_tflops": Flag((BENCH,)), "bf16": Flag((BENCH,)), "default_malloc": Flag((BENCH,)),
}
CONFIG_FLAGS = {dest: flag for dest, flag in FLAGS.items() if flag.field}  # the flags runs.Budget puts in configs


def option(dest: str) -> str:
    """The option string of a config flag: --meta-batch-size for meta_batch_size."""
    return "--" + dest.replace("_", "-")


def check_flag_config(cfg: tartan.TrainConfig, stage: str, where: str, command: str = RUNS) -> None:
    """tartan.check_config of a config the flags made for `stage`; its refusal as one ReproduceError in the words of
    the command line: each config field that a flag of `command` sets in that stage is named as the flag
    (batch_size=0 as --batch-size 0, meta_head_data='dev' as --meta-head-data dev), then where (e.g. the run)."""
    try:
        tartan.check_config(cfg, isinstance(cfg, tartan.MetaConfig))
    except ValueError as e:
        names = {flag.field: dest for dest, flag in CONFIG_FLAGS.items()
                 if stage in flag.stages and command in flag.commands}
        # a field, after its config's class name if any, with its value if it has one ('quoted' or not)
        pattern = r"\b(?:[A-Za-z]+Config\.)?(" + "|".join(names) + r")\b(?:=(?:'([^']*)'|([^\s:,;)]+)))?"
        text = re.sub(pattern, lambda m: " ".join(filter(None, (option(names[m[1]]), m[2] or m[3]))), str(e))
        raise ReproduceError(f"{text} ({where})") from None


MAX_SEEDS = 10_000  # a list longer than any sweep is a typo (0-999999999), not a request


def parse_seeds(text: str) -> list[int]:
    """--seeds: '0-9', '3' or '0,2,5' (ASCII digits) -> the seeds in order, each once; else argparse's error."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        if m is None:
            raise argparse.ArgumentTypeError(f"'{text}' is not a seed list such as 0-9, 3 or 0,2,5")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a or b > 2**32 - 1 or b - a + len(seeds) >= MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"'{part}': " + ("a range from high to low" if b < a else
                                             f"seeds run from 0 to 2**32 - 1, at most {MAX_SEEDS} of them"))
        seeds += range(a, b + 1)
    return list(dict.fromkeys(seeds))


def repeated(parser, argv: list[str]) -> str | None:
    """The first flag written twice in argv (argparse keeps the last value without a word), unless it is one that
    collects (--task-dir, --aux-file)."""
    for action in parser._actions:
        if action.option_strings and type(action).__name__ not in ("_AppendAction", "_CountAction"):
            uses = [a for a in argv if a in action.option_strings or a.split("=")[0] in action.option_strings]
            if len(uses) > 1:
                return action.option_strings[-1]
    return None
