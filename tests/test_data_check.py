"""`preftune data check`: counts, length percentiles, truncation, duplicates, and invalid records by place."""

from __future__ import annotations

from preftune.cli import main

from .conftest import EXAMPLE_PAIRS, FIXTURES


def run(capsys, *argv: str) -> tuple[int, str]:
    status = main(["data", "check", *argv])
    return status, capsys.readouterr().out


def test_clean_file_passes_with_counts_and_percentiles(capsys):
    status, out = run(capsys, str(EXAMPLE_PAIRS), "--model", "bytes", "data.max_length=64",
                      "data.max_prompt_length=20")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"source: {EXAMPLE_PAIRS} (format jsonl, shape pairs)"
    assert lines[1] == "records: 16 read, 16 usable, 0 invalid, 0 skipped (no preference, or left out by a setting)"
    assert lines[2].split() == ["tokens", "p50", "p90", "p95", "p99", "max"]
    # byte tokenizer: prompt tokens = 1 BOS + its bytes; the longest prompt has 30 bytes
    prompt_row = next(line for line in lines if line.strip().startswith("prompt"))
    assert prompt_row.split()[-1] == str(1 + max(len(p) for p in _prompts()))
    assert "over data.max_length=64: 4 would be truncated (4 with the prompt cut to " \
           "data.max_prompt_length=20, keep_end)" in out
    assert "duplicates: 0   chosen == rejected: 0   empty responses: 0" in out


def _prompts() -> list[str]:
    import json

    return [json.loads(line)["prompt"].encode() for line in EXAMPLE_PAIRS.read_text().splitlines()]


def test_invalid_records_fail_the_check_and_are_listed(capsys):
    bad = FIXTURES / "bad.jsonl"
    status, out = run(capsys, str(bad), "--model", "bytes", "--show", "3")
    assert status == 1
    assert "records: 9 read, 2 usable, 6 invalid, 1 skipped (no preference" in out
    assert "duplicates: 1   chosen == rejected: 1   empty responses: 1" in out
    assert out.splitlines()[-4:] == [
        "invalid records (first 3 of 6):",
        f"  {bad}:2: record: not valid JSON (Expecting ',' delimiter at column 42)",
        f"  {bad}:3: rejected: missing (keys present: ['chosen', 'prompt'])",
        f"  {bad}:5: chosen: is empty",
    ]


def test_settings_that_leave_records_out_do_not_fail_the_check(capsys):
    status, out = run(capsys, str(FIXTURES / "shp.jsonl"), "--model", "bytes", "data.fields={prompt: history, "
                      "response_a: human_ref_A, response_b: human_ref_B, score_a: score_A, score_b: score_B}")
    assert status == 0
    assert "records: 4 read, 2 usable, 0 invalid, 2 skipped" in out
    assert "score ratio below minimum: 1, score tie: 1" in out


def test_chat_data_with_a_real_tokenizer_directory(capsys, smollm2_dir):
    status, out = run(capsys, str(FIXTURES / "conversational.jsonl"), "--model", str(smollm2_dir))
    assert status == 0 and "records: 3 read, 3 usable" in out
    status, out = run(capsys, str(FIXTURES / "unpaired_mixed.jsonl"), "--model", str(smollm2_dir))
    assert status == 0 and "labels: 2 desirable, 1 undesirable" in out and "completion" in out


def test_bad_settings_are_one_line_errors(capsys):
    assert main(["data", "check", str(EXAMPLE_PAIRS), "--model", "bytes", "data.fields={question: prompt}"]) == 2
    assert "data.fields.question: not a field preftune reads" in capsys.readouterr().err
    assert main(["data", "check", str(FIXTURES / "nope.jsonl"), "--model", "bytes"]) == 2
    assert "nope.jsonl: no such data file" in capsys.readouterr().err


def test_settings_and_tokenizer_come_from_a_run_config(capsys):
    from .conftest import REPO

    status, out = run(capsys, str(EXAMPLE_PAIRS), "--config", str(REPO / "configs" / "tiny.yaml"))
    assert status == 0 and "over data.max_length=128: 0 would be truncated" in out  # tiny.yaml's setting
