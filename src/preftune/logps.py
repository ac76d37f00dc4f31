"""Sequence log-probabilities of responses from ONE forward over chosen||rejected rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.data import IGNORE, Batch


@dataclass
class SequenceLogps:
    """Per-row results of one forward; rows 0..B-1 are chosen, B..2B-1 rejected."""

    logps: Tensor  # (2B,) sum of response-token log-probs; carries grad when the model does
    lengths: Tensor  # (2B,) response tokens per row (float)
    mean_logits: Tensor  # (2B,) mean logit over response tokens and vocabulary (detached; a health metric)

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        b = self.logps.shape[0] // 2
        return (SequenceLogps(self.logps[:b], self.lengths[:b], self.mean_logits[:b]),
                SequenceLogps(self.logps[b:], self.lengths[b:], self.mean_logits[b:]))


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk_rows: int = 0) -> SequenceLogps:
    """Sum of log p(response token | prefix) for every row of a concatenated batch.

    One forward over all 2B rows (chosen and rejected together) instead of two: half the weight reads and,
    under FSDP, half the all-gathers. The log-softmax runs in float32 whatever the model's dtype: in fp16 or
    bf16 it loses the small differences DPO's rewards are made of (NaN rewards are the usual symptom).
    `chunk_rows` > 0 converts that many rows of logits to float32 at a time, so the (2B, T, V) float32 copy
    never exists at once.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    # token t is predicted by position t-1
    logits = logits[:, :-1]  # (2B, T-1, V)
    targets = batch.labels[:, 1:]  # (2B, T-1)
    mask = targets != IGNORE  # (2B, T-1)
    safe_targets = targets.masked_fill(~mask, 0)
    step = chunk_rows if chunk_rows > 0 else logits.shape[0]
    token_logps, logit_sums = [], []
    for r in range(0, logits.shape[0], step):
        chunk = logits[r:r + step].float()  # (c, T-1, V)
        lp = chunk.log_softmax(-1).gather(-1, safe_targets[r:r + step].unsqueeze(-1)).squeeze(-1)  # (c, T-1)
        token_logps.append(lp)
        with torch.no_grad():
            logit_sums.append((chunk.mean(-1) * mask[r:r + step]).sum(-1))  # (c,)
    token_logps_all = torch.cat(token_logps) * mask  # (2B, T-1)
    lengths = mask.sum(-1).float()  # (2B,)
    return SequenceLogps(
        logps=token_logps_all.sum(-1),
        lengths=lengths,
        mean_logits=torch.cat(logit_sums) / lengths.clamp(min=1),
    )

