"""Records -> validated pairs -> token ids with prompt labels masked -> batches.

Tokenisation rule: the prompt and each response are encoded separately and concatenated, so the prompt's
ids are a prefix of prompt+response by construction (encoding the joined string lets BPE merge across the
boundary, e.g. a trailing space fusing with the response's first word, and mislabels tokens).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from preftune.config import DataConfig

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


class DataError(ValueError):
    """A data file or record is unusable; the message names file, line and field."""


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: str
    rejected: str
    source: str
    """'file:line' where the record came from, for error messages and skipped-record reports"""


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str

    @property
    def length(self) -> int:
        """Tokens this pair occupies in a concatenated batch row (the longer response decides)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class LoadReport:
    """What happened to every record of a file: used as is, truncated, or skipped with a reason."""

    path: str
    records: int = 0
    used: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.records} records, {self.used} used ({self.truncated} truncated)"
        if self.skipped:
            s += f", {len(self.skipped)} skipped: " + "; ".join(self.skipped[:5])
            if len(self.skipped) > 5:
                s += f"; ... ({len(self.skipped) - 5} more)"
        return s


def read_jsonl(path: str | Path) -> list[PairRecord]:
    """Read {"prompt", "chosen", "rejected"} records; any malformed line is an error naming file:line:field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
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
            values = {}
            for name in ("prompt", "chosen", "rejected"):
                if name not in obj:
                    raise DataError(f"{where}: field '{name}' is missing (keys present: {sorted(obj)})")
                if not isinstance(obj[name], str):
                    raise DataError(f"{where}: field '{name}' must be a string, got {type(obj[name]).__name__}")
                values[name] = obj[name]
            for name in ("chosen", "rejected"):
                if not values[name].strip():
                    raise DataError(f"{where}: field '{name}' is empty")
            records.append(PairRecord(source=where, **values))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with at most one BOS (a template that writes BOS plus a tokenizer that adds one = two)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    # a few tokenizers append EOS to every encoding; a prompt must not end the sequence
    if eos is not None and ids and ids[-1] == eos and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]
    if not ids and bos is not None:
        ids = [bos]  # an empty prompt still needs one token to condition the first response token on
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids ending in exactly one EOS (appended unless the text, e.g. a chat turn, already has it)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one so responses can end")
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids


def tokenize_pair(rec: PairRecord, tokenizer, cfg: DataConfig) -> tuple[TokenizedPair, bool]:
    """Token ids of one pair and whether it had to be truncated.

    Truncation (as the DPO reference code): if prompt + longer response exceeds max_length, the prompt is
    cut to max_prompt_length (keeping its end by default), then responses to what remains.
    """
    prompt_ids = encode_prompt(tokenizer, rec.prompt)
    if not prompt_ids:
        raise DataError(f"{rec.source}: field 'prompt' encodes to no tokens and the tokenizer has no BOS")
    chosen_ids = encode_response(tokenizer, rec.chosen)
    rejected_ids = encode_response(tokenizer, rec.rejected)
    longest = max(len(chosen_ids), len(rejected_ids))
    truncated = len(prompt_ids) + longest > cfg.max_length
    if truncated:
        if len(prompt_ids) > cfg.max_prompt_length:
            keep = cfg.max_prompt_length
            prompt_ids = prompt_ids[-keep:] if cfg.prompt_truncation == "keep_end" else prompt_ids[:keep]
        room = cfg.max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, rec.source), truncated


def load_pairs(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedPair], LoadReport]:
    """Read and tokenise a preference file. Identical chosen/rejected pairs carry no preference and are
    skipped, each one reported; every other record is used."""
    records = read_jsonl(path)
    report = LoadReport(str(path), records=len(records))
    pairs = []
    for rec in records:
        if rec.chosen == rec.rejected:
            report.skipped.append(f"{rec.source}: 'chosen' equals 'rejected'")
            continue
        pair, truncated = tokenize_pair(rec, tokenizer, cfg)
        report.truncated += truncated
        pairs.append(pair)
    report.used = len(pairs)
    if not pairs:
        raise DataError(f"{path}: no usable pairs ({report.summary()})")
    return pairs, report


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


def collate(pairs: list[TokenizedPair], pad_id: int) -> Batch:
    """Right-padded (2B, T) rows: [prompt+chosen for each pair] + [prompt+rejected for each pair]."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[r, :n] = torch.tensor(prompt + response)
        labels[r, len(prompt):n] = torch.tensor(response)
        attention_mask[r, :n] = 1
    return Batch(input_ids, attention_mask, labels, [p.source for p in pairs])


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

    @property
    def num_pairs(self) -> int:
        return len(self.sources)

    @property
    def padding_share(self) -> float:
        return (self.kinds == PAD).float().mean().item()

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)


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
    num_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return PackedBatch(input_ids, position_ids, segment_ids, kinds, torch.tensor(pred_index),
                       torch.tensor(pred_target), torch.tensor(pred_owner), [p.source for p in pairs], num_tokens,
                       spans)


