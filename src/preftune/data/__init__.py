"""Records -> validated pairs -> token ids with prompt labels masked -> batches.

  sources.py   JSONL / JSON / Parquet / CSV / HF datasets -> raw rows, each with its 'file:line'
  records.py   raw rows in any supported shape -> PairRecord / UnpairedRecord, or a located RecordProblem
  tokenize.py  records -> ids (chat templates rendered; prompt ids a prefix; one BOS, one EOS; truncation)
  load.py      a source -> compact tokenised pairs + a LoadReport accounting for every record; the cache
  check.py     `preftune data check`: what a source holds and what is wrong with it
  batches.py   the deterministic batch stream, the (2B, T) pair collate and KTO's matched and mismatched rows
  packing.py   padding-free layouts: prefix sharing and packing (perf.*)
"""

from __future__ import annotations

from pathlib import Path

from preftune.data.batches import (
    IGNORE,
    Batch,
    UnpairedBatch,
    batch_stream,
    collate,
    collate_mismatched,
    collate_unpaired,
    mismatched_rows,
    steps_for,
)
from preftune.data.load import LoadReport, PairStore, cache_dir_for, load_pairs, load_unpaired
from preftune.data.packing import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    PackedBatch,
    lay_out,
    lay_out_sequences,
    pack,
    pack_sequences,
    padding_share,
)
from preftune.data.records import DataError, PairRecord, RecordProblem, UnpairedRecord, to_record
from preftune.data.sources import read_rows
from preftune.data.tokenize import (
    TokenizedExample,
    TokenizedPair,
    TokenizedUnpaired,
    encode_prompt,
    encode_response,
    render_chat,
    tokenize_pair,
)


def _read_strict(path: str | Path, shape: str) -> list:
    """Every record of a JSONL file in `shape`; the first bad record is an error naming file:line: field."""
    records = []
    for where, row in read_rows(str(path), "jsonl"):
        if isinstance(row, RecordProblem):
            raise row
        records.append(to_record(row, shape, where, min_score_ratio=1.0))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_jsonl(path: str | Path) -> list[PairRecord]:
    """Strictly read {"prompt", "chosen", "rejected"} JSONL (load_pairs instead skips and reports bad records)."""
    return _read_strict(path, "pairs")


def read_unpaired_jsonl(path: str | Path) -> list[UnpairedRecord]:
    """Strictly read {"prompt", "completion", "label"} JSONL for KTO (load_unpaired instead skips and reports
    bad records when data.skip_invalid)."""
    return _read_strict(path, "unpaired")


__all__ = [
    "IGNORE", "Batch", "DataError", "LoadReport", "PairRecord", "PairStore", "RecordProblem", "TokenizedExample",
    "TokenizedPair",
    "TokenizedUnpaired", "UnpairedBatch", "UnpairedRecord", "batch_stream", "cache_dir_for", "collate",
    "collate_mismatched", "collate_unpaired", "encode_prompt", "encode_response", "load_pairs", "load_unpaired",
    "read_jsonl", "read_unpaired_jsonl", "render_chat", "steps_for", "tokenize_pair",
    "CHOSEN", "PAD", "PROMPT", "REJECTED", "PackedBatch", "lay_out", "lay_out_sequences", "mismatched_rows", "pack",
    "pack_sequences", "padding_share",
]
