"""Tables and figures, from hand-made results."""
import os
import sys
import tempfile

import numpy as np
import pytest
import torch

import reproduce
import tartan
from experiments import common, paper, report, runs, tables



# ---------------------------------------------------------------------------------------------------------------------
# tables: means, the baseline of Table 8, and the seed-count warning, on hand-made results


def fake_results(table, scores):
    """{(task, column): per-seed scores} -> (cells, results) as run_table builds them."""
    cells, results = {}, {}
    for (task, label), xs in scores.items():
        col = next(c for c in paper.TABLES[table].columns if c.label == label)
        cell = [runs.make_run(task, col.mode, col.aux, s, "10x") for s in range(len(xs))]
        cells[(task, label)] = cell
        results.update({r: {"headline": {"test": x / 100}} for r, x in zip(cell, xs)})
    return cells, results


def test_table_cells_p_values_and_warnings():
    paper_settings = ("roberta-base", runs.Budget())
    rng = np.random.default_rng(0)
    scores = {("scierc", "DAPT"): rng.normal(76, 1, 10), ("scierc", "DAPT+TAPT"): rng.normal(78, 1, 10),
              ("scierc", "MT-TARTAN"): rng.normal(81, 1, 10), ("scierc", "META-TARTAN"): rng.normal(81.5, 1, 10)}
    cells, results = fake_results(2, scores)
    text = report.render_table(2, cells, results, list(range(10)), *paper_settings, "10x")
    mean, std = np.mean(scores["scierc", "MT-TARTAN"]), np.std(scores["scierc", "MT-TARTAN"], ddof=1)
    test = tartan.permutation_test(scores["scierc", "MT-TARTAN"], scores["scierc", "DAPT+TAPT"], 10_000, 0)
    assert f"| {mean:.2f} ± {std:.2f} [81.02 ± 1.24] | {test['p_greater']:.3f} (two-sided {test['p_two_sided']:.3f}) " \
           f"[0.000] |" in text
    assert "baseline = DAPT+TAPT (the higher mean of DAPT and DAPT+TAPT)" in text  # Table 8
    assert "Warning" not in text  # 10 vs 10 seeds can reach p < 0.05

    cells, results = fake_results(4, {("aclarc", "MT"): [69.0, 70.0, 71.0], ("aclarc", "META"): [72.0, 73.0, 74.0]})
    text = report.render_table(4, cells, results, [0, 1, 2], *paper_settings, "10x")
    assert "| CS | ACL-ARC | 70.00 ± 1.00 [69.27 ± 0.96] | 73.00 ± 1.00 [71.19 ± 4.88] | 0.050 (two-sided 0.100) |" in text
    assert "with 3 and 3 seeds the smallest one-sided p-value this test can give is 0.050" in text
    assert "that needs at least 4 seeds a side" in text
    assert "more than one version of tartan.py" not in text  # results without versions: nothing to say
    for run, sha in zip(cells["aclarc", "META"], ("a", "a", "b")):  # one run made by other code
        results[run]["versions"] = {"tartan.py_sha256": sha}
    assert "- Result files made by more than one version of tartan.py are pooled in: ACL-ARC META (2). One arm " \
        "holds only where" in report.render_table(4, cells, results, [0, 1, 2], *paper_settings, "10x")
    # a cell of one seed has no spread: it said "± 0.00", as if the seeds had agreed
    assert report.score_cell([57.09], 3)[0] == "57.09 (n=1)" and common.fmt((57.09, 0.0)) == "57.09 ± 0.00"


@pytest.mark.parametrize("dapt, best", [(70.0, "DAPT+TAPT"), (80.0, "DAPT")])
def test_the_protocol_analysis_of_table_8_tests_against_the_better_baseline(tmp_path, monkeypatch, dapt, best):
    cells, results = fake_results(2, {("scierc", "DAPT"): [dapt, dapt + 1], ("scierc", "DAPT+TAPT"): [75.0, 76.0],
                                      ("scierc", "MT-TARTAN"): [74.0, 75.0]})
    for rec in results.values():
        rec["config"] = {"train": {"eval_test": True}}  # runs of a budget that scores test at every evaluation
    seen = []
    monkeypatch.setattr(report.analysis, "sweep_report",
                        lambda title, columns, baseline, png, planned, design, second: seen.append(
                            (baseline, sorted(columns))) or "")
    report.protocol_analysis(2, cells, results, str(tmp_path))
    assert seen == [(best, ["DAPT", "DAPT+TAPT", "MT-TARTAN"])]  # the column Table 8's p-values use


