"""reproduce.py --bench: runs with --quick and writes its ratios; no timing is asserted."""
import ctypes
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

import reproduce
from experiments import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_prints_and_writes_its_ratios(tmp_path, capsys, monkeypatch):
    applied = []  # the allocator setting is process-wide: record the call instead of changing the test process
    monkeypatch.setattr(reproduce, "tune_malloc", lambda enabled=True: applied.append(enabled) or "test setting")
    clipped, real_clip = [], bench.tartan.clip_grad_norm

    def clip(params, max_norm):  # each clipping pass's gradient norm and limit
        norm = real_clip(params, max_norm)
        clipped.append((float(norm), max_norm))
        return norm
    monkeypatch.setattr(bench.tartan, "clip_grad_norm", clip)
    assert reproduce.main(["--bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "bench_quick.json") as f:
        saved = json.load(f)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bench-")]  # the temporary file was renamed
    for key in ("mt_over_floor", "meta_over_mt_plus_val", "meta_over_mt"):
        assert key in out and math.isfinite(saved[key]) and saved[key] > 0, key
    # two steps of a tiny model measure nothing: the targets are printed without a verdict
    assert out.count("(--quick: not judged)") == 2 and "MISSED" not in out and "holds" not in out
    for name in ("floor_end", "floor_aux", "floor_val", "finetune", "pretrain", "mt", "meta", "meta_same_head"):
        assert saved["items"][name]["seconds"] > 0 and saved["items"][name]["tokens_per_s"] > 0, name
    assert saved["config"]["grad_accum"] == 1
    assert applied == [True] and saved["machine"]["malloc"] == "test setting"  # applied on CPU, and on record
    # the floors are measured beside the steps they pair with: every step of mt brought one end and one aux pass
    assert saved["items"]["floor_aux"]["samples"] >= saved["items"]["mt"]["samples"] > 0
    assert saved["notes"]["ratios"].startswith("paired")
    # the optimizer item times a clipping pass that rescales, as training's do: its gradients are not all zero
    assert min(n for n, _ in clipped) > 0
    assert sum(n > limit for n, limit in clipped) >= saved["items"]["optimizer"]["samples"] > 0
    assert "mt_over_floor_plus_optimizer" not in saved["ratio_spread"]  # no round has one of its own


@pytest.mark.parametrize("native", [True, False])
def test_on_a_cpu_with_native_bf16_the_bench_compares_it_with_fp32(tmp_path, capsys, monkeypatch, native):
    """On a CPU with native bf16 the benchmark times tartan.train's MT step and an evaluation in fp32 and under bf16
    autocast, in turn, and reports fp32 time over bf16 time; on one without, there is nothing to compare."""
    for isa in ("avx512_bf16", "amx_tile"):
        monkeypatch.setattr(torch.cpu, f"_is_{isa}_supported", lambda: native)
    used, real = [], bench.tartan.evaluate

    def evaluate(*args, **kwargs):
        used.append(args[4] if len(args) > 4 else kwargs.get("bf16"))
        return real(*args, **kwargs)
    monkeypatch.setattr(bench.tartan, "evaluate", evaluate)
    monkeypatch.setattr(reproduce, "tune_malloc", lambda enabled=True: "test setting")
    assert reproduce.main(["--bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "bench_quick.json"))
    if not native:
        assert "bf16_over_fp32_on_cpu" not in saved and not used
        return
    r = saved["bf16_over_fp32_on_cpu"]
    assert "bf16 autocast on this CPU: MT step" in capsys.readouterr().out and sorted(set(used)) == [False, True]
    for key in ("mt_step", "evaluation"):
        assert r[key] == pytest.approx(r["seconds"]["fp32"][key] / r["seconds"]["bf16"][key])


def test_peak_tflops_is_read_from_the_cuda_device_name(monkeypatch):
    monkeypatch.setattr(bench, "device_name", lambda device: "NVIDIA H200")
    assert bench._peak_tflops(torch.device("cuda"), True, None) == 989
    assert bench._peak_tflops(torch.device("cuda"), False, None) == 67
    assert bench._peak_tflops(torch.device("cpu"), True, None) is None
    assert bench._peak_tflops(torch.device("cpu"), True, 5.0) == 5.0  # --bench-peak-tflops wins
    # the first name that is part of the device's wins: a variant is listed before the name it contains
    for name, peak in (("NVIDIA H200 NVL", 835), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121)):
        monkeypatch.setattr(bench, "device_name", lambda device, name=name: name)
        assert bench._peak_tflops(torch.device("cuda"), True, None) == peak, name


def test_bench_bad_sizes_give_one_message_and_no_file(tmp_path, capsys):
    assert reproduce.main(["--bench", "--quick", "--meta-batch-size", "99", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --meta-batch-size 99 > --batch-size 4: ") and "Traceback" not in err
    assert not (tmp_path / "bench_quick.json").exists()


def test_default_malloc_leaves_the_allocator_alone_and_other_commands_never_touch_it(tmp_path, monkeypatch):
    applied = []
    monkeypatch.setattr(reproduce, "tune_malloc", lambda enabled=True: applied.append(enabled) or "x")
    assert reproduce.main(["--bench", "--quick", "--device", "cpu", "--default-malloc", "--out", str(tmp_path)]) == 0
    assert applied == [False]
    applied.clear()
    assert reproduce.main(["--task", "demo", "--seeds", "0", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert applied == []


def _mallinfo2():
    try:
        return ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or _mallinfo2() is None, reason="mallopt/mallinfo2 are glibc's")
def test_tune_malloc_serves_large_blocks_from_the_heap_in_its_own_process():
    # process-wide, so in child processes. Deterministic: whether a live 64 MB tensor sits in an mmapped block
    # (glibc's default above its mmap threshold, at most 32 MB) or in the heap (tuned: M_MMAP_MAX = 0), read back
    # through mallinfo2's hblkhd (bytes in mmapped blocks).
    code = ("import ctypes, sys, torch\n"
            "from experiments import bench\n"
            "class Info(ctypes.Structure):\n"
            "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks fsmblks '\n"
            "                                              'uordblks fordblks keepcost').split()]\n"
            "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = Info\n"
            "print(bench.tune_malloc(sys.argv[1] == 'tuned'))\n"
            "x = torch.ones(2**24)\n"
            "print(libc.mallinfo2().hblkhd)\n")
    out = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split("\n") for mode in ("tuned", "default")}
    assert out["tuned"][0].startswith("kept for reuse") and out["default"][0] == "glibc default"
    assert int(out["default"][1]) >= 2**26  # the tensor is an mmapped block, unmapped again when freed
    assert int(out["tuned"][1]) < 2**26     # the tensor lives in the heap, which keeps it for reuse


def test_a_model_given_wins_over_quicks_tiny_one(monkeypatch):
    class Built(Exception):
        pass

    def built(model, *args):  # stops the run where the model is chosen
        raise Built(model)
    monkeypatch.setattr(bench, "_Bench", built)
    for given, want in ((None, "tiny"), ("small", "small")):
        with pytest.raises(Built, match=want):
            bench.run_bench(model=given, device="cpu", quick=True)
