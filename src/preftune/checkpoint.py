"""Run directories, resumable checkpoints and the final export in HF format.

A checkpoint holds everything needed to continue a run exactly as if it had never stopped:

    run_dir/checkpoints/step-00000120/
        model.safetensors   the policy's trainable weights and buffers (frozen weights come from model.path again)
        state.pt            optimiser, lr schedule, every registered stateful component and each process's RNG
                            states; tensors, numbers and strings only, so it loads with weights_only=True
        trainer_state.json  the step counter (the data position follows from it), world size, batch shape
        config.yaml         the resolved config of the run that wrote it
        manifest.json       size and sha256 of each file above; written last, so no manifest = incomplete

It is written into `.tmp-step-...`, every file fsynced, then renamed into place: a crash or a full disk
mid-save leaves the previous checkpoints as they were.

Under parallel.sharding=fsdp2 no process ever holds the whole model: model.safetensors is replaced by
`shards/`, torch.distributed.checkpoint (DCP) files in which each process writes its own shards of the
weights and optimiser state (plus DCP's `.metadata`), and state.pt keeps everything else. The manifest
then lists every shard file; the same temporary directory, fsync, rename and manifest protocol applies.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from preftune import config, sharding, zero

log = logging.getLogger("preftune")

FORMAT = 1
CHECKPOINTS = "checkpoints"
FILES = ("model.safetensors", "state.pt", "trainer_state.json", "config.yaml")
SHARDS = "shards"  # DCP directory of a sharded checkpoint
SHARDED_FILES = (f"{SHARDS}/.metadata", "state.pt", "trainer_state.json", "config.yaml")
ENGINE_TAG = "engine"  # DeepSpeed: engine.save_checkpoint's tag, the folder under shards/ it writes
ZERO_FILES = ("state.pt", "trainer_state.json", "config.yaml")  # plus every file the engine wrote
RESUMES = "resumes.jsonl"
# What a resume may change, by config field (docs/robustness.md, "Resuming with a changed config"):
# run control changes where and how the run reports, saves and stops, never a number it computes: free.
RUN_CONTROL = {"train.resume", "train.overwrite", "train.progress", "train.save_every", "train.keep_checkpoints",
               "train.max_bad_steps", "train.log_every", "train.output_dir", "train.run_name", "data.cache",
               "data.cache_dir", "reference.cache_dir", "perf.mmap_threshold_kb", "log.tensorboard", "log.wandb",
               "log.wandb_project", "log.wandb_mode", "parallel.reshard_after_forward"}
# the learning-rate curve: applied from the resumed step on, re-planned without a jump (schedule.Schedule)
SCHEDULE = {"optim.lr", "optim.warmup_steps", "optim.schedule", "train.max_steps", "train.epochs"}
# how a step's pairs are split into micro-batches and processes: free while the pairs per step (batch_size x
# grad_accum x processes) stay the checkpoint's, since the batch stream and the loss (a mean over the step's
# pairs) depend on that product alone; except for a loss that works on each micro-batch as a whole
# (LossSpec.per_micro_batch: AOT sorts within it), for which the layout is part of the numbers
LAYOUT = {"train.batch_size", "train.grad_accum"}
# Every other field is fixed: model, data and tokenisation, loss and its hyperparameters, reference, LoRA,
# seed, optimiser hyperparameters (the optimiser's state_dict would restore the old ones), evaluation, and the
# perf switches that change float rounding. A change is refused, and so
# is a change to a field added later and not listed above: a new field is safe until someone classifies it.


def resume_class(key: str) -> str:
    """run_control, schedule, layout or fixed: how a resume treats a change of the dotted config `key`."""
    for name, keys in (("run_control", RUN_CONTROL), ("schedule", SCHEDULE), ("layout", LAYOUT)):
        if key in keys:
            return name
    return "fixed"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it and what to do."""


