"""Records -> token ids, with the prompt's ids a prefix of prompt+response by construction.

Tokenisation rule: the prompt and each response are encoded separately and concatenated (encoding the joined
string lets BPE merge across the boundary, e.g. a trailing space fusing with the response's first word, and
mislabels tokens). Chat records are first rendered with the tokenizer's chat template: the prompt turns with
the generation prompt added, the response as the text the template adds after it for the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preftune.config import DataConfig
from preftune.data.records import DataError, Example, Messages, PairRecord, RecordProblem, Text, UnpairedRecord


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


@dataclass(frozen=True)
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    """The record's label: True, a desirable completion; False, an undesirable one."""
    source: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class TokenizedExample:
    """One SFT demonstration: the prompt (labels masked in the batch) and the response trained on. No label and
    no second response: not a pair with an empty side, nor an unpaired completion that is 'desirable'."""

    prompt_ids: list[int]
    response_ids: list[int]
    source: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class _Specials:
    """The special tokens the finishing rules need, looked up once per batch (not per record)."""

    bos: int | None
    eos: int | None
    eos_text: str

    @classmethod
    def of(cls, tokenizer) -> _Specials:
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token or "\0")


def _finish_prompt(sp: _Specials, ids: list[int], text: str) -> list[int]:
    # a template that writes BOS plus a tokenizer that adds one = two; keep one
    while sp.bos is not None and len(ids) >= 2 and ids[0] == sp.bos and ids[1] == sp.bos:
        ids = ids[1:]
    # a few tokenizers append EOS to every encoding; a prompt must not end the sequence
    if sp.eos is not None and ids and ids[-1] == sp.eos and not text.endswith(sp.eos_text):
        ids = ids[:-1]
    if not ids and sp.bos is not None:
        ids = [sp.bos]  # an empty prompt still needs one token to condition the first response token on
    return ids


