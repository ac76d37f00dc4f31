"""How far a demo run's DPO policy is from the best reward its KL could have bought.

The KL-regularised optimum the DPO objective aims at is pi*(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta)
(Rafailov et al. 2023, eq. 4). On the k samples the initial model drew for each training prompt of round 1,
the same reweighting (the empirical reference, uniform over the k samples, tilted by the judge's reward) gives,
for each beta, a gain in mean reward and a KL; matched to the KL the DPO policy spent it says what reward that
much KL buys when the reward is known exactly. Its support is the k samples, so it can spend at most log k nats
(best-of-k); a policy's KL above that is compared at log k.

The second number is how well the policy's implicit reward, beta log pi(y|x)/pi_ref(y|x), ranks its own held-out
samples by the judge's reward (Spearman's rho): 1 would be a policy that learned the reward itself.

    python -m preftune.demo.headroom runs/demo [more run directories]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def tilt(scores: np.ndarray, beta: float) -> tuple[float, float]:
    """Mean over prompts of (gain in mean reward, KL in nats) of the k samples reweighted by exp(score / beta).

    scores: (P, k), k samples per prompt."""
    z = (scores - scores.max(axis=1, keepdims=True)) / beta  # (P, k), shifted for exp
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = scores.shape[1]
    gain = ((p * scores).sum(axis=1) - scores.mean(axis=1)).mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p * k), 0.0).sum(axis=1).mean()
    return float(gain), float(kl)


def tilt_at_kl(scores: np.ndarray, kl: float) -> tuple[float, float]:
    """(gain, KL) of the reweighting whose KL is `kl`, or of its limit (best-of-k) when `kl` is beyond it."""
    lo, hi = -12.0, 6.0  # log beta: beta from 6e-6 (about best-of-k) to 400 (about the reference)
    limit = tilt(scores, float(np.exp(lo)))
    if limit[1] <= kl:
        return limit
    for _ in range(80):  # KL falls as beta grows: bisect on log beta
        mid = (lo + hi) / 2
        if tilt(scores, float(np.exp(mid)))[1] > kl:
            lo = mid
        else:
            hi = mid
    return tilt(scores, float(np.exp(hi)))


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (ties get their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def summary(run_dir: Path, results: dict | None = None) -> dict:
    """The headroom numbers of one `preftune demo` run: its results (read from run_dir/results.json unless
    given) and round 1's scores (run_dir/iterate/round-1/scores.json)."""
    if results is None:
        results = json.loads((run_dir / "results.json").read_text())
    k = results["settings"]["samples_per_prompt"]
    scores = np.asarray(json.loads((run_dir / "iterate" / "round-1" / "scores.json").read_text())["scores"],
                        dtype=float).reshape(-1, k)  # (P, k): round 1 samples the initial model
    scores = scores[np.isfinite(scores).all(axis=1)]
    gain, kl = results["evaluation"]["reward_gain"][0], results["evaluation"]["kl"][0]
    best_gain, best_kl = tilt_at_kl(scores, kl)
    samples = results["eval_samples"]
    log_ratio = np.array([e["kl"] for e in samples])  # log pi(y|x) - log pi_ref(y|x), policy samples
    reward = np.array([e["policy_reward"] for e in samples])
    return {"gain": gain, "kl": kl, "reweighting_gain": best_gain, "reweighting_kl": best_kl,
            "share_of_reweighting": gain / best_gain if best_gain > 0 else float("nan"),
            "implicit_reward_rank_corr": rank_corr(log_ratio, reward), "reweighting_prompts": len(scores),
            "samples_per_prompt": k}


def describe(s: dict) -> str:
    capped = f" (its limit, best-of-{s['samples_per_prompt']}, with less KL)" \
        if s["reweighting_kl"] < s["kl"] - 1e-3 else ""
    return (f"DPO gain {s['gain']:+.3f} at KL {s['kl']:.2f}; the reward-tilted reweighting of the initial model's "
            f"own samples ({s['reweighting_prompts']} prompts x {s['samples_per_prompt']}) gains "
            f"{s['reweighting_gain']:+.3f} at KL {s['reweighting_kl']:.2f}{capped}: DPO reached "
            f"{s['share_of_reweighting']:.0%} of it; implicit reward vs judge on held-out policy samples: "
            f"Spearman {s['implicit_reward_rank_corr']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preftune.demo.headroom", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`preftune demo` output directories (--out)")
    args = parser.parse_args(argv)
    for run in args.runs:
        print(f"{run}: {describe(summary(run))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
