"""Judges decide, prompt by prompt, whether the policy's completion beats the reference's (`preftune eval`),
and score the samples `preftune iterate` builds pairs from.

Two kinds:
- reward judges score each text on its own (a named reward function, a local HF sequence-classification
  reward model, or a user's `module:function`); the policy wins a sample when its score is higher.
- an OpenAI-compatible chat endpoint (judges/chat.py), pairwise (both orders, against position bias) or
  pointwise; the demo's sentiment classifier lives in judges/sentiment.py.

A judge is chosen in the config, by a registered name or by an explicit `module:function` that runs only
when `judge.allow_code` is true. Nothing is ever imported or executed because a data file says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preftune.config import JudgeConfig
from preftune.evaluate import bootstrap_ci, per_prompt_mean
from preftune.judges.chat import ChatJudge, JudgeError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, completions) -> one score each


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Completion length in characters: a deliberately naive judge, for smoke tests and length-bias checks."""
    return [float(len(c)) for c in completions]


# name -> "module:function" inside preftune, imported only when chosen (the demo's classifier needs
# scikit-learn and its trained weights; nobody else should pay for importing it)
REWARDS: dict[str, str] = {
    "length": "preftune.judges:length_reward",
}
_registered: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn(prompts, completions) -> scores` available as judge `name` in this process."""
    _registered[name] = fn


def _import(spec: str, where: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise JudgeError(f"{where}: cannot import {spec!r}: {err}") from None
    if not callable(obj):
        raise JudgeError(f"{where}: {spec!r} is not callable")
    return obj


class RewardJudge:
    """Scores texts with a reward function; higher is better."""

    def __init__(self, name: str, fn: RewardFn):
        self.name, self.fn = name, fn

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        scores = np.asarray(self.fn(list(prompts), list(completions)), dtype=np.float64)
        if scores.shape != (len(completions),):
            raise JudgeError(f"judge {self.name!r} returned {scores.shape} scores for {len(completions)} texts")
        return scores


class SentimentJudge(RewardJudge):
    """The sentiment classifier `preftune demo` trains (TF-IDF + logistic regression, cached as plain arrays):
    P(positive) of the review as a whole, prompt + completion (`sentiment.review_texts`). `path` is a classifier
    directory; empty = the one cached most recently."""

    def __init__(self, path: str = ""):
        from preftune.judges.sentiment import SentimentClassifier, cache_dir, latest_classifier, review_texts

        if not path:
            latest = latest_classifier()
            if latest is None:
                raise JudgeError(f"judge.name=sentiment: no classifier cached under {cache_dir()}; run "
                                 "`preftune demo` once, or set judge.path to a classifier directory")
            path = str(latest)
        if not (Path(path) / "classifier.json").is_file():
            raise JudgeError(f"judge.path={path!r} holds no sentiment classifier (classifier.json)")
        classifier = SentimentClassifier.load(Path(path))
        super().__init__(f"sentiment:{path}",
                         lambda prompts, completions: classifier.prob_positive(review_texts(prompts, completions)))


class RewardModelJudge(RewardJudge):
    """A local HF sequence-classification model scoring prompt+completion: the logit when it has one label
    (the usual reward-model head), else the log-probability of label `label` (e.g. 1 = positive)."""

    def __init__(self, path: str, *, label: int = 1, batch_size: int = 16, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # safetensors only: pickle weights run code on load, and a reward model is just another file
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the head reads the last non-pad token of each row
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.num_labels
        if labels > 1 and not -labels <= label < labels:
            raise JudgeError(f"judge.label={label} but {path} has {labels} labels")
        self.label, self.batch_size, self.max_length, self.torch = label, batch_size, max_length, torch
        super().__init__(f"reward_model:{path}", self._score)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        out: list[float] = []
        with self.torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                               completions[start:start + self.batch_size], strict=True)]
                enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                logits = self.model(**enc).logits.float()  # (b, labels)
                scores = logits[:, 0] if logits.shape[1] == 1 else logits.log_softmax(-1)[:, self.label]
                out += scores.tolist()
        return out


def build(cfg: JudgeConfig, *, cache: str | Path | None = None) -> RewardJudge | ChatJudge:
    """The judge `cfg.name` names: openai, reward_model, a registered reward, or opted-in module:function.
    `cache`: the openai judge's reply cache when judge.cache is empty."""
    name = cfg.name
    if name == "openai":
        return ChatJudge(cfg, cache=cfg.cache or cache)
    if name == "sentiment":
        return SentimentJudge(cfg.path)
    if name == "reward_model":
        if not cfg.path:
            raise JudgeError("judge.name=reward_model needs judge.path, a local sequence-classification model")
        return RewardModelJudge(cfg.path, label=cfg.label, batch_size=cfg.batch_size)
    if ":" in name:
        if not cfg.allow_code:
            raise JudgeError(f"judge.name={name!r} would import and run {name.partition(':')[0]!r}; set "
                             "judge.allow_code=true to opt in to running that code")
        return RewardJudge(name, _import(name, "judge.name"))
    if name in _registered:
        return RewardJudge(name, _registered[name])
    if name in REWARDS:
        return RewardJudge(name, _import(REWARDS[name], f"judge {name!r}"))
    choices = sorted({"openai", "reward_model", "sentiment", *REWARDS, *_registered})
    raise JudgeError(f"unknown judge {name!r}; choose from {choices} or an explicit module:function "
                     "with judge.allow_code=true")


def score_groups(judge: RewardJudge | ChatJudge, prompts: Sequence[str], completions: Sequence[str],
                 k: int) -> tuple[np.ndarray, list[str]]:
    """Scores of k samples per prompt (sample i belongs to prompt i // k), higher is better: (P * k,), NaN
    where the item could not be scored, and one line per failed item saying why. A reward function's
    non-finite score is such a failure (it would poison every pair it is in)."""
    if isinstance(judge, ChatJudge):
        return judge.score_groups(list(prompts), list(completions), k)
    scores = judge.score([prompts[i // k] for i in range(len(completions))], list(completions))
    failures = [f"prompt {i // k} sample {i % k}: score {scores[i]} is not finite"
                for i in np.flatnonzero(~np.isfinite(scores))]
    return np.where(np.isfinite(scores), scores, np.nan), failures


@dataclass
class Verdict:
    summary: dict  # JSON-ready: judge, win rate with interval, rewards for reward judges
    wins: np.ndarray  # (N,) per sample: 1 policy better, 0.5 tie, 0 reference better
    policy_scores: list[float | None]  # (N,) reward judges only; None for pairwise judges
    reference_scores: list[float | None]


def judge_samples(judge: RewardJudge | ChatJudge, sbs, *, level: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> Verdict:
    """Win rate of policy over reference on side-by-side samples, bootstrapped over prompts."""
    pol = sbs.policy
    prompts = [pol.prompts[pol.prompt_of(i)] for i in range(len(pol))]
    return judge_texts(judge, prompts, pol.completions, sbs.reference.completions, pol.n_per_prompt, level=level,
                       n_boot=n_boot, seed=seed)


def judge_texts(judge: RewardJudge | ChatJudge, prompts: Sequence[str], policy: Sequence[str],
                baseline: Sequence[str], n_per_prompt: int, *, level: float = 0.95, n_boot: int = 2000,
                seed: int = 0) -> Verdict:
    """Win rate of the policy's texts over baseline texts for the same prompts, bootstrapped over prompts.

    All three are per sample (N,), grouped by prompt, `n_per_prompt` consecutive samples each. The baseline
    is what the policy is compared with: the reference model's samples, or the data's own responses (the DPO
    paper's TL;DR reference summaries and Anthropic HH preferred responses). In the summary, `reference_*`
    names the baseline's side.
    """
    prompts, policy, baseline = list(prompts), list(policy), list(baseline)
    if not len(prompts) == len(policy) == len(baseline):
        raise ValueError(f"judge_texts needs one prompt, policy text and baseline text per sample; got "
                         f"{len(prompts)}, {len(policy)} and {len(baseline)}")
    n = n_per_prompt
    ci = {"level": level, "n_boot": n_boot, "seed": seed}
    summary: dict = {"judge": judge.name}
    if isinstance(judge, RewardJudge):
        p_scores, r_scores = judge.score(prompts, policy), judge.score(prompts, baseline)
        wins = (p_scores > r_scores) + 0.5 * (p_scores == r_scores)
        for key, values in (("policy_reward", per_prompt_mean(p_scores, n)),
                            ("reference_reward", per_prompt_mean(r_scores, n)),
                            ("reward_gain", per_prompt_mean(p_scores - r_scores, n))):
            summary[key] = dict(zip(("mean", "low", "high"), bootstrap_ci(values, **ci), strict=True))
        scores: tuple[list, list] = (p_scores.tolist(), r_scores.tolist())
    else:
        invalid_before = judge.invalid  # a judge may serve several calls (a temperature sweep): count this one's
        wins = judge.policy_wins(prompts, policy, baseline)
        summary["invalid_replies"] = judge.invalid - invalid_before
        scores = ([None] * len(wins), [None] * len(wins))
    summary.update(zip(("mean", "low", "high"), bootstrap_ci(per_prompt_mean(wins, n), **ci), strict=True))
    summary["prompts"] = len(prompts) // n
    return Verdict(summary, np.asarray(wins, dtype=np.float64), *scores)
