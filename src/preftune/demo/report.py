"""The demo's outputs a person reads: the results table, the PNG plots and side-by-side samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preftune.evaluate import Comparison


def _ci(v: Sequence[float], fmt: str = "{:+.3f}") -> str:
    est, low, high = v
    return f"{fmt.format(est)}  [{fmt.format(low)}, {fmt.format(high)}]"


def results_table(cmp: Comparison, classifier_accuracy: float | None,
                  reference_name: str = "reference") -> str:
    """Plain-text table of the held-out evaluation (values with 95% bootstrap intervals over prompts); the
    classifier row is left out when `classifier_accuracy` is None."""
    ref = reference_name
    rows = [
        ("held-out prompts x samples each", f"{cmp.num_prompts} x {cmp.n_per_prompt}"),
        *([("reward classifier accuracy", f"{classifier_accuracy:.1%}")] if classifier_accuracy is not None
          else []),
        (f"mean reward, {ref}", _ci(cmp.reference_reward, "{:.3f}")),
        ("mean reward, DPO policy", _ci(cmp.policy_reward, "{:.3f}")),
        (f"reward gain (policy - {ref})", _ci(cmp.reward_gain)),
        (f"win rate of policy over {ref}", _ci(cmp.win_rate, "{:.3f}")),
        (f"KL(policy || {ref}), nats/seq", _ci(cmp.kl, "{:.2f}")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value  [95% CI]", "-" * (width + 34)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def side_by_side(prompts: Sequence[str], reference: Sequence[str], reference_rewards: Sequence[float],
                 policy: Sequence[str], policy_rewards: Sequence[float], limit: int = 12) -> str:
    """Markdown: for the first `limit` prompts, the reference's and the policy's continuation and reward."""
    lines = ["| prompt | reference | P(pos) | DPO policy | P(pos) |", "|---|---|---|---|---|"]

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    for i in range(min(limit, len(prompts))):
        lines.append(f"| {cell(prompts[i])} | {cell(reference[i])} | {reference_rewards[i]:.2f} | "
                     f"{cell(policy[i])} | {policy_rewards[i]:.2f} |")
    return "\n".join(lines) + "\n"


def plot_training(curve: Sequence[dict], steps: Sequence[dict], path: Path) -> Path:
    """Two panels over optimiser steps: the ground-truth reward and KL of each round's fresh policy samples
    (`curve` rows: step, reward, reward_low, reward_high, kl), and the trainer's DPO metrics (`steps` rows
    from metrics.jsonl with a global `step`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    x = [c["step"] for c in curve]
    yerr = [[c["reward"] - c["reward_low"] for c in curve], [c["reward_high"] - c["reward"] for c in curve]]
    ax_r.errorbar(x, [c["reward"] for c in curve], yerr=yerr,
                  marker="o", color="tab:blue", capsize=3, label="mean P(positive) of samples")
    ax_r.set_xlabel("optimiser step")
    ax_r.set_ylabel("reward: mean P(positive)", color="tab:blue")
    ax_k = ax_r.twinx()
    ax_k.plot(x, [c["kl"] for c in curve], marker="s", color="tab:red", label="KL(policy || reference)")
    ax_k.set_ylabel("KL(policy || reference), nats/seq", color="tab:red")
    ax_r.set_title("reward and KL over training (fresh samples each round)")
    if steps:
        sx = [s["step"] for s in steps]
        ax_m.plot(sx, [s["rewards/margins"] for s in steps], label="implicit reward margin", alpha=0.8)
        ax_m.plot(sx, [s["rewards/accuracies"] for s in steps], label="pair accuracy", alpha=0.8)
        ax_m.plot(sx, [s["loss"] for s in steps], label="DPO loss", alpha=0.8)
        ax_m.legend(loc="best", fontsize=8)
    ax_m.set_xlabel("optimiser step")
    ax_m.set_title("trainer metrics (metrics.jsonl)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(points: Sequence[dict], path: Path) -> Path:
    """Reward vs KL(policy || reference): the DPO paper's Figure 2 axes, one point per evaluated model
    (rows: label, kl, kl_low, kl_high, reward, reward_low, reward_high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        ax.errorbar([p["kl"]], [p["reward"]], xerr=[[p["kl"] - p["kl_low"]], [p["kl_high"] - p["kl"]]],
                    yerr=[[p["reward"] - p["reward_low"]], [p["reward_high"] - p["reward"]]],
                    marker="o", capsize=3, label=p["label"])
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("mean reward: P(positive)")
    ax.set_title("held-out reward vs KL (95% CIs)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
