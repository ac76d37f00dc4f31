import torch
import torch.nn.functional as F

from preftune import config
from preftune.data import collate, load_pairs
from preftune.logps import sequence_logps
from preftune.modeling import byte_tokenizer, load_model

from .conftest import EXAMPLE_PAIRS, TINY_ARCH


def naive_logps(model, ids: list[int], prompt_len: int) -> float:
    """One forward per response token over its exact prefix: no padding, no batching, no masking."""
    total = 0.0
    for t in range(prompt_len, len(ids)):
        logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
        total += F.log_softmax(logits, -1)[ids[t]].item()
    return total


def test_concatenated_forward_equals_naive_token_loop():
    tok = byte_tokenizer()
    model = load_model(config.ModelConfig(arch=TINY_ARCH, tokenizer="bytes"), tok, seed=3).eval()
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tok, config.DataConfig())
    pairs = pairs[:3]  # different lengths, so rows are padded
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, batch).halves()
        chunked_chosen, chunked_rejected = sequence_logps(model, batch, chunk_rows=1).halves()
    for i, p in enumerate(pairs):
        n = len(p.prompt_ids)
        assert abs(chosen.logps[i].item() - naive_logps(model, p.prompt_ids + p.chosen_ids, n)) < 1e-3
        assert abs(rejected.logps[i].item() - naive_logps(model, p.prompt_ids + p.rejected_ids, n)) < 1e-3
        assert chosen.lengths[i].item() == len(p.chosen_ids)
        assert rejected.lengths[i].item() == len(p.rejected_ids)
    # chunking rows of logits changes memory, not numbers
    assert torch.equal(chunked_chosen.logps, chosen.logps) and torch.equal(chunked_rejected.logps, rejected.logps)


def test_log_softmax_runs_in_float32_for_bf16_models():
    tok = byte_tokenizer()
    model = load_model(config.ModelConfig(arch=TINY_ARCH, tokenizer="bytes", dtype="bfloat16"), tok).eval()
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tok, config.DataConfig())
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs[:2], tok.pad_token_id))
    assert out.logps.dtype == torch.float32 and torch.isfinite(out.logps).all()
