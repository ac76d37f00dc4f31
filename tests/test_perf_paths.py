"""Every perf switch computes the plain path's numbers: loss and every parameter's gradient."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preftune import config, modeling
from preftune.data import CHOSEN, PAD, PROMPT, REJECTED, TokenizedPair, collate, load_pairs, pack, padding_share
from preftune.logps import batch_logps, block_mask, sequence_logps, use_unit_attention
from preftune.losses import Logps, dpo
from preftune.modeling import apply_speedups, byte_tokenizer, load_model
from preftune.train import build_optimizer, train

from .conftest import EXAMPLE_PAIRS, REPO, TINY_ARCH, read_metrics

# fp32 sums over a few hundred tokens in a different order: agreement to ~1e-6 relative is what exactness
# looks like; a real layout bug (a wrong position id, one leaked token) moves log-probs by 1e-2 or more
ATOL, RTOL = 1e-5, 1e-4


def _pairs(n: int = 6) -> list[TokenizedPair]:
    pairs, _ = load_pairs(EXAMPLE_PAIRS, byte_tokenizer(), config.DataConfig())
    return pairs[:n]  # prompts, chosen and rejected all of different lengths


def _model(seed: int = 3) -> torch.nn.Module:
    # dropout is 0 in Llama, so train() mode is deterministic and exercises the training code paths
    return load_model(config.ModelConfig(arch=TINY_ARCH, tokenizer="bytes"), byte_tokenizer(), seed=seed)


def _loss_and_grads(model, batch, logps_chunk: int = 0):
    """DPO loss against fixed reference log-probs, and the gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    chosen, rejected = batch_logps(model, batch, logps_chunk).halves()
    ref = torch.linspace(-1.0, 1.0, 2 * batch.num_pairs) + torch.cat([chosen.logps, rejected.logps]).detach()
    b = batch.num_pairs
    out = dpo(Logps(chosen.logps, rejected.logps, chosen.lengths, rejected.lengths, ref[:b], ref[b:]), beta=0.5)
    loss = out.losses.mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), torch.cat([chosen.logps, rejected.logps]).detach(), grads


