"""Checkpoints and resuming: a run that is killed, resumed, corrupted or starved of disk ends exactly where the
uninterrupted run ends (weights bit-identical on CPU, the same metrics.jsonl rows)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint, config
from preftune.cli import main
from preftune.train import train

from .conftest import REPO, read_metrics, tiny_config

# dropout makes the trajectory depend on the torch RNG, so a resume that fails to restore it is caught
DROPOUT = {"attention_dropout": 0.1}


def resumable(tmp_path: Path, name: str, **train_fields) -> config.Config:
    cfg = tiny_config(tmp_path / name, train={"max_steps": 12, "save_every": 3, **train_fields})
    return config.replace(cfg, "model.arch", {**cfg.model.arch, **DROPOUT})


def with_(cfg: config.Config, **dotted) -> config.Config:
    for key, value in dotted.items():
        cfg = config.replace(cfg, key.replace("__", "."), value) if "__" in key else dataclasses.replace(
            cfg, **{key: value})
    return cfg


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights: the whole model, or the adapter alone under LoRA."""
    (weights,) = [p for p in (run_dir / "final").glob("*.safetensors")]
    return load_file(weights)


def assert_same_run(run_dir: Path, reference_dir: Path, context: str = "") -> None:
    """Bit-identical final weights and the same metrics rows (throughput, a timing, excepted)."""
    ours, theirs = final_weights(run_dir), final_weights(reference_dir)
    assert ours.keys() == theirs.keys()
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differing, f"{context}: weights differ: {differing[:5]}"

    def rows(d: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(d)]

    assert rows(run_dir) == rows(reference_dir), context


def single_threaded():
    """Bit-identity holds for a fixed thread count; the subprocesses run with OMP_NUM_THREADS=1 too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@pytest.fixture
def one_thread():
    """Also for tests that need no bit-identity: on 2 shared cores a second torch thread mostly waits."""
    threads = single_threaded()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run the in-process tests compare against."""
    threads = single_threaded()
    try:
        return train(resumable(tmp_path_factory.mktemp("reference"), "ref"))
    finally:
        torch.set_num_threads(threads)


# --- in-process: stop, then resume ---

@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stopped_then_resumed_equals_uninterrupted(tmp_path, one_thread, reference, grad_accum):
    batch = 8 // grad_accum
    if grad_accum > 1:
        reference = train(resumable(tmp_path, "ref", grad_accum=grad_accum, batch_size=batch))
    cfg = resumable(tmp_path, "run", grad_accum=grad_accum, batch_size=batch, max_steps=7)
    run_dir = train(cfg)  # ends at 7, newest checkpoint at 6: step 7 and its metrics row are redone
    assert [d.name for _, d in checkpoint._steps(run_dir)] == ["step-00000003", "step-00000006"]
    train(with_(cfg, train__max_steps=12, train__resume="auto"))
    assert_same_run(run_dir, reference)


def test_loop_state_of_losses_survives_resume(tmp_path, one_thread):
    """BCO's running reward mean and TR-DPO's moving reference are state too; without them in the
    checkpoint the resumed run would use delta = 0 and the initial reference."""
    loss = {"name": "bco_pair", "ref_sync": "soft", "ref_sync_every": 2}
    ref_cfg = resumable(tmp_path, "ref", max_steps=8)
    reference = train(with_(ref_cfg, loss=dataclasses.replace(ref_cfg.loss, **loss)))
    cfg = resumable(tmp_path, "run", max_steps=5)
    cfg = with_(cfg, loss=dataclasses.replace(cfg.loss, **loss))
    run_dir = train(cfg)
    train(with_(cfg, train__max_steps=8, train__resume="auto"))
    assert_same_run(run_dir, reference)


def test_resume_restores_the_rng_it_depends_on(tmp_path, one_thread, reference, monkeypatch):
    """The equivalence above can fail: resuming without the RNG restored gives other dropout masks."""
    cfg = resumable(tmp_path, "run", max_steps=6)
    run_dir = train(cfg)
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    train(with_(cfg, train__max_steps=12, train__resume="auto"))
    assert not torch.equal(final_weights(run_dir)["lm_head.weight"], final_weights(reference)["lm_head.weight"])


