"""train.mixed_precision=bf16 through the loop on CPU, against the same run in fp32: unsharded (Accelerate's
bf16 autocast over fp32 weights) and parallel.sharding=fsdp2 (FSDP2's bf16 compute copy of fp32 master
weights, gradients reduced in fp32). Both keep the log-softmax in fp32 (logps.py).

Accelerate's precision is fixed once per process, so the bf16 runs are separate `preftune train` processes,
as a user runs them.

Tolerances, measured on this tiny model over 6 steps and set ~5x above that: summed response log-probs
(about -200 over ~40 tokens) within 0.02 of fp32 (measured <= 0.01); a log-softmax in bf16 instead would
round each token's log-prob (|log p| ~ 5.5) to bf16's 8 bits, ~0.01 a token, and miss by ~0.1 a sum.
Losses within 2e-3 (measured <= 4e-4), gradient norms within 1% (measured 0.2%); the final weights' distance
from the fp32 run's within 3% of how far the fp32 run moved them (measured 0.9% autocast, 1.2% FSDP2).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preftune import config
from preftune.train import train

from .conftest import REPO, read_metrics, tiny_config

STEPS = 6


def train_in_subprocess(cfg: config.Config, tmp_path) -> None:
    path = tmp_path / f"{cfg.train.run_name}.yaml"
    config.save(cfg, path)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "preftune", "train", str(path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, config.Config]:
    tmp = tmp_path_factory.mktemp("precision")

    def cfg(name: str, precision: str, sharding: str) -> config.Config:
        return tiny_config(tmp, train={"run_name": name, "batch_size": 8, "max_steps": STEPS,
                                       "mixed_precision": precision}, parallel={"sharding": sharding})

    out = {"fp32": cfg("fp32", "no", "none"), "bf16": cfg("bf16", "bf16", "none"),
           "bf16_fsdp2": cfg("bf16_fsdp2", "bf16", "fsdp2")}
    train(out["fp32"])
    train_in_subprocess(out["bf16"], tmp)
    train_in_subprocess(out["bf16_fsdp2"], tmp)
    return out


@pytest.mark.slow  # two `preftune train` processes, ~50 s
@pytest.mark.parametrize("name", ["bf16", "bf16_fsdp2"])
def test_bf16_training_tracks_fp32(runs, name):
    fp32, bf16 = read_metrics(runs["fp32"].run_dir()), read_metrics(runs[name].run_dir())
    assert len(bf16) == STEPS
    first = bf16[0]
    for key in ("logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(fp32[0][key], abs=0.02), key  # fp32 log-softmax over bf16 logits
        assert first[key] != fp32[0][key], f"{key}: bit-equal to fp32, so bf16 never ran"
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2), a["step"]
    assert fp32[-1]["loss"] < fp32[0]["loss"] - 0.1  # training moved: the comparison is not of idle runs
    # weights: the bf16 run's update against the fp32 run's, relative to the update's size (AdamW divides
    # by sqrt(v), so single coordinates with rounding-sized gradients may differ by O(lr) either way)
    start = initial_weights(runs["fp32"])
    want = load_file(runs["fp32"].run_dir() / "final" / "model.safetensors")
    got = load_file(runs[name].run_dir() / "final" / "model.safetensors")
    assert all(got[n].dtype == torch.float32 for n in got)  # the master weights stay fp32; bf16 is compute only
    moved = torch.cat([(want[n] - start[n]).flatten() for n in want]).norm()
    apart = torch.cat([(got[n] - want[n]).flatten() for n in want]).norm()
    assert apart < 0.03 * moved, f"|bf16 - fp32| = {apart:.3g} against an update of {moved:.3g}"


def initial_weights(cfg: config.Config) -> dict[str, torch.Tensor]:
    from preftune.modeling import load_model, load_tokenizer

    return load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).state_dict()