def test_a_column_worse_than_its_baseline_gets_p_near_one_and_the_footer_names_the_test():
    cells, results = fake_results(4, {("aclarc", "MT"): [72.0, 73.0, 74.0, 75.0],
                                      ("aclarc", "META"): [60.0, 61.0, 62.0, 63.0]})
    text = report.render_table(4, cells, results, [0, 1, 2, 3], "roberta-base", runs.Budget(), "10x")
    assert "| 1.000 (two-sided 0.029) |" in text  # one-sided, H1: META beats MT; two-sided would call it significant
    assert "p: one-sided unpaired permutation test of the per-seed scores (H1: the column scores higher than the " \
           "baseline column" in text
    assert "Warning" not in text  # 4 v 4 seeds: the one-sided test can reach 1/70


def test_meta_cells_say_what_meta_learned_per_task():
    cells, results = fake_results(4, {("aclarc", "MT"): [70.0, 71.0], ("aclarc", "META"): [72.0, 73.0]})
    key = lambda seed: "alpha" if seed else "weights"  # noqa: E731
    for seed, run in enumerate(cells["aclarc", "META"]):  # two evaluations per run; the end-task loses weight
        results[run]["history"] = [
            # alpha's key: "weights" in files written before issue 18 (seed 0 here), "alpha" since
            {"step": 10, key(seed): {"aclarc": 0.5, "tapt": 0.5}, "cosines": {"aclarc": -0.1, "tapt": 0.2 + seed}},
            {"step": 20, key(seed): {"aclarc": 0.4 - 0.1 * seed, "tapt": 0.6 + 0.1 * seed},
             "cosines": {"aclarc": -0.3, "tapt": 0.4 + seed}, "meta_head_fit_loss": [1.8, 1.0 + seed],
             "meta_val_loss": 1.2, "dev": {"loss": 0.9 - seed}}]
    text = report.render_table(4, cells, results, [0, 1], "roberta-base", runs.Budget(), "10x")
    assert ("- ACL-ARC META (2 run(s)), final weight and mean cosine with the meta gradient, mean [min, max] over "
            "runs: aclarc (end-task) weight 0.350 [0.300, 0.400], cosine -0.200 [-0.200, -0.200]; tapt weight 0.650 "
            "[0.600, 0.700], cosine 0.800 [0.300, 1.300]; the meta head's loss on B*_val 1.200 (phi*; phi' in the "
            "Eq. 6 ablation), against the end-task head's dev loss 0.400; phi*'s training loss, first -> last of its "
            "fitting steps, 1.800 -> 1.500 (2 run(s);") in text
    assert text.count("final weight and mean cosine") == 1  # MT has no learned weights


def test_meta_weights_figure_and_the_largest_per_step_change_of_alpha(tmp_path, monkeypatch):
    cells, results = fake_results(1, {("scierc", "MT-TARTAN"): [74.0, 75.0], ("scierc", "META-TARTAN"): [75.0, 76.0]})
    # the end-task's alpha per step, two auxiliary tasks sharing the rest: the largest change is seed 1's first step,
    # the end-task's fall from Algorithm 1's 1/K = 1/3 to 0.28 (its auxiliary tasks rise 0.027); smaller are its fall
    # 0.28 -> 0.24 (0.04) and seed 0's largest rise (0.015); the jump between the two runs' traces is no step
    ends = [[0.34, 0.345, 0.355, 0.37, 0.385, 0.39], [0.28, 0.24, 0.25, 0.26]]
    for run, end in zip(cells["scierc", "META-TARTAN"], ends):
        alpha = {"scierc": end, "tapt": [(1 - a) / 2 for a in end], "dapt": [(1 - a) / 2 for a in end]}
        cos = {"scierc": [0.1, -0.2, 0.3, 0.1, 0.0, 0.2][:len(end)], "tapt": [0.0] * len(end),
               "dapt": [0.05] * len(end)}
        results[run]["history"] = [{"step": len(end), "alpha": {k: v[-1] for k, v in alpha.items()},
                                    "cosines": {k: float(np.mean(v)) for k, v in cos.items()}}]
        # the trace is the META stage's (the final fine-tune's has the end-task alone)
        results[run]["stages"] = [{"stage": "meta", "trace": {"alpha": alpha, "cosines": cos}},
                                  {"stage": "final_finetune", "trace": {"alpha": {"scierc": [1.0, 1.0]}}}]
    line = ("Largest per-step change of a task weight: 0.0533 (max over steps, tasks and the 2 run(s) of "
            "|alpha_t - alpha_(t-1)|, from the per-step traces).")
    text = report.render_table(1, cells, results, [0, 1], "roberta-base", runs.Budget(), "10x")
    assert text.count(line) == 1  # the META cell's line, not MT's
    assert line in report.meta_report("scierc", {"meta": cells["scierc", "META-TARTAN"]}, results)
    older = dict(results[cells["scierc", "META-TARTAN"][0]], stages=[])  # a result file from before the traces
    mixed = {**results, cells["scierc", "META-TARTAN"][0]: older}
    assert "Largest per-step change of a task weight: 0.0533 (max over steps, tasks and the 1 run(s) of its 2 that " \
        "kept them of |alpha_t" in report.render_table(1, cells, mixed, [0, 1], "roberta-base", runs.Budget(), "10x")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # as if not installed: the table says so, and draws nothing
        assert "(no figure of META-TARTAN's task weights: it needs matplotlib" in \
            report.weights_figures(1, cells, results, str(tmp_path))
    assert os.listdir(tmp_path) == []
    plt = pytest.importorskip("matplotlib.pyplot")

    def read_only(*args, **kwargs):  # results on a read-only mount: said, the figure closed, the table goes on
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        assert "(figure of META-TARTAN's task weights not written: [Errno 13] Permission denied: " in \
            report.weights_figures(1, cells, results, str(tmp_path))
    assert not plt.get_fignums() and os.listdir(tmp_path) == []
    text = report.weights_figures(1, cells, results, str(tmp_path))
    png = tmp_path / "figure_table1_scierc_weights.png"
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    assert text.strip().startswith("Figure: figure_table1_scierc_weights.png (META-TARTAN's task weights alpha")
    assert os.listdir(tmp_path) == [png.name]  # MT records no weights to draw


