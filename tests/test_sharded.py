"""parallel.sharding=fsdp2 on two CPU processes (gloo, torchrun): the same fully_shard, DCP checkpoint and
export code a GPU run executes, against the unsharded single-process run.

Tolerances: two processes sum each gradient as two half-batch sums in another order than one process does,
so float32 rounding differs at ~1e-7 relative per step; after a few AdamW steps at lr 1e-3 the weights
differ by ~1e-7 absolute (measured: at most 6.3e-8 after 4 steps). We compare weights at rtol 1e-5 /
atol 1e-6 and losses at 1e-5, 10x above that noise and far below what any real bug moves (one skipped
pair, a wrong scale or one missed reduce moves the loss by > 1e-3). With the same process count every
reduction happens in the same order, so kill -9 + resume must give the uninterrupted weights bit for bit.

The tests that launch torchrun are in the slow suite (main's convention); the refusals and the torn-save
test run in-process in the fast one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint, config, sharding
from preftune.train import train

from .conftest import read_metrics, tiny_config
from .test_distributed import torchrun
from .test_resume import DROPOUT, assert_same_run, launch, rows_written, run_killing_at

FSDP = {"sharding": "fsdp2"}
STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_process_group():
    """A run that stops with an error never reaches train()'s end, where the one-process group goes."""
    yield
    sharding.release_process_group()


def close_runs(got: Path, want: Path, atol: float = 1e-6) -> None:
    """Same losses per step and final weights, to the float32 tolerance of a different reduction order."""
    for a, b in zip(read_metrics(want), read_metrics(got), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    theirs = load_file(want / "final" / "model.safetensors")
    ours = load_file(got / "final" / "model.safetensors")
    assert_weights_close(ours, theirs, atol)


def assert_weights_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        worst = (ours[name] - theirs[name]).abs().max().item()
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=atol), f"{name}: max |diff| {worst:.3g}"


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory) -> dict[str, config.Config]:
    """DPO with a separate (copy) reference: unsharded on 1 process, and FSDP2 on 2 processes, both saving
    a checkpoint every 3 steps."""
    tmp = tmp_path_factory.mktemp("dpo")
    common = {"max_steps": STEPS, "save_every": 3, "keep_checkpoints": 2}
    plain = tiny_config(tmp, train={"run_name": "plain", "batch_size": 8, **common})
    two = tiny_config(tmp, train={"run_name": "two", "batch_size": 4, **common}, parallel=FSDP)
    train(plain)
    torchrun(two, tmp, nproc=2)
    return {"plain": plain, "two": two, "tmp": tmp}


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_two_processes_equal_one_unsharded_process(dpo_runs):
    close_runs(dpo_runs["two"].run_dir(), dpo_runs["plain"].run_dir())
    shards = dpo_runs["two"].run_dir() / "checkpoints" / "step-00000006" / checkpoint.SHARDS
    # each process wrote its own shard file; nobody wrote the whole model
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (shards.parent / "model.safetensors").exists()


