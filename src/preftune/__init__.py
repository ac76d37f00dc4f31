"""preftune: Direct Preference Optimization and its family for HuggingFace causal language models."""

__version__ = "0.1.0"
