"""The protocol's analysis (experiments/analysis.py) and META's diagnostics (experiments/diagnose.py), on result files
made here."""
import itertools
import json
import os
import tempfile

import numpy as np
import pytest

import reproduce
import tartan
from experiments import analysis, diagnose, report, tables
from experiments.common import atomic_write_json
from experiments.keep import predictions_path


def test_paired_p_against_enumeration():
    assert analysis.paired_p([2, 3, 4], [1, 1, 1]) == pytest.approx(1 / 8)  # only the observed signs are as large
    a, b = [0.3, 0.1, -0.2, 0.5], [0.0, 0.2, 0.1, 0.1]
    d = np.subtract(a, b)
    brute = np.mean([np.mean(np.multiply(s, d)) >= d.mean() - 1e-12 for s in itertools.product((1, -1), repeat=4)])
    assert analysis.paired_p(a, b) == pytest.approx(brute)
    assert analysis.paired_p(b, a) > 0.5


def test_weighted_macro_f1_is_f1_scores_at_unit_weights_and_counts_repeated_rows():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 4, 50), rng.integers(0, 5, 50)
    counts = analysis._counts(gold, pred, 5)
    assert analysis.macro_f1_weighted(counts, np.ones((1, 50)))[0] == pytest.approx(
        tartan.f1_scores(gold, pred)["macro_f1"])
    w = rng.integers(0, 3, (1, 50))
    rows = np.repeat(np.arange(50), w[0])  # a resample written out row by row
    assert analysis.macro_f1_weighted(counts, w.astype(float))[0] == pytest.approx(
        tartan.f1_scores(gold[rows], pred[rows])["macro_f1"])


def test_weighted_micro_f1_is_accuracy_and_the_bootstrap_reads_the_tasks_metric():
    rng = np.random.default_rng(2)
    gold, pred = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    w = rng.integers(0, 3, (1, 40))
    rows = np.repeat(np.arange(40), w[0])
    assert analysis.micro_f1_weighted(analysis._counts(gold, pred, 3), w.astype(float))[0] == pytest.approx(
        tartan.f1_scores(gold[rows], pred[rows])["micro_f1"])
    # the arm predicts the majority class: 10 points better on micro-F1 (80 v 70), far worse on macro-F1
    gold = np.tile([0] * 8 + [1, 2], 30)
    arms = {"base": [(gold, np.tile([0] * 5 + [1] * 3 + [1, 2], 30))] * 3, "arm": [(gold, np.zeros_like(gold))] * 3}
    micro = analysis.bootstrap(arms, "base", metric="micro_f1")["arm"]["diff"]
    macro = analysis.bootstrap(arms, "base")["arm"]["diff"]
    assert 0 < micro[0] < 10 < micro[1] < 20 and macro[1] < -30


def test_bootstrap_intervals_cover_no_difference_and_separate_a_real_one():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 3, 300)
    noisy = lambda acc: [(gold, np.where(rng.random(300) < acc, gold, rng.integers(0, 3, 300))) for _ in range(4)]  # noqa
    same = analysis.bootstrap({"base": noisy(0.6), "other": noisy(0.6)}, "base")
    lo, hi = same["other"]["diff"]
    assert lo < 0 < hi
    better = analysis.bootstrap({"base": noisy(0.5), "other": noisy(0.9)}, "base")
    assert better["other"]["diff"][0] > 10 and better["base"]["score"][1] < better["other"]["score"][0]


def test_verdicts_follow_the_pre_registered_rule():
    assert analysis.verdict(0.01, (0.5, 3.0), 1.0, -0.1, 1.0) == "shown"
    assert analysis.verdict(0.01, (-0.5, 3.0), 1.0, -0.1, 1.0).startswith("inconclusive")  # interval has 0
    assert analysis.verdict(0.08, (0.5, 3.0), 1.0, -0.1, 1.0).startswith("inconclusive")  # p too large
    assert analysis.verdict(0.99, (-5.0, -1.0), -1.0, 0.2, 1.0) == "refuted at this scale"
    v = analysis.verdict(0.99, (-5.0, -1.0), 1.0, 0.2, 3.14)  # micro-F1 disagrees: not refuted
    assert v.startswith("inconclusive") and "3.14 points" in v


