"""The controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, section 6.1) at small scale:
prompts are IMDB review prefixes, the policy should continue them positively, a sentiment classifier is the
ground-truth reward, and the result is held-out reward vs KL(policy || reference).

run(settings) top to bottom:
  set-up      GGUF -> safetensors cache, reviews split, reward classifier (cached after the first run)
  sft         (--sft) supervised fine-tuning on IMDB review continuations with `preftune.train.train`; the
              SFT model is then both the starting policy and the DPO reference, as in the paper
  baseline    reference samples on held-out prompts (and, after SFT, the original model's too)
  rounds      `preftune iterate` (preftune.online) with the demo's config (`iterate_config`): sample k
              completions per fresh training prompt from the current policy, score them with the sentiment
              judge, pair them by reward, DPO-train; the next round samples the updated policy; the last
              round's policy is sampled on the held-out prompts
  evaluate    those samples against the reference's: reward, win rate, KL, plots, side-by-side samples
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preftune import config, evaluate
from preftune.demo import assets, pairs, prompts, report
from preftune.judges import register_reward
from preftune.judges.sentiment import SentimentClassifier, load_or_train, review_texts
from preftune.online import iterate


@dataclass(frozen=True)
class Settings:
    out: str = "runs/demo"
    """Directory for pairs, training runs, results.json, plots and samples (replaced on each run)."""
    seed: int = 0
    """Seeds the review split, prompt lengths, sampling and training."""
    sft: bool = False
    """First fine-tune on IMDB review text (the paper's first step); the SFT model becomes the starting policy
    and the DPO reference."""
    sft_examples: int = 384
    """IMDB reviews (disjoint from every prompt and the classifier's) the SFT stage trains on, one epoch."""
    sft_words: int = 40
    """Each SFT example: a 2-8-word review prefix as prompt, then up to this many words of the review (cut at
    the last sentence end within them) as completion."""
    sft_lr: float = 1e-4
    """Peak learning rate of the SFT stage (AdamW, 4 warm-up steps, then constant)."""
    classifier_reviews: int = 10_000
    """IMDB reviews the reward classifier trains on (plus 2,000 held out to report its accuracy)."""
    rounds: int = 2
    """Sample -> pair -> train rounds; each round samples the policy the previous one produced."""
    prompts_per_round: int = 32
    """Fresh training prompts per round (never reused, never evaluation prompts)."""
    samples_per_prompt: int = 8
    """Completions sampled per training prompt (the paper: 4)."""
    pairs_per_prompt: int = 5
    """Pairs kept per prompt, widest reward gap first (the paper: all 6 of 4 samples)."""
    pairing: str = "all_pairs"
    """How a prompt's samples become pairs (iterate.pairing): all_pairs (every two with different rewards, the
    paper's rule) or disjoint (best vs worst, second best vs second worst, ...: no sample in two pairs)."""
    max_new_tokens: int = 24
    """Length limit of every sampled completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature for pairs and evaluation (1.0: the model's own distribution)."""
    loss: str = "dpo"
    """Preference loss of every round (`preftune losses` lists them; a paired loss: dpo, ipo, cdpo, ...)."""
    reference: str = "round_start"
    """Each round's reference: round_start (the policy the round starts from) or initial (the model round 1
    starts from, so the loss's KL term holds every round to the original model)."""
    beta: float = 1.0
    """DPO beta (the paper: 0.1; 1.0 kept the KL lowest for the most reward in `preftune demo --frontier`,
    docs/demo.md)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW, full fine-tuning)."""
    warmup_steps: int = 4
    """Linear warm-up steps of the first round (later rounds start warm)."""
    batch_size: int = 8
    """Pairs per optimiser step."""
    lora_rank: int = 0
    """LoRA adapter rank on every linear layer (alpha = 2 x rank); 0 = full fine-tuning."""
    epochs: float = 1.0
    """Passes over each round's pairs."""
    eval_prompts: int = 128
    """Held-out evaluation prompts."""
    eval_samples: int = 1
    """Completions per evaluation prompt from each of reference and policy."""
    curve_samples: int = 2
    """Samples per prompt of each round used for the KL point of the training curve (costs two forwards)."""
    sample_batch: int = 64
    """Sequences per generation batch."""


# quick: the full run's first round, trimmed to fit 3 minutes: 32 prompts x 8 samples, the 5 widest-gap pairs
# of each (160 pairs, 20 steps), the full lr, evaluated on the full run's 128 held-out prompts. One round moves
# the reward less than three (+0.046 against +0.31; docs/demo.md has the settings tried and their numbers)
QUICK = Settings(out="runs/demo-quick", classifier_reviews=10_000, rounds=1, prompts_per_round=32,
                 samples_per_prompt=8, pairs_per_prompt=5, beta=0.1, lr=5e-5, warmup_steps=4, eval_prompts=128,
                 curve_samples=0)
FULL = Settings()


def settings_dict(s: Settings) -> dict:
    return dataclasses.asdict(s)


def iterate_config(s: Settings, start: Path, tokenizer_dir: Path, out: Path, classifier_dir: Path, progress: bool,
                   prompts_file: Path, eval_prompts_file: Path, judge: str = "sentiment") -> dict:
    """The demo as a `preftune iterate` config: its rounds, prompts, sentiment judge and DPO settings."""
    return {
        "model": {"path": str(start), "tokenizer": str(tokenizer_dir)},
        "data": {"max_length": 128, "max_prompt_length": 64},
        "loss": {"name": s.loss, "beta": s.beta},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup_steps, "max_grad_norm": 10.0},
        # copy: the reference the README's numbers were measured with (precomputed gives the same losses up
        # to float rounding, tests/test_reference.py); round_start: each round against the model it starts
        # from, as the demo always trained (docs/iterate.md compares the two choices)
        # with adapters: the round's start is base + the previous round's adapter; one precomputed pass reads it
        "reference": {"mode": "auto" if s.lora_rank else "copy"},
        "lora": {"enabled": bool(s.lora_rank), "r": s.lora_rank or 16, "alpha": 2.0 * (s.lora_rank or 16)},
        "train": {"output_dir": str(out), "run_name": "iterate", "batch_size": s.batch_size, "epochs": s.epochs,
                  "seed": s.seed, "progress": progress},
        # no perf section: train() picks the fast paths itself (docs/performance.md, "Defaults")
        "judge": {"name": judge, "path": str(classifier_dir)},
        # the held-out samples: the seed the demo's policy samples always had (the reference's is seed + 10,000)
        "eval": {"seed": s.seed + 20_000, "n_per_prompt": s.eval_samples},
        "iterate": {"prompts": str(prompts_file), "eval_prompts": str(eval_prompts_file),
                    "num_eval_prompts": s.eval_prompts, "rounds": s.rounds, "prompts_per_round": s.prompts_per_round,
                    "samples_per_prompt": s.samples_per_prompt, "max_new_tokens": s.max_new_tokens,
                    "temperature": s.temperature, "sample_batch_size": s.sample_batch, "pairing": s.pairing,
                    "margin": 0.0, "max_pairs_per_prompt": s.pairs_per_prompt, "reference": s.reference,
                    "kl_samples": s.curve_samples, "eval_every": s.rounds, "eval_initial": False},
    }


def check_settings(s: Settings) -> None:
    """Raises ConfigError, before any work, for settings the rounds' config or the loss registry refuse."""
    from preftune.losses import LOSSES

    if s.loss not in LOSSES:
        raise config.ConfigError(f"--loss {s.loss!r}: not a registered loss; `preftune losses` lists them")
    scratch = Path(s.out)
    config.from_dict(iterate_config(s, scratch, scratch, scratch, scratch, False, scratch, scratch))


class Clock:
    """Wall and CPU seconds per phase: on a shared machine CPU time shows how much of the wall was ours."""

    def __init__(self) -> None:
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()
        self.phases: dict[str, dict[str, float]] = {}
        self._phase: tuple[str, float, float] | None = None

    def phase(self, name: str) -> None:
        self.stop()
        print(f"\n=== {name}  (t={self.elapsed():.0f} s) ===", flush=True)
        self._phase = (name, time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._phase is not None:
            name, wall, cpu = self._phase
            entry = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += time.process_time() - cpu
            self._phase = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_wall

    def summary(self) -> dict:
        self.stop()
        return {"wall_s": self.elapsed(), "cpu_s": time.process_time() - self.start_cpu,
                "cores": os.cpu_count(), "phases": self.phases}


def load_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()


@dataclass
class SetUp:
    """What the demo and the frontier sweep both start from: the model, the reviews' split, the reward
    classifier and its scorer, the prompts, the tokenizer, the sampling settings and the judge's name."""

    base_dir: Path
    split: prompts.Split
    classifier_dir: Path
    classifier: SentimentClassifier
    score: Callable[[evaluate.Samples], np.ndarray]  # (N,) the reward of each sample: prefix + completion
    train_prompts: list[str]
    eval_prompts: list[str]
    tokenizer: object
    sampling: dict
    judge_name: str  # the iterate judge: the classifier, or the caller's own reward registered under this name


def set_up(s: Settings, progress: bool, *, sft: bool, model_dir: Path | None,
           reviews: list[assets.Review] | None, reward: Callable[[list[str]], np.ndarray] | None) -> SetUp:
    """Model cache, reviews split, reward classifier (trained once, cached), prompts and judge."""
    from transformers import AutoTokenizer

    base_dir = model_dir or assets.model_dir()
    reviews = reviews if reviews is not None else assets.imdb_reviews()
    # the SFT slice comes last, so switching SFT on or off leaves every other slice as it was
    split = prompts.split_reviews(
        reviews, classifier_train=s.classifier_reviews, classifier_test=2000,
        train_prompts=s.rounds * s.prompts_per_round, eval_prompts=s.eval_prompts,
        sft=s.sft_examples if sft else 0, seed=s.seed)
    classifier_dir = assets.cache_dir() / f"sentiment-{s.classifier_reviews}-seed{s.seed}"
    classifier: SentimentClassifier = load_or_train(
        classifier_dir, [r.text for r in split.classifier_train],
        [r.label for r in split.classifier_train], [r.text for r in split.classifier_test],
        [r.label for r in split.classifier_test])
    print(f"reward classifier: {classifier.accuracy:.1%} held-out accuracy ({classifier.num_test} reviews)")
    classify = reward or classifier.prob_positive

    def score(samples: evaluate.Samples) -> np.ndarray:  # (N,) the whole review: prefix + completion
        texts = review_texts([samples.prompts[samples.prompt_of(i)] for i in range(len(samples))],
                             samples.completions)
        return np.asarray(classify(texts), dtype=np.float64)

    judge_name = "sentiment"
    if reward is not None:  # tests: a reward of their own in place of the classifier
        judge_name = "demo-reward"
        register_reward(judge_name, lambda ps, cs: reward(review_texts(ps, cs)))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sampling = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                "batch_size": s.sample_batch, "progress": progress}
    return SetUp(base_dir, split, classifier_dir, classifier, score,
                 prompts.make_prompts(split.train_prompts, seed=s.seed),
                 prompts.make_prompts(split.eval_prompts, seed=s.seed + 1), tokenizer, sampling, judge_name)


def run(s: Settings, progress: bool = True, *, model_dir: Path | None = None,
        reviews: list[assets.Review] | None = None,
        reward: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """The whole demo; returns (and writes to `out/results.json`) the results. `model_dir`, `reviews` and
    `reward` replace SmolLM2, the IMDB CSV and the classifier's scores (tests run the pipeline on a tiny
    random model, whose byte soup the classifier scores all alike)."""
    from preftune.train import train

    clock = Clock()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)

    # --- set-up: model cache, reviews split, reward classifier ---
    clock.phase("set-up: model, reviews, reward classifier")
    setup = set_up(s, progress, sft=s.sft, model_dir=model_dir, reviews=reviews, reward=reward)
    base_dir, split, classifier_dir, classifier, score = (setup.base_dir, setup.split, setup.classifier_dir,
                                                          setup.classifier, setup.score)
    train_prompts, eval_prompts, tokenizer, sampling = (setup.train_prompts, setup.eval_prompts, setup.tokenizer,
                                                        setup.sampling)
    pad_id = tokenizer.pad_token_id

    # --- sft (optional): the paper's first step; its model is the starting policy and the reference ---
    reference_dir = base_dir
    if s.sft:
        clock.phase(f"SFT on {len(split.sft)} IMDB review continuations")
        sft_path = pairs.write_jsonl(prompts.sft_examples(split.sft, max_words=s.sft_words, seed=s.seed + 2),
                                     out / "sft.jsonl")
        cfg = config.from_dict({
            "model": {"path": str(base_dir), "tokenizer": str(base_dir)},
            "data": {"train": str(sft_path), "max_length": 128, "max_prompt_length": 64},
            "optim": {"lr": s.sft_lr, "warmup_steps": 4, "max_grad_norm": 10.0},
            "train": {"stage": "sft", "output_dir": str(out / "train"), "run_name": "sft", "overwrite": True,
                      "batch_size": s.batch_size, "epochs": 1.0, "seed": s.seed, "progress": progress},
        })
        reference_dir = train(cfg) / "final"
    reference = load_lm(reference_dir)

    # --- baseline: the reference on held-out prompts ---
    clock.phase(f"reference samples on {len(eval_prompts)} held-out prompts")
    ref_eval = evaluate.sample(reference, tokenizer, eval_prompts, n_per_prompt=s.eval_samples,
                               seed=s.seed + 10_000, desc="reference", **sampling)
    ref_eval_rewards = score(ref_eval)
    print(f"reference mean reward {ref_eval_rewards.mean():.3f}")
    if s.sft:  # the original model on the same prompts and seed: what a run without SFT starts from
        original = load_lm(base_dir)
        orig_eval = evaluate.sample(original, tokenizer, eval_prompts, n_per_prompt=s.eval_samples,
                                    seed=s.seed + 10_000, desc="original", **sampling)
        orig_eval_rewards = score(orig_eval)
        print(f"original model mean reward {orig_eval_rewards.mean():.3f}")
    ref_quality = evaluate.quality(ref_eval, evaluate.completion_logps(reference, ref_eval, pad_id=pad_id))
    del reference  # iterate loads the models it needs

    # --- rounds: `preftune iterate` with the demo's settings (sample, score, pair, train; then evaluate) ---
    clock.phase(f"{s.rounds} round(s) of preftune iterate: {s.samples_per_prompt} samples x "
                f"{s.prompts_per_round} prompts each")
    iterate_dir = out / "iterate"
    shutil.rmtree(iterate_dir, ignore_errors=True)  # the demo's outputs are replaced on each run
    cfg = config.from_dict(iterate_config(s, reference_dir, base_dir, out, classifier_dir, progress,
                                          pairs.write_jsonl([{"prompt": p} for p in train_prompts],
                                                            out / "prompts.jsonl"),
                                          pairs.write_jsonl([{"prompt": p} for p in eval_prompts],
                                                            out / "eval_prompts.jsonl"), setup.judge_name))
    iterate(cfg, progress=progress)
    rounds = [json.loads(line) for line in (iterate_dir / "rounds.jsonl").read_text().splitlines()]
    curve: list[dict] = []
    step_rows: list[dict] = []
    total_steps = 0
    for rec in rounds:
        sampled = rec["sample_score"]  # the round's own samples: the current policy on its training prompts
        curve.append({"round": rec["round"] - 1, "step": total_steps, "reward": sampled["mean"],
                      "reward_low": sampled["low"], "reward_high": sampled["high"],
                      "kl": rec["sample_kl_to_initial"] or 0.0})
        for row in _read_jsonl(Path(rec["train"]["run_dir"]) / "metrics.jsonl"):
            step_rows.append({**row, "round": rec["round"], "step": total_steps + row["step"]})
        total_steps = step_rows[-1]["step"] if step_rows else total_steps
    policy_dir = Path(rounds[-1]["policy"])

    # --- evaluate: the last round's held-out samples, against the reference's on the same prompts ---
    clock.phase("compare with the reference")
    evaluated = json.loads((iterate_dir / f"round-{s.rounds}" / "eval.json").read_text())
    pol_eval = evaluate.Samples(eval_prompts, s.eval_samples, ref_eval.prompt_ids,
                                [e["completion_ids"] for e in evaluated["samples"]],
                                [e["completion"] for e in evaluated["samples"]])
    pol_eval_rewards = np.array([e["score"] for e in evaluated["samples"]])
    kl_per_sample = np.array([e["kl"] for e in evaluated["samples"]])
    cmp = evaluate.compare(ref_eval_rewards, pol_eval_rewards, kl_per_sample, s.eval_samples, seed=s.seed)
    # the policy's samples read by the reference: log pi_ref(y|x) = log pi(y|x) - the KL term
    pol_quality = evaluate.quality(pol_eval, evaluate.completion_logps(load_lm(reference_dir), pol_eval,
                                                                       pad_id=pad_id))
    vs_original = cmp  # without SFT the reference is the original model
    if s.sft:
        kl_original = evaluate.sequence_kl(load_lm(policy_dir), original, pol_eval, pad_id=pad_id)
        vs_original = evaluate.compare(orig_eval_rewards, pol_eval_rewards, kl_original, s.eval_samples,
                                       seed=s.seed)
    curve.append({"round": s.rounds, "step": total_steps, "reward": cmp.policy_reward[0],
                  "reward_low": cmp.policy_reward[1], "reward_high": cmp.policy_reward[2], "kl": cmp.kl[0],
                  "held_out": True})

    # --- outputs ---
    clock.phase("report")
    report.plot_training(curve, step_rows, out / "training.png")
    frontier = [
        {"label": "SFT reference" if s.sft else "reference", "kl": 0.0, "kl_low": 0.0, "kl_high": 0.0,
         "reward": cmp.reference_reward[0], "reward_low": cmp.reference_reward[1],
         "reward_high": cmp.reference_reward[2]},
        {"label": f"DPO ({s.rounds} rounds, {total_steps} steps)", "kl": cmp.kl[0], "kl_low": cmp.kl[1],
         "kl_high": cmp.kl[2], "reward": cmp.policy_reward[0], "reward_low": cmp.policy_reward[1],
         "reward_high": cmp.policy_reward[2]},
    ]
    report.plot_frontier(frontier, out / "reward_vs_kl.png")
    first = list(range(0, len(pol_eval), s.eval_samples))
    table_md = report.side_by_side(eval_prompts, [ref_eval.completions[i] for i in first],
                                   [ref_eval_rewards[i] for i in first], [pol_eval.completions[i] for i in first],
                                   [pol_eval_rewards[i] for i in first], limit=20)
    (out / "samples.md").write_text("# Held-out prompts: reference vs DPO policy\n\n" + table_md)
    table = report.results_table(cmp, classifier.accuracy, quality=(ref_quality, pol_quality))
    if s.sft:
        table += "\n\n" + report.results_table(vs_original, None, reference_name="original model")
    timing = clock.summary()
    results = {
        "evaluation": cmp.as_dict(), "evaluation_vs_original": vs_original.as_dict(),
        "quality": {"reference": ref_quality.as_dict(), "policy": pol_quality.as_dict(),
                    "kl_per_token": cmp.kl[0] / max(pol_quality.tokens, 1e-9)},
        "reference": str(reference_dir), "classifier_accuracy": classifier.accuracy,
        "classifier_reviews": {"train": classifier.num_train, "test": classifier.num_test},
        "training_curve": curve, "steps": total_steps, "settings": settings_dict(s), "timing": timing,
        "policy": str(policy_dir),
        "eval_samples": [{"prompt": eval_prompts[ref_eval.prompt_of(i)], "reference": ref_eval.completions[i],
                          "reference_reward": float(ref_eval_rewards[i]), "policy": pol_eval.completions[i],
                          "policy_reward": float(pol_eval_rewards[i]), "kl": float(kl_per_sample[i]),
                          **({"original": orig_eval.completions[i], "original_reward": float(orig_eval_rewards[i]),
                              "kl_original": float(kl_original[i])} if s.sft else {})}
                         for i in range(len(pol_eval))],
    }
    # how much of the reward its KL could buy the policy reached (round 1's scores against these results)
    from preftune.demo import headroom  # here: `python -m preftune.demo.headroom` imports this package first

    results["headroom"] = headroom.summary(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_html_report(out, step_rows, cmp, results["eval_samples"], s)
    print("\nheld-out samples (all of them in samples.md):\n" + "\n".join(table_md.splitlines()[:7]))
    print(f"\n{table}\n\nheadroom: {headroom.describe(results['headroom'])}\n")
    print(f"total {timing['wall_s']:.0f} s wall ({timing['cpu_s']:.0f} s CPU); wrote {out}/results.json, "
          f"training.png, reward_vs_kl.png, samples.md, report.html")
    return results


def write_html_report(out: Path, step_rows: list[dict], cmp: evaluate.Comparison, eval_samples: list[dict],
                      s: Settings) -> Path:
    """`out/report.html` through `preftune report`'s writer: the demo's rows, evaluation and samples laid out
    in the files that writer reads (metrics.jsonl, eval.json, samples.jsonl)."""
    from preftune.report import write_report

    def interval(t: tuple[float, float, float]) -> dict:
        return {"mean": t[0], "low": t[1], "high": t[2]}

    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in step_rows)
    win = {**interval(cmp.win_rate), "judge": "sentiment classifier", "policy_reward": interval(cmp.policy_reward),
           "reference_reward": interval(cmp.reference_reward), "reward_gain": interval(cmp.reward_gain)}
    evaluation = {"level": 0.95, "kl": interval(cmp.kl), "win_rate": win,
                  "sampling": {"prompts": cmp.num_prompts, "n_per_prompt": cmp.n_per_prompt}}
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": e["prompt"], "reference": e["reference"], "policy": e["policy"],
                                 "reference_score": e["reference_reward"], "policy_score": e["policy_reward"]})
                     + "\n" for e in eval_samples)
    return write_report(out, title=f"preftune demo: controlled sentiment, {s.rounds} round(s)")


def _first_per_prompt(samples: evaluate.Samples, k: int) -> evaluate.Samples:
    """The first k samples of every prompt, as a Samples of its own."""
    k = min(k, samples.n_per_prompt)
    keep = [i for i in range(len(samples)) if i % samples.n_per_prompt < k]
    return evaluate.Samples(samples.prompts, k, samples.prompt_ids, [samples.completion_ids[i] for i in keep],
                            [samples.completions[i] for i in keep])


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
