"""Raw rows (dicts from any source) -> validated PairRecord / UnpairedRecord in one of the supported shapes.

Every problem a row can have is a RecordProblem naming `where: field: problem`; the loader turns it into a
skipped-record entry, so bad input is reported, never a deep traceback and never a silent loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]
Text = str | Messages  # plain text, or chat messages rendered by the tokenizer's template

SHAPES = ("auto", "pairs", "implicit", "hh", "scored", "unpaired")
# the canonical field names each shape reads; data.fields maps them from other column names
SHAPE_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "scored": ("prompt", "response_a", "response_b", "score_a", "score_b"),
    "unpaired": ("prompt", "completion", "label"),
}
CANONICAL_FIELDS = tuple(sorted({name for names in SHAPE_FIELDS.values() for name in names}))
HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A data file or record is unusable; the message names file, line and field."""


class RecordProblem(DataError):
    """One record can't be used. `invalid` problems are defects in the data (malformed, empty, unrenderable:
    loading stops on them unless data.skip_invalid, and `data check` fails); the others are records that carry
    no preference (chosen == rejected, a score tie) or are left out by a setting (data.min_score_ratio)."""

    def __init__(self, where: str, field: str, problem: str, kind: str, invalid: bool = True):
        super().__init__(f"{where}: {field}: {problem}")
        self.where, self.field, self.problem, self.kind, self.invalid = where, field, problem, kind, invalid


@dataclass(frozen=True)
class PairRecord:
    prompt: Text
    chosen: Text
    rejected: Text
    source: str
    """'file:line' where the record came from, for error messages and skipped-record reports"""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class UnpairedRecord:
    """One response with binary feedback (desirable or not), as KTO trains on."""

    prompt: Text
    completion: Text
    label: bool
    source: str

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def map_fields(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Rename source columns to canonical names: fields = {canonical: column}, e.g. {"prompt": "question"}."""
    if not fields:
        return row
    row = dict(row)
    for canonical, column in fields.items():
        if column in row and column != canonical:
            row[canonical] = row.pop(column)
    return row


def detect_shape(row: dict[str, Any], where: str) -> str:
    """The shape a row's keys (after field mapping) imply; sources are read in one shape, from their first row."""
    keys = set(row)
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"score_a", "score_b"} <= keys:
        return "scored"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "pairs"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        return "hh" if isinstance(chosen, str) and HH_ASSISTANT in chosen else "implicit"
    shapes = "; ".join(f"{s}: {', '.join(f)}" for s, f in SHAPE_FIELDS.items())
    raise DataError(f"{where}: can't tell the data shape from the keys {sorted(keys)}; the shapes read "
                    f"({shapes}); rename columns with data.fields, e.g. data.fields='{{prompt: question}}'")


