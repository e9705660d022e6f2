"""META's signal, read from the per-step trace of META result files: one row per run, for comparing meta-head variants
(which rows phi* is fitted on, how long, Eq. 6 vs Eq. 7) before a sweep commits to one (issue 16)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from .common import ReproduceError, alpha_of

COLUMNS = ("variant", "task", "steps", "cos(g_end, g_meta)", "cos(g_aux, g_meta)", "|g_aux| / |g_end|",
           "phi* on B*_val", "phi' on dev", "ratio", "phi* fit (first -> last)", "end-task alpha at the last step")


def variant_row(variant: str, rec: dict) -> dict:
    """The diagnostics of one META result file: means over its steps (trace) and evaluations (history)."""
    stage = next(s for s in rec["stages"] if s["stage"] == "meta")
    trace, names = stage["trace"], list(alpha_of(stage["trace"]))
    end, aux = names[0], names[1:]
    if not trace.get("cosines") or not trace.get("grad_norms"):
        raise ReproduceError(f"{rec['key']}: no per-step cosines and gradient norms in its trace (a META run of this "
                             f"version is needed)")
    cos = {n: float(np.mean(trace["cosines"][n])) for n in names}
    norm_ratio = np.mean([np.mean(np.array(trace["grad_norms"][a]) / np.array(trace["grad_norms"][end]))
                          for a in aux])
    hist = [h for h in stage["history"] if h.get("meta_val_loss") is not None]
    val = np.array([h["meta_val_loss"] for h in hist])
    dev = np.array([h["dev"]["loss"] for h in hist])
    fit = [h["meta_head_fit_loss"] for h in hist if h.get("meta_head_fit_loss")]
    return {"variant": variant, "task": rec["key"]["task"], "steps": stage["steps"], "cos_end": cos[end],
            "cos_aux": float(np.mean([cos[a] for a in aux])), "norm_ratio": float(norm_ratio),
            "val_loss": float(val.mean()), "dev_loss": float(dev.mean()), "ratio": float(np.mean(val / dev)),
            "fit": np.mean(fit, axis=0).tolist() if fit else None, "end_alpha": alpha_of(trace)[end][-1]}


def collect(root: str) -> list[dict]:
    """Every META result file under root/<variant>/<task>/, as rows (variant = the folder's name)."""
    if not os.path.isdir(root):
        raise ReproduceError(f"--diagnostics {root}: no such folder (give the folder that holds <variant>/<task>/)")
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "meta*__*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if rec.get("complete"):
            rows.append(variant_row(os.path.basename(os.path.dirname(os.path.dirname(path))), rec))
    if not rows:
        raise ReproduceError(f"{root}: no complete META result file under <variant>/<task>/")
    return rows


def render(rows: list[dict]) -> str:
    """A Markdown table of the rows, then per variant the mean ratio over tasks (the sweep's choice rule)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        fit = "—" if r["fit"] is None else f"{r['fit'][0]:.3f} -> {r['fit'][1]:.3f}"
        lines.append(f"| {r['variant']} | {r['task']} | {r['steps']} | {r['cos_end']:+.4f} | {r['cos_aux']:+.4f} | "
                     f"{r['norm_ratio']:.2f} | {r['val_loss']:.3f} | {r['dev_loss']:.3f} | {r['ratio']:.3f} | {fit} | "
                     f"{r['end_alpha']:.4f} |")
    means = {}
    for r in rows:
        means.setdefault(r["variant"], []).append(r["ratio"])
    lines += ["", "Mean over tasks of phi*'s loss on B*_val / phi''s dev loss (lower: phi* generalises better): "
              + "; ".join(f"{v} {np.mean(x):.3f} ({len(x)} task(s))" for v, x in sorted(means.items()))]
    return "\n".join(lines) + "\n"
