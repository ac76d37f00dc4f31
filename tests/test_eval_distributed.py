"""In-training eval under 2 CPU processes: every rank scores its shard (13 pairs: uneven shards, so one rank
pads) and the rows equal one process's; sampling for KL runs on both ranks (synced, no hang); only rank 0
writes TensorBoard files."""

import json

import pytest

from preftune.train import train

from .conftest import EXAMPLE_PAIRS, read_metrics, tiny_config
from .test_distributed import torchrun


@pytest.mark.slow
def test_two_process_eval_rows_equal_one_process(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(EXAMPLE_PAIRS.read_text().splitlines(keepends=True)[:13]))
    common = {"data": {"eval": str(heldout)}, "eval": {"batch_size": 4, "prompts": 3, "max_new_tokens": 4},
              "log": {"tensorboard": True}}
    one = tiny_config(tmp_path, train={"run_name": "one", "batch_size": 8, "max_steps": 4, "eval_every": 2}, **common)
    two = tiny_config(tmp_path, train={"run_name": "two", "batch_size": 4, "max_steps": 4, "eval_every": 2}, **common)
    train(one)
    torchrun(two, tmp_path, nproc=2)
    rows_one, rows_two = read_metrics(one.run_dir()), read_metrics(two.run_dir())
    evals_one = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows_one]
    evals_two = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows_two]
    assert [bool(e) for e in evals_two] == [False, True, False, True]
    for a, b in zip(evals_one, evals_two, strict=True):
        assert a.keys() == b.keys()
        # KL is a Monte-Carlo estimate: each rank samples its own prompts, so the draws differ from 1 process's
        assert all(r["eval/kl"] == r["eval/kl"] for r in (a, b) if r)  # present and not NaN
        for key in a.keys() - {"eval/kl"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
        assert all(0.0 <= r["eval/rewards/accuracies"] <= 1.0 for r in (a, b) if r)  # a mean, never a sum
    assert len(list((two.run_dir() / "tensorboard").iterdir())) == 1  # one writer: rank 0
    assert json.loads((two.run_dir() / "metrics.jsonl").read_text().splitlines()[1])["step"] == 2
