"""LoRA: only adapter weights train; the merged export computes what the adapter model computes; training
continued from an adapter uses that adapter, not the bare base, as its reference; a LoRA run's directory is
evaluated, sampled, reported and exported like any run's."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import cli, config, heldout, lora
from preftune.data import collate, load_pairs
from preftune.evaluate import sample
from preftune.modeling import load_model, load_tokenizer
from preftune.reference import weights_digest
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, read_metrics

LORA = {"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def first_batch_logits(model, cfg: config.Config) -> torch.Tensor:
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tokenizer, cfg.data)
    batch = collate(pairs[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (8, T, V)


def test_lora_trains_only_adapters_and_merge_equals_adapters(tiny, tmp_path, monkeypatch):
    wrapped = []
    real_wrap = lora.wrap
    monkeypatch.setattr(lora, "wrap", lambda *a: wrapped.append(real_wrap(*a)) or wrapped[-1])
    cfg = tiny(lora=LORA, optim={"lr": 1e-2}, train={"max_steps": 5})
    run_dir = train(cfg)
    assert read_metrics(run_dir)[-1]["loss"] < 0.69  # it learned something

    (policy,) = wrapped
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}  # the configured targets
    # the base weights are bit-identical to the start; the adapters moved
    start = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).state_dict()
    for name, tensor in policy.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, start[name.replace(".base_layer", "")]), name
    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert saved and all("lora_" in n for n in saved)  # the export is the adapter alone
    assert any(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n)

    # preftune export: base + adapter merged into one plain HF model with the same outputs
    assert cli.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n in merged.state_dict())
    _, adapter_model, _ = lora.load_adapter_model(run_dir)
    want = first_batch_logits(adapter_model, cfg)
    torch.testing.assert_close(first_batch_logits(merged, cfg), want, rtol=0, atol=1e-5)
    base = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).eval()
    assert (first_batch_logits(base, cfg) - want).abs().max() > 1e-3  # the adapter changed the outputs

    with pytest.raises(FileExistsError):
        lora.merge(run_dir, tmp_path / "merged")


def test_continuing_from_an_adapter_uses_that_adapter_as_reference(tiny):
    first = train(tiny(lora=LORA, optim={"lr": 1e-2}, train={"max_steps": 5, "run_name": "first"}))
    adapter = str(first / "final")
    runs = {
        mode: tiny(lora=LORA, model={"adapter_path": adapter}, reference={"mode": mode},
                   train={"max_steps": 3, "run_name": mode})
        for mode in ("auto", "precomputed")
    }
    rows = {mode: read_metrics(train(cfg)) for mode, cfg in runs.items()}
    # at step 1 the policy is the starting adapter model: a reference equal to it gives -log sigma(0) and
    # zero rewards; the bare base (adapters off) would not, since the adapter moved the log-probs
    for mode in runs:
        assert rows[mode][0]["loss"] == pytest.approx(0.693147, abs=1e-5), mode
        assert rows[mode][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5), mode
    for a, b in zip(rows["auto"], rows["precomputed"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    # and the run keeps training the loaded adapter
    continued = load_file(runs["auto"].run_dir() / "final" / "adapter_model.safetensors")
    started = load_file(first / "final" / "adapter_model.safetensors")
    assert continued.keys() == started.keys()
    assert any(not torch.equal(continued[n], started[n]) for n in started)


def test_target_modules_from_the_command_line(tiny):
    raw = {"model": {"arch": {"model_type": "llama"}, "tokenizer": "bytes"}}
    for text in ("[q_proj, v_proj]", "q_proj,v_proj"):
        cfg = config.from_dict(config.apply_overrides(dict(raw), [f"lora.target_modules={text}"]))
        assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(config.ConfigError, match="expected a list"):
        config.from_dict({**raw, "lora": {"target_modules": 3}})


def test_unpaired_kto_with_adapters_off_equals_a_frozen_copy(tiny):
    """KTO scores matched and mismatched rows through the reference: the base with adapters off must give
    what a frozen copy gives, step after step."""
    from .test_losses_e2e import UNPAIRED

    rows = {}
    for mode in ("adapters_off", "copy"):
        cfg = tiny(loss={"name": "kto"}, data={"train": str(UNPAIRED)}, lora=LORA, optim={"lr": 5e-2},
                   reference={"mode": mode}, train={"max_steps": 6, "run_name": mode})
        rows[mode] = read_metrics(train(cfg))
    assert abs(rows["copy"][-1]["loss"] - rows["copy"][0]["loss"]) > 5e-3  # the policy moved
    for a, b in zip(rows["copy"], rows["adapters_off"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_a_lora_run_is_evaluated_sampled_reported_and_exported_from_its_directory(tiny, tmp_path, capsys):
    """A random-init base: the run directory alone (config.yaml's arch + seed, final/'s adapter) is all that
    eval, generate, report and export need; offline eval gives the numbers the loop's eval gave."""
    cfg = tiny(lora=LORA, optim={"lr": 1e-2}, reference={"mode": "adapters_off"}, data={"eval": str(EXAMPLE_PAIRS)},
               eval={"prompts": 4, "max_new_tokens": 5, "batch_size": 4},
               train={"max_steps": 3, "eval_every": 3, "run_name": "lora"})
    run_dir = train(cfg)
    # the loop's held-out eval: the adapter model against the base with adapters off
    in_training = read_metrics(run_dir)[-1]
    assert abs(in_training["eval/rewards/margins"]) > 1e-3  # the adapter moved away from the base

    assert cli.main(["eval", str(run_dir), "--quiet", "eval.n_boot=50", "judge.name=length"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    for key in heldout.PAIR_KEYS:
        assert result["metrics"][key]["mean"] == pytest.approx(in_training[f"eval/{key}"], rel=1e-4, abs=1e-5), key
    # the same prompts, seed, batches (4 prompts: no padded shard) and models: the same samples and KL
    assert result["kl"]["mean"] == pytest.approx(in_training["eval/kl"], rel=1e-4, abs=1e-5)
    assert 0.0 <= result["win_rate"]["mean"] <= 1.0

    out = tmp_path / "side_by_side.jsonl"
    assert cli.main(["generate", str(run_dir), "--prompts", str(EXAMPLE_PAIRS), "--num-prompts", "3",
                     "--max-new-tokens", "6", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    _, adapter_model, tokenizer = lora.load_adapter_model(run_dir)
    base = load_model(cfg.model, tokenizer, seed=cfg.train.seed).eval()
    prompts = [row["prompt"] for row in rows]
    settings = {"n_per_prompt": 1, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 3,
                "batch_size": 16, "progress": False}
    assert [row["policy"] for row in rows] == sample(adapter_model, tokenizer, prompts, **settings).completions
    assert [row["reference"] for row in rows] == sample(base, tokenizer, prompts, **settings).completions

    assert cli.main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "win rate over reference (length)" in page and "KL(policy || reference)" in page

    merged = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), str(merged)]) == 0
    capsys.readouterr()
    # a merged model has no config.yaml and its random base no directory: eval says which run to evaluate
    assert cli.main(["eval", str(merged), "--quiet"]) == 2
    assert f"evaluate the run itself (`preftune eval {run_dir.resolve()}`)" in capsys.readouterr().err
    assert cli.main(["eval", str(run_dir / "final"), "--quiet"]) == 2
    assert "holds a LoRA adapter, not a model: pass the run directory" in capsys.readouterr().err

    # the random base is rebuilt from arch + seed and checked against the digest the run recorded
    assert json.loads((run_dir / lora.BASE_RECORD).read_text())["sha256"] == weights_digest(base)
    reseeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
    config.save(reseeded, run_dir / "config.yaml")  # what another initialisation would look like
    with pytest.raises(ValueError, match="base_weights.json: the base rebuilt .* is not the one this run trained"):
        heldout.load_target(run_dir)


def test_a_lora_run_on_a_base_directory_evaluates_and_its_export_matches_it(tiny, tmp_path, capsys):
    """A base from a HF directory: eval rebuilds it as policy base and reference; the merged export, evaluated
    against that directory, gives the run's numbers; a base that moved away is a located error, not a hub call."""
    tokenizer = load_tokenizer(tiny().model)
    base_dir = tmp_path / "base"
    load_model(tiny().model, tokenizer, seed=5).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    cfg = tiny(model={"path": str(base_dir), "arch": {}, "tokenizer": ""}, lora=LORA, optim={"lr": 1e-2},
               data={"eval": str(EXAMPLE_PAIRS)}, eval={"prompts": 0},
               train={"max_steps": 3, "eval_every": 3, "run_name": "lora-dir"})
    run_dir = train(cfg)
    in_training = read_metrics(run_dir)[-1]
    assert abs(in_training["eval/rewards/margins"]) > 1e-3

    assert cli.main(["eval", str(run_dir), "--quiet", "eval.n_boot=50"]) == 0
    from_run = json.loads((run_dir / "eval.json").read_text())["metrics"]
    merged = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), str(merged)]) == 0
    assert cli.main(["eval", str(merged), "--reference", str(base_dir), "--data", str(EXAMPLE_PAIRS), "--quiet",
                     "--out", str(tmp_path / "merged_eval.json"), "eval.prompts=0", "eval.n_boot=50",
                     "data.max_length=128", "data.max_prompt_length=64"]) == 0
    from_export = json.loads((tmp_path / "merged_eval.json").read_text())["metrics"]
    for key in heldout.PAIR_KEYS:
        assert from_run[key]["mean"] == pytest.approx(in_training[f"eval/{key}"], rel=1e-4, abs=1e-5), key
        assert from_export[key]["mean"] == pytest.approx(from_run[key]["mean"], rel=1e-4, abs=1e-4), key

    base_dir.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"config.yaml: model.path .*base.*could not be loaded"):
        heldout.load_target(run_dir)
