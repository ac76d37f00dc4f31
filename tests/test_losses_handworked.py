"""DPO, cDPO, IPO and hinge against numbers worked by hand (log sigma(x) = -log(1 + e^-x))."""

import math

import pytest
import torch

from preftune.losses import LOSSES, Logps, bind


def two_pairs() -> Logps:
    # pair 0: policy log-ratios r_w = -1 - (-2) = 1, r_l = -3 - (-2) = -1  -> h = 2
    # pair 1: r_w = -4 - (-4) = 0, r_l = -2 - (-3) = 1                       -> h = -1
    return Logps(
        policy_chosen_logps=torch.tensor([-1.0, -4.0]), policy_rejected_logps=torch.tensor([-3.0, -2.0]),
        chosen_lengths=torch.tensor([2.0, 4.0]), rejected_lengths=torch.tensor([1.0, 2.0]),
        ref_chosen_logps=torch.tensor([-2.0, -4.0]), ref_rejected_logps=torch.tensor([-2.0, -3.0]))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_hand_worked():
    out = bind("dpo", 0.5, {})(two_pairs())
    # beta h = 1 and -0.5
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-0.5)], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.313262, 0.974077], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])


def test_cdpo_hand_worked():
    out = bind("dpo", 0.5, {"label_smoothing": 0.2})(two_pairs())
    expect0 = -0.8 * log_sigmoid(1.0) - 0.2 * log_sigmoid(-1.0)
    expect1 = -0.8 * log_sigmoid(-0.5) - 0.2 * log_sigmoid(0.5)
    assert out.losses.tolist() == pytest.approx([expect0, expect1], abs=1e-6)
    assert expect0 == pytest.approx(0.513262, abs=1e-6)


def test_ipo_hand_worked_both_conventions():
    # tau = 0.25 -> target 1/(2 tau) = 2; summed h = 2 and -1
    assert bind("ipo", 0.25, {})(two_pairs()).losses.tolist() == pytest.approx([0.0, 9.0])
    # length-normalised: h0 = 1/2 - (-1)/1 = 1.5, h1 = 0/4 - 1/2 = -0.5
    assert bind("ipo_norm", 0.25, {})(two_pairs()).losses.tolist() == pytest.approx([0.25, 6.25])


def test_hinge_hand_worked():
    # beta h = 0.5 * 2 = 1 -> max(0, 0) = 0; 0.5 * -1 -> 1.5
    assert bind("hinge", 0.5, {})(two_pairs()).losses.tolist() == pytest.approx([0.0, 1.5])


# per-pair losses taking (lp, beta=...); apo_down (lowers the chosen by design), aot (its losses are per
# quantile, not per pair), orpo (no beta), bco_pair (running state) and kto (unpaired) are covered with their
# own conventions in test_losses.py::test_gradient_raises_chosen_and_lowers_rejected and the tests beside it
@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if "beta" in s.hyperparameters()
                                        and not (s.unpaired or s.running_state) and n not in ("apo_down", "aot")))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    lp = two_pairs()
    lp.policy_chosen_logps.requires_grad_(True)
    lp.policy_rejected_logps.requires_grad_(True)
    # a pair the model does not yet prefer, so every loss is active on it
    LOSSES[name].fn(lp, beta=0.5).losses[1].backward()
    assert lp.policy_chosen_logps.grad[1] < 0  # descending the loss raises log pi(y_w)
    assert lp.policy_rejected_logps.grad[1] > 0  # and lowers log pi(y_l)


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(ValueError, match="takes no such hyperparameter"):
        bind("hinge", 0.1, {"label_smoothing": 0.1})
