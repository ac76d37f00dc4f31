"""How a round's scored samples become training data: pairs for the paired losses, desirable and undesirable
single completions for the unpaired ones (KTO). Pure functions of (prompts, completions, scores); every sample
that trains on nothing is counted under one named reason, and the counts go into the round's record.

Sample i belongs to prompt i // k; a NaN score is a sample the judge could not score.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from preftune.data.records import Text

# --- pairs: best_worst, all_pairs, disjoint ---

@dataclasses.dataclass
class PairCounts:
    """What became of a round's candidate pairs: built, or dropped for one named reason."""

    built: int = 0
    ties: int = 0
    """scores within iterate.margin of each other: no preference to learn"""
    identical: int = 0
    """the two texts are the same (after stripping whitespace)"""
    empty: int = 0
    """samples with an empty completion (left out of every pair)"""
    unscored: int = 0
    """samples the judge could not score (left out of every pair)"""
    over_cap: int = 0
    """all_pairs, disjoint: candidates past iterate.max_pairs_per_prompt"""
    prompts_without_pair: int = 0


def make_pairs(prompts: Sequence[Text], completions: Sequence[str], scores: Sequence[float], k: int, *,
               rule: str = "best_worst", margin: float = 0.0, max_per_prompt: int = 0
               ) -> tuple[list[dict], PairCounts]:
    """Pairs {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} from k scored samples per prompt
    (sample i belongs to prompt i // k; a NaN score is a sample the judge could not score).

    best_worst: per prompt the highest-scored sample against the lowest (the first of equals), if their gap
    exceeds `margin`. all_pairs: every two samples whose gap exceeds `margin`, widest gap first (ties of gap
    in sample order), at most `max_per_prompt` (0 = all): the DPO paper's IMDb setting uses all of them.
    disjoint: the samples ranked by score, the best against the worst, the second best against the second
    worst, and so on, so no sample is in two pairs (all_pairs reuses the best sample as the chosen side of
    most of its pairs, and once one of them is fit the others are too); at most `max_per_prompt`.
    """
    if len(completions) != len(scores) or len(completions) != len(prompts) * k:
        raise ValueError(f"{len(completions)} completions and {len(scores)} scores for {len(prompts)} prompts x {k}")
    counts = PairCounts()
    records: list[dict] = []
    for p, prompt in enumerate(prompts):
        usable = []
        for i in range(p * k, (p + 1) * k):
            if not np.isfinite(scores[i]):
                counts.unscored += 1
            elif not completions[i].strip():
                counts.empty += 1
            else:
                usable.append(i)
        candidates = []  # (gap, chosen, rejected)
        if rule == "best_worst":
            if len(usable) >= 2:
                best = max(usable, key=lambda i: scores[i])  # max/min keep the first of equals
                worst = min(usable, key=lambda i: scores[i])
                candidates = [(scores[best] - scores[worst], best, worst)] if best != worst else [(0.0, best, best)]
        elif rule == "disjoint":
            ranked = sorted(usable, key=lambda i: -scores[i])  # stable: equal scores stay in sample order
            for m in range(len(ranked) // 2):
                hi, lo = ranked[m], ranked[-1 - m]
                candidates.append((scores[hi] - scores[lo], hi, lo))
        else:
            for i, j in itertools.combinations(usable, 2):
                hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                candidates.append((abs(scores[i] - scores[j]), hi, lo))
        kept = []
        for gap, hi, lo in candidates:
            if gap <= margin:
                counts.ties += 1
            elif completions[hi].strip() == completions[lo].strip():
                counts.identical += 1
            else:
                kept.append((gap, hi, lo))
        kept.sort(key=lambda c: -c[0])  # stable: equal gaps stay in sample order
        if max_per_prompt and len(kept) > max_per_prompt:
            counts.over_cap += len(kept) - max_per_prompt
            kept = kept[:max_per_prompt]
        if not kept:
            counts.prompts_without_pair += 1
        for _, hi, lo in kept:
            chosen, rejected = completions[hi], completions[lo]
            if isinstance(prompt, list):  # conversational: the responses are assistant turns
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                            "score_chosen": float(scores[hi]), "score_rejected": float(scores[lo])})
        counts.built += len(kept)
    return records, counts


