"""Judges decide, prompt by prompt, whether the policy's completion beats the reference's.

Two kinds:
- reward judges score each text on its own (a named reward function, a local HF sequence-classification
  reward model, or a user's `module:function`); the policy wins a sample when its score is higher.
- pairwise judges see both completions and name the better one (an OpenAI-compatible chat endpoint). They
  are asked twice, once in each order, because LLM judges favour a position: a judge that always says "A"
  splits the two orders and scores a tie.

A judge is chosen in the config, by a registered name or by an explicit `module:function` that runs only
when `judge.allow_code` is true. Nothing is ever imported or executed because a data file says so.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preftune.config import JudgeConfig
from preftune.evaluate import bootstrap_ci, per_prompt_mean

RewardFn = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, completions) -> one score each


class JudgeError(ValueError):
    """A judge could not be built or gave no usable answer; the message says which and why."""


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
    """The demo's sentiment classifier (TF-IDF + logistic regression, cached as plain arrays by `preftune
    demo`): P(positive) of the completion alone. `path` is a classifier directory; empty = the one the demo
    cached most recently."""

    def __init__(self, path: str = ""):
        from preftune.demo.assets import cache_dir
        from preftune.demo.reward import SentimentClassifier

        if not path:
            cached = sorted(cache_dir().glob("sentiment-*/classifier.json"), key=lambda f: f.stat().st_mtime)
            if not cached:
                raise JudgeError(f"judge.name=sentiment: no classifier cached under {cache_dir()}; run "
                                 "`preftune demo` once, or set judge.path to a classifier directory")
            path = str(cached[-1].parent)
        if not (Path(path) / "classifier.json").is_file():
            raise JudgeError(f"judge.path={path!r} holds no sentiment classifier (classifier.json)")
        classifier = SentimentClassifier.load(Path(path))
        super().__init__(f"sentiment:{path}", lambda prompts, completions: classifier.prob_positive(completions))


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


JUDGE_SYSTEM = ("You compare two responses to the same prompt. Reply with one letter: A if Response A is "
                "better, B if Response B is better.")


class ChatJudge:
    """Pairwise judge behind an OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp
    server, ...). The API key is read from the environment variable the config names and is only ever put
    in the Authorization header: never in messages, logs or results."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.url or not cfg.model:
            raise JudgeError("judge.name=openai needs judge.url (e.g. http://localhost:8000/v1) and judge.model")
        self.key = ""
        if cfg.api_key_env:
            self.key = os.environ.get(cfg.api_key_env, "")
            if not self.key:
                raise JudgeError(f"judge.api_key_env: environment variable {cfg.api_key_env!r} is not set; "
                                 "export it, or set judge.api_key_env='' for an endpoint without a key")
        self.name, self.cfg = f"openai:{cfg.model}", cfg
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self.invalid = 0  # replies that named neither A nor B (scored as a tie for that order)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers)
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:  # our request is wrong: retrying will not help
                    raise JudgeError(f"judge endpoint {self.endpoint} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = str(getattr(err, "reason", err))
        raise JudgeError(f"judge endpoint {self.endpoint} failed {self.cfg.retries + 1} times; last: {last}")

    def first_is_better(self, prompt: str, first: str, second: str) -> float:
        """1 if the judge prefers `first` (shown as A), 0 if `second`, 0.5 if it named neither."""
        user = (f"{self.cfg.question}\n\nPrompt:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\n"
                "Answer with A or B.")
        reply = self._post({"model": self.cfg.model, "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]})
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.endpoint} returned no choices[0].message.content") from None
        found = re.search(r"\b([AB])\b", text.strip().upper())
        if not found:
            self.invalid += 1
            return 0.5
        return 1.0 if found.group(1) == "A" else 0.0

    def policy_wins(self, prompts: list[str], policy: list[str], reference: list[str]) -> np.ndarray:
        """Per sample in [0, 1]: the mean over both presentation orders of 'the policy's text was chosen'."""
        wins = []
        for prompt, p, r in zip(prompts, policy, reference, strict=True):
            policy_first = self.first_is_better(prompt, p, r)
            reference_first = self.first_is_better(prompt, r, p)
            wins.append((policy_first + (1.0 - reference_first)) / 2)
        return np.asarray(wins)


def build(cfg: JudgeConfig) -> RewardJudge | ChatJudge:
    """The judge `cfg.name` names: openai, reward_model, a registered reward, or opted-in module:function."""
    name = cfg.name
    if name == "openai":
        return ChatJudge(cfg)
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
