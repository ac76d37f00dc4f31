"""Non-finite losses and gradients: the step is skipped (weights and optimiser state untouched), counted,
logged with the records of the batch, and N in a row stop the run with a diagnosis."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from preftune import train as train_module
from preftune.guard import NonFiniteError
from preftune.modeling import load_model, load_tokenizer
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, read_metrics


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison(monkeypatch, sources: set[str], how: str = "loss") -> None:
    """Make the policy's log-prob of every pair from `sources` NaN (or its gradient infinite), whichever of the
    loop's one log-prob entry point (batch_logps, for pairs, unpaired rows and SFT alike) computes it."""
    monkeypatch.setattr(train_module, "batch_logps", poisoned(train_module.batch_logps, sources, how))


def poisoned(real, sources: set[str], how: str):
    def logps(model, batch, *args, **kwargs):
        out = real(model, batch, *args, **kwargs)
        rows_per_source = out.logps.numel() // len(batch.sources)  # 2: chosen rows, then rejected rows
        hit = torch.tensor([s in sources for s in batch.sources] * rows_per_source)
        if out.logps.requires_grad and hit.any():  # the policy's forward, not the reference's
            if how == "loss":
                out.logps = torch.where(hit, torch.full_like(out.logps, math.nan), out.logps)
            else:
                out.logps = torch.where(hit, InfiniteGradient.apply(out.logps), out.logps)
        return out

    return logps


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    shutil.copy(EXAMPLE_PAIRS, path)
    return path


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    model = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_non_finite_step_is_skipped_counted_and_named(tiny, data, monkeypatch, caplog, how):
    bad = f"{data}:5"
    poison(monkeypatch, {bad}, how)
    cfg = tiny(data={"train": str(data)}, train={"max_steps": 6, "save_every": 1, "keep_checkpoints": 10})
    with caplog.at_level(logging.WARNING, logger="preftune"):
        run_dir = train(cfg)
    rows = read_metrics(run_dir)
    # 16 pairs in batches of 8: line 5 is in exactly one step of each of the 3 epochs
    skipped = [r["step"] for r, prev in zip(rows, [{"skipped_steps": 0}, *rows], strict=False)
               if r["skipped_steps"] > prev["skipped_steps"]]
    assert len(skipped) == 3 and rows[-1]["skipped_steps"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped step")]
    assert len(warnings) == 3 and all(bad in w for w in warnings)
    if how == "loss":  # the culprit is named alone; with only the gradient broken, the whole batch is named
        assert all(r["loss"] is None for r in rows if r["step"] in skipped)
        assert all(w.count("pairs.jsonl:") == 1 for w in warnings)
    else:
        assert all(r["loss"] is not None and r["grad_norm"] is None for r in rows if r["step"] in skipped)
        assert all(w.count("pairs.jsonl:") == 8 for w in warnings)

    before = {0: initial_weights(cfg), **{s: weights(run_dir, s) for s in range(1, 7)}}
    for s in range(1, 7):
        assert same(before[s], before[s - 1]) == (s in skipped), f"step {s}"
        assert all(torch.isfinite(t).all() for t in before[s].values())
    state = torch.load(run_dir / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in state["stateful"]["optimizer"]["state"].values()}
    assert adam_steps == {6 - 3}  # AdamW's moments never saw a skipped step either


def test_too_many_non_finite_steps_in_a_row_stop_with_a_diagnosis(tiny, data, monkeypatch):
    poison(monkeypatch, {f"{data}:{line}" for line in range(1, 17)})
    cfg = tiny(data={"train": str(data)}, train={"max_steps": 10, "save_every": 1, "max_bad_steps": 3})
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    message = str(err.value)
    assert "3 optimiser steps in a row" in message and "train.max_bad_steps=3" in message
    assert "step 3" in message and "pairs.jsonl:" in message and "learning rate" in message
    rows = read_metrics(cfg.run_dir())
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]
    assert same(weights(cfg.run_dir(), 2), initial_weights(cfg))
