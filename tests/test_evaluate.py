"""evaluate.py on a tiny random Llama + byte tokenizer: sampling, log-probs, KL, bootstrap, win rate."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune import config, evaluate, heldout
from preftune.modeling import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny_lm(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = ["a", "The film was", "xyz 123 long prompt here"]  # different lengths: left padding matters


def test_sample_shapes_grouping_and_seed(tok):
    model = tiny_lm(tok, 0)
    s = evaluate.sample(model, tok, PROMPTS, n_per_prompt=3, max_new_tokens=5, batch_size=4, seed=1,
                        progress=False)
    assert len(s) == 9 and s.n_per_prompt == 3 and [s.prompt_of(i) for i in (0, 2, 3, 8)] == [0, 0, 1, 2]
    assert all(1 <= len(c) <= 5 for c in s.completion_ids)
    for ids in s.completion_ids:  # nothing after an EOS, and EOS only last
        assert tok.eos_token_id not in ids[:-1]
        assert tok.pad_token_id not in ids or tok.pad_token_id == tok.eos_token_id
    again = evaluate.sample(model, tok, PROMPTS, n_per_prompt=3, max_new_tokens=5, batch_size=4, seed=1,
                            progress=False)
    assert again.completion_ids == s.completion_ids
    other = evaluate.sample(model, tok, PROMPTS, n_per_prompt=3, max_new_tokens=5, batch_size=4, seed=2,
                            progress=False)
    assert other.completion_ids != s.completion_ids


def test_greedy_batched_equals_one_at_a_time(tok):
    """Left padding must not change what a prompt generates (positions and masks handled)."""
    model = tiny_lm(tok, 0)
    batched = evaluate.sample(model, tok, PROMPTS, max_new_tokens=6, temperature=0, batch_size=8,
                              progress=False)
    for i, p in enumerate(PROMPTS):
        alone = evaluate.sample(model, tok, [p], max_new_tokens=6, temperature=0, progress=False)
        assert alone.completion_ids[0] == batched.completion_ids[i], p


def test_completion_logps_match_a_manual_forward(tok):
    model = tiny_lm(tok, 0)
    s = evaluate.sample(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=5, seed=0, progress=False)
    got = evaluate.completion_logps(model, s, batch_size=2, pad_id=tok.pad_token_id)
    for i in range(len(s)):
        prompt, completion = s.prompt_ids[s.prompt_of(i)], s.completion_ids[i]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logprobs = model(ids).logits[0].float().log_softmax(-1)  # (T, V)
        want = sum(logprobs[len(prompt) - 1 + t, tok_id].item() for t, tok_id in enumerate(completion))
        assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_sequence_kl_zero_for_same_model_and_positive_on_average_otherwise(tok):
    policy, reference = tiny_lm(tok, 0), tiny_lm(tok, 1)
    s = evaluate.sample(policy, tok, PROMPTS * 8, max_new_tokens=4, seed=0, progress=False)
    assert np.allclose(evaluate.sequence_kl(policy, policy, s, pad_id=tok.pad_token_id), 0.0)
    kl = evaluate.sequence_kl(policy, reference, s, pad_id=tok.pad_token_id)
    assert kl.shape == (len(s),)
    assert kl.mean() > 0  # a KL is non-negative; 24 samples of two random models differ clearly


def test_single_token_kl_estimate_matches_the_exact_kl(tok):
    """With one new token, E_pi[log pi - log ref] over many samples approaches the exact KL of the two
    next-token distributions: the estimator is unbiased."""
    policy, reference = tiny_lm(tok, 0), tiny_lm(tok, 1)
    n = 1000
    s = evaluate.sample(policy, tok, ["hi"], n_per_prompt=n, max_new_tokens=1, batch_size=1000, seed=0,
                        progress=False)
    estimate = evaluate.sequence_kl(policy, reference, s, batch_size=1000, pad_id=tok.pad_token_id)
    ids = torch.tensor([s.prompt_ids[0]])
    with torch.no_grad():
        logp = policy(ids).logits[0, -1].log_softmax(-1)
        logq = reference(ids).logits[0, -1].log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum().item()
    stderr = estimate.std() / math.sqrt(n)
    assert abs(estimate.mean() - exact) < 4 * stderr + 1e-3


def test_bootstrap_ci_hand_checks():
    est, low, high = evaluate.bootstrap_ci([2.0, 2.0, 2.0])
    assert (est, low, high) == (2.0, 2.0, 2.0)
    x = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    est, low, high = evaluate.bootstrap_ci(x)
    assert est == pytest.approx(x.mean())
    half = 1.96 * x.std() / math.sqrt(len(x))  # normal-theory interval for comparison
    assert low < est < high
    assert (high - low) == pytest.approx(2 * half, rel=0.15)
    assert evaluate.bootstrap_ci(x, seed=3) == evaluate.bootstrap_ci(x, seed=3)
    est, *_ = evaluate.bootstrap_ci([1.0, 5.0, 9.0], stat=lambda a: np.median(a, axis=-1))
    assert est == 5.0
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.bootstrap_ci([])


def test_win_rate_and_per_prompt_mean_by_hand():
    assert list(evaluate.per_prompt_mean([1, 3, 0, 0, 5, 7], 2)) == [2, 0, 6]
    with pytest.raises(ValueError, match="groups of 4"):
        evaluate.per_prompt_mean([1, 2, 3], 4)
    wins = evaluate.win_indicators([0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.5, 0.1])
    assert list(wins) == [1.0, 0.0, 0.5, 1.0]
    assert evaluate.win_rate([0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.5, 0.1])[0] == pytest.approx(0.625)


def test_compare_pairs_by_prompt():
    ref = np.array([0.1, 0.3, 0.5, 0.5])  # 2 prompts x 2 samples
    pol = np.array([0.5, 0.7, 0.4, 0.8])
    kl = np.array([1.0, 3.0, 2.0, 2.0])
    cmp = evaluate.compare(ref, pol, kl, n_per_prompt=2)
    assert cmp.reference_reward[0] == pytest.approx(0.35)
    assert cmp.policy_reward[0] == pytest.approx(0.6)
    assert cmp.reward_gain[0] == pytest.approx(0.25)
    assert cmp.win_rate[0] == pytest.approx(1.0)
    assert cmp.kl[0] == pytest.approx(2.0)
    assert cmp.num_prompts == 2 and cmp.as_dict()["reward_gain"][0] == pytest.approx(0.25)


class UnigramLM(torch.nn.Module):
    """A 'model' whose next-token distribution ignores the context: three tokens with fixed probabilities, so
    every sequence log-prob is a sum of known logs."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        logits = self.log_probs.expand(*input_ids.shape, 3)  # (B, T, 3): the same distribution at every position
        return types.SimpleNamespace(logits=logits)


