"""The recipes' data adapters: OpenAI's TL;DR comparisons and filtered posts, Anthropic HH as SFT data, hub
subsets. Hand-written records -> the exact prompt and response strings; malformed ones -> located errors."""

from __future__ import annotations

import json

import pytest

from preftune import data, sft
from preftune.config import DataConfig
from preftune.data.check import check
from preftune.data.records import Example, PairRecord, RecordProblem, detect_shape, to_example, to_record
from preftune.modeling import byte_tokenizer

from .conftest import FIXTURES

POST = {"id": "t3_abc", "subreddit": "cooking", "title": "Dense bread", "post": "Every loaf is flat.\n\nWhy?"}
QUERY = "SUBREDDIT: r/cooking\n\nTITLE: Dense bread\n\nPOST: Every loaf is flat.\n\nWhy?\n\nTL;DR:"


def comparison(**changes) -> dict:
    row = {"info": dict(POST), "summaries": [{"text": " Flat bread, why?", "policy": "ref", "note": None},
                                             {"text": " bread", "policy": "sup2", "note": "vague"}],
           "choice": 0, "worker": "w1", "batch": "batch5", "split": "train", "extra": {"confidence": 7}}
    row.update(changes)
    return row


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_a_comparison_becomes_the_tldr_query_and_the_preferred_summary():
    record = to_record(comparison(), detect_shape(comparison(), "f:1"), "f:1", min_score_ratio=1.0)
    assert record == PairRecord(QUERY, " Flat bread, why?", " bread", "f:1")
    swapped = to_record(comparison(choice=1), "tldr_comparisons", "f:2", 1.0)
    assert (swapped.chosen, swapped.rejected) == (" bread", " Flat bread, why?")
    # a summary without its leading space gets the one OpenAI's format puts after "TL;DR:"
    bare = comparison(summaries=[{"text": "Flat bread"}, {"text": "  two spaces kept"}])
    assert to_record(bare, "tldr_comparisons", "f:3", 1.0).chosen == " Flat bread"
    assert to_record(bare, "tldr_comparisons", "f:3", 1.0).rejected == "  two spaces kept"
    # SFT on comparisons trains on the preferred summary
    assert to_example(comparison(choice=1), "tldr_comparisons", "f:4", 1.0) == Example(QUERY, " bread", "f:4")


@pytest.mark.parametrize("changes, message", [
    ({"info": "a post"}, "info: must be an object with subreddit, title and post, got str"),
    ({"info": {"subreddit": "a", "title": "b"}}, "info.post: missing (keys present: ['subreddit', 'title'])"),
    ({"info": {**POST, "title": 3}}, "info.title: must be a string, got int"),
    ({"info": {**POST, "post": "  "}}, "info.post: is empty"),
    ({"summaries": [{"text": " a"}]}, "summaries: must be a list of 2 summaries, got 1 items"),
    ({"summaries": [{"text": " a"}, " b"]}, "summaries[1]: must be an object with 'text', got str"),
    ({"summaries": [{"text": " a"}, {"policy": "ref"}]}, "summaries[1].text: missing (keys present: ['policy'])"),
    ({"summaries": [{"text": " "}, {"text": " b"}]}, "summaries[0].text: is empty"),
    ({"choice": 2}, "choice: must be 0 or 1 (the index of the preferred summary), got 2"),
    ({"choice": True}, "choice: must be 0 or 1 (the index of the preferred summary), got True"),
    ({"choice": None}, "choice: is null"),
])
def test_a_malformed_comparison_is_a_located_error(changes, message):
    with pytest.raises(RecordProblem) as err:
        to_record(comparison(**changes), "tldr_comparisons", "c.jsonl:4", 1.0)
    assert str(err.value) == f"c.jsonl:4: {message}"
    assert err.value.invalid


def test_comparison_files_load_with_cnn_dm_articles_reported_not_failed(tok):
    cfg = DataConfig(max_length=640, max_prompt_length=560)
    pairs, report = data.load_pairs(FIXTURES / "tldr_comparisons_valid.jsonl", tok, cfg)
    path = FIXTURES / "tldr_comparisons_valid.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert (report.shape, report.records, report.used, report.invalid) == ("tldr_comparisons", 7, 6, 0)
    assert report.skipped == [f"{path}:4: info.post: is null: a CNN/DM article (info.article), not a TL;DR post"]
    first = rows[0]
    info, preferred = first["info"], first["summaries"][first["choice"]]["text"]
    assert tok.decode(pairs[0].prompt_ids) == (f"<bos>SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}"
                                               f"\n\nPOST: {info['post']}\n\nTL;DR:")
    assert tok.decode(pairs[0].chosen_ids) == preferred + "<eos>"


