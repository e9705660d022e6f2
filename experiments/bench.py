"""Speed benchmark (--bench): tartan.train's steps against their floors, in one process, through tartan's public API.

What is timed, on identical synthetic batches (random token ids, no padding) and a config-built model with random
weights (speed needs no pretrained weights):
  floors      one forward+backward of body + head on one batch, nothing else:
                floor_end  end-task head on an end-task batch        floor_aux  MLM head on an auxiliary batch
                floor_val  end-task head on a validation batch of the meta batch size
              and, apart, `optimizer`: gradient clipping + the two AdamW steps of tartan.train for body and all heads
  steps       one full optimizer step of tartan.train itself (its step function, gradient clipping, both AdamW
              steps, zero_grad, the schedulers): finetune (Eq. 2), pretrain (Eq. 1, MLM only), mt (Eq. 3),
              meta (Alg. 1) and meta_same_head (Eq. 6), timed from one call of the step function inside
              tartan.train to the next, so the real loop is what is measured.
Ratios are paired: just before each step, inside the same loop, the floors that step is compared with run once each
(timed apart, and taken out of the step's time), so every step has its own floors from a second earlier; a ratio is
the median over steps of step / (its floors). For META: meta / (mt_over_floor x (its end + aux floors) + its val
floor). Every configuration uses grad_accum = 1, so that a step holds exactly one micro-batch per task, like the
floors. Batches are prebuilt (the MLM batch masked once): tokenisation, collation and masking are not in any figure.
An untimed pass of every item comes first; then rounds x steps, every item in each round; the per-round spread of the
ratios is reported. Peak memory is measured after the timing, in one short pass per item from a reset (PeakMemory).
Targets: mt <= 1.05 x (floor_end + n_aux x floor_aux); meta <= 1.10 x (mt + floor_val).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
import warnings

import numpy as np
import torch

import tartan

from .common import PeakMemory, atomic_write_json, device_name, progress_bar, resolve_device, set_seed
from .flags import BENCH, check_flag_config


BENCH_SHAPES = {  # RoBERTa-style encoders built from a config, random weights
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=50265),
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=50265),
}
# defaults per model: (end-task batch, auxiliary batch, meta batch, sequence length); roberta-base = the release's
# micro-batches (one a step here: the paper's end-task batch 128 is two of them)
BENCH_SIZES = {"tiny": (4, 4, 2, 16), "small": (16, 16, 8, 128), "roberta-base": (64, 64, 32, 512)}
BENCH_COUNTS = {"full": dict(steps=5, warmup=2, rounds=3), "quick": dict(steps=2, warmup=1, rounds=1)}  # per item
# dense peak TFLOP/s (bf16 tensor core, fp32 without TF32) by device-name substring, first match wins
PEAK_TFLOPS = [("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H100", 989, 67), ("H200 NVL", 835, 60),
               ("H200", 989, 67), ("A100", 312, 19.5), ("L40S", 362, 91.6), ("L40", 181, 90.5), ("A10G", 70, 31.2),
               ("L4", 121, 30.3)]
FLOPS_FORMULA = ("model FLOPs per step = sum over the body passes of tokens x (6 x N + 12 x L x H x T); "
                 "N = body parameters without the embeddings, L layers, H hidden size, T sequence length "
                 "(6N: forward+backward matmuls; 12LHT: attention scores and values); heads are not counted")


class _FixedData:
    """Stands in for TextData: every batch drawn from it is the same prebuilt batch (one batch per epoch)."""

    def __init__(self, inputs: dict, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        return dict(self.inputs), self.labels


def _synthetic_batch(batch_size, length, vocab_size, gen):
    """Random ids between <s> (0) and </s> (2), no padding; ids 0-3 are the special tokens, vocab_size-1 the mask."""
    ids = torch.randint(4, vocab_size - 1, (batch_size, length), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_tflops(device, bf16, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, peak_bf16, peak_fp32 in PEAK_TFLOPS:
        if key in name:
            return peak_bf16 if bf16 else peak_fp32
    return None


def run_bench(model=None, device=None, batch_size=None, aux_batch_size=None, meta_batch_size=None, max_length=None,
              n_aux=1, steps=None, warmup=None, rounds=None, out_dir="results", quick=False, bf16=True,
              peak_tflops=None, threads=None, num_labels=6, seed=0, malloc=None, progress=False, log=print) -> dict:
    """Times the floors and the training steps (module docstring) and writes bench[_quick].json to out_dir.
    Unset sizes and counts take the defaults of BENCH_SIZES and BENCH_COUNTS for the model.
    model: "small" | "roberta-base" (default: roberta-base on CUDA, small on CPU; --quick: a tiny model unless one
    is given).
    threads: torch CPU threads for the run (default: torch's; --quick: 1, as a tiny model gains nothing from more).
    malloc: what tune_malloc did to this process, recorded in the report (None: not known)."""
    threads = threads or (1 if quick else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(model, device, batch_size, aux_batch_size, meta_batch_size, max_length, n_aux, steps,
                          warmup, rounds, out_dir, quick, bf16, peak_tflops, num_labels, seed, malloc, progress, log)
    finally:
        torch.set_num_threads(saved_threads)


def _run_bench(model, device, batch_size, aux_batch_size, meta_batch_size, max_length, n_aux, steps, warmup, rounds,
               out_dir, quick, bf16, peak_tflops, num_labels, seed, malloc, progress, log):
    device = resolve_device(device)
    model = model or ("tiny" if quick else "roberta-base" if device.type == "cuda" else "small")
    sizes = [default if given is None else given for given, default in
             zip((batch_size, aux_batch_size, meta_batch_size, max_length), BENCH_SIZES[model])]
    counts = BENCH_COUNTS["quick" if quick else "full"]
    steps, warmup, rounds = steps or counts["steps"], warmup or counts["warmup"], rounds or counts["rounds"]
    bench = _Bench(model, device, *sizes, n_aux, bf16 and device.type == "cuda", num_labels, seed)
    log(f"bench: {model} on {device} ({device_name(device)}), batches end {bench.B} / aux {n_aux} x {bench.A} / meta "
        f"{bench.M}, length {bench.T}, bf16 {bench.bf16}, grad_accum 1; {rounds} rounds x {steps} steps after {warmup} "
        f"warm-up; malloc: {malloc or 'not set here'}")
    t_start = time.perf_counter()
    samples = bench.time_items(rounds, warmup, steps, progress, log)
    peak_tf = _peak_tflops(device, bench.bf16, peak_tflops)
    res = bench.summarise(samples, bench.peak_memory(), peak_tf)
    report = _bench_report(bench, samples, res, steps, warmup, rounds, peak_tf, malloc, t_start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without native bf16 has nothing to compare
        native = device.type == "cpu" and tartan.bf16_enabled(device, True)
    if native:  # what bf16 autocast gains on this CPU, beside the fp32 figures above
        report["bf16_over_fp32_on_cpu"] = bench.bf16_ratios(warmup, steps)
    _print_bench(report, log, quick)
    path = os.path.join(out_dir, "bench_quick.json" if quick else "bench.json")
    atomic_write_json(path, report)
    report["path"] = path
    log(f"wrote {path}")
    return report


class _Bench:
    """The benchmark's model, tasks and configs (built once), and what it runs on them: the floors, the optimizer
    step, tartan.train's steps (the items), their timing, and the summary of the timings."""

    def __init__(self, model, device, B, A, M, T, n_aux, bf16, num_labels, seed):
        common = dict(batch_size=B, aux_batch_size=A, grad_accum=1, eval_every=-1, bf16=bf16, seed=seed,
                      final_finetune=None)
        self.cfg_train, self.cfg_meta = tartan.TrainConfig(**common), tartan.MetaConfig(meta_batch_size=M, **common)
        check_flag_config(self.cfg_meta, "train", "the benchmark's META step", BENCH)  # before the model is built
        from transformers import AutoModelForMaskedLM, RobertaConfig

        self.device, self.B, self.A, self.M, self.T, self.n_aux, self.bf16 = device, B, A, M, T, n_aux, bf16
        self.seed = seed
        set_seed(seed)
        self.model, self.shape = model, BENCH_SHAPES[model]
        config = RobertaConfig(max_position_embeddings=T + 2, type_vocab_size=1, **self.shape)  # positions start at 2
        self.body, mlm_head = tartan.split_masked_lm(AutoModelForMaskedLM.from_config(config).to(device))
        V, H = self.shape["vocab_size"], self.shape["hidden_size"]

        gen = torch.Generator().manual_seed(seed)
        masking = tartan.Masking(mask_id=V - 1, vocab_size=V, special_ids=(0, 1, 2, 3))
        aux_inputs = _synthetic_batch(A, T, V, gen)
        aux_inputs["input_ids"], aux_labels = tartan.mask_tokens(aux_inputs["input_ids"],
                                                                 aux_inputs["attention_mask"], masking, gen)
        train = _FixedData(_synthetic_batch(B, T, V, gen), torch.randint(num_labels, (B,), generator=gen))
        dev = _FixedData(_synthetic_batch(M, T, V, gen), torch.randint(num_labels, (M,), generator=gen))
        self.end = tartan.Task("end", tartan.ClassificationHead(H, num_labels).to(device), train=train, dev=dev,
                               num_labels=num_labels)
        self.aux = [tartan.Task(f"aux{i}", tartan.new_mlm_head(mlm_head, self.body),
                                train=_FixedData(aux_inputs, aux_labels)) for i in range(n_aux)]
        self.heads = [self.end.head] + [t.head for t in self.aux]
        self.autocast = tartan.autocast(device, bf16)  # as tartan.train builds it
        self.floors = {"floor_end": (self.end.head, self.end.train), "floor_aux": (self.aux[0].head, self.aux[0].train),
                       "floor_val": (self.end.head, self.end.dev)}
        self.items = self._items()

    def one_pass(self, head, data):
        """One forward+backward of body + head on one batch, the way tartan._forward runs it; returns seconds."""
        _sync(self.device)
        t0 = time.perf_counter()
        inputs, labels = tartan.to_device(*data.batch(None), self.device)
        with self.autocast:
            _, loss = head(self.body(**inputs), labels)
        loss.backward()
        _sync(self.device)
        seconds = time.perf_counter() - t0
        for m in (self.body, head):
            m.zero_grad(set_to_none=True)
        return seconds

    def optimizer_step(self, n_warm, n_time):
        """Gradient clipping and the two AdamW steps of tartan.train for body + all heads, with every gradient set."""
        cfg = self.cfg_train
        params = list(self.body.parameters())
        head_params = [p for h in self.heads for p in tartan.head_parameters(h, self.body)]
        opts = [tartan.make_optimizer(params, cfg.lr, cfg.weight_decay, cfg),
                tartan.make_optimizer(head_params, cfg.head_lr, cfg.head_weight_decay, cfg)]
        times = []
        for i in range(n_warm + n_time):
            for p in params + head_params:
                p.grad = torch.randn_like(p)  # a norm above grad_clip, as in training: the clipping pass is timed
            _sync(self.device)
            t0 = time.perf_counter()
            tartan.clip_grad_norm(params + head_params, cfg.grad_clip)
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return {"step": times[n_warm:]}

    def step(self, end_task, aux_tasks, cfg, step_fn, paired, n_warm, n_time):
        """Runs tartan.train for n_warm + n_time + 1 steps. A step is the time between the starts of two consecutive
        calls of its step function, less the floors run there: before each step, each floor in `paired` runs (count
        times, timed apart), so that every step has its own floors from a second earlier. Returns {"step": durations,
        floor name: summed durations} over the timed steps."""
        marks, inline = [], {name: [] for name in paired}

        def timed(*args, **kwargs):
            for name, count in paired.items():  # count: passes per step (n_aux for the auxiliary floor)
                inline[name].append(sum(self.one_pass(*self.floors[name]) for _ in range(count)))
            _sync(self.device)
            marks.append(time.perf_counter())
            return step_fn(*args, **kwargs)
        tartan.train(self.body, end_task, aux_tasks, dataclasses.replace(cfg, max_steps=n_warm + n_time + 1), timed)
        after = [sum(inline[name][i] for name in paired) for i in range(len(marks))]  # floors before step i's mark
        steps_ = [marks[i + 1] - marks[i] - after[i + 1] for i in range(len(marks) - 1)]
        return {"step": steps_[n_warm:], **{name: inline[name][n_warm:n_warm + n_time] for name in paired}}

    def _items(self) -> dict:
        """name: (run(n_warm, n_time), training tokens per step, body tokens per step)."""
        end, aux, n_aux, B, A, M, T = self.end, self.aux, self.n_aux, self.B, self.A, self.M, self.T
        meta_same = dataclasses.replace(self.cfg_meta, same_head=True)
        pretrain = dataclasses.replace(self.cfg_train, weights=(1.0,) * n_aux)
        both = {"floor_end": 1, "floor_aux": n_aux}
        with_val = {**both, "floor_val": 1}
        return {
            "optimizer": (self.optimizer_step, 0, 0),
            "finetune": (lambda *n: self.step(end, [], self.cfg_train, tartan.multitask_step, {"floor_end": 1}, *n),
                         B * T, B * T),
            "pretrain": (lambda *n: self.step(None, aux, pretrain, tartan.multitask_step, {"floor_aux": n_aux}, *n),
                         n_aux * A * T, n_aux * A * T),
            "mt": (lambda *n: self.step(end, aux, self.cfg_train, tartan.multitask_step, both, *n),
                   (B + n_aux * A) * T, (B + n_aux * A) * T),
            "meta": (lambda *n: self.step(end, aux, self.cfg_meta, tartan.meta_step, with_val, *n),
                     (B + n_aux * A) * T, (B + n_aux * A + M) * T),
            "meta_same_head": (lambda *n: self.step(end, aux, meta_same, tartan.meta_step, with_val, *n),
                               (B + n_aux * A) * T, (B + n_aux * A + M) * T),
        }

    def bf16_ratios(self, warmup, steps) -> dict:
        """On a CPU: the time in fp32 over the time under bf16 autocast of tartan.train's MT step and of evaluating
        the end-task batch, each measured twice, fp32 and bf16 in turn; medians."""
        times = {False: ([], []), True: ([], [])}
        for bf16 in (False, True, False, True):
            cfg = dataclasses.replace(self.cfg_train, bf16=bf16)
            times[bf16][0].extend(self.step(self.end, self.aux, cfg, tartan.multitask_step, {}, warmup, steps)["step"])
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                tartan.evaluate(self.body, self.end.head, self.end.train, len(self.end.train), bf16)
                if i >= warmup:
                    times[bf16][1].append(time.perf_counter() - t0)
        med = {bf16: [float(np.median(t)) for t in ts] for bf16, ts in times.items()}
        return {"mt_step": med[False][0] / med[True][0], "evaluation": med[False][1] / med[True][1],
                "seconds": {"fp32": dict(zip(("mt_step", "evaluation"), med[False])),
                            "bf16": dict(zip(("mt_step", "evaluation"), med[True]))}}

    def time_items(self, rounds, warmup, steps, progress, log) -> dict:
        """An untimed pass of every item, then rounds x (every item: warmup + steps); per item, one dict per round
        {"step": [...], floor: [...]}."""
        samples = {name: [] for name in self.items}
        t_start = time.perf_counter()
        for run, _, _ in self.items.values():  # untimed: caches, lazy init and the heap reach their working state
            run(1, 1)
        bar = progress_bar(rounds * len(self.items), progress, "bench")
        for r in range(rounds):  # timing: nothing resets memory in between (on CPU a reset hands the heap back to
            for name, (run, _, _) in self.items.items():  # the OS, and the page faults of its refill would be timed)
                samples[name].append(run(warmup, steps))
                bar.update(1)
            log(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s)")
        bar.close()
        return samples

    def peak_memory(self) -> dict:
        """Peak memory of every item and floor: one short untimed pass each, from a reset (after the timing)."""
        peak, peaks = PeakMemory(self.device), {}
        for name, (run, _, _) in self.items.items():
            peak.reset()
            run(1, 1)
            peaks[name] = peak.read_mb()
        for name, (head_, data_) in self.floors.items():
            peak.reset()
            self.one_pass(head_, data_)
            peaks[name] = peak.read_mb()
        return peaks

    def summarise(self, samples, peaks, peak_tf) -> dict:
        """Per item and floor: median seconds, tokens/s, peak memory, TFLOP/s and MFU."""
        B, A, M, T, n_aux = self.B, self.A, self.M, self.T, self.n_aux
        L, H = self.shape["num_hidden_layers"], self.shape["hidden_size"]
        n_flop = self.body_parameters_no_emb()
        flat = {name: sum((s["step"] for s in samples[name]), []) for name in self.items}
        for f in self.floors:  # every inline sample of a floor (per pass), from whichever loop ran it
            flat[f] = [x / (n_aux if f == "floor_aux" else 1) for name in self.items for s in samples[name] if f in s
                       for x in s[f]]
        tokens = {"floor_end": (B * T, B * T), "floor_aux": (A * T, A * T), "floor_val": (M * T, M * T),
                  **{name: (tt, bt) for name, (_, tt, bt) in self.items.items()}}
        res = {}
        for name in list(self.floors) + list(self.items):
            train_tokens, body_tokens = tokens[name]
            sec = float(np.median(flat[name]))
            flops = body_tokens * (6 * n_flop + 12 * L * H * T)
            res[name] = {"seconds": sec, "samples": len(flat[name]),
                         "tokens_per_step": train_tokens, "tokens_per_s": train_tokens / sec if train_tokens else None,
                         "peak_memory_mb": peaks[name], "tflops": flops / sec / 1e12,
                         "mfu": flops / sec / 1e12 / peak_tf if peak_tf and flops else None}
        return res

    def body_parameters_no_emb(self) -> int:
        return sum(p.numel() for n, p in self.body.named_parameters() if "embeddings" not in n)


def _ratios(samples, res, n_aux, round_=None) -> dict:
    """Medians of per-step ratios over all rounds (or one): each step against the floors run just before it."""
    rounds_of = lambda name: samples[name] if round_ is None else [samples[name][round_]]  # noqa: E731

    def per_step(name, denominator):  # denominator: {floor name: seconds before this step} -> seconds
        return float(np.median([s["step"][i] / denominator({f: v[i] for f, v in s.items() if f != "step"})
                                for s in rounds_of(name) for i in range(len(s["step"]))]))
    total = lambda floors_: sum(floors_.values())  # noqa: E731
    mt = per_step("mt", total)
    # a META step against an MT step estimated from its own floors: mt x (end + aux floors) + val floor
    mt_plus_val = lambda fl: mt * (fl["floor_end"] + fl["floor_aux"]) + fl["floor_val"]  # noqa: E731
    step_median = lambda name: float(np.median(sum((s["step"] for s in rounds_of(name)), [])))  # noqa: E731
    out = {"mt_over_floor": mt,
           "meta_over_mt_plus_val": per_step("meta", mt_plus_val),
           "meta_over_mt": step_median("meta") / step_median("mt"),
           "meta_same_head_over_mt_plus_val": per_step("meta_same_head", mt_plus_val),
           "finetune_over_floor": per_step("finetune", total),
           "pretrain_over_floor": per_step("pretrain", total)}
    if round_ is None:  # from the items' overall times, which no round has of its own
        out["mt_over_floor_plus_optimizer"] = res["mt"]["seconds"] / (
            res["floor_end"]["seconds"] + n_aux * res["floor_aux"]["seconds"] + res["optimizer"]["seconds"])
    return out


def _bench_report(bench: _Bench, samples, res, steps, warmup, rounds, peak_tf, malloc, t_start) -> dict:
    """The JSON report: the ratios (overall, per round, their spread), targets, every item, config, machine, notes."""
    device = bench.device
    overall = _ratios(samples, res, bench.n_aux)
    per_round = [_ratios(samples, res, bench.n_aux, r) for r in range(rounds)]
    mem_meta_over_mt = (res["meta"]["peak_memory_mb"] / res["mt"]["peak_memory_mb"]
                        if res["mt"]["peak_memory_mb"] else None)
    return {
        **overall,
        "targets": {"mt_over_floor": 1.05, "meta_over_mt_plus_val": 1.10},
        "targets_hold": {"mt_over_floor": overall["mt_over_floor"] <= 1.05,
                         "meta_over_mt_plus_val": overall["meta_over_mt_plus_val"] <= 1.10},
        "ratios_per_round": per_round,
        "ratio_spread": {k: [min(r[k] for r in per_round), max(r[k] for r in per_round)] for k in per_round[0]},
        "peak_memory_meta_over_mt": mem_meta_over_mt,
        "items": res,
        "config": {"model": bench.model, **bench.shape, "max_length": bench.T, "batch_size": bench.B,
                   "aux_batch_size": bench.A, "meta_batch_size": bench.M, "n_aux": bench.n_aux, "grad_accum": 1,
                   "meta_head_steps": bench.cfg_meta.meta_head_steps, "steps": steps, "warmup": warmup,
                   "rounds": rounds, "bf16": bench.bf16, "seed": bench.seed,
                   "body_parameters": sum(p.numel() for p in bench.body.parameters()),
                   "body_parameters_no_emb": bench.body_parameters_no_emb()},
        "machine": {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "peak_tflops": peak_tf, "malloc": malloc},
        "notes": {"grad_accum": "1 in every configuration: a step holds one micro-batch per task, as the floors",
                  "seconds": "median over rounds x steps; a step = one iteration of tartan.train's loop; floors: "
                             "every pass run beside the steps",
                  "ratios": "paired: per step, step / (the floors run just before it in the same loop); median over "
                            "steps. META: meta / (mt_over_floor x (end + aux floors) + val floor)",
                  "tokens_per_s": "training tokens (end-task + auxiliary batches) per second; META's validation "
                                  "tokens are counted in its FLOPs, not in its tokens",
                  "peak_memory_mb": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                                     "peak RSS of the whole process (VmHWM reset via /proc/self/clear_refs)"),
                  "flops": FLOPS_FORMULA,
                  "excluded": "tokenisation, collation, masking and evaluation (batches are prebuilt)"},
        "seconds_total": time.perf_counter() - t_start,
    }


