"""Every loss family on the fast path: the forward functions train() runs, with the layouts perf.resolve can
pick, give the plain path's loss and every parameter's gradient, with every reference mode the family takes.

Families: paired sequence-level (DPO), paired token-level (LD-DPO's per-token weights, WPO's per-token
weights and squared mass), reference-free (SimPO, ORPO), unpaired (KTO, the only unpaired loss registered,
and its KL estimate rows), SFT. Reference modes: copy (a frozen model on the same layout), precomputed
(a table), adapters_off (LoRA), none.
"""

import copy
from pathlib import Path

import pytest
import torch

from preftune import config, data, lora
from preftune.config import PerfConfig
from preftune.data import collate, pack
from preftune.logps import batch_logps, sequence_logps
from preftune.losses import LOSSES, bind
from preftune.modeling import apply_speedups, byte_tokenizer
from preftune.reference import Reference, pair_key
from preftune.train import paired_forward, sft_forward, unpaired_forward

from .conftest import read_metrics
from .test_perf_paths import ATOL, RTOL, _model, _pairs

UNPAIRED = Path(__file__).parent / "fixtures" / "unpaired.jsonl"
PAD_ID = byte_tokenizer().pad_token_id
PLAIN = PerfConfig(plain=True, prefix_sharing=False, packing=False, logps_chunk=0)
# what perf.resolve picks for the tiny model on CPU (prefix sharing, chunked head), and the packed variants
FAST = {
    "defaults": PerfConfig(prefix_sharing=True, packing=False, logps_chunk=1024),
    "shared_packed_chunked": PerfConfig(prefix_sharing=True, packing=True, logps_chunk=7),
    "packed_rows": PerfConfig(prefix_sharing=False, packing=True, pack_tokens=300, logps_chunk=16),
    "chunked_only": PerfConfig(prefix_sharing=False, packing=False, logps_chunk=5),
}


def _examples(n: int = 6):
    examples, _ = data.load_unpaired(UNPAIRED, byte_tokenizer(), config.DataConfig())
    assert any(e.desirable for e in examples[:n]) and not all(e.desirable for e in examples[:n])
    return examples[:n]


def _reference(mode: str, policy: torch.nn.Module, perf: PerfConfig, pairs=None) -> Reference:
    """A Reference as train() prepares it, on the layout `perf` names."""
    if mode == "none":
        return Reference("none")
    if mode == "adapters_off":
        ref = Reference("adapters_off", policy)
        ref._peft = policy
    elif mode == "copy":
        # a reference that differs from the policy, so the log-ratios are not all zero
        frozen = _model(seed=5).eval().requires_grad_(False)
        ref = Reference("copy", apply_speedups(frozen, perf, trainable=False))
    else:  # precomputed: the table a plain pass of another model fills
        scorer = _model(seed=5).eval()
        with torch.no_grad():
            rows = sequence_logps(scorer, collate(pairs, PAD_ID)).logps.view(2, -1).T  # (B, 2)
        ref = Reference("precomputed")
        ref.table = {pair_key(p): row for p, row in zip(pairs, rows, strict=True)}
    ref.logps_chunk = perf.logps_chunk
    return ref


def _policy(perf: PerfConfig, with_lora: bool) -> torch.nn.Module:
    model = _model()
    if with_lora:
        model = lora.wrap(model, config.LoraConfig(enabled=True, r=4, alpha=8.0))
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # away from zero: the adapters change the outputs and A gets a gradient
                p.data.normal_(0, 0.1)
    return apply_speedups(model, perf)


def _run(forward, perf: PerfConfig, with_lora: bool = False, mode: str = "none", pairs=None):
    """(per-example losses, every trainable parameter's gradient) of one forward + backward."""
    policy = _policy(perf, with_lora)
    reference = _reference(mode, policy, perf, pairs)
    losses, values, _ = forward(policy, reference, perf)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return losses.detach(), {k: v.detach() for k, v in values.items()}, grads


