"""Run every table and figure of the TARTAN paper with tartan.py: one command each.

Dery, Michel, Talwalkar, Neubig. "Should We Be Pre-training? An Argument for End-task Aware Training as an
Alternative." ICLR 2022. https://arxiv.org/abs/2109.07437

    python reproduce.py --task demo                               # the offline demo: start here
    python reproduce.py --task aclarc --mode meta                 # META-TARTAN + TAPT on ACL-ARC, seeds 0-9
    python reproduce.py --task aclarc --mode tapt mt --seeds 0-2  # several modes, three seeds
    python reproduce.py --table 1                                 # Table 1 with the p-values of Table 6
    python reproduce.py --figure 3                                # meta-learned task weights, phi* vs phi'
    python reproduce.py --bench                                   # speed of the training steps

Without overrides every run uses the paper's settings (Sec. 4; tartan's config dataclasses hold them) and the paper's
number of seeds, so a command is the paper's experiment. The budget flags (--max-length, --steps, ...) cut it down;
--quick is a tiny smoke budget. Every run writes one JSON file under --out (atomically); re-running skips runs whose
file is complete, so a killed sweep resumes where it stopped. A flag that does not apply to what is run is an error.

This file is the command line only: it turns the flags into settings once and hands values to the programs of the
experiments/ package (paper: the experiments as data; flags: what each flag applies to; data: downloads; vision: App.
A.4; store: data files and checkpoints; runs: configs, result files; tables: the runs of a command; report: tables
and figures from the result files; demo; bench).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored (&)
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted", file=sys.stderr), os._exit(130)))  # while imports
import tartan
from experiments import diagnose
from experiments.bench import BENCH_COUNTS, BENCH_SHAPES, BENCH_SIZES, run_bench, tune_malloc
from experiments.common import ReproduceError, atomic_write_text, resolve_device, seeds_str
from experiments.data import DATA_URL
from experiments.demo import DEMO_SEEDS, run_demo
from experiments.launch import Finished, ctrl_c_raises, parse_shard, shard_device
from experiments.own import default_baseline, own_tasks
from experiments.paper import (BUDGETS, DAPT_FILES, FIGURES, PAPER_BODY, PAPER_MAX_LENGTH, PAPER_WARM_HEAD, QUICK,
                               TABLES, TARTAN_MODES, TASKS, TEXT_MODES, VISION_META, VISION_MODES)
from experiments.flags import (BENCH, CONFIG_FLAGS, DEMO, DIAGNOSE, FIGURE, FLAGS, RUNS, TABLE, TRAINING, parse_seeds,
                               repeated)
from experiments.runs import Budget, Settings, Workspace, describe_budget
from experiments.store import cache_path
from experiments.tables import figure_modes, reads_dapt, run_family, run_figure, run_table, table_columns


def _paper(field: str, **configs) -> str:
    """A config field's default (the paper's, else the release's) per named config: 'MT/META 0.0001, Eq. 2 2e-05'."""
    labels = {"mt": "MT/META", "eq2": "Eq. 2", "eq1": "Eq. 1", "final": "final", "meta": "default"}
    return ", ".join(f"{labels[k]} {getattr(cfg, field):g}" if isinstance(getattr(cfg, field), float) else
                     f"{labels[k]} {getattr(cfg, field)}" for k, cfg in configs.items())


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line for a bad flag, not the 40-line usage block above it: where the options are listed instead."""
        self.exit(2, f"{self.prog}: error: {message}\n(python {self.prog} --help lists the options)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser, and for each flag (dest) its option string and default; what a flag applies to is its row in
    experiments.flags.FLAGS."""
    scope = {}
    p = Parser(
        prog="reproduce.py", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,  # no repeats
        description="Run the experiments of 'Should We Be Pre-training?' (TARTAN, ICLR 2022) with tartan.py. "
                    "Defaults are the paper's settings; the budget flags cut them down. A flag that does not apply "
                    "to what is run is an error.",
        epilog="tables: 1 (with the p-values of Table 6), 2 (with Table 8), 3 (needs full DAPT corpora, not public), "
               "4, 5 (CIFAR-100), 7.  figures: 2 (data efficiency), 3 (phi* vs phi'), 4 (weights across tasks).\n"
               "Each run writes OUT/<task>/<mode>__<aux>__seed<k>.json; re-running skips complete runs.")

    def add(group, *flags, **kwargs):
        action = group.add_argument(*flags, **kwargs)
        scope[action.dest] = (action.option_strings[0], action.default)
    _what_to_run(p.add_argument_group("what to run"), add)
    _model_data_results(p.add_argument_group("model, data, results"), add)
    budget = p.add_argument_group(
        "budget (default: the paper's value for the mode; 'end-task stage' = Eq. 2 for finetune/tapt/dapt, Eq. 3 or "
        "Alg. 1 for mt/meta; 'Eq. 1' = the TAPT/DAPT pre-training; 'final' = the optional Eq. 2 after MT/META)")
    _budget_flags(budget, add)
    _bench_flags(p, add)
    return p, scope