def _print_bench(report, log, quick=False):
    mem_name = "peak MB" if report["machine"]["device"].startswith("cuda") else "peak RSS MB"
    log(f"{'':16s} {'s/step':>9s} {'tokens/s':>10s} {mem_name:>12s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name, r in report["items"].items():
        mem = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        log(f"{name:16s} {r['seconds']:9.4f} {tps:>10s} {mem:>12s} {r['tflops']:8.3f} {mfu:>6s}")
    for key, target in [("mt_over_floor", 1.05), ("meta_over_mt_plus_val", 1.10), ("meta_over_mt", None),
                        ("meta_same_head_over_mt_plus_val", None), ("mt_over_floor_plus_optimizer", None),
                        ("finetune_over_floor", None),
                        ("pretrain_over_floor", None)]:
        spread = report["ratio_spread"].get(key)
        rounds = f"  (rounds {spread[0]:.3f}-{spread[1]:.3f})" if spread else ""
        held = "(--quick: not judged)" if quick else "holds" if report[key] <= target else "MISSED"
        verdict = "" if target is None else f"  target <= {target:.2f}: {held}"
        log(f"{key:32s} {report[key]:.3f}{rounds}{verdict}")
    if report["peak_memory_meta_over_mt"] is not None:
        log(f"{'peak_memory_meta_over_mt':32s} {report['peak_memory_meta_over_mt']:.3f}")
    log(f"MFU: {FLOPS_FORMULA}; device peak {report['machine']['peak_tflops'] or 'unknown'} TFLOP/s")
    if "bf16_over_fp32_on_cpu" in report:
        r = report["bf16_over_fp32_on_cpu"]
        log(f"bf16 autocast on this CPU: MT step {r['mt_step']:.2f}x, evaluation {r['evaluation']:.2f}x as fast as "
            f"fp32 (fp32 s / bf16 s: {r['seconds']['fp32']['mt_step']:.4f} / {r['seconds']['bf16']['mt_step']:.4f}, "
            f"{r['seconds']['fp32']['evaluation']:.4f} / {r['seconds']['bf16']['evaluation']:.4f})")


def tune_malloc(enabled: bool = True) -> str:
    """Makes glibc's free() keep memory for reuse instead of handing it back to the OS; returns what was done.

    PyTorch on CPU takes its large tensors (activations, gradients, the MLM logits) straight from malloc. glibc serves
    allocations above its mmap threshold (adaptive, at most 32 MB) with fresh pages and unmaps them on free, so every
    training step page-faults hundreds of MB back in, and a step that holds more at once (MT, META) pays more of it
    than the single passes it is compared with (experiments/results/README.md, "Speed"). Same as running under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647; the cost is that the process keeps its
    peak memory until it exits. Linux/glibc only; elsewhere, or with enabled=False, nothing changes. Process-wide,
    so it lives here in the command-line runner and never in tartan.py."""
    if not enabled:
        return "glibc default"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
            return "glibc default (mallopt refused)"
    except (OSError, AttributeError):
        return "system default (not glibc)"
    return "kept for reuse (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