def _assert_same(plain, fast):
    (loss, values, grads), (fast_loss, fast_values, fast_grads) = plain, fast
    torch.testing.assert_close(fast_loss, loss, atol=ATOL, rtol=RTOL)
    for name in ("logps/chosen", "logps/rejected"):
        if name in values:
            torch.testing.assert_close(fast_values[name], values[name], atol=ATOL, rtol=RTOL)
    # rewards are beta x (a few hundred nats minus about as many): fp32 sums in another order differ by
    # ~1e-4 nats there (measured up to 3e-5 after beta), while a leaked or dropped token moves them by 1e-2
    for name in ("rewards/chosen", "rewards/rejected"):
        if name in values:
            torch.testing.assert_close(fast_values[name], values[name], atol=2e-4, rtol=0)
    assert grads.keys() == fast_grads.keys() and grads
    for name, grad in grads.items():
        scale = grad.abs().max()
        assert scale > 0, f"{name}: zero gradient, the comparison would prove nothing"
        # to 1e-3 of the tensor's largest entry: the rounding of sums in another order reaches 4e-5 of it in a
        # handful of entries (measured); a wrong position, mask or leaked token moves the gradient by its own size
        torch.testing.assert_close(fast_grads[name], grad, atol=float(1e-3 * scale), rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


PAIRED = {
    # name: (LossConfig, reference modes)
    "dpo": (config.LossConfig(name="dpo", beta=0.5), ["copy", "precomputed", "adapters_off"]),
    "ld_dpo": (config.LossConfig(name="dpo", beta=0.5, ld_alpha=0.4), ["copy", "adapters_off"]),
    "wpo": (config.LossConfig(name="dpo", beta=0.5, weighting="wpo"), ["copy", "precomputed", "adapters_off"]),
    "bco_pair": (config.LossConfig(name="bco_pair"), ["copy"]),  # running reward shift
    "simpo": (config.LossConfig(name="simpo"), ["none"]),
    "orpo": (config.LossConfig(name="orpo"), ["none"]),
}
# every layout for DPO with a model reference; the two perf.resolve picks (small and wide models) for the rest
PAIRED_CASES = [(loss, mode, layout) for loss, (_, modes) in PAIRED.items() for mode in modes
                for layout in (FAST if (loss, mode) == ("dpo", "copy") else ("defaults", "shared_packed_chunked"))]


@pytest.mark.parametrize(("loss", "mode", "layout"), PAIRED_CASES)
def test_paired_losses_on_the_fast_path_equal_the_plain_path(loss, mode, layout):
    loss_fn = bind(PAIRED[loss][0])
    pairs = _pairs()

    def forward(policy, reference, perf):
        return paired_forward(policy, reference, pairs, loss_fn, None, perf, PAD_ID, "cpu")

    with_lora = mode == "adapters_off"
    plain = _run(forward, PLAIN, with_lora, mode, pairs)
    _assert_same(plain, _run(forward, FAST[layout], with_lora, mode, pairs))


UNPAIRED_LOSSES = sorted(n for n, s in LOSSES.items() if s.unpaired)


@pytest.mark.parametrize("loss", UNPAIRED_LOSSES)
@pytest.mark.parametrize("mode", ["copy", "adapters_off"])
@pytest.mark.parametrize("layout", ["packed_rows", "shared_packed_chunked", "chunked_only"])
def test_unpaired_losses_on_the_fast_path_equal_the_plain_path(loss, mode, layout):
    loss_fn = bind(config.LossConfig(name=loss))
    examples = _examples()
    kl = torch.tensor(0.05) if loss_fn.kl_estimate else None
    perf_of = {"shared_packed_chunked": PerfConfig(prefix_sharing=False, packing=True, logps_chunk=7)}

    def forward(policy, reference, perf):
        return unpaired_forward(policy, reference, examples, loss_fn, kl, perf, PAD_ID, "cpu")

    fast = perf_of.get(layout, FAST[layout])
    _assert_same(_run(forward, PLAIN, mode == "adapters_off", mode),
                 _run(forward, fast, mode == "adapters_off", mode))


@pytest.mark.parametrize("layout", ["packed_rows", "chunked_only"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_sft_on_the_fast_path_equals_the_plain_path(layout, with_lora):
    examples = [data.TokenizedExample(p.prompt_ids, p.chosen_ids, p.source) for p in _pairs()]

    def forward(policy, reference, perf):
        return sft_forward(policy, examples, perf, PAD_ID, "cpu")

    _assert_same(_run(forward, PLAIN, with_lora), _run(forward, FAST[layout], with_lora))


def test_token_views_of_the_fast_path_hold_the_plain_paths_tokens_in_order():
    # column j of a fast row is its j-th response token: the plain row's masked values, left-aligned
    pairs = _pairs()
    model = _model().eval()
    with torch.no_grad():
        plain = sequence_logps(model, collate(pairs, PAD_ID), with_sq_mass=True)
        fast = batch_logps(model, pack(pairs, PAD_ID, prefix_sharing=True, packing=True), 5, with_sq_mass=True)
    for r in range(2 * len(pairs)):
        n = int(plain.lengths[r])
        assert int(fast.token_mask[r].sum()) == n and fast.token_mask[r, :n].all()
        torch.testing.assert_close(fast.token_logps[r, :n], plain.token_logps[r][plain.token_mask[r]],
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(fast.token_log_sq_mass[r, :n], plain.token_log_sq_mass[r][plain.token_mask[r]],
                                   atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("sections", "stage"), [
    ({"loss": {"name": "kto"}, "data": {"train": str(UNPAIRED)}}, "preference"),  # the KL estimate's rows too
    ({"loss": {"name": "dpo", "ld_alpha": 0.5}}, "preference"),
    ({"loss": {"name": "dpo", "weighting": "wpo"}, "reference": {"mode": "precomputed"}}, "preference"),
    ({"loss": {"name": "simpo"}}, "preference"),
    ({}, "sft"),
])
def test_train_defaults_equal_plain_for_every_family(tiny, sections, stage, capsys):
    """A run with no perf section ends at the weights of a perf.plain run, for each family."""
    from safetensors.torch import load_file

    from preftune.train import train

    runs = {}
    for arm, perf in (("plain", {"plain": True}), ("defaults", {"packing": True} if stage == "sft" else {})):
        cfg = tiny(**copy.deepcopy(sections), train={"max_steps": 3, "run_name": arm, "stage": stage,
                                                     "batch_size": 4}, perf=perf)
        runs[arm] = train(cfg)
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("perf: chunked") or
                t.startswith("perf: prefix"))
    assert "chunked LM head (1024 tokens)" in line
    plain, fast = read_metrics(runs["plain"]), read_metrics(runs["defaults"])
    for p, f in zip(plain, fast, strict=True):
        assert abs(p["loss"] - f["loss"]) < 1e-5 and abs(p["grad_norm"] - f["grad_norm"]) < 1e-4 * p["grad_norm"]
    plain_w = load_file(runs["plain"] / "final" / "model.safetensors")
    fast_w = load_file(runs["defaults"] / "final" / "model.safetensors")
    for name, weight in plain_w.items():
        torch.testing.assert_close(fast_w[name], weight, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
