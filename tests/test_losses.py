"""Each loss against hand-worked numbers, an independent scalar implementation of its formula, and the
direction its gradient moves chosen and rejected log-probs; the modifiers and the registry likewise."""

from __future__ import annotations

import math
import random

import pytest
import torch

from preftune import config
from preftune.losses import (
    LOSSES,
    Logps,
    RunningMean,
    UnpairedLogps,
    bind,
    f_prime,
    ld_dpo,
    wpo_weights,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
T = torch.float64


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=T)


def hand_batch() -> Logps:
    """Three pairs with log-ratios (r_w, r_l) = (0, 0), (ln 3, 0), (0, ln 3): h = 0, ln 3, -ln 3, so with
    beta = 1 sigma(h) = 1/2, 3/4, 1/4. Policy logps -2 (chosen) and -6 (rejected); lengths 2 and 3."""
    return Logps(policy_chosen_logps=t(-2.0, -2.0, -2.0), policy_rejected_logps=t(-6.0, -6.0, -6.0),
                 chosen_lengths=t(2.0, 2.0, 2.0), rejected_lengths=t(3.0, 3.0, 3.0),
                 ref_chosen_logps=t(-2.0, -2.0 - LN3, -2.0), ref_rejected_logps=t(-6.0, -6.0, -6.0 - LN3))


def run(name: str, lp, running: RunningMean | None = None, beta: float | None = 1.0, **params):
    return bind(config.LossConfig(name=name, beta=beta, params=params))(lp, running)


# --- hand-worked values (beta = 1 unless said; sigma(ln 3) = 3/4) ---