A, B, C = 0, 1, 2  # the three tokens; prompt "token" 0 too, padding 0


def test_sequence_kl_and_the_in_training_kl_row_by_hand(monkeypatch):
    """policy p = (1/2, 1/4, 1/4), reference q = (1/4, 1/4, 1/2) over tokens (a, b, c). Per-sample log-ratios
    sum log p(y_t) - log q(y_t): [a, b] -> ln 2 + 0 = ln 2; [a] -> ln 2; [c] -> -ln 2; [b] -> 0.
    Prompt 0 has samples [a, b] and [a] (mean ln 2), prompt 1 has [c] and [b] (mean -ln 2 / 2); eval/kl is the
    mean over prompts with weight 1, here ln 2 / 4 (which is also the exact KL(p || q) of one token)."""
    policy, reference = UnigramLM([0.5, 0.25, 0.25]), UnigramLM([0.25, 0.25, 0.5])
    samples = evaluate.Samples(["p0", "p1"], 2, [[A], [A, B]], [[A, B], [A], [C], [B]], ["ab", "a", "c", "b"])
    kl = evaluate.sequence_kl(policy, reference, samples, batch_size=3, pad_id=0)
    ln2 = math.log(2)
    np.testing.assert_allclose(kl, [ln2, ln2, -ln2, 0.0], atol=1e-6)

    # the in-training path: sample -> sequence_kl -> per-prompt means -> weighted sums -> eval/kl
    monkeypatch.setattr(heldout, "sample", lambda *args, **kwargs: samples)
    ev = config.EvalConfig(n_per_prompt=2, batch_size=3)
    tokenizer = types.SimpleNamespace(pad_token_id=0)

    def eval_kl(weights: list[float]) -> float:
        sums = heldout.kl_sums(policy, policy, reference, tokenizer, samples.prompts, torch.tensor(weights), ev,
                               synced_gpus=False, device="cpu")
        return heldout.eval_row(torch.ones(len(heldout.PAIR_KEYS) + 1), sums)["eval/kl"]

    assert eval_kl([1.0, 1.0]) == pytest.approx(ln2 / 4, abs=1e-6)
    assert eval_kl([1.0, 0.0]) == pytest.approx(ln2, abs=1e-6)  # a padding copy (weight 0) counts for nothing
