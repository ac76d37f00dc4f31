"""`preftune eval`, `generate`, in-training eval and `report` on one tiny trained run."""

import json

import pytest
import torch

from preftune import cli, config, heldout
from preftune.data import collate, load_pairs
from preftune.evaluate import sample, sequence_kl
from preftune.logps import sequence_logps
from preftune.modeling import load_model, load_tokenizer
from preftune.report import write_report
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, REPO, read_metrics, tiny_config

STEPS, EVAL_EVERY = 12, 6
SAMPLING = {"prompts": 4, "max_new_tokens": 6, "batch_size": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("eval"), data={"eval": str(EXAMPLE_PAIRS)},
                      train={"max_steps": STEPS, "eval_every": EVAL_EVERY}, eval=SAMPLING)
    return cfg, train(cfg)


def test_eval_reference_is_the_starting_model_never_the_trained_policy(run):
    cfg, run_dir = run
    target = heldout.load_target(run_dir)
    pairs, _ = load_pairs(EXAMPLE_PAIRS, target.tokenizer, cfg.data)
    loss_fn = heldout.pair_loss(cfg)
    scored = heldout.score_pairs(target.policy, target.reference, pairs, loss_fn=loss_fn,
                                 pad_id=target.tokenizer.pad_token_id, batch_size=5)
    start = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).eval()
    with torch.no_grad():
        batch = collate(pairs, target.tokenizer.pad_token_id)
        start_chosen, start_rejected = (h.logps for h in sequence_logps(start, batch).halves())
    # the reference equals the starting model, built again from config.yaml ...
    torch.testing.assert_close(scored["ref_logps/chosen"], start_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scored["ref_logps/rejected"], start_rejected, rtol=1e-5, atol=1e-4)
    # ... and not the trained policy, whose log-probs moved
    assert (scored["logps/chosen"] - scored["ref_logps/chosen"]).abs().min() > 1e-3
    # implicit rewards are beta * (policy - reference) log-ratios, the numbers the loss used in training
    torch.testing.assert_close(scored["rewards/chosen"],
                               cfg.loss.beta * (scored["logps/chosen"] - scored["ref_logps/chosen"]))
    assert scored["rewards/accuracies"].mean().item() >= 0.75  # trained on these pairs: it learned them


def test_eval_command_writes_json_with_intervals_kl_and_win_rate(run, capsys):
    _, run_dir = run
    rc = cli.main(["eval", str(run_dir), "--data", str(EXAMPLE_PAIRS), "--quiet", "judge.name=length",
                   "eval.n_boot=200"])
    assert rc == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["pairs"] == 16 and result["loss"] == "dpo"
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "ref_logps/chosen", "ref_logps/rejected", "loss"):
        stat = result["metrics"][key]
        assert stat["low"] <= stat["mean"] <= stat["high"], key
    acc = result["metrics"]["rewards/accuracies"]
    assert 0.0 <= acc["low"] <= acc["high"] <= 1.0
    # the margin's interval is the bootstrap of per-pair margins: it is wider than a point
    assert result["metrics"]["rewards/margins"]["high"] > result["metrics"]["rewards/margins"]["low"]
    kl = result["kl"]
    assert kl["samples"] == SAMPLING["prompts"] and kl["low"] <= kl["mean"] <= kl["high"]
    win = result["win_rate"]
    assert win["judge"] == "length" and 0.0 <= win["low"] <= win["mean"] <= win["high"] <= 1.0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == SAMPLING["prompts"]
    # the length judge's scores are the texts' lengths, and the win rate follows from them
    wins = [(s["policy_score"] > s["reference_score"]) + 0.5 * (s["policy_score"] == s["reference_score"])
            for s in samples]
    assert all(s["policy_score"] == len(s["policy"]) for s in samples)
    assert win["mean"] == pytest.approx(sum(wins) / len(wins))


def test_bare_model_directory_needs_an_explicit_reference(run):
    _, run_dir = run
    with pytest.raises(ValueError, match="--reference"):
        heldout.load_target(run_dir / "final")
    target = heldout.load_target(run_dir / "final", reference=run_dir / "final")
    assert target.run_dir is None


def test_generate_samples_both_models_side_by_side(run, tmp_path):
    cfg, run_dir = run
    # a reference that samples visibly differently from the policy (the tiny run barely moves its samples)
    other = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed + 1)
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "gen.jsonl"
    args = ["generate", str(run_dir), "--prompts", str(EXAMPLE_PAIRS), "--reference", str(tmp_path / "other"),
            "--out", str(out), "--num-prompts", "3", "--n", "2", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "7", "--batch-size", "4", "--quiet"]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["sample"] for r in rows] == [0, 1] * 3
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]
    target = heldout.load_target(run_dir, reference=tmp_path / "other")
    prompts = [rows[i]["prompt"] for i in (0, 2, 4)]
    settings = {"n_per_prompt": 2, "max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "seed": 7, "batch_size": 4,
                "progress": False}
    policy_texts = sample(target.policy, target.tokenizer, prompts, **settings).completions
    reference_texts = sample(target.reference, target.tokenizer, prompts, **settings).completions
    assert [r["policy"] for r in rows] == policy_texts and [r["reference"] for r in rows] == reference_texts
    assert policy_texts != reference_texts
    again = tmp_path / "again.jsonl"
    assert cli.main([str(again) if a == str(out) else a for a in args]) == 0
    assert again.read_text() == out.read_text()  # same seed, same samples


