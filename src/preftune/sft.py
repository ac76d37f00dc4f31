"""Supervised fine-tuning, the DPO paper's first stage: maximise log pi(y | x) of demonstration responses.

SFT runs through the same `train()` loop as the preference losses (same optimiser, schedule, accumulation,
logging, checkpointing and export; `train.stage=sft`), so the two stages cannot drift apart. This module holds
only what differs: reading examples, collating one row per example, and the per-example loss.

Examples come from any source and shape the data package reads (records.to_example): a preference record
trains on its preferred response, a {"prompt", "completion"} record on its completion, a TL;DR post on its
reference summary. They are tokenised by the preference pipeline (prompt ids a prefix of the row, one EOS, the
same truncation) and held as data.TokenizedExample: a prompt and the one response trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from preftune import data
from preftune.config import DataConfig
from preftune.data import Batch, DataError, LoadReport, PackedBatch, TokenizedExample, TokenizedUnpaired
from preftune.data.load import fit, iter_encoded, iter_records, refuse_invalid
from preftune.logps import batch_logps


def load_examples(source: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedExample], LoadReport]:
    """Tokenised SFT examples of any source and shape the preference pipeline reads, and the source's load
    report. Every record is used (maybe truncated), or skipped and
    reported; invalid records stop the load as in `data.load_pairs`, unless data.skip_invalid."""
    source = str(source)
    report = LoadReport(source)
    examples = []
    records = iter_records(source, cfg, report, part="all", split=cfg.split, examples=True)
    for rec, prompt_ids, (response_ids,) in iter_encoded(records, tokenizer, cfg, report):
        fitted = fit(prompt_ids, [response_ids], cfg, rec.source, report)  # the preference rules, one response
        if fitted is not None:
            examples.append(TokenizedExample(fitted[0], fitted[1][0], rec.source))
    report.used = len(examples)
    refuse_invalid(report, cfg)
    if not examples:
        raise DataError(f"{source}: no usable examples ({report.summary()})")
    return examples, report


def collate(examples: list[TokenizedExample], pad_id: int) -> Batch:
    """(B, T) rows of prompt + response, labels on the response only: the matched rows of the unpaired
    collate (the one row collate of the data package; its desirable flags are not read)."""
    rows = [TokenizedUnpaired(e.prompt_ids, e.response_ids, True, e.source) for e in examples]
    return data.collate_unpaired(rows, pad_id).matched  # (B, T)


def step(policy: torch.nn.Module, batch: Batch | PackedBatch, logps_chunk: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """(B,) per-example loss and the (B,) per-example values the trainer logs, by name (the names of the
    preference metrics they share: loss = mean-token NLL, the response's log-prob and mean logit).

    The loss of an example is its mean-token NLL, so each example weighs the same whatever its length and the
    loop's mean over a step's examples is independent of how the step is split into micro-batches.
    """
    scored = batch_logps(policy, batch, logps_chunk)  # rows are examples: no halves; any perf layout
    losses = -scored.logps / scored.lengths.clamp(min=1)  # (B,)
    return losses, {"loss": losses.detach(), "logps/chosen": scored.logps.detach(), "logits/chosen": scored.mean_logits}
