"""`preftune demo --frontier`: the DPO paper's Figure 2 at small scale, held-out reward against KL(pi || pi_ref)
for DPO at several betas, Preferred-FT, best-of-N from the reference and the reference itself, all on the same
held-out prompts and measured one way (Rafailov et al. 2023, section 6.1).

run_frontier(s, sweep) top to bottom; every point is a directory of `out` with a `done.json` holding its table
row, so a rerun after a crash skips the finished points and continues the first unfinished one (an iterate
point also resumes inside, per phase):

  check       the sweep's estimated time and its settings, before anything runs (SweepError names what to change)
  reference   `sweep.bon_samples` reference samples per held-out prompt: the reference's row (mean reward over
              all of them) and best-of-N for every N, the best of the first N by reward (no new samples)
  dpo-beta*   `preftune iterate` with the demo's config at each beta; round 1 samples the reference with the same
              seed at every beta, so the first beta's round-1 samples and scores are copied to the others
  preferred-ft  SFT (`train.stage=sft`) on the chosen completions of the first beta's round-1 pairs: what DPO
              saw, without the rejected ones
  report      results.json (table, samples), reward_vs_kl.png (one curve per method), report.html

KL for every trained model: the mean over held-out prompts of the summed log pi(y|x) - log pi_ref(y|x) of its
own samples, with a bootstrap CI; for best-of-N the analytic bound log N - (N - 1)/N (Stiennon et al. 2020,
appendix; Beirami et al. 2024 show it is an upper bound), which is what the paper's Figure 2 plots too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preftune import config, evaluate
from preftune.demo import assets, pairs, report
from preftune.demo.pipeline import Clock, Settings, iterate_config, load_lm, set_up
from preftune.online import iterate


class SweepError(ValueError):
    """A frontier sweep that can not run as asked; raised before any work, with the estimate and the fix."""


@dataclass(frozen=True)
class Sweep:
    betas: tuple[float, ...] = (0.05, 0.1, 0.3, 1.0)
    """DPO betas, one iterate run each (higher beta: the policy stays closer to the reference)."""
    bon: tuple[int, ...] = (2, 4, 8, 16)
    """Best-of-N values of N."""
    bon_samples: int = 16
    """Reference samples drawn per held-out prompt; best-of-N uses the first N of them, so N <= this."""
    preferred_ft: bool = True
    """Also SFT on the chosen completions of the first beta's round-1 pairs (the paper's Preferred-FT)."""
    pft_lr: float = 5e-5
    """Preferred-FT's peak learning rate (AdamW, the DPO rounds' warm-up and batch size)."""
    budget_minutes: float = 30.0
    """Refuse a sweep whose estimated time on 2 cores is longer than this."""


# seconds on the 2-core machine, from the demo's measured phases (docs/demo.md): a 24-token sample, a no-grad
# forward over one sample, a DPO step of 8 pairs with its reference forward, an SFT step of 8 examples
COST = {"sample": 0.14, "forward": 0.03, "dpo_step": 3.7, "sft_step": 1.8, "setup": 40.0, "load": 5.0}


def _steps(s: Settings) -> int:
    return math.ceil(s.prompts_per_round * s.pairs_per_prompt * s.epochs / s.batch_size)


def estimate(s: Settings, sweep: Sweep) -> dict[str, float]:
    """Seconds per part of the sweep (COST x counts); the check before any work."""
    held_out = s.eval_prompts * s.eval_samples
    evaluation = held_out * (COST["sample"] + 3 * COST["forward"]) + 2 * COST["load"]  # samples, KL, ref NLL
    dpo_round = s.prompts_per_round * s.samples_per_prompt * COST["sample"] + _steps(s) * COST["dpo_step"]
    parts = {"set-up": COST["setup"],
             "reference + best-of-N": s.eval_prompts * sweep.bon_samples * (COST["sample"] + COST["forward"])}
    for i, beta in enumerate(sweep.betas):
        reused = s.prompts_per_round * s.samples_per_prompt * COST["sample"] if i else 0.0  # round-1 samples
        parts[f"DPO beta={beta:g}"] = s.rounds * dpo_round - reused + evaluation
    if sweep.preferred_ft:
        parts["Preferred-FT"] = _steps(s) * COST["sft_step"] + evaluation
    return parts


def check(s: Settings, sweep: Sweep) -> dict[str, float]:
    """SweepError unless the sweep can run as asked and fits its budget; returns the estimate."""
    if s.loss != "dpo":
        # every trained point is labelled, plotted and checked against the targets as DPO (the paper's figure)
        raise SweepError(f"--loss {s.loss}: the frontier sweeps DPO's beta; run it without --loss, or sweep "
                         f"{s.loss} by hand with `preftune demo --loss {s.loss} --beta B`")
    if not sweep.betas:
        raise SweepError("--betas: empty; the frontier needs at least one DPO beta (the paper's figure: several)")
    if any(b <= 0 for b in sweep.betas):
        raise SweepError(f"--betas {','.join(map(str, sweep.betas))}: every beta must be > 0")
    if not sweep.bon or min(sweep.bon) < 1:
        raise SweepError(f"--bon {sweep.bon}: best-of-N needs N >= 1")
    parts = estimate(s, sweep)
    total = sum(parts.values())
    breakdown = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in parts.items())
    if max(sweep.bon) > sweep.bon_samples:
        top = max(sweep.bon)
        extra = s.eval_prompts * (top - sweep.bon_samples) * (COST["sample"] + COST["forward"]) / 60
        raise SweepError(f"--bon {top}: best-of-{top} needs {top} reference samples per prompt, but --bon-samples "
                         f"is {sweep.bon_samples}; raise --bon-samples to {top} (about {extra:.1f} more minutes) "
                         f"or drop N above {sweep.bon_samples} (estimated sweep now: {total / 60:.1f} min)")
    if total > sweep.budget_minutes * 60:
        raise SweepError(f"the sweep is estimated at {total / 60:.1f} min on 2 cores ({breakdown} min), over "
                         f"--budget-minutes {sweep.budget_minutes:g}; use fewer --betas, fewer --rounds, fewer "
                         f"--eval-prompts or a smaller --bon-samples, or raise --budget-minutes")
    return parts


def bon_kl(n: int) -> float:
    """The analytic KL of best-of-n sampling from the reference: log n - (n - 1)/n nats (an upper bound)."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: np.ndarray, n: int) -> np.ndarray:
    """rewards (P, K) of K samples per prompt -> (P,) index of the best of the first n (the first of equals)."""
    return np.argmax(rewards[:, :n], axis=1)


