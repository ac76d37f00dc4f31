"""How a step's pairs are split (batch x gradient accumulation) does not change what the step computes.

Tolerance: float32 summation order only. Measured over 20 steps at lr 1e-3 (CPU): loss rows within 4e-7,
final weights within 1.2e-7. Asserted: every logged metric within 1e-6 relative + 1e-5 absolute (log-probs
are ~200 in size), every weight within 1e-6 absolute.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from preftune.losses import PAIR_METRICS
from preftune.train import train

from .conftest import read_metrics, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 steps of 8 pairs split three ways, with length grouping on (the default)."""
    out = {}
    for batch, accum in [(8, 1), (4, 2), (1, 8)]:
        cfg = tiny_config(tmp_path_factory.mktemp(f"b{batch}a{accum}"),
                          train={"max_steps": 20, "batch_size": batch, "grad_accum": accum, "save_every": 0})
        run_dir = train(cfg)
        out[(batch, accum)] = (read_metrics(run_dir), load_file(run_dir / "final" / "model.safetensors"))
    return out


@pytest.mark.parametrize("split", [(4, 2), (1, 8)])
def test_batch_times_accumulation_split_is_invariant(runs, split):
    rows, weights = runs[split]
    base_rows, base_weights = runs[(8, 1)]
    assert len(rows) == len(base_rows) == 20
    for row, base in zip(rows, base_rows, strict=True):
        for key in (*PAIR_METRICS, "lr", "skipped_steps"):
            assert row[key] == pytest.approx(base[key], rel=1e-6, abs=1e-5), (row["step"], key)
    assert base_rows[-1]["loss"] < 0.5 * base_rows[0]["loss"]  # the runs learned: the weights moved a lot
    for name in base_weights:
        torch.testing.assert_close(weights[name], base_weights[name], rtol=0, atol=1e-6)
