"""An OpenAI-compatible `/chat/completions` endpoint as a judge (OpenAI, vLLM, llama.cpp server, ...).

Two uses:
- `preftune eval`: pairwise, policy vs reference, asked in both orders (LLM judges favour a position: a judge
  that always says "A" splits the two orders and scores a tie); a reply naming neither counts as a tie.
- `preftune iterate`: scores for the k samples of each prompt, pairwise (every two samples in both orders; a
  sample's score is its share of wins) or pointwise (a score from 1 to 10 per sample). Here an item whose
  reply is malformed is asked again (up to judge.retries), then dropped and counted, never guessed.

Every valid reply can be kept in a JSONL cache keyed by the request, so a rerun never asks (or pays) twice.
The API key is read from the environment variable the config names and is only ever put in the
Authorization header: never in messages, logs, results or the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from preftune.config import JudgeConfig


class JudgeError(ValueError):
    """A judge could not be built or gave no usable answer; the message says which and why."""


JUDGE_SYSTEM = ("You compare two responses to the same prompt. Reply with one letter: A if Response A is "
                "better, B if Response B is better.")
SCORE_SYSTEM = ("You rate one response to a prompt. Reply with a single number from 1 (useless) to 10 "
                "(excellent), nothing else.")


class ChatJudge:
    """Pairwise or pointwise judge behind an OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(self, cfg: JudgeConfig, cache: str | Path | None = None):
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
        self.invalid = 0  # eval: replies that named neither A nor B (scored as a tie for that order)
        self.requests = 0  # requests actually sent (cache hits are not)
        self.cache_path = Path(cache or cfg.cache) if (cache or cfg.cache) else None
        self.cache: dict[str, str] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:  # a run killed mid-write leaves at most its last line cut short: skip it
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    # --- transport ---

    def _send(self, body: dict) -> dict:
        """One request; urllib's errors pass through for the caller's retry policy."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers)
        self.requests += 1
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            return json.loads(response.read())

    def _post(self, body: dict) -> dict:
        """The reply to `body`, retrying timeouts, connection errors, 429 and 5xx; an error after the last try."""
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return self._send(body)
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:  # our request is wrong: retrying will not help
                    raise JudgeError(f"judge endpoint {self.endpoint} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                last = str(getattr(err, "reason", err))
        raise JudgeError(f"judge endpoint {self.endpoint} failed {self.cfg.retries + 1} times; last: {last}")

    def check_reachable(self) -> None:
        """One tiny request before any model work: a judge that is down stops the run now, naming the URL."""
        body = {"model": self.cfg.model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": "Reply with A."}]}
        try:
            self._post(body)
        except JudgeError as err:
            raise JudgeError(f"judge endpoint {self.endpoint} is not answering, so the run stops before any "
                             f"training: {err}") from None

    def _ask(self, body: dict, parse) -> tuple[object | None, str]:
        """(parsed reply, "") or (None, why) after judge.retries further tries. A malformed reply is retried
        like a timeout; only valid replies are cached."""
        key = self._key(body)
        if key in self.cache:
            return parse(self.cache[key]), ""
        why = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._send(body)
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    raise JudgeError(f"judge endpoint {self.endpoint} refused the request: HTTP {err.code}") from None
                why = f"HTTP {err.code}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                why = f"no reply ({getattr(err, 'reason', err)})"
                continue
            text = _content(reply)
            value = parse(text) if text is not None else None
            if value is None:
                why = (f"malformed reply {text[:60]!r}" if text is not None
                       else "reply without choices[0].message.content")
                continue
            self._remember(key, text)
            return value, ""
        return None, why

    def _key(self, body: dict) -> str:
        return hashlib.sha256(json.dumps([self.endpoint, body], sort_keys=True).encode()).hexdigest()

    def _remember(self, key: str, text: str) -> None:
        """Keep a valid reply, in memory and (appended, flushed at once) in the cache file."""
        if key in self.cache:
            return
        self.cache[key] = text
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": text}) + "\n")

    # --- eval: policy vs reference ---

    def first_is_better(self, prompt: str, first: str, second: str) -> float:
        """1 if the judge prefers `first` (shown as A), 0 if `second`, 0.5 if it named neither."""
        body = self._pairwise_body(prompt, first, second)
        key = self._key(body)
        if self.cache_path is not None and key in self.cache:  # no cache file: every question is asked
            text = self.cache[key]
        else:
            text = _content(self._post(body))
            if text is None:
                raise JudgeError(f"judge endpoint {self.endpoint} returned no choices[0].message.content")
        letter = _letter(text)
        if letter is None:
            self.invalid += 1
            return 0.5
        if self.cache_path is not None:
            self._remember(key, text)
        return 1.0 if letter == "A" else 0.0

    def policy_wins(self, prompts: list[str], policy: list[str], reference: list[str]) -> np.ndarray:
        """Per sample in [0, 1]: the mean over both presentation orders of 'the policy's text was chosen'."""
        wins = []
        for prompt, p, r in zip(prompts, policy, reference, strict=True):
            policy_first = self.first_is_better(prompt, p, r)
            reference_first = self.first_is_better(prompt, r, p)
            wins.append((policy_first + (1.0 - reference_first)) / 2)
        return np.asarray(wins)

    # --- iterate: scores for the k samples of each prompt ---

    def score_groups(self, prompts: list[str], completions: list[str], k: int) -> tuple[np.ndarray, list[str]]:
        """(scores (P * k,), failures): NaN where no valid score could be had; one line per failed item."""
        if self.cfg.mode == "pointwise":
            return self._pointwise(prompts, completions, k)
        return self._pairwise(prompts, completions, k)

    def _pointwise(self, prompts: list[str], completions: list[str], k: int) -> tuple[np.ndarray, list[str]]:
        scores = np.full(len(completions), np.nan)
        failures = []
        for i, completion in enumerate(completions):
            prompt = prompts[i // k]
            user = f"{self.cfg.question}\n\nPrompt:\n{prompt}\n\nResponse:\n{completion}\n\nScore from 1 to 10:"
            body = {"model": self.cfg.model, "temperature": 0, "max_tokens": 8, "messages": [
                {"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]}
            value, why = self._ask(body, _score)
            if value is None:
                failures.append(f"prompt {i // k} sample {i % k}: {why}")
            else:
                scores[i] = value
        return scores, failures

    def _pairwise(self, prompts: list[str], completions: list[str], k: int) -> tuple[np.ndarray, list[str]]:
        """Each two samples of a prompt in both orders; a comparison counts only when both orders answered.
        A sample's score: its mean over valid comparisons of 1 (won both), 0.5 (split) or 0 (lost both)."""
        scores = np.full(len(completions), np.nan)
        failures = []
        for p, prompt in enumerate(prompts):
            wins = {i: [] for i in range(k)}
            for i, j in itertools.combinations(range(k), 2):
                a, b = completions[p * k + i], completions[p * k + j]
                i_first, why_1 = self._ask(self._pairwise_body(prompt, a, b), _letter)
                j_first, why_2 = self._ask(self._pairwise_body(prompt, b, a), _letter)
                if i_first is None or j_first is None:
                    failures.append(f"prompt {p} samples {i} vs {j}: {why_1 or why_2}")
                    continue
                i_wins = ((i_first == "A") + (j_first == "B")) / 2
                wins[i].append(i_wins)
                wins[j].append(1 - i_wins)
            for i, won in wins.items():
                if won:
                    scores[p * k + i] = float(np.mean(won))
        return scores, failures

    def _pairwise_body(self, prompt: str, first: str, second: str) -> dict:
        user = (f"{self.cfg.question}\n\nPrompt:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\n"
                "Answer with A or B.")
        return {"model": self.cfg.model, "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]}


def _content(reply: object) -> str | None:
    try:
        text = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def _letter(text: str) -> str | None:
    found = re.search(r"\b([AB])\b", text.strip().upper())
    return found.group(1) if found else None


def _score(text: str) -> float | None:
    """The reply's score if it is a number from 1 to 10 (and nothing else but punctuation or '/10')."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*", text)
    if not found:
        return None
    value = float(found.group(1))
    return value if 1 <= value <= 10 else None
