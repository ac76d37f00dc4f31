"""The reward-vs-KL frontier (`preftune demo --frontier`) on a tiny random model, made-up reviews and a byte
reward; and its pieces with hand-worked numbers."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from preftune import evaluate
from preftune.demo import frontier
from preftune.demo.frontier import Sweep, SweepError, best_of_n, bon_kl, check, run_frontier
from preftune.judges import SentimentJudge
from preftune.judges.sentiment import review_texts, train_classifier

from .test_demo import BAD, GOOD, TINY, byte_reward, fake_reviews

# --- pieces ---

def test_distinct_2_by_hand():
    # "a b a b" has bigrams ab, ba, ab; "a b c" adds ab, bc: 5 bigrams, 3 distinct
    assert evaluate.distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert evaluate.distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_quality_is_nll_per_token_over_all_tokens():
    samples = evaluate.Samples(["p"], 2, [[1]], [[5, 6, 7], [8]], ["x y", "z"])
    q = evaluate.quality(samples, [-6.0, -2.0])  # 8 nats over 4 tokens, not the mean of per-sample ratios
    assert q.reference_nll == pytest.approx(2.0)
    assert q.tokens == pytest.approx(2.0)


def test_bon_kl_is_the_analytic_bound():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_picks_among_the_first_n_only():
    rewards = np.array([[0.1, 0.9, 0.5, 0.95], [0.7, 0.2, 0.7, 0.1]])
    assert best_of_n(rewards, 1).tolist() == [0, 0]
    assert best_of_n(rewards, 2).tolist() == [1, 0]
    assert best_of_n(rewards, 4).tolist() == [3, 0]  # equals: the first


def test_sentiment_judge_scores_prefix_and_completion(tmp_path):
    reviews = [(" ".join([GOOD[i % 7]] * 3), 1) for i in range(20)] + [(" ".join([BAD[i % 7]] * 3), 0)
                                                                          for i in range(20)]
    clf = train_classifier([t for t, _ in reviews], [y for _, y in reviews], ["great", "awful"], [1, 0])
    clf.save(tmp_path / "clf")
    judge = SentimentJudge(str(tmp_path / "clf"))
    got = judge.score(["awful awful terrible", "great"], [" great", " film"])
    want = clf.prob_positive(["awful awful terrible great", "great film"])
    np.testing.assert_allclose(got, want)
    # the completion alone would score the first review positive; the whole review is negative
    assert clf.prob_positive([" great"])[0] > 0.5 > got[0]
    assert review_texts(["a"], [" b"]) == ["a b"]


# --- bad input: stops before any work ---

def test_bon_beyond_samples_stops_before_work(tmp_path):
    s = dataclasses.replace(TINY, out=str(tmp_path / "f"))
    with pytest.raises(SweepError, match="--bon-samples is 16; raise --bon-samples to 32"):
        run_frontier(s, Sweep(bon=(2, 32)), progress=False)
    assert not (tmp_path / "f").exists()


def test_over_budget_names_the_estimate_and_the_fix():
    with pytest.raises(SweepError, match=r"estimated at \d+\.\d min .*fewer --betas"):
        check(dataclasses.replace(TINY, eval_prompts=128, rounds=3, prompts_per_round=32, pairs_per_prompt=6),
              Sweep(betas=tuple(0.1 * (i + 1) for i in range(12))))
    with pytest.raises(SweepError, match=r"--loss ipo: the frontier sweeps DPO's beta"):
        check(dataclasses.replace(TINY, loss="ipo"), Sweep())
    parts = check(TINY, Sweep())
    assert list(parts)[:2] == ["set-up", "reference + best-of-N"] and "Preferred-FT" in parts


# --- the sweep end to end, and its resume ---

SMALL = dataclasses.replace(TINY, rounds=1)


def test_frontier_end_to_end_and_resume(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    s = dataclasses.replace(SMALL, out=str(tmp_path / "f"))
    sweep = Sweep(betas=(0.1, 1.0), bon=(1, 2, 4), bon_samples=4)
    results = run_frontier(s, sweep, progress=False, model_dir=tiny_model_dir, reviews=fake_reviews(2300),
                           reward=byte_reward)
    labels = [r["label"] for r in results["points"]]
    assert labels == ["reference", "best-of-1", "best-of-2", "best-of-4", "DPO beta=0.1", "DPO beta=1",
                      "Preferred-FT"]
    rows = {r["label"]: r for r in results["points"]}
    # best-of-1 is the reference's first sample: KL 0; best-of-N's reward never falls as N grows (nested prefixes)
    assert rows["best-of-1"]["kl"] == [0.0, 0.0, 0.0]
    bon = [rows[f"best-of-{n}"]["reward"][0] for n in (1, 2, 4)]
    assert bon == sorted(bon) and bon[2] > bon[0]
    assert rows["best-of-4"]["kl"][0] == pytest.approx(math.log(4) - 0.75)
    # the reference's reward is the mean over its 4 samples per prompt, scored on prefix + completion
    saved = json.loads((tmp_path / "f" / "reference" / "done.json").read_text())
    eval_prompts = [json.loads(line)["prompt"] for line in (tmp_path / "f" / "eval_prompts.jsonl").read_text()
                    .splitlines()]
    texts = [eval_prompts[i // 4] + c for i, c in enumerate(saved["completions"])]
    np.testing.assert_allclose(saved["rewards"], byte_reward(texts))
    assert rows["reference"]["reward"][0] == pytest.approx(np.mean(byte_reward(texts)))
    # its quality is of one sample per prompt, like every other row's (best-of-1 is exactly that sample)
    for key in ("reference_nll", "distinct_2", "tokens"):
        assert rows["reference"][key] == rows["best-of-1"][key]
    first = np.asarray(saved["reference_logps"])[::4]
    assert rows["reference"]["reference_nll"] == pytest.approx(
        -first.sum() / sum(len(ids) for ids in saved["completion_ids"][::4]))
    # the second beta reused the first's round-1 samples: the same texts, trained with another beta
    first = json.loads((tmp_path / "f" / "dpo-beta0.1" / "iterate" / "round-1" / "samples.json").read_text())
    second = json.loads((tmp_path / "f" / "dpo-beta1" / "iterate" / "round-1" / "samples.json").read_text())
    assert first == second
    for label in ("DPO beta=0.1", "DPO beta=1", "Preferred-FT"):
        assert rows[label]["kl_kind"] == "sampled estimate" and rows[label]["kl"][0] != 0.0  # a model that moved
        assert rows[label]["reference_nll"] > 0 and 0 < rows[label]["distinct_2"] <= 1
    assert (tmp_path / "f" / "reward_vs_kl.png").stat().st_size > 1000
    page = (tmp_path / "f" / "report.html").read_text()
    assert "data:image/png;base64," in page and "best-of-4" in page and "Preferred-FT" in page
    assert results["targets"]["points"][0]["label"] == "DPO beta=0.1"

    # a crash after the first DPO point: the rerun skips the finished points and recomputes the rest exactly
    for point in ("dpo-beta1", "preferred-ft"):
        (tmp_path / "f" / point / "done.json").unlink()
    reference_mtime = (tmp_path / "f" / "reference" / "done.json").stat().st_mtime_ns
    calls = []
    real = frontier.iterate
    monkeypatch.setattr(frontier, "iterate", lambda cfg, **kw: calls.append(cfg.loss.beta) or real(cfg, **kw))
    again = run_frontier(s, sweep, progress=False, model_dir=tiny_model_dir, reviews=fake_reviews(2300),
                         reward=byte_reward)
    assert calls == [1.0]  # only the unfinished DPO point ran iterate again
    assert (tmp_path / "f" / "reference" / "done.json").stat().st_mtime_ns == reference_mtime
    assert [r["reward"] for r in again["points"]] == [r["reward"] for r in results["points"]]


def test_cli_frontier_refuses_before_work(tmp_path, capsys):
    from preftune.demo import main

    out = tmp_path / "f"
    assert main(["--frontier", "--bon", "2,4,32", "--out", str(out), "--no-progress"]) == 2
    said = capsys.readouterr().out
    assert "best-of-32 needs 32 reference samples per prompt" in said and "estimated sweep now" in said
    assert not out.exists()