def test_the_second_look_uses_the_amendments_threshold_and_the_exact_p():
    """AMENDMENT.md: at 10 v 10 seeds (the second look) "shown" needs p < 0.043, z_alpha 1.717 for the detectable
    difference, and the p exact over all C(20, 10) splits; the 5-seed look keeps PROTOCOL.md's 0.05."""
    assert analysis.LOOKS[5] == (0.05, analysis.Z_ALPHA, None, 0.05)
    assert analysis.LOOKS[10] == (0.043, 1.717, 184756, 0.075)
    assert analysis.look_of(range(5)) == analysis.LOOKS[5] and analysis.look_of([9, *range(9)]) == analysis.LOOKS[10]
    assert [analysis.look_of(s) for s in (range(5, 10), range(8), range(3), [0, 1, 2, 3, 5])] == [None] * 4
    assert analysis.look_of(range(10), second=False) is None and analysis.look_of(range(5), False) == analysis.LOOKS[5]
    assert analysis.verdict(0.045, (0.5, 3.0), 1.0, -0.1, 1.0) == "shown"  # the first look's 0.05
    v = analysis.verdict(0.045, (0.5, 3.0), 1.0, -0.1, 1.0, alpha=0.043)
    assert v.startswith("inconclusive (p in [0.043, 0.05): a single test at the paper's 0.05 would have passed, this "
                        "design's threshold did not; smallest detectable difference 1.00 points")
    assert "would have passed" not in analysis.verdict(0.05, (0.5, 3.0), 1.0, -0.1, 1.0, alpha=0.043)
    assert "would have passed" not in analysis.verdict(0.045, (-0.5, 3.0), 1.0, -0.1, 1.0, alpha=0.043)  # 0 in it
    a = np.arange(10.0)
    assert analysis.detectable_difference(a, a + 1, 1.717) == pytest.approx(
        (1.717 + 0.8416) * np.sqrt(a.var(ddof=1)) * np.sqrt(2 / 10), rel=1e-6)
    exact = analysis.compare(a + 0.5, a, 184756)
    assert exact["exact"] and exact["n_permutations"] == 184756


def test_the_detectable_difference_depends_on_the_number_of_seeds():
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([3.0, 4, 5, 6, 7])  # both with std sqrt(2.5)
    assert analysis.detectable_difference(a, b) == pytest.approx(1.57 * np.sqrt(2.5), rel=2e-3)  # the protocol's 5 v 5
    ten = np.concatenate([a, a])  # same std (near enough: ddof) with twice the seeds: a smaller effect is detectable
    assert analysis.detectable_difference(ten, ten + 2) == pytest.approx(
        2.4865 * np.sqrt(ten.var(ddof=1)) * np.sqrt(2 / 10), rel=1e-4)
    uneven = analysis.detectable_difference([0.0, 2.0], [0.0, 0.0, 0.0, 0.0])  # pooled over 4 degrees of freedom
    assert uneven == pytest.approx(2.4865 * np.sqrt(2.0 / 4) * np.sqrt(1 / 2 + 1 / 4), rel=1e-4)
    assert np.isnan(analysis.detectable_difference([1.0], [1.0, 2.0]))


def _record(task, mode, seed, dev, test, stages):
    return {"complete": True, "key": {"task": task, "mode": mode, "aux": "tapt" if mode != "finetune" else "none",
                                      "seed": seed},
            "config": {"train": {"max_steps": 1000, "eval_test": True, "final_finetune": {"max_steps": 500}}},
            "headline": {"metric": "macro_f1", "dev": dev, "test": test},
            "test": {"macro_f1": test, "micro_f1": test + 0.05, "loss": 1.0 - test},
            "stages": stages, "wall_seconds": 600.0, "cpu_seconds": 590.0}


def _stage(name, steps, devs, seconds, kept=None):
    hist = [{"step": 50 * (i + 1), "dev": {"macro_f1": d, "micro_f1": d}, "test": {"macro_f1": d, "micro_f1": d},
             "seconds": seconds * (i + 1) / len(devs) + 30.0 * (i + 1), "analysis_seconds": 30.0 * (i + 1)}
            for i, d in enumerate(devs)]  # each evaluation also spent 30 s scoring test, which is not training time
    return {"stage": name, "steps": steps, "history": hist, "best_dev": max(devs),
            "seconds": seconds + len(devs) * 30.0, **({} if kept is None else {"kept": kept})}


