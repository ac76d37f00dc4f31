"""Each supported record shape and source format, on a small fixture written in that shape."""

from __future__ import annotations

import csv
import json

import pytest

from preftune import data
from preftune.config import DataConfig
from preftune.modeling import byte_tokenizer

from .conftest import EXAMPLE_PAIRS, FIXTURES

# a ChatML template for the byte tokenizer (it has none of its own)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_standard_text_pairs(tok):
    pairs, report = data.load_pairs(EXAMPLE_PAIRS, tok, DataConfig())
    first = json.loads(EXAMPLE_PAIRS.read_text().splitlines()[0])
    assert (report.shape, report.records, report.used, report.skipped) == ("pairs", 16, 16, [])
    assert text_of(tok, pairs[0].prompt_ids) == "<bos>" + first["prompt"]
    assert text_of(tok, pairs[0].chosen_ids) == first["chosen"] + "<eos>"
    assert text_of(tok, pairs[0].rejected_ids) == first["rejected"] + "<eos>"
    assert pairs[0].source == f"{EXAMPLE_PAIRS}:1"


def test_conversational_pairs_render_with_the_chat_template(smollm2):
    pairs, report = data.load_pairs(FIXTURES / "conversational.jsonl", smollm2, DataConfig())
    rows = [json.loads(line) for line in (FIXTURES / "conversational.jsonl").read_text().splitlines()]
    assert (report.shape, report.used) == ("pairs", 3)
    for pair, row in zip(pairs, rows, strict=True):
        as_turn = (lambda v: [{"role": "assistant", "content": v}] if isinstance(v, str) else v)  # noqa: E731
        want_prompt = smollm2.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        assert pair.prompt_ids == want_prompt
        for ids, response in ((pair.chosen_ids, row["chosen"]), (pair.rejected_ids, row["rejected"])):
            full = smollm2.apply_chat_template(row["prompt"] + as_turn(response))["input_ids"]
            # the template ends the turn with "<|im_end|>\n": the newline after the EOS is not trained on
            assert full[-2:] == [smollm2.eos_token_id, *smollm2.encode("\n", add_special_tokens=False)]
            assert pair.prompt_ids + ids == full[:-1]
    multi_turn = smollm2.decode(pairs[1].prompt_ids)
    assert "Answer briefly." in multi_turn and "7." in multi_turn and multi_turn.endswith("<|im_start|>assistant\n")


def test_implicit_prompt_is_the_shared_start(tok):
    cfg = DataConfig(chat_template=CHATML)
    pairs, report = data.load_pairs(FIXTURES / "implicit.jsonl", tok, cfg)
    assert (report.shape, report.used) == ("implicit", 2)
    chat, text = pairs[0], pairs[1]
    assert text_of(tok, chat.prompt_ids) == "<|im_start|>user\nIs water wet?<eos>\n<|im_start|>assistant\n"
    assert text_of(tok, chat.chosen_ids) == "It makes things wet.<eos>"
    assert text_of(tok, chat.rejected_ids) == "No idea.<eos>"
    # texts: the shared "Q: 2+2? A: " backs off to before the space, so each response starts " 4" / " 5"
    assert text_of(tok, text.prompt_ids) == "<bos>Q: 2+2? A:"
    assert (text_of(tok, text.chosen_ids), text_of(tok, text.rejected_ids)) == (" 4<eos>", " 5<eos>")


def test_anthropic_hh_text(tok):
    with pytest.raises(data.DataError, match="hh.jsonl:2: rejected: does not start with the same conversation"):
        data.load_pairs(FIXTURES / "hh.jsonl", tok, DataConfig())
    pairs, report = data.load_pairs(FIXTURES / "hh.jsonl", tok, DataConfig(skip_invalid=True))
    assert (report.shape, report.records, report.used, report.invalid) == ("hh", 2, 1, 1)
    prompt = text_of(tok, pairs[0].prompt_ids)
    assert prompt.startswith("<bos>\n\nHuman: Hi") and prompt.endswith("\n\nHuman: Sourdough.\n\nAssistant:")
    assert text_of(tok, pairs[0].chosen_ids) == " Start with an active starter.<eos>"
    assert text_of(tok, pairs[0].rejected_ids) == " Buy some at a shop.<eos>"
    assert report.skipped == [f"{FIXTURES / 'hh.jsonl'}:2: rejected: does not start with the same conversation "
                              "as 'chosen'"]


