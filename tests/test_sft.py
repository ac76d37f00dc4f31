"""SFT: same tokenisation as the preference pipeline, one row per example, and training lowers the NLL of the
training completions; its export is the start of a DPO run."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import cli, config, sft
from preftune.data import IGNORE, DataError, TokenizedExample, collate, load_pairs
from preftune.logps import sequence_logps
from preftune.modeling import load_model, load_tokenizer
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, read_metrics


def completion_file(tmp_path):
    """The example pairs as {prompt, completion} records (completion = chosen)."""
    path = tmp_path / "sft.jsonl"
    records = [json.loads(line) for line in EXAMPLE_PAIRS.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                            for r in records))
    return path


def mean_token_nll(model, examples, pad_id) -> float:
    batch = sft.collate(examples, pad_id)
    with torch.no_grad():
        scored = sequence_logps(model.eval(), batch)
    return (-scored.logps.sum() / scored.lengths.sum()).item()


def test_sft_reads_preference_and_completion_records_alike(tiny, tmp_path):
    cfg = tiny()
    tokenizer = load_tokenizer(cfg.model)
    from_pairs, report = sft.load_examples(EXAMPLE_PAIRS, tokenizer, cfg.data)
    from_completions, _ = sft.load_examples(completion_file(tmp_path), tokenizer, cfg.data)
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tokenizer, cfg.data)
    assert report.used == 16 and len(from_completions) == 16
    for a, b, pair in zip(from_pairs, from_completions, pairs, strict=True):
        assert (a.prompt_ids, a.response_ids) == (b.prompt_ids, b.response_ids) == (pair.prompt_ids, pair.chosen_ids)
        assert type(a) is TokenizedExample and a.length == len(pair.prompt_ids) + len(pair.chosen_ids)

    # one row per example, identical to the chosen rows of the preference batch
    batch = sft.collate(from_pairs[:4], tokenizer.pad_token_id)
    paired = collate(pairs[:4], tokenizer.pad_token_id)
    width = batch.input_ids.shape[1]
    assert batch.input_ids.shape[0] == 4
    assert torch.equal(batch.input_ids, paired.input_ids[:4, :width])
    assert torch.equal(batch.labels, paired.labels[:4, :width])
    assert (batch.labels[:, :len(from_pairs[0].prompt_ids)] == IGNORE).all()

    # read through the data package's adapters: a located error, as for preference data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "x"}\n')
    with pytest.raises(DataError,
                       match=r"bad.jsonl:1: record: can't tell the data shape from the keys \['answer', 'prompt'\]"):
        sft.load_examples(bad, tokenizer, cfg.data)
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "rejected": "b"}\n'
                   '{"prompt": "r", "chosen": "only the chosen side is read"}\n')
    with pytest.raises(DataError, match=r"1 invalid record\(s\) of 3: \S*bad.jsonl:2: chosen: missing"):
        sft.load_examples(bad, tokenizer, cfg.data)
    examples, report = sft.load_examples(bad, tokenizer, dataclasses.replace(cfg.data, skip_invalid=True))
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "3"] and report.invalid == 1


def test_sft_lowers_the_nll_of_the_training_completions_and_feeds_dpo(tiny, tmp_path):
    data_file = completion_file(tmp_path)
    path = tmp_path / "sft.yaml"
    config.save(tiny(data={"train": str(data_file)}, train={"run_name": "sft"}), path)
    assert cli.main(["sft", str(path), "train.max_steps=15", "optim.lr=3e-3"]) == 0
    cfg = config.load(tmp_path / "runs" / "sft" / "config.yaml")
    assert cfg.train.stage == "sft"
    rows = read_metrics(cfg.run_dir())
    assert set(rows[0]) >= {"loss", "logps/chosen", "grad_norm", "lr"} and "rewards/chosen" not in rows[0]

    tokenizer = load_tokenizer(cfg.model)
    examples, _ = sft.load_examples(data_file, tokenizer, cfg.data)
    start = load_model(cfg.model, tokenizer, seed=cfg.train.seed)
    tuned = AutoModelForCausalLM.from_pretrained(cfg.run_dir() / "final")
    before = mean_token_nll(start, examples, tokenizer.pad_token_id)
    after = mean_token_nll(tuned, examples, tokenizer.pad_token_id)
    assert after < 0.75 * before, (before, after)
    assert rows[0]["loss"] == pytest.approx(before, rel=0.05)  # the logged loss is that NLL (per example)

    # the paper's second stage: DPO from the SFT model, whose copy is the reference (step 1: -log sigma(0))
    dpo = tiny(model={"path": str(cfg.run_dir() / "final"), "arch": {}, "tokenizer": ""},
               train={"run_name": "dpo", "max_steps": 2})
    first = read_metrics(train(dpo))[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
