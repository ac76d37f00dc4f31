"""The checks benchmarks/gpu_check.py runs on a GPU (`pytest -m gpu`), written for any device: CI runs them on
CPU, where each exercises the same code on CPU kernels, so they can not rot while no GPU is at hand.

The device is cuda when torch sees one, else cpu; PREFTUNE_TEST_DEVICE overrides. Tolerances are per device:
bf16 keeps 8 bits of mantissa, so a bf16 forward differs from fp32 by ~1e-2 relative per logit on any device;
summed response log-probs (~-200 over ~40 tokens, ~-1500 on the larger GPU model) stay within 0.5% of fp32.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from preftune import config
from preftune.data import collate, load_pairs, pack
from preftune.logps import batch_logps, sequence_logps
from preftune.modeling import byte_tokenizer, load_model
from preftune.train import train

from .conftest import EXAMPLE_PAIRS, TINY_ARCH, read_metrics, tiny_config

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("PREFTUNE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
# wider than the CPU tests' tiny model on a GPU, where it costs nothing and shows real kernel tiling
ARCH = TINY_ARCH if DEVICE.type == "cpu" else {**TINY_ARCH, "hidden_size": 256, "intermediate_size": 768,
                                                "num_attention_heads": 8, "num_key_value_heads": 4}


def _pairs(n: int = 8):
    pairs, _ = load_pairs(EXAMPLE_PAIRS, byte_tokenizer(), config.DataConfig())
    return pairs[:n]


def _model(attn: str = "sdpa", dtype: str = "float32") -> torch.nn.Module:
    cfg = config.ModelConfig(arch=ARCH, tokenizer="bytes", attn_implementation=attn, dtype=dtype)
    return load_model(cfg, byte_tokenizer(), seed=3).to(DEVICE).eval()


@torch.no_grad()
def test_bf16_log_probs_track_fp32_and_log_softmax_stays_fp32():
    batch = collate(_pairs(), byte_tokenizer().pad_token_id).to(DEVICE)
    fp32 = sequence_logps(_model(), batch).logps  # (2B,)
    bf16_weights = sequence_logps(_model(dtype="bfloat16"), batch, with_tokens=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        autocast = sequence_logps(_model(), batch).logps
    assert bf16_weights.logps.dtype == torch.float32 and bf16_weights.token_logps.dtype == torch.float32
    for got in (bf16_weights.logps, autocast):
        assert not torch.equal(got, fp32)  # bf16 really ran
        torch.testing.assert_close(got, fp32, rtol=5e-3, atol=0.05)


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
@torch.no_grad()
def test_sdpa_fused_kernels_equal_the_math_kernel(backend):
    """The fused SDPA kernels (flash; memory-efficient) against the reference math kernel, padded batch, in
    the dtype each runs in on this device (CUDA's flash kernel is 16-bit only; CPU has a flash kernel
    in fp32, no memory-efficient one, so that case runs the math kernel there and must be exact)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, backend)
    if DEVICE.type == "cpu" and kernel == SDPBackend.EFFICIENT_ATTENTION:
        kernel = SDPBackend.MATH
    dtype = "bfloat16" if DEVICE.type == "cuda" else "float32"
    model = _model(dtype=dtype)
    # left-free right padding: every row's real tokens come first, the key mask hides the padding
    batch = collate(_pairs(), byte_tokenizer().pad_token_id).to(DEVICE)
    with sdpa_kernel(SDPBackend.MATH):
        want = sequence_logps(model, batch).logps
    with sdpa_kernel(kernel):
        got = sequence_logps(model, batch).logps
    tol = {"rtol": 5e-3, "atol": 0.05} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(got, want, **tol)


def test_flex_attention_block_mask_prefix_sharing_equals_plain_path():
    """perf.prefix_sharing with attn_implementation=flex_attention: a BlockMask (fully masked tiles skipped)
    instead of a dense mask; the plain padded path's log-probs, and on CUDA its gradients (FlexAttention has
    no backward on CPU, so there the forward alone is compared)."""
    pairs, pad_id = _pairs(6), byte_tokenizer().pad_token_id
    plain_model, flex_model = _model("sdpa").train(), _model("flex_attention").train()
    backward = DEVICE.type == "cuda"
    with torch.set_grad_enabled(backward):
        plain = batch_logps(plain_model, collate(pairs, pad_id).to(DEVICE))
        shared = batch_logps(flex_model, pack(pairs, pad_id, prefix_sharing=True, packing=False).to(DEVICE))
    torch.testing.assert_close(shared.logps, plain.logps, rtol=1e-4, atol=1e-4)
    if backward:
        plain.logps.sum().backward()
        shared.logps.sum().backward()
        for (name, p), (_, q) in zip(plain_model.named_parameters(), flex_model.named_parameters(), strict=True):
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _device_config(tmp_path, name: str, **sections) -> config.Config:
    cfg = tiny_config(tmp_path, **{**sections, "train": {"run_name": name, "batch_size": 8, "max_steps": 4,
                                                         **sections.get("train", {})}})
    return config.replace(cfg, "model.arch", dict(ARCH))


def test_fsdp2_on_one_device_trains_checkpoints_resumes_and_exports(tmp_path):
    """parallel.sharding=fsdp2 on this one device (a process group of one): the unsharded run's losses
    and export, a sharded checkpoint that resumes to the same end, and bf16 close to fp32."""
    plain = _device_config(tmp_path, "plain")
    sharded = _device_config(tmp_path, "sharded", parallel={"sharding": "fsdp2"}, train={"save_every": 2})
    train(plain)
    train(sharded)
    # CPU: the same arithmetic (bitwise in practice). CUDA: kernels with atomics (index_add, attention
    # backward) round in a varying order, and AdamW turns a rounding-level gradient into an O(lr) step
    # either way, so 4 steps at lr 1e-3 may move single weights ~1e-5 apart
    tol = {"rtol": 1e-5, "atol": 1e-5} if DEVICE.type == "cpu" else {"rtol": 1e-3, "atol": 2e-4}
    want = load_file(plain.run_dir() / "final" / "model.safetensors")
    got = load_file(sharded.run_dir() / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)
    resumed = _device_config(tmp_path, "resumed", parallel={"sharding": "fsdp2"},
                             train={"resume": str(sharded.run_dir() / "checkpoints" / "step-00000002")})
    train(resumed)
    again = load_file(resumed.run_dir() / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(again[name], got[name], **tol, msg=name)
    bf16 = _device_config(tmp_path, "bf16", parallel={"sharding": "fsdp2"}, train={"mixed_precision": "bf16"})
    train(bf16)
    for a, b in zip(read_metrics(plain.run_dir()), read_metrics(bf16.run_dir()), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=5e-3), a["step"]