HAND = {
    "dpo": ({}, [LN2, math.log(4 / 3), LN4]),
    "cdpo": ({}, [LN2, 0.9 * math.log(4 / 3) + 0.1 * LN4, 0.9 * LN4 + 0.1 * math.log(4 / 3)]),
    "robust": ({}, [LN2, (0.9 * math.log(4 / 3) - 0.1 * LN4) / 0.8, (0.9 * LN4 - 0.1 * math.log(4 / 3)) / 0.8]),
    "ipo": ({}, [0.25, (LN3 - 0.5) ** 2, (LN3 + 0.5) ** 2]),
    # every response length is 2 (chosen) and 3 (rejected): h = r_w/2 - r_l/3
    "ipo_norm": ({}, [0.25, (LN3 / 2 - 0.5) ** 2, (-LN3 / 3 - 0.5) ** 2]),
    "hinge": ({}, [1.0, 0.0, 1 + LN3]),  # 1 - ln 3 < 0 is clipped
    "rpo": ({"alpha": 0.5}, [LN2 + 0.5, math.log(4 / 3) + 0.5, LN4 + 0.5]),  # NLL = 2/2 = 1 per token
    "nca_pair": ({}, [LN2 + LN2, math.log(4 / 3) + 0.5 * LN4 + 0.5 * LN2, LN2 + 0.5 * LN2 + 0.5 * LN4]),
    "bco_pair": ({}, [2 * LN2, math.log(4 / 3) + LN2, LN2 + LN4]),  # delta = 0 before any step
    "sppo_hard": ({}, [0.5, (LN3 - 0.5) ** 2 + 0.25, 0.25 + (LN3 + 0.5) ** 2]),
    "apo_zero": ({}, [1.0, 0.25 + 0.5, 0.5 + 0.75]),
    "apo_down": ({}, [1.0, 0.75 + 0.25, 0.5 + 0.75]),
    "exo_pair": ({"label_smoothing": 0.1},
                 [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
                  0.75 * math.log(0.75 / 0.9) + 0.25 * math.log(0.25 / 0.1),
                  0.25 * math.log(0.25 / 0.9) + 0.75 * math.log(0.75 / 0.1)]),
    "discopop": ({"tau": 1.0}, [0.5 * LN2 + 0.5, 0.25 * math.log(4 / 3) + 0.75 / 3, 0.75 * LN4 + 0.25 * 3]),
    # sorted r_w = (0, 0, ln 3) and sorted r_l = (0, 0, ln 3): every quantile gap is 0, unlike dpo
    "aot": ({}, [LN2, LN2, LN2]),
    # l(y_w) = -2/2 = -1, l(y_l) = -6/3 = -2: beta (l_w - l_l) - gamma = 1 - 1 = 0
    "simpo": ({"gamma": 1.0}, [LN2, LN2, LN2]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_worked_values(name):
    params, expected = HAND[name]
    out = run(name, hand_batch(), **params)
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-12)


def test_orpo_hand_worked():
    # l(y_w) = ln 1/2 -> odds 1; l(y_l) = ln 1/4 -> odds 1/3; log odds ratio ln 3 -> -log sigma = ln 4/3
    lp = Logps(t(2 * math.log(0.5)), t(3 * math.log(0.25)), t(2.0), t(3.0))
    out = run("orpo", lp, beta=None, lam=0.5)
    torch.testing.assert_close(out.losses, t(LN2 + 0.5 * math.log(4 / 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards - out.rejected_rewards, t(LN3), rtol=0, atol=1e-12)


def test_kto_hand_worked():
    # log-ratios ln 3 (desirable), ln 3 (undesirable), 0 (desirable); beta = 1
    def batch(kl: float) -> UnpairedLogps:
        return UnpairedLogps(policy_logps=t(LN3, LN3, 0.0), ref_logps=t(0.0, 0.0, 0.0),
                             lengths=t(1.0, 1.0, 1.0), desirable=torch.tensor([True, False, True]),
                             kl_estimate=torch.tensor(kl, dtype=T))
    out = run("kto", batch(-1.0))  # a negative estimate is clamped: z0 = 0
    torch.testing.assert_close(out.losses, t(0.25, 0.75, 0.5), rtol=0, atol=1e-12)
    assert out.accuracies().tolist() == [True, False, False]
    out = run("kto", batch(LN3), undesirable_weight=2.0)  # z0 = ln 3
    torch.testing.assert_close(out.losses, t(0.5, 1.0, 0.75), rtol=0, atol=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([LN3, 0.0]) and out.rejected_rewards.numel() == 1


def test_bco_uses_the_running_mean_as_reward_shift():
    out = run("bco_pair", hand_batch(), RunningMean(total=2 * LN3, count=2))  # delta = ln 3
    expected = [LN4 + math.log(4 / 3), LN2 + math.log(4 / 3), LN4 + LN2]
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-12)
    assert RunningMean().update(3.0, 2).update(1.0, 2).mean == 1.0


def test_discopop_pushes_margins_down_at_zero_with_the_paper_tau():
    """The published loss is non-convex: at beta h = 0 with tau = 0.05 its slope is -ln2/(4 tau) + 1/(4 tau)
    - 3/4 = +0.784, so from policy == reference it first moves margins to a local minimum below zero."""
    h = torch.zeros(1, dtype=T, requires_grad=True)
    lp = Logps(h, torch.zeros(1, dtype=T), t(1.0), t(1.0), torch.zeros(1, dtype=T), torch.zeros(1, dtype=T))
    run("discopop", lp, beta=1.0, tau=0.05).losses.sum().backward()
    assert h.grad.item() == pytest.approx(-LN2 / 0.2 + 1 / 0.2 - 0.75, abs=1e-12)


def test_ipo_conventions_differ_only_by_length_normalisation():
    lp = hand_batch()
    lp.chosen_lengths, lp.rejected_lengths = t(1.0, 1.0, 1.0), t(1.0, 1.0, 1.0)
    torch.testing.assert_close(run("ipo", lp).losses, run("ipo_norm", lp).losses)
    assert not torch.allclose(run("ipo", hand_batch()).losses, run("ipo_norm", hand_batch()).losses)


def test_cdpo_is_dpo_with_label_smoothing():
    lp = hand_batch()
    torch.testing.assert_close(run("cdpo", lp).losses, run("dpo", lp, label_smoothing=0.1).losses)
    assert run("dpo", lp).losses.tolist() != run("cdpo", lp).losses.tolist()


# --- parity with a straightforward scalar implementation of each formula on random inputs ---

def scalar_reference(name: str, pw: float, pl: float, rw: float, rl: float, nw: float, nl: float,
                     beta: float, p: dict) -> float:
    """Per-pair loss written from the papers' formulas with Python floats, one pair at a time."""
    lw, ll = pw - rw, pl - rl  # log-ratios
    h = lw - ll
    eps = p.get("label_smoothing", 0.0)
    if name in ("dpo", "cdpo"):
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if name == "robust":
        return ((1 - eps) * -logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "ipo_norm":
        return (lw / nw - ll / nl - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    if name == "rpo":
        return -logsig(beta * h) + p["alpha"] * (-pw / nw)
    if name == "nca_pair":
        return -logsig(beta * lw) - 0.5 * logsig(-beta * lw) - 0.5 * logsig(-beta * ll)
    if name == "bco_pair":
        return -logsig(beta * lw) - logsig(-beta * ll)
    if name == "sppo_hard":
        return (lw - 1 / (2 * beta)) ** 2 + (ll + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * lw)) + sig(beta * ll)
    if name == "apo_down":
        return sig(beta * lw) + (1 - sig(beta * h))
    if name == "exo_pair":
        q = sig(beta * h)
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    if name == "discopop":
        rho = sig(beta * h / p["tau"])
        return (1 - rho) * -logsig(beta * h) + rho * math.exp(-beta * h)
    if name == "simpo":
        return -logsig(beta * pw / nw - beta * pl / nl - p["gamma"])
    if name == "orpo":
        mw, ml = pw / nw, pl / nl
        odds_w, odds_l = math.exp(mw) / (1 - math.exp(mw)), math.exp(ml) / (1 - math.exp(ml))
        return -mw - p["lam"] * logsig(math.log(odds_w) - math.log(odds_l))
    raise KeyError(name)


def random_batch(seed: int, n: int = 6) -> Logps:
    rng = random.Random(seed)
    chosen_lengths = t(*[float(rng.randint(1, 20)) for _ in range(n)])
    rejected_lengths = t(*[float(rng.randint(1, 20)) for _ in range(n)])
    # per-token log-probs in (-3, -0.05) keep ORPO's p = exp(l) away from 1
    pw = chosen_lengths * t(*[rng.uniform(-3, -0.05) for _ in range(n)])
    pl = rejected_lengths * t(*[rng.uniform(-3, -0.05) for _ in range(n)])
    rw = pw + t(*[rng.uniform(-3, 3) for _ in range(n)])
    rl = pl + t(*[rng.uniform(-3, 3) for _ in range(n)])
    return Logps(pw, pl, chosen_lengths, rejected_lengths, rw, rl)


PARITY = {"dpo": {"label_smoothing": 0.0}, "cdpo": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.2},
          "ipo": {}, "ipo_norm": {}, "hinge": {}, "rpo": {"alpha": 1.0}, "nca_pair": {}, "bco_pair": {},
          "sppo_hard": {}, "apo_zero": {}, "apo_down": {}, "exo_pair": {"label_smoothing": 1e-3},
          "discopop": {"tau": 0.05}, "simpo": {"gamma": 1.0}, "orpo": {"lam": 0.1}}


@pytest.mark.parametrize("name", sorted(PARITY))
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_scalar_formula(name, seed):
    lp = random_batch(seed)
    beta = {"simpo": 2.0, "discopop": 0.05, "orpo": None}.get(name, 0.3)
    out = run(name, lp, beta=beta, **PARITY[name])
    expected = [scalar_reference(name, *(float(x[i]) for x in (
        lp.policy_chosen_logps, lp.policy_rejected_logps, lp.ref_chosen_logps, lp.ref_rejected_logps,
        lp.chosen_lengths, lp.rejected_lengths)), beta or 0.0, PARITY[name]) for i in range(6)]
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-6)


def test_aot_parity_sorts_each_side():
    lp = random_batch(3)
    lw = sorted((lp.policy_chosen_logps - lp.ref_chosen_logps).tolist())
    ll = sorted((lp.policy_rejected_logps - lp.ref_rejected_logps).tolist())
    expected = [-logsig(0.3 * (a - b)) for a, b in zip(lw, ll, strict=True)]
    torch.testing.assert_close(run("aot", lp, beta=0.3).losses, t(*expected), rtol=0, atol=1e-6)


def test_kto_parity():
    rng = random.Random(5)
    r = [rng.uniform(-3, 3) for _ in range(8)]
    desirable = [rng.random() < 0.5 for _ in range(8)]
    kl = 0.7
    ulp = UnpairedLogps(t(*r), torch.zeros(8, dtype=T), torch.ones(8, dtype=T), torch.tensor(desirable),
                        torch.tensor(kl, dtype=T))
    out = run("kto", ulp, beta=0.3, desirable_weight=1.0, undesirable_weight=1.33)
    expected = [1 - sig(0.3 * (x - kl)) if d else 1.33 * (1 - sig(0.3 * (kl - x))) for x, d in zip(r, desirable,
                                                                                                   strict=True)]
    torch.testing.assert_close(out.losses, t(*expected), rtol=0, atol=1e-6)


# --- gradients: which way each loss moves the chosen and rejected log-probs ---

PAIRED = sorted(n for n, s in LOSSES.items() if not s.unpaired)


def grads(name: str, lp: Logps, **params) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = lp.policy_chosen_logps.clone().requires_grad_(True)
    rejected = lp.policy_rejected_logps.clone().requires_grad_(True)
    lp = Logps(chosen, rejected, lp.chosen_lengths, lp.rejected_lengths, lp.ref_chosen_logps,
               lp.ref_rejected_logps)
    beta = None if "beta" not in LOSSES[name].hyperparameters() else 0.1
    run(name, lp, beta=beta, **params).losses.sum().backward()
    return chosen.grad, rejected.grad


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """Near policy == reference, descent raises log pi(y_w) and lowers log pi(y_l) (APO-down: see below)."""
    lp = random_batch(7)
    lp.ref_chosen_logps = lp.policy_chosen_logps - 0.01 * torch.randn(6, dtype=T)  # log-ratios ~0
    lp.ref_rejected_logps = lp.policy_rejected_logps - 0.01 * torch.randn(6, dtype=T)
    params = {"tau": 1.0} if name == "discopop" else {}  # tau = 0.05 is non-convex at 0 (tested above)
    chosen_grad, rejected_grad = grads(name, lp, **params)
    assert (rejected_grad > 0).all()
    if name == "apo_down":
        assert (chosen_grad - rejected_grad < 0).all()  # the margin still grows
    else:
        assert (chosen_grad < 0).all()


def test_apo_down_lowers_chosen_when_rejected_is_already_low():
    # r_w = 0, r_l = -20: sigma'(0) = 1/4 > sigma'(2) so descent lowers the chosen log-prob too
    lp = Logps(t(-5.0), t(-30.0), t(1.0), t(1.0), t(-5.0), t(-10.0))
    chosen_grad, rejected_grad = grads("apo_down", lp)
    assert chosen_grad.item() > 0 and rejected_grad.item() > 0
    chosen_grad, _ = grads("apo_zero", lp)
    assert chosen_grad.item() < 0


def test_kto_gradient_raises_desirable_lowers_undesirable():
    policy = torch.zeros(4, dtype=T, requires_grad=True)
    ulp = UnpairedLogps(policy, torch.zeros(4, dtype=T), torch.ones(4, dtype=T),
                        torch.tensor([True, False, True, False]), torch.tensor(0.5, dtype=T, requires_grad=True))
    run("kto", ulp, beta=0.1).losses.sum().backward()
    assert policy.grad[0] < 0 and policy.grad[2] < 0 and policy.grad[1] > 0 and policy.grad[3] > 0
    assert ulp.kl_estimate.grad is None  # z0 is detached


# --- modifiers ---

def token_batch() -> Logps:
    """Pair 1: chosen tokens (-1, -1, -1), rejected (-2): shared length 1. Pair 2: chosen (-1), rejected
    (-1, -3): shared length 1. Reference tokens are all -1."""
    def tok(rows):
        out = torch.zeros(len(rows), 3, dtype=T)
        for i, row in enumerate(rows):
            out[i, :len(row)] = t(*row)
        return out
    chosen_tokens, rejected_tokens = tok([[-1, -1, -1], [-1]]), tok([[-2], [-1, -3]])
    chosen_mask, rejected_mask = chosen_tokens != 0, rejected_tokens != 0
    return Logps(chosen_tokens.sum(-1), rejected_tokens.sum(-1), chosen_mask.sum(-1).to(T),
                 rejected_mask.sum(-1).to(T), -chosen_mask.sum(-1).to(T), -rejected_mask.sum(-1).to(T),
                 policy_chosen_tokens=chosen_tokens, policy_rejected_tokens=rejected_tokens,
                 ref_chosen_tokens=-chosen_mask.to(T), ref_rejected_tokens=-rejected_mask.to(T),
                 chosen_mask=chosen_mask, rejected_mask=rejected_mask)


def test_ld_dpo_hand_worked():
    out = ld_dpo(token_batch(), alpha=0.5)
    torch.testing.assert_close(out.policy_chosen_logps, t(-1 - 0.5 * 2, -1))  # tokens 2-3 weigh 1/2
    torch.testing.assert_close(out.policy_rejected_logps, t(-2, -1 - 0.5 * 3))
    torch.testing.assert_close(out.ref_chosen_logps, t(-1 - 0.5 * 2, -1))
    torch.testing.assert_close(out.ref_rejected_logps, t(-1, -1 - 0.5))
    plain = token_batch()
    same = ld_dpo(plain, alpha=1.0)
    torch.testing.assert_close(same.policy_chosen_logps, plain.policy_chosen_logps)
    # through bind: h = (-2 - -2) - (-2 - -1) = 1 for pair 1 with beta = 1
    loss = bind(config.LossConfig(name="dpo", beta=1.0, ld_alpha=0.5))(token_batch()).losses
    torch.testing.assert_close(loss[0], t(-logsig(1.0))[0])


def test_wpo_weights_hand_worked_and_detached():
    lp = token_batch()
    # every position has sum_v p^2 = 1/2; a token of log-prob ln(1/2) then weighs exactly 1, ln(1/4) 1/2
    lp.policy_chosen_tokens = torch.where(lp.chosen_mask, math.log(0.5), 0.0).to(T).requires_grad_(True)
    lp.policy_rejected_tokens = torch.where(lp.rejected_mask, math.log(0.25), 0.0).to(T)
    lp.policy_chosen_sq_mass = torch.full((2, 3), math.log(0.5), dtype=T)
    lp.policy_rejected_sq_mass = torch.full((2, 3), math.log(0.5), dtype=T)
    weights = wpo_weights(lp)
    torch.testing.assert_close(weights, t(0.5, 0.5))
    assert not weights.requires_grad
    bound = bind(config.LossConfig(name="dpo", beta=1.0, weighting="wpo"))
    plain = bind(config.LossConfig(name="dpo", beta=1.0))
    torch.testing.assert_close(bound(lp).losses, 0.5 * plain(lp).losses)
    assert bound.needs_token_logps and bound.needs_sq_mass and not plain.needs_token_logps


def test_f_divergences_hand_worked():
    r = t(LN3, 0.0)  # u = 3, 1
    torch.testing.assert_close(f_prime(r, divergence="forward_kl"), t(-1 / 3, -1.0))
    torch.testing.assert_close(f_prime(r, divergence="js"), t(math.log(3 / 4), math.log(1 / 2)))
    torch.testing.assert_close(f_prime(r, divergence="alpha", alpha=0.5), t((1 - 3 ** -0.5) / 0.5, 0.0))
    # forward KL in DPO, pair 2 of hand_batch: h = -1/3 - (-1) = 2/3
    out = run("dpo", hand_batch(), beta=1.0)
    lp = hand_batch()
    forward = bind(config.LossConfig(name="dpo", beta=1.0, divergence="forward_kl"))(lp)
    torch.testing.assert_close(forward.losses[1], t(-logsig(2 / 3))[0])
    js = bind(config.LossConfig(name="dpo", beta=1.0, divergence="js"))(lp)
    torch.testing.assert_close(js.losses[1], t(math.log(5 / 3))[0])  # h = ln(3/2): sigma = 3/5
    reverse = bind(config.LossConfig(name="dpo", beta=1.0, divergence="reverse_kl"))(lp)
    torch.testing.assert_close(reverse.losses, out.losses, rtol=0, atol=0)


def test_f_divergence_equivalences():
    lp = random_batch(11)
    def losses(**kw):
        return bind(config.LossConfig(name="dpo", beta=0.3, **kw))(lp).losses
    # alpha = 1: f'(u) = 1 - 1/u, forward KL up to a constant that cancels in h
    torch.testing.assert_close(losses(divergence="alpha", divergence_alpha=1.0), losses(divergence="forward_kl"))
    # alpha -> 0: (1 - u^-alpha)/alpha -> log u, reverse KL (= DPO)
    torch.testing.assert_close(losses(divergence="alpha", divergence_alpha=1e-7), losses(), rtol=0, atol=1e-5)


# --- registry, bind and config ---

def test_every_loss_is_selectable_and_documented():
    expected = {"dpo", "cdpo", "robust", "ipo", "ipo_norm", "hinge", "simpo", "orpo", "rpo", "kto", "nca_pair",
                "bco_pair", "sppo_hard", "apo_zero", "apo_down", "exo_pair", "discopop", "aot"}
    assert set(LOSSES) == expected
    for name, spec in LOSSES.items():
        assert "arXiv:" in spec.fn.__doc__ or "Mitchell" in spec.fn.__doc__, name
        sig = list(__import__("inspect").signature(spec.fn).parameters.values())
        assert all(p.kind is p.KEYWORD_ONLY for p in sig[1 + spec.running_state:]), name
        cfg = config.from_dict({"model": {"arch": {"model_type": "llama"}}, "loss": {"name": name},
                                "train": {"batch_size": 2}})
        assert bind(cfg.loss).spec is spec


def test_needs_are_declared():
    assert {n for n, s in LOSSES.items() if not s.needs_reference} == {"simpo", "orpo"}
    assert {n for n, s in LOSSES.items() if s.unpaired} == {"kto"} == {n for n, s in LOSSES.items()
                                                                       if s.kl_estimate}
    assert {n for n, s in LOSSES.items() if s.running_state} == {"bco_pair"}
    assert {n for n, s in LOSSES.items() if s.nll} == {"rpo", "orpo"}
    assert {n for n, s in LOSSES.items() if s.per_micro_batch} == {"aot"}


def test_paper_defaults_apply_when_beta_is_unset():
    assert bind(config.LossConfig(name="simpo")).kwargs == {}
    assert bind(config.LossConfig(name="simpo", beta=2.5)).kwargs == {"beta": 2.5}
    lp = hand_batch()
    torch.testing.assert_close(bind(config.LossConfig(name="simpo"))(lp).losses,
                               run("simpo", lp, beta=2.0, gamma=1.0).losses)


@pytest.mark.parametrize("raw, message", [
    ({"loss": {"name": "orpo", "beta": 0.1}}, "takes no beta"),
    ({"loss": {"name": "simpo", "divergence": "js"}}, "has none"),
    ({"loss": {"name": "kto", "weighting": "wpo"}}, "unpaired"),
    ({"loss": {"name": "robust", "params": {"label_smoothing": 0.5}}}, "[0, 0.5)"),
    ({"loss": {"name": "dpo", "divergence": "chi2"}}, "not one of"),
    ({"loss": {"name": "orpo", "ref_sync": "hard"}}, "no reference"),
    ({"loss": {"name": "kto"}, "train": {"batch_size": 1}}, "batch_size x grad_accum >= 2"),
    ({"loss": {"name": "dpo", "ld_alpha": 1.5}}, "[0, 1]"),
])
def test_config_rejects_inapplicable_settings(raw, message):
    raw = {"model": {"arch": {"model_type": "llama"}}, **raw}
    with pytest.raises(config.ConfigError, match=__import__("re").escape(message)):
        config.from_dict(raw)


def test_loss_config_round_trips_through_yaml(tmp_path):
    cfg = config.from_dict({"model": {"arch": {"model_type": "llama"}},
                            "loss": {"name": "dpo", "beta": 0.2, "weighting": "wpo", "ld_alpha": 0.5,
                                     "divergence": "alpha", "divergence_alpha": 0.3, "ref_sync": "soft",
                                     "ref_sync_alpha": 0.5, "ref_sync_every": 4}})
    config.save(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == config.replace(cfg, "train.run_name", "c")
    assert config.load(None, ["model.arch.model_type=llama", "loss.name=simpo"]).loss.beta is None