@pytest.mark.slow  # torchrun, 2 processes
def test_fsdp2_one_process_is_the_unsharded_run_bit_for_bit(dpo_runs, tmp_path):
    """One process: the sharded path (fully_shard over a group of one) does the unsharded arithmetic."""
    one = tiny_config(tmp_path, train={"run_name": "one", "batch_size": 8, "max_steps": STEPS}, parallel=FSDP)
    train(one)
    want = load_file(dpo_runs["plain"].run_dir() / "final" / "model.safetensors")
    got = load_file(one.run_dir() / "final" / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.slow  # torchrun, 2 processes
def test_sharded_export_loads_with_from_pretrained(dpo_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = dpo_runs["two"].run_dir() / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    plain = AutoModelForCausalLM.from_pretrained(dpo_runs["plain"].run_dir() / "final")
    ids = torch.tensor([tokenizer("The cat sat")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.config.use_cache  # restored for inference users


@pytest.mark.slow  # torchrun, 2 processes
def test_sharded_checkpoint_resumes_on_another_process_count(dpo_runs):
    """DCP reshards: the 2-process checkpoint of step 3 continues on 1 process (same 8 pairs per step) and
    ends where the uninterrupted run ends."""
    two = dpo_runs["two"]
    resumed = tiny_config(dpo_runs["tmp"], train={"run_name": "two_to_one", "batch_size": 8, "max_steps": STEPS,
                                                  "resume": str(two.run_dir() / "checkpoints/step-00000003")},
                          parallel=FSDP)
    train(resumed)
    assert [r["step"] for r in read_metrics(resumed.run_dir())] == [4, 5, 6]
    want = load_file(dpo_runs["plain"].run_dir() / "final" / "model.safetensors")
    got = load_file(resumed.run_dir() / "final" / "model.safetensors")
    assert_weights_close(got, want)


@pytest.mark.slow  # torchrun, 2 processes
def test_resume_that_would_change_pairs_per_step_stops(dpo_runs):
    ckpt = dpo_runs["two"].run_dir() / "checkpoints/step-00000003"
    wrong = tiny_config(dpo_runs["tmp"], train={"run_name": "wrong", "batch_size": 4, "max_steps": STEPS,
                                                "resume": str(ckpt)}, parallel=FSDP)
    with pytest.raises(config.ConfigError, match=r"pairs per step .*4 x 1 x 2 = 8 -> 4 x 1 x 1 = 4"):
        train(wrong)
    assert not (wrong.run_dir() / "final").exists()


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("written, resumed", [("plain", FSDP), ("two", {"sharding": "none"})])
def test_checkpoint_of_the_other_layout_is_refused(dpo_runs, written, resumed):
    ckpt = dpo_runs[written].run_dir() / "checkpoints/step-00000003"
    cfg = tiny_config(dpo_runs["tmp"], train={"run_name": f"other_{written}", "batch_size": 8,
                                              "max_steps": STEPS, "resume": str(ckpt)}, parallel=resumed)
    with pytest.raises(checkpoint.CheckpointError, match="was written with parallel.sharding="):
        train(cfg)


@pytest.mark.slow  # torchrun, 2 processes
def test_damaged_shard_is_detected(dpo_runs, tmp_path):
    import shutil

    ckpt = tmp_path / "step-00000003"
    shutil.copytree(dpo_runs["two"].run_dir() / "checkpoints/step-00000003", ckpt)
    assert checkpoint.verify(ckpt) is None
    shard = ckpt / checkpoint.SHARDS / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "shards/__1_0.distcp does not match its checksum" in checkpoint.verify(ckpt)
    shard.unlink()
    assert "shards/__1_0.distcp is missing" in checkpoint.verify(ckpt)


@pytest.mark.slow  # torchrun, 2 processes
def test_token_level_loss_two_processes_equal_one(tmp_path):
    """LD-DPO (per-token log-probs, loss.ld_alpha) through the sharded plain path: bit for bit the 2-process
    DDP run (the same two half-batch gradient sums, reduced in the same order), and the 1-process run to
    rounding. Here one weight whose gradient sits at rounding level moves ~1e-5 apart from the 1-process
    run, under DDP exactly as under FSDP2: AdamW divides by sqrt(v), so a rounding-sized gradient gives an
    O(lr) step whose sign rounding decides. Losses and grad norms still agree to 1e-5 / 1e-4, and those
    catch a wrong gradient scale, which AdamW's weights would hide."""
    loss = {"name": "dpo", "beta": 0.1, "ld_alpha": 0.5}
    plain = tiny_config(tmp_path, loss=loss, train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    ddp = tiny_config(tmp_path, loss=loss, train={"run_name": "ddp", "batch_size": 4, "max_steps": 4})
    two = tiny_config(tmp_path, loss=loss, train={"run_name": "two", "batch_size": 4, "max_steps": 4},
                      parallel=FSDP)
    train(plain)
    torchrun(ddp, tmp_path, nproc=2)
    torchrun(two, tmp_path, nproc=2)
    got = load_file(two.run_dir() / "final" / "model.safetensors")
    want_ddp = load_file(ddp.run_dir() / "final" / "model.safetensors")
    assert all(torch.equal(got[n], want_ddp[n]) for n in want_ddp)
    close_runs(two.run_dir(), plain.run_dir(), atol=3e-5)


@pytest.mark.slow  # torchrun, 2 processes
def test_sharded_precomputed_reference_equals_unsharded(tmp_path):
    """The precompute pass runs sharded (each process scores its share, one gather): same table, same run."""
    ref = {"mode": "precomputed"}
    plain = tiny_config(tmp_path, reference={**ref, "cache_dir": str(tmp_path / "cache_plain")},
                        train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    two = tiny_config(tmp_path, reference={**ref, "cache_dir": str(tmp_path / "cache_two")},
                      train={"run_name": "two", "batch_size": 4, "max_steps": 4}, parallel=FSDP)
    train(plain)
    torchrun(two, tmp_path, nproc=2)
    (want_file,), (got_file,) = (list((tmp_path / d).glob("*.safetensors")) for d in ("cache_plain", "cache_two"))
    assert want_file.name == got_file.name  # same key: same weights, pairs and settings
    want, got = load_file(want_file)["logps"], load_file(got_file)["logps"]  # (16, 2)
    assert want.shape == (16, 2) and bool((want < 0).all())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    close_runs(two.run_dir(), plain.run_dir())


@pytest.mark.slow  # torchrun, 2 processes
def test_sharded_lora_with_adapters_off_reference_equals_unsharded(tmp_path):
    """LoRA under FSDP2: frozen base and trainable adapters share each layer's shard unit; the reference is
    the same sharded policy with adapters off. Exports the adapter, and `preftune export` merges it."""
    from preftune import lora

    lora_cfg = {"enabled": True, "r": 4, "alpha": 8}
    plain = tiny_config(tmp_path, lora=lora_cfg, train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    two = tiny_config(tmp_path, lora=lora_cfg, train={"run_name": "two", "batch_size": 4, "max_steps": 4},
                      parallel=FSDP)
    train(plain)
    out = torchrun(two, tmp_path, nproc=2)
    assert "reference adapters_off" in out.stdout  # no copy of the model was made
    want = load_file(plain.run_dir() / "final" / "adapter_model.safetensors")
    got = load_file(two.run_dir() / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in want)
    assert_weights_close(got, want)
    assert any(want[k].abs().max() > 0 for k in want if "lora_B" in k)  # the adapters did train
    merged_plain = load_file(lora.merge(plain.run_dir(), tmp_path / "m_plain") / "model.safetensors")
    merged_two = load_file(lora.merge(two.run_dir(), tmp_path / "m_two") / "model.safetensors")
    assert_weights_close(merged_two, merged_plain)


@pytest.mark.parametrize("overrides, fields", [
    ({"train": {"mixed_precision": "fp16"}}, "train.mixed_precision=fp16"),
    ({"perf": {"compile": True}}, "perf.compile=true"),
    ({"loss": {"name": "dpo", "ref_sync": "soft"}}, "loss.ref_sync='soft'"),
])
def test_unsupported_sharded_combinations_stop_before_any_work(tmp_path, overrides, fields):
    with pytest.raises(config.ConfigError, match=f"parallel.sharding='fsdp2' with {fields}"):
        tiny_config(tmp_path, parallel=FSDP, **overrides)


def test_accelerate_fsdp_engine_is_refused_with_what_to_do(tmp_path):
    from accelerate.utils import DistributedType

    class Launched:  # what Accelerate reports when launched with that distributed_type
        distributed_type = DistributedType.FSDP

    with pytest.raises(ValueError, match="configs/accelerate/fsdp.yaml.*parallel.sharding=fsdp2"):
        sharding.check_engine(tiny_config(tmp_path), Launched())


def test_sharded_save_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A shard write that fails (a full disk, a killed writer) stops the run with the previous checkpoint
    intact and resumable; the torn attempt never looks like a checkpoint."""
    cfg = tiny_config(tmp_path, train={"run_name": "torn", "batch_size": 8, "max_steps": 6, "save_every": 2},
                      parallel=FSDP)
    real_save = checkpoint.dcp.save
    calls = []

    def failing(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            real_save(state, checkpoint_id=checkpoint_id)  # writes the shards, then the process "dies"
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(checkpoint.dcp, "save", failing)
    with pytest.raises(checkpoint.CheckpointError, match="could not write the shards"):
        train(cfg)
    sharding.release_process_group()  # the failed run never reached its end
    ckpts = cfg.run_dir() / "checkpoints"
    assert checkpoint.newest_valid(cfg.run_dir()) == ckpts / "step-00000002"
    assert not (ckpts / "step-00000004").exists() and (ckpts / ".tmp-step-00000004").exists()
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    train(config.replace(cfg, "train.resume", "auto"))
    assert [r["step"] for r in read_metrics(cfg.run_dir())] == [1, 2, 3, 4, 5, 6]
    assert not list(ckpts.glob(".tmp-*"))  # the torn attempt is cleaned away by the next save
    uninterrupted = tiny_config(tmp_path, train={"run_name": "whole", "batch_size": 8, "max_steps": 6},
                                parallel=FSDP)
    train(uninterrupted)
    want = load_file(uninterrupted.run_dir() / "final" / "model.safetensors")
    got = load_file(cfg.run_dir() / "final" / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and every process descended from it, all at once (a node that dies); returns them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return tree


@pytest.mark.slow  # torchrun, 2 processes
def test_sharded_sigkill_then_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    """kill -9 of launcher and both workers at a random step (possibly mid-save), then --resume: bitwise
    the uninterrupted 2-process run (dropout on, so the per-process RNG states must come back too)."""
    seed = random.randrange(1 << 30)
    steps = 30  # tiny steps take milliseconds: the kill lands a few steps after it is called for
    # after step 4 the step-2 checkpoint is complete, so the resume starts from a checkpoint, not afresh
    kill_at = random.Random(seed).randrange(4, steps - 10)

    def cfg_for(name: str) -> tuple[config.Config, Path]:
        cfg = tiny_config(tmp_path / name, train={"run_name": name, "batch_size": 4, "max_steps": steps,
                                                  "save_every": 2}, parallel=FSDP)
        cfg = config.replace(cfg, "model.arch", {**cfg.model.arch, **DROPOUT})
        path = tmp_path / f"{name}.yaml"
        config.save(cfg, path)
        return cfg, path

    killed, killed_path = cfg_for("killed")
    whole, whole_path = cfg_for("whole")
    proc = launch(killed_path, resume=False, processes=2)
    while proc.poll() is None and rows_written(killed.run_dir()) < kill_at:
        time.sleep(0.01)
    workers = kill_tree(proc.pid)
    proc.communicate()
    assert len(workers) >= 3, workers  # the launcher and both workers died (torchrun's workers have their own
    # process group, so killing the launcher's group alone leaves them running to the end)
    resumed_from = checkpoint.newest_valid(killed.run_dir())
    context = f"seed {seed}, killed after step {kill_at} (exit {proc.returncode}), resumed from {resumed_from}"
    assert proc.returncode == -signal.SIGKILL and resumed_from is not None, context
    assert int(resumed_from.name.removeprefix("step-")) < steps, context  # the resume has steps left to run
    resumed = launch(killed_path, resume=True, processes=2)
    stderr = resumed.communicate()[1]
    assert resumed.returncode == 0, f"{context}: resume exited {resumed.returncode}: {stderr[-3000:]}"
    run_killing_at(whole_path, whole.run_dir(), [], processes=2)
    assert_same_run(killed.run_dir(), whole.run_dir(), context)
    manifest = json.loads((killed.run_dir() / "checkpoints/step-00000030/manifest.json").read_text())
    assert manifest["sharding"] == "fsdp2" and "shards/__1_0.distcp" in manifest["files"]


@pytest.mark.slow  # torchrun, 2 processes
def test_perf_switches_under_fsdp2_equal_the_plain_run(tmp_path):
    """Prefix sharing + packing (unit attention), the chunked LM head (run outside the model's forward, on
    the root unit's gathered weights) and gradient checkpointing, all sharded on 2 processes."""
    perf = {"prefix_sharing": True, "packing": True, "logps_chunk": 64, "gradient_checkpointing": 1}
    plain = tiny_config(tmp_path, train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    two = tiny_config(tmp_path, perf=perf, train={"run_name": "two", "batch_size": 4, "max_steps": 4},
                      parallel=FSDP)
    train(plain)
    torchrun(two, tmp_path, nproc=2)
    close_runs(two.run_dir(), plain.run_dir())


@pytest.mark.slow  # torchrun, 2 processes
def test_held_out_pair_metrics_under_fsdp2_equal_the_plain_runs(tmp_path):
    """In-training eval of the held-out pairs (eval.prompts=0: pair metrics, no sampling) on 2 sharded
    processes: each scores its equal-length shard of the pairs with the sharded policy and reference."""
    sections = {"data": {"eval_fraction": 0.25}, "eval": {"prompts": 0, "batch_size": 2}}
    plain = tiny_config(tmp_path, **sections, train={"run_name": "plain", "batch_size": 4, "max_steps": 4,
                                                     "eval_every": 2})
    two = tiny_config(tmp_path, **sections, train={"run_name": "two", "batch_size": 2, "max_steps": 4,
                                                   "eval_every": 2}, parallel=FSDP)
    train(plain)
    torchrun(two, tmp_path, nproc=2)
    want = [r for r in read_metrics(plain.run_dir()) if "eval/loss" in r]
    got = [r for r in read_metrics(two.run_dir()) if "eval/loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for a, b in zip(want, got, strict=True):
        for key in (k for k in a if k.startswith("eval/")):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
