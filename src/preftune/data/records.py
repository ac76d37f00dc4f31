"""Raw rows (dicts from any source) -> validated PairRecord / UnpairedRecord / Example in one of the supported
shapes.

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

SHAPES = ("auto", "pairs", "implicit", "hh", "scored", "unpaired", "tldr_comparisons", "completion", "tldr")
# the canonical field names each shape reads; data.fields maps them from other column names
SHAPE_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "scored": ("prompt", "response_a", "response_b", "score_a", "score_b"),
    "unpaired": ("prompt", "completion", "label"),
    "tldr_comparisons": ("info", "summaries", "choice"),
    "completion": ("prompt", "completion"),
    "tldr": ("subreddit", "title", "post", "summary"),
}
SFT_SHAPES = ("completion", "tldr")
"""Shapes holding one demonstration per prompt: SFT data, never preference pairs."""
CANONICAL_FIELDS = tuple(sorted({name for names in SHAPE_FIELDS.values() for name in names}))
HH_ASSISTANT = "\n\nAssistant:"
# The TL;DR query of OpenAI's summarize-from-feedback code (Stiennon et al. 2020; openai/summarize-from-feedback,
# summarize_from_feedback/utils/experiment_helpers.py, `tldr_task`: query.format_str), whose reference summary
# follows as " {reference}" (response.ref_format_str), so a summary starts with one space after "TL;DR:".
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


class DataError(ValueError):
    """A data file or record is unusable; the message names file, line and field. An error about a whole source
    (all records invalid or unusable) carries the load's `report`, which names each record's problem."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


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
class Example:
    """One demonstration (a prompt and the response to imitate), as SFT trains on and as the reference a
    policy's samples are judged against."""

    prompt: Text
    completion: Text
    source: str

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
    if {"info", "summaries", "choice"} <= keys:
        return "tldr_comparisons"
    if {"subreddit", "title", "post", "summary"} <= keys:
        return "tldr"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"score_a", "score_b"} <= keys:
        return "scored"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "pairs"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        return "hh" if isinstance(chosen, str) and HH_ASSISTANT in chosen else "implicit"
    shapes = "; ".join(f"{s}: {', '.join(f)}" for s, f in SHAPE_FIELDS.items())
    raise DataError(f"{where}: record: can't tell the data shape from the keys {sorted(keys)}; the shapes read "
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


def _string(value: Any, name: str, where: str) -> str:
    """A required string field; `name` may be nested (e.g. 'info.post') so the error points into the record."""
    if value is None:
        raise RecordProblem(where, name, "is null", "missing field")
    if not isinstance(value, str):
        raise RecordProblem(where, name, f"must be a string, got {type(value).__name__}", "wrong type")
    return _encodable(value, name, where)


def _tldr_query(fields: dict[str, Any], where: str, prefix: str) -> str:
    """A Reddit post (its `subreddit`, `title` and `post` fields, found under `prefix`) as the TL;DR query."""
    parts = {}
    for name in ("subreddit", "title", "post"):
        if name not in fields:
            raise RecordProblem(where, prefix + name, f"missing (keys present: {sorted(fields)})", "missing field")
        parts[name] = _string(fields[name], prefix + name, where)
    if not parts["post"].strip():
        raise RecordProblem(where, prefix + "post", "is empty", "empty prompt")
    # some copies write the subreddit as "r/name"; the template adds the "r/" itself
    return TLDR_TEMPLATE.format(subreddit=parts["subreddit"].removeprefix("r/"), title=parts["title"],
                                post=parts["post"])


def _tldr_summary(value: Any, name: str, where: str) -> str:
    """A summary as the response after "TL;DR:": with the one leading space OpenAI's format puts there (the
    comparisons' texts already carry it; the filtered posts' reference summaries do not)."""
    text = _string(value, name, where)
    if not text.strip():
        raise RecordProblem(where, name, "is empty", "empty response")
    return text if text[:1].isspace() else " " + text


def _tldr_comparison(row: dict[str, Any], where: str) -> tuple[str, str, str]:
    """OpenAI summarize-from-feedback comparison -> (TL;DR query, preferred summary, other summary).

    {"info": {"id", "post", "title", "subreddit"}, "summaries": [{"text", "policy", "note"}, {...}], "choice": 0|1,
    "worker", "batch", "split", "extra"}: `choice` is the index of the summary the labeller preferred.
    """
    info = _get(row, "info", where)
    if not isinstance(info, dict):
        raise RecordProblem(where, "info", f"must be an object with subreddit, title and post, got "
                            f"{type(info).__name__}", "wrong type")
    if info.get("post") is None and info.get("article") is not None:
        # the comparisons' evaluation batches also rate CNN/DM articles; they are not TL;DR posts
        raise RecordProblem(where, "info.post", "is null: a CNN/DM article (info.article), not a TL;DR post",
                            "not a TL;DR post", invalid=False)
    prompt = _tldr_query(info, where, "info.")
    summaries = _get(row, "summaries", where)
    if not isinstance(summaries, list) or len(summaries) != 2:
        got = f"{len(summaries)} items" if isinstance(summaries, list) else type(summaries).__name__
        raise RecordProblem(where, "summaries", f"must be a list of 2 summaries, got {got}", "wrong type")
    texts = []
    for k, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise RecordProblem(where, f"summaries[{k}]", f"must be an object with 'text', got "
                                f"{type(summary).__name__}", "wrong type")
        if "text" not in summary:
            raise RecordProblem(where, f"summaries[{k}].text", f"missing (keys present: {sorted(summary)})",
                                "missing field")
        texts.append(_tldr_summary(summary["text"], f"summaries[{k}].text", where))
    choice = _get(row, "choice", where)
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise RecordProblem(where, "choice", f"must be 0 or 1 (the index of the preferred summary), got {choice!r}",
                            "wrong type")
    return prompt, texts[choice], texts[1 - choice]


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
    elif shape == "tldr_comparisons":
        prompt, chosen, rejected = _tldr_comparison(row, where)
    elif shape in SFT_SHAPES:
        hint = " (the TL;DR preference data is shape tldr_comparisons)" if shape == "tldr" else ""
        raise DataError(f"{where}: shape {shape!r} holds one response per prompt, SFT data (`preftune sft` trains on "
                        f"it); a preference loss needs pairs{hint}")
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


def to_example(row: dict[str, Any], shape: str, where: str, min_score_ratio: float) -> Example:
    """One row in `shape` -> the demonstration SFT trains on, or a RecordProblem saying why not.

    completion: its completion; tldr: the post's reference summary; a preference shape: its preferred response
    (the DPO paper's SFT "on preferred completions"), read without the rejected one where the shape allows
    (pairs, hh, tldr_comparisons); unpaired: a desirable completion (an undesirable one is reported, not used).
    """
    if shape == "completion":
        prompt, parts = _unify(_text(row, "prompt", where, "user"),
                               completion=_text(row, "completion", where, "assistant"))
        field, completion = "completion", parts["completion"]
    elif shape == "tldr":
        prompt, field = _tldr_query(row, where, ""), "summary"
        completion = _tldr_summary(_get(row, "summary", where), "summary", where)
    elif shape == "unpaired":
        prompt, parts = _unify(_text(row, "prompt", where, "user"),
                               completion=_text(row, "completion", where, "assistant"))
        if not _label(row, where):
            raise RecordProblem(where, "label", "is false: an undesirable completion is no demonstration",
                                "undesirable completion", invalid=False)
        field, completion = "completion", parts["completion"]
    elif shape == "hh":
        chosen = _text(row, "chosen", where, "user")
        if not isinstance(chosen, str):
            raise RecordProblem(where, "chosen", f"must be Anthropic HH text, got {type(chosen).__name__}",
                                "wrong type")
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise RecordProblem(where, "chosen", "has no '\\n\\nAssistant:' turn", "not HH text")
        cut += len(HH_ASSISTANT)
        prompt, field, completion = chosen[:cut], "chosen", chosen[cut:]
    elif shape == "pairs":
        prompt, parts = _unify(_text(row, "prompt", where, "user"), chosen=_text(row, "chosen", where, "assistant"))
        field, completion = "chosen", parts["chosen"]
    elif shape == "tldr_comparisons":
        prompt, completion, _ = _tldr_comparison(row, where)
        field = "summaries"
    else:  # implicit and scored need both responses to know the prompt, or which one is preferred
        record = to_record(row, shape, where, min_score_ratio)
        if not isinstance(record, PairRecord):
            raise DataError(f"unknown data shape {shape!r}; choose from {list(SHAPES)}")
        prompt, field, completion = record.prompt, "chosen", record.chosen
    _check_responses(where, **{field: completion})
    return Example(prompt, completion, where)


def record_key(record: PairRecord | UnpairedRecord | Example) -> str:
    """Canonical text of a record's content (not its place): equal keys are duplicate records."""
    if isinstance(record, PairRecord):
        parts = [record.prompt, record.chosen, record.rejected]
    elif isinstance(record, UnpairedRecord):
        parts = [record.prompt, record.completion, record.label]
    else:
        parts = [record.prompt, record.completion]
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)
