"""The demo's outputs a person reads: the results table, the PNG plots and side-by-side samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preftune.evaluate import Comparison, Quality


def _ci(v: Sequence[float], fmt: str = "{:+.3f}") -> str:
    est, low, high = v
    return f"{fmt.format(est)}  [{fmt.format(low)}, {fmt.format(high)}]"


def results_table(cmp: Comparison, classifier_accuracy: float | None,
                  reference_name: str = "reference", quality: tuple[Quality, Quality] | None = None) -> str:
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
    if quality is not None:  # (reference's, policy's): the measures reward hacking shows up in
        ref_q, pol_q = quality
        rows += [("KL per completion token", f"{cmp.kl[0] / max(pol_q.tokens, 1e-9):.3f}"),
                 (f"{ref} NLL/token of {ref} | policy samples",
                  f"{ref_q.reference_nll:.2f} | {pol_q.reference_nll:.2f}"),
                 (f"distinct-2, {ref} | policy", f"{ref_q.distinct_2:.3f} | {pol_q.distinct_2:.3f}")]
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


def plot_frontier_curves(rows: Sequence[dict], path: Path) -> Path:
    """The DPO paper's Figure 2: held-out reward vs KL, one curve per method (rows of `frontier.point_row`,
    joined in order of KL), 95% CIs as bars; best-of-N's KL is its analytic bound, so it has no KL bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"][0])
        kl, reward = [r["kl"][0] for r in points], [r["reward"][0] for r in points]
        ax.errorbar(kl, reward, xerr=[[r["kl"][0] - r["kl"][1] for r in points],
                                      [r["kl"][2] - r["kl"][0] for r in points]],
                    yerr=[[r["reward"][0] - r["reward"][1] for r in points],
                          [r["reward"][2] - r["reward"][0] for r in points]],
                    marker="o" if method != "reference" else "*", markersize=5 if method != "reference" else 12,
                    capsize=3, label=method, linestyle="-" if len(points) > 1 else "none")
        for r in points:
            if r["method"] in ("DPO", "best-of-N"):
                tag = f"b={r['param']:g}" if r["method"] == "DPO" else f"N={r['param']:g}"
                ax.annotate(tag, (r["kl"][0], r["reward"][0]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("held-out reward: P(positive) of prefix + completion")
    ax.set_title("reward vs KL on the same held-out prompts (95% CIs)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The frontier's table: one line per model, reward and gain with 95% CIs, KL, quality measures."""
    head = ["model", "reward [95% CI]", "gain vs reference [95% CI]", "win rate", "KL nats/completion [95% CI]",
            "KL/token", "ref NLL/token", "distinct-2"]
    lines = []
    for r in rows:
        kl = f"{r['kl'][0]:.2f} (bound)" if r["kl_kind"].startswith("analytic") else \
            f"{r['kl'][0]:.2f} [{r['kl'][1]:.2f}, {r['kl'][2]:.2f}]"
        lines.append([r["label"], f"{r['reward'][0]:.3f} [{r['reward'][1]:.3f}, {r['reward'][2]:.3f}]",
                      f"{r['gain'][0]:+.3f} [{r['gain'][1]:+.3f}, {r['gain'][2]:+.3f}]", f"{r['win_rate'][0]:.3f}",
                      kl, f"{r['kl_per_token']:.3f}", f"{r['reference_nll']:.2f}", f"{r['distinct_2']:.3f}"])
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *lines])
    widths = [max(len(c[i]) for c in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
                     for cells in [head, *lines])


def frontier_html(rows: Sequence[dict], samples: Sequence[dict], targets: dict, plot: Path, path: Path,
                  limit: int = 12) -> Path:
    """report.html of a frontier sweep: the plot (embedded), the table, the targets, and every model's
    continuation of the same held-out prompts side by side."""
    import base64
    import html

    esc = html.escape
    uri = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
    labels = [r["label"] for r in rows]
    head = ["model", "reward [95% CI]", "gain [95% CI]", "win rate", "KL [95% CI]", "KL/token", "ref NLL/token",
            "distinct-2"]
    table = [f"<tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>"]
    for line in frontier_table(rows, markdown=True).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        table.append(f"<tr>{''.join(f'<td>{esc(c)}</td>' for c in cells)}</tr>")
    side = [f"<tr><th>prompt</th>{''.join(f'<th>{esc(label)}</th>' for label in labels)}</tr>"]
    for s in samples[:limit]:
        side.append(f"<tr><td>{esc(s['prompt'])}</td>" + "".join(
            f"<td>{esc(s[label]['text'])} <small>({s[label]['reward']:.2f})</small></td>" for label in labels)
            + "</tr>")
    body = (f"<h1>preftune demo --frontier: reward vs KL</h1><img src='{uri}' alt='reward vs KL'>"
            f"<h2>Every model on the same held-out prompts</h2><table>{''.join(table)}</table>"
            "<p>KL: mean over prompts of the summed log pi(y|x) - log pi_ref(y|x) of the model's own samples; "
            "best-of-N: the analytic bound log N - (N-1)/N. Reward: the sentiment classifier's P(positive) of "
            "prefix + completion. ref NLL: the reference's NLL per completion token.</p>"
            f"<h2>Targets</h2><pre>{esc(targets['summary'])}</pre>"
            f"<h2>Samples side by side (first {limit} prompts; reward in brackets)</h2>"
            f"<table>{''.join(side)}</table>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}")
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>preftune frontier</title>"
                    f"<style>{style}</style></head><body>{body}</body></html>\n")
    return path
