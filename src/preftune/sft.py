"""Supervised fine-tuning, the DPO paper's first stage: maximise log pi(y | x) of demonstration responses.

SFT runs through the same `train()` loop as the preference losses (same optimiser, schedule, accumulation,
logging, checkpointing and export; `train.stage=sft`), so the two stages cannot drift apart. This module holds
only what differs: reading examples, collating one row per example, and the per-example loss.

Examples come from the same JSONL files: a preference record {"prompt", "chosen", "rejected"} trains on its
chosen response; a {"prompt", "completion"} record on its completion. They are tokenised by the preference
pipeline (prompt ids a prefix of the row, one EOS, the same truncation) and held as TokenizedPair with no
rejected response.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from preftune import data
from preftune.config import DataConfig
from preftune.data import Batch, DataError, LoadReport, PairRecord, TokenizedPair
from preftune.logps import sequence_logps

METRICS = ("loss", "logps/chosen", "logits/chosen")
"""SFT's logged per-example means: loss = mean-token NLL of the response."""


def read_examples(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt, response, 'file:line') of each record; the response is `completion`, else `chosen`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            response_field = "completion" if "completion" in obj else "chosen"
            for name in ("prompt", response_field):
                if not isinstance(obj.get(name), str):
                    raise DataError(f"{where}: field '{name}' must be a string (an SFT record is "
                                    f"{{prompt, completion}} or a preference record; keys present: {sorted(obj)})")
            if not obj[response_field].strip():
                raise DataError(f"{where}: field '{response_field}' is empty")
            examples.append((obj["prompt"], obj[response_field], where))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def load_examples(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedPair], LoadReport]:
    """Tokenised SFT examples (TokenizedPair with empty `rejected_ids`) and the file's load report."""
    examples = read_examples(path)
    report = LoadReport(str(path), records=len(examples))
    out = []
    for prompt, response, where in examples:
        # the preference tokeniser with the response on both sides: identical ids and truncation rules
        pair, truncated = data.tokenize_pair(PairRecord(prompt, response, response, where), tokenizer, cfg)
        out.append(dataclasses.replace(pair, rejected_ids=[]))
        report.truncated += truncated
    report.used = len(out)
    return out, report


def collate(examples: list[TokenizedPair], pad_id: int) -> Batch:
    """(B, T) rows of prompt + response: the chosen half of the preference collate, nothing else computed."""
    paired = data.collate(examples, pad_id)  # (2B, T); rejected rows are prompt-only and never run
    b = len(examples)
    return Batch(paired.input_ids[:b], paired.attention_mask[:b], paired.labels[:b], paired.sources)


def step(policy: torch.nn.Module, batch: Batch) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(B,) per-example loss and the (B,) per-example values of METRICS, in order.

    The loss of an example is its mean-token NLL, so each example weighs the same whatever its length and the
    loop's mean over a step's examples is independent of how the step is split into micro-batches.
    """
    scored = sequence_logps(policy, batch)  # rows are examples: no halves
    losses = -scored.logps / scored.lengths.clamp(min=1)  # (B,)
    return losses, (losses.detach(), scored.logps.detach(), scored.mean_logits)
