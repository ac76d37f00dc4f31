"""Tokenisation proven with real tokenizers (GPT-2's BPE, SmolLM2's with its chat template), offline."""

from __future__ import annotations

import pytest
from tokenizers import processors

from preftune import data
from preftune.config import DataConfig
from preftune.data.tokenize import encode_records


def pair(prompt, chosen, rejected="No."):
    return data.PairRecord(prompt, chosen, rejected, "test:1")


def test_no_bpe_merge_across_the_prompt_response_boundary(gpt2):
    prompt, chosen = "Tell me about the film: ", "It was great."
    tokenized, _ = data.tokenize_pair(pair(prompt, chosen), gpt2, DataConfig())
    joint = gpt2(prompt + chosen)["input_ids"]
    # the pitfall is real for this text: encoded as one string, the prompt's trailing space fuses into " It"
    assert joint[:len(tokenized.prompt_ids)] != tokenized.prompt_ids
    assert gpt2.convert_ids_to_tokens(joint)[5:7] == [":", "ĠIt"]
    # encoded apart, the prompt's ids are exactly its own encoding and the response's follow unchanged
    assert tokenized.prompt_ids == gpt2(prompt)["input_ids"]
    assert tokenized.chosen_ids == gpt2(chosen)["input_ids"] + [gpt2.eos_token_id]
    assert gpt2.decode(tokenized.prompt_ids) == prompt


def test_labels_cover_exactly_the_response_tokens(gpt2):
    records = [pair("Q: hello? A: ", "Hi, how are you?", "Go away."), pair("Name a colour:", " Blue", " Seven")]
    tokenized = [data.tokenize_pair(r, gpt2, DataConfig())[0] for r in records]
    batch = data.collate(tokenized, pad_id=gpt2.pad_token_id)
    rows = [(p.prompt_ids, p.chosen_ids) for p in tokenized] + [(p.prompt_ids, p.rejected_ids) for p in tokenized]
    for r, (prompt_ids, response_ids) in enumerate(rows):
        labelled = (batch.labels[r] != data.IGNORE).nonzero().flatten().tolist()
        assert labelled == list(range(len(prompt_ids), len(prompt_ids) + len(response_ids)))
        assert batch.labels[r, labelled].tolist() == response_ids
        assert batch.input_ids[r, labelled].tolist() == response_ids
        assert response_ids[-1] == gpt2.eos_token_id and response_ids.count(gpt2.eos_token_id) == 1


@pytest.fixture
def gpt2_with_bos(gpt2):
    """GPT-2 made to prepend <|endoftext|> as BOS, as Llama-style tokenizers do."""
    import copy

    tok = copy.deepcopy(gpt2)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", gpt2.eos_token_id)])
    return tok


def test_no_double_bos_when_the_template_writes_one_and_the_tokenizer_adds_one(gpt2_with_bos):
    bos = gpt2_with_bos.bos_token_id
    assert gpt2_with_bos("<|endoftext|>Hi")["input_ids"][:2] == [bos, bos]  # the hazard exists
    tokenized, _ = data.tokenize_pair(pair("<|endoftext|>User: hi\nBot:", " Hello"), gpt2_with_bos, DataConfig())
    assert tokenized.prompt_ids[0] == bos and tokenized.prompt_ids[1] != bos
    plain, _ = data.tokenize_pair(pair("User: hi\nBot:", " Hello"), gpt2_with_bos, DataConfig())
    assert plain.prompt_ids == tokenized.prompt_ids


def test_chat_template_gives_one_bos_and_one_eos(smollm2):
    record = pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}],
                  [{"role": "assistant", "content": "Bye."}])
    tokenized, _ = data.tokenize_pair(record, smollm2, DataConfig())
    eos, start = smollm2.eos_token_id, smollm2.convert_tokens_to_ids("<|im_start|>")
    assert tokenized.prompt_ids[0] == start and tokenized.prompt_ids[1] != start
    assert smollm2.decode(tokenized.prompt_ids).endswith("<|im_start|>assistant\n")
    for ids in (tokenized.chosen_ids, tokenized.rejected_ids):
        # the template closes the turn with <|im_end|> (= EOS); no second EOS is appended after it
        assert ids[-1] == eos and ids.count(eos) == 1
    assert smollm2.decode(tokenized.chosen_ids) == "Hello!<|im_end|>"


def test_render_chat_refuses_a_template_that_rewrites_the_prompt(smollm2):
    # a template that only marks the final turn: the prompt render is not a prefix of the full render
    template = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}\n{% endfor %}"
    record = pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}])
    with pytest.raises(data.DataError, match="not a prefix"):
        data.render_chat(smollm2, record.prompt, record.chosen, template)
    (problem,) = encode_records([record], smollm2, template)
    assert str(problem).startswith("test:1: prompt: the chat template renders the prompt differently")


def test_truncation_modes(gpt2):
    prompt = " ".join(f"word{i}" for i in range(30))  # well over 10 tokens
    record = pair(prompt, "An answer that is long enough to be cut short here.")
    full_prompt, full_chosen = gpt2(prompt)["input_ids"], gpt2(record.chosen)["input_ids"] + [gpt2.eos_token_id]
    cfg = DataConfig(max_length=16, max_prompt_length=10)
    kept_end, truncated = data.tokenize_pair(record, gpt2, cfg)
    assert truncated and kept_end.prompt_ids == full_prompt[-10:]
    assert kept_end.chosen_ids == full_chosen[:6]  # the room left: 16 - 10
    kept_start, _ = data.tokenize_pair(record, gpt2, DataConfig(max_length=16, max_prompt_length=10,
                                                               prompt_truncation="keep_start"))
    assert kept_start.prompt_ids == full_prompt[:10] and kept_start.chosen_ids == full_chosen[:6]
    fits, truncated = data.tokenize_pair(record, gpt2, DataConfig(max_length=512, max_prompt_length=256))
    assert not truncated and (fits.prompt_ids, fits.chosen_ids) == (full_prompt, full_chosen)
    # a short prompt is left whole; only the responses give way
    long_answer = " ".join(["one two three four five"] * 4)  # 20 tokens
    short, truncated = data.tokenize_pair(pair("Q:", long_answer), gpt2, cfg)
    assert truncated and short.prompt_ids == gpt2("Q:")["input_ids"]
    assert short.chosen_ids == gpt2(long_answer)["input_ids"][:16 - 2]


def test_batched_encoding_equals_one_record_at_a_time(gpt2, smollm2):
    records = [pair("A: ", "b c"), pair("", "Only a response."), pair("x" * 50, " y", " z"),
               pair([{"role": "user", "content": "Q?"}], [{"role": "assistant", "content": "A."}],
                    [{"role": "assistant", "content": "B."}])]
    for tok, recs in ((gpt2, records[:3]), (smollm2, records)):
        batched = encode_records(recs, tok)
        for rec, (prompt_ids, (chosen_ids, rejected_ids)) in zip(recs, batched, strict=True):
            if rec.conversational:
                prompt_text, chosen_text = data.render_chat(tok, rec.prompt, rec.chosen)
                assert prompt_ids == data.encode_prompt(tok, prompt_text, add_special_tokens=False)
                assert chosen_ids == data.encode_response(tok, chosen_text)
            else:
                assert prompt_ids == data.encode_prompt(tok, rec.prompt)
                assert (chosen_ids, rejected_ids) == (data.encode_response(tok, rec.chosen),
                                                      data.encode_response(tok, rec.rejected))
    # an empty prompt still gets one token (GPT-2's BOS) to condition the response on
    assert encode_records([records[1]], gpt2)[0][0] == [gpt2.bos_token_id]
