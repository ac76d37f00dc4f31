"""Judges: reward functions, a local reward model, an OpenAI-compatible endpoint asked in both orders."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune import judges
from preftune.config import JudgeConfig
from preftune.evaluate import Samples
from preftune.heldout import SideBySide
from preftune.modeling import byte_tokenizer

from .conftest import TINY_ARCH

KEY = "sk-test-not-a-real-key-1234"


def shouty_reward(prompts, completions):
    """A user's reward function, importable as tests.test_judges:shouty_reward."""
    return [sum(ch == "!" for ch in c) for c in completions]


def side_by_side(policy: list[str], reference: list[str], prompts: list[str], n: int = 1) -> SideBySide:
    def samples(texts):
        return Samples(prompts, n, [[0]] * len(prompts), [[1]] * len(texts), texts)
    return SideBySide(samples(policy), samples(reference))


class Endpoint:
    """A tiny OpenAI-compatible /chat/completions server on 127.0.0.1 answering by a rule."""

    def __init__(self, answer, fail_first: int = 0, fail_code: int = 500, stall_first_s: float = 0.0):
        self.answer, self.fail_first, self.fail_code, self.stall_first_s = answer, fail_first, fail_code, stall_first_s
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.auth.append(self.headers.get("Authorization"))
                n = len(endpoint.requests)
                if n == 1 and endpoint.stall_first_s:
                    time.sleep(endpoint.stall_first_s)
                if n <= endpoint.fail_first:
                    self.send_response(endpoint.fail_code)
                    self.end_headers()
                    return
                text = endpoint.answer(body["messages"][-1]["content"])
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def prefers_good(question: str) -> str:
    """A fair judge: picks whichever response says 'good'."""
    a = question.split("Response A:\n")[1].split("\n\nResponse B:")[0]
    return "A" if "good" in a else "B"


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    servers = []

    def make(answer, **kwargs):
        servers.append(Endpoint(answer, **kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def chat_cfg(server: Endpoint, **kw) -> JudgeConfig:
    return JudgeConfig(name="openai", url=server.url, model="judge-1", api_key_env="JUDGE_KEY", backoff_s=0.01, **kw)


PROMPTS = ["p0", "p1", "p2"]


def test_chat_judge_asks_both_orders_and_a_fair_judge_scores_the_better_side(endpoint):
    server = endpoint(prefers_good)
    sbs = side_by_side(["good", "good", "bad"], ["bad", "bad", "good"], PROMPTS)
    verdict = judges.judge_samples(judges.build(chat_cfg(server)), sbs, n_boot=200)
    assert verdict.wins.tolist() == [1.0, 1.0, 0.0]
    assert verdict.summary["mean"] == pytest.approx(2 / 3) and verdict.summary["invalid_replies"] == 0
    assert len(server.requests) == 6  # every pair judged in both orders
    firsts = [r["messages"][-1]["content"].split("Response A:\n")[1].split("\n")[0] for r in server.requests[:2]]
    assert firsts == ["good", "bad"]  # policy shown first, then the reference first
    assert all(r["model"] == "judge-1" for r in server.requests)
    assert set(server.auth) == {f"Bearer {KEY}"}  # the key travels in the header only ...
    assert KEY not in json.dumps(server.requests) and KEY not in json.dumps(verdict.summary)  # ... nowhere else


def test_position_biased_judge_is_neutralised_to_a_tie(endpoint):
    server = endpoint(lambda question: "A")  # always the first position, whatever it says
    sbs = side_by_side(["good", "bad", "good"], ["bad", "good", "bad"], PROMPTS)
    verdict = judges.judge_samples(judges.build(chat_cfg(server)), sbs, n_boot=200)
    assert verdict.wins.tolist() == [0.5, 0.5, 0.5]
    assert (verdict.summary["mean"], verdict.summary["low"], verdict.summary["high"]) == (0.5, 0.5, 0.5)


def test_chat_judge_retries_a_server_error_then_succeeds(endpoint):
    server = endpoint(prefers_good, fail_first=2, fail_code=503)
    judge = judges.build(chat_cfg(server, retries=3))
    assert judge.first_is_better("p", "good", "bad") == 1.0
    assert len(server.requests) == 3


def test_chat_judge_retries_a_timeout(endpoint):
    server = endpoint(prefers_good, stall_first_s=1.0)
    judge = judges.build(chat_cfg(server, retries=1, timeout_s=0.2))
    assert judge.first_is_better("p", "bad", "good") == 0.0
    assert len(server.requests) == 2


def test_chat_judge_gives_up_after_its_retries_and_says_so(endpoint):
    server = endpoint(prefers_good, fail_first=10)
    with pytest.raises(judges.JudgeError, match="failed 3 times; last: HTTP 500"):
        judges.build(chat_cfg(server, retries=2)).first_is_better("p", "a", "b")
    assert len(server.requests) == 3
    bad_request = endpoint(prefers_good, fail_first=10, fail_code=400)
    with pytest.raises(judges.JudgeError, match="refused the request: HTTP 400"):
        judges.build(chat_cfg(bad_request, retries=2)).first_is_better("p", "a", "b")
    assert len(bad_request.requests) == 1  # a client error is not retried


def test_unparseable_reply_counts_as_invalid_and_a_tie(endpoint):
    server = endpoint(lambda question: "I cannot decide.")
    judge = judges.build(chat_cfg(server))
    assert judge.first_is_better("p", "a", "b") == 0.5 and judge.invalid == 1


def test_missing_key_variable_is_named_and_its_value_never_shown(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(judges.JudgeError, match="'NO_SUCH_KEY_VAR' is not set"):
        judges.build(JudgeConfig(name="openai", url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_KEY_VAR"))


def test_named_reward_judge_and_per_prompt_win_rate():
    # 2 prompts x 2 samples; the length judge: policy longer, tie, shorter, longer
    sbs = side_by_side(["aaaa", "bb", "c", "dddd"], ["a", "bb", "ccc", "d"], ["p0", "p1"], n=2)
    verdict = judges.judge_samples(judges.build(JudgeConfig(name="length")), sbs, n_boot=200)
    assert verdict.wins.tolist() == [1.0, 0.5, 0.0, 1.0]
    assert verdict.summary["mean"] == pytest.approx((0.75 + 0.5) / 2)  # mean of per-prompt means
    assert verdict.policy_scores == [4.0, 2.0, 1.0, 4.0] and verdict.reference_scores == [1.0, 2.0, 3.0, 1.0]
    assert verdict.summary["reward_gain"]["mean"] == pytest.approx(((3 + 0) / 2 + (-2 + 3) / 2) / 2)


def test_module_function_judges_run_only_when_opted_in():
    spec = f"{__name__}:shouty_reward"
    with pytest.raises(judges.JudgeError, match="judge.allow_code=true"):
        judges.build(JudgeConfig(name=spec))
    judge = judges.build(JudgeConfig(name=spec, allow_code=True))
    assert judge.score(["p", "p"], ["hi!!", "hi"]).tolist() == [2.0, 0.0]
    with pytest.raises(judges.JudgeError, match="unknown judge 'nope'.*length.*openai.*reward_model"):
        judges.build(JudgeConfig(name="nope"))


def test_registered_reward_and_wrong_score_count():
    judges.register_reward("test_const", lambda prompts, completions: [1.0])
    with pytest.raises(judges.JudgeError, match=r"returned \(1,\) scores for 2 texts"):
        judges.build(JudgeConfig(name="test_const")).score(["p", "q"], ["a", "b"])


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_judge_scores_like_the_model_whatever_the_batching(tmp_path, num_labels):
    tok = byte_tokenizer()
    arch = dict(TINY_ARCH)
    model_type = arch.pop("model_type")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               num_labels=num_labels, **arch)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts, completions = ["Tell me: ", "Q: ", "Tell me more please: "], ["great", "a much longer answer", "no"]
    batched = judges.build(JudgeConfig(name="reward_model", path=str(tmp_path / "rm"), batch_size=3))
    single = judges.build(JudgeConfig(name="reward_model", path=str(tmp_path / "rm"), batch_size=1))
    scores = batched.score(prompts, completions)
    np.testing.assert_allclose(scores, single.score(prompts, completions), rtol=1e-5, atol=1e-5)  # padding-proof
    with torch.no_grad():
        for text, score in zip([p + c for p, c in zip(prompts, completions, strict=True)], scores, strict=True):
            logits = model(**tok(text, return_tensors="pt")).logits[0]
            expected = logits[0] if num_labels == 1 else logits.log_softmax(-1)[1]
            assert score == pytest.approx(expected.item(), abs=1e-5)


def test_reward_model_judge_needs_a_path():
    with pytest.raises(judges.JudgeError, match="judge.path"):
        judges.build(JudgeConfig(name="reward_model"))


def test_sentiment_judge_scores_with_the_demos_cached_classifier(tmp_path, monkeypatch):
    from preftune.judges.sentiment import SentimentClassifier

    # a hand-made classifier in the demo's cache format: "great" pushes towards positive, "awful" away
    vocabulary = {"great": 0, "awful": 1}
    SentimentClassifier(vocabulary, np.ones(2), np.array([4.0, -4.0]), 0.0, 0.9, 10, 10).save(tmp_path / "clf")
    judge = judges.build(JudgeConfig(name="sentiment", path=str(tmp_path / "clf")))
    low, mid, high = judge.score(["A review:"] * 3, [" awful film", " a film", " great film"])
    assert low < mid < high and mid == pytest.approx(0.5)
    # the review as a whole is scored: a positive prefix and a negative continuation cancel out exactly
    assert judge.score(["great"], [" awful"])[0] == pytest.approx(0.5)
    assert judge.score(["great"], [" film"])[0] == pytest.approx(high)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(judges.JudgeError, match="run `preftune demo` once"):
        judges.build(JudgeConfig(name="sentiment"))