def test_in_training_eval_rows_match_offline_eval_of_the_export(run):
    cfg, run_dir = run
    rows = read_metrics(run_dir)
    evaluated = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evaluated] == [EVAL_EVERY, STEPS]
    for r in evaluated:
        assert 0.0 <= r["eval/rewards/accuracies"] <= 1.0
    assert "eval/loss" not in rows[0]
    target = heldout.load_target(run_dir)
    pairs, _ = load_pairs(cfg.data.eval, target.tokenizer, cfg.data)
    scored = heldout.score_pairs(target.policy, target.reference, pairs, pad_id=target.tokenizer.pad_token_id,
                                 loss_fn=heldout.pair_loss(cfg), batch_size=3)
    for key in heldout.PAIR_KEYS:
        assert evaluated[-1][f"eval/{key}"] == pytest.approx(scored[key].mean().item(), rel=1e-4, abs=1e-5), key
    # eval/kl: the same prompts, the same seeded samples of the export, scored by policy and reference again
    # (its arithmetic is checked by hand in test_evaluate.py::test_sequence_kl_and_the_in_training_kl_row_by_hand)
    prompts = heldout.prompts_of(pairs, target.tokenizer, cfg.eval.prompts)
    samples = sample(target.policy, target.tokenizer, prompts, n_per_prompt=cfg.eval.n_per_prompt,
                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                     progress=False)
    kl = sequence_kl(target.policy, target.reference, samples, pad_id=target.tokenizer.pad_token_id)
    assert evaluated[-1]["eval/kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-5)
    assert evaluated[-1]["eval/kl"] != evaluated[0]["eval/kl"]  # the policy moved between the two evals


def test_shards_give_every_rank_the_same_number_of_batches_and_each_item_once():
    items = list(range(10))
    shards = [heldout.shard_for_rank(items, rank, 3, batch_size=2) for rank in range(3)]
    assert {len(s) for s, _ in shards} == {4}  # ceil(10 / 3) = 4 -> 2 batches each
    counted = sorted(i for s, w in shards for i, wi in zip(s, w.tolist(), strict=True) if wi == 1.0)
    assert counted == items


def test_in_training_eval_without_sampling_logs_pair_metrics_only(tiny):
    run_dir = train(tiny(data={"eval": str(EXAMPLE_PAIRS)}, train={"max_steps": 2, "eval_every": 2},
                         eval={"prompts": 0}))
    last = read_metrics(run_dir)[-1]
    assert "eval/loss" in last and "eval/kl" not in last


def test_eval_every_without_eval_data_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="data.eval, or data.eval_fraction"):
        tiny_config(tmp_path, train={"eval_every": 5})


def test_report_has_plots_tables_and_escaped_samples(run):
    _, run_dir = run
    assert cli.main(["eval", str(run_dir), "--data", str(EXAMPLE_PAIRS), "--quiet", "judge.name=length",
                     "eval.n_boot=100"]) == 0
    with open(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "<script>alert(1)</script>", "policy": "a & b", "reference": "<b>x</b>",
                            "sample": 0}) + "\n")
    path = write_report(run_dir)
    page = path.read_text()
    assert path == run_dir / "report.html"
    assert page.count('src="data:image/png;base64,') == 5  # loss, accuracy, margin, rewards, KL
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page
    for text in ("win rate over reference (length)", "KL(policy || reference)", "rewards/accuracies"):
        assert text in page, text


def test_eval_refuses_an_unopted_code_judge_before_any_work(run, tmp_path, capsys):
    _, run_dir = run
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", str(run_dir), "--data", str(EXAMPLE_PAIRS), "--out", str(out), "--quiet",
                   "judge.name=os:system"])
    assert rc == 2 and "judge.allow_code=true" in capsys.readouterr().err
    assert not out.exists()


def test_eval_defaults_to_the_runs_eval_split_and_prompts_0_skips_sampling(run, tmp_path):
    cfg, run_dir = run
    out = tmp_path / "e.json"
    assert cli.main(["eval", str(run_dir), "--out", str(out), "--quiet", "eval.prompts=0"]) == 0
    result = json.loads(out.read_text())
    assert result["data"] == cfg.data.eval and "kl" not in result and "win_rate" not in result
    assert not (tmp_path / "samples.jsonl").exists()


