"""A source -> tokenised pairs in compact arrays, with a report that accounts for every record, and a cache.

Records stream through in chunks (read -> validate -> tokenise in one batched call -> int32 arrays), so memory
is bounded by the chunk plus the compact output, whatever the source size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import overload

import numpy as np

from preftune.config import DataConfig
from preftune.data.records import (
    SFT_SHAPES,
    DataError,
    Example,
    PairRecord,
    RecordProblem,
    UnpairedRecord,
    detect_shape,
    map_fields,
    record_key,
    to_example,
    to_record,
)
from preftune.data.sources import content_hash, read_rows
from preftune.data.tokenize import TokenizedPair, TokenizedUnpaired, encode_records, truncate

CHUNK = 1024  # records tokenised per batched tokenizer call: big enough to keep every core busy
CACHE_VERSION = 1  # bump when tokenisation changes, so old cache entries are never read
# DataConfig fields that don't change the tokenised output, so they stay out of the cache key
# (nor do subset and eval_subset: they name hub configurations, and hub sources are never cached)
NOT_IN_CACHE_KEY = ("train", "eval", "group_by_length", "cache", "cache_dir", "subset", "eval_subset")


@dataclass
class LoadReport:
    """What happened to every record of a source: used (maybe truncated), held out for eval, or skipped with
    a reason. `skipped` lists 'where: field: problem' for each; `reasons` counts them by kind."""

    path: str
    shape: str = ""
    records: int = 0
    used: int = 0
    truncated: int = 0
    held_out: int = 0
    duplicates: int = 0
    invalid: int = 0
    first_invalid: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    max_samples_reached: bool = False
    cached: bool = False

    def skip(self, problem: RecordProblem) -> None:
        self.skipped.append(str(problem))
        self.reasons[problem.kind] = self.reasons.get(problem.kind, 0) + 1
        self.invalid += problem.invalid
        if problem.invalid and len(self.first_invalid) < 100:
            self.first_invalid.append(str(problem))

    def summary(self) -> str:
        s = f"{self.path}: {self.records} records ({self.shape}), {self.used} used ({self.truncated} truncated)"
        if self.held_out:
            s += f", {self.held_out} held out for eval"
        if self.duplicates:
            s += f", {self.duplicates} duplicates (kept)"
        if self.max_samples_reached:
            s += ", stopped at data.max_samples"
        if self.cached:
            s += ", tokenised data from cache"
        if self.skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.reasons.items()))
            s += f", {len(self.skipped)} skipped ({kinds}): " + "; ".join(self.skipped[:5])
            if len(self.skipped) > 5:
                s += f"; ... ({len(self.skipped) - 5} more)"
        return s


class PairStore(Sequence[TokenizedPair]):
    """Tokenised pairs as three flat int32 arrays + offsets: ~4 bytes a token instead of ~36 for lists of
    Python ints. Indexing materialises one TokenizedPair, so it reads like a list of them."""

    ROLES = ("prompt", "chosen", "rejected")

    def __init__(self, arrays: dict[str, np.ndarray], sources: list[str]):
        self.arrays, self.sources = arrays, sources  # arrays: {role}_ids (int32), {role}_offsets (int64, N+1)

    def __len__(self) -> int:
        return len(self.sources)

    def _ids(self, role: str, i: int) -> list[int]:
        offsets = self.arrays[f"{role}_offsets"]
        return self.arrays[f"{role}_ids"][offsets[i]:offsets[i + 1]].tolist()

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedPair]: ...

    def __getitem__(self, i: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return TokenizedPair(*(self._ids(role, i) for role in self.ROLES), self.sources[i])

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        """TokenizedPair.length of every pair, without materialising them."""
        size = {role: np.diff(self.arrays[f"{role}_offsets"]) for role in self.ROLES}
        return (size["prompt"] + np.maximum(size["chosen"], size["rejected"])).tolist()

    @classmethod
    def build(cls, pairs: Iterator[tuple[list[int], list[int], list[int], str]]) -> PairStore:
        parts: dict[str, list[np.ndarray]] = {role: [] for role in cls.ROLES}
        sizes: dict[str, list[int]] = {role: [0] for role in cls.ROLES}
        sources, pending = [], {role: [] for role in cls.ROLES}

        def flush() -> None:  # lists of Python ints -> one int32 array per chunk
            for role in cls.ROLES:
                count = sum(map(len, pending[role]))
                parts[role].append(np.fromiter(chain.from_iterable(pending[role]), dtype=np.int32, count=count))
                pending[role].clear()

        for prompt_ids, chosen_ids, rejected_ids, source in pairs:
            for role, ids in zip(cls.ROLES, (prompt_ids, chosen_ids, rejected_ids), strict=True):
                pending[role].append(ids)
                sizes[role].append(len(ids))
            sources.append(source)
            if len(pending["prompt"]) >= CHUNK:
                flush()
        flush()
        arrays = {}
        for role in cls.ROLES:
            arrays[f"{role}_ids"] = np.concatenate(parts[role]).astype(np.int32, copy=False)
            arrays[f"{role}_offsets"] = np.cumsum(np.asarray(sizes[role], dtype=np.int64))
        return cls(arrays, sources)


def chat_template_of(cfg: DataConfig) -> str | None:
    """data.chat_template: a .jinja file's text, the template itself, or None for the tokenizer's own."""
    if not cfg.chat_template:
        return None
    if "{{" in cfg.chat_template or "{%" in cfg.chat_template:
        return cfg.chat_template  # Jinja text; a file name never holds these
    path = Path(cfg.chat_template)
    if not path.is_file():
        raise DataError(f"data.chat_template: {cfg.chat_template!r} is neither a Jinja template nor a file")
    return path.read_text()


def _eval_side(key: str, fraction: float) -> bool:
    """Whether a record belongs to the held-out side: a pure function of its content."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


