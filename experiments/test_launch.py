"""Tests of experiments/launch.py: shards of a run list, the launchers' environment variables, and shards of one
command run side by side (processes, torchrun) into one --out."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import reproduce
from experiments.conftest import SCRIPT, own_flags, results_in
from experiments.launch import Shard, ShardError, parse_shard, shard_device


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 25])
def test_shards_are_disjoint_and_cover_the_list(n):
    runs = [f"run{i}" for i in range(23)]
    parts = [Shard(k, n).take(runs) for k in range(n)]
    taken = [r for p in parts for r in p]
    assert sorted(taken) == sorted(runs) and len(taken) == len(runs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_shard_flag_beats_slurm_is_split_by_torchrun_and_is_checked():
    assert parse_shard("2/5", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}) == \
        Shard(2, 5, None, "--shard")
    # under torchrun every rank sees the same --shard: taken alone, each rank trained that one share again
    ranks = [parse_shard("1/2", {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    assert ranks == [Shard(1, 4, 0, "--shard+torchrun"), Shard(3, 4, 1, "--shard+torchrun")]
    runs = list(range(10))
    assert sorted(x for s in ranks for x in s.take(runs)) == Shard(1, 2).take(runs)  # the share, split, once each
    for bad in ("5/5", "-1/4", "a/b", "3", "1/0", "\u00b2/3"):  # a superscript two passed isdigit(), then int() failed
        with pytest.raises(ShardError, match="--shard"):
            parse_shard(bad, {})


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert parse_shard(None, env) == Shard(3, 8, 3, "torchrun")
    with pytest.raises(ShardError, match="RANK"):
        parse_shard(None, {"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(ShardError, match="not an integer"):
        parse_shard(None, {"RANK": "x", "WORLD_SIZE": "8"})


def test_slurm_array_environment():
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10"}) == Shard(4, 10, None, "slurm")
    # --array=1-8 and --array=0-14:2 map onto 0..N-1
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8",
                              "SLURM_ARRAY_TASK_MIN": "1"}).index == 0
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0",
                              "SLURM_ARRAY_TASK_STEP": "2"}).index == 7
    with pytest.raises(ShardError, match="--shard K/N"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3"})
    # torchrun inside every array task splits that task's share again: 2 array tasks x 4 ranks = 8 shards
    s = parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "2", "WORLD_SIZE": "4",
                           "LOCAL_RANK": "2"})
    assert (s.index, s.count, s.local_rank, s.source) == (5, 8, 2, "slurm+torchrun")
    runs = list(range(20))  # the array task's share is what it would be without torchrun, whatever the world size
    assert sorted(x for r in range(4) for x in parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT":
                  "2", "RANK": str(r), "WORLD_SIZE": "4"}).take(runs)) == runs[1::2]


def test_half_a_launchers_environment_is_refused():
    for env in ({"RANK": "1"}, {"WORLD_SIZE": "4"}):  # the whole list ran, on every such process
        with pytest.raises(ShardError, match="RANK and WORLD_SIZE must be set together"):
            parse_shard(None, env)
    with pytest.raises(ShardError, match=r"--array=0-0:"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"})


def test_no_launcher_means_the_whole_list():
    assert parse_shard(None, {}) == Shard(0, 1, None, "none")


def test_each_shard_gets_its_local_gpu():
    s = Shard(5, 8, 5, "torchrun")
    assert shard_device("auto", s, 8) == "cuda:5"
    assert shard_device("auto", s, 4) == "cuda:1"
    assert shard_device("cpu", s, 8) == "cpu"
    assert shard_device("auto", s, 0) == "auto"
    assert shard_device("auto", Shard(0, 1), 8) == "auto"


def _table(text):
    """The rows of the printed table without the wall-clock column (which differs from process to process)."""
    return [re.sub(r"\| [0-9.]+ s \|$", "|", line) for line in text.splitlines() if line.startswith("| ")]


def test_each_shard_makes_its_gpu_the_current_device(monkeypatch):
    """torchrun's rank 1 resolves cuda:1 and makes it the current device before any CUDA work, so that code asking
    for the current device (autocast, libraries) does not look at GPU 0 (CPU only here: torch.cuda is stood in for)."""
    import torch
    from experiments.common import resolve_device
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    shard = parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    device = resolve_device(shard_device("auto", shard, 2))
    assert device == torch.device("cuda:1") and made == [device]
    assert resolve_device("cpu") == torch.device("cpu") and made == [device]  # the CPU sets nothing


def test_two_concurrent_shards_then_report_only_give_the_table_of_one_process(model_dir, own_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(name, None)
    command = ["--task-dir", own_dir, "--mode", "finetune", "meta", "--seeds", "0-1"]
    one, shared = str(tmp_path / "one"), str(tmp_path / "shared")
    whole = subprocess.run([sys.executable, SCRIPT, *command, *own_flags(model_dir, one)], capture_output=True,
                           text=True, env=env, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    shards = [subprocess.Popen([sys.executable, SCRIPT, *command, "--shard", f"{k}/2", *own_flags(model_dir, shared)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in shards]
    assert [p.returncode for p in shards] == [0, 0], [e[-3000:] for _, e in outs]
    for k, (text, _) in enumerate(outs):
        assert f"shard {k}/2 (--shard): 2 run(s) of the command are this shard's" in text and "###" not in text
    assert results_in(shared) == results_in(one) and len(results_in(one)) == 4
    report = subprocess.run([sys.executable, SCRIPT, *command, "--report-only", *own_flags(model_dir, shared)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert _table(report.stdout) == _table(whole.stdout) and len(_table(whole.stdout)) >= 4


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_standalone_two_processes_share_the_runs(model_dir, own_dir, tmp_path):
    out = str(tmp_path / "out")
    p = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", SCRIPT, "--task-dir", own_dir,
                        "--mode", "finetune", "--seeds", "0-1", *own_flags(model_dir, out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "shard 0/2 (torchrun)" in p.stdout and "shard 1/2 (torchrun)" in p.stdout
    assert results_in(out) == ["my_task/finetune__none__seed0.json", "my_task/finetune__none__seed1.json"]


def test_download_only_checks_everything_and_trains_nothing(model_dir, own_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--task-dir", own_dir, "--mode", "tapt", "--seeds", "0-1", *own_flags(model_dir, out)]
    assert reproduce.main(argv + ["--download-only"]) == 0
    text = capsys.readouterr().out
    assert f"--download-only: model(s) {model_dir} and " in text and os.path.join(own_dir, "test.jsonl") in text
    assert not os.path.exists(out)
    with open(os.path.join(own_dir, "train.jsonl"), "a") as f:
        f.write("{oops\n")
    assert reproduce.main(argv + ["--download-only"]) == 1
    assert "train.jsonl, line 37: malformed JSON" in capsys.readouterr().err


def test_report_only_ignores_the_launchers_environment():
    parser, _ = reproduce.build_parser()
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert reproduce.launch_settings(parser.parse_args(["--task", "aclarc", "--mode", "mt", "--report-only"]),
                                     env)["shard"] == Shard(0, 1)
    assert reproduce.launch_settings(parser.parse_args(["--task", "aclarc", "--mode", "mt"]), env)["shard"] == \
        Shard(1, 2, None, "torchrun")
