"""Disjoint uses of the IMDB reviews, and review prefixes as prompts (DPO paper section 6.1: "prefixes of
length from 2 to 8 tokens" of IMDb reviews; here words, so a prompt never ends inside a word)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from preftune.demo.assets import Review


@dataclass(frozen=True)
class Split:
    """Each review serves exactly one purpose: the reward classifier never saw a prompt's review, and no
    training prompt shares a review with an evaluation prompt."""

    classifier_train: list[Review]
    classifier_test: list[Review]
    train_prompts: list[Review]
    eval_prompts: list[Review]
    sft: list[Review]


def split_reviews(reviews: Sequence[Review], *, classifier_train: int, classifier_test: int,
                  train_prompts: int, eval_prompts: int, sft: int = 0, seed: int = 0) -> Split:
    """Shuffle once (seeded) and cut consecutive, non-overlapping slices of the requested sizes. The held-out
    prompts are cut before the training prompts, so settings that train on more or fewer prompts (rounds x
    prompts per round) are evaluated on the same held-out reviews and their rows compare; the SFT slice comes
    last, so switching SFT on or off leaves every other slice as it was."""
    sizes = {"classifier_train": classifier_train, "classifier_test": classifier_test,
             "eval_prompts": eval_prompts, "train_prompts": train_prompts, "sft": sft}
    if sum(sizes.values()) > len(reviews):
        raise ValueError(f"the split asks for {sum(sizes.values())} reviews ({sizes}) but only "
                         f"{len(reviews)} exist")
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = [reviews[i] for i in order[start:start + size]]
        start += size
    return Split(**parts)


def prefix(text: str, rng: random.Random, min_words: int = 2, max_words: int = 8) -> str:
    """The first k words of `text`, k uniform in [min_words, max_words] (fewer if the text is shorter)."""
    words = text.split()
    return " ".join(words[:rng.randint(min_words, max_words)])


def make_prompts(reviews: Sequence[Review], *, seed: int = 0, min_words: int = 2, max_words: int = 8
                 ) -> list[str]:
    """One prefix per review (the prefix length drawn from a seeded generator)."""
    rng = random.Random(seed)
    return [prefix(r.text, rng, min_words, max_words) for r in reviews]


def sft_examples(reviews: Sequence[Review], *, max_words: int = 40, seed: int = 0) -> list[dict]:
    """{"prompt", "completion"} records for `preftune sft`: a 2-8-word prefix of each review, as the demo's
    prompts are made, and the review's next words as completion, cut after the last sentence end within
    `max_words` words (at `max_words` if none ends there), so the SFT model learns both to continue a prefix
    the way IMDB reviewers write and where a thought ends."""
    rng = random.Random(seed)
    records = []
    for review in reviews:
        head = prefix(review.text, rng)
        rest = review.text.split()[len(head.split()):][:max_words]
        ends = [i for i, word in enumerate(rest) if word.endswith((".", "!", "?"))]
        if ends:
            rest = rest[:ends[-1] + 1]
        if rest:  # a review no longer than its prefix has nothing to continue
            records.append({"prompt": head, "completion": " " + " ".join(rest)})
    return records