SHP_FIELDS = {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B",
              "score_a": "score_A", "score_b": "score_B"}


def test_scored_pairs_keep_those_above_the_score_ratio(tok):
    path = FIXTURES / "shp.jsonl"
    pairs, report = data.load_pairs(path, tok, DataConfig(fields=SHP_FIELDS, min_score_ratio=2.0))
    assert (report.shape, report.records, report.used) == ("scored", 4, 2)
    # 12 vs 3 (ratio 4): A chosen; 9 vs 0 (ratio inf): A chosen; 4 vs 5 (1.25) and the 2-2 tie left out
    assert [text_of(tok, p.chosen_ids) for p in pairs] == [
        "Try Middlemarch; slow but rewarding.<eos>", "Patch the tube after finding the hole in water.<eos>"]
    assert report.skipped == [f"{path}:2: score_b: score ratio 1.25 < data.min_score_ratio 2",
                              f"{path}:4: score_b: ties score_a (2): no preference"]
    assert report.invalid == 0  # left out by a setting, not defects
    pairs, report = data.load_pairs(path, tok, DataConfig(fields=SHP_FIELDS, min_score_ratio=1.0))
    assert report.used == 3 and text_of(tok, pairs[1].chosen_ids).startswith("Tea, obviously")


def test_unpaired_binary_feedback(tok):
    cfg = DataConfig(chat_template=CHATML)
    records, report = data.load_unpaired(FIXTURES / "unpaired_mixed.jsonl", tok, cfg)
    assert (report.shape, report.used) == ("unpaired", 3)
    assert [r.desirable for r in records] == [True, False, True]
    assert text_of(tok, records[1].completion_ids) == "Weather is weather.<eos>"
    assert text_of(tok, records[2].prompt_ids) == "<|im_start|>user\nGreet me.<eos>\n<|im_start|>assistant\n"
    with pytest.raises(data.DataError, match="unpaired"):
        data.load_pairs(FIXTURES / "unpaired_mixed.jsonl", tok, cfg)
    assert [r.label for r in data.read_unpaired_jsonl(FIXTURES / "unpaired_mixed.jsonl")] == [True, False, True]
    with pytest.raises(data.DataError, match=r"pairs.jsonl:1: completion: missing"):
        data.read_unpaired_jsonl(EXAMPLE_PAIRS)
    # paired data feeds the same reader: chosen is desirable, rejected undesirable
    records, _ = data.load_unpaired(EXAMPLE_PAIRS, tok, cfg)
    assert len(records) == 32 and [r.desirable for r in records[:2]] == [True, False]
    assert records[0].prompt_ids == records[1].prompt_ids


def test_field_mapping_reads_other_column_names(tok):
    path = FIXTURES / "stack_mapped.csv"
    fields = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    pairs, report = data.load_pairs(path, tok, DataConfig(fields=fields))
    assert (report.shape, report.used) == ("pairs", 2)
    assert text_of(tok, pairs[1].prompt_ids) == "<bos>What does git rebase do?"
    assert text_of(tok, pairs[1].rejected_ids) == "It deletes your branch.<eos>"
    assert pairs[1].source == f"{path}:3"
    with pytest.raises(data.DataError, match=r"can't tell the data shape.*'question'.*data.fields"):
        data.load_pairs(path, tok, DataConfig())