def _finish_response(sp: _Specials, ids: list[int]) -> list[int]:
    if sp.eos is None:
        raise DataError("the tokenizer has no EOS token; set one so responses can end")
    return ids if ids and ids[-1] == sp.eos else [*ids, sp.eos]


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Prompt ids with at most one BOS. Rendered chat prompts pass add_special_tokens=False: the template
    already wrote whatever special tokens the model expects."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return _finish_prompt(_Specials.of(tokenizer), ids, text)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids ending in exactly one EOS (appended unless the text, e.g. a chat turn, already has it)."""
    return _finish_response(_Specials.of(tokenizer), list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def render_chat(tokenizer, prompt: Messages, response: Messages, template: str | None = None) -> tuple[str, str]:
    """(prompt text with the generation prompt, the assistant turn's text) from the chat template.

    The response text is full_render[len(prompt_render):], after checking that the prompt render is a prefix of
    the full one (templates that rewrite earlier turns are refused, not silently mislabelled). Whitespace the
    template writes after the turn's closing EOS is dropped, so the response ends in exactly one EOS.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template for conversational data; set data.chat_template")
    prompt_text = tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, chat_template=template, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently once a response follows, so the "
                        "prompt is not a prefix of prompt+response")
    response_text = full_text[len(prompt_text):]
    eos = tokenizer.eos_token
    if eos and response_text.rstrip().endswith(eos):
        response_text = response_text.rstrip()
    return prompt_text, response_text


def record_texts(record: PairRecord | UnpairedRecord | Example, tokenizer, template: str | None = None
                 ) -> tuple[str, list[str], bool]:
    """(prompt text, response texts, prompt_is_rendered) of a record, rendering chat messages."""
    responses: list[Text] = ([record.chosen, record.rejected] if isinstance(record, PairRecord)
                             else [record.completion])
    if not record.conversational:
        return record.prompt, responses, False  # type: ignore[return-value]
    texts = [render_chat(tokenizer, record.prompt, r, template) for r in responses]  # type: ignore[arg-type]
    return texts[0][0], [t[1] for t in texts], True


def truncate(prompt_ids: list[int], responses: list[list[int]], cfg: DataConfig
             ) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + longest response into max_length (as the DPO reference code): the prompt is cut to
    max_prompt_length first (keep_end keeps the words nearest the response; keep_start its beginning),
    then the responses to the room that remains. Returns the ids and whether anything was cut."""
    if len(prompt_ids) + max(map(len, responses)) <= cfg.max_length:
        return prompt_ids, responses, False
    if len(prompt_ids) > cfg.max_prompt_length:
        keep = cfg.max_prompt_length
        prompt_ids = prompt_ids[-keep:] if cfg.prompt_truncation == "keep_end" else prompt_ids[:keep]
    room = cfg.max_length - len(prompt_ids)
    return prompt_ids, [r[:room] for r in responses], True


def _encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Many texts at once: a fast (Rust) tokenizer spreads the batch over all cores."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # the Rust tokenizer directly: the same ids as tokenizer(texts), without building offsets and masks
        # (a third of the time); test_batched_encoding_equals_one_record_at_a_time holds them equal
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def encode_records(records: list[PairRecord | UnpairedRecord | Example], tokenizer, template: str | None = None
                   ) -> list[tuple[list[int], list[list[int]]] | RecordProblem]:
    """Untruncated (prompt ids, response ids) of each record, or the problem that stops it, in order.

    Same ids as encode_prompt/encode_response one record at a time, but every text of the batch goes
    through the tokenizer in one call.
    """
    rendered: list[tuple[str, list[str], bool] | RecordProblem] = []
    for rec in records:
        try:
            rendered.append(record_texts(rec, tokenizer, template))
        except DataError as err:
            rendered.append(RecordProblem(rec.source, "prompt", str(err), "chat template"))
        except Exception as err:  # a Jinja template raising on a record (e.g. roles not alternating)
            rendered.append(RecordProblem(rec.source, "prompt", f"the chat template failed: {err}",
                                          "chat template"))
    ok = [r for r in rendered if not isinstance(r, RecordProblem)]
    plain_prompts = _encode_batch(tokenizer, [r[0] for r in ok if not r[2]], True)
    chat_prompts = _encode_batch(tokenizer, [r[0] for r in ok if r[2]], False)
    responses = _encode_batch(tokenizer, [t for r in ok for t in r[1]], False)
    sp = _Specials.of(tokenizer)
    out: list[tuple[list[int], list[list[int]]] | RecordProblem] = []
    plain_i = chat_i = resp_i = 0
    for rec, r in zip(records, rendered, strict=True):
        if isinstance(r, RecordProblem):
            out.append(r)
            continue
        prompt_text, response_texts, is_chat = r
        if is_chat:
            prompt_ids, chat_i = chat_prompts[chat_i], chat_i + 1
        else:
            prompt_ids, plain_i = plain_prompts[plain_i], plain_i + 1
        prompt_ids = _finish_prompt(sp, prompt_ids, prompt_text)
        response_ids = [_finish_response(sp, ids) for ids in responses[resp_i:resp_i + len(response_texts)]]
        resp_i += len(response_texts)
        if not prompt_ids:
            out.append(RecordProblem(rec.source, "prompt", "encodes to no tokens and the tokenizer has no BOS",
                                     "empty prompt"))
            continue
        out.append((prompt_ids, response_ids))
    return out


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


def tokenize_pair(rec: PairRecord, tokenizer, cfg: DataConfig) -> tuple[TokenizedPair, bool]:
    """Token ids of one pair and whether it had to be truncated (see `truncate`)."""
    (encoded,) = encode_records([rec], tokenizer, chat_template_of(cfg))
    if isinstance(encoded, RecordProblem):
        raise encoded
    prompt_ids, (chosen_ids, rejected_ids) = encoded
    prompt_ids, (chosen_ids, rejected_ids), truncated = truncate(prompt_ids, [chosen_ids, rejected_ids], cfg)
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, rec.source), truncated