def test_existing_run_needs_resume_or_overwrite(tmp_path, one_thread):
    cfg = resumable(tmp_path, "run", max_steps=3)
    run_dir = train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    # overwrite starts afresh: the old run's checkpoints and rows must not survive into the new run
    train(with_(cfg, train__overwrite=True, train__max_steps=2))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert not checkpoint._steps(run_dir)


def test_resume_auto_without_checkpoint_starts_afresh(tmp_path, one_thread):
    cfg = resumable(tmp_path, "run", max_steps=2, save_every=0)
    train(cfg)
    run_dir = train(with_(cfg, train__resume="auto"))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # the old rows were truncated, not appended to


# --- damaged checkpoints ---

def corrupt_bytes(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last weight: loads fine, silently wrong without checksums
    (ckpt / "model.safetensors").write_bytes(bytes(data))


def truncate(ckpt: Path) -> None:
    path = ckpt / "state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def no_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


@pytest.mark.parametrize("damage, reason", [(corrupt_bytes, "checksum"), (truncate, "bytes"),
                                            (no_manifest, "no manifest")])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, one_thread, reference, caplog, damage,
                                                              reason):
    cfg = resumable(tmp_path, "run", max_steps=7)
    run_dir = train(cfg)
    newest = run_dir / "checkpoints" / "step-00000006"
    damage(newest)
    (run_dir / "checkpoints" / ".tmp-step-00000010").mkdir()  # a save killed half-way (at another interval)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        train(with_(cfg, train__max_steps=12, train__resume="auto"))
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(newest) in skipped[0] and reason in skipped[0]
    assert_same_run(run_dir, reference)  # resumed from step 3 instead, so still exact
    assert [d.name for _, d in checkpoint._steps(run_dir)] == ["step-00000009", "step-00000012"]
    assert not list((run_dir / "checkpoints").glob(".*"))


