"""The numbers of AMENDMENT.md (issue 29): the error of a second look at SCIERC's accumulating seeds, the look-2
threshold, and the power at 10 v 10 seeds. Not a test; numpy and the committed result files only. Re-run with
    OMP_NUM_THREADS=1 python experiments/results/cpu-es/second_look.py [--permutation-check N]
(from the repository root; a few seconds, plus about two minutes per 10^5 replicates of the optional check, which
runs it twice). AMENDMENT.md quotes its output with --permutation-check 100000."""
import glob
import itertools
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RHO = math.sqrt(5 / 10)      # corr(Z1, Z2) under H0: look 1 at 5 seeds a side, look 2 at 10 (information fraction 1/2)
ALPHA1 = 0.05                # look 1's nominal one-sided level (PROTOCOL.md; it did not reject)
OVERALL = 0.075              # the two-look design's one-sided error that the amendment fixes
Z80 = 0.8416212335729143     # z_0.80
PAPER = {"TAPT": (79.53, 1.93), "MT": (80.81, 0.74), "META": (81.48, 0.82)}  # Table 1, SCIERC, 10 seeds


def Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def z_of(p):  # upper-tail quantile: Phi(z) = 1 - p, by bisection
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - Phi(mid) > p else (lo, mid)
    return (lo + hi) / 2


def cross_late(c1, c2, rho=RHO, n=200_001):
    """P(Z1 <= c1, Z2 > c2), (Z1, Z2) standard bivariate normal with correlation rho: the integral over z1 of
    phi(z1) (1 - Phi((c2 - rho z1) / sqrt(1 - rho^2))), Simpson's rule on [-12, c1]."""
    z = np.linspace(-12, c1, n)
    cond = np.array([1 - Phi((c2 - rho * x) / math.sqrt(1 - rho * rho)) for x in z])
    f = np.exp(-z * z / 2) / math.sqrt(2 * math.pi) * cond
    h = (c1 + 12) / (n - 1)
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def overall(c1, c2):
    return (1 - Phi(c1)) + cross_late(c1, c2)


def solve_c2(c1, target):  # the look-2 critical z that makes the overall error `target`
    lo, hi = 0.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(c1, mid) > target else (lo, mid)
    return (lo + hi) / 2


