"""Padding-free layouts of a batch of pairs: prefix sharing and packing (the perf.* switches).

`pack` lays pairs out so the forward spends nothing on padding and, with prefix sharing, encodes each prompt
once; logps.py turns the layout's segments into attention (a block mask, or unit-by-unit attention) and
scores exactly the tokens a plain `collate` batch scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.config import PerfConfig
from preftune.data.batches import Batch, collate, collate_rows
from preftune.data.tokenize import TokenizedPair


def padding_share(batch: Batch) -> float:
    """Fraction of the (2B, T) positions a plain batch spends on padding."""
    return 1.0 - batch.attention_mask.sum().item() / batch.attention_mask.numel()


# token kinds inside a packed row; the prefix-sharing mask keys on them
PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass
class PackedBatch:
    """Pairs laid out in rows without per-sequence padding; the same (2B,) log-probs as `collate`'s Batch.

    A *unit* is one sequence (prompt+chosen or prompt+rejected) or, with prefix sharing, one whole pair
    (prompt+chosen+rejected, the prompt stored once). Units are packed into rows; `segment_ids` and `kinds`
    say which unit and which part each position is, from which the model side builds the attention mask.
    Each response token is predicted by one earlier position of its own unit; the first token of a
    prefix-shared rejected response is predicted by the last prompt position, like the first chosen token.
    """

    input_ids: Tensor  # (R, L)
    position_ids: Tensor  # (R, L) positions restart at 0 in each unit; rejected resumes after the prompt
    segment_ids: Tensor  # (R, L) unit index, -1 on padding
    kinds: Tensor  # (R, L) PAD, PROMPT, CHOSEN or REJECTED
    pred_index: Tensor  # (N,) flat index into the R*L positions whose output predicts the token below
    pred_target: Tensor  # (N,) the predicted response token
    pred_owner: Tensor  # (N,) row of the (2B,) result it belongs to: i chosen, B+i rejected for pair i
    sources: list[str]  # (B,)
    num_tokens: int  # non-pad tokens of the equivalent plain batch (2 prompts + both responses per pair)
    units: list[tuple[int, int, int, int, int]]
    """(row, start column, prompt, first response, second response lengths) of each unit; the second response
    is 0 unless prefix-shared. What an attention kernel needs to attend unit by unit without any mask."""
    num_rows: int = 0
    """rows of the result: 2B for pairs (chosen then rejected), B for single sequences (pack_sequences)"""

    @property
    def num_pairs(self) -> int:
        return len(self.sources)

    @property
    def padding_share(self) -> float:
        return (self.kinds == PAD).float().mean().item()

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)


def lay_out(pairs: list[TokenizedPair], pad_id: int, perf: PerfConfig) -> Batch | PackedBatch:
    """The layout the perf switches pick for a micro-batch of pairs: packed / prefix-shared, or plain rows.
    Training and the reference's precomputed pass both use it, so they always score the same layout."""
    if perf.prefix_sharing or perf.packing:
        return pack(pairs, pad_id, prefix_sharing=perf.prefix_sharing, packing=perf.packing,
                    row_tokens=perf.pack_tokens)
    return collate(pairs, pad_id)


def lay_out_sequences(rows: list[tuple[list[int], list[int]]], sources: list[str], pad_id: int,
                      perf: PerfConfig) -> Batch | PackedBatch:
    """`lay_out` for single prompt + response sequences (KTO's rows, SFT examples): packed when perf.packing,
    else plain right-padded rows; there is no prompt to share."""
    if perf.packing:
        return pack_sequences(rows, sources, pad_id, packing=True, row_tokens=perf.pack_tokens)
    return collate_rows(rows, pad_id, sources)


