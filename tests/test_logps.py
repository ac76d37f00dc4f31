import torch
import torch.nn.functional as F

from preftune import config
from preftune.data import collate, load_pairs
from preftune.logps import sequence_logps
from preftune.losses import dpo, pair_logps
from preftune.modeling import byte_tokenizer, load_model
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, TINY_ARCH, read_metrics, tiny_config


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


def test_bf16_model_log_probs_and_dpo_loss_match_float32():
    """A bf16 model's log-probs and DPO loss equal those of the same weights in fp32, within what rounding the
    weights to bf16 costs, because the log-softmax runs in fp32.

    Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3), so rounded weights move each
    token's log-prob by ~1e-4 to 1e-3; summed over a response of ~40 tokens that is <= 1e-2 (measured: 7.3e-3
    on sums of ~-200, the DPO margin h within 1e-2, the loss within 4e-5). Asserted: log-probs within 0.02,
    h within 0.03, loss within 1e-3. A log-softmax run in bf16 rounds each token's log-prob (~-5.5, where bf16's
    spacing is 2^-5) and was measured 0.13 off: six times the tolerance."""
    tok = byte_tokenizer()
    pairs, _ = load_pairs(EXAMPLE_PAIRS, tok, config.DataConfig())
    batch = collate(pairs[:8], tok.pad_token_id)

    def models(dtype: str):
        cfg = config.ModelConfig(arch=TINY_ARCH, tokenizer="bytes", dtype=dtype)
        return load_model(cfg, tok, seed=3).eval(), load_model(cfg, tok, seed=4).eval()  # policy, reference

    results = {}
    for dtype in ("float32", "bfloat16"):
        policy, reference = models(dtype)
        assert next(policy.parameters()).dtype == getattr(torch, dtype)
        with torch.no_grad():
            policy_rows, ref_rows = sequence_logps(policy, batch), sequence_logps(reference, batch)
        lp = pair_logps(*policy_rows.halves(), *ref_rows.halves())
        results[dtype] = (policy_rows.logps, lp.chosen_logratios() - lp.rejected_logratios(),
                          dpo(lp, beta=0.1).losses.mean())
    (logps32, h32, loss32), (logps16, h16, loss16) = results["float32"], results["bfloat16"]
    torch.testing.assert_close(logps16.float(), logps32, rtol=0, atol=0.02)
    torch.testing.assert_close(h16.float(), h32, rtol=0, atol=0.03)
    assert abs(loss16.item() - loss32.item()) < 1e-3
    assert logps16.dtype == torch.float32  # the sums come back in fp32 whatever the weights' dtype


def test_bf16_training_follows_the_float32_run(tmp_path):
    """Eight DPO steps with bf16 weights track the fp32 run of the same seed and data. Measured: loss rows
    within 1.1e-3, logps/chosen within 0.033 (bf16 weights round every AdamW update at 2^-9 relative, so the
    runs drift apart slowly). Asserted: loss within 5e-3, logps/chosen within 0.1, and the bf16 run learns."""
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(tmp_path, model={"dtype": dtype}, train={"max_steps": 8, "run_name": dtype})
        rows[dtype] = read_metrics(train(cfg))
    for r32, r16 in zip(rows["float32"], rows["bfloat16"], strict=True):
        assert abs(r16["loss"] - r32["loss"]) < 5e-3, r16["step"]
        assert abs(r16["logps/chosen"] - r32["logps/chosen"]) < 0.1, r16["step"]
    assert rows["bfloat16"][-1]["loss"] < rows["bfloat16"][0]["loss"] - 0.15
