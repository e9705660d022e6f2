"""The analysis a pre-registered sweep asks for (experiments/results/cpu-es/PROTOCOL.md), beside a table's mean ± std
and unpaired p: the paired permutation p over seeds, bootstrap 90% intervals over test rows and seeds, the secondary
metrics, cost, time to reach the baseline's dev score, the verdict of the decision rule, and a figure of dev and test
score against wall-clock. Everything is read from the result files and their per-example test predictions."""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np

import tartan

from .common import compare, save_figure, seeds_str
from .keep import predictions_path
from .paper import metric_field

N_BOOTSTRAP = 10_000
LEVEL = 0.90      # the intervals: 5th to 95th percentile
Z_ALPHA, Z_POWER = 1.6449, 0.8416  # normal quantiles: one-sided alpha 0.05, power 0.8
# the protocol's looks at the data, by planned seeds per arm: one-sided alpha, its normal quantile, the permutations
# of the unpaired test (None: compare's default) and the design's overall one-sided error. 5: PROTOCOL.md; 10:
# AMENDMENT.md's second look (overall error 0.075, look 2 at p < 0.043, the exact p over all C(20, 10) splits)
LOOKS = {5: (0.05, Z_ALPHA, None, 0.05), 10: (0.043, 1.717, math.comb(20, 10), 0.075)}
NOMINAL = 0.05  # the paper's level, and the first look's
SECOND_LOOK_TASKS = ("scierc",)  # AMENDMENT.md registers look 2 for SCIERC alone (section 6: ACL-ARC keeps one look)


def paired_p(a, b) -> float:
    """One-sided paired permutation p (H1: a > b): every sign flip of the per-seed differences, exact. The paired
    counterpart of tartan.permutation_test (the tables' unpaired test, which splits the pooled scores), for seeds that
    give each arm the same data order."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    flips = np.array(list(itertools.product((1, -1), repeat=len(d))))  # (2^n, n)
    means = flips @ d / len(d)
    return float(np.mean(means >= d.mean() - 1e-12))


def _counts(gold: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """(N, 3, C) indicator rows: true positive, false positive, false negative of each class."""
    g, p = np.eye(classes)[gold], np.eye(classes)[pred]
    return np.stack([g * p, p * (1 - g), g * (1 - p)], axis=1)


def macro_f1_weighted(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """tartan.f1_scores' macro-F1 (over the classes present in gold or predictions) of B resamples at once, each
    given by its row weights (B, N) (bootstrap counts), where f1_scores on each resample's rows written out would
    take about a minute for a table's 10^4 replicates of 20 runs. Returns (B,)."""
    tp, fp, fn = (weights @ counts[:, k, :] for k in range(3))  # each (B, C)
    present = (tp + fp + fn) > 0
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), 0.0)
    return f1.sum(1) / present.sum(1)


