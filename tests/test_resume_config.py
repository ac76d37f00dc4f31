"""Resuming with a changed config (docs/robustness.md): schedule fields apply from the resumed step on a curve
without a jump, every other field that changes the numbers is refused naming each change, run controls are
free, and the run directory records what ran (config.yaml as the run started, resumes.jsonl per resume)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint, config
from preftune.config import ConfigError, OptimConfig
from preftune.schedule import Schedule, lr_factor
from preftune.train import train

from .conftest import read_metrics, tiny_config
from .test_resume import assert_same_run, final_weights, with_


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-identity holds for a fixed thread count; on 2 shared cores a second torch thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the schedule alone: hand-worked curves ---


def optim(**fields) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "warmup_steps": 2, "schedule": "linear", **fields})


def resumed(before: OptimConfig, total_before: int, step: int, after: OptimConfig, total_after: int) -> Schedule:
    """The schedule a run planned with `before` has after resuming at `step` with `after`, its state passed
    through a checkpoint's weights_only round trip."""
    schedule = Schedule(before, total_before)
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    schedule = Schedule(after, total_after)  # what train() builds from the resumed config ...
    schedule.load_state_dict(state)  # ... before the checkpoint's plan replaces it
    schedule.resume(step, after, total_after)
    return schedule


def test_unchanged_fields_keep_the_planned_curve_exactly():
    for shape in ("constant", "linear", "cosine"):
        schedule = resumed(optim(schedule=shape), 10, 6, optim(schedule=shape), 10)
        assert len(schedule.segments) == 1
        assert [schedule.lr(t) for t in range(10)] == [lr_factor(t, 10, optim(schedule=shape)) for t in range(10)]


def test_a_longer_linear_run_decays_on_from_the_last_lr_without_a_jump():
    """The issue's case: 10 steps then max_steps=20. Step index 9 (row 10) used 1 - 7/8 = 1/8; the old plan
    would use 0 at index 10 and the plain 20-step plan 1 - 8/18; the re-plan decays 1/8 linearly to 0 at 20."""
    schedule = resumed(optim(), 10, 10, optim(), 20)
    assert schedule.lr(9) == 1 / 8
    for t in range(10, 20):
        assert schedule.lr(t) == pytest.approx(1 / 8 * (20 - t) / 11, rel=1e-12)
    lrs = [schedule.lr(t) for t in range(20)]
    assert all(b < a for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0


def test_a_shorter_cosine_run_continues_from_the_factor_reached():
    schedule = resumed(optim(schedule="cosine"), 20, 8, optim(schedule="cosine"), 12)
    reached = lr_factor(7, 20, optim(schedule="cosine"))  # 0.5 (1 + cos(pi 5/18))
    assert schedule.lr(7) == reached
    p = math.acos(2 * reached - 1) / math.pi  # = 5/18: where cosine has fallen to that factor
    assert p == pytest.approx(5 / 18)
    for t in range(8, 12):
        assert schedule.lr(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (p + (1 - p) * (t - 7) / 5))))
    steps = [schedule.lr(t) - schedule.lr(t + 1) for t in range(7, 11)]
    assert all(0 < d < 0.25 for d in steps)  # falling, each drop below (pi / 2) (1 - p) / 5 = 0.227


def test_a_new_shape_starts_where_the_old_one_was():
    """constant -> linear at step 5 of 10: the factor reached is 1, so linear from 1 at index 4 to 0 at 10."""
    schedule = resumed(optim(schedule="constant"), 10, 5, optim(schedule="linear"), 10)
    assert [schedule.lr(t) for t in range(5, 10)] == pytest.approx([(10 - t) / 6 for t in range(5, 10)])
    # linear -> constant holds the factor reached
    schedule = resumed(optim(), 10, 6, optim(schedule="constant"), 10)
    assert [schedule.lr(t) for t in range(6, 10)] == [lr_factor(5, 10, optim())] * 4 == [0.625] * 4


def test_a_warm_up_in_progress_ramps_on_to_its_new_end():
    """warm-up 4 -> 8 resumed at step 2: index 1 used 2/5; then a straight line to 1 at index 8."""
    schedule = resumed(optim(warmup_steps=4), 20, 2, optim(warmup_steps=8), 20)
    assert schedule.lr(1) == 2 / 5
    assert [schedule.lr(t) for t in range(2, 8)] == pytest.approx([0.4 + 0.6 * (t - 1) / 7 for t in range(2, 8)])
    assert schedule.lr(8) == 1.0 and schedule.lr(9) == 1 - 1 / 12  # then the 20-step linear decay from 8


def test_a_new_peak_lr_scales_the_curve_from_the_resumed_step():
    schedule = resumed(optim(lr=1e-3), 10, 6, optim(lr=5e-4), 10)
    assert [schedule.lr(t) for t in range(6)] == [1e-3 * lr_factor(t, 10, optim()) for t in range(6)]
    assert [schedule.lr(t) for t in range(6, 10)] == pytest.approx(
        [5e-4 * lr_factor(t, 10, optim()) for t in range(6, 10)], rel=1e-12)


