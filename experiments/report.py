"""Reports, from the result records alone (tables.py runs what they need): the paper's tables (mean, std,
permutation-test p-values), what META learned (task weights, cosines with the meta gradient, the meta head's fit), the
tables of a user's own end-tasks, and the figures; printed, and written to --out."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from . import analysis
from .common import (ReproduceError, alpha_of, atomic_write_text, compare, fmt, markdown_table, mean_std, min_seeds,
                     save_figure, seeds_str)
from .own import default_baseline
from .paper import FIGURES, META_MODES, N_PERMUTATIONS, PAPER, TABLES, TASKS

if TYPE_CHECKING:  # the runs' and budget's types only: a report reads result records, it runs nothing
    from .runs import Budget, Run

# Tables: mean and sample std (ddof=1) over seeds of the test headline metric x100, the paper's number beside it, and
# the one-sided unpaired permutation test (App. A.2; H1: the column beats the baseline column), two-sided beside it.


def cell_scores(results: dict, run_list: list[Run], key: str = "test") -> list[float]:
    """The headline metric x100 of the runs with a result ("test", or "dev")."""
    return [100 * results[r]["headline"][key] for r in run_list if r in results]


def score_cell(x: list[float], planned: int, base: list[float] | None = None) -> tuple[str, dict | None]:
    """A cell of every table, from its per-seed scores x: "mean ± std" (sample std), with "(n=k)" when fewer than
    the `planned` runs have a result ("not run" when none has); and, given the baseline's scores, the one-sided
    permutation test of x against them (None without both)."""
    text = "not run" if not x else fmt(mean_std(x), len(x)) + (f" (n={len(x)})" if len(x) not in (1, planned) else "")
    return text, compare(x, base, N_PERMUTATIONS) if x and base else None


def baseline_candidates(table, scores: dict) -> list[str]:
    """The table's baseline columns (one, or Table 8's DAPT and DAPT+TAPT) that have a score."""
    return [b for b in table.baseline if scores.get(b)]


def baseline_column(table, scores: dict) -> str | None:
    """The column a table's p-values test against, given each column's scores: its baseline, or of several (Table
    8's DAPT and DAPT+TAPT) the one with the higher mean; None when no baseline column has a score."""
    base = baseline_candidates(table, scores)
    return max(base, key=lambda b: np.mean(scores[b])) if base else None


def render_table(number: int, cells: dict, results: dict, seeds, model: str, budget: Budget, dapt: str) -> str:
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
    rows, notes, min_ps = [], [], set()
    for task in tasks:
        scores = {c.label: cell_scores(results, cells.get((task, c.label), [])) for c in cols}
        present = baseline_candidates(table, scores)
        base = [best] if (best := baseline_column(table, scores)) else []
        if len(present) > 1:  # Table 8: the p-values are against max(DAPT, DAPT+TAPT)
            notes.append(f"{TASKS[task]['title']}: baseline = {best} (the higher mean of {' and '.join(present)})")
        row = [TASKS[task]["domain"], TASKS[task]["title"]]
        for c in cols:
            paper = PAPER.get((number, task, c.label))
            x = scores[c.label]
            ours, test = score_cell(x, len(seeds), scores[base[0]] if base and c.label in tested else None)
            row.append(ours + (f" [{fmt(paper)}]" if paper else ""))
            if c.label in tested:
                pp = "" if not paper or paper[2] is None else f" [{paper[2]:.3f}]"
                if test:
                    min_ps.add((len(x), len(scores[base[0]]), test["min_p_greater"]))
                    row.append(f"{test['p_greater']:.3f} (two-sided {test['p_two_sided']:.3f}){pp}")
                else:
                    row.append("—" + pp)
        rows.append(row)
    metric = "; ".join(sorted({f"{TASKS[t]['title']}: {TASKS[t]['metric']}" for t in tasks}))
    text = [f"### {table.title}", "",
            f"Test-set headline metric x100 ({metric}): mean ± standard deviation over seeds (sample std, ddof=1), "
            f"seeds {seeds_str(seeds)}; the paper's number in [brackets] (the paper used {table.seeds} seeds).", ""]
    text += markdown_table(header, rows) + [""]
    if table.baseline:
        text.append(f"p: one-sided unpaired permutation test of the per-seed scores (H1: the column scores higher than "
                    f"the baseline column; App. A.2), exact over all splits when there are at most {N_PERMUTATIONS} of "
                    f"them, else {N_PERMUTATIONS} random permutations; the two-sided p in (parentheses); the paper's "
                    f"p-value in [brackets].")
        for n_a, n_b, min_p in sorted(min_ps):
            if min_p >= 0.05:
                text.append(f"**Warning:** with {n_a} and {n_b} seeds the smallest one-sided p-value this test can "
                            f"give is {min_p:.3f}: no difference can reach p < 0.05; that needs at least "
                            f"{min_seeds()} seeds a side (the paper used {table.seeds} seeds).")
    text += [f"- {n}" for n in notes]
    released = {(TASKS[t]["title"], label, results[r]["config"]["released_checkpoint"]) for (t, label), runs in
                cells.items() for r in runs if results.get(r, {}).get("config", {}).get("released_checkpoint")}
    text += [f"- {title} {label}: Eq. 2 on Gururangan et al.'s released checkpoint {ckpt} (Sec. 4), not re-trained"
             for title, label, ckpt in sorted(released)]
    text += code_versions({f"{TASKS[t]['title']} {label}": runs for (t, label), runs in cells.items()}, results)
    text += [f"- {line}" for t in tasks for c in cols if c.mode in META_MODES
             if (line := meta_summary(c.label, TASKS[t]["title"], t, cells.get((t, c.label), []), results))]
    for t in tasks:  # per task: their sizes differ
        cost = []
        for c in cols:
            recs = [results[r] for r in cells.get((t, c.label), []) if "wall_seconds" in results.get(r, {})]
            if recs:
                wall = np.mean([rec["wall_seconds"] for rec in recs]) / 60
                cpu = [rec["cpu_seconds"] for rec in recs if rec.get("cpu_seconds") is not None]
                cost.append(f"{c.label} {wall:.1f}" + (f" ({np.mean(cpu) / 60:.1f} CPU)" if cpu else ""))
        if cost:
            text.append(f"- {TASKS[t]['title']}: minutes per run, whole run (Eq. 1 stages included), mean over its "
                        f"result files: wall-clock (process CPU time): " + "; ".join(cost) + ".")
    if table.note or (dapt != table.dapt and any(c.mode.startswith("dapt") or (c.aux or "").startswith("dapt")
                                                  for c in cols)):
        text.append(f"- DAPT corpus: {dapt}. {table.note}".rstrip())
    text.append(f"- Model: {model if number != 5 else 'WideResNet-16-2'}; budget: {budget.describe()}.")
    return "\n".join(text) + "\n"


def protocol_analysis(number: int, cells: dict, results: dict, out: str) -> str:
    """For runs that scored test at every evaluation (a budget with eval_test, e.g. cpu-es), the pre-registered
    protocol's analysis per task (experiments/analysis.py) and its figure, OUT/figure_table<number>_<task>.png."""
    table = TABLES[number]
    done = {r: rec for r, rec in results.items() if (rec.get("config", {}).get("train") or {}).get("eval_test")}
    text = ""
    for task in dict.fromkeys(t for t, _ in cells):
        columns = {label: [(r.path(out), done[r]) for r in runs if r in done] for (t, label), runs in cells.items()
                   if t == task}
        planned = {label: len(runs) for (t, label), runs in cells.items() if t == task}  # the design's seeds
        columns = {label: runs for label, runs in columns.items() if runs}
        base = baseline_column(table, {label: [100 * rec["headline"]["test"] for _, rec in runs]
                                       for label, runs in columns.items()})
        if base and len(columns) > 1:  # against the column the table's p-values test against
            design = sorted({r.seed for (t, _), runs in cells.items() if t == task for r in runs})
            text += "\n" + analysis.sweep_report(TASKS[task]["title"], columns, base,
                                                 os.path.join(out, f"figure_table{number}_{task}.png"), planned, design,
                                                 task in analysis.SECOND_LOOK_TASKS)
        elif columns:  # said, not left out without a word
            text += (f"\n#### {TASKS[task]['title']}: the protocol's analysis waits for its baseline column "
                     f"({' or '.join(table.baseline)}) and one to test against it; results so far: "
                     + ", ".join(f"{label} {len(runs)} of {planned[label]}" for label, runs in columns.items()) + "\n")
    return text


def print_table(number: int, cells: dict, results: dict, seeds, model: str, budget: Budget, dapt: str, out: str) -> str:
    """A table's text (render_table, then the protocol's analysis and META's weights figures, drawn into `out`),
    printed and written to OUT/table<number>.md."""
    text = render_table(number, cells, results, seeds, model, budget, dapt)
    text += protocol_analysis(number, cells, results, out)
    text += weights_figures(number, cells, results, out)
    path = os.path.join(out, f"table{number}.md")
    print("\n" + text, flush=True)  # first: a folder that takes no file (read-only results) still shows it
    atomic_write_text(path, text)
    print(f"\n(written to {path})")
    return text


# What META learned: task weights and cosines from the stored histories, and the meta head's fit -----------------------


def meta_learned(record: dict) -> dict:
    """Task name -> (final weight, mean weight, mean cosine with the meta gradient) of one META run, from its
    history (one entry per dev evaluation, each averaged over the steps since the one before); the end-task first."""
    history = [e for e in record.get("history") or [] if alpha_of(e)]
    out = {}
    for name in (alpha_of(history[0]) if history else []):
        cosines = [e["cosines"][name] for e in history if e.get("cosines")]
        out[name] = (alpha_of(history[-1])[name], float(np.mean([alpha_of(e)[name] for e in history])),
                     float(np.mean(cosines)) if cosines else None)
    return out


def meta_head_fit(record: dict) -> tuple | None:
    """How well the meta head did, averaged over a META run's evaluations: (its loss on B*_val, the end-task head's
    dev loss, phi*'s training loss at the first and at the last of its fitting steps). The last two are None in result
    files made before the fit was recorded and for the Eq. 6 ablation, which fits no phi*; all is None without META."""
    history = [e for e in record.get("history") or [] if e.get("meta_val_loss") is not None]
    if not history:
        return None
    fits = [e["meta_head_fit_loss"] for e in history if e.get("meta_head_fit_loss")]
    first, last = np.mean(fits, axis=0).tolist() if fits else (None, None)
    return (float(np.mean([e["meta_val_loss"] for e in history])), float(np.mean([e["dev"]["loss"] for e in history])),
            first, last)


def fit_line(fits: list) -> str:
    """fits: meta_head_fit of several runs, as one sentence of means over their steps and runs."""
    val, dev = np.mean([f[:2] for f in fits], axis=0)
    fitted = [f[2:] for f in fits if f[2] is not None]
    line = (f"the meta head's loss on B*_val {val:.3f} (phi*; phi' in the Eq. 6 ablation), against the end-task "
            f"head's dev loss {dev:.3f}")
    if fitted:
        first, last = np.mean(fitted, axis=0)
        line += (f"; phi*'s training loss, first -> last of its fitting steps, {first:.3f} -> {last:.3f} "
                 f"({len(fitted)} run(s); Sec. 3.3 fits phi* to convergence, --meta-head-steps/--meta-head-lr set it)")
    return line + " (means over steps and runs)"


def meta_trace(record: dict) -> dict | None:
    """The per-step trace (tartan._trace: alpha, cosines, ... at every optimizer step) of a run's META stage; None
    without one."""
    return next((s["trace"] for s in record.get("stages") or [] if s["stage"] == "meta" and s.get("trace")
                 and alpha_of(s["trace"])), None)


def alpha_step_line(traces: list[dict], runs: int) -> str:
    """The largest change of a task weight in one step, max over the traces' runs, tasks and steps of
    |alpha_t - alpha_(t-1)|, as a sentence; alpha_0 is Algorithm 1's start, 1/K for K tasks. runs: of the cell, which
    older result files (without a per-step trace) make more than the traces."""
    largest = max(float(np.abs(np.diff([1 / len(alpha), *x])).max())
                  for alpha in map(alpha_of, traces) for x in alpha.values())
    which = "" if runs == len(traces) else f" of its {runs} that kept them"
    return (f"Largest per-step change of a task weight: {largest:.4f} (max over steps, tasks and the {len(traces)} "
            f"run(s){which} of |alpha_t - alpha_(t-1)|, from the per-step traces).")


def meta_summary(label: str, title: str, task: str, runs: list, results: dict) -> str | None:
    """One line for a META cell of a table: per task, the final weight and the mean cosine with the meta gradient,
    mean [min, max] over the cell's result files."""
    learned = [meta_learned(results[r]) for r in runs if r in results]
    if not learned or not learned[0]:
        return None
    span = lambda x: f"{np.mean(x):.3f} [{min(x):.3f}, {max(x):.3f}]"  # noqa: E731
    parts = [f"{name}{' (end-task)' if name == task else ''} weight {span([m[name][0] for m in learned])}, cosine "
             + (span([m[name][2] for m in learned]) if learned[0][name][2] is not None else "—")
             for name in learned[0]]
    fits = [f for r in runs if r in results and (f := meta_head_fit(results[r]))]
    traces = [t for r in runs if r in results and (t := meta_trace(results[r]))]
    return (f"{title} {label} ({len(learned)} run(s)), final weight and mean cosine with the meta gradient, mean "
            f"[min, max] over runs: " + "; ".join(parts) + (f"; {fit_line(fits)}" if fits else "")
            + (f". {alpha_step_line(traces, len(learned))}" if traces else ""))


def meta_report(task: str, cells: dict, results: dict) -> list[str]:
    """Per META run and task (the end-task, then each auxiliary corpus): the final task weight, its mean over the
    evaluations, and the mean cosine between the task's gradient and the meta gradient."""
    rows = []
    for mode, runs in cells.items():
        for run in (r for r in runs if r in results):
            for name, (final, mean, cos) in meta_learned(results[run]).items():
                label = f"{name} (end-task)" if name == task else name
                rows.append([mode, run.seed, label, f"{final:.3f}", f"{mean:.3f}",
                             "—" if cos is None else f"{cos:+.3f}"])
    if not rows:
        return []
    fits = [f for runs in cells.values() for r in runs if r in results and (f := meta_head_fit(results[r]))]
    fit = fit_line(fits) if fits else ""
    traces = [t for runs in cells.values() for r in runs if r in results and (t := meta_trace(results[r]))]
    return ["What META learned about each task (a task whose gradient agrees with the meta gradient, cosine > 0, "
            "gains weight):", "",
            *markdown_table(["Mode", "Seed", "Task", "Final weight", "Mean weight", "Mean cosine with meta gradient"],
                            rows), "", *([fit[0].upper() + fit[1:] + ".", ""] if fit else []),
            *([alpha_step_line(traces, len({(mode, seed) for mode, seed, *_ in rows})), ""] if traces else [])]


# A user's own end-task (--task-dir): its table ------------------------------------------------------------------------


def own_table(task: str, folder: str, metric: str, cells: dict, results: dict, baseline: str | None, seeds) -> str:
    """Markdown: one row per mode (cells: mode -> its runs), test and dev mean ± std over seeds x100, one-sided p
    against the baseline mode, wall-clock per run; then what META learned about each auxiliary corpus."""
    scores = {m: cell_scores(results, runs) for m, runs in cells.items()}
    base = scores.get(baseline) or []
    lines = [f"### {task} ({folder})", "",
             f"Test {metric} x100: mean ± standard deviation over seeds (ddof=1), seeds {seeds_str(seeds)}; "
             + (f"p: one-sided unpaired permutation test, H1: the mode scores higher than {baseline} (two-sided in "
                f"parentheses)." if base else "no baseline mode was run: no p-values."), ""]
    columns = ["Mode", "Aux. corpora", f"Test {metric}", f"Dev {metric}", f"p vs {baseline or '—'}",
               "Wall-clock per run"]
    rows = []
    for mode, runs in cells.items():
        done = [r for r in runs if r in results]
        ours, test = score_cell(scores[mode], len(runs), base if mode != baseline else None)
        if not done:
            rows.append([mode, runs[0].aux_label, ours, "", "", ""])
            continue
        p = "—" if test is None else f"{test['p_greater']:.3f} ({test['p_two_sided']:.3f})"
        wall = [results[r]["wall_seconds"] for r in done]
        rows.append([mode, done[0].aux_label, ours, fmt(mean_std(cell_scores(results, done, "dev")), len(done)), p,
                     f"{np.mean(wall):.1f} s"])
    report = meta_report(task, {m: runs for m, runs in cells.items() if m in META_MODES}, results)
    code = code_versions(cells, results)
    return "\n".join(lines + markdown_table(columns, rows) + [""] + code + ([""] if code else []) + report) + "\n"


def code_versions(cells: dict, results: dict) -> list[str]:
    """A note naming the cells (name -> runs) whose result files were made by more than one tartan.py (their
    versions.tartan.py_sha256): one arm of them holds only where those versions give the same numbers."""
    mixed = {name: len(shas) for name, runs in cells.items()
             if len(shas := {results[r].get("versions", {}).get("tartan.py_sha256") for r in runs if r in results}) > 1}
    return ["- Result files made by more than one version of tartan.py are pooled in: "
            + ", ".join(f"{name} ({n})" for name, n in mixed.items()) + ". One arm holds only where those versions give "
            "the same numbers (test_a_short_run_gives_the_pinned_numbers checks that; else rerun them)."] if mixed else []


def print_own_tables(out: str, own: dict, metric: str, runs: list, results: dict, modes, baseline, seeds) -> dict:
    """Prints the table of each of the user's tasks and writes it to OUT/<task>/table.md; returns task -> text."""
    texts = {}
    for task, folder in own.items():
        cells = {m: [r for r in runs if r.task == task and r.mode == m] for m in modes}
        text = own_table(task, folder, metric, cells, results, baseline or default_baseline(modes), seeds)
        path = os.path.join(out, task, "table.md")
        print("\n" + text, flush=True)  # first: a folder that takes no file (read-only results) still shows it
        atomic_write_text(path, text)
        print(f"\n(written to {path})")
        texts[task] = text
    return texts


# Figures, drawn from the stored histories ------------------------------------------------------------------------------


def weight_curves(histories: list[list[dict]]) -> tuple[list[int], dict, dict]:
    """Task weights alpha per evaluation: (steps every seed reached, mean over seeds per task, per-seed (steps, values))."""
    n = min(len(h) for h in histories)
    steps = [e["step"] for e in histories[0][:n]]
    names = list(alpha_of(histories[0][0]))
    per_seed = {k: [([e["step"] for e in h], [alpha_of(e)[k] for e in h]) for h in histories] for k in names}
    mean = {k: np.mean([v[:n] for _, v in per_seed[k]], axis=0).tolist() for k in names}
    return steps, mean, per_seed


def weights_figure(title: str, end: str, traces: list[dict], png: str, window: int = 50) -> None:
    """META's task weights alpha (left) and each task's cos(g_meta, g_k) (right) against the optimizer step, from the
    per-step traces of several seeds: the mean (line) and the min-max band over the seeds, up to the last step that
    every seed reached; each seed's own weights thin, to its last step. A step's cosine is mostly noise, so each seed's
    cosines are first averaged over the last `window` steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = min(len(alpha_of(t)[end]) for t in traces)  # steps every seed reached
    window = min(window, n)  # a run shorter than the window: one mean over all its steps
    with_cos = [t for t in traces if t.get("cosines")]
    for name, color in zip(alpha_of(traces[0]), colors):
        for t in traces:  # the weight after step s at index s - 1
            axes[0].plot(np.arange(1, len(alpha_of(t)[name]) + 1), alpha_of(t)[name], color=color, lw=0.5, alpha=0.4)
        alpha = np.array([alpha_of(t)[name][:n] for t in traces])
        # index i: the mean cosine over steps i + 1 .. i + window
        cos = np.array([np.convolve(t["cosines"][name][:n], np.ones(window) / window, "valid") for t in with_cos])
        for ax, grid, first in ((axes[0], alpha, 1), (axes[1], cos, window)):
            if grid.size:
                steps = np.arange(first, first + grid.shape[1])
                ax.fill_between(steps, grid.min(0), grid.max(0), color=color, alpha=0.25, lw=0)
                ax.plot(steps, grid.mean(0), color=color, lw=1.8,
                        label=f"{name} (end-task)" if name == end else name)
    axes[1].axhline(0, color="gray", lw=0.8, ls=":")
    axes[0].set_ylabel("task weight alpha = softmax(w)")
    axes[1].set_ylabel(f"cos(g_meta, g_k), mean of last {window} steps")
    for ax in axes:
        ax.set_xlabel("optimizer step (META stage)")
        ax.legend(fontsize=8, title="line: mean; band: min-max over seeds", title_fontsize=7)
    fig.suptitle(f"{title}: META's task weights and cosines, {len(traces)} seeds (mean and band to step {n}, the "
                 f"shortest run; thin lines: each seed's weights)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def weights_figures(number: int, cells: dict, results: dict, out: str) -> str:
    """For each META cell of a table whose runs recorded per-step traces, its weights_figure,
    OUT/figure_table<number>_<task>_weights.png, and a line that names it."""
    text = ""
    for (task, label), runs in cells.items():
        traces = [t for r in runs if r in results and (t := meta_trace(results[r]))]
        if not traces:
            continue
        png = os.path.join(out, f"figure_table{number}_{task}_weights.png")
        try:
            weights_figure(f"{TASKS[task]['title']} {label}", task, traces, png)
            text += (f"\nFigure: {os.path.basename(png)} ({label}'s task weights alpha and cos(g_meta, g_k) per task "
                     f"against the optimizer step: mean and min-max band over {len(traces)} seed(s), to the shortest "
                     f"run's last step).\n")
        except ImportError:
            text += f"\n(no figure of {label}'s task weights: it needs matplotlib, pip install matplotlib)\n"
        except OSError as e:  # a folder that takes no file (read-only results): the table still prints
            text += f"\n(figure of {label}'s task weights not written: {e})\n"
    return text


def draw_figure(number: int, cells: dict, results: dict, seeds, out: str) -> str:
    """Draws a figure of the paper from its cells' result files (tables.figure_runs) to OUT/figure<number>.png."""
    title = FIGURES[number][0]
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
                pts = [(float(n[:-1]), mean_std(x)) for n, x in pts if x]
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
    path = os.path.join(out, f"figure{number}.png")
    save_figure(fig, path, dpi=120)
    print(f"{title}: seeds {seeds_str(seeds)}, from {len(results)} result files -> {path}")
    return path


def print_family(out: str, own: dict, metric: str, tasks, modes, runs: list, results: dict, baseline, seeds) -> None:
    """--task ... --mode ...: the table of each of the user's own tasks (`own`), and for the paper's tasks each
    (task, mode)'s mean and std and what META learned."""
    print_own_tables(out, own, metric, runs, results, modes, baseline, seeds)
    for task in [t for t in tasks if t not in own]:
        for mode in modes:
            x = [r for r in runs if r.task == task and r.mode == mode and r in results]
            if x:
                print(f"{task} {mode} ({x[0].aux_label}): test {TASKS[task]['metric']} x100 = "
                      f"{fmt(mean_std(cell_scores(results, x)), len(x))} over {len(x)} seed(s) (ddof=1); "
                      f"dev {fmt(mean_std(cell_scores(results, x, 'dev')), len(x))}")
                learned = meta_summary(mode, TASKS[task]["title"], task, x, results) if mode in META_MODES else None
                if learned:
                    print(f"  {learned}")
