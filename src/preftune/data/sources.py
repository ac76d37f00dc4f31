"""Where records come from: JSONL, JSON, Parquet, CSV files and HF `datasets` (saved directories or hub names).

Each reader streams (where, row) with `where` = 'file:N' (N: the line for JSONL/CSV, the record number for
JSON, Parquet and datasets), so memory stays bounded by one batch of rows whatever the file size.
A row that can't even be parsed comes back as a RecordProblem instead of a dict.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preftune.data.records import DataError, RecordProblem

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv", ".tsv": "csv"}
Row = tuple[str, dict[str, Any] | RecordProblem]


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "datasets"
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    if not path.exists() and "/" in source and not path.suffix and not source.startswith((".", "/")):
        return "datasets"  # an owner/name on the hub
    raise DataError(f"{source}: can't tell the format from the name; set data.format to one of {list(FORMATS[1:])}")


def read_rows(source: str, fmt: str = "auto", split: str = "train", subset: str = "") -> Iterator[Row]:
    """Stream the rows of a source in the given format ('auto': from the suffix, or a directory = datasets);
    `subset` names the configuration of a hub dataset that has several."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt != "datasets" and not Path(source).is_file():
        raise DataError(f"{source}: no such data file")
    readers = {"jsonl": _jsonl, "json": _json, "parquet": _parquet, "csv": _csv, "datasets": _datasets}
    if fmt not in readers:
        raise DataError(f"data.format: unknown format {fmt!r}; choose from {list(FORMATS)}")
    yield from _datasets(source, split, subset) if fmt == "datasets" else readers[fmt](source)


def _object(where: str, value: Any) -> dict[str, Any] | RecordProblem:
    if isinstance(value, dict):
        return value
    return RecordProblem(where, "record", f"expected an object, got {type(value).__name__}", "not an object")


def _jsonl(path: str) -> Iterator[Row]:
    with open(path, "rb") as f:  # bytes: a bad byte is reported at its line, not replaced silently
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, RecordProblem(where, "record", f"not valid UTF-8 (byte {raw[err.start]:#04x} at "
                                           f"column {err.start + 1})", "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, _object(where, json.loads(line.rstrip("\r\n")))
            except json.JSONDecodeError as err:
                yield where, RecordProblem(where, "record", f"not valid JSON ({err.msg} at column {err.colno})",
                                           "invalid JSON")
            except RecursionError:
                yield where, RecordProblem(where, "record", "JSON nested too deeply", "invalid JSON")


def _json(path: str) -> Iterator[Row]:
    """A JSON array of records, or an object holding one (e.g. {"data": [...]}); a file of JSON lines also works."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        yield from _jsonl(path)  # .json files are often JSON lines in practice
        return
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object holding exactly one array), "
                            f"got an object with keys {sorted(value)}")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    for i, item in enumerate(value, start=1):
        yield f"{path}:{i}", _object(f"{path}:{i}", item)


def _optional(module: str, what: str):
    """Import a package only some formats need, or say which one to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the {module.split('.')[0]!r} package: pip install "
                        f"{module.split('.')[0]}") from None


def _parquet(path: str) -> Iterator[Row]:
    pq = _optional("pyarrow.parquet", "Parquet")

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:{n}", row


def _cell(value: str) -> Any:
    """CSV holds strings only: a cell that is a JSON list of messages becomes that list."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _csv(path: str) -> Iterator[Row]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for cells in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield where, RecordProblem(where, "record", f"has {len(cells)} cells, the header has {len(header)}",
                                           "bad CSV row")
                continue
            yield where, {name: _cell(cell) for name, cell in zip(header, cells, strict=True)}


def open_dataset(source: str, split: str, subset: str = ""):
    """A `datasets.Dataset`: a directory saved with save_to_disk, or a hub name (needs a network), in its
    configuration `subset` when it has several (e.g. openai/summarize_from_feedback: comparisons)."""
    datasets = _optional("datasets", "HF datasets")

    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split, **({"name": subset} if subset else {}))
    except Exception as err:  # datasets raises many types (missing files, no network, bad config)
        raise DataError(f"{source}: can't open as a HF dataset ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r}; the splits are {sorted(ds)} (set data.split)")
        ds = ds[split]
    return ds


def _datasets(source: str, split: str, subset: str = "") -> Iterator[Row]:
    ds = open_dataset(source, split, subset)
    for i, row in enumerate(ds, start=1):
        yield f"{source}[{split}]:{i}", row


def content_hash(source: str, fmt: str = "auto", split: str = "train") -> str | None:
    """sha256 of the bytes a source reads (a file, or every file of a saved dataset directory); None for a hub
    name, whose content can't be hashed without downloading it (the `datasets` library caches those itself)."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256(f"{fmt}|{split}".encode())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