def point_row(method: str, label: str, param: float, samples: evaluate.Samples, rewards: np.ndarray,
              reference_logps: np.ndarray, kl: np.ndarray | float, reference_rewards: np.ndarray,
              seed: int, quality: evaluate.Quality | None = None) -> dict:
    """One row of the table: reward, paired gain and win rate against the reference's per-prompt mean reward,
    KL (per-sample estimates, or one analytic value), and the quality measures, all on the held-out prompts.
    rewards, reference_logps, kl: per sample (N,); reference_rewards: per prompt (P,)."""
    n = samples.n_per_prompt
    pol = evaluate.per_prompt_mean(rewards, n)  # (P,)
    quality = quality or evaluate.quality(samples, reference_logps)
    ci = {"seed": seed}
    if isinstance(kl, float):
        kl_ci, kl_kind = (kl, kl, kl), "analytic bound log N - (N-1)/N"
    else:
        kl_ci, kl_kind = evaluate.bootstrap_ci(evaluate.per_prompt_mean(kl, n), **ci), "sampled estimate"
    return {"method": method, "label": label, "param": param, "prompts": len(pol), "n_per_prompt": n,
            "reward": list(evaluate.bootstrap_ci(pol, **ci)),
            "gain": list(evaluate.bootstrap_ci(pol - reference_rewards, **ci)),
            "win_rate": list(evaluate.win_rate(pol, reference_rewards, **ci)),
            "kl": list(kl_ci), "kl_kind": kl_kind, "kl_per_token": kl_ci[0] / max(quality.tokens, 1e-9),
            **quality.as_dict()}


