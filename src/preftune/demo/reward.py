"""The demo's reward is the library's sentiment judge (`preftune.judges.sentiment`); these names stay here for
the demo's callers."""

from preftune.judges.sentiment import SentimentClassifier, load_or_train, train_classifier

__all__ = ["SentimentClassifier", "load_or_train", "train_classifier"]
