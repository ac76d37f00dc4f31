"""JSONL files the demo hands to `preftune iterate` and `preftune train` (prompts, SFT examples). The pairing rule
is iterate's own (`preftune.online.make_pairs`, iterate.pairing=all_pairs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """One JSON object per line: the format `preftune train` and `preftune iterate` read (extra keys ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
