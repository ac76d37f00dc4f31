"""Safe loading: pickle weights refused unless allowed, remote code off unless turned on, configs run no code."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import config
from preftune.modeling import load_model, load_tokenizer

from .conftest import TINY_ARCH


def tiny_model_config(**fields) -> config.ModelConfig:
    return config.ModelConfig(arch=dict(TINY_ARCH), tokenizer="bytes", **fields)


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    cfg = tiny_model_config()
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=3)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pickle format older checkpoints use

    from_dir = config.ModelConfig(path=str(tmp_path), tokenizer="bytes")
    assert from_dir.allow_pickle is False  # the default
    with pytest.raises(ValueError, match=r"holds no \.safetensors.*model\.allow_pickle=true"):
        load_model(from_dir, tokenizer)

    loaded = load_model(config.ModelConfig(path=str(tmp_path), tokenizer="bytes", allow_pickle=True), tokenizer)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_remote_code_does_not_run_by_default(tmp_path):
    marker = tmp_path / "remote_code_ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = config.ModelConfig(path=str(tmp_path), tokenizer="bytes")
    assert cfg.trust_remote_code is False  # the default
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(cfg, load_tokenizer(cfg))
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system [\"touch {marker}\"]",
                                 "!!python/object/new:subprocess.Popen [[\"touch\", \"{marker}\"]]",
                                 "!!python/name:os.system"])
def test_config_can_not_run_code(tmp_path, tag):
    marker = tmp_path / "config_code_ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  path: {tag.format(marker=marker)}\n")
    refused = r"not valid YAML \(refused tag.*can not construct Python objects"
    with pytest.raises(config.ConfigError, match=r"evil\.yaml: " + refused):
        config.load(path)
    with pytest.raises(config.ConfigError, match=r"model\.arch\.x: " + refused):
        config.load(None, [f"model.arch.x={tag.format(marker=marker)}"])
    assert not marker.exists()