def test_a_filtered_tldr_post_is_sft_data_with_its_reference_summary(tok):
    row = {**POST, "summary": "My bread is flat."}
    assert detect_shape(row, "p:1") == "tldr"
    assert to_example(row, "tldr", "p:1", 1.0) == Example(QUERY, " My bread is flat.", "p:1")
    # copies that write the subreddit as "r/cooking" give the same query
    assert to_example({**row, "subreddit": "r/cooking"}, "tldr", "p:1", 1.0).prompt == QUERY
    with pytest.raises(RecordProblem, match=r"^p:2: summary: is null$"):
        to_example({**row, "summary": None}, "tldr", "p:2", 1.0)
    with pytest.raises(RecordProblem, match=r"^p:3: post: missing \(keys present"):
        to_example({k: v for k, v in row.items() if k != "post"}, "tldr", "p:3", 1.0)

    examples, report = sft.load_examples(FIXTURES / "tldr_filtered.jsonl", tok, DataConfig(max_length=640,
                                                                                            max_prompt_length=560))
    first = json.loads((FIXTURES / "tldr_filtered.jsonl").read_text().splitlines()[0])
    assert (report.shape, report.used) == ("tldr", 12)
    assert tok.decode(examples[0].prompt_ids).endswith(f"POST: {first['post']}\n\nTL;DR:")
    assert tok.decode(examples[0].response_ids) == " " + first["summary"] + "<eos>"
    # one response per prompt is no preference pair: a preference run says so, naming the place and the shape
    with pytest.raises(data.DataError, match=r"tldr_filtered.jsonl:1: shape 'tldr' holds one response per prompt, "
                       r"SFT data .* \(the TL;DR preference data is shape tldr_comparisons\)$"):
        data.load_pairs(FIXTURES / "tldr_filtered.jsonl", tok, DataConfig())


def test_hh_sft_trains_on_the_chosen_response_alone(tok):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: Four.",
           "rejected": "\n\nHuman: something else entirely"}
    # the rejected side is not read: a record DPO can't use is still a demonstration
    assert to_example(row, "hh", "h:1", 1.0) == Example(
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:", " Four.", "h:1")
    with pytest.raises(RecordProblem, match=r"^h:2: chosen: has no '\\n\\nAssistant:' turn$"):
        to_example({"chosen": "\n\nHuman: Hi", "rejected": "x"}, "hh", "h:2", 1.0)
    examples, report = sft.load_examples(FIXTURES / "hh_rlhf.jsonl", tok, DataConfig())
    pairs, pair_report = data.load_pairs(FIXTURES / "hh_rlhf.jsonl", tok, DataConfig())
    # the record whose responses are equal is skipped by DPO (no preference) but is a demonstration for SFT
    assert (report.used, pair_report.used, pair_report.reasons) == (16, 15, {"chosen == rejected": 1})
    assert [e.source for e in examples if e.source not in {p.source for p in pairs}] == [
        f"{FIXTURES / 'hh_rlhf.jsonl'}:15"]


def test_unpaired_and_completion_records_as_sft_data():
    assert detect_shape({"prompt": "p", "completion": "c"}, "u:1") == "completion"
    assert to_example({"prompt": "p", "completion": "c"}, "completion", "u:1", 1.0) == Example("p", "c", "u:1")
    assert to_example({"prompt": "p", "completion": "c", "label": True}, "unpaired", "u:2", 1.0).completion == "c"
    with pytest.raises(RecordProblem) as err:
        to_example({"prompt": "p", "completion": "c", "label": False}, "unpaired", "u:3", 1.0)
    assert not err.value.invalid and err.value.kind == "undesirable completion"


def test_data_check_reads_sft_data_as_the_examples_sft_trains_on(tok):
    text, status = check(str(FIXTURES / "tldr_filtered.jsonl"), tok, DataConfig(max_length=640,
                                                                               max_prompt_length=560))
    assert status == 0 and "shape tldr" in text and "12 read, 12 usable" in text and "completion" in text


def test_hub_subsets_reach_load_dataset_train_and_eval_apart(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load_dataset(path, split, **kwargs):  # stands in for the hub, which tests can't reach
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list([comparison()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(train="openai/summarize_from_feedback", subset="comparisons", eval="openai/other",
                     eval_split="validation", eval_subset="axis")
    pairs, report = data.load_pairs(cfg.train, tok, cfg)
    data.load_pairs(cfg.eval, tok, cfg, part="eval")
    data.load_pairs("someone/plain", tok, DataConfig())
    assert calls == [("openai/summarize_from_feedback", "train", {"name": "comparisons"}),
                     ("openai/other", "validation", {"name": "axis"}), ("someone/plain", "train", {})]
    assert report.shape == "tldr_comparisons" and tok.decode(pairs[0].prompt_ids) == "<bos>" + QUERY