def write_formats(tmp_path, rows: list[dict]) -> dict[str, str]:
    """The same rows as JSONL, a JSON array, a JSON object, Parquet, CSV and a saved HF dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {fmt: str(tmp_path / f"pairs.{fmt}") for fmt in ("jsonl", "json", "parquet", "csv")}
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["object.json"] = str(FIXTURES / "pairs_object.json")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "test": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "hf"))
    paths["datasets"] = str(tmp_path / "hf")
    return paths


def test_every_format_gives_the_same_pairs(tmp_path, tok):
    rows = [json.loads(line) for line in EXAMPLE_PAIRS.read_text().splitlines()][:4]
    expected, _ = data.load_pairs(EXAMPLE_PAIRS, tok, DataConfig(max_samples=4))
    for fmt, path in write_formats(tmp_path, rows).items():
        pairs, report = data.load_pairs(path, tok, DataConfig())
        assert report.records == 4, fmt
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [
            (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected], fmt
    assert pairs[3].source == f"{tmp_path / 'hf'}[train]:4"
    test_pairs, _ = data.load_pairs(tmp_path / "hf", tok, DataConfig(split="test"))
    assert len(test_pairs) == 2
    with pytest.raises(data.DataError, match=r"no split 'validation'; the splits are \['test', 'train'\]"):
        data.load_pairs(tmp_path / "hf", tok, DataConfig(split="validation"))


def test_csv_cells_holding_messages_are_conversations(tmp_path, tok):
    path = tmp_path / "chat.csv"
    prompt = json.dumps([{"role": "user", "content": "Hi"}])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], [prompt, "Hello!", "Go away."]])
    pairs, _ = data.load_pairs(path, tok, DataConfig(chat_template=CHATML))
    assert text_of(tok, pairs[0].prompt_ids) == "<|im_start|>user\nHi<eos>\n<|im_start|>assistant\n"


def test_max_samples_stops_reading_and_says_so(tok):
    pairs, report = data.load_pairs(EXAMPLE_PAIRS, tok, DataConfig(max_samples=5))
    assert (len(pairs), report.records, report.max_samples_reached) == (5, 5, True)
    assert "stopped at data.max_samples" in report.summary()


def test_eval_fraction_splits_by_content(tmp_path, tok):
    rows = [json.loads(line) for line in EXAMPLE_PAIRS.read_text().splitlines()]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows))  # every record twice
    cfg = DataConfig(eval_fraction=0.3)
    train, train_report = data.load_pairs(path, tok, cfg, part="train")
    held, held_report = data.load_pairs(path, tok, cfg, part="eval")
    assert len(train) + len(held) == 32 and len(train) > 0 and len(held) > 0
    assert train_report.held_out == len(held) and held_report.held_out == len(train)
    # a record and its duplicate (16 lines later) always fall on the same side
    line = lambda p: int(p.source.rsplit(":", 1)[1])  # noqa: E731
    train_lines = {line(p) for p in train}
    assert all((n + 16 in train_lines) for n in train_lines if n <= 16)
    assert train_report.duplicates == len(train) // 2


def test_drop_long_drops_and_reports(tok):
    cfg = DataConfig(max_length=60, max_prompt_length=20, drop_long=True)
    pairs, report = data.load_pairs(EXAMPLE_PAIRS, tok, cfg)
    truncating, _ = data.load_pairs(EXAMPLE_PAIRS, tok, DataConfig(max_length=60, max_prompt_length=20))
    assert 0 < report.reasons["too long"] < 16 and len(pairs) + report.reasons["too long"] == 16
    assert report.skipped[0].endswith("tokens > data.max_length 60 (data.drop_long)")
    assert report.truncated == 0 and len(truncating) == 16
    assert all(p.length <= 60 for p in pairs)


def test_hub_names_go_through_datasets_load_dataset(monkeypatch, tok):
    import datasets

    rows = [json.loads(line) for line in EXAMPLE_PAIRS.read_text().splitlines()][:3]
    calls = []

    def fake_load_dataset(name, split):  # stands in for the hub, which tests can't reach
        calls.append((name, split))
        if name != "someone/prefs":
            raise ConnectionError(f"Couldn't reach {name!r} on the Hub")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = data.load_pairs("someone/prefs", tok, DataConfig(split="train_prefs"))
    assert calls == [("someone/prefs", "train_prefs")] and report.used == 3
    assert pairs[2].source == "someone/prefs[train_prefs]:3"
    with pytest.raises(data.DataError, match=r"^other/missing: can't open as a HF dataset \(ConnectionError"):
        data.load_pairs("other/missing", tok, DataConfig())


def test_chat_template_from_a_file(tmp_path, tok):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    pairs, _ = data.load_pairs(FIXTURES / "implicit.jsonl", tok, DataConfig(chat_template=str(template)))
    assert text_of(tok, pairs[0].chosen_ids) == "It makes things wet.<eos>"
    with pytest.raises(data.DataError, match="neither a Jinja template nor a file"):
        data.load_pairs(FIXTURES / "implicit.jsonl", tok, DataConfig(chat_template=str(tmp_path / "nope.jinja")))