def test_explicitly_named_damaged_checkpoint_is_refused(tmp_path, one_thread):
    run_dir = train(resumable(tmp_path, "run", max_steps=3))
    ckpt = run_dir / "checkpoints" / "step-00000003"
    corrupt_bytes(ckpt)
    cfg = with_(resumable(tmp_path, "other"), train__resume=str(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match="step-00000003.*checksum"):
        train(cfg)


def test_cli_resume_errors_are_one_clear_line(tmp_path, capsys, one_thread):
    cfg = resumable(tmp_path, "run")
    config.save(cfg, tmp_path / "run.yaml")
    missing = tmp_path / "nowhere"
    assert main(["train", str(tmp_path / "run.yaml"), f"train.resume={missing}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: train.resume:") and str(missing) in err and "Traceback" not in err


def test_keeps_only_the_newest_checkpoints(tmp_path, one_thread):
    run_dir = train(resumable(tmp_path, "run", max_steps=8, save_every=2, keep_checkpoints=2))
    assert [s for s, _ in checkpoint._steps(run_dir)] == [6, 8]
    assert all(checkpoint.verify(d) is None for _, d in checkpoint._steps(run_dir))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, monkeypatch, one_thread):
    """Even with a matching manifest (an attacker can recompute checksums), state.pt never runs code."""
    monkeypatch.chdir(tmp_path)
    run_dir = train(resumable(tmp_path, "run", max_steps=3))
    ckpt = run_dir / "checkpoints" / "step-00000003"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["stateful"]["nonfinite"]["payload"] = Exploit()
    torch.save(state, ckpt / "state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": (ckpt / "state.pt").stat().st_size,
                                     "sha256": checkpoint._sha256(ckpt / "state.pt")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(ckpt) is None
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        train(with_(resumable(tmp_path, "run", max_steps=6), train__resume="auto"))
    assert not (tmp_path / "pwned").exists()


# --- full disk ---

def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, one_thread, reference, monkeypatch):
    cfg = resumable(tmp_path, "run")
    real_write = checkpoint._write_file
    budget = {"bytes": None}

    def small_disk(path: Path, write) -> None:
        """A filesystem that fills up: the write that crosses the budget is left half-written, then ENOSPC."""
        real_write(path, write)
        if budget["bytes"] is not None:
            budget["bytes"] -= path.stat().st_size
            if budget["bytes"] < 0:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_file", small_disk)
    original_save = checkpoint.save

    def save_then_fill(accelerator, run_dir, step, *args, **kwargs):
        if step == 6:  # the disk fills during the second checkpoint
            budget["bytes"] = 20_000
        return original_save(accelerator, run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_then_fill)
    with pytest.raises(checkpoint.CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "disk is full" in message and "step-00000006" in message and "step-00000003 is intact" in message
    assert "--resume" in message
    run_dir = cfg.run_dir()
    assert [d.name for _, d in checkpoint._steps(run_dir)] == ["step-00000003"]
    assert checkpoint.verify(run_dir / "checkpoints" / "step-00000003") is None
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the half-written attempt is cleaned away

    monkeypatch.setattr(checkpoint, "_write_file", real_write)  # space freed
    monkeypatch.setattr(checkpoint, "save", original_save)
    train(with_(cfg, train__resume="auto"))
    assert_same_run(run_dir, reference)


# --- SIGKILL at random steps, in fresh processes ---

def kill_tree(launcher_pid: int, processes: int) -> list[psutil.Process]:
    """SIGKILL the launcher and every process under it, like a node that dies; returns the processes killed
    besides the launcher. torchrun starts each worker in a session of its own (torch.distributed.elastic's
    subprocess handler), so a kill of the launcher's process group alone leaves the workers running, orphaned.
    The launcher is stopped first so that it starts no worker while its tree is read."""
    launcher = psutil.Process(launcher_pid)
    launcher.suspend()
    workers = launcher.children(recursive=True)
    if processes > 1:
        assert len(workers) >= processes, f"expected {processes} workers under torchrun, found {workers}"
    os.killpg(launcher_pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(signal.SIGKILL)
    return workers


def assert_all_dead(workers: list[psutil.Process], timeout_s: float = 2.0) -> None:
    """No killed worker is still running (a zombie waiting for its reaper is not). A SIGKILLed process stops
    at once; a worker left out of the kill trains on, measured here to the end of a 200-step run 9 s after
    its launcher died."""
    deadline = time.monotonic() + timeout_s
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if _running(w)]
        time.sleep(0.05)
    assert not alive, f"killed workers still running: {[(w.pid, w.status()) for w in alive]}"


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def launch(cfg_path: Path, resume: bool, processes: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["train", str(cfg_path)] + (["--resume"] if resume else [])
    if processes == 1:
        cmd = [sys.executable, "-m", "preftune", *args]
    else:
        # --standalone: the rendezvous store binds port 0 itself (no free port picked, released, bound again)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "preftune", *args]
    # own session, and kill_tree for the workers in sessions of their own. Both streams are kept (stderr
    # into stdout): the test reads the step the run says it resumed at
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rows_written(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def run_killing_at(cfg_path: Path, run_dir: Path, kill_steps: list[int], processes: int,
                   before_resume: Callable[[], None] = lambda: None) -> list[int]:
    """Start the run, SIGKILL it once metrics.jsonl shows step k (it dies wherever it is by then, possibly
    mid-checkpoint), resume, repeat for each k; return the exit codes. Each resumed process must say it
    resumed at the step of the newest valid checkpoint left behind (a restart at step 0 would still end
    equal to the uninterrupted run: the step is what tells a resume from a restart), and resumes.jsonl
    must record it."""
    codes = []
    for i, k in enumerate([*kill_steps, None]):
        if i > 0:
            before_resume()
        newest = checkpoint.newest_valid(run_dir) if i > 0 else None
        proc = launch(cfg_path, resume=i > 0, processes=processes)
        rows_at_kill = None
        while k is not None and proc.poll() is None:
            if rows_written(run_dir) >= k:
                # before reading the output to its end: that waits for every process holding the pipe, so a
                # surviving worker would hold it until it finished the run
                assert_all_dead(kill_tree(proc.pid, processes))
                rows_at_kill = rows_written(run_dir)
                break
            time.sleep(0.01)
        output = proc.communicate()[0]
        if k is not None and rows_at_kill is not None:
            # the killed run went no further: no step logged after the kill, no export
            assert rows_written(run_dir) == rows_at_kill and not (run_dir / "final").exists(), output[-3000:]
        codes.append(proc.returncode)
        if k is None:
            assert proc.returncode == 0, output[-3000:]
        if i > 0 and (k is None or RESUMED.search(output)):  # a run killed early may not have said it yet
            assert newest is not None, "the kill left no valid checkpoint: this test would not test a resume"
            step = int(newest.name.removeprefix("step-"))
            assert RESUMED.search(output) and RESUMED.search(output).groups() == (str(newest), str(step)), \
                f"expected a resume at step {step} from {newest}:\n{output[-3000:]}"
        if i > 0 and k is None:
            records = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
            assert records[-1]["step"] == step and records[-1]["changed"] == {}, records
    return codes


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum, processes, n_kills", [(1, 1, 2), (2, 1, 1), (1, 2, 1)])
def test_sigkilled_repeatedly_and_resumed_equals_uninterrupted(tmp_path, grad_accum, processes, n_kills):
    seed = random.randrange(1 << 30)
    steps = 18
    # from step 4 on, the checkpoint of step 3 is complete: every kill leaves one to resume from
    kills = sorted(random.Random(seed).sample(range(4, steps - 5), n_kills))
    batch = 8 // grad_accum // processes
    cfg = resumable(tmp_path, "run", max_steps=steps, grad_accum=grad_accum, batch_size=batch)
    cfg_path = tmp_path / "run.yaml"
    config.save(cfg, cfg_path)
    codes = run_killing_at(cfg_path, cfg.run_dir(), kills, processes)
    context = f"seed {seed}, kills after steps {kills}, exit codes {codes}"
    assert all(c == -signal.SIGKILL for c in codes[:-1]), context

    if processes == 1:
        threads = single_threaded()
        try:
            reference = train(resumable(tmp_path, "ref", max_steps=steps, grad_accum=grad_accum, batch_size=batch))
        finally:
            torch.set_num_threads(threads)
    else:
        ref_cfg = resumable(tmp_path, "ref", max_steps=steps, grad_accum=grad_accum, batch_size=batch)
        config.save(ref_cfg, tmp_path / "ref.yaml")
        run_killing_at(tmp_path / "ref.yaml", ref_cfg.run_dir(), [], processes)
        reference = ref_cfg.run_dir()
    assert_same_run(cfg.run_dir(), reference, context)


# kill -9 with each feature that keeps state or changes the numbers a checkpoint must reproduce
LORA = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
FEATURES = {
    "linear_schedule": {"optim": {"schedule": "linear"}},
    "cosine_schedule": {"optim": {"schedule": "cosine"}},
    "packing": {"perf": {"packing": True}},
    "prefix_sharing": {"perf": {"prefix_sharing": True}},
    "precomputed_reference": {"reference": {"mode": "precomputed"}},
    "lora": {"lora": LORA},
    "kto": {"loss": {"name": "kto"}, "data": {"train": str(REPO / "tests" / "fixtures" / "unpaired.jsonl")}},
}
FAST_FEATURES = {"linear_schedule"}  # the rest run in the slow suite: each costs two process starts


def feature_config(tmp_path: Path, name: str, feature: str, steps: int) -> config.Config:
    sections = {k: dict(v) for k, v in FEATURES[feature].items()}
    cfg = tiny_config(tmp_path / name, **{"train": {"max_steps": steps, "save_every": 3}, **sections})
    return config.replace(cfg, "model.arch", {**cfg.model.arch, **DROPOUT})


@pytest.mark.parametrize("feature", [f if f in FAST_FEATURES else pytest.param(f, marks=pytest.mark.slow)
                                     for f in FEATURES])
def test_sigkilled_and_resumed_with_each_feature_equals_uninterrupted(tmp_path, feature):
    """Killed once metrics.jsonl shows step 5 (the step-3 checkpoint is then complete), resumed in a fresh
    process that must say it resumed at the newest valid checkpoint's step, and ending bit-identical."""
    steps = 8
    cfg = feature_config(tmp_path, "run", feature, steps)
    config.save(cfg, tmp_path / "run.yaml")
    def lose_cache() -> None:
        """precomputed: the resumed process must rebuild the table from the starting weights, not the
        checkpoint's (with the cache left, a table built from the wrong weights would go unnoticed)."""
        shutil.rmtree(cfg.run_dir().parent / "ref_cache", ignore_errors=True)

    codes = run_killing_at(tmp_path / "run.yaml", cfg.run_dir(), [5], processes=1, before_resume=lose_cache)
    assert codes[0] == -signal.SIGKILL, codes
    threads = single_threaded()
    try:
        reference = train(feature_config(tmp_path, "ref", feature, steps))
    finally:
        torch.set_num_threads(threads)
    assert_same_run(cfg.run_dir(), reference, feature)