def test_one_table_formatter_for_every_table():
    lines = common.markdown_table(["a", "b", "c"], [["1", "", "x"], {"c": "z", "a": "22"}])
    assert lines == ["| a | b | c |", "|---|---|---|", "| 1 | | x |", "| 22 | | z |"]  # a dict row: by column name
    padded = common.markdown_table(["seed", "w"], [[0, "0.5"], ["mean", "0.25"]], pad=True)
    assert padded == ["| seed | w    |", "|------|------|", "| 0    | 0.5  |", "| mean | 0.25 |"]


def test_the_smallest_p_is_the_p_of_the_most_extreme_split():
    exact = common.compare([1.0] * 3, [0.0] * 3)  # C(6, 3) = 20 splits, enumerated
    assert exact["exact"] and exact["p_greater"] == exact["min_p_greater"] == 1 / 20
    sampled = common.compare(range(100, 120), range(20), n_permutations=50)  # 20 v 20: 50 random splits
    assert not sampled["exact"] and sampled["p_greater"] == sampled["min_p_greater"] == 1 / 51  # + the observed one
    assert common.min_seeds(0.05) == 4 and common.min_seeds(0.01) == 5  # 1/C(8,4) = 0.014, 1/C(10,5) = 0.004


# ---------------------------------------------------------------------------------------------------------------------
# figures from stored histories


def test_figure_3_is_drawn_from_stored_histories(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "out")
    ws = runs.Workspace(runs.Settings(model="roberta-base", data_dir=str(tmp_path / "data"), out=out),
                        torch.device("cpu"))
    for (task, label), cell in tables.figure_runs(3, None, [0, 1]).items():
        for r in cell:
            w = [0.5 + 0.01 * i * (1 if r.mode == "meta" else -1) for i in range(5)]
            hist = [{"step": 10 * (i + 1), "weights": {"aclarc": w[i], "dapt10x": 1 - w[i]}} for i in range(5)]
            common.atomic_write_json(r.path(out), {"complete": True, "key": r.key, "config": ws.config(r),
                                                      "headline": {"test": 0.5}, "history": hist})
    assert reproduce.main(["--figure", "3", "--out", out, "--report-only", "--seeds", "0-1"]) == 0
    png = os.path.join(out, "figure3.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    steps, mean, per_seed = report.weight_curves([[{"step": 1, "weights": {"a": 0.2}}, {"step": 2, "weights":
                                                     {"a": 0.4}}], [{"step": 1, "alpha": {"a": 0.4}}]])
    assert steps == [1] and mean["a"] == pytest.approx([0.3]) and per_seed["a"][0] == ([1, 2], [0.2, 0.4])


@pytest.mark.parametrize("command", [["--table", "1"], ["--figure", "3"]])
def test_report_only_with_no_result_file_is_an_error_not_an_empty_table(tmp_path, capsys, command):
    out = str(tmp_path / "a-mistyped-out")
    assert reproduce.main([*command, "--report-only", "--out", out, "--device", "cpu",
                           "--data-dir", str(tmp_path / "no-data")]) == 1
    err = capsys.readouterr().err
    assert "error: --report-only: none of the" in err and out in err and "Traceback" not in err
    assert not os.path.exists(out)  # no table or figure of empty cells written
