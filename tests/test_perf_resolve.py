"""perf.resolve: what an unset perf section turns into, and the forced switches it refuses before training."""

from types import SimpleNamespace

import pytest

from preftune import perf
from preftune.config import ConfigError, PerfConfig

GIB = 2 ** 30
CPU = perf.Machine("cpu", 16 * GIB, glibc=True)
DPO = perf.Needs("dpo")


def _model(hidden=256, layers=4, **extra):
    return SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, **extra)


def test_unset_section_on_a_small_model_on_cpu():
    resolved, reasons = perf.resolve(PerfConfig(), DPO, _model(), CPU, step_tokens=4096)
    assert (resolved.prefix_sharing, resolved.packing, resolved.logps_chunk) == (True, False, perf.CHUNK_TOKENS)
    assert (resolved.gradient_checkpointing, resolved.fused_adamw, resolved.mmap_threshold_kb) == (0, True, 1024)
    assert resolved.attention == "sdpa" and resolved.compile is False
    assert any("hidden 256 < 512" in r for r in reasons)  # the reason packing is off


def test_packing_on_for_wide_models_and_flex_attention_only_on_gpu_without_packing():
    resolved, _ = perf.resolve(PerfConfig(), DPO, _model(hidden=768), CPU, step_tokens=4096)
    assert resolved.packing and resolved.attention == "sdpa"
    gpu = perf.Machine("cuda", 80 * GIB, glibc=True)
    assert perf.resolve(PerfConfig(), DPO, _model(), gpu, step_tokens=4096)[0].attention == "flex_attention"
    assert perf.resolve(PerfConfig(), DPO, _model(hidden=768), gpu, step_tokens=4096)[0].attention == "sdpa"


def test_checkpointing_policy_follows_activations_against_memory():
    # 12 layers x 5120 tokens x 768 x 24 values x 4 bytes = 4.5 GiB kept without checkpointing
    model = _model(hidden=768, layers=12)
    kept = perf.activation_bytes(model, 5120, 4)
    assert kept == 12 * 5120 * 768 * 24 * 4
    roomy = perf.Machine("cpu", int(kept / perf.ACTIVATION_BUDGET) + 1, glibc=True)
    assert perf.resolve(PerfConfig(), DPO, model, roomy, step_tokens=5120)[0].gradient_checkpointing == 0
    # half the room: every 2nd layer recomputed keeps half the activations, which just fits
    half = perf.Machine("cpu", int(kept / 2 / perf.ACTIVATION_BUDGET) + 1, glibc=True)
    assert perf.resolve(PerfConfig(), DPO, model, half, step_tokens=5120)[0].gradient_checkpointing == 2
    tight = perf.Machine("cpu", GIB, glibc=True)
    assert perf.resolve(PerfConfig(), DPO, model, tight, step_tokens=5120)[0].gradient_checkpointing == 1
    assert perf.resolve(PerfConfig(), DPO, model, tight, step_tokens=5120)[0].selective_checkpointing is False


def test_selective_recomputation_where_full_would_recompute_every_second_or_third_layer():
    model = _model(hidden=768, layers=12)
    kept = perf.activation_bytes(model, 5120, 4)

    def room(share):  # memory whose activation budget is `share` of the activations kept without checkpointing
        return perf.Machine("cpu", int(kept * share / perf.ACTIVATION_BUDGET) + 1, glibc=True)

    # 0.6 of them: full recomputation would need every 2nd layer (keeps 1/2); selective keeps 14/24 = 0.583
    resolved, reasons = perf.resolve(PerfConfig(), DPO, model, room(0.6), step_tokens=5120)
    assert (resolved.gradient_checkpointing, resolved.selective_checkpointing) == (1, True)
    assert "every 1 layer(s), selective" in " ".join(reasons)
    # 0.9: every 10th layer recomputed in full (keeps 9/10) is cheaper than recomputing every layer's norms
    resolved, _ = perf.resolve(PerfConfig(), DPO, model, room(0.9), step_tokens=5120)
    assert (resolved.gradient_checkpointing, resolved.selective_checkpointing) == (10, False)
    # forced off: full recomputation at the same interval full recomputation alone would take
    resolved, reasons = perf.resolve(PerfConfig(selective_checkpointing=False), DPO, model, room(0.6),
                                     step_tokens=5120)
    assert (resolved.gradient_checkpointing, resolved.selective_checkpointing) == (2, False)
    assert "selective forced off" in " ".join(reasons)