def _done(point: Path, compute: Callable[[], dict]) -> dict:
    """The point's saved result, or compute it and mark the point done (atomically)."""
    marker = point / "done.json"
    if marker.is_file():
        print(f"{point.name}: done before, skipped", flush=True)
        return json.loads(marker.read_text())
    point.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - t0
    tmp = point / ".done.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(marker)
    return result


def run_frontier(s: Settings, sweep: Sweep = Sweep(), progress: bool = True, *, model_dir: Path | None = None,
                 reviews: list[assets.Review] | None = None,
                 reward: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """The sweep; returns (and writes to `s.out/results.json`) the table. `model_dir`, `reviews`, `reward` as
    in `pipeline.run` (tests: a tiny random model, made-up reviews, a reward of their own)."""
    from preftune.train import train

    parts = check(s, sweep)  # before any work
    print(f"frontier: estimated {sum(parts.values()) / 60:.1f} min on 2 cores ("
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in parts.items()) + ")", flush=True)
    clock = Clock()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)

    clock.phase("set-up: model, reviews, reward classifier")
    # no SFT slice: the frontier's points all start from the base model
    setup = set_up(s, progress, sft=False, model_dir=model_dir, reviews=reviews, reward=reward)
    base_dir, classifier_dir, score = setup.base_dir, setup.classifier_dir, setup.score
    train_prompts, eval_prompts, tokenizer, sampling = (setup.train_prompts, setup.eval_prompts, setup.tokenizer,
                                                        setup.sampling)
    judge_name, pad_id = setup.judge_name, tokenizer.pad_token_id
    prompts_file = pairs.write_jsonl([{"prompt": p} for p in train_prompts], out / "prompts.jsonl")
    eval_file = pairs.write_jsonl([{"prompt": p} for p in eval_prompts], out / "eval_prompts.jsonl")
    rows: list[dict] = []
    shown: dict[str, list[str]] = {}  # label -> the first completion on each held-out prompt
    shown_rewards: dict[str, list[float]] = {}

    # --- the reference and best-of-N: one set of samples, every N a prefix of it ---
    clock.phase(f"reference: {sweep.bon_samples} samples x {len(eval_prompts)} held-out prompts, best-of-N")
    k = sweep.bon_samples

    def reference_point() -> dict:
        reference = load_lm(base_dir)
        drawn = evaluate.sample(reference, tokenizer, eval_prompts, n_per_prompt=k, seed=s.seed + 10_000,
                                desc="reference", **sampling)
        logps = evaluate.completion_logps(reference, drawn, pad_id=pad_id).numpy()
        return {"completion_ids": drawn.completion_ids, "completions": drawn.completions,
                "rewards": score(drawn).tolist(), "reference_logps": logps.tolist()}

    drawn = _done(out / "reference", reference_point)
    all_samples = evaluate.Samples(eval_prompts, k, [], drawn["completion_ids"], drawn["completions"])
    rewards = np.asarray(drawn["rewards"]).reshape(-1, k)  # (P, K)
    ref_logps = np.asarray(drawn["reference_logps"]).reshape(-1, k)
    reference_rewards = rewards.mean(axis=1)  # (P,) the reference's expected reward, K samples per prompt
    # its quality from one sample per prompt, as every other row's: distinct-2 falls as a corpus grows, so
    # 16 samples per prompt would read less diverse than the same model's 1
    first = evaluate.Samples(eval_prompts, 1, [], drawn["completion_ids"][::k], drawn["completions"][::k])
    rows.append(point_row("reference", "reference", 0.0, all_samples, rewards.ravel(), ref_logps.ravel(), 0.0,
                          reference_rewards, s.seed, quality=evaluate.quality(first, ref_logps[:, 0])))
    shown["reference"] = drawn["completions"][::k]
    shown_rewards["reference"] = rewards[:, 0].tolist()
    for n in sweep.bon:
        pick = best_of_n(rewards, n)  # (P,)
        flat = [p * k + int(j) for p, j in enumerate(pick)]
        chosen = evaluate.Samples(eval_prompts, 1, [], [drawn["completion_ids"][i] for i in flat],
                                  [drawn["completions"][i] for i in flat])
        label = f"best-of-{n}"
        rows.append(point_row("best-of-N", label, float(n), chosen, rewards.ravel()[flat], ref_logps.ravel()[flat],
                              bon_kl(n), reference_rewards, s.seed))
        shown[label] = chosen.completions
        shown_rewards[label] = rewards.ravel()[flat].tolist()

    # --- DPO at each beta: `preftune iterate` with the demo's config ---
    first_iterate: Path | None = None
    for beta in sweep.betas:
        label = f"DPO beta={beta:g}"
        clock.phase(f"{label}: {s.rounds} round(s) of preftune iterate")
        point = out / f"dpo-beta{beta:g}"
        cfg = config.from_dict(iterate_config(dataclasses.replace(s, beta=beta), base_dir, base_dir, point,
                                              classifier_dir, progress, prompts_file, eval_file, judge_name))

        def dpo_point(cfg=cfg, first_iterate=first_iterate) -> dict:
            run_dir = cfg.run_dir()
            if first_iterate is not None and not (run_dir / "iterate.yaml").is_file():
                # round 1 samples the reference with the same seed at every beta: the same samples and scores
                (run_dir / "round-1").mkdir(parents=True, exist_ok=True)
                config.save(cfg, run_dir / "iterate.yaml")
                for name in ("samples.json", "scores.json"):
                    shutil.copy(first_iterate / "round-1" / name, run_dir / "round-1" / name)
            iterate(cfg, progress=progress)
            evaluated = json.loads((run_dir / f"round-{s.rounds}" / "eval.json").read_text())
            return {"run_dir": str(run_dir), "samples": [{k: e[k] for k in ("completion_ids", "completion", "kl")}
                                                         for e in evaluated["samples"]]}

        result = _done(point, dpo_point)
        first_iterate = first_iterate or Path(result["run_dir"])
        rows.append(_trained_row("DPO", label, beta, result, eval_prompts, s, base_dir, score, pad_id,
                                 reference_rewards, shown, shown_rewards))

    # --- Preferred-FT: SFT on the chosen completions DPO's first round saw ---
    if sweep.preferred_ft:
        clock.phase("Preferred-FT: SFT on the chosen completions of round 1")
        point = out / "preferred-ft"

        def pft_point() -> dict:
            chosen = [{"prompt": r["prompt"], "completion": r["chosen"]}
                      for r in (json.loads(line) for line in
                                (first_iterate / "round-1" / "pairs.jsonl").read_text().splitlines())]
            cfg = config.from_dict({
                "model": {"path": str(base_dir), "tokenizer": str(base_dir)},
                "data": {"train": str(pairs.write_jsonl(chosen, point / "chosen.jsonl")), "max_length": 128,
                         "max_prompt_length": 64},
                "optim": {"lr": sweep.pft_lr, "warmup_steps": s.warmup_steps, "max_grad_norm": 10.0},
                "train": {"stage": "sft", "output_dir": str(point), "run_name": "train", "overwrite": True,
                          "batch_size": s.batch_size, "epochs": s.epochs, "seed": s.seed, "progress": progress},
            })
            policy = load_lm(train(cfg) / "final")
            held = evaluate.sample(policy, tokenizer, eval_prompts, n_per_prompt=s.eval_samples, seed=s.seed + 20_000,
                                   desc="Preferred-FT", **sampling)
            kl = evaluate.sequence_kl(policy, load_lm(base_dir), held, pad_id=pad_id)
            return {"samples": [{"completion_ids": ids, "completion": c, "kl": float(d)}
                                for ids, c, d in zip(held.completion_ids, held.completions, kl, strict=True)],
                    "pairs": len(chosen)}

        result = _done(point, pft_point)
        rows.append(_trained_row("Preferred-FT", "Preferred-FT", 0.0, result, eval_prompts, s, base_dir, score,
                                 pad_id, reference_rewards, shown, shown_rewards))

    # --- outputs ---
    clock.phase("report")
    targets = check_targets(rows)
    report.plot_frontier_curves(rows, out / "reward_vs_kl.png")
    samples = [{"prompt": eval_prompts[p], **{label: {"text": shown[label][p], "reward": shown_rewards[label][p]}
                                             for label in shown}} for p in range(len(eval_prompts))]
    results = {"points": rows, "targets": targets, "samples": samples, "settings": dataclasses.asdict(s),
               "sweep": dataclasses.asdict(sweep), "estimate_s": parts,
               "classifier_accuracy": setup.classifier.accuracy, "timing": clock.summary()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.frontier_html(rows, samples, targets, out / "reward_vs_kl.png", out / "report.html")
    print("\n" + report.frontier_table(rows) + "\n")
    print(targets["summary"])
    print(f"total {results['timing']['wall_s']:.0f} s wall ({results['timing']['cpu_s']:.0f} s CPU); wrote "
          f"{out}/results.json, reward_vs_kl.png, report.html")
    return results


def _trained_row(method: str, label: str, param: float, result: dict, eval_prompts: list[str], s: Settings,
                 base_dir: Path, score: Callable, pad_id: int, reference_rewards: np.ndarray,
                 shown: dict, shown_rewards: dict) -> dict:
    """The row of a trained model from its held-out samples (their KL terms came with them)."""
    n = s.eval_samples
    held = evaluate.Samples(eval_prompts, n, [], [e["completion_ids"] for e in result["samples"]],
                            [e["completion"] for e in result["samples"]])
    held.prompt_ids = _encode(base_dir, eval_prompts)
    reference_logps = evaluate.completion_logps(load_lm(base_dir), held, pad_id=pad_id).numpy()  # (N,)
    rewards = score(held)
    shown[label] = held.completions[::n]
    shown_rewards[label] = rewards[::n].tolist()
    return point_row(method, label, param, held, rewards, reference_logps,
                     np.asarray([e["kl"] for e in result["samples"]]), reference_rewards, s.seed)


def _encode(base_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from preftune.data import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [encode_prompt(tokenizer, t) for t in texts]


# the targets (#20): a DPO point with gain >= +0.25, its CI above 0, at KL <= 5 nats, reading no worse than
# best-of-16 (reference NLL no higher, distinct-2 no lower)
TARGET_GAIN, TARGET_KL = 0.25, 5.0


def check_targets(rows: list[dict]) -> dict:
    """Which DPO rows meet the targets, and where the best one stands if none does."""
    bon16 = next((r for r in rows if r["label"] == "best-of-16"), None)
    verdicts = []
    for r in rows:
        if r["method"] != "DPO":
            continue
        checks = {"gain >= 0.25": r["gain"][0] >= TARGET_GAIN, "gain CI above 0": r["gain"][1] > 0,
                  "KL <= 5": r["kl"][0] <= TARGET_KL}
        if bon16 is not None:
            checks["reference NLL <= best-of-16's"] = r["reference_nll"] <= bon16["reference_nll"]
            checks["distinct-2 >= best-of-16's"] = r["distinct_2"] >= bon16["distinct_2"]
        verdicts.append({"label": r["label"], "checks": checks, "met": all(checks.values())})
    met = [v["label"] for v in verdicts if v["met"]]
    lines = [f"{v['label']}: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in v["checks"].items())
             for v in verdicts]
    summary = ("targets met by: " + ", ".join(met) if met else "no DPO point meets every target") + "\n" + \
        "\n".join(lines)
    return {"met_by": met, "points": verdicts, "summary": summary}
