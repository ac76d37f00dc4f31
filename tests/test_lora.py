"""LoRA: only adapter weights train; the merged export computes what the adapter model computes; training
continued from an adapter uses that adapter, not the bare base, as its reference."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import cli, config, lora
from preftune.data import collate, load_pairs
from preftune.modeling import load_model, load_tokenizer
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
