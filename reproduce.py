"""Run every table and figure of the TARTAN paper with tartan.py: one command each.

Dery, Michel, Talwalkar, Neubig. "Should We Be Pre-training? An Argument for End-task Aware Training as an
Alternative." ICLR 2022. https://arxiv.org/abs/2109.07437

    python reproduce.py --task aclarc --mode meta                 # META-TARTAN + TAPT on ACL-ARC, seeds 0-9
    python reproduce.py --task aclarc --mode tapt mt --seeds 0-2  # several modes, three seeds
    python reproduce.py --table 1                                 # Table 1 with the p-values of Table 6
    python reproduce.py --figure 3                                # meta-learned task weights, phi* vs phi'

Without overrides every run uses the paper's settings (Sec. 4; tartan's config dataclasses hold them) and the paper's
number of seeds, so a command is the paper's experiment. The budget flags (--max-length, --steps, ...) cut it down;
--quick is a tiny smoke budget. Every run writes one JSON file under --out (atomically); re-running skips runs whose
file is complete, so a killed sweep resumes where it stopped.

Contents:
  1. The paper's tables and figures: which runs each needs, and the paper's numbers
  2. Data: pinned download with SHA-256 checks; text end-tasks and MLM corpora; CIFAR-100 mammals (App. A.4)
  3. The WideResNet-16-2 body of the vision experiment
  4. Configs: the paper's values, --quick, and the budget flags
  5. One run: build body, heads and tasks, train with tartan, write the result file (resume)
  6. Tables (mean, std, permutation-test p-values) and figures (task weights, data efficiency)
  7. Speed benchmark (--bench)
  8. Offline demo (--task demo)
  9. Command line
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import tartan
from experiments.bench import add_bench_args, run_bench, tune_malloc
from experiments.common import ReproduceError, resolve_device
from experiments.data import DATA_URL
from experiments.demo import run_demo
from experiments.paper import BUDGETS, DAPT_FILES, FIGURES, TABLES, TASKS, TEXT_MODES, VISION_MODES
from experiments.report import run_family, run_figure, run_table
from experiments.runs import Workspace


def parse_seeds(text: str) -> list[int]:
    seeds = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a seed list such as 0-9, 3 or 0,2,5") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' gives no non-negative seeds")
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the experiments of 'Should We Be Pre-training?' (TARTAN, ICLR 2022) with tartan.py. "
                    "Defaults are the paper's settings; the budget flags cut them down.",
        epilog="tables: 1 (with the p-values of Table 6), 2 (with Table 8), 3 (needs full DAPT corpora, not public), "
               "4, 5 (CIFAR-100), 7.  figures: 2 (data efficiency), 3 (phi* vs phi'), 4 (weights across tasks).\n"
               "Each run writes OUT/<task>/<mode>__<aux>__seed<k>.json; re-running skips complete runs.")
    what = p.add_argument_group("what to run")
    what.add_argument("--task", nargs="+", choices=list(TASKS) + ["demo"],
                      help="end-task(s) T*: aclarc (ACL-ARC), scierc (SCIERC), chemprot (CHEMPROT), hyperpartisan, "
                           "mammals (CIFAR-100, App. A.4); demo = the offline synthetic demo. With --table/--figure: "
                           "only these rows")
    what.add_argument("--mode", nargs="+", choices=sorted(set(TEXT_MODES + VISION_MODES)),
                      help="finetune = Eq. 2 alone (the 'RoBERTa' column); tapt, dapt, dapt+tapt = Eq. 1 on the "
                           "task's / domain text, then Eq. 2; mt = MT-TARTAN (Eq. 3); meta = META-TARTAN (Alg. 1, "
                           "meta head phi*); meta-samehead = META with the end-task head phi' (Eq. 6, Fig. 3); "
                           "pretrain = mammals only, Eq. 1 on the 95-way task. With --table: only these columns")
    what.add_argument("--aux", choices=("tapt", "dapt", "dapt+tapt", "none"),
                      help="auxiliary MLM tasks T_aux of mt/meta (default tapt, as Table 1); none = only --aux-file")
    what.add_argument("--aux-file", action="append", default=[], metavar="PATH",
                      help="one more MLM auxiliary task on this text file (one example per line), named after the "
                           "file; repeatable. For tapt/dapt modes: one more Eq. 1 stage, run first")
    what.add_argument("--dapt-corpus", metavar="1x|10x|full|PATH",
                      help="DAPT text: n = 1x or 10x |Train| of in-domain text (domain.{1x,10x}TAPT.txt; default "
                           "10x, as Tables 2 and 4), 'full' (domain.full.txt, placed by hand: Table 3), or a file")
    what.add_argument("--seeds", type=parse_seeds, metavar="0-9",
                      help="seeds, e.g. 0-9 or 0,3 (default: the paper's number, 10; 3 for Tables 4, 5, figures)")
    what.add_argument("--table", type=int, choices=sorted(TABLES), help="run a whole table of the paper and print it")
    what.add_argument("--figure", type=int, choices=sorted(FIGURES), help="run a figure's runs and draw it to PNG")
    what.add_argument("--bench", action="store_true", help="speed benchmark of the training steps")
    where = p.add_argument_group("model, data, results")
    where.add_argument("--model", default="roberta-base",
                       help="body theta_body: Hugging Face hub id or local directory of a masked-LM checkpoint "
                            "(default roberta-base, Sec. 4)")
    where.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "tartan", "data"),
                       help="data folder (default ~/.cache/tartan/data); files already there are used as they are, "
                            "missing ones are downloaded from the authors' pinned copy and checked (SHA-256)")
    where.add_argument("--data-url", default=DATA_URL, help=argparse.SUPPRESS)  # tests and mirrors
    where.add_argument("--out", default="results", help="results folder: one JSON per run, tables, figures")
    where.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    where.add_argument("--rerun", action="store_true", help="re-run and replace runs whose result file exists")
    where.add_argument("--report-only", action="store_true",
                       help="print tables / draw figures from the result files already in --out; train nothing")
    where.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    budget = p.add_argument_group(
        "budget (default: the paper's value for the mode; 'end-task stage' = Eq. 2 for finetune/tapt/dapt, Eq. 3 or "
        "Alg. 1 for mt/meta; 'Eq. 1' = the TAPT/DAPT pre-training; 'final' = the optional Eq. 2 after MT/META)")
    budget.add_argument("--quick", action="store_true",
                        help="tiny smoke budget: max length 64, 64 examples per split and corpus, 4 steps (2 for "
                             "Eq. 1 and final), batches of 8; not the paper's experiment")
    budget.add_argument("--budget", choices=sorted(BUDGETS),
                        help="a named reduced budget: cpu = a small pretrained body on a CPU (max length 64, batches "
                             "16, early stopping on dev for every end-task stage, Eq. 2 lr from a dev grid; the "
                             "values are printed under the table and stored in each result file)")
    budget.add_argument("--max-length", type=int, metavar="T", help="tokens per example, all data (paper 512)")
    budget.add_argument("--limit", type=int, metavar="N",
                        help="use a fixed random N examples of each split and N lines of each corpus (smoke runs)")
    budget.add_argument("--batch-size", type=int, help="|B*_tr|, end-task micro-batch of the end-task and final "
                                                       "stages (paper: 64 x 2 accumulation for MT/META, 16 for Eq. 2)")
    budget.add_argument("--aux-batch-size", type=int, help="|B_i|, auxiliary micro-batch, Eq. 1 and MT/META (64)")
    budget.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step, every stage (MT/META 2, "
                                                       "Eq. 1 4, Eq. 2 1)")
    budget.add_argument("--epochs", type=float, help="end-task stage: passes over the largest training set "
                                                     "(MT/META 150 with early stopping, Eq. 2 10)")
    budget.add_argument("--steps", type=int, help="end-task stage: optimizer steps (overrides --epochs)")
    budget.add_argument("--lr", type=float, help="beta_1, body learning rate of the end-task stage (MT/META 1e-4, "
                                                 "Eq. 2 2e-5)")
    budget.add_argument("--head-lr", type=float, help="beta_2, head learning rate of the end-task stage "
                                                      "(MT/META 1e-3, Eq. 2 2e-5)")
    budget.add_argument("--eval-every", type=int, help="end-task stage: evaluate dev every this many steps "
                                                       "(MT/META 30; 0 = once per epoch, Eq. 2)")
    budget.add_argument("--patience", type=int, help="end-task stage: stop after this many evaluations without a "
                                                     "new best dev score (MT/META 20, Eq. 2 3)")
    budget.add_argument("--meta-lr", type=float, help="eta, task-weight step size of META (1e-2; vision 5e-2)")
    budget.add_argument("--meta-batch-size", type=int, help="|B*_tr| = |B*_val| for the meta head phi* (32)")
    budget.add_argument("--meta-head-steps", type=int, help="steps to fit phi* from a fresh init (10)")
    budget.add_argument("--meta-head-lr", type=float, help="phi* learning rate (1e-3; vision 3e-2)")
    budget.add_argument("--pretrain-epochs", type=float, help="Eq. 1: passes over the corpus (100, TAPT's; used "
                                                               "for DAPT too)")
    budget.add_argument("--pretrain-steps", type=int, help="Eq. 1: optimizer steps (overrides --pretrain-epochs)")
    budget.add_argument("--pretrain-lr", type=float, help="Eq. 1: body learning rate (1e-4)")
    budget.add_argument("--pretrain-head-lr", type=float, help="Eq. 1: MLM head learning rate (1e-4)")
    budget.add_argument("--final-epochs", type=float, help="final Eq. 2 after MT/META: epochs (10)")
    budget.add_argument("--final-steps", type=int, help="final Eq. 2 after MT/META: steps (overrides epochs)")
    budget.add_argument("--final-lr", type=float, help="final Eq. 2 after MT/META: body learning rate (5e-6)")
    budget.add_argument("--final-head-lr", type=float, help="final Eq. 2 after MT/META: head learning rate (5e-6)")
    budget.add_argument("--no-final-finetune", action="store_true",
                        help="skip the optional Eq. 2 stage after MT/META (it is kept only if dev improves)")
    add_bench_args(p)  # its flags that reproduce.py already has (--quick, --out, ...) are shared
    return p


USAGE = """TARTAN (end-task aware training). Start here, offline, a few minutes on a laptop CPU:
       python reproduce.py --task demo
