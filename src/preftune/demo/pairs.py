"""Preference pairs from scored samples: for each prompt, every two completions with different rewards make a
(chosen, rejected) pair, as in the DPO paper's IMDb setting (4 samples -> 6 pairs per prefix). Keeping the
pairs with the widest reward gaps first spends training steps on the clearest preferences."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from preftune.evaluate import Samples


def make_pairs(samples: Samples, rewards: Sequence[float], *, max_pairs_per_prompt: int = 6,
               min_gap: float = 0.0) -> list[dict]:
    """{"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"} records.

    Per prompt, candidate pairs are all 2-subsets of its completions whose rewards differ by more than
    `min_gap` (and whose texts differ); the `max_pairs_per_prompt` with the largest gaps are kept.
    """
    if len(rewards) != len(samples):
        raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
    n = samples.n_per_prompt
    records = []
    for p, prompt in enumerate(samples.prompts):
        idx = range(p * n, (p + 1) * n)
        candidates = []
        for i, j in itertools.combinations(idx, 2):
            if samples.completions[i].strip() == samples.completions[j].strip():
                continue
            if not samples.completions[i].strip() or not samples.completions[j].strip():
                continue
            gap = abs(rewards[i] - rewards[j])
            if gap > min_gap:
                hi, lo = (i, j) if rewards[i] > rewards[j] else (j, i)
                candidates.append((gap, hi, lo))
        candidates.sort(key=lambda c: -c[0])
        for _, hi, lo in candidates[:max_pairs_per_prompt]:
            records.append({"prompt": prompt, "chosen": samples.completions[hi],
                            "rejected": samples.completions[lo], "reward_chosen": float(rewards[hi]),
                            "reward_rejected": float(rewards[lo])})
    return records


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """One JSON object per line: the format `preftune train` reads (extra keys are ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
