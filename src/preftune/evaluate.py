"""Held-out evaluation of a policy against its reference: sampling, sequence-level KL, bootstrap
intervals and win rates. Model-agnostic: any HF causal LM + tokenizer, any reward function on text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from preftune.data import IGNORE, Batch, encode_prompt
from preftune.logps import sequence_logps


@dataclass
class Samples:
    """Completions sampled for a list of prompts, `n_per_prompt` each, grouped by prompt (sample i belongs
    to prompt i // n_per_prompt). The token ids are kept: re-tokenising decoded text need not give them back,
    and log-probs (KL) must be of exactly the tokens that were sampled."""

    prompts: list[str]  # (P,)
    n_per_prompt: int
    prompt_ids: list[list[int]]  # (P,) as `preftune train` encodes prompts
    completion_ids: list[list[int]]  # (P * n,) sampled tokens, up to and including EOS if one was sampled
    completions: list[str]  # (P * n,) decoded, special tokens dropped

    def prompt_of(self, i: int) -> int:
        return i // self.n_per_prompt

    def __len__(self) -> int:
        return len(self.completion_ids)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], *, n_per_prompt: int = 1, max_new_tokens: int = 24,
           temperature: float = 1.0, batch_size: int = 64, seed: int = 0, progress: bool = True,
           desc: str = "sample", top_p: float = 1.0, synced_gpus: bool = False,
           prompt_ids: Sequence[list[int]] | None = None) -> Samples:
    """Sample `n_per_prompt` completions of up to `max_new_tokens` for every prompt (pure ancestral sampling:
    no top-k/top-p, so the samples follow the model's distribution and the KL estimate below is unbiased).

    temperature 0 means greedy decoding. Rows are left-padded; generation stops early once every row of a
    batch has sampled EOS. top_p < 1 samples from the nucleus only (a KL from such samples is biased).
    synced_gpus keeps every process stepping until all are done: under FSDP each forward is a collective.
    `prompt_ids`: the prompts already encoded (e.g. rendered with a chat template); default: encode `prompts`.
    """
    was_training = model.training
    model.eval()
    prompt_ids = [list(ids) for ids in prompt_ids] if prompt_ids is not None else \
        [encode_prompt(tokenizer, p) for p in prompts]
    rows = [ids for ids in prompt_ids for _ in range(n_per_prompt)]  # (P * n,)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completion_ids: list[list[int]] = []
    bar = tqdm(total=len(rows), desc=desc, unit="seq", disable=not progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (b, T) left-padded
        attention_mask = torch.zeros_like(input_ids)
        for r, ids in enumerate(chunk):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention_mask[r, width - len(ids):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p} \
            if temperature > 0 else {"do_sample": False}
        device = next(model.parameters()).device
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens,
                             min_new_tokens=1, pad_token_id=pad, eos_token_id=eos, use_cache=True,
                             synced_gpus=synced_gpus, **sampling)  # (b, T + new)
        for row in out[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]  # keep the EOS: ending is a choice the policy made
            completion_ids.append(row)
        bar.update(len(chunk))
    bar.close()
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Samples(list(prompts), n_per_prompt, prompt_ids, completion_ids, texts)


@torch.no_grad()
def completion_logps(model, samples: Samples, *, batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """log p(completion | prompt) under `model` for every sample: (N,) float32 sums over completion tokens."""
    was_training = model.training
    model.eval()
    rows = [(samples.prompt_ids[samples.prompt_of(i)], c) for i, c in enumerate(samples.completion_ids)]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (b, T) right-padded
        labels = torch.full_like(input_ids, IGNORE)
        attention_mask = torch.zeros_like(input_ids)
        for r, (p, c) in enumerate(chunk):
            input_ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            labels[r, len(p):len(p) + len(c)] = torch.tensor(c)
            attention_mask[r, :len(p) + len(c)] = 1
        batch = Batch(input_ids, attention_mask, labels, [""] * len(chunk))
        out.append(sequence_logps(model, batch.to(next(model.parameters()).device)).logps.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def sequence_kl(policy, reference, samples: Samples, *, batch_size: int = 64, pad_id: int = 0) -> np.ndarray:
    """Per-sample log pi(y|x) - log pi_ref(y|x) for completions y sampled from the policy: (N,).

    Its mean is the Monte-Carlo estimate of the sequence-level KL(pi || pi_ref) that the DPO paper's
    reward-vs-KL frontier uses (Rafailov et al. 2023, section 6.1); single terms may be negative, the
    expectation is not.
    """
    policy_logps = completion_logps(policy, samples, batch_size=batch_size, pad_id=pad_id)
    ref_logps = completion_logps(reference, samples, batch_size=batch_size, pad_id=pad_id)
    return (policy_logps - ref_logps).numpy()


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0, stat: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic (default: mean) and its percentile bootstrap interval.

    Resample the values you want to treat as independent: for paired comparisons, pass the per-prompt
    differences so the interval accounts for prompts shared by both sides.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array of values, got shape {x.shape}")
    stat = stat or (lambda a: a.mean(axis=-1))
    rng = np.random.default_rng(seed)
    resamples = x[rng.integers(0, len(x), size=(n_boot, len(x)))]  # (n_boot, n)
    boots = stat(resamples)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(stat(x[None])[0]), float(low), float(high)


def per_prompt_mean(values: Sequence[float] | np.ndarray, n_per_prompt: int) -> np.ndarray:
    """Average consecutive groups of `n_per_prompt` per-sample values: (P * n,) -> (P,)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) % n_per_prompt:
        raise ValueError(f"{len(x)} values do not split into groups of {n_per_prompt}")
    return x.reshape(-1, n_per_prompt).mean(axis=1)


def win_indicators(policy_scores: Sequence[float] | np.ndarray,
                   reference_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per prompt: 1 if the policy's score beats the reference's, 0.5 for a tie, 0 otherwise: (P,)."""
    p, r = np.asarray(policy_scores, dtype=np.float64), np.asarray(reference_scores, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"policy and reference scores differ in shape: {p.shape} vs {r.shape}")
    return (p > r) + 0.5 * (p == r)


def win_rate(policy_scores: Sequence[float] | np.ndarray, reference_scores: Sequence[float] | np.ndarray,
             **bootstrap) -> tuple[float, float, float]:
    """Fraction of prompts on which the policy beats the reference (ties half) with a bootstrap interval."""
    return bootstrap_ci(win_indicators(policy_scores, reference_scores), **bootstrap)


@dataclass
class Comparison:
    """Policy vs reference on the same held-out prompts under one reward function."""

    reference_reward: tuple[float, float, float]  # (mean, low, high) over prompts
    policy_reward: tuple[float, float, float]
    reward_gain: tuple[float, float, float]  # paired: per-prompt policy minus reference
    win_rate: tuple[float, float, float]
    kl: tuple[float, float, float]  # sequence-level KL(policy || reference), nats per completion
    num_prompts: int
    n_per_prompt: int

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


def compare(reference_rewards: np.ndarray, policy_rewards: np.ndarray, kl_per_sample: np.ndarray,
            n_per_prompt: int, *, level: float = 0.95, seed: int = 0) -> Comparison:
    """Summaries with bootstrap intervals; all three inputs are per sample, grouped by prompt in order."""
    ref_p = per_prompt_mean(reference_rewards, n_per_prompt)
    pol_p = per_prompt_mean(policy_rewards, n_per_prompt)
    kl_p = per_prompt_mean(kl_per_sample, n_per_prompt)
    ci = {"level": level, "seed": seed}
    return Comparison(
        reference_reward=bootstrap_ci(ref_p, **ci), policy_reward=bootstrap_ci(pol_p, **ci),
        reward_gain=bootstrap_ci(pol_p - ref_p, **ci), win_rate=win_rate(pol_p, ref_p, **ci),
        kl=bootstrap_ci(kl_p, **ci), num_prompts=len(ref_p), n_per_prompt=n_per_prompt)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all n-grams of all `texts` together; 1.0 when no
    n-gram repeats, lower when a model says the same things over and over. 0.0 when there is no n-gram at all."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Quality:
    """How a model's held-out samples read, beside their reward: what reward hacking shows up in."""

    reference_nll: float  # the reference's mean NLL per completion token, nats: off-topic or broken text is high
    distinct_2: float  # diversity of the completions (distinct_n)
    tokens: float  # mean completion length, tokens

    def as_dict(self) -> dict:
        return dict(vars(self))


def quality(samples: Samples, reference_logps: Sequence[float] | np.ndarray) -> Quality:
    """`reference_logps`: log pi_ref(y|x) of each sample (completion_logps of the reference), (N,)."""
    lengths = np.array([len(ids) for ids in samples.completion_ids], dtype=np.float64)  # (N,)
    logps = np.asarray(reference_logps, dtype=np.float64)
    if logps.shape != lengths.shape:
        raise ValueError(f"{logps.shape} reference log-probs for {len(lengths)} samples")
    return Quality(reference_nll=float(-logps.sum() / max(lengths.sum(), 1.0)),
                   distinct_2=distinct_n(samples.completions, 2), tokens=float(lengths.mean()))