def _assert_same(plain, fast):
    loss, logps, grads = plain
    fast_loss, fast_logps, fast_grads = fast
    torch.testing.assert_close(fast_logps, logps, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fast_loss, loss, atol=ATOL, rtol=RTOL)
    assert grads.keys() == fast_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(fast_grads[name], grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


# name: (pack() arguments or None for a plain batch, logps_chunk, unit attention)
LAYOUTS = {
    "chunked_logps": (None, 7, False),
    "prefix_sharing_block_mask": (dict(prefix_sharing=True, packing=False), 0, False),
    "packed_rows_block_mask": (dict(prefix_sharing=False, packing=True, row_tokens=300), 0, False),
    "packed_shared_rows_block_mask": (dict(prefix_sharing=True, packing=True, row_tokens=300), 0, False),
    "packed_one_row_unit_attention": (dict(prefix_sharing=False, packing=True), 0, True),
    "packed_shared_one_row_unit_attention": (dict(prefix_sharing=True, packing=True), 0, True),
    "packed_shared_rows_unit_attention_chunked": (dict(prefix_sharing=True, packing=True, row_tokens=300), 16, True),
    "prefix_sharing_unit_attention": (dict(prefix_sharing=True, packing=False), 5, True),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fast_layout_equals_plain_path_in_loss_and_every_gradient(name):
    layout, logps_chunk, unit_attention = LAYOUTS[name]
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    model = _model()
    plain = _loss_and_grads(model, collate(pairs, pad_id))
    if unit_attention:
        use_unit_attention(model)
    batch = collate(pairs, pad_id) if layout is None else pack(pairs, pad_id, **layout)
    if layout is not None and layout.get("row_tokens"):
        assert batch.input_ids.shape[0] > 1 and batch.padding_share > 0  # rows with padding at their ends
    _assert_same(plain, _loss_and_grads(model, batch, logps_chunk))


def test_unit_attention_leaves_plain_padded_batches_as_they_were():
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    model = _model()
    plain = _loss_and_grads(model, collate(pairs, pad_id))
    use_unit_attention(model)
    _assert_same(plain, _loss_and_grads(model, collate(pairs, pad_id)))


def test_packed_log_probs_equal_plain_for_each_row_and_report_lengths_and_mean_logits():
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    model = _model().eval()
    with torch.no_grad():
        plain = sequence_logps(model, collate(pairs, pad_id))
        fast = batch_logps(model, pack(pairs, pad_id, prefix_sharing=True, packing=True), logps_chunk=5)
    torch.testing.assert_close(fast.logps, plain.logps, atol=ATOL, rtol=RTOL)
    assert torch.equal(fast.lengths, plain.lengths)
    torch.testing.assert_close(fast.mean_logits, plain.mean_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("selective", [False, True], ids=["full_recompute", "selective_keeps_matmuls"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed_units", "shared_rows_block_mask"])
def test_gradient_checkpointing_equals_plain_path(selective, packing):
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    model = _model()
    plain = _loss_and_grads(model, collate(pairs, pad_id))
    perf = config.PerfConfig(packing=packing, gradient_checkpointing=1, selective_checkpointing=selective)
    checkpointed = apply_speedups(copy.deepcopy(model), perf)
    batch = pack(pairs, pad_id, prefix_sharing=True, packing=packing)
    _assert_same(plain, _loss_and_grads(checkpointed, batch, logps_chunk=16))


def _matmuls_in_backward(model, batch) -> int:
    """How many matmuls the backward of one DPO step runs (its own gradients plus any recomputation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    chosen, rejected = batch_logps(model, batch, 16).halves()
    loss = -(chosen.logps - rejected.logps).sigmoid().log().mean()
    with Count():
        loss.backward()
    return Count.n


def test_selective_checkpointing_runs_no_matmul_twice():
    # full recomputation repeats every decoder-layer matmul in backward; selective keeps their outputs, so its
    # backward runs exactly the matmuls of the uncheckpointed model's backward
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    batch = pack(pairs, pad_id, prefix_sharing=True, packing=False)
    counts = {}
    for name, perf in [("none", config.PerfConfig()),
                       ("full", config.PerfConfig(gradient_checkpointing=1)),
                       ("selective", config.PerfConfig(gradient_checkpointing=1, selective_checkpointing=True))]:
        counts[name] = _matmuls_in_backward(apply_speedups(_model(), perf), batch)
    assert counts["selective"] == counts["none"] < counts["full"], counts


def test_compiled_layers_equal_plain_path(monkeypatch):
    # aot_eager: dynamo captures each layer with dynamic shapes and AOT autograd builds its backward, as with
    # inductor, without minutes of C++ compilation per test (inductor itself was checked the same way by hand)
    monkeypatch.setattr(modeling, "COMPILE_BACKEND", "aot_eager")
    pairs, pad_id = _pairs(), byte_tokenizer().pad_token_id
    model = _model()
    plain = _loss_and_grads(model, collate(pairs, pad_id))
    compiled = apply_speedups(copy.deepcopy(model), config.PerfConfig(packing=True, compile=True))
    _assert_same(plain, _loss_and_grads(compiled, pack(pairs, pad_id, prefix_sharing=True, packing=True), 16))


def test_prefix_sharing_mask_by_hand():
    # prompt [1, 2], chosen [3, 4], rejected [5]: one row laid out 1 2 3 4 5
    pair = TokenizedPair([1, 2], [3, 4], [5], "x:1")
    batch = pack([pair], pad_id=0, prefix_sharing=True, packing=False)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # rejected sits where it would after the prompt
    assert batch.kinds.tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED]]
    # 3 predicted by pos 1 (prompt end), 4 by pos 2; 5 also by pos 1: the prompt is encoded once for both
    assert batch.pred_index.tolist() == [1, 2, 1] and batch.pred_target.tolist() == [3, 4, 5]
    assert batch.pred_owner.tolist() == [0, 0, 1]
    model = _model()
    mask = block_mask(model, batch.segment_ids, batch.kinds)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]  # rejected sees the prompt and itself, never the chosen response
    assert batch.num_tokens == 2 * 2 + 2 + 1


def test_packing_keeps_units_apart_and_cuts_padding():
    pairs, pad_id = _pairs(16), byte_tokenizer().pad_token_id
    plain = collate(pairs, pad_id)
    packed = pack(pairs, pad_id, prefix_sharing=False, packing=True, row_tokens=2 * plain.input_ids.shape[1])
    shared = pack(pairs, pad_id, prefix_sharing=True, packing=True)
    assert packed.num_tokens == shared.num_tokens == plain.num_tokens
    assert packed.padding_share < padding_share(plain) and shared.padding_share < padding_share(plain)
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]  # several sequences did share rows
    # no position attends across units: the mask is block-diagonal by segment
    mask = block_mask(_model(), packed.segment_ids, packed.kinds)[:, 0]
    seg = packed.segment_ids
    assert not (mask & (seg[:, :, None] != seg[:, None, :])).any()
    # every real token of the plain batch is in the packed rows exactly once per sequence
    assert int((packed.kinds != PAD).sum()) == plain.num_tokens
    assert int((shared.kinds != PAD).sum()) == plain.num_tokens - sum(len(p.prompt_ids) for p in pairs)


@pytest.mark.parametrize("mode", ["copy", "precomputed"])
@pytest.mark.parametrize("arm", ["defaults", "every_switch"])
def test_train_fast_run_logs_the_plain_runs_losses_and_ends_at_its_weights(tiny, mode, arm, capsys):
    # the reference runs the fast path too: on every step (copy) or in its one pass before training.
    # "defaults": no perf section at all, so whatever perf.resolve picks is what is checked against plain
    fast_perf = {} if arm == "defaults" else {"prefix_sharing": True, "packing": True, "logps_chunk": 64,
                                              "gradient_checkpointing": 1, "fused_adamw": True}
    plain_dir = train(tiny(train={"max_steps": 3, "run_name": "plain"}, reference={"mode": mode},
                           perf={"plain": True}))
    assert "perf: plain path (perf.plain=true)" in capsys.readouterr().out
    fast_dir = train(tiny(train={"max_steps": 3, "run_name": "fast"}, reference={"mode": mode}, perf=fast_perf))
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("perf: "))
    assert "prefix sharing" in line and "chunked LM head" in line and "off:" not in line.split(";")[0]
    plain, fast = read_metrics(plain_dir), read_metrics(fast_dir)
    for p, f in zip(plain, fast, strict=True):
        assert abs(p["loss"] - f["loss"]) < 1e-5
        assert abs(p["grad_norm"] - f["grad_norm"]) < 1e-4 * p["grad_norm"]
        assert abs(p["logps/chosen"] - f["logps/chosen"]) < 1e-3
        assert p["tokens_per_s"] > 0 and f["tokens_per_s"] > 0
    assert fast[0]["loss"] != fast[-1]["loss"]  # the policy moved, so later steps compare trained weights
    # and the weights after the 3 steps are the plain run's (measured: within 2.7e-7; each tensor moved 2e-3)
    start = load_model(config.ModelConfig(arch=TINY_ARCH, tokenizer="bytes"), byte_tokenizer(), seed=0).state_dict()
    plain_weights = load_file(plain_dir / "final" / "model.safetensors")
    fast_weights = load_file(fast_dir / "final" / "model.safetensors")
    assert plain_weights.keys() == fast_weights.keys()
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fast_weights[name], weight, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert (weight - start[name]).abs().max() > 1e-3, name  # every tensor moved beyond the tolerance


def test_fused_adamw_takes_the_plain_adamw_steps():
    """perf.fused_adamw builds the same AdamW as the plain path (lr, betas, eps, weight decay), so five steps on
    the same gradients end at the plain path's weights: fp32 rounding apart (measured: within 2e-9, while
    every weight moved at least 1.4e-4 and on average 2.2e-2 from its start)."""
    optim = config.OptimConfig(lr=1e-2, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, weight_decay=0.1)
    torch.manual_seed(0)
    start = [torch.randn(37, 5), torch.randn(11)]
    plain_params = [p.clone().requires_grad_(True) for p in start]
    fused_params = [p.clone().requires_grad_(True) for p in start]
    plain = build_optimizer(plain_params, optim, fused=False)
    fused = build_optimizer(fused_params, optim, fused=True)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, opt in ((plain_params, plain), (fused_params, fused)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, f, p0 in zip(plain_params, fused_params, start, strict=True):
        torch.testing.assert_close(f, p, rtol=0, atol=1e-6)  # the plain path's weights after the same steps
        assert (p - p0).abs().min() > 1e-5  # every weight moved beyond that tolerance


def test_mmap_threshold_hands_freed_tensors_back_to_the_os():
    # in a child process: the threshold is process-wide and would follow every later test in this one
    script = """
import sys, torch
from preftune.allocator import set_mmap_threshold
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
assert set_mmap_threshold(1024)
base = rss_mb()
for _ in range(3):
    blocks = [torch.ones(3 * 2**18) for _ in range(100)]  # 100 x 3 MiB, touched
    held = rss_mb() - base
    del blocks
    freed = rss_mb() - base
    assert held > 250 and freed < 30, (held, freed)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_perf_config_rejects_negative_sizes(tiny):
    with pytest.raises(config.ConfigError, match="perf.pack_tokens"):
        tiny(perf={"pack_tokens": -1})
