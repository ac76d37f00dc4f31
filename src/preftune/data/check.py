"""`preftune data check`: what a preference (or SFT) source holds and what is wrong with it, before any training."""

from __future__ import annotations

from array import array

import numpy as np

from preftune.config import DataConfig
from preftune.data.load import LoadReport, iter_encoded, iter_records
from preftune.data.records import PairRecord, UnpairedRecord
from preftune.data.sources import detect_format
from preftune.data.tokenize import truncate

PERCENTILES = (50, 90, 95, 99, 100)


def check(source: str, tokenizer, cfg: DataConfig, show: int = 10) -> tuple[str, int]:
    """A readable report on `source` under the settings in `cfg`, and the exit status: 1 when any record is
    invalid (malformed, empty, unrenderable by the chat template), else 0."""
    report = LoadReport(source)
    lengths = {name: array("i") for name in ("prompt", "chosen", "rejected", "completion", "pair")}
    truncated = prompt_cut = desirable = undesirable = 0
    # SFT data (shapes completion, tldr) is checked as the examples `preftune sft` reads
    records = iter_records(source, cfg, report, part="all", split=cfg.split, examples=None)
    for rec, prompt_ids, responses in iter_encoded(records, tokenizer, cfg, report):
        names = ("chosen", "rejected") if isinstance(rec, PairRecord) else ("completion",)
        lengths["prompt"].append(len(prompt_ids))
        for name, ids in zip(names, responses, strict=True):
            lengths[name].append(len(ids))
        lengths["pair"].append(len(prompt_ids) + max(map(len, responses)))
        fitted_prompt, _, was_cut = truncate(prompt_ids, responses, cfg)
        truncated += was_cut
        prompt_cut += len(fitted_prompt) < len(prompt_ids)
        if isinstance(rec, UnpairedRecord):
            desirable += rec.label
            undesirable += not rec.label
    usable = len(lengths["pair"])

    fmt = cfg.format if cfg.format != "auto" else detect_format(source)
    lines = [f"source: {source} (format {fmt}, shape {report.shape or cfg.shape})",
             f"records: {report.records} read, {usable} usable, {report.invalid} invalid, "
             f"{len(report.skipped) - report.invalid} skipped (no preference, or left out by a setting)"
             + (" (stopped at data.max_samples)" if report.max_samples_reached else "")]
    if desirable or undesirable:
        lines.append(f"labels: {desirable} desirable, {undesirable} undesirable")
    header = "  ".join(f"{'max' if p == 100 else f'p{p}':>6}" for p in PERCENTILES)
    lines.append(f"tokens      {header}")
    for name, values in lengths.items():
        if len(values):
            row = np.percentile(np.frombuffer(values, dtype=np.int32), PERCENTILES, method="nearest")
            lines.append(f"  {name:<9} " + "  ".join(f"{int(v):>6}" for v in row))
    action = "dropped (data.drop_long)" if cfg.drop_long else "truncated"
    lines.append(f"over data.max_length={cfg.max_length}: {truncated} would be {action}"
                 + (f" ({prompt_cut} with the prompt cut to data.max_prompt_length={cfg.max_prompt_length}, "
                    f"{cfg.prompt_truncation})" if truncated and not cfg.drop_long else ""))
    reasons = report.reasons
    lines.append(f"duplicates: {report.duplicates}   chosen == rejected: {reasons.get('chosen == rejected', 0)}"
                 f"   empty responses: {reasons.get('empty response', 0)}")
    if reasons:
        lines.append("skipped by reason: " + ", ".join(f"{kind}: {n}" for kind, n in sorted(reasons.items())))
    if report.invalid:
        lines.append(f"invalid records (first {min(show, report.invalid)} of {report.invalid}):")
        lines += [f"  {problem}" for problem in report.first_invalid[:show]]
    return "\n".join(lines), 1 if report.invalid else 0
