"""`preftune report`: one self-contained HTML file about a run, viewable offline and shareable as is.

Plots are matplotlib PNGs inlined as base64 data URIs; there is no script and no external CSS, and a
Content-Security-Policy forbids fetching anything, so the file shows the same everywhere. Every piece of
text that came from data or a model is HTML-escaped: a generated `<script>` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

# (title, [(metric key, legend label)]) per plot; train keys and their `eval/` twins
PLOTS = [
    ("Loss", [("loss", "train"), ("eval/loss", "held-out")]),
    ("Reward accuracy", [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
    ("Reward margin", [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
    ("Implicit rewards", [("rewards/chosen", "chosen (train)"), ("rewards/rejected", "rejected (train)"),
                          ("eval/rewards/chosen", "chosen (held-out)"),
                          ("eval/rewards/rejected", "rejected (held-out)")]),
    ("KL(policy || reference), nats per completion", [("eval/kl", "held-out samples")]),
]

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
.plots figure { margin: 0; } .plots img { max-width: 100%; height: auto; }
td.text { white-space: pre-wrap; max-width: 28rem; } .note { color: #666; font-size: 0.9rem; }
"""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(title: str, series: list[tuple[str, str]], rows: list[dict]) -> str | None:
    """A PNG data URI of the series that have values, or None when none has any."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("preftune report draws its plots with matplotlib: pip install 'preftune[logging]'") from None
    matplotlib.use("Agg")  # no display, and no GUI backend imported by a server process
    import matplotlib.pyplot as plt

    drawn = [(label, [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))])
             for key, label in series]
    drawn = [(label, points) for label, points in drawn if points]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for label, points in drawn:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimiser step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(x) -> str:
    if x is None:
        return "&ndash;"
    return f"{x:.4g}" if isinstance(x, float) else html.escape(str(x))


def _interval_row(name: str, stat: dict) -> str:
    return (f"<tr><td>{html.escape(name)}</td><td class=num>{_fmt(stat['mean'])}</td>"
            f"<td class=num>[{_fmt(stat['low'])}, {_fmt(stat['high'])}]</td></tr>")


def _eval_section(result: dict) -> str:
    level = f"{round(100 * result.get('level', 0.95))}%"
    parts = []
    if "metrics" in result:  # held-out pairs; a sampling-only evaluation (the demo's) has none
        parts += [f"<p class=note>{result['pairs']} held-out pairs from {html.escape(result['data'])}; loss "
                  f"{html.escape(str(result['loss']))}, beta {_fmt(result['beta'])}; {level} bootstrap "
                  "intervals.</p>", f"<table><tr><th>metric</th><th>mean</th><th>{level} interval</th></tr>",
                  *(_interval_row(k, v) for k, v in result["metrics"].items()), "</table>"]
    summary = []
    if "kl" in result:
        summary.append(_interval_row("KL(policy || reference), nats", result["kl"]))
    # one win rate, or one per temperature of a sweep (eval.temperatures)
    wins = result.get("win_rates") or ([result["win_rate"]] if "win_rate" in result else [])
    for win in wins:
        against = "dataset responses" if win.get("baseline") == "dataset" else "reference"
        at = f" at T={win['temperature']:g}" if "win_rates" in result else ""
        summary.append(_interval_row(f"win rate over {against}{at} ({win['judge']})", win))
        for key in ("policy_reward", "reference_reward", "reward_gain"):
            if key in win:
                summary.append(_interval_row(key.replace("_", " ") + at, win[key]))
    if summary:
        parts += [f"<h3>Sampled from both models ({result.get('sampling', {}).get('prompts', '?')} prompts)</h3>",
                  f"<table><tr><th>quantity</th><th>mean</th><th>{level} interval</th></tr>", *summary, "</table>"]
    return "\n".join(parts)


def _samples_section(samples: list[dict], limit: int) -> str:
    scored = any(s.get("policy_score") is not None for s in samples)
    swept = any("temperature" in s for s in samples)  # rows of a temperature sweep carry their temperature
    head = "<tr><th>#</th>" + ("<th>T</th>" if swept else "") + "<th>prompt</th><th>reference</th><th>policy</th>"
    head += "<th>reference score</th><th>policy score</th></tr>" if scored else "</tr>"
    rows = []
    for i, s in enumerate(samples[:limit]):
        cells = [f"<td class=num>{i}</td>"] + ([f"<td class=num>{_fmt(s.get('temperature'))}</td>"] if swept else [])
        cells += [f"<td class=text>{html.escape(str(s.get(k, '')))}</td>" for k in ("prompt", "reference", "policy")]
        if scored:
            cells += [f"<td class=num>{_fmt(s.get(k))}</td>" for k in ("reference_score", "policy_score")]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p class=note>first {limit} of {len(samples)}</p>" if len(samples) > limit else ""
    return f"<table>{head}{''.join(rows)}</table>{note}"


def write_report(run_dir: str | Path, out: str | Path | None = None, *, title: str | None = None,
                 max_samples: int = 50) -> Path:
    """Write `<run_dir>/report.html` (or `out`) from the run's metrics.jsonl, and eval.json and
    samples.jsonl where `preftune eval` / `preftune generate` wrote them; returns the file's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    samples = _read_jsonl(run_dir / "samples.jsonl")
    eval_path = run_dir / "eval.json"
    result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    title = title or f"preftune run {run_dir.name}"

    body = [f"<h1>{html.escape(title)}</h1>"]
    if cfg:
        model = cfg.get("model", {}).get("path") or f"random {cfg.get('model', {}).get('arch', {}).get('model_type')}"
        facts = [("model", model), ("loss", cfg.get("loss", {}).get("name")), ("beta", cfg.get("loss", {}).get("beta")),
                 ("learning rate", cfg.get("optim", {}).get("lr")), ("train data", cfg.get("data", {}).get("train")),
                 ("steps logged", len(rows))]
        body.append("<table>" + "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in facts) + "</table>")

    body.append("<h2>Training</h2>")
    figures = []
    for plot_title, series in PLOTS:
        uri = _plot(plot_title, series, rows)
        if uri is not None:
            figures.append(f'<figure><img src="{uri}" alt="{html.escape(plot_title)}"></figure>')
    body.append(f"<div class=plots>{''.join(figures)}</div>" if figures
                else "<p class=note>No metrics logged (metrics.jsonl is missing or empty).</p>")
    if rows and not any("eval/kl" in r for r in rows):
        body.append("<p class=note>KL over steps appears when training evaluates on held-out pairs "
                    "(train.eval_every, data.eval) with eval.prompts &gt; 0.</p>")

    body.append("<h2>Held-out evaluation</h2>")
    body.append(_eval_section(result) if result else
                f"<p class=note>Not evaluated yet: <code>preftune eval {html.escape(str(run_dir))} "
                "--data HELD_OUT.jsonl</code></p>")

    body.append("<h2>Sample generations, side by side</h2>")
    body.append(_samples_section(samples, max_samples) if samples else
                f"<p class=note>No samples yet: <code>preftune generate {html.escape(str(run_dir))} "
                "--prompts PROMPTS.jsonl</code></p>")

    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            # nothing may load from anywhere: the report must look the same offline
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = Path(out) if out is not None else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
