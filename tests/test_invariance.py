"""How a step's pairs are split (batch x gradient accumulation) does not change what the step computes.

It holds for every loss whose value is a mean of per-pair terms, and for KTO, whose KL estimate z0 spans the
whole optimiser step. AOT is the documented exception (docs/losses.md): it sorts the log-ratios of each
micro-batch of train.batch_size pairs, so its step is the mean of AOT over those groups; tested as such.

Tolerance: float32 summation order only. Measured over 10 DPO steps at lr 1e-3 (CPU): final weights within
1.2e-7, while every weight tensor moved at least 7e-3 from its start. Asserted: every logged metric within
1e-6 relative + 1e-5 absolute (log-probs are ~200 in size), every weight within 1e-6 absolute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import data
from preftune.logps import sequence_logps
from preftune.losses import LOSSES, Logps, RunningMean, aot, bind, pair_logps
from preftune.modeling import byte_tokenizer, load_model
from preftune.train import PAIR_METRICS, train

from .conftest import REPO, read_metrics, tiny_config

UNPAIRED = REPO / "tests" / "fixtures" / "unpaired.jsonl"
SPLITS = [(8, 1), (4, 2), (1, 8)]


def split_runs(tmp_path_factory, steps: int, **sections) -> dict:
    """`steps` steps of 8 examples split three ways, with length grouping on (the default)."""
    out = {}
    for batch, accum in SPLITS:
        cfg = tiny_config(tmp_path_factory.mktemp(f"b{batch}a{accum}"), **sections,
                          train={"max_steps": steps, "batch_size": batch, "grad_accum": accum, "save_every": 0})
        run_dir = train(cfg)
        out[(batch, accum)] = (read_metrics(run_dir), load_file(run_dir / "final" / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return split_runs(tmp_path_factory, 10)


@pytest.fixture(scope="module")
def kto_runs(tmp_path_factory):
    # lr 1e-2: the policy moves away from its reference within a few steps, so z0 > 0 and its clamp is inactive
    return split_runs(tmp_path_factory, 6, loss={"name": "kto"}, data={"train": str(UNPAIRED)},
                      optim={"lr": 1e-2})


def assert_same_run(rows, weights, base_rows, base_weights, steps: int, weight_atol: float = 1e-6) -> None:
    """Same metric rows and final weights, and those weights far (1000 x the tolerance) from the start."""
    assert len(rows) == len(base_rows) == steps
    for row, base in zip(rows, base_rows, strict=True):
        for key in (*PAIR_METRICS, "lr", "skipped_steps"):
            if base[key] is None:  # KTO: a step without desirable (or undesirable) examples
                assert row[key] is None, (row["step"], key)
                continue
            assert row[key] == pytest.approx(base[key], rel=1e-6, abs=1e-5), (row["step"], key)
    start = load_model(tiny_config(Path("unused")).model, byte_tokenizer(), seed=0).state_dict()
    for name in base_weights:
        torch.testing.assert_close(weights[name], base_weights[name], rtol=0, atol=weight_atol)
        assert (base_weights[name] - start[name]).abs().max() > 1000 * weight_atol, name  # they trained


@pytest.mark.parametrize("split", [(4, 2), (1, 8)])
def test_batch_times_accumulation_split_is_invariant(runs, split):
    assert_same_run(*runs[split], *runs[(8, 1)], steps=10)
    base_rows = runs[(8, 1)][0]
    assert base_rows[-1]["loss"] < 0.65 * base_rows[0]["loss"]  # the runs learned (measured 0.69 -> 0.40)


@pytest.mark.parametrize("split", [(4, 2), (1, 8)])
def test_kto_split_is_invariant_with_one_kl_estimate_per_step(kto_runs, split):
    """z0 is one estimate over the step's 8 mismatched rows, whatever the split (with a per-micro-batch
    estimate, 1 x 8 would pair each prompt with its own completion and 4 x 2 would average two means).

    Measured (CPU, 6 steps): weights within 1.9e-6 (lr 1e-2, ten times the DPO runs', so rounding moves
    weights ten times as far: atol 1e-5), every tensor moved at least 3.4e-2. A per-micro-batch z0 (the code
    before this test) gave 4 x 2 loss rows 4.7e-3 and weights 1.8e-4 away from 8 x 1 (12 steps: 0.045, 5e-3)."""
    assert_same_run(*kto_runs[split], *kto_runs[(8, 1)], steps=6, weight_atol=1e-5)


def test_aot_sorts_within_each_micro_batch(tmp_path):
    """The documented exception: AOT's quantiles are those of each micro-batch (train.batch_size pairs on one
    process), and the step's loss is the mean of AOT over them. Checked by hand on the first step, against a
    reference other than the policy (a second seed), so the log-ratios are not all 0, and beta 2 so the sort's
    effect (measured: 0.9464 for the 8 pairs sorted together, 0.9536 for two sorted groups of 4) is far above
    float noise."""
    tok = byte_tokenizer()
    ref_dir = tmp_path / "reference"
    arch_cfg = tiny_config(tmp_path).model
    load_model(arch_cfg, tok, seed=1).save_pretrained(ref_dir)
    logged = {}
    for batch, accum in [(8, 1), (4, 2)]:
        cfg = tiny_config(tmp_path, loss={"name": "aot", "beta": 2.0}, reference={"path": str(ref_dir)},
                          train={"max_steps": 1, "batch_size": batch, "grad_accum": accum, "save_every": 0,
                                 "run_name": f"aot{batch}x{accum}"},
                          perf={"plain": True})  # the by-hand sums below are the plain path's, to 1e-5
        logged[(batch, accum)] = read_metrics(train(cfg))[0]["loss"]

    pairs, _ = data.load_pairs(cfg.data.train, tok, cfg.data)
    step = next(data.batch_stream([p.length for p in pairs], 8, cfg.train.seed, cfg.data.group_by_length))
    policy, reference = load_model(arch_cfg, tok, seed=cfg.train.seed), load_model(arch_cfg, tok, seed=1)

    def aot_by_hand(indices: list[int]) -> float:
        batch = data.collate([pairs[j] for j in indices], tok.pad_token_id)
        with torch.no_grad():
            lp = pair_logps(*sequence_logps(policy, batch).halves(), *sequence_logps(reference, batch).halves())
        return aot(lp, beta=2.0).losses.mean().item()

    whole, halves = aot_by_hand(step), (aot_by_hand(step[:4]) + aot_by_hand(step[4:])) / 2
    assert abs(whole - halves) > 1e-3  # the sort does see the split: the exception is real on this step
    assert logged[(8, 1)] == pytest.approx(whole, rel=1e-5)
    assert logged[(4, 2)] == pytest.approx(halves, rel=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, spec in LOSSES.items() if not spec.unpaired))
def test_only_per_micro_batch_losses_depend_on_the_split(name):
    """What makes the loop's invariance hold: a loss without LossSpec.per_micro_batch is a mean of per-pair
    terms, so the mean over 8 pairs equals the mean over two micro-batches of 4; AOT (per_micro_batch) differs."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (2, 8), generator=gen).double()
    policy = -lengths * (1 + torch.rand(2, 8, generator=gen, dtype=torch.float64))  # mean-token logp in (-2, -1)
    ref = policy + torch.randn(2, 8, generator=gen, dtype=torch.float64) * 20  # log-ratios of +-20 nats

    def mean_loss(part: slice) -> torch.Tensor:
        lp = Logps(policy[0, part], policy[1, part], lengths[0, part], lengths[1, part], ref[0, part], ref[1, part])
        return bind(name)(lp, RunningMean(4.0, 8.0)).losses.mean()  # BCO: a running mean of 0.5

    whole, halves = mean_loss(slice(None)), (mean_loss(slice(0, 4)) + mean_loss(slice(4, 8))) / 2
    if LOSSES[name].per_micro_batch:
        assert abs(whole - halves) > 1e-3
    else:
        torch.testing.assert_close(whole, halves, rtol=1e-12, atol=1e-12)