Record = PairRecord | UnpairedRecord | Example


def source_split(source: str, cfg: DataConfig, part: str) -> tuple[str, str]:
    """(split, subset) of a HF dataset source: the eval source reads its own (data.eval_split, data.eval_subset);
    records held out of the train source, and everything else, come from data.split and data.subset."""
    if part == "eval" and source == cfg.eval:
        return cfg.eval_split, cfg.eval_subset
    return cfg.split, cfg.subset


def source_shape(source: str, cfg: DataConfig, part: str = "all") -> str:
    """The shape a source is read in: data.shape, or the one its first readable row's keys imply."""
    if cfg.shape != "auto":
        return cfg.shape
    split, subset = source_split(source, cfg, part)
    for where, row in read_rows(source, cfg.format, split, subset):
        if not isinstance(row, RecordProblem):
            return detect_shape(map_fields(row, cfg.fields), where)
    raise DataError(f"{source}: no readable records")


def iter_records(source: str, cfg: DataConfig, report: LoadReport, part: str = "train", split: str = "train",
                 examples: bool | None = False, subset: str | None = None) -> Iterator[Record]:
    """Validated records of a source; every row read is yielded, or counted (held out / skipped) in `report`.

    part: 'train' leaves out the eval_fraction side, 'eval' keeps only it, 'all' keeps every record.
    examples: True reads every row as the Example SFT trains on (see records.to_example); False as the
    shape's own record; None decides by the shape (Examples for SFT_SHAPES), for tools that take either.
    subset: the hub configuration to read (None: data.subset).
    """
    shape = cfg.shape
    convert = None
    seen: set[bytes] = set()
    for where, row in read_rows(source, cfg.format, split, cfg.subset if subset is None else subset):
        if cfg.max_samples and report.records >= cfg.max_samples:
            report.max_samples_reached = True
            break
        report.records += 1
        if isinstance(row, RecordProblem):
            report.skip(row)
            continue
        row = map_fields(row, cfg.fields)
        if shape == "auto":
            shape = detect_shape(row, where)
        report.shape = shape
        if convert is None:
            as_examples = examples if examples is not None else shape in SFT_SHAPES
            convert = to_example if as_examples else to_record
        try:
            record = convert(row, shape, where, cfg.min_score_ratio)
        except RecordProblem as problem:
            report.skip(problem)
            continue
        key = record_key(record)
        if part != "all" and cfg.eval_fraction > 0 and _eval_side(key, cfg.eval_fraction) != (part == "eval"):
            report.held_out += 1
            continue
        digest = hashlib.blake2b(key.encode(), digest_size=12).digest()
        report.duplicates += digest in seen
        seen.add(digest)
        yield record


def iter_encoded(records: Iterator[Record], tokenizer, cfg: DataConfig, report: LoadReport
                 ) -> Iterator[tuple[Record, list[int], list[list[int]]]]:
    """(record, untruncated prompt ids, response ids) in chunks of CHUNK records, one tokenizer call each."""
    template = chat_template_of(cfg)
    chunk: list[Record] = []

    def drain() -> Iterator[tuple[Record, list[int], list[list[int]]]]:
        for rec, encoded in zip(chunk, encode_records(chunk, tokenizer, template), strict=True):
            if isinstance(encoded, RecordProblem):
                report.skip(encoded)
            else:
                yield rec, encoded[0], encoded[1]
        chunk.clear()

    for rec in records:
        chunk.append(rec)
        if len(chunk) >= CHUNK:
            yield from drain()
    yield from drain()


def fit(prompt_ids: list[int], responses: list[list[int]], cfg: DataConfig, source: str, report: LoadReport
        ) -> tuple[list[int], list[list[int]]] | None:
    """Truncate (or with data.drop_long, drop) an over-long pair; counts it in the report."""
    prompt_ids, responses_fit, truncated = truncate(prompt_ids, responses, cfg)
    if truncated and cfg.drop_long:
        longest = len(prompt_ids) + max(map(len, responses))
        report.skip(RecordProblem(source, "record", f"{longest} tokens > data.max_length {cfg.max_length} "
                                  "(data.drop_long)", "too long", invalid=False))
        return None
    report.truncated += truncated
    return prompt_ids, responses_fit


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything about a tokenizer that decides the ids: its serialised model (vocab, merges,
    normalisers, special tokens) and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id,
                              str(getattr(tokenizer, "chat_template", None))]).encode())
    return digest.hexdigest()