def pack(pairs: list[TokenizedPair], pad_id: int, *, prefix_sharing: bool, packing: bool,
         row_tokens: int = 0) -> PackedBatch:
    """Lay pairs out for one forward without per-sequence padding (see PackedBatch).

    packing=False puts one unit per row (prefix sharing alone); packing=True fills rows of `row_tokens`
    positions first-fit, longest unit first; 0 = one row holding every unit, no padding at all (the unit
    attention in logps.py keeps attention cost at that of separate rows). Deterministic: the layout is a
    function of the pairs' lengths.
    """
    b = len(pairs)
    # unit = list of (kind, ids, owner row of its response tokens)
    units: list[list[tuple[int, list[int], int]]] = []
    for i, p in enumerate(pairs):
        if prefix_sharing:
            units.append([(PROMPT, p.prompt_ids, -1), (CHOSEN, p.chosen_ids, i), (REJECTED, p.rejected_ids, b + i)])
        else:
            units.append([(PROMPT, p.prompt_ids, -1), (CHOSEN, p.chosen_ids, i)])
            # its own unit, so CHOSEN marks "the response" here; only a shared unit needs REJECTED apart
            units.append([(PROMPT, p.prompt_ids, -1), (CHOSEN, p.rejected_ids, b + i)])
    num_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return _pack_units(units, pad_id, packing, row_tokens, [p.source for p in pairs], num_tokens, 2 * b)


def pack_sequences(rows: list[tuple[list[int], list[int]]], sources: list[str], pad_id: int, *, packing: bool,
                   row_tokens: int = 0) -> PackedBatch:
    """Single prompt + response sequences (KTO's unpaired rows, SFT examples) packed like `pack` packs pairs:
    result row i is sequence i. packing=False keeps one sequence per row, right-padded."""
    units = [[(PROMPT, prompt, -1), (CHOSEN, response, i)] for i, (prompt, response) in enumerate(rows)]
    num_tokens = sum(len(prompt) + len(response) for prompt, response in rows)
    return _pack_units(units, pad_id, packing, row_tokens, sources, num_tokens, len(rows))


def _pack_units(units: list[list[tuple[int, list[int], int]]], pad_id: int, packing: bool, row_tokens: int,
                sources: list[str], num_tokens: int, num_rows: int) -> PackedBatch:
    """Units placed into rows (first-fit, longest first, when packing) and the PackedBatch of that layout."""
    sizes = [sum(len(ids) for _, ids, _ in u) for u in units]
    if packing:
        width = max(row_tokens, max(sizes)) if row_tokens > 0 else sum(sizes)
    else:
        width = max(sizes)
    rows: list[list[int]] = []  # unit indices per row
    free: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: (-sizes[u], u)) if packing else range(len(units)):
        fit = next((r for r in range(len(rows)) if packing and free[r] >= sizes[u]), None)
        if fit is None:
            rows.append([])
            free.append(width)
            fit = len(rows) - 1
        rows[fit].append(u)
        free[fit] -= sizes[u]
    width = max(width - f for f in free)  # drop columns no row uses

    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    kinds = torch.full((len(rows), width), PAD, dtype=torch.long)
    pred_index, pred_target, pred_owner, spans = [], [], [], []
    for r, row in enumerate(rows):
        col = 0
        for u in row:
            prompt_len = len(units[u][0][1])
            lengths = [len(ids) for _, ids, _ in units[u]] + [0]
            spans.append((r, col, lengths[0], lengths[1], lengths[2]))
            for kind, ids, owner in units[u]:
                n = len(ids)
                # responses continue the prompt's positions; a shared pair's rejected restarts after the prompt
                start_pos = 0 if kind == PROMPT else prompt_len
                input_ids[r, col:col + n] = torch.tensor(ids)
                position_ids[r, col:col + n] = torch.arange(start_pos, start_pos + n)
                segment_ids[r, col:col + n] = u
                kinds[r, col:col + n] = kind
                if owner >= 0:
                    prompt_end = col - 1 if kind == CHOSEN else col - 1 - len(units[u][1][1])
                    # token j of the response is predicted by its previous token; token 0 by the prompt's last
                    predictors = [prompt_end] + list(range(col, col + n - 1))
                    pred_index += [r * width + c for c in predictors]
                    pred_target += ids
                    pred_owner += [owner] * n
                col += n
    return PackedBatch(input_ids, position_ids, segment_ids, kinds, torch.tensor(pred_index),
                       torch.tensor(pred_target), torch.tensor(pred_owner), sources, num_tokens, spans, num_rows)
