"""A user's own end-task (--task-dir): the folder, its corpora, and its table with what META learned about each
auxiliary corpus. No paper numbers, no checksums, no downloads."""
from __future__ import annotations

import os

import numpy as np

import tartan

from .common import ReproduceError, atomic_write_text, compare
from .paper import N_PERMUTATIONS, TASKS

SPLITS = ("train", "dev", "test")


def own_tasks(folders: list[str]) -> dict:
    """Run name (the folder's name) -> absolute folder, for each --task-dir; a missing folder or split is an error."""
    out = {}
    for folder in folders:
        path = os.path.abspath(os.path.expanduser(folder))
        name = os.path.basename(path.rstrip(os.sep))
        if not os.path.isdir(path):
            raise ReproduceError(f"--task-dir {folder}: no such folder")
        missing = [f"{s}.jsonl" for s in SPLITS if not os.path.isfile(os.path.join(path, f"{s}.jsonl"))]
        if missing:
            raise ReproduceError(f"--task-dir {folder}: missing {', '.join(missing)} (an end-task folder holds "
                                 f"train.jsonl, dev.jsonl and test.jsonl)")
        if name in TASKS or name == "demo":
            raise ReproduceError(f"--task-dir {folder}: the folder's name '{name}' is a task of the paper; rename "
                                 f"the folder (results are stored under its name)")
        if name in out:
            raise ReproduceError(f"--task-dir: two folders are named '{name}' ({out[name]} and {path}); results are "
                                 f"stored under the folder's name, so rename one")
        out[name] = path
    return out


def own_corpus_file(folder: str, label: str, extra: dict) -> str:
    """Absolute path of an auxiliary corpus of a user's task: tapt = the folder's train.txt if there is one, else its
    train.jsonl (whose texts are the corpus); other corpora come from --aux-file / --dapt-corpus FILE."""
    if label == "tapt":
        txt = os.path.join(folder, "train.txt")
        return txt if os.path.isfile(txt) else os.path.join(folder, "train.jsonl")
    if label in extra:
        return os.path.abspath(extra[label])
    raise ReproduceError(f"{folder} is a task of your own: it has no DAPT corpus of the paper; give one with "
                         f"--dapt-corpus FILE")


def default_baseline(modes) -> str | None:
    return "tapt" if "tapt" in modes else "finetune" if "finetune" in modes else None


def own_table(task: str, folder: str, metric: str, cells: dict, results: dict, baseline: str | None, seeds) -> str:
    """Markdown: one row per mode (cells: mode -> its runs), test and dev mean ± std over seeds x100, one-sided p
    against the baseline mode, wall-clock per run; then what META learned about each auxiliary corpus."""
    from .report import fmt, seeds_str
    scores = {m: [100 * results[r]["headline"]["test"] for r in runs if r in results] for m, runs in cells.items()}
    base = scores.get(baseline) or []
    lines = [f"### {task} ({folder})", "",
             f"Test {metric} x100: mean ± standard deviation over seeds (ddof=1), seeds {seeds_str(seeds)}; "
             + (f"p: one-sided unpaired permutation test, H1: the mode scores higher than {baseline} (two-sided in "
                f"parentheses)." if base else "no baseline mode was run: no p-values."), "",
             f"| Mode | Aux. corpora | Test {metric} | Dev {metric} | p vs {baseline or '—'} | Wall-clock per run |",
             "|---|---|---|---|---|---|"]
    for mode, runs in cells.items():
        done = [r for r in runs if r in results]
        if not done:
            lines.append(f"| {mode} | {runs[0].aux_label} | not run | | | |")
            continue
        dev = [100 * results[r]["headline"]["dev"] for r in done]
        n = f" (n={len(done)})" if len(done) != len(runs) else ""
        p = "—"
        if base and mode != baseline:
            test = compare(scores[mode], base, N_PERMUTATIONS)
            p = f"{test['p_greater']:.3f} ({test['p_two_sided']:.3f})"
        wall = [results[r]["wall_seconds"] for r in done]
        lines.append(f"| {mode} | {done[0].aux_label} | {fmt(tartan.mean_std(scores[mode]))}{n} | "
                     f"{fmt(tartan.mean_std(dev))} | {p} | {np.mean(wall):.1f} s |")
    report = meta_report(task, {m: runs for m, runs in cells.items() if m.startswith("meta")}, results)
    return "\n".join(lines + [""] + report) + "\n"


def meta_learned(record: dict) -> dict:
    """Task name -> (final weight, mean weight, mean cosine with the meta gradient) of one META run, from its
    history (one entry per dev evaluation, each averaged over the steps since the one before); the end-task first."""
    history = [e for e in record.get("history") or [] if e.get("weights")]
    out = {}
    for name in (history[0]["weights"] if history else []):
        cosines = [e["cosines"][name] for e in history if e.get("cosines")]
        out[name] = (history[-1]["weights"][name], float(np.mean([e["weights"][name] for e in history])),
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


def meta_report(task: str, cells: dict, results: dict) -> list[str]:
    """Per META run and task (the end-task, then each auxiliary corpus): the final task weight, its mean over the
    evaluations, and the mean cosine between the task's gradient and the meta gradient."""
    rows = []
    for mode, runs in cells.items():
        for run in (r for r in runs if r in results):
            for name, (final, mean, cos) in meta_learned(results[run]).items():
                label = f"{name} (end-task)" if name == task else name
                rows.append(f"| {mode} | {run.seed} | {label} | {final:.3f} | {mean:.3f} | "
                            f"{'—' if cos is None else f'{cos:+.3f}'} |")
    if not rows:
        return []
    fits = [f for runs in cells.values() for r in runs if r in results and (f := meta_head_fit(results[r]))]
    fit = fit_line(fits) if fits else ""
    return ["What META learned about each task (a task whose gradient agrees with the meta gradient, cosine > 0, "
            "gains weight):", "",
            "| Mode | Seed | Task | Final weight | Mean weight | Mean cosine with meta gradient |",
            "|---|---|---|---|---|---|", *rows, "", *([fit[0].upper() + fit[1:] + ".", ""] if fit else [])]


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
    return (f"{title} {label} ({len(learned)} run(s)), final weight and mean cosine with the meta gradient, mean "
            f"[min, max] over runs: " + "; ".join(parts) + (f"; {fit_line(fits)}" if fits else ""))


def print_own_tables(out: str, own: dict, metric: str, runs: list, results: dict, modes, baseline, seeds) -> dict:
    """Prints the table of each of the user's tasks and writes it to OUT/<task>/table.md; returns task -> text."""
    texts = {}
    for task, folder in own.items():
        cells = {m: [r for r in runs if r.task == task and r.mode == m] for m in modes}
        text = own_table(task, folder, metric, cells, results, baseline or default_baseline(modes), seeds)
        path = os.path.join(out, task, "table.md")
        atomic_write_text(path, text)
        print("\n" + text + f"\n(written to {path})")
        texts[task] = text
    return texts
