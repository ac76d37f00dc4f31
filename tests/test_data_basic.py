import json

import pytest

from preftune import config
from preftune.data import IGNORE, DataError, PairRecord, batch_stream, collate, load_pairs, read_jsonl, tokenize_pair
from preftune.modeling import byte_tokenizer

from .conftest import EXAMPLE_PAIRS


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path, lines: list[str]):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', "d.jsonl:2: rejected: missing"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "d.jsonl:2: rejected: must be a string or a list of messages, "
                                                       "got int"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "d.jsonl:2: chosen: is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "d.jsonl:2: record: not valid JSON"),
    ('["a", "b"]', "d.jsonl:2: record: expected an object, got list"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    with pytest.raises(DataError) as err:
        read_jsonl(write(tmp_path, [good, line]))
    assert message in str(err.value)


def test_cli_reports_malformed_jsonl_without_traceback(tmp_path, capsys):
    from preftune.cli import main

    path = write(tmp_path, ['{"prompt": "p", "chosen": "c", "rejected": "r"}', '{"prompt": "p", "chosen": 1}'])
    code = main(["train", "configs/tiny.yaml", f"data.train={path}", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:2: chosen: must be a string" in err and "Traceback" not in err


def test_response_labels_bos_and_eos(tok):
    cfg = config.DataConfig()
    pair, truncated = tokenize_pair(PairRecord("Rate it: ", "good", "bad", "x:1"), tok, cfg)
    assert not truncated
    # the prompt keeps its trailing space as its own token: it is a prefix, nothing merged across the boundary
    assert tok.decode(pair.prompt_ids, skip_special_tokens=True) == "Rate it: "
    assert pair.prompt_ids.count(tok.bos_token_id) == 1 and pair.prompt_ids[0] == tok.bos_token_id
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.chosen_ids.count(tok.eos_token_id) == 1
    assert tok.decode(pair.chosen_ids[:-1]) == "good"
    # a response that already ends in EOS gets no second one; a prompt that starts with BOS text gets no second
    pair2, _ = tokenize_pair(PairRecord("<bos>Rate it: ", "good<eos>", "bad", "x:2"), tok, cfg)
    assert pair2.chosen_ids == pair.chosen_ids and pair2.prompt_ids == pair.prompt_ids

    batch = collate([pair], pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] == 2  # chosen row, rejected row
    for row, response in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
        labelled = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert labelled == response
        n = len(pair.prompt_ids)
        assert batch.input_ids[row, :n].tolist() == pair.prompt_ids
        assert (batch.labels[row, :n] == IGNORE).all()
    assert batch.attention_mask[1].sum() == len(pair.prompt_ids) + len(pair.rejected_ids)


@pytest.mark.parametrize("mode, kept", [("keep_end", "6789"), ("keep_start", "<bos>012")])
def test_truncation_keeps_the_documented_end_of_the_prompt(tok, mode, kept):
    cfg = config.DataConfig(max_length=10, max_prompt_length=4, prompt_truncation=mode)
    pair, truncated = tokenize_pair(PairRecord("0123456789", "abcdefghij", "xy", "x:1"), tok, cfg)
    assert truncated
    assert tok.decode(pair.prompt_ids) == kept
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 10
    assert len(pair.rejected_ids) == 3  # short response untouched: "xy" + EOS


def test_identical_pairs_are_reported_not_silently_dropped(tmp_path, tok):
    path = write(tmp_path, [json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
                            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})])
    pairs, report = load_pairs(path, tok, config.DataConfig())
    assert len(pairs) == 1 and report.records == 2 and report.used == 1
    assert report.skipped == [f"{path}:1: chosen: equals 'rejected': no preference"]


def test_batch_stream_is_deterministic_complete_and_resumable():
    lengths = [5, 50, 7, 70, 9, 90, 11, 13, 100, 3]
    first = batch_stream(lengths, 4, seed=1, group_by_length=True)
    batches = [next(first) for _ in range(10)]  # 40 indices = 4 epochs of 10
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    for epoch in range(4):
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == list(range(10))  # every pair, once per epoch
    resumed = batch_stream(lengths, 4, seed=1, group_by_length=True, start=6)
    assert [next(resumed) for _ in range(4)] == batches[6:]
    other_seed = batch_stream(lengths, 4, seed=2, group_by_length=True)
    assert [next(other_seed) for _ in range(10)] != batches


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(512)]

    def padding(group: bool) -> int:
        stream = batch_stream(lengths, 8, seed=0, group_by_length=group)
        return sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b)
                   for b in (next(stream) for _ in range(64)))

    assert padding(True) < 0.2 * padding(False)


def test_example_file_loads(tok):
    pairs, report = load_pairs(EXAMPLE_PAIRS, tok, config.DataConfig())
    assert report.used == 16 and not report.skipped
