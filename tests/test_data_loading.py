"""Bad input is reported record by record (never a crash, never a silent loss); tokenised data is cached."""

from __future__ import annotations

import json

import pytest

from preftune import data
from preftune.config import DataConfig
from preftune.data import load as load_module
from preftune.modeling import byte_tokenizer

from .conftest import EXAMPLE_PAIRS, FIXTURES

BAD = FIXTURES / "bad.jsonl"
BAD_PROBLEMS = [
    f"{BAD}:2: record: not valid JSON (Expecting ',' delimiter at column 42)",
    f"{BAD}:3: rejected: missing (keys present: ['chosen', 'prompt'])",
    f"{BAD}:4: chosen: equals 'rejected': no preference",
    f"{BAD}:5: chosen: is empty",
    f"{BAD}:6: prompt: must be a string or a list of messages, got int",
    f"{BAD}:8: record: expected an object, got list",
    f"{BAD}:9: prompt: message 1: 'content' missing",
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_invalid_records_stop_the_load_listing_them(tok):
    with pytest.raises(data.DataError) as err:
        data.load_pairs(BAD, tok, DataConfig())
    assert str(err.value).startswith(f"{BAD}: 6 invalid record(s) of 9: {BAD_PROBLEMS[0]}; {BAD_PROBLEMS[1]}; "
                                     f"{BAD_PROBLEMS[3]}; ")
    assert "data.skip_invalid=true trains on the rest" in str(err.value)


def test_every_bad_record_is_reported_with_its_place_and_reason(tok):
    pairs, report = data.load_pairs(BAD, tok, DataConfig(skip_invalid=True))
    assert [p.source for p in pairs] == [f"{BAD}:1", f"{BAD}:7"]
    assert report.skipped == BAD_PROBLEMS
    assert (report.records, report.used, report.invalid, report.duplicates) == (9, 2, 6, 1)
    assert report.records == report.used + len(report.skipped)  # every record accounted for
    assert report.reasons == {"invalid JSON": 1, "missing field": 1, "chosen == rejected": 1, "empty response": 1,
                              "wrong type": 1, "not an object": 1, "bad message": 1}
    assert "7 skipped" in report.summary() and "(2 more)" in report.summary()


def test_a_source_with_nothing_usable_is_one_located_error(tmp_path, tok):
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(data.DataError, match=r"no usable pairs .*none.jsonl:1: chosen: equals 'rejected'"):
        data.load_pairs(path, tok, DataConfig())
    with pytest.raises(data.DataError, match="no such data file"):
        data.load_pairs(tmp_path / "missing.jsonl", tok, DataConfig())


def test_strict_read_jsonl_stops_at_the_first_bad_record():
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: record: not valid JSON"):
        data.read_jsonl(BAD)
    assert len(data.read_jsonl(EXAMPLE_PAIRS)) == 16


def test_training_run_writes_the_report_into_the_run_directory(tiny):
    from preftune.train import train

    run_dir = train(tiny(data={"train": str(BAD), "skip_invalid": True}, train={"max_steps": 1, "batch_size": 2}))
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["used"] == 2 and report["skipped"] == BAD_PROBLEMS


def test_cache_hit_skips_tokenisation_and_a_change_retokenises(tmp_path, tok, monkeypatch):
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(EXAMPLE_PAIRS.read_bytes())
    cache = tmp_path / "cache"
    cfg = DataConfig()
    first, report = data.load_pairs(source, tok, cfg, cache_dir=cache)
    assert not report.cached and len(list(cache.glob("*.safetensors"))) == 1

    calls = []
    real = load_module.encode_records
    monkeypatch.setattr(load_module, "encode_records", lambda *a: calls.append(1) or real(*a))
    again, report = data.load_pairs(source, tok, cfg, cache_dir=cache)
    assert report.cached and calls == [] and report.used == 16
    assert list(again) == list(first)

    source.write_bytes(source.read_bytes().replace(b"wonderful", b"marvellous"))  # content changed
    changed, report = data.load_pairs(source, tok, cfg, cache_dir=cache)
    assert not report.cached and calls and changed[0] != first[0]
    calls.clear()
    _, report = data.load_pairs(source, tok, DataConfig(max_length=40, max_prompt_length=20), cache_dir=cache)
    assert not report.cached and calls  # settings are part of the key
    calls.clear()
    other = byte_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    _, report = data.load_pairs(source, other, cfg, cache_dir=cache)
    assert not report.cached and calls  # so is the tokenizer
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_training_reuses_the_cache_under_the_output_dir(tiny, monkeypatch):
    from preftune.data.load import cache_dir_for

    monkeypatch.delenv("PREFTUNE_CACHE")  # the default place, as a user without the variable gets it
    cfg = tiny()
    assert cache_dir_for(cfg) == cfg.run_dir().parent / ".cache"
    pairs, report = data.load_pairs(cfg.data.train, byte_tokenizer(), cfg.data, cache_dir=cache_dir_for(cfg))
    _, again = data.load_pairs(cfg.data.train, byte_tokenizer(), cfg.data, cache_dir=cache_dir_for(cfg))
    assert (report.cached, again.cached) == (False, True)


def test_pair_store_reads_like_a_list(tok):
    store, _ = data.load_pairs(EXAMPLE_PAIRS, tok, DataConfig())
    listed = [data.tokenize_pair(r, tok, DataConfig())[0] for r in data.read_jsonl(EXAMPLE_PAIRS)]
    assert list(store) == listed and store[-1] == listed[-1] and store[2:5] == listed[2:5]
    assert store.lengths == [p.length for p in listed]
    assert store.arrays["chosen_ids"].dtype.name == "int32"
    with pytest.raises(IndexError):
        store[16]
