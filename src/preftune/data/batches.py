"""Tokenised pairs (or unpaired completions) -> a deterministic, resumable stream of padded batches."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.data.tokenize import TokenizedPair, TokenizedUnpaired

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def batch_stream(lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 start: int = 0) -> Iterator[list[int]]:
    """Endless stream of batches of pair indices; batch k is a pure function of (lengths, seed, k).

    Each epoch is a fresh permutation; with grouping, windows of 64 batches are sorted by length so batches
    hold similar lengths, and the batch order is then shuffled. Epochs are chained so every batch is full and
    no pair is ever dropped. `start` skips that many batches (resuming).
    """
    epoch, carry, produced = 0, [], 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if group_by_length:
            window = batch_size * 64
            chunks = []
            for w in range(0, len(order), window):
                block = sorted(order[w:w + window], key=lambda i: -lengths[i])
                chunks += [block[b:b + batch_size] for b in range(0, len(block), batch_size)]
            rng.shuffle(chunks)
            order = [i for chunk in chunks for i in chunk]
        carry += order
        while len(carry) >= batch_size:
            batch, carry = carry[:batch_size], carry[batch_size:]
            if produced >= start:
                yield batch
            produced += 1
        epoch += 1


def steps_for(num_pairs: int, pairs_per_step: int, epochs: float, max_steps: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * num_pairs / pairs_per_step))


@dataclass
class Batch:
    """Chosen rows first, then rejected rows: one forward of the policy scores both."""

    input_ids: Tensor  # (2B, T)
    attention_mask: Tensor  # (2B, T)
    labels: Tensor  # (2B, T); IGNORE on prompt and padding
    sources: list[str]  # (B,) 'file:line' of each pair

    @property
    def num_pairs(self) -> int:
        return len(self.sources)

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens (what tokens/s counts, whatever layout computes them)."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.sources)


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, sources: list[str]) -> Batch:
    """Right-padded rows of prompt+response with labels on the response only."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[r, :n] = torch.tensor(prompt + response)
        labels[r, len(prompt):n] = torch.tensor(response)
        attention_mask[r, :n] = 1
    return Batch(input_ids, attention_mask, labels, sources)


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> Batch:
    """Right-padded (2B, T) rows: [prompt+chosen for each pair] + [prompt+rejected for each pair]."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return collate_rows(rows, pad_id, [p.source for p in pairs])


# --- unpaired completions (KTO) ---

@dataclass
class UnpairedBatch:
    matched: Batch
    """(B, T) rows prompt_i + completion_i"""
    desirable: Tensor
    """(B,) bool"""

    def to(self, device: torch.device | str) -> UnpairedBatch:
        return UnpairedBatch(self.matched.to(device), self.desirable.to(device))


def collate_unpaired(examples: Sequence[TokenizedUnpaired], pad_id: int) -> UnpairedBatch:
    """The matched rows prompt_i + completion_i of B unpaired examples, and their labels."""
    sources = [e.source for e in examples]
    matched = collate_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id, sources)
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return UnpairedBatch(matched, desirable)


def collate_mismatched(prompts_of: Sequence[TokenizedUnpaired], completions_of: Sequence[TokenizedUnpaired],
                       pad_id: int, max_length: int) -> Batch:
    """(B, T') rows prompt of prompts_of[i] + completion of completions_of[i]: the unrelated (x, y') pairs
    whose mean log-ratio estimates KL(pi || pi_ref) in KTO (arXiv:2402.01306, Sec. 4). The loop pairs each
    example of an optimiser step with the completion of the step's previous example (cyclically). A row longer
    than max_length loses completion tokens, keeping at least one."""
    return collate_rows(mismatched_rows(prompts_of, completions_of, max_length), pad_id,
                         [e.source for e in prompts_of])


def mismatched_rows(prompts_of: Sequence[TokenizedUnpaired], completions_of: Sequence[TokenizedUnpaired],
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """The (prompt, completion) token lists of collate_mismatched's rows, for any layout."""
    return [(e.prompt_ids, c.completion_ids[:max(1, max_length - len(e.prompt_ids))])
            for e, c in zip(prompts_of, completions_of, strict=True)]