def _get(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise RecordProblem(where, name, f"missing (keys present: {sorted(row)})", "missing field")
    if row[name] is None:
        raise RecordProblem(where, name, "is null", "missing field")
    return row[name]


def _text(row: dict[str, Any], name: str, where: str, role: str) -> Text:
    """A string, one message dict, or a list of {"role", "content"} messages, checked."""
    value = _get(row, name, where)
    if isinstance(value, str):
        return _encodable(value, name, where)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordProblem(where, name, f"must be a string or a list of messages, got {type(value).__name__}",
                            "wrong type")
    for k, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            raise RecordProblem(where, name, f"message {k} must be an object with 'role' and 'content', got "
                                f"{type(msg).__name__}", "wrong type")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                problem = "missing" if key not in msg else f"not a string ({type(msg[key]).__name__})"
                raise RecordProblem(where, name, f"message {k}: '{key}' {problem}", "bad message")
            _encodable(msg[key], name, where)
    if not value:  # an empty conversation is a mistake, not an empty prompt (that is "")
        raise RecordProblem(where, name, "has no messages", "empty response" if role == "assistant" else "bad message")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _encodable(value: str, name: str, where: str) -> str:
    """JSON allows an unpaired surrogate ("\\ud800"); no tokenizer can encode one, so say where it is."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RecordProblem(where, name, f"holds an unpaired UTF-16 surrogate at character {err.start + 1}",
                            "invalid text") from None
    return value


def _as_messages(value: Text, role: str) -> Messages:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _is_empty(value: Text) -> bool:
    return not (value.strip() if isinstance(value, str) else any(m["content"].strip() for m in value))


def _check_responses(where: str, **responses: Text) -> None:
    for name, value in responses.items():
        if _is_empty(value):
            raise RecordProblem(where, name, "is empty", "empty response")


def _unify(prompt: Text, **responses: Text) -> tuple[Text, dict[str, Text]]:
    """All plain text, or all messages: a string prompt becomes a user turn, a string response an
    assistant turn, as soon as any part of the record is conversational."""
    if all(isinstance(v, str) for v in (prompt, *responses.values())):
        return prompt, responses
    return _as_messages(prompt, "user"), {k: _as_messages(v, "assistant") for k, v in responses.items()}


def _split_implicit(where: str, chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Full chosen/rejected conversations or texts -> (shared prompt, chosen rest, rejected rest)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RecordProblem(where, "chosen", "shares no leading message with 'rejected', so there is no "
                                "prompt", "no shared prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # back off to before the last whitespace run, so each response starts with " word" as BPE prefers
        cut = n
        while cut > 0 and not chosen[cut - 1].isspace():
            cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
        cut = cut or n
        if cut == 0:
            raise RecordProblem(where, "chosen", "shares no leading text with 'rejected', so there is no prompt",
                                "no shared prompt")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise RecordProblem(where, "rejected", "must be the same kind as 'chosen' (both texts or both message lists)",
                        "wrong type")


def _split_hh(where: str, chosen: Text, rejected: Text) -> tuple[str, str, str]:
    """Anthropic HH: the prompt is everything up to and including the last "\\n\\nAssistant:" of 'chosen'."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise RecordProblem(where, name, f"must be Anthropic HH text, got {type(value).__name__}", "wrong type")
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RecordProblem(where, "chosen", "has no '\\n\\nAssistant:' turn", "not HH text")
    prompt = chosen[:cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise RecordProblem(where, "rejected", "does not start with the same conversation as 'chosen'",
                            "no shared prompt")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _number(row: dict[str, Any], name: str, where: str) -> float:
    value = _get(row, name, where)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise RecordProblem(where, name, f"must be a finite number, got {value!r}", "wrong type")
    return number


def _label(row: dict[str, Any], where: str) -> bool:
    value = _get(row, "label", where)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RecordProblem(where, "label", f"must be true or false, got {value!r}", "wrong type")


def to_record(row: dict[str, Any], shape: str, where: str, min_score_ratio: float) -> PairRecord | UnpairedRecord:
    """One row of a source in `shape` -> a record, or a RecordProblem saying why not."""
    if shape == "unpaired":
        prompt, parts = _unify(_text(row, "prompt", where, "user"),
                               completion=_text(row, "completion", where, "assistant"))
        _check_responses(where, **parts)
        return UnpairedRecord(prompt, parts["completion"], _label(row, where), where)
    if shape == "pairs":
        prompt = _text(row, "prompt", where, "user")
        chosen, rejected = _text(row, "chosen", where, "assistant"), _text(row, "rejected", where, "assistant")
    elif shape in ("implicit", "hh"):
        full_chosen, full_rejected = _text(row, "chosen", where, "user"), _text(row, "rejected", where, "user")
        if full_chosen == full_rejected:
            raise RecordProblem(where, "chosen", "equals 'rejected': no preference", "chosen == rejected",
                                invalid=False)
        split = _split_hh if shape == "hh" else _split_implicit
        prompt, chosen, rejected = split(where, full_chosen, full_rejected)
    elif shape == "scored":
        prompt = _text(row, "prompt", where, "user")
        responses = {k: _text(row, k, where, "assistant") for k in ("response_a", "response_b")}
        score_a, score_b = _number(row, "score_a", where), _number(row, "score_b", where)
        if score_a == score_b:
            raise RecordProblem(where, "score_b", f"ties score_a ({score_a:g}): no preference", "score tie",
                                invalid=False)
        high, low = max(score_a, score_b), min(score_a, score_b)
        ratio = high / low if low > 0 else math.inf
        if ratio < min_score_ratio:
            raise RecordProblem(where, "score_a" if score_a > score_b else "score_b",
                                f"score ratio {ratio:.2f} < data.min_score_ratio {min_score_ratio:g}",
                                "score ratio below minimum", invalid=False)
        first = score_a > score_b
        chosen = responses["response_a" if first else "response_b"]
        rejected = responses["response_b" if first else "response_a"]
    else:
        raise DataError(f"unknown data shape {shape!r}; choose from {list(SHAPES)}")
    prompt, parts = _unify(prompt, chosen=chosen, rejected=rejected)
    _check_responses(where, **parts)
    if parts["chosen"] == parts["rejected"]:
        raise RecordProblem(where, "chosen", "equals 'rejected': no preference", "chosen == rejected",
                            invalid=False)
    return PairRecord(prompt, parts["chosen"], parts["rejected"], where)


def record_key(record: PairRecord | UnpairedRecord) -> str:
    """Canonical text of a record's content (not its place): equal keys are duplicate records."""
    parts = [record.prompt, record.chosen, record.rejected] if isinstance(record, PairRecord) else [
        record.prompt, record.completion, record.label]
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)
