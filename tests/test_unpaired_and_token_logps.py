"""KTO's unpaired reader and mismatched rows; per-token log-probs for LD-DPO and WPO."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import config, data
from preftune.logps import sequence_logps
from preftune.modeling import byte_tokenizer, load_model

from .conftest import EXAMPLE_PAIRS, TINY_ARCH


def test_read_unpaired_errors_name_line_and_field(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b", "label": "yes"}) + "\n")
    with pytest.raises(data.DataError, match=r"u.jsonl:2: label: must be true or false, got 'yes'"):
        data.read_unpaired_jsonl(path)
    path.write_text(json.dumps({"prompt": "a", "label": False}) + "\n")
    with pytest.raises(data.DataError, match=r"u.jsonl:1: completion: missing"):
        data.read_unpaired_jsonl(path)


def test_collate_unpaired_and_mismatched_rows():
    tok = byte_tokenizer()
    examples = [data.TokenizedUnpaired([1, 2], [10, 11, 12], True, "a"),
                data.TokenizedUnpaired([3], [20], False, "b"),
                data.TokenizedUnpaired([4, 5, 6], [30, 31], True, "c")]
    batch = data.collate_unpaired(examples, tok.pad_token_id)
    assert batch.desirable.tolist() == [True, False, True]
    assert batch.matched.input_ids[1, :2].tolist() == [3, 20]
    previous = examples[-1:] + examples[:-1]  # the loop's pairing: prompt k with completion k-1, cyclically
    mismatched = data.collate_mismatched(examples, previous, tok.pad_token_id, max_length=5)
    ids, labels = mismatched.input_ids, mismatched.labels
    assert ids[0, :4].tolist() == [1, 2, 30, 31] and labels[0, :4].tolist() == [-100, -100, 30, 31]
    assert ids[1, :4].tolist() == [3, 10, 11, 12]
    assert ids[2].tolist() == [4, 5, 6, 20] and labels[2, 3].item() == 20
    assert mismatched.sources == ["a", "b", "c"]
    # a mismatched row longer than max_length loses completion tokens, keeping at least one
    short = data.collate_mismatched(examples, previous, tok.pad_token_id, max_length=3).input_ids
    assert short[0, :3].tolist() == [1, 2, 30] and short[1, :3].tolist() == [3, 10, 11]
    assert short[2].tolist() == [4, 5, 6, 20]


def test_token_logps_and_squared_mass_match_a_direct_computation():
    tok = byte_tokenizer()
    cfg = config.ModelConfig(arch=dict(TINY_ARCH), tokenizer="bytes")
    model = load_model(cfg, tok).eval()
    pairs, _ = data.load_pairs(EXAMPLE_PAIRS, tok, config.DataConfig(max_length=128, max_prompt_length=64))
    batch = data.collate(pairs[:3], tok.pad_token_id)
    with torch.no_grad():
        plain = sequence_logps(model, batch)
        full = sequence_logps(model, batch, with_tokens=True, with_sq_mass=True)
        chunked = sequence_logps(model, batch, chunk_rows=2, with_tokens=True, with_sq_mass=True)
        probs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double().softmax(-1)
    assert plain.token_logps is None and plain.token_log_sq_mass is None
    torch.testing.assert_close(full.token_logps.sum(-1), plain.logps)
    mask = batch.labels[:, 1:] != data.IGNORE
    assert torch.equal(full.token_mask, mask)
    direct = (probs[:, :-1] ** 2).sum(-1).log() * mask  # (2B, T-1)
    torch.testing.assert_close(full.token_log_sq_mass.double(), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.token_log_sq_mass, full.token_log_sq_mass)
    chosen, rejected = full.halves()
    assert chosen.token_logps.shape[0] == 3 and torch.equal(rejected.token_mask, mask[3:])