def prepare_run_dir(cfg: config.Config, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """Create the run directory and find the checkpoint to continue from (None: start at step 0).

    A directory that already holds a run is refused unless the run resumes (the sanctioned way back in) or
    train.overwrite is set, in which case the old run's checkpoints go too: they must never be resumed into
    the new run later.
    """
    run_dir = cfg.run_dir()
    resume_from = None
    if accelerator.is_main_process:
        if cfg.train.resume != "never":
            resume_from = find_resume_point(cfg)
        elif run_dir.exists() and any(run_dir.iterdir()):
            if not cfg.train.overwrite:
                raise FileExistsError(
                    f"run directory {str(run_dir)!r} already holds a run; continue it with --resume "
                    "(train.resume=auto), choose another train.run_name=..., or set train.overwrite=true "
                    "to replace it")
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (run_dir / "config.yaml").exists():
            # a resume keeps the config the run started with; resumes.jsonl records what each resume changed
            config.save(cfg, run_dir / "config.yaml")
    resume_from = broadcast_object_list([resume_from])[0]
    accelerator.wait_for_everyone()
    return run_dir, resume_from


def find_resume_point(cfg: config.Config) -> Path | None:
    """The checkpoint train.resume names: the newest valid one of this run (auto), of a named run directory,
    or a named checkpoint, which must then be valid (an explicit choice never silently falls back)."""
    if cfg.train.resume == "auto":
        return newest_valid(cfg.run_dir())
    path = Path(cfg.train.resume)
    if (path / "manifest.json").exists() or path.name.startswith("step-"):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {str(path)!r} is unusable: {problem}")
        return path
    if path.is_dir():
        found = newest_valid(path)
        if found is None:
            raise CheckpointError(f"train.resume: run directory {str(path)!r} holds no valid checkpoint")
        return found
    raise CheckpointError(f"train.resume: {str(path)!r} is neither a checkpoint nor a run directory; "
                          "use never, auto or a path")


def _steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished-looking checkpoint directory, oldest first."""
    found = []
    for d in (run_dir / CHECKPOINTS).glob("step-*"):
        try:
            found.append((int(d.name.removeprefix("step-")), d))
        except ValueError:
            continue
    return sorted(found)


def newest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest is present and whose every file matches it; each newer one that
    fails is skipped with a warning naming it and the reason."""
    for _, ckpt in reversed(_steps(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the save did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"manifest.json is unreadable ({err})"
    written = manifest.get("sharding", "none")
    required = FILES if written == "none" else ZERO_FILES if written in zero.STAGES.values() else SHARDED_FILES
    for name in required:
        if name not in files:
            return f"manifest lists no {name}"
    if written in zero.STAGES.values() and not any(name.startswith(f"{SHARDS}/") for name in files):
        return f"manifest lists no {SHARDS}/ files (DeepSpeed's)"
    for name in files:  # a sharded checkpoint's manifest also lists every process's shard files
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != files[name]["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {files[name]['bytes']}"
        if _sha256(path) != files[name]["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- writing ---

def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file with `write(path)` and fsync it: after this returns, its bytes survive a power cut."""
    write(path)
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain lists and tensors (weights_only-loadable, no pickled objects)."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that training changes (all of them in full fine-tuning, the adapters under LoRA) and buffers.

    named_parameters() lists a tied weight once, which safetensors requires (it refuses shared storage).
    """
    full = accelerator.get_state_dict(model)  # gathers under FSDP / ZeRO-3; every process must call it
    unwrapped = accelerator.unwrap_model(model)
    keep = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in unwrapped.named_buffers()}
    return {n: t.detach().contiguous() for n, t in full.items() if n in keep}


def save(accelerator: Accelerator, run_dir: Path, step: int, model: torch.nn.Module,
         stateful: dict[str, Any], cfg: config.Config, extra: dict[str, Any] | None = None) -> Path | None:
    """Write checkpoint `step` atomically, then keep the newest train.keep_checkpoints. Every process calls
    this; the main one writes. `stateful` objects are saved through their state_dict(); `extra` holds plain
    values (numbers, strings, tensors, containers) that load() hands back. A failed write (full disk) stops
    every process with a CheckpointError that says the previous checkpoint is intact."""
    if sharding.is_sharded(model) or zero.layout(model):
        return _save_sharded(accelerator, run_dir, step, model, stateful, cfg, extra)
    if accelerator.distributed_type == DistributedType.FSDP:
        # their optimiser state is sharded over the processes; the main one alone can not write it
        if accelerator.is_main_process:
            log.warning("checkpoints under %s are not supported yet: step %d not saved (see docs/robustness.md)",
                        accelerator.distributed_type.value, step)
        return None
    weights = _trainable_state(accelerator, model)
    rng = gather_object([rng_state()])  # one entry per process, in rank order
    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    error = ""
    if accelerator.is_main_process:
        state = {"stateful": {name: obj.state_dict() for name, obj in stateful.items()}, "rng": rng,
                 "extra": extra or {}}
        trainer_state = {"format": FORMAT, "step": step, "world_size": accelerator.num_processes,
                         "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum}
        try:
            _write_checkpoint(final, weights, state, trainer_state, cfg)
        except OSError as err:
            shutil.rmtree(final.with_name(".tmp-" + final.name), ignore_errors=True)  # give the space back
            error = _save_failure(run_dir, step, final, err)
        else:
            _prune_quietly(run_dir, step, cfg.train.keep_checkpoints)
    # every process must stop if the main one could not write, not wait for it at the next collective
    failed = accelerator.reduce(torch.tensor([float(bool(error))], device=accelerator.device), reduction="sum")
    if failed.item():
        raise CheckpointError(error or f"the main process could not write checkpoint {final} (see its error)")
    return final


def _write_checkpoint(final: Path, weights: dict[str, torch.Tensor], state: dict, trainer_state: dict,
                      cfg: config.Config) -> None:
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_file(tmp / "model.safetensors", lambda p: safetensors.torch.save_file(weights, p, {"format": "pt"}))
    _write_file(tmp / "state.pt", lambda p: torch.save(state, p))
    _write_file(tmp / "trainer_state.json", lambda p: p.write_text(json.dumps(trainer_state, indent=2)))
    _write_file(tmp / "config.yaml", lambda p: config.save(cfg, p))
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
    manifest = {"format": FORMAT, "step": trainer_state["step"], "files": files}
    _write_file(tmp / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2)))
    _fsync_dir(tmp)
    _move_into_place(tmp, final)




def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished, fsynced checkpoint directory to its name: the step at which it becomes visible."""
    if final.exists():  # an invalid leftover of an abandoned attempt at this step (resume skipped it)
        stale = final.with_name(".stale-" + final.name)
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    _fsync_dir(final.parent)


def _save_failure(run_dir: Path, step: int, final: Path, err: OSError) -> str:
    """The message of a checkpoint write that failed: why, and which earlier checkpoint a --resume would use."""
    previous = [d for s, d in _steps(run_dir) if s < step]
    full = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return (f"could not write checkpoint {final}{full}: {err}. Training stopped at step {step}; {kept}. "
            "Free space, then rerun with --resume to continue from it.")


def _prune_quietly(run_dir: Path, step: int, keep: int) -> None:
    try:
        _prune(run_dir, step, keep)
    except OSError as err:  # the new checkpoint is safe; old ones merely linger
        log.warning("could not remove old checkpoints in %s: %s", run_dir / CHECKPOINTS, err)


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `step`. Later ones belong to a timeline this run abandoned
    by resuming from an earlier checkpoint; resuming into them later would mix two runs, so they go too, as
    do the temporary directories of saves a crash cut short."""
    kept = [d for s, d in _steps(run_dir) if s <= step]
    for s, d in _steps(run_dir):
        if s > step or d in kept[:-keep]:
            shutil.rmtree(d)
    for leftover in (run_dir / CHECKPOINTS).glob(".tmp-*"):  # saves that a crash cut short
        shutil.rmtree(leftover)


# --- reading ---

def load(accelerator: Accelerator, ckpt: Path, model: torch.nn.Module, stateful: dict[str, Any],
         cfg: config.Config) -> tuple[int, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Restore weights, stateful components and this process's RNG from `ckpt`; returns its step, the
    `extra` values saved with it and the config fields that differ from its config (key -> (old, new)).
    A changed field that RUN_CONTROL, SCHEDULE and LAYOUT do not list, or a LAYOUT change that changes the
    numbers, is refused (ConfigError) before anything loads; schedule changes are the caller's to apply
    (schedule.Schedule.resume).

    Nothing here unpickles objects: weights come from safetensors and state.pt loads with weights_only=True,
    which accepts tensors and plain containers only.
    """
    _check_layout(ckpt, model)
    if sharding.is_sharded(model) or zero.layout(model):
        return _load_sharded(accelerator, ckpt, model, stateful, cfg)
    state, trainer_state, changes = _read_state(ckpt, cfg, accelerator.num_processes)
    try:
        weights = safetensors.torch.load_file(ckpt / "model.safetensors", device="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {ckpt} could not be read: {err}") from None
    unwrapped = accelerator.unwrap_model(model)
    try:
        result = unwrapped.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} does not fit the model: {err}") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} holds weights the model lacks, e.g. "
                              f"{result.unexpected_keys[:3]}: was it written for another model?")
    for name, obj in stateful.items():
        if name not in state["stateful"]:
            raise CheckpointError(f"{ckpt / 'state.pt'} holds no state for {name!r} "
                                  f"(it has {sorted(state['stateful'])})")
        obj.load_state_dict(state["stateful"][name])
    rank = accelerator.process_index
    if trainer_state["world_size"] != accelerator.num_processes:
        log.warning("%s was written by %d process(es), this run has %d: each step has the same pairs, but the "
                    "RNG streams (dropout) differ from an uninterrupted run's", ckpt, trainer_state["world_size"],
                    accelerator.num_processes)
    set_rng_state(state["rng"][rank % len(state["rng"])])
    return int(trainer_state["step"]), state["extra"], changes


def config_changes(saved: config.Config, current: config.Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (checkpoint's value, this run's value) of every field that differs, train.resume aside
    (it always does: it is how the run got here)."""
    def flat(cfg: config.Config) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sub in config.to_dict(cfg).items() for k, v in sub.items()}

    old, new = flat(saved), flat(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if k != "train.resume" and old.get(k) != new.get(k)}


def refuse_fixed_changes(ckpt: Path, changes: dict[str, tuple[Any, Any]], cfg: config.Config,
                         trainer_state: dict[str, Any], processes: int) -> None:
    """A ConfigError listing every change that a resume can not make, with old -> new values: each changed
    fixed field, and a batch layout (LAYOUT) that changes the pairs per step, or any new split under a
    per-micro-batch loss."""
    from preftune.losses import LOSSES  # late: only a resume needs the loss registry

    fixed = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items() if resume_class(k) == "fixed"]
    before = (trainer_state["batch_size"], trainer_state["grad_accum"], trainer_state["world_size"])
    after = (cfg.train.batch_size, cfg.train.grad_accum, processes)
    if math.prod(before) != math.prod(after):
        fixed.append("pairs per step (train.batch_size x train.grad_accum x processes): "
                     f"{' x '.join(map(str, before))} = {math.prod(before)} -> "
                     f"{' x '.join(map(str, after))} = {math.prod(after)}")
    elif before != after and LOSSES[cfg.loss.name].per_micro_batch:
        fixed.append(f"batch layout (train.batch_size x train.grad_accum x processes): {' x '.join(map(str, before))}"
                     f" -> {' x '.join(map(str, after))} (loss {cfg.loss.name!r} works on each micro-batch "
                     "as a whole, so the split is part of its numbers)")
    if fixed:
        raise config.ConfigError(
            f"train.resume: {ckpt} was written with other values of fields that fix what the run computes, "
            f"which a resume can not change: {'; '.join(fixed)}. Set them back to resume, or start a new run "
            "(another train.run_name, e.g. from the exported weights with model.path)")


def record_resume(run_dir: Path, step: int, ckpt: Path | None, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append this resume (step, checkpoint, changed fields old -> new, time) to run_dir/resumes.jsonl, after
    dropping the records of resumes at `step` or later: like metrics.jsonl's rows, they belong to the steps
    this resume trains again. A fresh start (ckpt None, step 0) leaves no record."""
    path = run_dir / RESUMES
    rows = [line + "\n" for line in (path.read_text().splitlines() if path.exists() else [])
            if json.loads(line)["step"] < step]
    if ckpt is not None:
        when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        rows.append(json.dumps({"step": step, "checkpoint": str(ckpt), "time": when,
                                "changed": {k: list(v) for k, v in changes.items()}}) + "\n")
    if not rows:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    _write_file(tmp, lambda p: p.write_text("".join(rows)))
    tmp.replace(path)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (those the resumed checkpoint had seen); later rows will be written
    again. A row torn by a kill mid-write is dropped. Replaced atomically like a checkpoint file."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    _write_file(tmp, lambda p: p.write_text("".join(rows)))
    tmp.replace(path)


def export(accelerator: Accelerator, model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Weights as safetensors, config and tokenizer: a directory `from_pretrained` loads.

    `get_state_dict` gathers full weights on every engine (a no-op for one process, a gather under FSDP or
    ZeRO-3); only the main process writes. Under FSDP2 the full weights are gathered once, shard by shard,
    into the main process's CPU memory (never a GPU's), and the other processes hold nothing.
    """
    if sharding.is_sharded(model):
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # inference users want the cache back
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        unwrapped.config.use_cache = False
        tokenizer.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --- sharded checkpoints (parallel.sharding=fsdp2) ---

def _check_layout(ckpt: Path, model: torch.nn.Module) -> None:
    """A sharded checkpoint resumes only a sharded run and a full one only an unsharded run: say so."""
    try:
        written = json.loads((ckpt / "trainer_state.json").read_text()).get("sharding", "none")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt} could not be read: {err}") from None
    running = _layout(model)
    if written != running:
        raise CheckpointError(f"{ckpt} was written with parallel.sharding={written}, this run has "
                              f"parallel.sharding={running}; resume with parallel.sharding={written} (its "
                              "optimiser state is stored in that layout), or start afresh from an export")


def _layout(model: torch.nn.Module) -> str:
    """How a checkpoint of `model` stores it: "none", "fsdp2", or DeepSpeed's "zero2" / "zero3"."""
    return zero.layout(model) or (sharding.SHARDED if sharding.is_sharded(model) else "none")


def _own_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of files this process wrote under `root`, each fsynced first."""
    out = {}
    for name in names:
        path = root / name
        with path.open("rb") as f:
            os.fsync(f.fileno())
        out[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _any_failed(accelerator: Accelerator, error: str) -> bool:
    """True on every process when any one of them has an error: all stop together, none waits forever."""
    failed = accelerator.reduce(torch.tensor([float(bool(error))], device=accelerator.device), reduction="sum")
    return bool(failed.item())


def _save_sharded(accelerator: Accelerator, run_dir: Path, step: int, model: torch.nn.Module,
                  stateful: dict[str, Any], cfg: config.Config, extra: dict[str, Any] | None) -> Path:
    """`save` for an FSDP2 policy: every process writes its own shards of the weights and optimiser state
    through DCP (no process gathers the model) and checksums them; the main process writes the rest and
    the manifest, then renames the directory into place, as for an unsharded checkpoint. Multi-node runs
    need train.output_dir on a filesystem every node sees."""
    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(".tmp-" + final.name)
    rank = accelerator.process_index
    error = ""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            (tmp / SHARDS).mkdir(parents=True)
        except OSError as err:
            error = f"could not create {tmp}: {err}"
    if _any_failed(accelerator, error):
        raise CheckpointError(error or f"the main process could not create {tmp} (see its error)")
    layout = _layout(model)
    files: dict[str, dict[str, Any]] = {}
    try:
        if layout == sharding.SHARDED:
            model_state, optim_state = get_state_dict(model, stateful["optimizer"])  # this process's DTensors
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDS)
            mine = sorted(p.name for p in (tmp / SHARDS).glob(f"__{rank}_*.distcp"))  # DCP's per-rank names
            files = _own_files(tmp / SHARDS, mine + ([".metadata"] if accelerator.is_main_process else []))
        else:
            # DeepSpeed: every process writes its ZeRO partitions of weights (ZeRO-3) and optimiser state;
            # the engine ends with a barrier, so the main process then checksums every file it wrote
            model.save_checkpoint(tmp / SHARDS, tag=ENGINE_TAG, save_latest=False)
            if accelerator.is_main_process:
                files = _own_files(tmp / SHARDS, sorted(str(p.relative_to(tmp / SHARDS))
                                                         for p in (tmp / SHARDS).rglob("*") if p.is_file()))
    except Exception as err:  # noqa: BLE001  DCP raises on every process when one fails to write
        error = f"could not write the shards of {final}: {err}"
    if _any_failed(accelerator, error):
        raise CheckpointError(error or f"another process could not write its shards of {final} (see its error)")
    shard_files = {f"{SHARDS}/{n}": v for part in gather_object([files]) for n, v in part.items()}
    rng = gather_object([rng_state()])  # one entry per process, in rank order
    if accelerator.is_main_process:
        state = {"stateful": {name: obj.state_dict() for name, obj in stateful.items() if name != "optimizer"},
                 "rng": rng, "extra": extra or {}}
        trainer_state = {"format": FORMAT, "step": step, "world_size": accelerator.num_processes,
                         "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                         "sharding": layout}
        try:
            _write_file(tmp / "state.pt", lambda p: torch.save(state, p))
            _write_file(tmp / "trainer_state.json", lambda p: p.write_text(json.dumps(trainer_state, indent=2)))
            _write_file(tmp / "config.yaml", lambda p: config.save(cfg, p))
            rest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                    for name in ("state.pt", "trainer_state.json", "config.yaml")}
            manifest = {"format": FORMAT, "step": step, "sharding": layout,
                        "files": {**shard_files, **rest}}
            _write_file(tmp / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2)))
            for folder in {(tmp / name).parent for name in shard_files}:
                _fsync_dir(folder)
            _fsync_dir(tmp)
            _move_into_place(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            error = _save_failure(run_dir, step, final, err)
        else:
            _prune_quietly(run_dir, step, cfg.train.keep_checkpoints)
    if _any_failed(accelerator, error):
        raise CheckpointError(error or f"the main process could not write checkpoint {final} (see its error)")
    return final



def _read_state(ckpt: Path, cfg: config.Config, processes: int
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[Any, Any]]]:
    """state.pt, trainer_state.json and the config changes of a checkpoint, sharded or not; refuses the
    changes a resume can not make before anything is restored, so the run stops where it was."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
        saved_cfg = config.load(ckpt / "config.yaml")
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{ckpt / 'state.pt'}: refused to load: it holds Python objects beyond tensors "
                              f"and plain data, which could run code ({str(err).splitlines()[0]})") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {ckpt} could not be read: {err}") from None
    changes = config_changes(saved_cfg, cfg)
    refuse_fixed_changes(ckpt, changes, cfg, trainer_state, processes)
    return state, trainer_state, changes


def _load_sharded(accelerator: Accelerator, ckpt: Path, model: torch.nn.Module, stateful: dict[str, Any],
                  cfg: config.Config) -> tuple[int, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """`load` for an FSDP2 policy. DCP reads each process's part of every tensor whatever number of
    processes wrote it (resharding), so another process count works as long as a step still means the same
    pairs: pairs per step (processes x batch_size x grad_accum) must equal the checkpoint's, or it stops
    (refuse_fixed_changes, as for every other field that fixes the numbers)."""
    state, trainer_state, changes = _read_state(ckpt, cfg, accelerator.num_processes)
    world = accelerator.num_processes
    optimizer = stateful["optimizer"]
    if zero.layout(model):
        _load_engine(ckpt, model, trainer_state["world_size"], world)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)  # templates: this process's shards
        try:
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=ckpt / SHARDS)
        except Exception as err:  # noqa: BLE001  DCP wraps every process's failure in one CheckpointException
            raise CheckpointError(f"{ckpt / SHARDS} could not be loaded into this model: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    for name, obj in stateful.items():
        if name == "optimizer":
            continue
        if name not in state["stateful"]:
            raise CheckpointError(f"{ckpt / 'state.pt'} holds no state for {name!r} "
                                  f"(it has {sorted(state['stateful'])})")
        obj.load_state_dict(state["stateful"][name])
    if trainer_state["world_size"] != world:
        log.warning("%s was written by %d process(es), this run has %d: weights and optimiser state are "
                    "resharded; per-process RNG streams (dropout) differ from an uninterrupted run",
                    ckpt, trainer_state["world_size"], world)
    set_rng_state(state["rng"][accelerator.process_index % len(state["rng"])])
    return int(trainer_state["step"]), state["extra"], changes


def _load_engine(ckpt: Path, engine: torch.nn.Module, written_by: int, world: int) -> None:
    """A DeepSpeed checkpoint into the prepared engine: weights and ZeRO optimiser partitions. ZeRO's
    partitions are cut per process, so only the process count that wrote them reads them back."""
    if written_by != world:
        raise CheckpointError(
            f"{ckpt} holds DeepSpeed ZeRO partitions written by {written_by} process(es); this run has {world}. "
            f"Resume it on {written_by} processes, or start a new run from its weights: "
            f"`python {ckpt / SHARDS / 'zero_to_fp32.py'} {ckpt / SHARDS} OUT --tag {ENGINE_TAG} "
            "--safe_serialization` writes them in fp32 to OUT; add the run's final/ config and tokenizer "
            "files and set model.path=OUT (the optimiser state starts afresh)")
    try:
        path, _ = engine.load_checkpoint(ckpt / SHARDS, tag=ENGINE_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=True)
    except Exception as err:  # noqa: BLE001  the engine's own errors name no checkpoint
        raise CheckpointError(f"{ckpt / SHARDS} could not be loaded into this model: {err}") from None
    if path is None:
        raise CheckpointError(f"{ckpt / SHARDS / ENGINE_TAG} holds no DeepSpeed checkpoint")