def _what_to_run(what, add) -> None:
    add(what, "--task", nargs="+", choices=list(TASKS) + ["demo"],
        help="end-task(s) T*: aclarc (ACL-ARC), scierc (SCIERC), chemprot (CHEMPROT), hyperpartisan, mammals "
             "(CIFAR-100, App. A.4); demo = the offline synthetic demo. With --table/--figure: only these rows")
    add(what, "--mode", nargs="+", choices=sorted(set(TEXT_MODES + VISION_MODES)),
        help="finetune = Eq. 2 alone (the 'RoBERTa' column); tapt, dapt, dapt+tapt = Eq. 1 on the task's / domain "
             "text, then Eq. 2; mt = MT-TARTAN (Eq. 3); meta = META-TARTAN (Alg. 1, meta head phi*); meta-samehead = "
             "META with the end-task head phi' (Eq. 6, Fig. 3); pretrain = mammals only, Eq. 1 on the 95-way task. "
             "With --table: only these columns")
    add(what, "--task-dir", action="append", default=[], metavar="PATH",
        help="an end-task of your own: a folder with train.jsonl, dev.jsonl, test.jsonl (one {\"text\": ..., "
             "\"label\": ...} object a line); its TAPT corpus is PATH/train.txt if there is one, else the texts of "
             "train.jsonl. Runs and table are named after the folder; repeatable")
    add(what, "--metric", choices=("macro_f1", "micro_f1"),
        help="headline metric of the --task-dir tasks (default macro_f1)")
    add(what, "--baseline", choices=sorted(TEXT_MODES),
        help="the mode the --task-dir table tests the others against (one-sided p; default tapt if run, else "
             "finetune)")
    add(what, "--aux", choices=("tapt", "dapt", "dapt+tapt", "none"),
        help="auxiliary MLM tasks T_aux of mt/meta (default tapt, as Table 1); none = only --aux-file")
    add(what, "--aux-file", action="append", default=[], metavar="PATH",
        help="one more MLM auxiliary task on this text file (one example per line; a .jsonl file: the texts of "
             "its {\"text\": ..., \"label\": ...} lines), named after the file; repeatable. For tapt/dapt modes: "
             "one more Eq. 1 stage, run first")
    add(what, "--dapt-corpus", metavar="1x|10x|full|PATH",
        help="DAPT text: n = 1x or 10x |Train| of in-domain text (domain.{1x,10x}TAPT.txt; default 10x, as Tables 2 "
             "and 4), 'full' (domain.full.txt, placed by hand: Table 3), or a file")
    add(what, "--seeds", type=parse_seeds, metavar="0-9",
        help="seeds, e.g. 0-9 or 0,3 (default: the paper's number for the table or figure, 10 for --task/--mode; "
             f"{seeds_str(DEMO_SEEDS)} for the demo)")
    add(what, "--table", type=int, choices=sorted(TABLES), help="run a whole table of the paper and print it")
    add(what, "--figure", type=int, choices=sorted(FIGURES), help="run a figure's runs and draw it to PNG")
    add(what, "--diagnostics", metavar="DIR",
        help="META's signal per meta-head variant, from the META result files under DIR/<variant>/<task>/: cosines "
             "of end-task and auxiliary gradients with g_meta, their norms, phi*'s loss on B*_val against phi''s dev "
             "loss, phi*'s fit, the end-task's final weight; printed and written to DIR/diagnostics.md")
    add(what, "--bench", action="store_true",
        help="speed benchmark of the training steps (its flags: the benchmark group below)")


