"""DeepSpeed ZeRO-2 / ZeRO-3 on two CPU processes (gloo), launched the way a GPU user launches them
(`accelerate launch --config_file <DEEPSPEED config> -m preftune train ...`), against the plain
single-process run: the same engine calls (engine.backward, engine.step, engine.save_checkpoint,
the 16-bit consolidated export) a GPU run executes.

The launch config points at a DeepSpeed JSON with stage3_param_persistence_threshold=0: DeepSpeed's default
(1e5 elements) keeps every parameter of the tiny model whole on every process, so ZeRO-3 would partition
nothing; with 0 every weight is split over the two processes.

Tolerances: as for FSDP2 (tests/test_sharded.py), two processes sum each gradient as two half-batch sums
in another order than one process does (DeepSpeed then averages them over the processes), so float32
rounding differs at ~1e-7 relative per step (measured: final weights at most 1.0e-7 apart after 4 steps,
ZeRO-2 6.3e-8, ZeRO-3 1.0e-7): weights at rtol 1e-5 / atol 1e-6, losses at 1e-5, grad norms at 1e-4
(measured ~2e-7 relative). With the same process count every reduction
happens in the same order, so a resume must give the uninterrupted weights bit for bit.

All launches are slow-marked (main's convention for multi-process tests); the config filling and the
refusals run in-process in the fast suite and need no deepspeed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint, config, zero
from preftune.config import ConfigError
from preftune.train import train

from .conftest import REPO, read_metrics, tiny_config
from .test_resume import DROPOUT, assert_same_run, rows_written
from .test_sharded import assert_weights_close, close_runs, kill_tree

STEPS = 6


def free_port() -> int:
    """A port free now, for Accelerate's --main_process_port. torchrun's tests use --standalone instead
    (no gap between choosing and binding); accelerate launch with a DeepSpeed config takes a fixed port, so
    a launch here can still lose this port to another process in that gap (the launch then fails)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_files(tmp: Path, stage: int, processes: int) -> Path:
    """An Accelerate DEEPSPEED launch config for this machine, and the DeepSpeed JSON it names."""
    ds_json = tmp / f"ds_zero{stage}.json"
    zero_section = {"stage": stage} | ({"stage3_param_persistence_threshold": 0} if stage == 3 else {})
    ds_json.write_text(json.dumps({"zero_optimization": zero_section}))
    launch = tmp / f"accelerate_zero{stage}_{processes}.yaml"
    launch.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\n"
                      f"num_processes: {processes}\nmachine_rank: 0\nuse_cpu: false\n"
                      f"deepspeed_config:\n  deepspeed_config_file: {ds_json}\n  zero3_init_flag: false\n")
    return launch


