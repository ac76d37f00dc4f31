"""Every way of holding the reference gives the same numbers; the precomputed cache is used, reused and
invalidated; the reference never sees trained weights."""

import dataclasses
import gc
import weakref

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from preftune import config, lora, reference
from preftune.data import collate, load_pairs
from preftune.logps import sequence_logps
from preftune.losses import bind, pair_logps
from preftune.modeling import load_model, load_tokenizer
from preftune.reference import Reference
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, read_metrics, tiny_config

TIMING_KEYS = {"tokens_per_s"}


def step0_scores(cfg: config.Config) -> dict[str, torch.Tensor]:
    """Reference logps, loss and rewards on the first 8 pairs after the trainable weights moved away from
    the start (as if trained), with the reference set up exactly as train() sets it up."""
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = load_pairs(cfg.data.train, tokenizer, cfg.data)
    policy = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    if cfg.lora.enabled:
        policy = lora.wrap(policy, cfg.lora, cfg.model.adapter_path)
    ref = Reference.build(cfg, policy, tokenizer)
    policy = accelerator.prepare(policy)
    ref.prepare(cfg, accelerator, policy, tokenizer, pairs)
    # move every trainable weight: a reference that shares or re-reads the policy's weights now differs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(policy.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = collate(pairs[:8], tokenizer.pad_token_id)
    with torch.no_grad():
        policy_chosen, policy_rejected = sequence_logps(policy, batch).halves()
        ref_chosen, ref_rejected = ref.scores(batch, pairs[:8]).halves()
    out = bind(cfg.loss)(pair_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return {"ref_chosen": ref_chosen.logps, "ref_rejected": ref_rejected.logps, "loss": out.losses.mean(),
            "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": out.accuracies().float().mean()}


def save_start_model(cfg: config.Config, out) -> str:
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, tokenizer, seed=cfg.train.seed).save_pretrained(out, safe_serialization=True)
    return str(out)


def test_every_reference_mode_gives_the_same_loss_and_metrics(tiny, tmp_path):
    base = tiny()
    init = save_start_model(base, tmp_path / "init")
    full = {
        "copy": tiny(reference={"mode": "copy"}),
        "precomputed": tiny(reference={"mode": "precomputed"}),
        "path": tiny(reference={"mode": "path", "path": init}),
        "precomputed_from_path": tiny(reference={"mode": "precomputed", "path": init}),
    }
    on = {"enabled": True, "r": 4, "alpha": 8.0}
    with_lora = {
        "adapters_off": tiny(lora=on, reference={"mode": "adapters_off"}),
        "lora_copy": tiny(lora=on, reference={"mode": "copy"}),
        "lora_precomputed": tiny(lora=on, reference={"mode": "precomputed"}),
        "lora_path": tiny(lora=on, reference={"mode": "path", "path": init}),
    }
    assert Reference.resolve_mode(base) == "copy"
    assert Reference.resolve_mode(tiny(lora=on)) == "adapters_off"
    assert Reference.resolve_mode(tiny(reference={"path": init})) == "path"
    scores = {name: step0_scores(cfg) for name, cfg in {**full, **with_lora}.items()}

    want = scores["copy"]
    assert abs(want["loss"].item() - 0.6931) > 0.01  # the policy moved: a non-trivial loss to agree on
    for name, got in scores.items():  # the reference is the starting model in every mode
        torch.testing.assert_close(got["ref_chosen"], want["ref_chosen"], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got["ref_rejected"], want["ref_rejected"], rtol=0, atol=1e-5, msg=name)
    for group in (full, with_lora):  # same policy within a group: same loss and metrics
        first = scores[next(iter(group))]
        for name in group:
            for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
                torch.testing.assert_close(scores[name][key], first[key], rtol=0, atol=1e-5, msg=f"{name} {key}")


def test_precomputed_run_follows_the_on_the_fly_trajectory(tiny):
    steps = {"max_steps": 6}
    runs = {
        "copy": tiny(train={**steps, "run_name": "copy"}, reference={"mode": "copy"}),
        "precomputed": tiny(train={**steps, "run_name": "pre"}, reference={"mode": "precomputed"}),
        "adapters_off": tiny(train={**steps, "run_name": "off"}, lora={"enabled": True, "r": 4},
                             optim={"lr": 1e-2}),
        "lora_precomputed": tiny(train={**steps, "run_name": "lpre"}, lora={"enabled": True, "r": 4},
                                 optim={"lr": 1e-2}, reference={"mode": "precomputed"}),
    }
    rows = {name: read_metrics(train(cfg)) for name, cfg in runs.items()}
    for on_the_fly, cached in (("copy", "precomputed"), ("adapters_off", "lora_precomputed")):
        assert rows[on_the_fly][-1]["loss"] < 0.6  # the policy moved, so the reference mattered
        for a, b in zip(rows[on_the_fly], rows[cached], strict=True):
            for key in a.keys() - TIMING_KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (cached, a["step"], key)