def monte_carlo(c1, c2, draws=2_000_000, seed=29):
    """Z1 = mean of 5 unit increments x sqrt(5); Z2 from all 10: the same correlation, sampled (seeded)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(draws), rng.standard_normal(draws)  # the z of seeds 0-4 and of seeds 5-9
    z1, z2 = a, (a + b) / math.sqrt(2)
    return float(np.mean((z1 > c1) | (z2 > c2)))


def permutation_check(reps, p2, seed=29, batch=250):
    """The design as it is run: scores iid normal under H0 (10 a side); look 1 the exact permutation p of seeds 0-4
    (252 splits), look 2 the exact p of seeds 0-9 (184,756 splits). Returns P(p1 < 0.05 or p2 < p2 threshold)."""
    def signs(n):  # (splits, 2n): +1/n for the scores a split gives the arm, -1/n for the rest
        picks = np.array(list(itertools.combinations(range(2 * n), n)))
        s = -np.ones((len(picks), 2 * n), dtype=np.float32)
        np.put_along_axis(s, picks, 1.0, axis=1)
        return s / n
    s5, s10 = signs(5), signs(10)
    rng = np.random.default_rng(seed)
    hit = done = 0
    while done < reps:
        k = min(batch, reps - done)
        x = rng.standard_normal((k, 2, 10)).astype(np.float32)  # arm, baseline; seeds 0-9
        first = np.concatenate([x[:, 0, :5], x[:, 1, :5]], 1)  # (k, 10)
        full = np.concatenate([x[:, 0], x[:, 1]], 1)           # (k, 20)
        obs1, obs2 = first[:, :5].mean(1) - first[:, 5:].mean(1), full[:, :10].mean(1) - full[:, 10:].mean(1)
        q1 = np.mean(s5 @ first.T >= obs1 - 1e-6, 0)
        q2 = np.mean(s10 @ full.T >= obs2 - 1e-6, 0)
        hit += int(np.sum((q1 < ALPHA1) | (q2 < p2)))
        done += k
    return hit / reps


def scores(mode):
    """Test macro-F1 x100 of seeds 0-4 (look 1's data; later seeds are left out, so the output does not change)."""
    out = {}
    for path in glob.glob(os.path.join(HERE, "scierc", f"{mode}__*__seed*.json")):
        with open(path) as f:
            rec = json.load(f)
        out[rec["key"]["seed"]] = 100 * rec["headline"]["test"]
    return np.array([out[s] for s in range(5)])


def main(argv):
    c1 = z_of(ALPHA1)
    print(f"look 1: nominal one-sided p < {ALPHA1} (z > {c1:.4f}); corr(Z1, Z2) = sqrt(5/10) = {RHO:.4f}")
    c05 = z_of(0.05)
    print(f"look 2 at nominal p < 0.05 as well: overall error {overall(c1, c05):.4f} (integral), "
          f"{monte_carlo(c1, c05):.4f} (Monte Carlo, 2e6 draws)")
    for name, ratio in (("Pocock", 1.0), ("O'Brien-Fleming", math.sqrt(2))):  # c1 = ratio x c2
        lo, hi = 0.0, 8.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if overall(ratio * mid, mid) > 0.05 else (lo, mid)
        print(f"a two-look design at overall 0.05 ({name}) would have needed look 1 at nominal p < "
              f"{1 - Phi(ratio * lo):.4f}, look 2 at p < {1 - Phi(lo):.4f}")
    c2 = solve_c2(c1, OVERALL)
    p2 = 1 - Phi(c2)
    print(f"overall {OVERALL}: look 2 needs z > {c2:.4f}, nominal one-sided p < {p2:.4f}; check: integral "
          f"{overall(c1, c2):.4f}, Monte Carlo {monte_carlo(c1, c2):.4f}")
    p2 = math.floor(p2 * 1000) / 1000  # the registered threshold, rounded down to 3 decimals
    c2 = z_of(p2)
    print(f"registered: p < {p2:.3f} (z > {c2:.4f}); overall {overall(c1, c2):.4f}; look 2 alone, spent after a "
          f"look 1 that did not reject: {cross_late(c1, c2):.4f}")
    for alt in (0.10,):
        print(f"(overall {alt} would need look-2 nominal p < {1 - Phi(solve_c2(c1, alt)):.4f})")
    if "--permutation-check" in argv:
        reps = int(argv[argv.index("--permutation-check") + 1])
        print(f"permutation check, {reps} replicates under H0 (exact tests at both looks): overall "
              f"{permutation_check(reps, p2):.4f}; look 2 at 0.05: {permutation_check(reps, 0.05):.4f}")

    tapt = scores("tapt")
    print(f"\npower at 10 v 10, look-2 threshold z {c2:.4f} (normal approximation, p part of 'Shown' only); "
          f"conditional power given seeds 0-4 (z1 = d1 / (s sqrt(2/5)), same s); n/arm for 0.8 at z {c2:.3f} "
          f"and at z_0.05")
    print("arm  | effect | std source | pooled s | power 5v5 @0.05 | power 10v10 | cond. power "
          "| n/arm 0.8 (@thr, @0.05)")
    for arm, mode in (("MT", "mt"), ("META", "meta")):
        x = scores(mode)
        d1 = x.mean() - tapt.mean()
        s_obs = math.sqrt((x.var(ddof=1) + tapt.var(ddof=1)) / 2)
        s_pap = math.sqrt((PAPER[arm][1] ** 2 + PAPER["TAPT"][1] ** 2) / 2)
        for eff_name, eff in ((f"paper {PAPER[arm][0] - PAPER['TAPT'][0]:+.2f}", PAPER[arm][0] - PAPER["TAPT"][0]),
                              (f"5-seed d {d1:+.2f}", d1)):
            for s_name, s in (("observed", s_obs), ("paper", s_pap)):
                pw10 = Phi(eff / (s * math.sqrt(2 / 10)) - c2)
                pw5 = Phi(eff / (s * math.sqrt(2 / 5)) - c05)
                z1 = d1 / (s * math.sqrt(2 / 5))
                cond = Phi(z1 + eff / (s * math.sqrt(2 / 5)) - math.sqrt(2) * c2)
                n_thr = math.ceil(2 * ((c2 + Z80) * s / eff) ** 2)
                n_05 = math.ceil(2 * ((c05 + Z80) * s / eff) ** 2)
                print(f"{arm:4} | {eff_name:16} | {s_name:8} | {s:.2f} | {pw5:.2f} | {pw10:.2f} | {cond:.2f} | "
                      f"{n_thr}, {n_05}")
        print(f"{arm}: 5-seed d {d1:+.3f}, observed pooled std {s_obs:.3f}, paper pooled std {s_pap:.3f}; smallest "
              f"detectable difference at 10 v 10: {(c2 + Z80) * math.sqrt(2 / 10):.3f} x pooled std "
              f"(= {(c2 + Z80) * math.sqrt(2 / 10) * s_obs:.2f} points at the 5-seed std)")
    pap = {"TAPT": (67.74, 3.68), "MT": (70.48, 4.42), "META": (70.08, 4.70)}  # Table 1, ACL-ARC
    for arm in ("MT", "META"):
        eff, s = pap[arm][0] - pap["TAPT"][0], math.sqrt((pap[arm][1] ** 2 + pap["TAPT"][1] ** 2) / 2)
        print(f"ACL-ARC {arm}: paper effect {eff:+.2f}, pooled std {s:.2f}: power at 5 v 5, one-sided 0.05: "
              f"{Phi(eff / (s * math.sqrt(2 / 5)) - c05):.2f}; "
              f"n/arm for 0.8: {math.ceil(2 * ((c05 + Z80) * s / eff) ** 2)}")


if __name__ == "__main__":
    main(sys.argv[1:])