def command(cfg_path: Path, stage: int, processes: int = 2, resume: bool = False,
            script: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    launch = launch_files(cfg_path.parent, stage, processes)
    target = script or ["-m", "preftune", "train", str(cfg_path)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
           "--main_process_port", str(free_port()), *target, *(["--resume"] if resume else [])]
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return cmd, env


def deepspeed_run(cfg: config.Config, tmp: Path, stage: int, processes: int = 2, expect_ok: bool = True,
                  script: list[str] | None = None) -> subprocess.CompletedProcess:
    path = tmp / f"{cfg.train.run_name}.yaml"
    config.save(cfg, path)
    cmd, env = command(path, stage, processes, script=[*script, str(path)] if script else None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict:
    """DPO with a copy reference: plain on 1 process (batch 8), ZeRO-2 and ZeRO-3 on 2 (batch 4), each
    checkpointing every 3 steps."""
    tmp = tmp_path_factory.mktemp("zero")
    common = {"max_steps": STEPS, "save_every": 3, "keep_checkpoints": 2}
    runs = {"plain": tiny_config(tmp, train={"run_name": "plain", "batch_size": 8, **common}), "tmp": tmp}
    train(runs["plain"])
    for stage in (2, 3):
        runs[stage] = tiny_config(tmp, train={"run_name": f"zero{stage}", "batch_size": 4, **common})
        runs[f"out{stage}"] = deepspeed_run(runs[stage], tmp, stage)
    return runs


@pytest.mark.slow  # accelerate launch, 2 processes
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_equal_one_plain_process(zero_runs, stage):
    run_dir = zero_runs[stage].run_dir()
    assert "2 process(es)" in zero_runs[f"out{stage}"].stdout  # Accelerate saw both ranks, not 1 each
    close_runs(run_dir, zero_runs["plain"].run_dir())
    engine_files = sorted(p.name for p in (run_dir / "checkpoints/step-00000006/shards/engine").iterdir())
    # each process wrote its own optimiser partition; under ZeRO-3 its own weight partition too
    want = {2: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
            3: [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]}
    assert engine_files == sorted(want[stage])
    manifest = json.loads((run_dir / "checkpoints/step-00000006/manifest.json").read_text())
    assert manifest["sharding"] == f"zero{stage}" and checkpoint.verify(run_dir / "checkpoints/step-00000006") is None


@pytest.mark.slow  # accelerate launch, 2 processes
def test_zero3_export_loads_with_from_pretrained(zero_runs):
    """The ZeRO-3 export is the engine's consolidated state dict (fp32 here), gathered once, rank 0 writing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = zero_runs[3].run_dir() / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    plain = AutoModelForCausalLM.from_pretrained(zero_runs["plain"].run_dir() / "final")
    ids = torch.tensor([AutoTokenizer.from_pretrained(final)("The cat sat")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.dtype == torch.float32 and model.config.use_cache


@pytest.mark.slow  # accelerate launch, 2 processes
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_on_the_same_process_count_is_bit_for_bit(zero_runs, stage):
    """engine.load_checkpoint of step 3 plus preftune's own state: the uninterrupted run's steps 4-6."""
    ckpt = zero_runs[stage].run_dir() / "checkpoints/step-00000003"
    resumed = tiny_config(zero_runs["tmp"], train={"run_name": f"resumed{stage}", "batch_size": 4,
                                                   "max_steps": STEPS, "resume": str(ckpt)})
    out = deepspeed_run(resumed, zero_runs["tmp"], stage)
    assert f"resumed from {ckpt} at step 3" in out.stdout
    assert [r["step"] for r in read_metrics(resumed.run_dir())] == [4, 5, 6]
    want = load_file(zero_runs[stage].run_dir() / "final" / "model.safetensors")
    got = load_file(resumed.run_dir() / "final" / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.slow  # accelerate launch, 1 process
def test_zero_checkpoint_on_another_process_count_stops_with_what_to_do(zero_runs):
    ckpt = zero_runs[3].run_dir() / "checkpoints/step-00000003"
    other = tiny_config(zero_runs["tmp"], train={"run_name": "one_proc", "batch_size": 8, "max_steps": STEPS,
                                                 "resume": str(ckpt)})
    out = deepspeed_run(other, zero_runs["tmp"], 3, processes=1, expect_ok=False)
    assert out.returncode != 0
    assert "written by 2 process(es); this run has 1. Resume it on 2 processes" in out.stderr
    assert "zero_to_fp32.py" in out.stderr
    assert not (other.run_dir() / "final").exists()


@pytest.mark.slow  # accelerate launch, 2 processes
def test_zero_checkpoint_of_another_layout_is_refused(zero_runs):
    ckpt = zero_runs[2].run_dir() / "checkpoints/step-00000003"
    cfg = tiny_config(zero_runs["tmp"], train={"run_name": "z2_into_z3", "batch_size": 4, "max_steps": STEPS,
                                               "resume": str(ckpt)})
    out = deepspeed_run(cfg, zero_runs["tmp"], 3, expect_ok=False)
    assert "was written with parallel.sharding=zero2, this run has parallel.sharding=zero3" in out.stderr


@pytest.mark.slow  # accelerate launch, 2 processes
def test_token_level_loss_and_precomputed_reference_under_zero3_equal_plain(tmp_path):
    """WPO (per-token policy log-probs) with a precomputed reference: the precompute pass runs on the
    ZeRO-3 engine (each process scores its share, one gather) and gives the plain run's table; the run
    then gives the plain run's losses and weights."""
    sections = {"loss": {"name": "dpo", "beta": 0.1, "weighting": "wpo"}, "train": {"batch_size": 8, "max_steps": 4}}
    plain = tiny_config(tmp_path, **sections, reference={"mode": "precomputed",
                                                         "cache_dir": str(tmp_path / "cache_plain")})
    plain = config.replace(plain, "train.run_name", "plain")
    two = config.replace(config.replace(config.replace(plain, "train.run_name", "two"), "train.batch_size", 4),
                         "reference.cache_dir", str(tmp_path / "cache_two"))
    train(plain)
    out = deepspeed_run(two, tmp_path, 3)
    assert "reference precomputed" in out.stdout
    (want_file,), (got_file,) = (list((tmp_path / d).glob("*.safetensors")) for d in ("cache_plain", "cache_two"))
    assert want_file.name == got_file.name
    want, got = load_file(want_file)["logps"], load_file(got_file)["logps"]  # (16, 2)
    assert want.shape == (16, 2) and bool((want < 0).all())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    close_runs(two.run_dir(), plain.run_dir())


@pytest.mark.slow  # accelerate launch, 2 processes
def test_perf_switches_under_zero3_equal_the_plain_run(tmp_path):
    """Prefix sharing + packing (unit attention) and gradient checkpointing on the partitioned ZeRO-3 model."""
    perf = {"prefix_sharing": True, "packing": True, "gradient_checkpointing": 1}
    plain = tiny_config(tmp_path, train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    two = tiny_config(tmp_path, perf=perf, train={"run_name": "two", "batch_size": 4, "max_steps": 4})
    train(plain)
    deepspeed_run(two, tmp_path, 3)
    close_runs(two.run_dir(), plain.run_dir())


@pytest.mark.slow  # accelerate launch, 2 processes
@pytest.mark.parametrize("how", ["loss", "grad"])
def test_non_finite_steps_under_zero3_are_skipped_as_in_the_plain_loop(tmp_path, monkeypatch, how):
    """One pair with a NaN log-prob (a NaN loss whose gradient is finite: the NaN is a constant), or with an
    infinite gradient, in the first of 2 micro-batches per step. NaN loss: the loop poisons the last
    backward so the engine drops the step together with what the first micro-batch accumulated; infinite
    gradient: the engine's own norm check drops it. Same skipped steps, losses and weights as the plain
    loop's skips (which never call optimizer.step())."""
    from .test_nonfinite import poison

    data = tmp_path / "pairs.jsonl"
    data.write_text((REPO / "examples" / "pairs.jsonl").read_text())
    bad = f"{data}:5"  # in steps 1, 4 and 5, in the first micro-batch of each
    common = {"data": {"train": str(data)}}
    plain = tiny_config(tmp_path, **common, train={"run_name": "plain", "batch_size": 4, "grad_accum": 2,
                                                   "max_steps": 6})
    two = tiny_config(tmp_path, **common, train={"run_name": "two", "batch_size": 2, "grad_accum": 2,
                                                 "max_steps": 6})
    with monkeypatch.context() as patched:
        poison(patched, {bad}, how)
        train(plain)
    deepspeed_run(two, tmp_path, 3, script=[str(REPO / "tests" / "poisoned_train.py"), how, bad])
    want, got = read_metrics(plain.run_dir()), read_metrics(two.run_dir())
    assert [r["skipped_steps"] for r in got] == [r["skipped_steps"] for r in want] == [1, 1, 1, 2, 3, 3]
    for a, b in zip(want, got, strict=True):
        assert (b["loss"] is None) == (a["loss"] is None), a["step"]
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), a["step"]
    assert_weights_close(load_file(two.run_dir() / "final" / "model.safetensors"),
                         load_file(plain.run_dir() / "final" / "model.safetensors"))


@pytest.mark.slow  # accelerate launch, 2 processes, three times
def test_zero3_sigkill_then_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    """kill -9 of the launcher and both workers at a random step (possibly mid-save), then --resume: bitwise
    the uninterrupted 2-process ZeRO-3 run, dropout on (every process's RNG state comes back)."""
    seed = random.randrange(1 << 30)
    steps = 20
    kill_at = random.Random(seed).randrange(4, steps - 6)  # after step 4 the step-2 checkpoint is complete

    def cfg_for(name: str) -> tuple[config.Config, Path]:
        cfg = tiny_config(tmp_path / name, train={"run_name": name, "batch_size": 4, "max_steps": steps,
                                                  "save_every": 2})
        cfg = config.replace(cfg, "model.arch", {**cfg.model.arch, **DROPOUT})
        path = tmp_path / name / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(cfg, path)
        return cfg, path

    killed, killed_path = cfg_for("killed")
    whole, whole_path = cfg_for("whole")
    cmd, env = command(killed_path, 3)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None and rows_written(killed.run_dir()) < kill_at:
        time.sleep(0.01)
    workers = kill_tree(proc.pid)
    proc.communicate()
    assert len(workers) >= 3, workers  # the launcher and both workers
    resumed_from = checkpoint.newest_valid(killed.run_dir())
    context = f"seed {seed}, killed after step {kill_at} (exit {proc.returncode}), resumed from {resumed_from}"
    assert proc.returncode == -signal.SIGKILL and resumed_from is not None, context
    cmd, env = command(killed_path, 3, resume=True)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"{context}: {resumed.stderr[-3000:]}"
    assert f"resumed from {resumed_from}" in resumed.stdout, context
    cmd, env = command(whole_path, 3)
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600).returncode == 0
    assert_same_run(killed.run_dir(), whole.run_dir(), context)


@pytest.mark.gpu  # benchmarks/gpu_check.py runs it on CUDA (NCCL); here on CPU (gloo)
@pytest.mark.slow  # accelerate launch, 1 process, three times
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_one_device_trains_checkpoints_resumes_and_exports(tmp_path, stage):
    """ZeRO on the one device of this machine (CUDA when there is one): the plain run's losses and weights,
    an engine checkpoint that resumes bit for bit, and a bf16 run (bf16 weights in compute, fp32 master
    copy in the optimiser) within bf16 rounding of fp32: 8 mantissa bits give ~4e-3 relative per weight,
    so losses near 0.69 within 1e-2."""
    plain = tiny_config(tmp_path, train={"run_name": "plain", "batch_size": 8, "max_steps": 4})
    one = tiny_config(tmp_path, train={"run_name": "one", "batch_size": 8, "max_steps": 4, "save_every": 2})
    train(plain)
    deepspeed_run(one, tmp_path, stage, processes=1)
    close_runs(one.run_dir(), plain.run_dir(), atol=1e-5)
    resumed = config.replace(config.replace(one, "train.run_name", "resumed"), "train.resume",
                             str(one.run_dir() / "checkpoints/step-00000002"))
    deepspeed_run(resumed, tmp_path, stage, processes=1)
    want = load_file(one.run_dir() / "final" / "model.safetensors")
    got = load_file(resumed.run_dir() / "final" / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
    bf16 = config.replace(config.replace(plain, "train.run_name", "bf16"), "train.mixed_precision", "bf16")
    deepspeed_run(bf16, tmp_path, stage, processes=1)
    rows = read_metrics(bf16.run_dir())
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0]
    for a, b in zip(read_metrics(plain.run_dir()), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-2), a["step"]
    assert read_metrics(plain.run_dir())[-1]["loss"] < 0.69 - 0.05  # fp32 did learn: the bound is not vacuous


# --- in-process, no deepspeed needed: the config filling and the refusals ---

def test_deepspeed_config_is_filled_from_the_training_config(tmp_path):
    cfg = tiny_config(tmp_path, train={"batch_size": 3, "grad_accum": 4, "mixed_precision": "bf16"},
                      optim={"max_grad_norm": 0.5})
    ds = zero.fill_config({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                           "zero_optimization": {"stage": 3}}, cfg, world=8)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 24
    assert ds["gradient_accumulation_steps"] == 1  # the loop owns accumulation (and its loss scaling)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    plain = zero.fill_config({}, tiny_config(tmp_path, optim={"max_grad_norm": 0.0}), world=2)
    assert plain["gradient_clipping"] == 0.0 and plain["bf16"]["enabled"] is False


@pytest.mark.parametrize("given, message", [
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4.*train.grad_accum"),
    ({"gradient_clipping": 1.0}, r"gradient_clipping=1.0, but preftune's config gives 0.5.*optim.max_grad_norm"),
    ({"train_micro_batch_size_per_gpu": 16}, r"train_micro_batch_size_per_gpu=16.*train.batch_size"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm=false"),
])
def test_a_deepspeed_config_that_disagrees_with_the_training_config_is_refused(tmp_path, given, message):
    cfg = tiny_config(tmp_path, train={"batch_size": 2}, optim={"max_grad_norm": 0.5})
    with pytest.raises(ConfigError, match=message):
        zero.fill_config(given, cfg, world=2)


@pytest.mark.parametrize("stage, overrides, fields", [
    (3, {"parallel": {"sharding": "fsdp2"}}, "parallel.sharding='fsdp2'"),
    (3, {"train": {"mixed_precision": "fp16"}}, "train.mixed_precision=fp16"),
    (3, {"perf": {"logps_chunk": 64}}, "perf.logps_chunk=64"),
    (2, {"lora": {"enabled": True}}, "lora.enabled=true"),
    (3, {"loss": {"name": "dpo", "ref_sync": "soft"}}, "loss.ref_sync='soft'"),
    (1, {}, None),
])
def test_unsupported_deepspeed_combinations_stop_before_any_work(tmp_path, stage, overrides, fields):
    cfg = tiny_config(tmp_path, **overrides)
    match = f"DeepSpeed ZeRO-{stage} with {fields}" if fields else "zero_stage 1; preftune runs ZeRO stage 2 or 3"
    with pytest.raises(ConfigError, match=match):
        zero.refuse_unsupported(cfg, stage)
    zero.refuse_unsupported(tiny_config(tmp_path, perf={"logps_chunk": 64}), 2)  # ZeRO-2 keeps whole weights