def test_plain_turns_everything_off_and_refuses_forced_switches_beside_it():
    resolved, reasons = perf.resolve(PerfConfig(plain=True), DPO, _model(hidden=768), CPU, step_tokens=64)
    assert not (resolved.prefix_sharing or resolved.packing or resolved.logps_chunk or resolved.fused_adamw
                or resolved.gradient_checkpointing or resolved.mmap_threshold_kb)
    assert reasons == ["plain path (perf.plain=true)"]
    with pytest.raises(ConfigError, match="perf.plain=true .* perf.packing"):
        perf.resolve(PerfConfig(plain=True, packing=True), DPO, _model(), CPU, step_tokens=64)


def test_forced_switches_win_over_the_automatic_choice():
    forced = PerfConfig(prefix_sharing=False, packing=True, logps_chunk=0, gradient_checkpointing=3,
                        fused_adamw=False, mmap_threshold_kb=0)
    resolved, reasons = perf.resolve(forced, DPO, _model(), CPU, step_tokens=64)
    assert (resolved.prefix_sharing, resolved.packing, resolved.logps_chunk) == (False, True, 0)
    assert (resolved.gradient_checkpointing, resolved.fused_adamw, resolved.mmap_threshold_kb) == (3, False, 0)
    assert "packing on (forced)" in reasons


def test_selective_checkpointing_only_when_forced_and_said_so():
    auto, _ = perf.resolve(PerfConfig(gradient_checkpointing=1), DPO, _model(), CPU, step_tokens=64)
    assert auto.selective_checkpointing is False
    forced, reasons = perf.resolve(PerfConfig(gradient_checkpointing=1, selective_checkpointing=True), DPO,
                                   _model(), CPU, step_tokens=64)
    assert forced.selective_checkpointing is True and "selective" in " ".join(reasons)


@pytest.mark.parametrize(("forced", "needs", "model", "place", "match"), [
    (PerfConfig(packing=True), DPO, _model(), CPU, r"perf.packing=true: .*'eager'.* for loss 'dpo'; set model"),
    (PerfConfig(logps_chunk=64), DPO, _model(final_logit_softcapping=30.0), CPU,
     r"perf.logps_chunk=64: .*final_logit_softcapping.* for loss 'dpo'; leave perf.logps_chunk unset .* set it to 0"),
    (PerfConfig(mmap_threshold_kb=1024), DPO, _model(), perf.Machine("cpu", GIB, glibc=False),
     r"perf.mmap_threshold_kb=1024: .*not glibc for loss 'dpo'; set perf.mmap_threshold_kb=0"),
    (PerfConfig(prefix_sharing=True), perf.Needs("kto", paired=False), _model(), CPU,
     r"perf.prefix_sharing=true: .* no pairs for loss 'kto'"),
    (PerfConfig(attention="flex_attention", packing=True), DPO, _model(), CPU, r"perf.attention=flex_attention"),
    (PerfConfig(selective_checkpointing=True, gradient_checkpointing=0), DPO, _model(), CPU,
     r"perf.selective_checkpointing=true: .*gradient_checkpointing is off for loss 'dpo'; set "
     r"perf.gradient_checkpointing=1"),
])
def test_a_forced_switch_that_cannot_serve_names_switch_loss_and_alternative(forced, needs, model, place, match):
    attn = "eager" if forced.packing and not forced.attention else "sdpa"
    with pytest.raises(ConfigError, match=match):
        perf.resolve(forced, needs, model, place, step_tokens=64, attn_implementation=attn)


def test_logit_transforming_models_keep_the_plain_lm_head_when_automatic():
    resolved, reasons = perf.resolve(PerfConfig(), DPO, _model(final_logit_softcapping=30.0), CPU, step_tokens=64)
    assert resolved.logps_chunk == 0 and not resolved.prefix_sharing and not resolved.packing
    assert any("final_logit_softcapping" in r for r in reasons)


def test_zero3_keeps_the_automatic_lm_head_unchunked_and_a_forced_chunk_stays_forced():
    # under ZeRO-3 the chunked head would multiply by this process's 1/N partition of the head's weight
    zero3 = perf.Needs("dpo", partitioned_head=True)
    resolved, reasons = perf.resolve(PerfConfig(), zero3, _model(), CPU, step_tokens=4096)
    assert resolved.logps_chunk == 0 and resolved.prefix_sharing
    assert any("ZeRO-3 partitions the head" in r for r in reasons)
    # zero.refuse_unsupported stops a forced chunk before any work; resolve itself leaves a forced value alone
    assert perf.resolve(PerfConfig(logps_chunk=512), zero3, _model(), CPU, step_tokens=4096)[0].logps_chunk == 512