@pytest.mark.parametrize("before, after, step, message", [
    ((optim(), 10), (optim(), 5), 6, "5 steps, but the run resumes at step 6"),
    ((optim(warmup_steps=6), 20), (optim(warmup_steps=3), 20), 4, "optim.warmup_steps=3: .* middle of its warm-up"),
    ((optim(warmup_steps=2), 20), (optim(warmup_steps=8), 20), 4, "optim.warmup_steps=8: .* ended at step 2"),
])
def test_schedule_changes_without_a_continuous_meaning_are_refused(before, after, step, message):
    with pytest.raises(ConfigError, match=message):
        resumed(*before, step, *after)


def test_a_shorter_warm_up_that_has_ended_anyway_is_accepted():
    schedule = resumed(optim(warmup_steps=4), 20, 8, optim(warmup_steps=2), 20)
    assert schedule.lr(8) == pytest.approx(lr_factor(8, 20, optim(warmup_steps=4)))


# --- the classification table ---

def test_every_field_is_classified_and_unlisted_ones_are_fixed():
    keys = {f"{s}.{k}" for s, sub in config.to_dict(config.Config()).items() for k in sub}
    for table in (checkpoint.RUN_CONTROL, checkpoint.SCHEDULE, checkpoint.LAYOUT):
        assert table <= keys  # no stale names in the table
    assert {checkpoint.resume_class(k) for k in keys} == {"run_control", "schedule", "layout", "fixed"}
    assert checkpoint.resume_class("newsection.knob_added_next_year") == "fixed"
    numbers = ["model.path", "model.arch", "data.train", "data.max_length", "loss.name", "loss.beta", "loss.params",
               "train.seed", "reference.mode", "lora.r", "optim.adam_beta1", "optim.weight_decay", "perf.packing",
               "perf.compile", "train.mixed_precision"]
    assert [checkpoint.resume_class(k) for k in numbers] == ["fixed"] * len(numbers)


def test_a_batch_layout_may_change_only_where_it_changes_no_number(tmp_path):
    """batch_size x grad_accum x processes = the pairs of a step: a new split of them is free; a new
    product, or any new split under AOT (it sorts within each micro-batch), is refused; KTO's KL estimate spans
    the whole step, so KTO splits freely like DPO."""
    def refusal(loss: str, batch_size: int, grad_accum: int, processes: int) -> str:
        cfg = tiny_config(tmp_path, loss={"name": loss}, train={"batch_size": batch_size, "grad_accum": grad_accum})
        changes = {"train.batch_size": (8, batch_size)} if batch_size != 8 else {}
        try:
            checkpoint.refuse_fixed_changes(tmp_path / "step-00000003", changes, cfg,
                                            {"batch_size": 8, "grad_accum": 1, "world_size": 1}, processes)
        except ConfigError as err:
            return str(err)
        return ""

    assert refusal("dpo", 4, 2, 1) == refusal("dpo", 4, 1, 2) == refusal("dpo", 2, 2, 2) == ""
    assert "pairs per step (train.batch_size x train.grad_accum x processes): 8 x 1 x 1 = 8 -> 4 x 1 x 1 = 4" \
        in refusal("dpo", 4, 1, 1)
    assert "8 x 1 x 1 = 8 -> 8 x 1 x 2 = 16" in refusal("dpo", 8, 1, 2)  # more processes, same config
    assert refusal("kto", 4, 2, 1) == refusal("kto", 2, 2, 2) == ""
    assert "8 x 1 x 1 -> 4 x 2 x 1 (loss 'aot' works on each micro-batch" in refusal("aot", 4, 2, 1)


# --- in a real run: a 6-step base run (checkpoints at 3 and 6), copied for each resume ---

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """cfg, run_dir of a finished 6-step linear-schedule run; copy the run dir before resuming into it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(tmp_path_factory.mktemp("base"), optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "linear"},
                          train={"max_steps": 6, "save_every": 3})
        return cfg, train(cfg)
    finally:
        torch.set_num_threads(threads)


def copy_of(base, tmp_path: Path, name: str) -> config.Config:
    cfg, run_dir = base
    cfg = with_(cfg, train__output_dir=str(tmp_path), train__run_name=name, train__resume="auto")
    shutil.copytree(run_dir, cfg.run_dir())
    return cfg


def resumes(run_dir: Path) -> list[dict]:
    """resumes.jsonl's records, without the run-directory change the first resume of a copy records."""
    records = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    for record in records:
        record["changed"].pop("train.output_dir", None)
        record["changed"].pop("train.run_name", None)
    return records


