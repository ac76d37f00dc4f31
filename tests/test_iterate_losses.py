"""`preftune iterate` beyond paired full-weight DPO: the unpaired rules by hand, KTO rounds through the same
train(), and LoRA rounds whose policy is the initial model plus one adapter trained further each round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune import config, iterate, lora, online
from preftune.online import IterateError
from preftune.pairing import make_pairs, unpaired_by_threshold, unpaired_from_pairs

from .test_iterate import iterate_raw, records

NAN = math.nan


# --- unpaired rules, hand-worked ---

def test_pair_sides_labels_each_completion_once_and_drops_the_conflicting():
    # all_pairs on scores 1, 3, 2: (y>x), (z>x), (y>z): y only chosen, x only rejected, z on both sides
    pairs, _ = make_pairs(["p", "q"], ["x", "y", "z", "u", "v", "w"], [1.0, 3.0, 2.0, 5.0, 5.0, 5.0], 3,
                          rule="all_pairs")
    examples, counts = unpaired_from_pairs(["p", "q"], pairs)
    assert [(e["prompt"], e["completion"], e["label"], e["score"]) for e in examples] == [
        ("p", "y", True, 3.0), ("p", "x", False, 1.0)]
    # q's three samples tie: no pair, so no example either
    assert (counts.desirable, counts.undesirable, counts.conflicting, counts.prompts_without_example) == (1, 1, 1, 1)
    # best_worst never conflicts: one desirable and one undesirable per paired prompt
    pairs, _ = make_pairs(["p", "q"], ["x", "y", "z", "u", "v", "w"], [1.0, 3.0, 2.0, 5.0, 4.0, 5.0], 3)
    examples, counts = unpaired_from_pairs(["p", "q"], pairs)
    assert [(e["completion"], e["label"]) for e in examples] == [("y", True), ("x", False), ("u", True), ("v", False)]
    assert (counts.desirable, counts.undesirable, counts.conflicting) == (2, 2, 0)


def test_threshold_splits_every_scored_sample_with_a_dead_zone():
    prompts = ["p", [{"role": "user", "content": "hi"}]]
    completions = ["a", "b", "", "c", "d", "e"]
    scores = [0.9, -0.5, 2.0, 0.05, NAN, -0.2]
    examples, counts = unpaired_by_threshold(prompts, completions, scores, 3, threshold=0.0, margin=0.1)
    # a above 0.1: desirable; b below -0.1: undesirable; "" empty; c within 0.1 of 0: a tie; d unscored
    assert [(e["completion"], e["label"]) for e in examples] == [
        ("a", True), ("b", False), ([{"role": "assistant", "content": "e"}], False)]
    assert (counts.desirable, counts.undesirable, counts.ties, counts.empty, counts.unscored) == (1, 2, 1, 1, 1)
    assert counts.prompts_without_example == 0
    examples, counts = unpaired_by_threshold(prompts, completions, scores, 3, threshold=1.0)
    assert [e["label"] for e in examples] == [False, False, False, False]  # nothing scores above 1
    with pytest.raises(ValueError, match="5 scores for 2 prompts x 3"):
        unpaired_by_threshold(prompts, completions, scores[:5], 3)


# --- KTO rounds end to end ---

def kto_raw(tmp_path, **iterate_section):
    return iterate_raw(tmp_path, loss={"name": "kto", "beta": 0.1}, iterate=iterate_section)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kto_rounds_train_on_desirable_and_undesirable_completions(tmp_path):
    out = iterate(config.from_dict(kto_raw(tmp_path, pairing="best_worst")))
    for rec in records(out):
        rd = out / f"round-{rec['round']}"
        examples, pairs = read_jsonl(rd / "unpaired.jsonl"), read_jsonl(rd / "pairs.jsonl")
        kept = rec["pairs"]["unpaired"]
        # best_worst + pair_sides: each pair's chosen side desirable, its rejected side undesirable
        assert kept["rule"] == "pair_sides" and kept["desirable"] == kept["undesirable"] == len(pairs) > 0
        assert sorted(e["completion"] for e in examples if e["label"]) == sorted(p["chosen"] for p in pairs)
        assert sorted(e["completion"] for e in examples if not e["label"]) == sorted(p["rejected"] for p in pairs)
        run = rd / "train"
        saved = config.load(run / "config.yaml")
        assert (saved.data.train, saved.data.shape, saved.loss.name) == (str(rd / "unpaired.jsonl"), "unpaired", "kto")
        # KTO scores mismatched rows the table does not hold: the initial model is read from disk
        assert (saved.reference.mode, saved.reference.path) == ("path", str(out / "initial"))
        report = json.loads((run / "data_report.json").read_text())
        assert report["used"] == len(examples)  # train() read every example through data.load_unpaired
        assert rec["train"]["steps"] == math.ceil(len(examples) / 2)
        rows = read_jsonl(run / "metrics.jsonl")
        assert all(math.isfinite(row["loss"]) for row in rows)
    assert records(out)[1]["start"] == records(out)[0]["policy"]


def test_kto_threshold_rule_and_too_few_examples_stop_naming_the_round(tmp_path):
    # the length judge scores a completion by its characters: a threshold of 20 splits the samples
    out = iterate(config.from_dict(kto_raw(tmp_path, unpaired_rule="threshold", threshold=20.0, rounds=1)))
    (rec,) = records(out)
    examples = read_jsonl(out / "round-1" / "unpaired.jsonl")
    kept = rec["pairs"]["unpaired"]
    assert kept["desirable"] + kept["undesirable"] + kept["ties"] + kept["empty"] == 12 == rec["samples"]
    assert all((e["score"] > 20) == e["label"] for e in examples) and len(examples) == kept["desirable"] + \
        kept["undesirable"]
    raw = kto_raw(tmp_path, unpaired_rule="threshold", threshold=20.0, rounds=1, min_pairs=50)
    raw["train"]["run_name"] = "few"
    with pytest.raises(IterateError, match=r"round 1: \d+ unpaired completions kept \(\d+ desirable, \d+ "
                                           r"undesirable\), fewer than iterate.min_pairs=50 \(4 prompts x 3 samples, "
                                           r"0 judge item\(s\) failed; iterate.unpaired_rule='threshold' dropped"):
        iterate(config.from_dict(raw))
    assert not (tmp_path / "runs" / "few" / "round-1" / "train").exists()


# --- LoRA rounds ---

LORA = {"enabled": True, "r": 4, "alpha": 8.0}


def test_lora_rounds_train_one_adapter_on_the_initial_model_against_it(tmp_path):
    out = iterate(config.from_dict(iterate_raw(tmp_path, lora=LORA, optim={"lr": 1e-2})))
    first, second = records(out)
    initial = out / "initial"
    assert lora.is_adapter_dir(first["policy"]) and lora.is_adapter_dir(second["policy"])
    assert second["start"] == first["policy"]
    one, two = (config.load(out / f"round-{r}" / "train" / "config.yaml") for r in (1, 2))
    # round 1: fresh adapters on the initial model, which is then the policy with its adapters off
    assert (one.model.path, one.model.adapter_path, one.reference.mode) == (str(initial), "", "adapters_off")
    # round 2: round 1's adapter trained further on the same base; the initial model as a precomputed table
    assert (two.model.path, two.model.adapter_path) == (str(initial), first["policy"])
    assert (two.reference.mode, two.reference.path) == ("precomputed", str(initial))
    # round 2's policy at its first step is round 1's: its first loss is not DPO's log 2 of policy == reference
    rows = read_jsonl(out / "round-2" / "train" / "metrics.jsonl")
    assert abs(rows[0]["loss"] - math.log(2)) > 1e-4
    # a 4-prompt Monte Carlo estimate of KL may fall below 0; exactly 0 only for the initial model itself
    assert second["sample_kl_to_initial"] != 0.0 and second["eval"]["kl_to_initial"]["mean"] != 0.0
    # the round's policy, as sampling and eval load it, is the base + adapter that lora.py's builder gives
    policy = online.Models(config.from_dict(iterate_raw(tmp_path, lora=LORA)), None).get(Path(second["policy"]))
    _, built, tokenizer = lora.load_adapter_model(out / "round-2" / "train")
    ids = torch.tensor([tokenizer.encode("Question 3: what is 3 plus 3?")])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, built.eval()(ids).logits)
        base = online.Models(config.from_dict(iterate_raw(tmp_path)), tokenizer).get(initial)
        assert not torch.allclose(policy(ids).logits, base(ids).logits, atol=1e-4)  # the adapter moved it


def test_lora_round_start_reference_is_the_round_s_adapter_model(tmp_path):
    raw = iterate_raw(tmp_path, lora=LORA, optim={"lr": 1e-2}, iterate={"reference": "round_start"})
    out = iterate(config.from_dict(raw))
    rows = read_jsonl(out / "round-2" / "train" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == its round-start reference
    with pytest.raises(config.ConfigError, match="adapters_off.*round_start"):
        raw = iterate_raw(tmp_path, lora=LORA, reference={"mode": "adapters_off"},
                          iterate={"reference": "round_start"}, train={"run_name": "off"})
        iterate(config.from_dict(raw))


@pytest.mark.parametrize("loss, lora_on, choice, mode, adapter_start, want", [
    # loss,  LoRA,  iterate.reference, reference.mode, start is an adapter -> (mode, path) of the round
    ("dpo", False, "initial", "auto", False, ("precomputed", "initial")),
    ("kto", False, "initial", "auto", False, ("path", "initial")),  # mismatched rows: no table
    ("kto", False, "round_start", "auto", False, ("auto", "")),  # train() resolves it: a copy of the start
    ("dpo", True, "initial", "auto", False, ("adapters_off", "")),  # round 1: fresh adapters on the initial
    ("dpo", True, "initial", "adapters_off", True, ("precomputed", "initial")),  # round 2+: read from disk
    ("kto", True, "initial", "auto", True, ("path", "initial")),
    ("dpo", True, "initial", "copy", True, ("path", "initial")),
    ("dpo", True, "round_start", "auto", True, ("precomputed", "")),  # the adapter model's starting weights
    ("kto", True, "round_start", "auto", True, ("auto", "")),  # train(): a copy of the adapter model
    ("simpo", True, "initial", "auto", True, ("auto", "")),  # reference-free: nothing to build
])
def test_round_config_picks_the_reference_each_loss_and_lora_setting_needs(tmp_path, loss, lora_on, choice, mode,
                                                                            adapter_start, want):
    raw = iterate_raw(tmp_path, loss={"name": loss}, reference={"mode": mode}, iterate={"reference": choice},
                      lora=LORA if lora_on else {"enabled": False})
    initial, start = tmp_path / "initial", tmp_path / "round-1" / "train" / "final"
    start.mkdir(parents=True)
    if adapter_start:
        (start / lora.ADAPTER_CONFIG).write_text("{}")
    cfg = online.round_config(config.from_dict(raw), 2, start, initial, tmp_path / "d.jsonl", tmp_path / "r2")
    path = {"initial": str(initial), "": ""}[want[1]]
    assert (cfg.reference.mode, cfg.reference.path) == (want[0], path)
    base_and_adapter = (str(initial), str(start)) if adapter_start else (str(start), "")
    assert (cfg.model.path, cfg.model.adapter_path) == base_and_adapter
    assert cfg.data.shape == ("unpaired" if loss == "kto" else "pairs")
