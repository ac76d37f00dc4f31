"""A run that stops before its first optimiser step leaves its run directory as it found it, so a retry under
the same name works; a directory that held anything before, or a run that took a step, is never removed."""

import json

import pytest
from accelerate import Accelerator

from preftune import checkpoint, cli
from preftune import train as train_module
from preftune.data import DataError
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, REPO, read_metrics


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_run_refused_by_validation_leaves_nothing_and_the_retry_works(tiny):
    refused = tiny(loss={"name": "kto"}, perf={"prefix_sharing": True}, train={"max_steps": 1, "run_name": "kto"})
    with pytest.raises(ValueError, match="perf.prefix_sharing=true: .* loss .kto."):
        train(refused)
    assert not refused.run_dir().exists()
    fixed = tiny(loss={"name": "kto"}, train={"max_steps": 1, "run_name": "kto"})
    assert (train(fixed) / "final" / "config.json").is_file()


def test_a_run_refused_by_a_data_error_leaves_nothing_and_the_retry_works(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = EXAMPLE_PAIRS.read_text().splitlines()
    record = json.loads(lines[2])
    record["chosen"] = ""
    bad.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    cfg = tiny(data={"train": str(bad)}, train={"max_steps": 1, "run_name": "data"})
    with pytest.raises(DataError, match=f"{bad}:3"):
        train(cfg)
    assert not cfg.run_dir().exists()
    # the same through the command line, then the retry with the data fixed, under the same name
    args = ["train", str(REPO / "configs" / "tiny.yaml"), f"train.output_dir={cfg.train.output_dir}",
            "train.run_name=data", "train.max_steps=1", "train.progress=false"]
    assert cli.main([*args, f"data.train={bad}"]) == 2
    assert "bad.jsonl:3" in capsys.readouterr().err
    assert not cfg.run_dir().exists()
    assert cli.main([*args, f"data.train={EXAMPLE_PAIRS}"]) == 0
    assert len(read_metrics(cfg.run_dir())) == 1


def test_a_failure_inside_step_one_leaves_nothing_but_one_after_a_step_keeps_the_run(tiny, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "batch_logps", out_of_memory)  # the policy's forward in step 1
        cfg = tiny(train={"max_steps": 2, "run_name": "oom"})
        with pytest.raises(RuntimeError, match="simulated"):
            train(cfg)
    assert not cfg.run_dir().exists()

    # the same failure after two optimiser steps (in the export): the run and its metrics stay
    monkeypatch.setattr(checkpoint, "export", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg)
    assert [row["step"] for row in read_metrics(cfg.run_dir())] == [1, 2]


def test_a_directory_that_held_a_run_is_never_removed(tiny):
    cfg = tiny(train={"max_steps": 2, "save_every": 1, "run_name": "kept"})
    run_dir = train(cfg)
    before = files_under(run_dir)
    assert "checkpoints/step-00000002/manifest.json" in before
    refused = {"loss": {"name": "kto"}, "perf": {"prefix_sharing": True}}
    # resumed (auto) and overwritten, each refused before its first step
    for train_section in ({"resume": "auto"}, {"overwrite": True}):
        with pytest.raises(ValueError, match="perf.prefix_sharing=true: .* loss .kto."):
            train(tiny(**refused, train={"max_steps": 2, "save_every": 1, "run_name": "kept", **train_section}))
        assert run_dir.is_dir() and (run_dir / "final" / "config.json").is_file(), train_section
    # and refused because it already holds a run
    with pytest.raises(FileExistsError):
        train(cfg)
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "final").is_dir()


def test_an_empty_directory_given_as_the_run_directory_is_emptied_again(tiny):
    cfg = tiny(loss={"name": "kto"}, perf={"prefix_sharing": True}, train={"max_steps": 1, "run_name": "empty"})
    cfg.run_dir().mkdir(parents=True)
    with pytest.raises(ValueError, match="perf.prefix_sharing=true: .* loss .kto."):
        train(cfg)
    assert cfg.run_dir().is_dir() and files_under(cfg.run_dir()) == []


def test_only_the_main_process_removes_a_run_directory(tiny, monkeypatch):
    """Under N processes rank 0 creates and writes the run directory; another rank that fails must not remove
    it (rank 0 may have been writing it since before that rank looked)."""

    class OtherRank(Accelerator):
        is_main_process = property(lambda self: False)

    def rank_zero_created_it(cfg, accelerator):  # what rank 0 does meanwhile
        cfg.run_dir().mkdir(parents=True)
        (cfg.run_dir() / "config.yaml").write_text("written by rank 0\n")
        return cfg.run_dir(), None

    monkeypatch.setattr(train_module, "Accelerator", OtherRank)
    monkeypatch.setattr(checkpoint, "prepare_run_dir", rank_zero_created_it)
    cfg = tiny(loss={"name": "kto"}, perf={"prefix_sharing": True}, train={"max_steps": 1, "run_name": "ranks"})
    with pytest.raises(ValueError, match="perf.prefix_sharing=true: .* loss .kto."):
        train(cfg)
    assert (cfg.run_dir() / "config.yaml").read_text() == "written by rank 0\n"
