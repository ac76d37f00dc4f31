"""The sentiment judge: P(positive) from a TF-IDF + logistic-regression classifier (judge.name=sentiment).

The DPO paper scores IMDb completions with a fixed, pre-trained sentiment classifier; `preftune demo` trains one
on IMDB reviews that no prompt comes from, reports its held-out accuracy, and caches it here as plain arrays
(vocabulary JSON + a .npz of idf, weights and bias), not as a pickle: loading a cache must not be able to run
code. The judge is the library's; the demo only trains and caches the classifier it uses.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def review_texts(prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """The review as a whole, prefix + continuation, as the DPO paper's classifier reads it (section 6.1).

    Scoring the continuation alone rewards cheerful text unrelated to the review it continues; with the prefix
    in the text a continuation must agree with (or outweigh) what the reviewer already wrote. The two are
    joined as generated: the completion's tokens follow the prompt's, so its text starts with its own space."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [p + c for p, c in zip(prompts, completions, strict=True)]


def cache_dir() -> Path:
    """preftune's user cache: `PREFTUNE_CACHE`, else `$XDG_CACHE_HOME/preftune`, else `~/.cache/preftune`."""
    if os.environ.get("PREFTUNE_CACHE"):
        return Path(os.environ["PREFTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "preftune"


# TF-IDF settings; the same ones rebuild the vectoriser from the cache
VECTORIZER = {"ngram_range": (1, 2), "min_df": 2, "max_features": 200_000, "sublinear_tf": True,
              "lowercase": True, "norm": "l2", "use_idf": True, "smooth_idf": True}


@dataclass
class SentimentClassifier:
    vocabulary: dict[str, int]  # term -> column
    idf: np.ndarray  # (V,)
    coef: np.ndarray  # (V,) logistic-regression weights, positive class
    intercept: float
    accuracy: float  # on the held-out reviews it was tested on
    num_train: int
    num_test: int

    def __post_init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vectorizer = TfidfVectorizer(vocabulary=self.vocabulary, **VECTORIZER)
        self._vectorizer.idf_ = self.idf  # fixed vocabulary + idf: transform() needs no fit

    def prob_positive(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) for each text: (N,) in [0, 1]."""
        if len(texts) == 0:
            return np.zeros(0)
        features = self._vectorizer.transform(list(texts))  # (N, V) sparse, rows l2-normalised
        logits = features @ self.coef + self.intercept  # (N,)
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    __call__ = prob_positive

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocabulary.json").write_text(json.dumps(self.vocabulary))
        np.savez(directory / "weights.npz", idf=self.idf, coef=self.coef, intercept=np.array(self.intercept))
        info = {"accuracy": self.accuracy, "num_train": self.num_train, "num_test": self.num_test,
                "vectorizer": VECTORIZER}
        (directory / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SentimentClassifier:
        info = json.loads((directory / "classifier.json").read_text())
        with np.load(directory / "weights.npz", allow_pickle=False) as w:
            idf, coef, intercept = w["idf"], w["coef"], float(w["intercept"])
        vocabulary = json.loads((directory / "vocabulary.json").read_text())
        return cls(vocabulary, idf, coef, intercept, info["accuracy"], info["num_train"], info["num_test"])


def train_classifier(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str],
                     test_labels: Sequence[int], *, c: float = 4.0, seed: int = 0) -> SentimentClassifier:
    """Fit TF-IDF + logistic regression on labelled reviews (1 = positive); accuracy is on the test set."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(**VECTORIZER)
    features = vectorizer.fit_transform(list(train_texts))  # (N, V)
    model = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    model.fit(features, np.asarray(train_labels))
    classes = list(model.classes_)
    if classes != [0, 1]:
        raise ValueError(f"classifier labels must be 0 (negative) and 1 (positive), got {classes}")
    vocabulary = {term: int(col) for term, col in vectorizer.vocabulary_.items()}
    clf = SentimentClassifier(vocabulary, vectorizer.idf_.astype(np.float64),
                              model.coef_[0].astype(np.float64), float(model.intercept_[0]), 0.0,
                              len(train_texts), len(test_texts))
    predicted = clf.prob_positive(test_texts) > 0.5
    clf.accuracy = float(np.mean(predicted == (np.asarray(test_labels) == 1)))
    return clf


def load_or_train(directory: Path, train_texts: Sequence[str], train_labels: Sequence[int],
                  test_texts: Sequence[str], test_labels: Sequence[int], log=print) -> SentimentClassifier:
    """The cached classifier if it was trained on this many reviews, else train and cache a new one."""
    if (directory / "classifier.json").is_file():
        clf = SentimentClassifier.load(directory)
        if (clf.num_train, clf.num_test) == (len(train_texts), len(test_texts)):
            return clf
    t0 = time.perf_counter()
    log(f"training the sentiment classifier (TF-IDF + logistic regression) on {len(train_texts)} reviews")
    clf = train_classifier(train_texts, train_labels, test_texts, test_labels)
    clf.save(directory)
    log(f"classifier: {clf.accuracy:.1%} accuracy on {len(test_texts)} held-out reviews "
        f"({time.perf_counter() - t0:.0f} s)")
    return clf


def latest_classifier() -> Path | None:
    """The classifier directory `preftune demo` cached most recently, if any."""
    cached = sorted(cache_dir().glob("sentiment-*/classifier.json"), key=lambda f: f.stat().st_mtime)
    return cached[-1].parent if cached else None