def _model_data_results(where, add) -> None:
    add(where, "--model", default="roberta-base",
        help="body theta_body: Hugging Face hub id or local directory of a masked-LM checkpoint (default "
             "%(default)s, Sec. 4)")
    add(where, "--baselines", choices=("released", "retrain"),
        help=f"released: tapt, dapt (full corpus) and dapt+tapt fine-tune Gururangan et al.'s released {PAPER_BODY} "
             f"checkpoints from the Hub, as the paper did (Sec. 4; an error where there is none); retrain: run "
             f"Eq. 1 here. Default: the released ones where they exist with --model {PAPER_BODY} and no "
             f"--quick/--budget (Table 2's DAPT at n = 10x has none), else retrain")
    add(where, "--checkpoint-dir", metavar="DIR",
        help="a folder holding Hub checkpoints by id (DIR/roberta-base, DIR/allenai/...), used instead of the Hub "
             "(offline nodes)")
    add(where, "--data-dir", default=cache_path("data"),
        help="data folder (default %(default)s, under TARTAN_CACHE as the runs' progress files are); files already there "
             "are used as they are, missing ones are downloaded from the authors' pinned copy and checked (SHA-256)")
    add(where, "--data-url", default=DATA_URL, help=argparse.SUPPRESS)  # tests and mirrors
    add(where, "--out", default="results",
        help="results folder: one JSON per run, tables, figures (default %(default)s)")
    add(where, "--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="default %(default)s: CUDA when torch sees it, else the CPU")
    add(where, "--rerun", action="store_true",
        help="re-run and replace runs whose result file exists (needed when a flag or a data file has changed "
             "since the file was made: such a file is refused, not reused)")
    add(where, "--report-only", action="store_true",
        help="print tables / draw figures from the result files already in --out; train nothing")
    add(where, "--save-model", metavar="DIR",
        help="keep the selected body and end-task head: a folder transformers loads, plus end_task_head.pt and "
             "end_task.json (labels); one subfolder DIR/<task>/<run> per run when the command has several")
    add(where, "--shard", metavar="K/N",
        help="run only every N-th run of the command, starting at K (0 <= K < N); default: from torchrun's RANK and "
             "WORLD_SIZE or a SLURM array's SLURM_ARRAY_TASK_ID and _COUNT when set. Shards share --out; "
             "--report-only afterwards prints the table")
    add(where, "--download-only", action="store_true",
        help="fetch and check the model, data files and corpora the command needs, then exit (for compute nodes "
             "without network)")
    add(where, "--no-progress", dest="progress", action="store_false", help="no progress bars")


def _budget_flags(budget, add) -> None:
    """--quick, --budget, the flags every stage takes and META's; a config flag's help gives the paper's value."""
    mt, eq2, eq1, meta = tartan.TrainConfig(), tartan.FinetuneConfig(), tartan.PretrainConfig(), tartan.MetaConfig()
    final = tartan.tartan_finetune()
    q = QUICK
    add(budget, "--quick", action="store_true",
        help=f"tiny smoke budget: max length {q['max_length']}, {q['limit']} examples per split and corpus, "
             f"{q['train']['max_steps']} steps ({q['pretrain']['max_steps']} for Eq. 1 and final), batches of "
             f"{q['train']['batch_size']}; not the paper's experiment. Demo: the reduced demo; bench: a tiny model")
    add(budget, "--budget", choices=sorted(BUDGETS),
        help="a named reduced budget (printed under the table and stored in each result file): "
             + "; ".join(f"{name} = {describe_budget(name)}" for name in sorted(BUDGETS)))
    add(budget, "--max-length", type=int, metavar="T",
        help=f"tokens per example, all data (release {PAPER_MAX_LENGTH}; bench: see below)")
    add(budget, "--limit", type=int, metavar="N",
        help="use a fixed random N examples of each split and N lines of each corpus (smoke runs)")
    add(budget, "--batch-size", type=int,
        help=f"|B*_tr|, end-task micro-batch of the end-task and final stages ({_paper('batch_size', mt=mt, eq2=eq2)})")
    add(budget, "--aux-batch-size", type=int,
        help=f"|B_i|, auxiliary micro-batch, Eq. 1 and MT/META ({_paper('aux_batch_size', mt=mt, eq1=eq1)})")
    add(budget, "--grad-accum", type=int,
        help=f"micro-batches per optimizer step, every stage ({_paper('grad_accum', mt=mt, eq1=eq1, eq2=eq2)})")
    # Every training stage takes the same four flags (experiments.flags: the end-task stage's, pretrain_*, final_*),
    # each with the help "<stage>: <what> (<the paper's value in each config of the stage>)".
    for prefix, stage, paper, epochs, (body, head) in (
            ("", "end-task stage", dict(mt=mt, eq2=eq2),
             "passes over the largest training set, with early stopping", ("beta_1, body", "beta_2, head")),
            ("pretrain-", "Eq. 1", dict(eq1=eq1),
             "passes over the corpus, TAPT's number, used for DAPT too", ("body", "MLM head")),
            ("final-", "final Eq. 2 after MT/META", dict(final=final),
             "passes over the end-task's training set", ("body", "head"))):
        for name, kind, field_, what in (("epochs", float, "epochs", epochs), ("steps", int, None, "optimizer steps"),
                                         ("lr", float, "lr", f"{body} learning rate"),
                                         ("head-lr", float, "head_lr", f"{head} learning rate")):
            value = _paper(field_, **paper) if field_ else f"overrides --{prefix}epochs"  # steps: no paper value
            add(budget, f"--{prefix}{name}", type=kind, help=f"{stage}: {what} ({value})")
    add(budget, "--eval-every", type=int,
        help=f"end-task stage: evaluate dev every this many steps, 0 = once per epoch "
             f"({_paper('eval_every', mt=mt, eq2=eq2)})")
    add(budget, "--patience", type=int,
        help=f"end-task stage: stop after this many evaluations without a new best dev score "
             f"({_paper('patience', mt=mt, eq2=eq2)})")
    # META's step sizes and batches: "<what> (<the paper's value>; <the vision experiment's, where it differs>)".
    for field_, kind, what in (
            ("meta_lr", float, "eta, task-weight step size of META"),
            ("meta_batch_size", int, "rows the meta head phi* is fitted on (at most --batch-size with --meta-head-data "
             "train), and |B*_val| unless --meta-val-batch-size"),
            ("meta_head_steps", int, "steps to fit phi* from a fresh init"),
            ("meta_head_lr", float, "phi* learning rate")):
        vision = VISION_META.get(field_, getattr(meta, field_))
        value = _paper(field_, meta=meta) + (f"; vision {vision:g}" if vision != getattr(meta, field_) else "")
        add(budget, f"--{field_.replace('_', '-')}", type=kind, help=f"{what} ({value})")
    add(budget, "--meta-head-data", choices=("train", "dev"),
        help=f"rows phi* is fitted on: train = the first --meta-batch-size rows of the end-task batch B*_tr (Sec. "
             f"3.3, A.1), dev = a dev batch of their own (the released code) (default {meta.meta_head_data})")
    add(budget, "--meta-head-tol", type=float,
        help="> 0: fit phi* until 10 steps lower its loss by less than this fraction, at most --meta-head-steps "
             f"steps (Sec. 3.3's 'to convergence'); default {meta.meta_head_tol:g} = always --meta-head-steps")
    add(budget, "--meta-val-batch-size", type=int,
        help="|B*_val|, the dev rows of the meta gradient (the paper gives none; default = --meta-batch-size)")
    add(budget, "--warm-head-steps", type=int,
        help=f"a checkpoint without an LM head gets one fitted on the task's text, body frozen, before TAPT/MT/META "
             f"use it: this many steps (default {PAPER_WARM_HEAD['steps']} with the paper's settings, the named "
             f"budget's value with --budget, none with --quick; 0 = none)")
    add(budget, "--no-final-finetune", action="store_true",
        help="skip the optional Eq. 2 stage after MT/META (it is kept only if dev improves)")
    add(budget, "--precision", choices=["auto", "bf16", "fp32"], default="auto", help="autocast: auto = bf16 on "
        "CUDA, fp32 on a CPU; bf16 = also on a CPU with native bf16 (avx512_bf16, AMX); fp32 everywhere")
    add(budget, "--no-test-curves", action="store_true", help="no test scores at every evaluation (a budget's curves)")


def _bench_flags(p, add) -> None:
    """The benchmark's own group; its title gives the sizes each model defaults to."""
    sizes = ", ".join(f"{m} {'/'.join(map(str, s))}" for m, s in BENCH_SIZES.items())
    counts = ", ".join(f"{k} {c['rounds']} x {c['steps']} after {c['warmup']}" for k, c in BENCH_COUNTS.items())
    bench = p.add_argument_group(
        "benchmark (--bench; also --quick, --out, --device, --no-progress, and --batch-size, --aux-batch-size, "
        f"--meta-batch-size, --max-length, whose defaults per model, as end/aux/meta/length, are: {sizes})")
    add(bench, "--bench-model", choices=[m for m in BENCH_SHAPES if m != "tiny"],
        help="default: roberta-base on CUDA, small on CPU, tiny with --quick")
    add(bench, "--bench-n-aux", type=int, default=1, help="number of auxiliary MLM tasks (default %(default)s)")
    add(bench, "--bench-steps", type=int, help=f"timed steps per item and round ({counts})")
    add(bench, "--bench-warmup", type=int, help="untimed steps per item and round")
    add(bench, "--bench-rounds", type=int, help="rounds, each timing every item")
    add(bench, "--bench-threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    add(bench, "--bench-peak-tflops", type=float, help="device peak for MFU (default: by name)")
    add(bench, "--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    add(bench, "--default-malloc", action="store_true",
        help="on CPU the bench first makes glibc keep freed memory for reuse (experiments.bench.tune_malloc: a "
             "process-wide mallopt, which removes the page faults that otherwise dominate the step overheads); "
             "this flag leaves glibc's malloc as it is. No other command changes the allocator")


USAGE = """TARTAN (end-task aware training). Start here, offline, a few minutes on a laptop CPU:
       python reproduce.py --task demo
usage: python reproduce.py --task {aclarc,scierc,chemprot,hyperpartisan,mammals} --mode MODE [--seeds 0-9]
       python reproduce.py --task-dir MY_TASK --mode finetune tapt mt meta   (an end-task of your own)
       python reproduce.py --table {1,2,3,4,5,7} | --figure {2,3,4}
       python reproduce.py --bench [--quick]
       python reproduce.py --diagnostics DIR                 (META's signal per meta-head variant)
  e.g. python reproduce.py --task aclarc --mode meta          (META-TARTAN with TAPT on ACL-ARC, 10 seeds)
       python reproduce.py --table 1 --quick                   (a smoke run of Table 1)
  python reproduce.py --help lists every option."""


def _command(parser, args) -> tuple[str, str, tuple[str, ...]]:
    """(command, how the command line named it, the modes it trains)."""
    chosen = [c for c, on in ((BENCH, args.bench), (TABLE, args.table), (FIGURE, args.figure),
                              (DIAGNOSE, args.diagnostics)) if on]
    if args.task_dir and (args.table or args.figure or args.bench):
        parser.error("--task-dir goes with --mode, not with --table, --figure or --bench")
    if args.task and "demo" in args.task:
        if len(args.task) > 1:
            parser.error("--task demo runs alone")
        chosen.append(DEMO)
    if len(chosen) > 1:
        parser.error("choose one of --task demo, --table, --figure, --diagnostics and --bench")
    if chosen == [BENCH]:
        return BENCH, "--bench", ()
    if chosen == [DEMO]:
        return DEMO, "--task demo", ()
    if chosen == [DIAGNOSE]:
        return DIAGNOSE, "--diagnostics", ()
    if chosen == [TABLE]:
        return TABLE, f"--table {args.table}", tuple(c.mode for c in table_columns(args.table, args.mode))
    if chosen == [FIGURE]:
        return FIGURE, f"--figure {args.figure}", figure_modes(args.figure)
    if not ((args.task or args.task_dir) and args.mode):
        parser.error("give --task (or --task-dir) and --mode, or --table, or --figure, or --task demo, or --bench")
    return RUNS, f"--mode {' '.join(args.mode)}", tuple(args.mode)


def _given(argv) -> set[str]:
    """The dests of the flags written in argv, even where the value written is the default."""
    parser, _ = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag not written leaves no attribute
    return set(vars(parser.parse_args(argv)))


def _check_flags(parser, args, scope: dict, command: str, named: str, modes: tuple[str, ...],
                 given: set[str] = frozenset()) -> None:
    """A flag given that does not apply (experiments.flags.FLAGS) to the command, to none of the modes it trains or to
    its tasks is an error, and so is a count under 1 (runs.check_configs checks the configs the flags make). given:
    the flags written (_given); without it, a flag counts as given where its value is not the default."""
    vision = set(args.task or (TABLES[args.table].tasks if args.table else ())) == {"mammals"}
    for dest, (flag, default) in scope.items():
        value, applies = getattr(args, dest), FLAGS[dest]
        if (value == default or value is None) and dest not in given:
            continue
        if command not in applies.commands:
            parser.error(f"{flag} does not apply to {named}")
        if command in TRAINING and applies.modes is not None and not set(modes) & set(applies.modes):
            parser.error(f"{flag} does not apply to {named} (it applies to --mode {', '.join(applies.modes)})")
        if applies.stages == ("final",) and command in TRAINING:
            if args.budget and BUDGETS[args.budget]["final"] is None:
                parser.error(f"{flag} does not apply to --budget {args.budget} (it has no final fine-tuning)")
            if vision:
                parser.error(f"{flag} does not apply to {named if args.table else '--task mammals'} (mammals has no "
                             f"final fine-tuning stage)")
        if applies.text and command in TRAINING and vision:
            parser.error(f"{flag} does not apply to mammals (the vision experiment: WideResNet-16-2 on CIFAR-100)")
        if dest == "baselines" and value == "released" and args.model != PAPER_BODY:
            parser.error(f"--baselines released: the released checkpoints are {PAPER_BODY} bodies, not --model "
                         f"{args.model} (use --baselines retrain)")
        if applies.positive and value < 1:
            parser.error(f"{flag} must be at least 1")


def _check_combinations(parser, args, command: str, modes: tuple[str, ...]) -> None:
    """Flags that apply only beside another flag, or never beside one."""
    if args.dapt_corpus and command in (RUNS, TABLE) and not reads_dapt(args.table, args.mode, args.aux):
        what = f"--table {args.table}" if command == TABLE else " ".join(
            [f"--mode {' '.join(modes)}"] + ([f"--aux {args.aux or 'tapt'}"] if set(modes) & set(TARTAN_MODES)
                                             else []))
        parser.error(f"--dapt-corpus does not apply to {what}: no run of it reads DAPT text (modes dapt, "
                     f"dapt+tapt; mt and meta with --aux dapt or dapt+tapt)")
    for flag, given in (("--metric", args.metric), ("--baseline", args.baseline)):
        if given and not args.task_dir:
            parser.error(f"{flag} does not apply without --task-dir (the paper's tasks have the paper's metric and "
                         f"tables)")
    if args.baseline and args.baseline not in (args.mode or ()):
        parser.error(f"--baseline {args.baseline} is not one of the modes run (--mode {' '.join(args.mode or ())})")
    for flag, given in (("--shard", args.shard), ("--save-model", args.save_model), ("--rerun", args.rerun)):
        for other, on in (("--report-only", args.report_only), ("--download-only", args.download_only)):
            if given and on:
                parser.error(f"{flag} does not apply to {other} (it trains nothing)")
    if args.task_dir and not args.task and args.data_dir != parser.get_default("data_dir"):
        parser.error("--data-dir does not apply to --task-dir alone (a task of your own is read from its folder; "
                     "--data-dir holds the paper's tasks)")
    for flag, path, used in (("--out", args.out, TRAINING + (DEMO, BENCH)), ("--data-dir", args.data_dir, TRAINING)):
        if command in used and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path}: a file, not a folder")
    for flag, value in (("--out", args.out), ("--save-model", args.save_model), ("--model", args.model),
                        ("--data-dir", args.data_dir)):
        if value is not None and not value.strip():
            parser.error(f"{flag} is empty: give a folder{' or a Hub id' if flag == '--model' else ''}")
    if args.report_only and args.download_only:
        parser.error("choose one of --report-only and --download-only")
    if args.save_model:
        save, out = os.path.abspath(args.save_model), os.path.abspath(args.out)
        if out == save or out.startswith(save + os.sep) or save.startswith(out + os.sep):
            parser.error(f"--save-model {args.save_model}: give a folder outside --out {args.out} (and not above it)")


def _corpora(parser, aux_files: list[str], dapt_corpus: str | None) -> tuple[dict, tuple[str, ...], str | None]:
    """(corpus name -> path of the --aux-file and --dapt-corpus files, the --aux-file names, the DAPT corpus label)."""
    extra = {}
    for path in aux_files:
        name = "file-" + os.path.splitext(os.path.basename(path))[0]
        if name in extra:
            parser.error(f"two --aux-file corpora are both named '{name}'")
        if not os.path.isfile(path):
            parser.error(f"--aux-file {path}: " + ("no such file" if not os.path.exists(path) else "a folder, not a "
                         "file" if os.path.isdir(path) else "not a regular file (a device or a pipe)"))
        extra[name] = path
    names = tuple(extra)
    if dapt_corpus and dapt_corpus not in DAPT_FILES:
        if not os.path.isfile(dapt_corpus):
            parser.error(f"--dapt-corpus {dapt_corpus}: neither 1x, 10x, full nor an existing file")
        name = "dapt-" + os.path.splitext(os.path.basename(dapt_corpus))[0]
        extra[name], dapt_corpus = dapt_corpus, name[4:]
    return extra, names, dapt_corpus


def make_settings(args, extra_corpora: dict) -> Settings:
    """The settings of the training commands, from the parsed flags: the only place that reads them."""
    budget = Budget(quick=args.quick, name=args.budget, no_final_finetune=args.no_final_finetune,
                    precision=args.precision, test_curves=not args.no_test_curves,
                    overrides={k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None},
                    max_length=args.max_length, limit=args.limit, warm_head_steps=args.warm_head_steps)
    paper_run = args.model == PAPER_BODY and not (args.quick or args.budget)
    return Settings(model=args.model, data_dir=args.data_dir, out=args.out, budget=budget, data_url=args.data_url,
                    extra_corpora=extra_corpora, progress=args.progress, rerun=args.rerun,
                    report_only=args.report_only, baselines=args.baselines or ("auto" if paper_run else "retrain"),
                    checkpoint_dir=args.checkpoint_dir, command=getattr(args, "argv", None), **launch_settings(args))


def launch_settings(args, environ=None) -> dict:
    """The settings of --task-dir, --metric, --save-model, --shard (or the launcher's environment; not read by
    --report-only and --download-only, which take every run) and --download-only."""
    environ = os.environ if environ is None else environ
    whole = args.report_only or args.download_only
    return dict(own_tasks=own_tasks(args.task_dir), metric=args.metric or "macro_f1", save_model=args.save_model,
                shard=parse_shard(args.shard, {} if whole else environ), download_only=args.download_only)


def main(argv=None) -> int:
    """The command line; warnings (an empty text kept, a progress file not saved) print as one line each, like
    the runner's own, and once per command although the files are read more than once."""
    seen = set()

    def show(message, *args, **kwargs):
        if str(message) not in seen:
            seen.add(str(message))
            print(f"warning: {message}", file=sys.stderr, flush=True)
    with warnings.catch_warnings():  # restores Python's printer when the command returns
        warnings.showwarning = show
        return _main(argv)


def _main(argv) -> int:
    parser, scope = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(USAGE)
        return 0
    args = parser.parse_args(argv, argparse.Namespace(argv=["reproduce.py", *argv]))  # argv: what results record
    if flag := repeated(parser, argv):
        parser.error(f"{flag} is given twice: give it once (with every value it takes)")
    args.task, args.mode = (list(dict.fromkeys(v)) if v else v for v in (args.task, args.mode))  # each named once
    command, named, modes = _command(parser, args)
    _check_flags(parser, args, scope, command, named, modes, _given(argv))
    _check_combinations(parser, args, command, modes)
    try:
        ctrl_c_raises()
        if command == BENCH:
            device = resolve_device(args.device)
            malloc = tune_malloc(not args.default_malloc) if device.type == "cpu" else "not changed (CUDA device)"
            run_bench(model=args.bench_model, device=device.type, batch_size=args.batch_size,
                      aux_batch_size=args.aux_batch_size, meta_batch_size=args.meta_batch_size,
                      max_length=args.max_length, n_aux=args.bench_n_aux, steps=args.bench_steps,
                      warmup=args.bench_warmup, rounds=args.bench_rounds, out_dir=args.out, quick=args.quick,
                      bf16=args.bf16, peak_tflops=args.bench_peak_tflops, threads=args.bench_threads, malloc=malloc,
                      progress=args.progress)
            return 0
        if command == DIAGNOSE:
            text = diagnose.render(diagnose.collect(args.diagnostics))
            atomic_write_text(os.path.join(args.diagnostics, "diagnostics.md"), text)
            print(text)
            return 0
        if command == DEMO:
            run_demo(args.seeds or DEMO_SEEDS, args.out, quick=args.quick, progress=args.progress)
            return 0
        extra, aux_files, dapt = _corpora(parser, args.aux_file, args.dapt_corpus)
        settings = make_settings(args, extra)
        import transformers
        transformers.logging.set_verbosity_error()
        if not args.progress:
            transformers.logging.disable_progress_bar()
        import torch
        device = shard_device(args.device, settings.shard, torch.cuda.device_count())
        if settings.shard.count > 1:
            print(f"{settings.shard}: device {device}", flush=True)
        ws = Workspace(settings, resolve_device(device))
        if command == TABLE:
            run_table(args.table, ws, args.seeds, args.task, args.mode, dapt)
        elif command == FIGURE:
            run_figure(args.figure, ws, args.seeds, args.task)
        else:
            tasks = list(args.task or []) + list(settings.own_tasks)
            run_family(ws, tasks, args.mode, args.seeds, args.aux, dapt, aux_files,
                       args.baseline or default_baseline(args.mode))
    except Finished as e:  # a shard's runs are done, or --download-only fetched everything
        print(e)
        return 0
    # one message; OSError: a path that cannot be read or written (permissions, a full disk), named by the error
    except (ReproduceError, tartan.DataError, tartan.DivergedError, OSError, ValueError) as e:
        where = ""
        if isinstance(e, ValueError) and not isinstance(e, tartan.DataError):  # may be a bug, not bad input: where
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f" (raised at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
        print(f"error: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted" + (": finished runs are kept; the same command resumes from there"
                                 if command in TRAINING else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
