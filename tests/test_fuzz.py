"""Property-based fuzzing of the two doors input comes through: the data loader and the config parser.

Any input yields a valid result or a preftune error (DataError / ConfigError) that names the file, the line
and the field (or the key): never a traceback from inside json, yaml or a tokenizer (any other exception fails
the test), and never a record that silently disappears (every line is used or reported by its number).
The data loader runs 500 generated files in the fast suite and 10,000 in the slow one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune import config
from preftune.data import DataError, load_pairs, read_jsonl
from preftune.data.load import refuse_invalid
from preftune.data.records import CANONICAL_FIELDS
from preftune.modeling import byte_tokenizer

from .conftest import REPO

TOKENIZER = byte_tokenizer()
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,  # same examples every run
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_FAST = settings(FUZZ, max_examples=500)
FUZZ_SLOW = settings(FUZZ, max_examples=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# --- data ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
field_names = st.sampled_from(["prompt", "chosen", "rejected"])
response = st.text(min_size=1, max_size=30).filter(str.strip)
good_record = st.fixed_dictionaries({"prompt": st.text(max_size=30), "chosen": response, "rejected": response}
                                    ).filter(lambda r: r["chosen"] != r["rejected"])  # equal = no preference
# near-misses: a good record with one field removed, retyped, emptied or holding a lone surrogate
damaged_record = st.tuples(good_record, field_names, st.sampled_from(["drop", "retype", "blank", "surrogate"]),
                           json_values)


def damage(args) -> str:
    record, name, how, value = args
    if how == "drop":
        del record[name]
    elif how == "retype":
        record[name] = value if not isinstance(value, str) else [value]
    elif how == "blank" and name != "prompt":  # an empty prompt is allowed, an empty response is not
        record[name] = " \t"
    elif how == "blank":
        record[name] = 0
    else:
        return json.dumps(record).replace(json.dumps(name) + ": \"", json.dumps(name) + ": \"\\ud800", 1)
    return json.dumps(record)


line_bytes = st.one_of(
    good_record.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
    good_record.map(lambda r: json.dumps(r).encode()),
    damaged_record.map(lambda a: damage(a).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.just(b"[" * 5000 + b"]" * 5000),  # deeper than Python's recursion limit
    st.just(b""),
).map(lambda b: b.replace(b"\n", b" "))


def write(tmp_path: Path, lines: list[bytes], newline: bytes = b"\n") -> Path:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(newline.join(lines) + newline)
    return path


def record_lines(lines: list[bytes]) -> set[int]:
    """Line numbers that hold something (blank lines separate records and are not records)."""
    return {n for n, line in enumerate(lines, start=1) if line.decode("utf-8", "replace").strip()}


# what a rejection may name as its field: a whole-record problem, or a field some shape reads (maybe nested,
# e.g. info.post, summaries[0].text)
FIELDS = {"record", *CANONICAL_FIELDS}
LOCATED = re.compile(r"(?P<path>.+?):(?P<line>\d+): (?P<field>[A-Za-z_][\w.\[\]]*): \S")


def assert_located(message: str, path: Path, lines: set[int]) -> int:
    """The message is `file:line: field: problem`, the line one that holds a record, the field a known one;
    returns the line."""
    match = LOCATED.match(message)
    assert match and match["path"] == str(path), f"not 'file:line: field: problem': {message}"
    assert int(match["line"]) in lines, f"names line {match['line']}, which holds no record: {message}"
    assert re.split(r"[.\[]", match["field"])[0] in FIELDS, f"names no field: {message}"
    return int(match["line"])


def check_data_file(path: Path, lines: list[bytes]) -> None:
    """Strict reading: every record, or one located rejection. Loading: every record used or reported
    skipped with a located reason, none dropped silently; and the refusal of invalid records lists them so."""
    with_records = record_lines(lines)
    try:
        records = read_jsonl(path)
    except DataError as err:
        if with_records:
            assert_located(str(err), path, with_records)
        else:  # nothing to read: the one error that names no line, since no line is to blame
            assert str(err) == f"{path}: no records"
    else:
        assert sorted(int(r.source.rsplit(":", 1)[1]) for r in records) == sorted(with_records)

    cfg = config.DataConfig(max_length=64, max_prompt_length=32, skip_invalid=True)
    try:
        pairs, report = load_pairs(path, TOKENIZER, cfg)
    except DataError as err:
        if err.report is None:  # a rejection of the source at a record: the record deciding its shape
            assert_located(str(err), path, with_records)
            return
        report, pairs = err.report, []
        assert str(err).startswith(f"{path}: no usable pairs") and report.used == 0
    # every record is accounted for, by its line: used, or skipped with a located reason
    assert report.records == len(with_records)
    skipped = [assert_located(problem, path, with_records) for problem in report.skipped]
    used = [int(pair.source.rsplit(":", 1)[1]) for pair in pairs]
    assert report.used == len(pairs) and report.held_out == 0
    assert sorted(used + skipped) == sorted(with_records)  # 0 silent drops, nothing counted twice
    # without skip_invalid the same invalid records stop the load, each listed with its place
    if report.invalid:
        with pytest.raises(DataError) as refused:
            refuse_invalid(report, dataclasses.replace(cfg, skip_invalid=False))
        listed = str(refused.value).split(" invalid record(s) of ", 1)[1].split(": ", 1)[1]
        for problem in report.first_invalid[:5]:
            assert problem in listed
            assert_located(problem, path, with_records)


files = st.tuples(st.lists(line_bytes, max_size=6), st.booleans())


@FUZZ_FAST
@given(case=files)
def test_data_loader_result_or_located_error(tmp_path, case):
    """500 files of up to 6 lines (FUZZ_FAST)."""
    lines, crlf = case
    check_data_file(write(tmp_path, lines, b"\r\n" if crlf else b"\n"), lines)


@pytest.mark.slow
@FUZZ_SLOW
@given(case=files)
def test_data_loader_result_or_located_error_10000_files(tmp_path, case):
    """The same on 10,000 files, past the fast run's 500 (different cases: hypothesis keeps drawing)."""
    lines, crlf = case
    check_data_file(write(tmp_path, lines, b"\r\n" if crlf else b"\n"), lines)