# --- unpaired examples (KTO): pair_sides, threshold ---

@dataclasses.dataclass
class UnpairedCounts:
    """What became of a round's samples under an unpaired rule: desirable, undesirable, or dropped for one
    named reason."""

    desirable: int = 0
    undesirable: int = 0
    conflicting: int = 0
    """pair_sides: completions the pairing rule put on both sides (chosen in one pair, rejected in another)"""
    ties: int = 0
    """threshold: scores within iterate.margin of iterate.threshold"""
    empty: int = 0
    unscored: int = 0
    prompts_without_example: int = 0
    """prompts of the round that gave no example at all"""


def _as_completion(prompt: Text, completion: str) -> Text:
    """A completion as the data pipeline reads it: text, or an assistant turn after a conversational prompt."""
    return [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion


def _text(completion: Text) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def unpaired_from_pairs(prompts: Sequence[Text], pairs: Sequence[dict]) -> tuple[list[dict], UnpairedCounts]:
    """pair_sides: {"prompt", "completion", "label", "score"} records from pairs (make_pairs' output): every
    chosen side desirable, every rejected side undesirable, each distinct completion of a prompt once, in the
    order the pairs name them. A completion on both sides (all_pairs ranks a middle sample above one and below
    another) carries no binary verdict: dropped and counted as conflicting. Ties, identical, empty and
    unscored samples were already left out (and counted) by the pairing rule."""
    labels: dict[tuple[str, str], set[bool]] = {}
    first: dict[tuple[str, str], dict] = {}
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            key = (repr(pair["prompt"]), _text(pair[side]).strip())
            labels.setdefault(key, set()).add(label)
            first.setdefault(key, {"prompt": pair["prompt"], "completion": pair[side], "label": label,
                                   "score": pair[f"score_{side}"]})
    counts = UnpairedCounts()
    records = []
    for key, record in first.items():
        if len(labels[key]) > 1:
            counts.conflicting += 1
            continue
        records.append(record)
        counts.desirable += record["label"]
        counts.undesirable += not record["label"]
    used = {repr(record["prompt"]) for record in records}
    counts.prompts_without_example = sum(repr(prompt) not in used for prompt in prompts)
    return records, counts


def unpaired_by_threshold(prompts: Sequence[Text], completions: Sequence[str], scores: Sequence[float], k: int, *,
                          threshold: float = 0.0, margin: float = 0.0) -> tuple[list[dict], UnpairedCounts]:
    """threshold: every scored, non-empty sample on its own, desirable when its score exceeds
    threshold + margin, undesirable below threshold - margin, a tie (dropped, counted) in between. KTO's
    setting when the judge's scale has a meaning of its own (a reward model's 0, a 1-10 grade's 5):
    a prompt may give only desirable or only undesirable completions, which KTO trains on as they come."""
    if len(completions) != len(scores) or len(completions) != len(prompts) * k:
        raise ValueError(f"{len(completions)} completions and {len(scores)} scores for {len(prompts)} prompts x {k}")
    counts = UnpairedCounts()
    records = []
    for p, prompt in enumerate(prompts):
        kept = 0
        for i in range(p * k, (p + 1) * k):
            score = scores[i]
            if not np.isfinite(score):
                counts.unscored += 1
            elif not completions[i].strip():
                counts.empty += 1
            elif abs(score - threshold) <= margin:
                counts.ties += 1
            else:
                label = bool(score > threshold)
                records.append({"prompt": prompt, "completion": _as_completion(prompt, completions[i]),
                                "label": label, "score": float(score)})
                counts.desirable += label
                counts.undesirable += not label
                kept += 1
        counts.prompts_without_example += kept == 0
    return records, counts