def test_the_analysis_of_an_accuracy_task_bootstraps_accuracy(tmp_path):
    """A task scored by accuracy (micro-F1: CHEMPROT) gets its interval of d in that metric: here the arm predicts
    the majority class, 10 points up on accuracy and far down on macro-F1."""
    gold = np.tile([0] * 8 + [1, 2], 30)
    preds = {"TAPT": np.tile([0] * 5 + [1] * 3 + [1, 2], 30), "MT-TARTAN": np.zeros_like(gold)}
    columns = {}
    for label, pred in preds.items():
        columns[label] = []
        for seed in range(3):
            path = str(tmp_path / f"{label}{seed}.json")
            with open(predictions_path(path), "w") as f:
                f.writelines(json.dumps({"gold": str(g), "predicted": str(p)}) + "\n" for g, p in zip(gold, pred))
            rec = _record("chemprot", "mt" if label == "MT-TARTAN" else "tapt", seed, 0.5, 0.5,
                          [_stage("finetune", 400, [0.5], 100.0)])
            scores = tartan.f1_scores(gold, pred)
            rec["headline"]["metric"] = "accuracy"
            rec["test"] = {**scores, "loss": 1.0}
            columns[label].append((path, rec))
    row = next(line for line in analysis.sweep_report("CHEMPROT", columns, "TAPT").splitlines()
               if line.startswith("| MT-TARTAN |"))
    d, lo, hi = (float(v) for v in row.split(" | ")[4].replace("[", "").replace("]", "").replace(",", "").split())
    assert d == pytest.approx(10.0) and 0 < lo < d < hi


def test_a_stage_is_capped_only_if_early_stopping_did_not_end_it_at_the_cap():
    rec = _record("scierc", "mt", 0, 0.7, 0.7, [_stage("mt", 1000, [0.5, 0.7, 0.7, 0.6], 100.0)])
    rec["config"]["train"]["patience"] = 2  # two evaluations after the best at the second: early stopping, at 1000
    assert analysis.checks(rec) == []
    rec["config"]["train"]["patience"] = 3  # one evaluation short of early stopping: the cap ended it
    assert analysis.checks(rec) == ["mt stopped at its cap (1000 steps)"]
    rec["stages"][0]["steps"] = 950
    assert analysis.checks(rec) == []


def _fabricated_table(out: str, seeds) -> tuple:
    """Result files and predictions of Table 1's four columns on SCIERC (MT-TARTAN far above TAPT)."""
    cells = tables.table_runs(1, ["scierc"], None, list(seeds), "10x")
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 120)
    labels = ["A", "B", "C"]
    acc = {"RoBERTa": 0.5, "TAPT": 0.6, "MT-TARTAN": 0.9, "META-TARTAN": 0.6}
    results = {}
    for (task, label), run_list in cells.items():
        for r in run_list:
            pred = np.where(rng.random(120) < acc[label], gold, rng.integers(0, 3, 120))
            test = tartan.f1_scores(gold, pred)["macro_f1"]
            if label == "TAPT":
                stages = [{"stage": "pretrain:tapt", "steps": 800, "history": [], "seconds": 300.0},
                          _stage("finetune", 400, [0.4, 0.6, 0.55], 150.0)]
            elif label == "RoBERTa":
                stages = [_stage("finetune", 1000 if r.seed == 2 else 400, [0.3, 0.5], 100.0)]  # seed 2: at the cap
            else:
                mode = "mt" if label == "MT-TARTAN" else "meta"
                stages = [_stage(mode, 600, [0.5, 0.7, 0.65], 300.0), _stage("final_finetune", 100, [0.7], 30.0,
                                                                             kept=r.seed == 0)]
            results[r] = _record(task, r.mode, r.seed, max(h["dev"]["macro_f1"] for s in stages
                                                           for h in s["history"]), test, stages)
            atomic_write_json(r.path(out), results[r])
            with open(predictions_path(r.path(out)), "w") as f:
                for i, (g, p) in enumerate(zip(gold, pred)):
                    f.write(json.dumps({"line": i + 1, "gold": labels[g], "predicted": labels[p]}) + "\n")
    return cells, results, labels