def micro_f1_weighted(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Micro-F1 (= accuracy, one label a row) under row weights (B, N). Returns (B,)."""
    return (weights @ counts[:, 0, :].sum(1)) / weights.sum(1)


WEIGHTED = {"macro_f1": macro_f1_weighted, "micro_f1": micro_f1_weighted}  # headline metric -> its weighted score


def bootstrap(arms: dict, baseline: str, seed: int = 0, metric: str = "macro_f1") -> dict:
    """arms: name -> list of (gold, pred) integer arrays, one per seed, all on the same test rows. Each replicate
    draws the test rows with replacement (one draw for every run) and, within each arm, the seeds with replacement.
    Returns per arm its interval of `metric` (the task's headline: macro_f1 or micro_f1) and, against the baseline,
    the interval of the difference (x100)."""
    score = WEIGHTED[metric]
    rng = np.random.default_rng(seed)
    n = len(next(iter(arms.values()))[0][0])
    classes = 1 + max(int(max(g.max(), p.max())) for runs in arms.values() for g, p in runs)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=N_BOOTSTRAP).astype(float)  # (B, N)
    scores = {}
    for name, runs in arms.items():
        per_seed = np.stack([score(_counts(g, p, classes), weights) for g, p in runs], 1)  # (B, S)
        pick = rng.integers(0, len(runs), size=(N_BOOTSTRAP, len(runs)))
        scores[name] = 100 * np.take_along_axis(per_seed, pick, 1).mean(1)
    q = [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100]
    out = {name: {"score": np.percentile(s, q).tolist()} for name, s in scores.items()}
    for name, s in scores.items():
        if name != baseline and baseline in scores:
            out[name]["diff"] = np.percentile(s - scores[baseline], q).tolist()
    return out


def read_predictions(paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gold, predicted) class indices of each result file's test predictions, labels numbered in sorted order over
    all the files (so no data folder is needed to re-print)."""
    rows = []
    for path in paths:
        with open(predictions_path(path)) as f:
            rows.append([json.loads(line) for line in f if line.strip()])
        if [r.get("line") for r in rows[-1]] != [r.get("line") for r in rows[0]]:  # the bootstrap pairs rows by place
            raise ValueError(f"{predictions_path(path)}: its test rows are not those of {predictions_path(paths[0])} "
                             f"(the same lines of test.jsonl, in the same order)")
    names = sorted({r[k] for rs in rows for r in rs for k in ("gold", "predicted")})
    index = {label: i for i, label in enumerate(names)}
    return [(np.array([index[r["gold"]] for r in rs]), np.array([index[r["predicted"]] for r in rs])) for rs in rows]


def curve(rec: dict) -> list[tuple[float, float, float | None]]:
    """(cumulative training seconds, dev score, test score) at every end-task evaluation of a run, in order: Eq. 1
    stages and earlier end-task stages add their seconds; time spent scoring test for the curve is left out."""
    field = metric_field(rec["headline"]["metric"])
    points, offset = [], 0.0
    for stage in rec["stages"]:
        for h in stage.get("history", []):
            test = h.get("test", {}).get(field)
            points.append((offset + h["seconds"] - h.get("analysis_seconds", 0.0), h["dev"][field], test))
        last = (stage.get("history") or [{}])[-1]  # the stage's seconds include its test scoring
        offset += stage.get("seconds", 0.0) - last.get("analysis_seconds", 0.0)
    return points


def pretrain_seconds(rec: dict) -> float:
    return sum(s.get("seconds", 0.0) for s in rec["stages"] if s["stage"].startswith("pretrain"))


def time_to_reach(rec: dict, target: float) -> float | None:
    """Training seconds until the first evaluation whose dev score is at least `target`; None if never."""
    return next((t for t, dev, _ in curve(rec) if dev >= target - 1e-12), None)


def stopped_early(stage: dict, field: str, patience: int | None) -> bool:
    """Whether early stopping ended a stage: `patience` evaluations came after the first that scored the best dev
    score the stage recorded (best_dev), as tartan.train counts them."""
    devs = [e["dev"][field] for e in stage.get("history", [])]
    best = stage.get("best_dev")
    return patience is not None and best in devs and len(devs) - 1 - devs.index(best) >= patience


def checks(rec: dict) -> list[str]:
    """Protocol validity: an end-task stage that stopped at its cap (rather than by early stopping; a stage whose
    early stop fell on its last step is not counted)."""
    issues = []
    cfg = rec["config"]["train"]
    final = cfg.get("final_finetune") or {}
    limits = {"finetune": cfg, "mt": cfg, "meta": cfg, "final_finetune": final}
    field = metric_field(rec["headline"]["metric"])
    for stage in rec["stages"]:
        limit = limits.get(stage["stage"]) or {}
        cap = limit.get("max_steps")
        if cap and stage["steps"] >= cap and not stopped_early(stage, field, limit.get("patience")):
            issues.append(f"{stage['stage']} stopped at its cap ({cap} steps)")
    return issues


def detectable_difference(a, b, z_alpha: float = Z_ALPHA) -> float:
    """The smallest difference of means that seeds a and b could have detected (one-sided alpha 0.05, power 0.8,
    normal approximation): (z_0.95 + z_0.80) * pooled seed std * sqrt(1/n_a + 1/n_b), which is the protocol's 1.57
    pooled stds at 5 v 5 seeds and shrinks with more seeds (1.11 at the paper's 10 v 10). NaN under 2 seeds a side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((z_alpha + Z_POWER) * pooled * np.sqrt(1 / len(a) + 1 / len(b)))


def verdict(p: float, diff_ci, micro_d: float, nll_d: float, detectable: float, alpha: float = 0.05) -> str:
    """The protocol's decision rule at one-sided `alpha`; `detectable` is detectable_difference of the two columns.
    At a stricter look (alpha < NOMINAL) a p between them, the interval above 0, is said to pass a single test at the
    paper's level."""
    if p < alpha and diff_ci[0] > 0:
        return "shown"
    if diff_ci[1] < 0 and micro_d < 0 and nll_d > 0:
        return "refuted at this scale"
    near = (f"p in [{alpha}, {NOMINAL}): a single test at the paper's {NOMINAL} would have passed, this design's "
            f"threshold did not; " if alpha <= p < NOMINAL and diff_ci[0] > 0 else "")
    return (f"inconclusive ({near}smallest detectable difference {detectable:.2f} points; 90% interval width "
            f"{diff_ci[1] - diff_ci[0]:.2f})")


def look_of(seeds, second: bool = True) -> tuple | None:
    """The protocol's look at these seeds (0-4: PROTOCOL.md's, 0-9: AMENDMENT.md's second, where the task has one),
    else None: any other set of seeds (5-9 alone, 0-7) is a look the design never registered, and gets no verdict."""
    s = sorted(seeds)
    return LOOKS.get(len(s)) if s == list(range(len(s))) and (second or len(s) == 5) else None


def rule_table(columns: dict, baseline: str, planned: dict, design: list, preds: dict,
               second: bool = True) -> list[str]:
    """The decision rule's table (one row per column) at the look of the design's seeds; preds: path -> (gold, pred);
    second: whether the task has a second look."""
    look = look_of(design, second)
    alpha, z_alpha, n_perm, _ = look or LOOKS[5]
    seeds = {label: [rec["key"]["seed"] for _, rec in runs] for label, runs in columns.items()}
    field = metric_field(columns[baseline][0][1]["headline"]["metric"])
    main = {label: np.array([100 * rec["test"][field] for _, rec in runs]) for label, runs in columns.items()}
    micro = {label: np.array([100 * rec["test"]["micro_f1"] for _, rec in runs]) for label, runs in columns.items()}
    nll = {label: np.array([rec["test"]["loss"] for _, rec in runs]) for label, runs in columns.items()}
    boot = bootstrap({label: [preds[path] for path, _ in runs] for label, runs in columns.items()}, baseline,
                     metric=field)
    lines = [f"| method | seeds | test {field} | 90% interval | d vs {baseline} [90% interval] | p unpaired | p paired "
             f"| micro-F1 | test NLL | verdict |", "|" + "---|" * 10]
    for label, runs in columns.items():
        x, b = main[label], main[baseline]
        p = compare(x, b, *([n_perm] if n_perm else []))["p_greater"] if label != baseline else None
        row = [label, ",".join(map(str, seeds[label])), f"{x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0:.2f}",
               "[{:.2f}, {:.2f}]".format(*boot[label]["score"])]
        if label == baseline:
            row += ["—", "—", "—"]
        else:
            common_seeds = [s for s in seeds[label] if s in seeds[baseline]]
            pa = [x[seeds[label].index(s)] for s in common_seeds]
            pb = [b[seeds[baseline].index(s)] for s in common_seeds]
            row += [f"{x.mean() - b.mean():+.2f} [{boot[label]['diff'][0]:+.2f}, {boot[label]['diff'][1]:+.2f}]",
                    f"{p:.6f}" if n_perm else f"{p:.3f}",  # exact: 6 digits tell a p from the threshold
                    f"{paired_p(pa, pb):.3f}" if common_seeds else "—"]
        row += [f"{micro[label].mean():.2f}", f"{nll[label].mean():.3f}"]
        if label == baseline or label not in ("MT-TARTAN", "META-TARTAN"):
            row.append("—")
        elif look is None:
            row.append(f"no verdict (seeds {seeds_str(design)}: the protocol's looks are seeds 0-4"
                       + (", then 0-9)" if second else " for this task)"))
        elif len(x) < planned[label] or len(b) < planned[baseline]:  # the design's seeds are not all in
            row.append(f"no verdict yet ({len(x)} v {len(b)} seeds of the {planned[label]} v {planned[baseline]} "
                       f"planned)")
        else:
            row.append(verdict(p, boot[label]["diff"],
                               micro[label].mean() - micro[baseline].mean(), nll[label].mean() - nll[baseline].mean(),
                               detectable_difference(x, b, z_alpha), alpha))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def sweep_report(title: str, columns: dict, baseline: str, png: str | None = None, planned: dict | None = None,
                 design: list | None = None, second_look: bool = True) -> str:
    """The protocol's tables for one task. columns: label -> list of (result path, record), one per seed; planned:
    label -> the number of seeds the design has (default: as many as there are), every column the design has; design:
    its seeds (default: the baseline's). The rule gives a verdict only at a registered look (look_of), once both
    columns have all their planned seeds; at the second look, the first look's table follows, as it was reported."""
    planned = planned or {label: len(runs) for label, runs in columns.items()}
    design = sorted(design if design is not None else (rec["key"]["seed"] for _, rec in columns[baseline]))
    alpha, z_alpha, n_perm, overall = look_of(design, second_look) or LOOKS[5]
    field = metric_field(columns[baseline][0][1]["headline"]["metric"])
    paths = [path for runs in columns.values() for path, _ in runs]
    preds = dict(zip(paths, read_predictions(paths)))
    for path, rec in [run for runs in columns.values() for run in runs]:
        mine = tartan.f1_scores(*preds[path])[field]
        if abs(mine - rec["test"][field]) > 1e-6:  # the interval and d must describe the same predictions
            raise ValueError(f"{predictions_path(path)}: its predictions give test {field} {mine:.6f}, the result "
                             f"file {rec['test'][field]:.6f}")
    base_dev = {rec["key"]["seed"]: rec["headline"]["dev"] for _, rec in columns[baseline]}
    second = f" look 2 (AMENDMENT.md: p < {alpha}, overall one-sided error {overall})" if n_perm else ""
    lines = [f"#### {title}: the protocol's analysis (experiments/results/cpu-es/PROTOCOL.md){second}", ""]
    lines += rule_table(columns, baseline, planned, design, preds, second_look)
    if n_perm:  # AMENDMENT.md 5: the first look's verdict stays beside the second's
        first = {label: [run for run in runs if run[1]["key"]["seed"] < 5] for label, runs in columns.items()}
        first = {label: runs for label, runs in first.items() if runs}
        if first.get(baseline):
            lines += ["", "Look 1, as reported before seeds 5-9 existed (seeds 0-4, p < 0.05):", ""]
            lines += rule_table(first, baseline, {label: 5 for label in planned}, list(range(5)), preds)
    absent = [label for label in planned if label not in columns]
    lines += ([""] + [f"Not run yet: {', '.join(absent)}."] if absent else []) + [
              "", f"Intervals: bootstrap, {N_BOOTSTRAP} replicates, {LEVEL:.0%} percentile interval; each replicate "
              f"draws the test rows with replacement once, shared by every run, and within each column the seeds with "
              f"replacement. p unpaired: the tables' one-sided permutation test; p paired: one-sided, every sign flip "
              f"of the per-seed differences (seeds present in both columns; the same seed gives every arm the same "
              f"end-task data order). Smallest detectable difference: (z_0.95 + z_0.80) x pooled seed std x "
              f"sqrt(1/n_a + 1/n_b), 1.57 pooled stds at 5 v 5 seeds."
              + (f" This is the second look (AMENDMENT.md; overall one-sided error {overall} over both looks): shown "
                 f"needs p < {alpha}, p is exact over all {n_perm} splits, and z_{1 - alpha:.3f} = {z_alpha} "
                 f"replaces z_0.95." if n_perm else ""), "",
              f"| method | wall-clock min/run | CPU min/run | steps (end-task stages) | final fine-tune kept | "
              f"minutes to reach {baseline}'s dev score (same seed) | stopped at a cap |", "|" + "---|" * 7]
    for label, runs in columns.items():
        recs = [rec for _, rec in runs]
        wall = np.mean([r["wall_seconds"] for r in recs]) / 60
        cpu = np.mean([r["cpu_seconds"] for r in recs]) / 60
        steps = "; ".join(",".join(f"{s['stage']} {s['steps']}" for s in r["stages"]) for r in recs[:1])
        steps += " (seed " + str(recs[0]["key"]["seed"]) + ")" + (" ..." if len(recs) > 1 else "")
        kept = {r["key"]["seed"]: s["kept"] for r in recs for s in r["stages"] if "kept" in s}  # per seed
        reach = [time_to_reach(r, base_dev[r["key"]["seed"]]) for r in recs if r["key"]["seed"] in base_dev]
        got = [t for t in reach if t is not None]
        capped = [f"seed {r['key']['seed']}: {c}" for r in recs for c in checks(r)]
        lines.append(f"| {label} | {wall:.1f} | {cpu:.1f} | {steps} | "
                     + (f"{sum(kept.values())} of {len(kept)} (seeds kept: "
                        f"{','.join(str(k) for k, v in kept.items() if v) or 'none'})" if kept else "—") + " | "
                     + ((f"{np.mean(got) / 60:.1f}" if got else "never") + f" ({len(got)} of {len(reach)} seeds "
                        f"reach it)" if reach else "—")
                     + " | " + ("; ".join(capped) or "none") + " |")
    mt_steps = [s["steps"] for label in ("MT-TARTAN",) for _, r in columns.get(label, []) for s in r["stages"]
                if s["stage"] == "mt"]
    pre_steps = [s["steps"] for _, r in columns.get(baseline, []) for s in r["stages"] if s["stage"].startswith("pre")]
    if mt_steps and pre_steps:
        lines += ["", f"TAPT's Eq. 1 stage: {min(pre_steps)} MLM steps; MT runs: at most {max(mt_steps)} steps "
                  + ("(TAPT saw at least as many MLM batches)" if min(pre_steps) >= max(mt_steps) else
                     "(**fewer than an MT run: the protocol's condition fails**)") + "."]
    if png:
        try:
            figure(title, columns, baseline, png)
            lines += ["", f"Figure: {os.path.basename(png)} (dev and test score against training wall-clock)."]
        except ImportError:
            lines += ["", "(no figure: it needs matplotlib, pip install matplotlib)"]
        except OSError as e:  # a folder that takes no file (read-only results): the tables still print
            lines += ["", f"(figure not written: {e})"]
    return "\n".join(lines) + "\n"


def figure(title: str, columns: dict, baseline: str, png: str) -> None:
    """Dev and test score against cumulative training wall-clock, mean over seeds (each seed holds its last
    evaluation after it stops), one line per method; a dotted line where the baseline's pre-training ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, runs in columns.items():
        curves = [curve(rec) for _, rec in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        grid = np.linspace(min(c[0][0] for c in curves), max(c[-1][0] for c in curves), 200)
        for ax, k in zip(axes, (1, 2)):
            rows = []
            for c in curves:
                t = np.array([p[0] for p in c])
                v = np.array([np.nan if p[k] is None else p[k] for p in c])
                idx = np.searchsorted(t, grid, side="right") - 1
                rows.append(np.where(idx >= 0, v[np.clip(idx, 0, None)], np.nan))
            ax.plot(grid / 60, 100 * np.nanmean(rows, 0), label=label)
    pre = [pretrain_seconds(rec) for _, rec in columns.get(baseline, [])]
    for ax, name in zip(axes, ("dev", "test (recorded for analysis only)")):
        if pre and np.mean(pre) > 0:
            ax.axvline(np.mean(pre) / 60, ls=":", color="gray", label=f"{baseline}: end of Eq. 1")
        ax.set_xlabel("training wall-clock (minutes, one CPU thread)")
        ax.set_ylabel(f"{name} score x100")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)