usage: python reproduce.py --task {aclarc,scierc,chemprot,hyperpartisan,mammals} --mode MODE [--seeds 0-9]
       python reproduce.py --table {1,2,3,4,5,7} | --figure {2,3,4}
       python reproduce.py --bench [--quick]
  e.g. python reproduce.py --task aclarc --mode meta          (META-TARTAN with TAPT on ACL-ARC, 10 seeds)
       python reproduce.py --table 1 --quick                   (a smoke run of Table 1)
  python reproduce.py --help lists every option."""


def _check_run_args(parser, args):
    """The checks of a training command (not --bench, not the demo); also collects args.extra_corpora."""
    if args.table and args.figure:
        parser.error("choose one of --table and --figure")
    if not (args.table or args.figure) and not (args.task and args.mode):
        parser.error("give --task and --mode, or --table, or --figure")
    args.extra_corpora = {}
    for path in args.aux_file:
        name = "file-" + os.path.splitext(os.path.basename(path))[0]
        if name in args.extra_corpora:
            parser.error(f"two --aux-file corpora are both named '{name}'")
        if not os.path.isfile(path):
            parser.error(f"--aux-file {path}: no such file")
        args.extra_corpora[name] = path
    if args.dapt_corpus and args.dapt_corpus not in DAPT_FILES:
        if not os.path.isfile(args.dapt_corpus):
            parser.error(f"--dapt-corpus {args.dapt_corpus}: neither 1x, 10x, full nor an existing file")
        name = "dapt-" + os.path.splitext(os.path.basename(args.dapt_corpus))[0]
        args.extra_corpora[name], args.dapt_corpus = args.dapt_corpus, name[4:]


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(USAGE)
        return 0
    args = parser.parse_args(argv)
    args.malloc = tune_malloc(not args.default_malloc)
    for flag in ("max_length", "limit", "batch_size", "aux_batch_size", "grad_accum", "steps", "meta_batch_size",
                 "meta_head_steps", "pretrain_steps", "final_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    demo = bool(args.task and "demo" in args.task)
    if demo and len(args.task) > 1:
        parser.error("--task demo runs alone")
    if not (args.bench or demo):
        _check_run_args(parser, args)
    try:
        if args.bench:
            return run_bench(args) or 0
        if demo:
            return run_demo(args) or 0
        import transformers
        transformers.logging.set_verbosity_error()
        if not args.progress:
            transformers.logging.disable_progress_bar()
        ws = Workspace(args, resolve_device(args.device))
        if args.table:
            run_table(args.table, ws, args)
        elif args.figure:
            run_figure(args.figure, ws, args)
        else:
            run_family(ws, args)
    except (ReproduceError, tartan.DataError, FileNotFoundError, ValueError) as e:  # bad input: one message
        where = ""
        if isinstance(e, ValueError) and not isinstance(e, tartan.DataError):  # may be a bug, not bad input: where
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f" (raised at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
        print(f"error: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted" + ("" if args.bench or demo else
                                 ": finished runs are kept; the same command resumes from there"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