# --- unpaired completions (KTO): a minimal reader of {"prompt", "completion", "label"} records ---

@dataclass(frozen=True)
class UnpairedRecord:
    prompt: str
    completion: str
    label: bool
    """True: the completion is desirable; False: undesirable"""
    source: str


@dataclass(frozen=True)
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    source: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def read_unpaired_jsonl(path: str | Path) -> list[UnpairedRecord]:
    """Read {"prompt", "completion", "label": true|false} records; errors name file:line:field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
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
            for name, kind in (("prompt", str), ("completion", str), ("label", bool)):
                if name not in obj:
                    raise DataError(f"{where}: field '{name}' is missing (keys present: {sorted(obj)})")
                if not isinstance(obj[name], kind):
                    raise DataError(f"{where}: field '{name}' must be a {kind.__name__}, "
                                    f"got {type(obj[name]).__name__}")
            if not obj["completion"].strip():
                raise DataError(f"{where}: field 'completion' is empty")
            records.append(UnpairedRecord(obj["prompt"], obj["completion"], obj["label"], where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_unpaired(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedUnpaired], LoadReport]:
    """Read and tokenise an unpaired file, truncating as `tokenize_pair` does (prompt first, then completion)."""
    records = read_unpaired_jsonl(path)
    report = LoadReport(str(path), records=len(records))
    examples = []
    for rec in records:
        prompt_ids = encode_prompt(tokenizer, rec.prompt)
        completion_ids = encode_response(tokenizer, rec.completion)
        if len(prompt_ids) + len(completion_ids) > cfg.max_length:
            report.truncated += 1
            if len(prompt_ids) > cfg.max_prompt_length:
                keep = cfg.max_prompt_length
                prompt_ids = prompt_ids[-keep:] if cfg.prompt_truncation == "keep_end" else prompt_ids[:keep]
            completion_ids = completion_ids[:cfg.max_length - len(prompt_ids)]
        examples.append(TokenizedUnpaired(prompt_ids, completion_ids, rec.label, rec.source))
    report.used = len(examples)
    return examples, report


@dataclass
class UnpairedBatch:
    matched: Batch
    """(B, T) rows prompt_i + completion_i"""
    mismatched: Batch
    """(B, T') rows prompt_i + completion_{i-1}: KTO's KL estimate, scored without gradient"""
    desirable: Tensor
    """(B,) bool"""

    def to(self, device: torch.device | str) -> UnpairedBatch:
        return UnpairedBatch(self.matched.to(device), self.mismatched.to(device), self.desirable.to(device))


def _collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, sources: list[str]) -> Batch:
    """Right-padded rows of prompt+completion with labels on the completion only."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion)
        labels[r, len(prompt):n] = torch.tensor(completion)
        attention_mask[r, :n] = 1
    return Batch(input_ids, attention_mask, labels, sources)


def collate_unpaired(examples: list[TokenizedUnpaired], pad_id: int, max_length: int) -> UnpairedBatch:
    """Matched rows and mismatched rows: prompt i with the completion of example i-1 (cyclically), the
    batch-level pairs whose mean log-ratio estimates KL(pi || pi_ref) in KTO (arXiv:2402.01306, Sec. 4)."""
    if len(examples) < 2:
        raise DataError("KTO's KL estimate needs at least 2 examples per batch to mismatch completions")
    sources = [e.source for e in examples]
    matched = _collate_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id, sources)
    shifted = examples[-1:] + examples[:-1]
    mismatched = _collate_rows(
        [(e.prompt_ids, s.completion_ids[:max(1, max_length - len(e.prompt_ids))])
         for e, s in zip(examples, shifted, strict=True)], pad_id, sources)
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return UnpairedBatch(matched, mismatched, desirable)
