"""Sequence log-probabilities of responses from ONE forward over chosen||rejected rows."""

from __future__ import annotations

import dataclasses
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
    # only when asked for (LD-DPO, WPO): per-token views, position t scores token t+1 of the row
    token_logps: Tensor | None = None  # (2B, T-1) log p(token), 0 off the response
    token_mask: Tensor | None = None  # (2B, T-1) True on response tokens
    token_log_sq_mass: Tensor | None = None  # (2B, T-1) log sum_v p(v)^2 (WPO's weight alignment), detached

    def rows(self, index: slice | Tensor) -> SequenceLogps:
        """The same results for a subset of rows (a slice or a boolean mask)."""
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))  # astuple would deep-copy
        return SequenceLogps(*(None if t is None else t[index] for t in fields))

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        b = self.logps.shape[0] // 2
        return self.rows(slice(None, b)), self.rows(slice(b, None))


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk_rows: int = 0, *, with_tokens: bool = False,
                   with_sq_mass: bool = False) -> SequenceLogps:
    """Sum of log p(response token | prefix) for every row of a concatenated batch.

    One forward over all 2B rows (chosen and rejected together) instead of two: half the weight reads and,
    under FSDP, half the all-gathers. The log-softmax runs in float32 whatever the model's dtype: in fp16 or
    bf16 it loses the small differences DPO's rewards are made of (NaN rewards are the usual symptom).
    `chunk_rows` > 0 converts that many rows of logits to float32 at a time, so the (2B, T, V) float32 copy
    never exists at once. `with_tokens` keeps the per-token log-probs and mask; `with_sq_mass` also the
    log of each position's squared-probability mass; both only for losses that declare they need them.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    # token t is predicted by position t-1
    logits = logits[:, :-1]  # (2B, T-1, V)
    targets = batch.labels[:, 1:]  # (2B, T-1)
    mask = targets != IGNORE  # (2B, T-1)
    safe_targets = targets.masked_fill(~mask, 0)
    step = chunk_rows if chunk_rows > 0 else logits.shape[0]
    token_logps, logit_sums, sq_mass = [], [], []
    for r in range(0, logits.shape[0], step):
        chunk = logits[r:r + step].float()  # (c, T-1, V)
        vocab_logps = chunk.log_softmax(-1)  # (c, T-1, V)
        lp = vocab_logps.gather(-1, safe_targets[r:r + step].unsqueeze(-1)).squeeze(-1)  # (c, T-1)
        token_logps.append(lp)
        with torch.no_grad():
            logit_sums.append((chunk.mean(-1) * mask[r:r + step]).sum(-1))  # (c,)
            if with_sq_mass:
                sq_mass.append(torch.logsumexp(2 * vocab_logps, dim=-1))  # (c, T-1) log sum_v p(v)^2
    token_logps_all = torch.cat(token_logps) * mask  # (2B, T-1)
    lengths = mask.sum(-1).float()  # (2B,)
    return SequenceLogps(
        logps=token_logps_all.sum(-1),
        lengths=lengths,
        mean_logits=torch.cat(logit_sums) / lengths.clamp(min=1),
        token_logps=token_logps_all if with_tokens or with_sq_mass else None,
        token_mask=mask if with_tokens or with_sq_mass else None,
        token_log_sq_mass=torch.cat(sq_mass) * mask if with_sq_mass else None,
    )

