"""The DPO paper's TL;DR and Anthropic HH recipes end to end (SFT -> DPO -> evaluation) on fixtures written in
the public datasets' own formats, with tiny random models of the recipes' families (GPT-J, GPT-NeoX/Pythia).

The recipe YAMLs are loaded as they are; only what a CPU test can't have is overridden: the model and its size,
the step count, checkpoints and where the data lives (the recipes read hub datasets and downloads). Their
losses, beta, optimiser, schedule, lengths, precision (bf16, as FSDP2's mixed precision over a group of one
process, parallel.sharding=fsdp2 as the YAML says), evaluation and judge are exercised."""

from __future__ import annotations

import json
import math
import re

import pytest

from preftune import cli, config

from .conftest import FIXTURES, REPO, read_metrics
from .test_judges import Endpoint

STEPS = 3
TINY = {  # the recipes' model families, 2 layers of width 32, long enough for a TL;DR post in bytes
    "tldr": "{model_type: gptj, n_embd: 32, n_layer: 2, n_head: 4, rotary_dim: 4, n_positions: 1024}",
    "hh": "{model_type: gpt_neox, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
          "num_attention_heads: 4, max_position_embeddings: 1024}",
}
EVAL = ["--quiet", "eval.prompts=3", "eval.max_new_tokens=8", "eval.n_boot=200"]


def run(command: str, recipe: str, tmp_path, *overrides: str):
    """`preftune <command> configs/<recipe>.yaml` with only the model, steps, hardware and data paths changed."""
    small = [f"train.output_dir={tmp_path / 'runs'}", f"train.max_steps={STEPS}",
             "train.save_every=0", "train.progress=false"]
    assert cli.main([command, str(REPO / "configs" / f"{recipe}.yaml"), *small, *overrides]) == 0
    run_dir = tmp_path / "runs" / recipe
    return config.load(run_dir / "config.yaml"), run_dir


def sft_then_dpo(family: str, tmp_path, sft_data: str, dpo_data: list[str]):
    sft_cfg, sft_dir = run("sft", f"{family}_sft", tmp_path, "model.path=", f"model.arch={TINY[family]}",
                           "model.tokenizer=bytes", f"data.train={FIXTURES / sft_data}")
    dpo_cfg, dpo_dir = run("train", f"{family}_dpo", tmp_path, f"model.path={sft_dir / 'final'}", *dpo_data)
    return (sft_cfg, sft_dir), (dpo_cfg, dpo_dir)


def check_paper_settings(cfg: config.Config, beta: float | None) -> None:
    """Appendix B: RMSprop, lr 1e-6 warmed up linearly from 0 over 150 steps, 64 per step on 8 GPUs, clip 10."""
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_grad_norm) == ("rmsprop", 1e-6,
                                                                                                   150, 10.0)
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 64
    if beta is not None:
        assert (cfg.loss.name, cfg.loss.beta) == ("dpo", beta)


def check_stages(sft_dir, dpo_dir, sft_shape: str, sft_used: int, dpo_shape: str, dpo_used: int) -> None:
    sft_report = json.loads((sft_dir / "data_report.json").read_text())
    dpo_report = json.loads((dpo_dir / "data_report.json").read_text())
    assert (sft_report["shape"], sft_report["used"]) == (sft_shape, sft_used)
    assert (dpo_report["shape"], dpo_report["used"]) == (dpo_shape, dpo_used)
    sft_rows, dpo_rows = read_metrics(sft_dir), read_metrics(dpo_dir)
    assert len(sft_rows) == len(dpo_rows) == STEPS
    # the recipe's warm-up: step 1 runs at 1e-6 / 151
    assert sft_rows[0]["lr"] == dpo_rows[0]["lr"] == pytest.approx(1e-6 / 151)
    assert all(math.isfinite(r["loss"]) for r in sft_rows + dpo_rows)
    # DPO starts from the SFT model, which is its reference: step 1 has log-ratios 0, loss -log sigma(0)
    assert dpo_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo_rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)


