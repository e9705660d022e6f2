"""Tests of experiments/launch.py: shards of a run list, the launchers' environment variables."""
import pytest

from experiments.launch import Shard, ShardError, parse_shard, shard_device


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 25])
def test_shards_are_disjoint_and_cover_the_list(n):
    runs = [f"run{i}" for i in range(23)]
    parts = [Shard(k, n).take(runs) for k in range(n)]
    taken = [r for p in parts for r in p]
    assert sorted(taken) == sorted(runs) and len(taken) == len(runs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_shard_flag_beats_the_environment_and_is_checked():
    assert parse_shard("2/5", {"RANK": "1", "WORLD_SIZE": "4"}) == Shard(2, 5, None, "--shard")
    for bad in ("5/5", "-1/4", "a/b", "3", "1/0"):
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
    assert (s.index, s.count, s.local_rank, s.source) == (6, 8, 2, "slurm+torchrun")


def test_no_launcher_means_the_whole_list():
    assert parse_shard(None, {}) == Shard(0, 1, None, "none")


def test_each_shard_gets_its_local_gpu():
    s = Shard(5, 8, 5, "torchrun")
    assert shard_device("auto", s, 8) == "cuda:5"
    assert shard_device("auto", s, 4) == "cuda:1"
    assert shard_device("cpu", s, 8) == "cpu"
    assert shard_device("auto", s, 0) == "auto"
    assert shard_device("auto", Shard(0, 1), 8) == "auto"
