"""Prompts alone, for sampling (`preftune iterate`): any source and shape training reads, each record's prompt.

A record with a `prompt` field gives it directly (text, or {role, content} messages); a record of another
shape (HH text, TL;DR posts or comparisons, ...) gives the prompt its shape implies, exactly as training would
split it. Problems are located as file:line: field: problem, like training data's.
"""

from __future__ import annotations

from pathlib import Path

from preftune.config import DataConfig
from preftune.data.records import (
    SFT_SHAPES,
    DataError,
    RecordProblem,
    Text,
    detect_shape,
    map_fields,
    prompt_text,
    to_example,
    to_record,
)
from preftune.data.sources import read_rows


def load_prompts(source: str | Path, cfg: DataConfig, *, split: str = "") -> list[Text]:
    """Every record's prompt, in file order (a prompt written twice is sampled twice, as the file says).
    Malformed records stop the load, the first few listed as file:line: field: problem, unless
    data.skip_invalid (then they are left out)."""
    source = str(source)
    prompts: list[Text] = []
    problems: list[RecordProblem] = []
    records = 0
    for where, row in read_rows(source, cfg.format, split or cfg.split, cfg.subset):
        records += 1
        try:
            if isinstance(row, RecordProblem):
                raise row
            row = map_fields(row, cfg.fields)
            prompt = _prompt(row, where, cfg)
        except RecordProblem as problem:
            if problem.invalid:
                problems.append(problem)
            continue
        prompts.append(prompt)
    if problems and not cfg.skip_invalid:
        listed = "; ".join(str(p) for p in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise DataError(f"{source}: {len(problems)} invalid record(s) of {records}: {listed} (data.skip_invalid="
                        "true samples the rest)")
    if not prompts:
        raise DataError(f"{source}: no usable prompt in {records} record(s)")
    return prompts


def _prompt(row: dict, where: str, cfg: DataConfig) -> Text:
    if cfg.shape == "auto" and "prompt" in row:
        return prompt_text(row, where)
    shape = detect_shape(row, where) if cfg.shape == "auto" else cfg.shape
    if shape in SFT_SHAPES:
        return to_example(row, shape, where, cfg.min_score_ratio).prompt
    return to_record(row, shape, where, 1.0).prompt