def test_tldr_recipe_sft_dpo_and_win_rate_against_the_reference_summaries(tmp_path, monkeypatch):
    (sft_cfg, sft_dir), (dpo_cfg, dpo_dir) = sft_then_dpo(
        "tldr", tmp_path, "tldr_filtered.jsonl",
        [f"data.train={FIXTURES / 'tldr_comparisons.jsonl'}", f"data.eval={FIXTURES / 'tldr_filtered_test.jsonl'}"])
    check_paper_settings(sft_cfg, None)
    check_paper_settings(dpo_cfg, beta=0.5)
    assert (dpo_cfg.data.max_length, dpo_cfg.eval.baseline) == (640, "dataset")
    check_stages(sft_dir, dpo_dir, "tldr", 12, "tldr_comparisons", 15)

    # the recipe's own judge (an OpenAI-compatible endpoint with the recipe's question), served locally by a
    # judge that prefers the shorter summary; a tie in length is a tie
    def shorter(content: str) -> str:
        a = content.split("Response A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0]
        b = content.split("\n\nResponse B:\n", 1)[1].rsplit("\n\nAnswer with A or B.", 1)[0]
        return "A" if len(a) <= len(b) else "B"

    judge = Endpoint(shorter)
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    try:
        assert cli.main(["eval", str(dpo_dir), *EVAL, f"judge.url={judge.url}", "judge.api_key_env=TEST_JUDGE_KEY",
                         "judge.backoff_s=0.01"]) == 0
    finally:
        judge.close()
    result = json.loads((dpo_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (dpo_dir / "samples.jsonl").read_text().splitlines()]
    temperatures = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result["data"] == str(FIXTURES / "tldr_filtered_test.jsonl") and "metrics" not in result  # posts only
    assert [w["temperature"] for w in result["win_rates"]] == temperatures
    assert {(w["judge"], w["baseline"], w["prompts"]) for w in result["win_rates"]} == {("openai:gpt-4o", "dataset",
                                                                                         3)}
    # asked in both orders for every sample, with the recipe's question
    assert len(judge.requests) == 2 * 3 * len(temperatures)
    assert all(r["messages"][-1]["content"].startswith(dpo_cfg.judge.question) for r in judge.requests)
    # the baseline is each test post's human-written summary, after "TL;DR:" with OpenAI's leading space
    posts = [json.loads(line) for line in (FIXTURES / "tldr_filtered_test.jsonl").read_text().splitlines()]
    summary_of = {p["title"]: " " + p["summary"] for p in posts}
    for row in rows:
        title = re.search(r"\nTITLE: (.*)\n\nPOST: ", row["prompt"]).group(1)
        assert row["reference"] == summary_of[title] and row["prompt"].endswith("\n\nTL;DR:")
    for win in result["win_rates"]:
        these = [r for r in rows if r["temperature"] == win["temperature"]]
        expected = [1.0 if len(r["policy"]) < len(r["reference"]) else 0.0 if len(r["policy"]) > len(r["reference"])
                    else 0.5 for r in these]
        assert win["mean"] == pytest.approx(sum(expected) / len(expected)) and win["invalid_replies"] == 0

    # the held-out comparisons: pair metrics (the CNN/DM article row is reported and left out)
    out = tmp_path / "pairs.json"
    assert cli.main(["eval", str(dpo_dir), "--data", str(FIXTURES / "tldr_comparisons_valid.jsonl"), "--out",
                     str(out), "--quiet", "eval.prompts=0", "eval.n_boot=200", "judge.name="]) == 0
    pairs = json.loads(out.read_text())
    assert (pairs["pairs"], pairs["skipped"], pairs["beta"]) == (6, 1, 0.5)
    assert 0 <= pairs["metrics"]["rewards/accuracies"]["mean"] <= 1


def test_hh_recipe_sft_dpo_and_win_rate_against_the_chosen_responses(tmp_path):
    (sft_cfg, sft_dir), (dpo_cfg, dpo_dir) = sft_then_dpo(
        "hh", tmp_path, "hh_rlhf.jsonl",
        [f"data.train={FIXTURES / 'hh_rlhf.jsonl'}", f"data.eval={FIXTURES / 'hh_rlhf_test.jsonl'}"])
    check_paper_settings(sft_cfg, None)
    check_paper_settings(dpo_cfg, beta=0.1)
    assert (dpo_cfg.data.max_length, dpo_cfg.data.max_prompt_length, dpo_cfg.data.eval_split) == (512, 256, "test")
    # SFT uses every chosen response; DPO leaves out the record whose responses are equal (no preference)
    check_stages(sft_dir, dpo_dir, "hh", 16, "hh", 15)

    # an offline judge in place of the recipe's LLM judge: the judge is a setting
    assert cli.main(["eval", str(dpo_dir), *EVAL, "judge.name=length"]) == 0
    result = json.loads((dpo_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (dpo_dir / "samples.jsonl").read_text().splitlines()]
    assert result["pairs"] == 4 and set(result["metrics"]) >= {"rewards/accuracies", "rewards/margins"}
    assert [w["temperature"] for w in result["win_rates"]] == [0.25, 0.5, 0.75, 1.0]
    assert len(rows) == 3 * 4
    # the baseline is the test conversation's chosen response: what follows its last "\n\nAssistant:"
    tests = [json.loads(line)["chosen"] for line in (FIXTURES / "hh_rlhf_test.jsonl").read_text().splitlines()]
    chosen_of = {t[:t.rindex("\n\nAssistant:") + len("\n\nAssistant:")]: t[t.rindex("\n\nAssistant:") + 12:]
                 for t in tests}
    for row in rows:
        assert row["reference"] == chosen_of[row["prompt"].removeprefix("<bos>")]
        assert row["reference_score"] == len(row["reference"]) and row["policy_score"] == len(row["policy"])


def test_hh_iterate_recipe_two_rounds_with_a_tiny_reward_model(tmp_path):
    """The generic online-DPO path on non-demo data: HH prompts (the hh shape's prompt: the conversation up to
    the last Assistant turn), a reward-model judge built from a tiny random sequence classifier, 2 rounds."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from preftune.modeling import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    rm_config = AutoConfig.for_model("gpt_neox", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                                     pad_token_id=tok.pad_token_id, num_labels=1)
    AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    overrides = ["model.path=", f"model.arch={TINY['hh']}", "model.tokenizer=bytes",
                 f"iterate.prompts={FIXTURES / 'hh_rlhf.jsonl'}",
                 f"iterate.eval_prompts={FIXTURES / 'hh_rlhf_test.jsonl'}",
                 "iterate.num_eval_prompts=2", "iterate.rounds=2", "iterate.prompts_per_round=4",
                 "iterate.samples_per_prompt=3", "iterate.max_new_tokens=8", "iterate.min_pairs=1",
                 f"judge.path={tmp_path / 'rm'}", "train.batch_size=2", "train.grad_accum=1",
                 "train.mixed_precision=no", "train.save_every=0", "train.progress=false",
                 f"train.output_dir={tmp_path / 'runs'}"]
    assert cli.main(["iterate", str(REPO / "configs" / "hh_iterate.yaml"), *overrides]) == 0
    out = tmp_path / "runs" / "hh_iterate"
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    first_pair = json.loads((out / "round-1" / "pairs.jsonl").read_text().splitlines()[0])
    assert first_pair["prompt"].startswith("\n\nHuman: ") and first_pair["prompt"].endswith("\n\nAssistant:")
    for r in rows:
        assert r["judge"]["name"] == f"reward_model:{tmp_path / 'rm'}" and r["judge"]["dropped"] == 0
        assert 1 <= r["pairs"]["built"] <= 4  # best vs worst: at most one pair per prompt
        assert r["train"]["steps"] >= 1 and r["eval"]["prompts"] == 2
        assert r["eval"]["vs_initial"]["judge"].startswith("reward_model")
    # the recipe's reference: the initial model, precomputed once per round
    round2 = config.load(out / "round-2" / "train" / "config.yaml")
    assert (round2.reference.mode, round2.reference.path) == ("precomputed", str(out / "initial"))
    assert round2.optim.warmup_steps == 0 and round2.optim.name == "rmsprop"
