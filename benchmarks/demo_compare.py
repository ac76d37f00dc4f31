"""Two `preftune demo` runs on the same held-out prompts: the paired difference of their final policies.

    PYTHONPATH=src python benchmarks/demo_compare.py runs/demo-sft/results.json runs/demo/results.json

Prints, for run A minus run B, the mean held-out reward difference with a 95% bootstrap interval over prompts
(paired: both runs must have evaluated the same prompts, which the same --seed, --rounds, --prompts-per-round
and --eval-prompts guarantee; --sft does not change them), A's win rate over B, and each run's wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from preftune import evaluate


def policy_rewards(results: dict) -> tuple[list[str], np.ndarray]:
    """(prompt of each evaluation sample, per-prompt mean policy reward)."""
    samples = results["eval_samples"]
    n = results["evaluation"]["n_per_prompt"]
    rewards = evaluate.per_prompt_mean([e["policy_reward"] for e in samples], n)
    return [e["prompt"] for e in samples[::n]], rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="results.json of run A")
    parser.add_argument("b", type=Path, help="results.json of run B")
    args = parser.parse_args()
    a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
    prompts_a, rewards_a = policy_rewards(a)
    prompts_b, rewards_b = policy_rewards(b)
    if prompts_a != prompts_b:
        raise SystemExit(f"{args.a} and {args.b} evaluated different prompts: no paired comparison")
    diff = evaluate.bootstrap_ci(rewards_a - rewards_b)
    wins = evaluate.win_rate(rewards_a, rewards_b)
    print(f"{len(prompts_a)} held-out prompts, A = {args.a}, B = {args.b}")
    for name, r in (("A", a), ("B", b)):
        ev = r["evaluation"]
        print(f"  {name}: policy reward {ev['policy_reward'][0]:.3f}, gain vs own reference "
              f"{ev['reward_gain'][0]:+.3f}, KL {ev['kl'][0]:.2f}, wall {r['timing']['wall_s']:.0f} s")
    print(f"policy reward A - B: {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}] (95% paired bootstrap)")
    print(f"win rate of A's policy over B's: {wins[0]:.3f} [{wins[1]:.3f}, {wins[2]:.3f}]")


if __name__ == "__main__":
    main()
