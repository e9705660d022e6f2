"""Reports: the paper's tables (mean, std, permutation-test p-values) and figures, from the result files."""
from __future__ import annotations

import os

import numpy as np

import tartan

from .common import ReproduceError
from .paper import BUDGETS, FIGURES, N_PERMUTATIONS, PAPER, TABLES, TASKS, TEXT_MODES, VISION_MODES
from .runs import FLAGS, Run, Workspace, execute_all, make_run



# 6. Tables: mean and sample std (ddof=1) over seeds of the test headline metric x100, the paper's number beside it,
#    and the unpaired two-sided permutation test (App. A.2, tartan.permutation_test) against the baseline column.


def cell_scores(results: dict, run_list: list[Run]) -> list[float]:
    return [100 * results[r]["headline"]["test"] for r in run_list if r in results]


def fmt(mean_std) -> str:
    return f"{mean_std[0]:.2f} ± {mean_std[1]:.2f}"


def table_runs(number: int, tasks, modes, seeds, dapt) -> dict:
    table = TABLES[number]
    cols = [c for c in table.columns if not modes or c.mode in modes]
    return {(task, c.label): [make_run(task, c.mode, c.aux, s, dapt) for s in seeds]
            for task in table.tasks if not tasks or task in tasks for c in cols}


def render_table(number: int, cells: dict, results: dict, seeds, ws_args, dapt: str) -> str:
    """The paper's layout, as Markdown: one row per task, ours and [the paper's] per column, p-value columns."""
    table = TABLES[number]
    tasks = list(dict.fromkeys(t for t, _ in cells))
    cols = [c for c in table.columns if any((t, c.label) in cells for t in tasks)]
    last_base = max([i for i, c in enumerate(table.columns) if c.label in table.baseline], default=len(table.columns))
    tested = {c.label for c in table.columns[last_base + 1:]}  # p-values for the columns right of the baseline
    header = ["Domain", "Task"]
    for c in cols:
        header.append(c.label)
        if c.label in tested:
            header.append(f"p vs {table.baseline_name or table.baseline[0]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes, min_ps = [], set()
    for task in tasks:
        scores = {c.label: cell_scores(results, cells.get((task, c.label), [])) for c in cols}
        base = [b for b in table.baseline if len(scores.get(b, [])) >= 1]
        if len(base) > 1:  # Table 8: the p-values are against max(DAPT, DAPT+TAPT)
            best = max(base, key=lambda b: np.mean(scores[b]))
            notes.append(f"{TASKS[task]['title']}: baseline = {best} (the higher mean of {' and '.join(base)})")
            base = [best]
        row = [TASKS[task]["domain"], TASKS[task]["title"]]
        for c in cols:
            paper = PAPER.get((number, task, c.label))
            x = scores[c.label]
            ours = "not run" if not x else fmt(tartan.mean_std(x)) + (f" (n={len(x)})" if len(x) != len(seeds) else "")
            row.append(ours + (f" [{fmt(paper)}]" if paper else ""))
            if c.label in tested:
                pp = "" if not paper or paper[2] is None else f" [{paper[2]:.3f}]"
                if x and base:
                    test = tartan.permutation_test(x, scores[base[0]], N_PERMUTATIONS, seed=0)
                    min_ps.add((len(x), len(scores[base[0]]), test["min_p_two_sided"], test["exact"]))
                    row.append(f"{test['p_two_sided']:.3f}{pp}")
                else:
                    row.append("—" + pp)
        lines.append("| " + " | ".join(row) + " |")
    metric = "; ".join(sorted({f"{TASKS[t]['title']}: {TASKS[t]['metric']}" for t in tasks}))
    text = [f"### {table.title}", "",
            f"Test-set headline metric x100 ({metric}): mean ± standard deviation over seeds (sample std, ddof=1), "
            f"seeds {seeds_str(seeds)}; the paper's number in [brackets] (the paper used {table.seeds} seeds).", ""]
    text += lines + [""]
    if table.baseline:
        text.append(f"p: unpaired two-sided permutation test of the per-seed scores against the baseline column "
                    f"(App. A.2), exact over all splits when there are at most {N_PERMUTATIONS} of them, else "
                    f"{N_PERMUTATIONS} random permutations; the paper's p-value in [brackets].")
        for n_a, n_b, min_p, exact in sorted(min_ps):
            if min_p >= 0.05:
                text.append(f"**Warning:** with {n_a} and {n_b} seeds the smallest two-sided p-value this test can "
                            f"give is {min_p:.3f}: no difference can reach p < 0.05 (the paper used {table.seeds} "
                            f"seeds).")
    text += [f"- {n}" for n in notes]
    if table.note or (dapt != table.dapt and any(c.mode.startswith("dapt") or (c.aux or "").startswith("dapt")
                                                  for c in cols)):
        text.append(f"- DAPT corpus: {dapt}. {table.note}".rstrip())
    text.append(f"- Model: {ws_args.model if number != 5 else 'WideResNet-16-2'}; budget: {budget_str(ws_args)}.")
    return "\n".join(text) + "\n"


def seeds_str(seeds) -> str:
    s = list(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 1 else ",".join(map(str, s))


def budget_str(args) -> str:
    given = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in list(FLAGS) + ["max_length", "limit"]
             if getattr(args, k, None) is not None]
    if args.no_final_finetune:
        given.append("--no-final-finetune")
    if args.quick:
        given.insert(0, "--quick")
    if args.budget:
        b = BUDGETS[args.budget]
        given.insert(0, f"--budget {args.budget} (max length {b['max_length']}; end-task stages "
                        + ", ".join(f"{k} {v}" for k, v in b["train"].items()) + "; Eq. 2 stages "
                        + ", ".join(f"{k} {v}" for k, v in b["eq2"].items()) + "; Eq. 1 "
                        + ", ".join(f"{k} {v}" for k, v in b["pretrain"].items())
                        + ("; no final fine-tuning" if b["final"] is None else "") + ")")
    return "the paper's settings" if not given else "the paper's settings except " + " ".join(given)


def run_table(number: int, ws: Workspace, args) -> str:
    table = TABLES[number]
    seeds = args.seeds or list(range(table.seeds))
    dapt = args.dapt_corpus or table.dapt
    if args.aux_file:
        raise ReproduceError("--aux-file applies to single runs (--task/--mode), not to the paper's tables")
    if table.note:
        print(f"note: {table.note}")
    cells = table_runs(number, args.task, args.mode, seeds, dapt)
    if not cells:
        raise ReproduceError(f"Table {number} has no cell for --task {args.task} --mode {args.mode}")
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    text = render_table(number, cells, results, seeds, args, dapt)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"table{number}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print("\n" + text + f"\n(written to {path})")
    return text


# Figures, drawn from the stored histories ------------------------------------------------------------------------------


def figure_runs(number: int, tasks, seeds) -> dict:
    chosen = [t for t in FIGURES[number][1] if not tasks or t in tasks]
    if number == 2:
        return {(t, label, n): [make_run(t, mode, aux, s, n) for s in seeds] for t in chosen for n in ("1x", "10x")
                for label, mode, aux in (("DAPT", "dapt", None), ("META-TARTAN", "meta", "dapt"))}
    if number == 3:
        return {(t, label): [make_run(t, mode, "dapt", s, "10x") for s in seeds] for t in chosen
                for label, mode in (("separate head phi*", "meta"), ("same head phi'", "meta-samehead"))}
    return {(t, "META-TARTAN"): [make_run(t, "meta", "dapt+tapt", s, "10x") for s in seeds] for t in chosen}


def weight_curves(histories: list[list[dict]]) -> tuple[list[int], dict, dict]:
    """Task weights alpha per evaluation: (steps every seed reached, mean over seeds per task, per-seed (steps, values))."""
    n = min(len(h) for h in histories)
    steps = [e["step"] for e in histories[0][:n]]
    names = list(histories[0][0]["weights"])
    per_seed = {k: [([e["step"] for e in h], [e["weights"][k] for e in h]) for h in histories] for k in names}
    mean = {k: np.mean([v[:n] for _, v in per_seed[k]], axis=0).tolist() for k in names}
    return steps, mean, per_seed


def run_figure(number: int, ws: Workspace, args) -> str:
    title, _, n_seeds = FIGURES[number]
    seeds = args.seeds or list(range(n_seeds))
    cells = figure_runs(number, args.task, seeds)
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReproduceError("figures need matplotlib: pip install matplotlib") from None
    tasks = list(dict.fromkeys(k[0] for k in cells))
    panels = list(dict.fromkeys(k[:2] for k in cells)) if number == 3 else [(t,) for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if number == 2:
            for label in ("DAPT", "META-TARTAN"):
                pts = [(n, cell_scores(results, cells[(panel[0], label, n)])) for n in ("1x", "10x")]
                pts = [(float(n[:-1]), tartan.mean_std(x)) for n, x in pts if x]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                                marker="o", capsize=3, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("auxiliary data n (x |Train|)")
            ax.set_ylabel(f"test {TASKS[panel[0]]['metric']} x100")
        else:
            histories = [results[r]["history"] for r in cells[panel if number == 3 else (panel[0], "META-TARTAN")]
                         if r in results and results[r]["history"]]
            if histories:
                steps, mean, per_seed = weight_curves(histories)
                for k, color in zip(mean, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
                    for x, y in per_seed[k]:
                        ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                    ax.plot(steps, mean[k], color=color, lw=2, label=k)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("task weight alpha")
        ax.set_title(" / ".join([TASKS[panel[0]]["title"]] + list(panel[1:])))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"figure{number}.png")
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    print(f"{title}: seeds {seeds_str(seeds)}, from {len(results)} result files -> {path}")
    return path


def run_family(ws: Workspace, args) -> dict:
    """--task ... --mode ...: every (task, mode, seed) combination."""
    seeds = args.seeds or list(range(10))
    runs = []
    for task in args.task:
        valid = VISION_MODES if task == "mammals" else TEXT_MODES
        for mode in args.mode:
            if mode not in valid:
                raise ReproduceError(f"--mode {mode} does not apply to {task} (choose from {', '.join(valid)})")
            if args.aux and mode not in ("mt", "meta", "meta-samehead"):
                raise ReproduceError(f"--aux picks the auxiliary tasks of mt/meta; --mode {mode} names its own")
            if task == "mammals" and (args.aux or args.aux_file):
                raise ReproduceError("mammals has one auxiliary task (the other 95 CIFAR-100 classes): no --aux")
            if args.aux_file and mode == "finetune":
                raise ReproduceError("--mode finetune uses no auxiliary data: --aux-file does not apply")
            if args.aux == "none" and not args.aux_file:
                raise ReproduceError("--aux none needs at least one --aux-file")
            runs += [make_run(task, mode, args.aux, s, args.dapt_corpus or "10x", tuple(args.extra_corpora))
                     for s in seeds]
    results = execute_all(ws, runs)
    for task in args.task:
        for mode in args.mode:
            x = [r for r in runs if r.task == task and r.mode == mode and r in results]
            if x:
                scores = [100 * results[r]["headline"]["test"] for r in x]
                print(f"{task} {mode} ({x[0].aux_label}): test {TASKS[task]['metric']} x100 = "
                      f"{fmt(tartan.mean_std(scores))} over {len(x)} seed(s) (ddof=1)")
    return results
