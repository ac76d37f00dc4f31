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
    with path.open("rb") as f:  # bytes: a bad byte is reported at its line, not as a bare UnicodeDecodeError
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                                f"{err.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            values = {}
            for name in ("prompt", "chosen", "rejected"):
                if name not in obj:
                    raise DataError(f"{where}: field '{name}' is missing (keys present: {sorted(obj)})")
                if not isinstance(obj[name], str):
                    raise DataError(f"{where}: field '{name}' must be a string, got {type(obj[name]).__name__}")
                try:
                    obj[name].encode("utf-8")
                except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer can encode a lone surrogate
                    raise DataError(f"{where}: field '{name}' holds an unpaired UTF-16 surrogate") from None
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
        try:
            pair, truncated = tokenize_pair(rec, tokenizer, cfg)
        except DataError:
            raise
        except Exception as err:  # a tokenizer's own failure, reported at the record instead of deep inside it
            raise DataError(f"{rec.source}: could not tokenize ({type(err).__name__}: {err})") from None
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