def test_a_new_lr_is_the_lr_the_optimiser_uses(base, tmp_path):
    """lr 0 from step 3 on (the old plan's lr there is 1e-3 x 1, 3/4, 1/2): the weights must stay those of
    the step-3 checkpoint. The old LambdaLR restored the checkpoint's lr and trained on with it while
    config.yaml said otherwise."""
    cfg = copy_of(base, tmp_path, "lr0")
    step_3 = cfg.run_dir() / "checkpoints" / "step-00000003"
    at_three = load_file(step_3 / "model.safetensors")
    run_dir = train(with_(cfg, optim__lr=0.0, train__resume=str(step_3)))
    final = final_weights(run_dir)
    assert [k for k in at_three if not torch.equal(at_three[k], final[k])] == []
    rows = read_metrics(run_dir)
    assert [r["lr"] for r in rows[3:]] == [0.0, 0.0, 0.0] and rows[2]["lr"] == 1e-3
    assert config.load(run_dir / "config.yaml").optim.lr == 1e-3  # the config the run started with
    (record,) = resumes(run_dir)
    assert record["step"] == 3 and record["checkpoint"] == str(step_3)
    assert record["changed"] == {"optim.lr": [1e-3, 0.0]}


def test_a_longer_run_continues_the_decay_and_a_second_resume_keeps_the_re_plan(base, tmp_path, monkeypatch):
    """max_steps 6 -> 12 (linear): no jump; then stopped at step 9 and resumed with the same config, the run
    must follow the re-planned curve, not the plain 12-step one: the plan is checkpointed."""
    whole = train(with_(copy_of(base, tmp_path, "whole"), train__max_steps=12))
    lrs = [r["lr"] for r in read_metrics(whole)]
    assert lrs[6:] == pytest.approx([lrs[5] * (12 - t) / 7 for t in range(6, 12)], rel=1e-12)  # 1e-3/4 -> 0

    class Stop(Exception):
        pass

    real_save = checkpoint.save

    def save_then_die(accelerator, run_dir, step, *args, **kwargs):
        real_save(accelerator, run_dir, step, *args, **kwargs)
        if step == 9:
            raise Stop

    cfg = with_(copy_of(base, tmp_path, "twice"), train__max_steps=12)
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Stop):
        train(cfg)
    monkeypatch.setattr(checkpoint, "save", real_save)
    run_dir = train(cfg)
    assert_same_run(run_dir, whole)
    assert [(r["step"], r["changed"]) for r in resumes(run_dir)] == [(6, {"train.max_steps": [6, 12]}), (9, {})]


def test_changed_fields_that_fix_the_numbers_are_refused_each_named(base, tmp_path):
    cfg = copy_of(base, tmp_path, "fixed")
    changed = with_(cfg, loss=dataclasses.replace(cfg.loss, beta=0.2), train__batch_size=4, perf__packing=True,
                    train__seed=1, optim__lr=5e-4, data__max_length=120, reference__mode="precomputed")
    with pytest.raises(ConfigError) as err:
        train(changed)
    message = str(err.value)
    assert "step-00000006" in message
    for change in ("loss.beta: 0.1 -> 0.2", "perf.packing: None -> True", "train.seed: 0 -> 1",
                   "data.max_length: 128 -> 120", "reference.mode: 'auto' -> 'precomputed'",
                   "pairs per step (train.batch_size x train.grad_accum x processes): 8 x 1 x 1 = 8 -> 4 x 1 x 1 = 4"):
        assert change in message
    assert "optim.lr" not in message  # a schedule field: it would have been applied
    assert len(read_metrics(cfg.run_dir())) == 6 and not (cfg.run_dir() / "resumes.jsonl").exists()


def test_a_new_split_of_the_same_pairs_per_step_resumes_on_the_same_trajectory(base, tmp_path):
    same = train(with_(copy_of(base, tmp_path, "same"), train__max_steps=9))
    split = train(with_(copy_of(base, tmp_path, "split"), train__max_steps=9, train__batch_size=4,
                        train__grad_accum=2))
    ours, theirs = final_weights(split), final_weights(same)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(final_weights(base[1]).values(), theirs.values(), strict=True))
    assert resumes(split)[0]["changed"] == {"train.batch_size": [8, 4], "train.grad_accum": [1, 2],
                                            "train.max_steps": [6, 9]}


def test_a_run_cut_below_the_resumed_step_is_refused(base, tmp_path):
    cfg = copy_of(base, tmp_path, "short")
    with pytest.raises(ConfigError, match="4 steps, but the run resumes at step 6"):
        train(with_(cfg, train__max_steps=4))
    assert len(read_metrics(cfg.run_dir())) == 6


def test_run_controls_change_freely_and_are_recorded(base, tmp_path, capsys):
    cfg = copy_of(base, tmp_path, "controls")
    run_dir = train(with_(cfg, train__save_every=1, train__keep_checkpoints=1, train__log_every=2))
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 6" in out and "re-planned" not in out
    (record,) = resumes(run_dir)
    assert record["changed"] == {"train.keep_checkpoints": [2, 1], "train.log_every": [1, 2],
                                 "train.save_every": [3, 1]}
