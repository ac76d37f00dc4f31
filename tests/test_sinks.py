"""Metric sinks: metrics.jsonl always, TensorBoard event files on request, W&B only when installed."""

import importlib.util

import pytest

from preftune import config, sinks
from preftune.train import train

from .conftest import read_metrics


def test_tensorboard_event_files_hold_the_same_numbers_as_metrics_jsonl(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(tiny(train={"max_steps": 3}, log={"tensorboard": True}))
    rows = read_metrics(run_dir)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"loss", "rewards/accuracies", "rewards/margins", "lr"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_without_tensorboard_only_metrics_jsonl_is_written(tiny):
    run_dir = train(tiny(train={"max_steps": 1}))
    assert not (run_dir / "tensorboard").exists() and len(read_metrics(run_dir)) == 1


def test_wandb_asked_but_not_installed_fails_before_training(tiny, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tiny(train={"max_steps": 2}, log={"wandb": True})
    with pytest.raises(config.ConfigError, match="log.wandb=true but the 'wandb' package is not installed"):
        train(cfg)
    assert not (cfg.run_dir() / "metrics.jsonl").exists()  # failed before the first step, not after it


def test_sinks_write_rows_to_jsonl_and_skip_non_numbers_elsewhere(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = sinks.Sinks(tiny(log={"tensorboard": True}), tmp_path)
    out.write({"step": 4, "loss": 0.5, "note": "text"})
    out.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4, "loss": 0.5, "note": "text"}\n'
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["loss"]