def test_precomputed_serves_wpo_weighting_like_a_copy(tiny):
    rows = {mode: read_metrics(train(tiny(loss={"name": "dpo", "weighting": "wpo"}, reference={"mode": mode},
                                          train={"max_steps": 3, "run_name": mode})))
            for mode in ("copy", "precomputed")}
    assert rows["copy"][-1]["loss"] != pytest.approx(rows["copy"][0]["loss"], abs=1e-3)
    for a, b in zip(rows["copy"], rows["precomputed"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_precomputed_logps_are_read_from_the_cache_and_used(tiny, monkeypatch):
    first = tiny(train={"max_steps": 1, "run_name": "first"}, reference={"mode": "precomputed"})
    train(first)
    (cache_file,) = (first.run_dir().parent / "ref_cache").iterdir()
    table = load_file(cache_file)["logps"]  # (16, 2): chosen, rejected of every pair
    assert table.shape == (16, 2) and (table < 0).all()
    # shift every reference chosen logp by +1: at step 1 (policy == start) h = -1, loss = -log sigma(-beta)
    save_file({"logps": table + torch.tensor([1.0, 0.0])}, cache_file)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached table should have been reused")

    monkeypatch.setattr(reference, "precompute_logps", no_recompute)
    second = config.replace(first, "train.run_name", "second")
    (row,) = read_metrics(train(second))
    beta = first.loss.beta
    assert row["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-beta)).item(), abs=1e-5)
    assert row["rewards/chosen"] == pytest.approx(-beta, abs=1e-5)


def test_cache_is_invalidated_when_model_data_or_settings_change(tiny, tmp_path):
    cache = tmp_path / "cache"
    few = tmp_path / "few.jsonl"
    few.write_text("".join(EXAMPLE_PAIRS.read_text().splitlines(keepends=True)[:12]))

    def cached_files(**sections) -> int:
        sections.setdefault("reference", {}).update(mode="precomputed", cache_dir=str(cache))
        sections.setdefault("train", {}).update(max_steps=1, overwrite=True)
        train(tiny(**sections))
        return len(list(cache.iterdir()))

    assert cached_files() == 1
    assert cached_files() == 1  # same model, data and settings: reused
    assert cached_files(data={"train": str(few)}) == 2  # other pairs
    assert cached_files(data={"max_length": 40, "max_prompt_length": 20}) == 3  # other truncation: other ids
    assert cached_files(train={"seed": 7}) == 4  # another random start model
    assert cached_files(model={"dtype": "bfloat16"}) == 5


def test_weights_digest_sees_one_changed_weight(tiny):
    cfg = tiny()
    model = load_model(cfg.model, load_tokenizer(cfg.model))
    before = reference.weights_digest(model)
    assert reference.weights_digest(model) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert reference.weights_digest(model) != before


def test_precompute_frees_the_reference_model(tiny, tmp_path, monkeypatch):
    init = save_start_model(tiny(), tmp_path / "init")
    cfg = tiny(reference={"mode": "precomputed", "path": init})
    loaded = []
    real_load = reference.load_frozen

    def tracked_load(*args):
        model = real_load(*args)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(reference, "load_frozen", tracked_load)
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = load_pairs(cfg.data.train, tokenizer, cfg.data)
    policy = accelerator.prepare(load_model(cfg.model, tokenizer))
    ref = Reference.build(cfg, policy, tokenizer).prepare(cfg, accelerator, policy, tokenizer, pairs)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # loaded once, gone before the first step
    assert ref.model is None and len(ref.table) == 16
    # a precompute from the policy itself never builds a second model
    own = Reference.build(tiny(reference={"mode": "precomputed"}), policy, tokenizer)
    assert own.model is None


def test_a_pair_missing_from_the_table_is_an_error_not_a_fallback(tiny):
    cfg = tiny(reference={"mode": "precomputed"})
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = load_pairs(cfg.data.train, tokenizer, cfg.data)
    policy = accelerator.prepare(load_model(cfg.model, tokenizer))
    ref = Reference.build(cfg, policy, tokenizer).prepare(cfg, accelerator, policy, tokenizer, pairs[:10])
    batch = collate(pairs[8:12], tokenizer.pad_token_id)
    with pytest.raises(KeyError, match="no precomputed reference log-probs"):
        ref.scores(batch, pairs[8:12])


def test_config_refuses_references_that_would_be_wrong(tiny):
    cases = {
        "needs lora.enabled": {"reference": {"mode": "adapters_off"}},
        "not the adapter training starts from": {"lora": {"enabled": True},
                                                 "model": {"adapter_path": "some/adapter"},
                                                 "reference": {"mode": "adapters_off"}},
        "needs reference.path": {"reference": {"mode": "path"}},
        "needs a reference": {"reference": {"mode": "none"}},
        "uses no reference": {"train": {"stage": "sft"}, "reference": {"mode": "copy"}},
        "set lora.enabled=true": {"model": {"adapter_path": "some/adapter"}},
        "mismatched completions": {"loss": {"name": "kto"}, "reference": {"mode": "precomputed"}},
        "per-token reference": {"loss": {"ld_alpha": 0.5}, "reference": {"mode": "precomputed"}},
        "must be a separate model": {"loss": {"ref_sync": "hard"}, "lora": {"enabled": True}},
    }
    for message, sections in cases.items():
        with pytest.raises(config.ConfigError, match=message):
            tiny(**sections)


@pytest.mark.slow
def test_two_process_precompute_equals_one_process_copy(tmp_path):
    """Each process scores its share of the pairs (16 over 2 ranks, pair i on rank i % 2), one gather: the same
    table and trajectory as one process holding a copy."""
    from .test_distributed import torchrun

    one = tiny_config(tmp_path, train={"run_name": "one", "max_steps": 4}, reference={"mode": "copy"})
    two = tiny_config(tmp_path, train={"run_name": "two", "batch_size": 4, "max_steps": 4},
                      reference={"mode": "precomputed"})
    rows_one = read_metrics(train(one))
    torchrun(two, tmp_path, nproc=2)
    rows_two = read_metrics(two.run_dir())
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)

    # the gathered table is every pair's own reference logps, in order
    (cache_file,) = (tmp_path / "runs" / "ref_cache").iterdir()
    table = load_file(cache_file)["logps"]  # (16, 2)
    tokenizer = load_tokenizer(one.model)
    pairs, _ = load_pairs(one.data.train, tokenizer, one.data)
    model = load_model(one.model, tokenizer, seed=one.train.seed).eval()
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, collate(pairs, tokenizer.pad_token_id)).halves()
    torch.testing.assert_close(table, torch.stack([chosen.logps, rejected.logps], 1), rtol=0, atol=1e-4)


def test_for_eval_is_the_reference_the_run_trained_against(tiny):
    cfg = tiny(reference={"mode": "precomputed"}, train={"max_steps": 3})
    run_dir = train(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = Reference.for_eval(run_dir).model
    pairs, _ = load_pairs(cfg.data.train, tokenizer, cfg.data)
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, collate(pairs, tokenizer.pad_token_id)).halves()
    (cache_file,) = (run_dir.parent / "ref_cache").iterdir()
    torch.testing.assert_close(torch.stack([chosen.logps, rejected.logps], 1), load_file(cache_file)["logps"],
                               rtol=0, atol=1e-4)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # a run without a reference gets its starting model, never its trained policy
    sft_run = train(tiny(train={"stage": "sft", "max_steps": 3, "run_name": "sft"}))
    start = Reference.for_eval(sft_run)
    assert start.mode == "none"
    initial = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    assert reference.weights_digest(start.model) == reference.weights_digest(initial)
    trained = load_model(dataclasses.replace(cfg.model, path=str(sft_run / "final"), arch={}), tokenizer)
    assert reference.weights_digest(start.model) != reference.weights_digest(trained)
    with pytest.raises(ValueError, match="not a run directory"):
        Reference.for_eval(run_dir / "final")


def test_adapters_off_as_a_module_is_the_base_not_the_trained_policy(tiny):
    """What held-out eval and its KL receive as 'the reference' in adapters_off mode."""
    cfg = tiny(lora={"enabled": True, "r": 4})
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.model)
    pairs, _ = load_pairs(cfg.data.train, tokenizer, cfg.data)
    base = load_model(cfg.model, tokenizer, seed=cfg.train.seed).eval()
    policy = lora.wrap(load_model(cfg.model, tokenizer, seed=cfg.train.seed), cfg.lora)
    ref = Reference.build(cfg, policy, tokenizer)
    policy = accelerator.prepare(policy)
    module = ref.prepare(cfg, accelerator, policy, tokenizer, pairs).as_module()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # as if trained
    batch = collate(pairs[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        want = sequence_logps(base, batch).logps
        torch.testing.assert_close(sequence_logps(module, batch).logps, want, rtol=0, atol=1e-5)
        assert (sequence_logps(policy, batch).logps - want).abs().max() > 1e-2  # the policy did move
    assert policy.training  # the wrapper restored the policy's mode