@pytest.mark.parametrize("loss, train_file", [
    ({"name": "kto"}, REPO / "tests" / "fixtures" / "unpaired.jsonl"),  # unpaired: held-out pairs scored as DPO
    ({"name": "dpo", "weighting": "wpo", "ld_alpha": 0.5}, EXAMPLE_PAIRS),  # per-token modifiers
    ({"name": "bco_pair"}, EXAMPLE_PAIRS),  # running state
    ({"name": "simpo"}, EXAMPLE_PAIRS),  # reference-free: no reference, no KL
])
def test_in_training_eval_scores_held_out_pairs_for_every_kind_of_loss(tiny, loss, train_file):
    run_dir = train(tiny(loss=loss, data={"train": str(train_file), "eval": str(EXAMPLE_PAIRS)},
                         train={"max_steps": 2, "eval_every": 1}, eval={"prompts": 2, "max_new_tokens": 3}))
    rows = read_metrics(run_dir)
    for r in rows:
        assert all(r[f"eval/{k}"] == r[f"eval/{k}"] for k in heldout.PAIR_KEYS)  # present, not NaN
        assert 0.0 <= r["eval/rewards/accuracies"] <= 1.0
        assert ("eval/kl" in r) == (loss["name"] != "simpo")


def test_in_training_eval_on_the_records_eval_fraction_holds_out(tiny):
    run_dir = train(tiny(data={"eval_fraction": 0.25}, train={"max_steps": 2, "eval_every": 2},
                         eval={"prompts": 2, "max_new_tokens": 3}))
    held_out = json.loads((run_dir / "data_report.json").read_text())
    last = read_metrics(run_dir)[-1]
    assert "eval/loss" in last and "eval/kl" in last, (held_out, last)


def test_report_of_a_sampling_only_evaluation(tmp_path):
    # what a pipeline without held-out pairs (the demo) can hand over: rows, KL and win rate, samples
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69, "eval/kl": 0.5}) + "\n")
    stat = {"mean": 0.7, "low": 0.6, "high": 0.8}
    (tmp_path / "eval.json").write_text(json.dumps({"kl": stat, "win_rate": stat | {"judge": "sentiment"}}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": "p", "policy": "a", "reference": "b",
                                                        "policy_score": 0.9, "reference_score": 0.2}) + "\n")
    page = write_report(tmp_path).read_text()
    assert page.count("data:image/png;base64,") == 2  # loss and KL: only what was logged is drawn
    assert "win rate over reference (sentiment)" in page and "<th>policy score</th>" in page


def test_win_rate_against_the_datas_responses_at_each_temperature(run, tmp_path):
    _, run_dir = run
    out = tmp_path / "e.json"
    common = ["eval", str(run_dir), "--data", str(EXAMPLE_PAIRS), "--quiet", "judge.name=length", "eval.n_boot=100",
              "eval.baseline=dataset", "eval.prompts=4"]
    assert cli.main([*common, "--out", str(out), "eval.temperatures=[0, 0.5, 1.0]"]) == 0
    result = json.loads(out.read_text())
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert "win_rate" not in result and [w["temperature"] for w in result["win_rates"]] == [0.0, 0.5, 1.0]
    assert {w["baseline"] for w in result["win_rates"]} == {"dataset"} and result["kl"]["samples"] == 4
    assert len(rows) == 12 and [r["temperature"] for r in rows] == [0.0] * 4 + [0.5] * 4 + [1.0] * 4
    # the baseline is each prompt's preferred response, from the file itself
    chosen = {}
    for line in EXAMPLE_PAIRS.read_text().splitlines():
        pair = json.loads(line)
        chosen.setdefault(pair["prompt"], pair["chosen"])
    for row in rows:
        assert row["reference"] == chosen[row["prompt"].removeprefix("<bos>")]
        assert (row["policy_score"], row["reference_score"]) == (len(row["policy"]), len(row["reference"]))
    for win in result["win_rates"]:
        these = [r for r in rows if r["temperature"] == win["temperature"]]
        wins = [(r["policy_score"] > r["reference_score"]) + 0.5 * (r["policy_score"] == r["reference_score"])
                for r in these]
        assert win["mean"] == pytest.approx(sum(wins) / len(wins)) and win["prompts"] == 4
    # same seed: the sweep's samples at 1.0 are those of an evaluation at eval.temperature=1.0 alone
    single = tmp_path / "single.json"
    assert cli.main([*common, "--out", str(single)]) == 0
    alone = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in alone] == [r["policy"] for r in rows[8:]] and "temperature" not in alone[0]
    assert json.loads(single.read_text())["win_rate"]["mean"] == result["win_rates"][2]["mean"]
    # the report shows one win rate per temperature, and each sample's temperature
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    (report_dir / "eval.json").write_text(out.read_text())
    (report_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(report_dir).read_text()
    for t in ("0", "0.5", "1"):
        assert f"win rate over dataset responses at T={t} (length)" in page
    assert "<th>T</th>" in page


def test_sft_shaped_held_out_data_needs_sampling(run, capsys):
    _, run_dir = run
    data = REPO / "tests" / "fixtures" / "tldr_filtered_test.jsonl"
    assert cli.main(["eval", str(run_dir), "--data", str(data), "--quiet", "eval.prompts=0"]) == 2
    assert "holds one response per prompt (no pairs to score), and eval.prompts=0" in capsys.readouterr().err