def test_protocol_analysis_of_a_table_from_result_files(tmp_path):
    """Fabricated result files and predictions of Table 1's four columns, 5 seeds (the first look): the printed
    analysis carries the means, the tests, the intervals, the cost, the time to TAPT's dev score, the cap check, and
    draws the figure."""
    out = str(tmp_path / "out")
    cells, results, labels = _fabricated_table(out, range(5))
    text = report.protocol_analysis(1, cells, results, out)
    mt = [results[r]["test"]["macro_f1"] * 100 for r in cells[("scierc", "MT-TARTAN")]]
    tapt = [results[r]["test"]["macro_f1"] * 100 for r in cells[("scierc", "TAPT")]]
    row = next(line for line in text.splitlines() if line.startswith("| MT-TARTAN | 0,1,2,3,4 |"))
    assert f"{np.mean(mt):.2f} ± {np.std(mt, ddof=1):.2f}" in row
    assert f"{np.mean(mt) - np.mean(tapt):+.2f} [" in row and "| 0.004 | 0.031 |" in row  # 5 v 5 minima
    assert row.endswith("| shown |") and "look 2" not in text and "Look 1" not in text
    meta = [results[r]["test"]["macro_f1"] * 100 for r in cells[("scierc", "META-TARTAN")]]
    row = next(line for line in text.splitlines() if line.startswith("| META-TARTAN | 0,1,2,3,4 |"))
    assert row.endswith("| inconclusive (smallest detectable difference "
                        f"{2.4865 * np.sqrt(2 / 5) * np.sqrt((np.var(meta, ddof=1) + np.var(tapt, ddof=1)) / 2):.2f} "
                        f"points; 90% interval width " + row.split("interval width ")[1])
    cost = next(line for line in text.splitlines() if line.startswith("| MT-TARTAN | 10.0 | 9.8 |"))
    roberta = next(line for line in text.splitlines() if line.startswith("| RoBERTa | 10.0 |"))
    assert "| 1 of 5 (seeds kept: 0) |" in cost and "(5 of 5 seeds reach it)" in cost and cost.endswith("| none |")
    # MT reaches TAPT's dev score 0.6 at its second evaluation, after 300 * 2 / 3 = 200 s of training
    assert f"| {200 / 60:.1f} (5 of 5 seeds reach it)" in cost
    assert "| never (0 of 5 seeds reach it) |" in roberta
    assert "seed 2: finetune stopped at its cap (1000 steps)" in roberta
    assert "TAPT's Eq. 1 stage: 800 MLM steps; MT runs: at most 600 steps (TAPT saw at least as many" in text
    png = os.path.join(out, "figure_table1_scierc.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.protocol_analysis(1, cells, {r: {**rec, "config": {"train": {"eval_test": False}}}
                                               for r, rec in results.items()}, out) == ""  # other budgets: nothing
    # seeds still missing: no verdict; a column not run, or a missing baseline, is said
    fewer = {r: rec for r, rec in results.items() if r.mode != "finetune" and not (r.mode == "meta" and r.seed)}
    text = report.protocol_analysis(1, cells, fewer, out)
    meta = next(line for line in text.splitlines() if line.startswith("| META-TARTAN | 0 |"))
    assert meta.endswith("| no verdict yet (1 v 5 seeds of the 5 v 5 planned) |") and "Not run yet: RoBERTa." in text
    assert "| shown |" in text  # MT's 5 v 5 seeds are all in
    text = report.protocol_analysis(1, cells, {r: rec for r, rec in results.items() if r.mode != "tapt"}, out)
    assert "SCIERC: the protocol's analysis waits for its baseline column (TAPT) and one to test against it; " \
           "results so far: RoBERTa 5 of 5, MT-TARTAN 5 of 5, META-TARTAN 5 of 5" in text
    # predictions that are not the scored ones, or not the same test rows, stop the analysis with the file named
    mt0 = predictions_path(cells[("scierc", "MT-TARTAN")][0].path(out))
    rows = open(mt0).read().splitlines()
    open(mt0, "w").write("\n".join(rows[::-1]) + "\n")
    with pytest.raises(ValueError, match="mt__tapt__seed0.predictions.jsonl: its test rows are not those of"):
        report.protocol_analysis(1, cells, results, out)
    first = json.loads(rows[0])
    first["predicted"] = next(x for x in labels if x != first["predicted"])
    open(mt0, "w").write("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    with pytest.raises(ValueError, match="mt__tapt__seed0.predictions.jsonl: its predictions give test macro_f1 "):
        report.protocol_analysis(1, cells, results, out)


def test_the_second_look_prints_the_exact_p_keeps_the_first_look_and_refuses_other_seeds(tmp_path):
    """AMENDMENT.md at 10 v 10 seeds: the exact p over all C(20, 10) splits (six digits, so a p is told from 0.043),
    the first look's table (seeds 0-4) beside it as a 5-seed report gives it, and no verdict at seeds it never
    registered (5-9 alone)."""
    out = str(tmp_path / "out")
    cells, results, _ = _fabricated_table(out, range(10))
    text = report.protocol_analysis(1, cells, results, out)
    assert ("#### SCIERC: the protocol's analysis (experiments/results/cpu-es/PROTOCOL.md) look 2 (AMENDMENT.md: "
            "p < 0.043, overall one-sided error 0.075)") in text
    second, first = text.split("Look 1, as reported before seeds 5-9 existed (seeds 0-4, p < 0.05):")
    meta, tapt = ([100 * results[r]["test"]["macro_f1"] for r in cells[("scierc", label)]]
                  for label in ("META-TARTAN", "TAPT"))
    pooled, observed = np.array(meta + tapt), np.mean(meta) - np.mean(tapt)
    sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(20), 10)])  # every split, by hand
    p = np.mean(sums / 10 - (pooled.sum() - sums) / 10 >= observed - 1e-9)
    row = next(line for line in second.splitlines() if line.startswith("| META-TARTAN | 0,1,2,3,4,5,6,7,8,9 |"))
    assert f"| {p:.6f} |" in row
    assert next(line for line in second.splitlines() if line.startswith("| MT-TARTAN |")).endswith("| shown |")
    five = {key: [r for r in runs if r.seed < 5] for key, runs in cells.items()}
    alone = report.protocol_analysis(1, five, {r: results[r] for runs in five.values() for r in runs}, out)
    rows = [[line for line in t.split("Intervals:")[0].splitlines() if line.startswith("| ")] for t in (first, alone)]
    assert rows[0] == rows[1] and len(rows[0]) == 5  # the header and the four columns
    def read_only(*args, **kwargs):  # results on a read-only mount: the figures are not written, the tables print
        raise PermissionError(13, "Permission denied")
    plt = pytest.importorskip("matplotlib.pyplot")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        text = report.protocol_analysis(1, cells, results, out)
    assert f"(figure not written: [Errno 13] Permission denied: '{out}/figure_table1_scierc.png')" in text
    assert not plt.get_fignums()  # closed although its file could not be written
    assert "Look 1, as reported" in text
    late = {key: [r for r in runs if r.seed >= 5] for key, runs in cells.items()}
    text = report.protocol_analysis(1, late, {r: results[r] for runs in late.values() for r in runs}, out)
    assert text.count("| no verdict (seeds 5-9: the protocol's looks are seeds 0-4, then 0-9) |") == 2
    with pytest.MonkeyPatch.context() as m:  # a task the amendment gives no second look (ACL-ARC: one look at 0-4)
        m.setattr(analysis, "SECOND_LOOK_TASKS", ())
        text = report.protocol_analysis(1, cells, results, out)
    assert text.count("| no verdict (seeds 0-9: the protocol's looks are seeds 0-4 for this task) |") == 2
    assert "look 2" not in text and "Look 1, as reported" not in text