@FUZZ
@given(good=st.lists(good_record, min_size=1, max_size=5), bad=damaged_record, at=st.integers(0, 5))
def test_one_damaged_record_is_named_by_line_and_field(tmp_path, good, bad, at):
    lines = [json.dumps(r) for r in good]
    at = min(at, len(lines))
    lines.insert(at, damage(bad))
    path = write(tmp_path, [line.encode() for line in lines])
    _, name, _, _ = bad
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{at + 1}: .*\b{name}\b"):
        read_jsonl(path)


def test_invalid_utf8_is_named_by_line(tmp_path):
    path = write(tmp_path, [b'{"prompt": "a", "chosen": "b", "rejected": "c"}',
                            b'{"prompt": "a", "chosen": "\xff", "rejected": "c"}'])
    with pytest.raises(DataError, match=r"fuzz.jsonl:2: (record: )?not valid UTF-8 \(byte 0xff at column 28\)"):
        read_jsonl(path)


# --- config ---

KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(config.Config)
        for f in dataclasses.fields(s.default_factory())]  # type: ignore[misc]
key_names = st.sampled_from(KEYS + ["model.arch.hidden_size", "loss.params.label_smoothing", "train", "model.arch",
                                    "train.seed.x", "nope.x", ""]) | st.text(max_size=12)
value_text = st.sampled_from(["1", "-1", "0", "1e400", "nan", "-inf", "true", "{", "[1, 2]", "{a: 1}",
                              "!!python/object/apply:os.system [echo]", "dpo", "ipo", "~", ""]) | st.text(max_size=12)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", key_names, value_text) | st.text(max_size=12), max_size=4)
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key_names | st.text(max_size=6), inner, max_size=3),
    max_leaves=10)
config_text = st.one_of(
    st.dictionaries(st.sampled_from(["model", "data", "loss", "optim", "train"]) | st.text(max_size=5),
                    st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]) | st.text(max_size=5),
                                    yaml_values, max_size=4) | yaml_values,
                    max_size=4).map(lambda d: json.dumps(d, allow_nan=True)),  # JSON is YAML
    st.text(max_size=80),
    st.sampled_from(["a: [", "model: !!python/name:os.system", "? [a]\n: 1", "{{{{", "\t- x", "*alias"]),
)


def check_config(path: Path, items: list[str]) -> None:
    try:
        cfg = config.load(path, items)
    except config.ConfigError as err:
        assert str(err).strip()
    else:  # a config that loads is valid and round-trips through YAML
        config.validate(cfg)
        config.save(cfg, path.with_name("saved.yaml"))
        assert config.load(path.with_name("saved.yaml")) == cfg


@FUZZ
@given(text=config_text, items=overrides)
def test_config_file_result_or_config_error(tmp_path, text, items):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_config(path, items)


@FUZZ
@given(items=overrides)
def test_overrides_on_a_valid_config_result_or_config_error(tmp_path, items):
    path = tmp_path / "tiny.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text())
    check_config(path, items)


@FUZZ
@given(data=st.binary(max_size=60))
def test_config_bytes_result_or_config_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    check_config(path, [])