def cache_path(source: str, tokenizer, cfg: DataConfig, cache_dir: Path, part: str, split: str) -> Path | None:
    source_hash = content_hash(source, cfg.format, split)
    if source_hash is None:
        return None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_CACHE_KEY}
    key = json.dumps({"version": CACHE_VERSION, "source": source_hash, "tokenizer": tokenizer_fingerprint(tokenizer),
                      "settings": settings, "part": part, "split": split}, sort_keys=True)
    return cache_dir / f"pairs-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _save(path: Path, store: PairStore, report: LoadReport) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(store.arrays, str(tmp), metadata={"report": json.dumps(vars(report)),
                                                "sources": json.dumps(store.sources)})
    os.replace(tmp, path)  # atomic: a concurrent or killed run never sees half a file


def _load(path: Path) -> tuple[PairStore, LoadReport]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    report = LoadReport(**json.loads(meta["report"]))
    report.cached = True
    return PairStore(load_file(str(path)), json.loads(meta["sources"])), report


def cache_dir_for(cfg) -> Path | None:
    """The cache directory a full Config implies (None when data.cache is off)."""
    if not cfg.data.cache:
        return None
    return Path(cfg.data.cache_dir or os.environ.get("PREFTUNE_CACHE") or Path(cfg.train.output_dir) / ".cache")


def refuse_invalid(report: LoadReport, cfg: DataConfig) -> None:
    """Malformed records stop the load (all of them counted, the first few listed) unless data.skip_invalid."""
    if report.invalid and not cfg.skip_invalid:
        listed = "; ".join(report.first_invalid[:5]) + ("; ..." if report.invalid > 5 else "")
        raise DataError(f"{report.path}: {report.invalid} invalid record(s) of {report.records}: {listed} "
                        "(`preftune data check` lists them all; data.skip_invalid=true trains on the rest)", report)


def load_pairs(source: str | Path, tokenizer, cfg: DataConfig, *, part: str = "train",
               cache_dir: str | Path | None = None) -> tuple[PairStore, LoadReport]:
    """Read, validate and tokenise a preference source. Every record ends up used (maybe truncated), held out
    for eval (part='train' with eval_fraction), or skipped with its reason in the report. Malformed records
    are an error listing them, unless data.skip_invalid; so is a source with no usable pair at all. With
    cache_dir, the result is cached (see cache_path)."""
    source = str(source)
    split, subset = source_split(source, cfg, part)
    path = cache_path(source, tokenizer, cfg, Path(cache_dir), part, split) if cache_dir else None
    if path is not None and path.is_file():
        return _load(path)
    report = LoadReport(source)

    def pairs() -> Iterator[tuple[list[int], list[int], list[int], str]]:
        records = iter_records(source, cfg, report, part, split, subset=subset)
        for rec, prompt_ids, responses in iter_encoded(records, tokenizer, cfg, report):
            if isinstance(rec, UnpairedRecord):
                raise DataError(f"{source}: records are unpaired (prompt/completion/label); a paired loss needs "
                                "prompt/chosen/rejected (unpaired data feeds KTO-style losses)")
            fitted = fit(prompt_ids, responses, cfg, rec.source, report)
            if fitted is not None:
                yield fitted[0], fitted[1][0], fitted[1][1], rec.source

    store = PairStore.build(pairs())
    report.used = len(store)
    refuse_invalid(report, cfg)
    if not len(store):
        raise DataError(f"{source}: no usable pairs ({report.summary()})", report)
    if path is not None:
        _save(path, store, report)
    return store, report


def load_unpaired(source: str | Path, tokenizer, cfg: DataConfig, *, part: str = "train"
                  ) -> tuple[list[TokenizedUnpaired], LoadReport]:
    """Unpaired binary feedback for KTO-style losses. Paired data also works: each pair gives a desirable
    (chosen) and an undesirable (rejected) completion of the same prompt."""
    source = str(source)
    report = LoadReport(source)
    out = []
    for rec, prompt_ids, responses in iter_encoded(iter_records(source, cfg, report, part, cfg.split), tokenizer,
                                                   cfg, report):
        labels = [rec.label] if isinstance(rec, UnpairedRecord) else [True, False]
        for label, response_ids in zip(labels, responses, strict=True):
            fitted = fit(prompt_ids, [response_ids], cfg, rec.source, report)
            if fitted is not None:
                out.append(TokenizedUnpaired(fitted[0], fitted[1][0], label, rec.source))
    report.used = len(out)
    refuse_invalid(report, cfg)
    if not out:
        raise DataError(f"{source}: no usable records ({report.summary()})", report)
    return out, report