def test_meta_diagnostics_table(tmp_path):
    def meta_record(task, cos_end, norms):
        # alpha under its name since issue 18, and under "weights" (files written before) for one task
        trace = {"weights" if task == "scierc" else "alpha": {task: [0.5, 0.48], "tapt": [0.5, 0.52]},
                 "cosines": {task: [cos_end, cos_end], "tapt": [0.1, 0.3]},
                 "grad_norms": {task: [1.0, 2.0], "tapt": norms}}
        hist = [{"step": 2, "meta_val_loss": 1.5, "dev": {"loss": 1.0}, "meta_head_fit_loss": [2.0, 1.0]}]
        return {"complete": True, "key": {"task": task, "mode": "meta", "aux": "tapt", "seed": 0},
                "stages": [{"stage": "meta", "steps": 2, "trace": trace, "history": hist}]}
    for variant, cos in (("a-paper", -0.2), ("b-release", 0.1)):
        for task in ("aclarc", "scierc"):
            atomic_write_json(str(tmp_path / variant / task / "meta__tapt__seed0.json"),
                              meta_record(task, cos, [3.0, 8.0]))
    rows = diagnose.collect(str(tmp_path))
    assert [(r["variant"], r["task"]) for r in rows] == [("a-paper", "aclarc"), ("a-paper", "scierc"),
                                                         ("b-release", "aclarc"), ("b-release", "scierc")]
    r = rows[0]
    assert (r["cos_end"], r["cos_aux"], r["norm_ratio"], r["ratio"]) == pytest.approx((-0.2, 0.2, 3.5, 1.5))
    assert r["end_alpha"] == 0.48 and r["fit"] == [2.0, 1.0]
    assert reproduce.main(["--diagnostics", str(tmp_path)]) == 0
    text = open(tmp_path / "diagnostics.md").read()
    assert ("| a-paper | aclarc | 2 | -0.2000 | +0.2000 | 3.50 | 1.500 | 1.000 | 1.500 | 2.000 -> 1.000 | 0.4800 |"
            in text)
    assert "a-paper 1.500 (2 task(s)); b-release 1.500 (2 task(s))" in text
