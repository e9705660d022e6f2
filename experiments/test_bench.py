"""reproduce.py --bench: runs with --quick and writes its ratios; no timing is asserted."""
import json
import math
import os
import platform
import subprocess
import sys

import pytest

import reproduce



def test_quick_bench_prints_and_writes_its_ratios(tmp_path, capsys):
    assert reproduce.main(["--bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "bench_quick.json") as f:
        saved = json.load(f)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bench-")]  # the temporary file was renamed
    for key in ("mt_over_floor", "meta_over_mt_plus_val", "meta_over_mt"):
        assert key in out and math.isfinite(saved[key]) and saved[key] > 0, key
    for name in ("floor_end", "floor_aux", "floor_val", "finetune", "pretrain", "mt", "meta", "meta_same_head"):
        assert saved["items"][name]["seconds"] > 0 and saved["items"][name]["tokens_per_s"] > 0, name
    assert saved["config"]["grad_accum"] == 1
    assert isinstance(saved["machine"]["malloc"], str)  # what tune_malloc did is on record
    # the floors are measured beside the steps they pair with: every step of mt brought one end and one aux pass
    assert saved["items"]["floor_aux"]["samples"] >= saved["items"]["mt"]["samples"] > 0
    assert saved["notes"]["ratios"].startswith("paired")


def test_bench_bad_sizes_give_one_message_and_no_file(tmp_path, capsys):
    assert reproduce.main(["--bench", "--quick", "--meta-batch-size", "99", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --meta-batch-size 99 exceeds the end-task batch") and "Traceback" not in err
    assert not (tmp_path / "bench_quick.json").exists()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_keeps_freed_memory_in_its_own_process():
    # process-wide, so in child processes: once warm, allocating and freeing 64 MB tensors must not page-fault
    code = ("import sys, torch, resource\n"
            "from experiments import bench\n"
            "print(bench.tune_malloc(sys.argv[1] == 'tuned'))\n"
            "for _ in range(3): torch.ones(2**24).sum()\n"  # warm-up: the heap grows to its working size
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(3): torch.ones(2**24).sum()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = {}
    for mode in ("tuned", "default"):
        out[mode] = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split("\n")
    assert out["tuned"][0].startswith("kept for reuse") and out["default"][0] == "glibc default"
    pages = 3 * 2**26 // 4096  # three fresh 64 MB tensors
    assert int(out["default"][1]) >= pages // 2  # glibc's default hands them back and faults them in again
    assert int(out["tuned"][1]) < pages // 16
