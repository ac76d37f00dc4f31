"""Preference losses: one pure tensor function each, plus one line in `LOSSES`.

Every function takes the per-sequence log-probabilities of a batch of pairs (`Logps`) and keyword-only
hyperparameters with the papers' defaults, and returns per-pair losses and the implicit rewards that the
trainer logs. Nothing here knows about models, devices or the training loop.

Notation (../shared/ANCHORS.md): log-ratio r(y) = log pi(y|x) - log pi_ref(y|x), summed over response tokens;
h = r(y_w) - r(y_l).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Logps:
    """Log-probabilities of one batch of B pairs; every tensor is (B,)."""

    policy_chosen_logps: Tensor
    """sum over response tokens of log pi(y_w | x)"""
    policy_rejected_logps: Tensor
    chosen_lengths: Tensor
    """number of response tokens of y_w (float, for length normalisation)"""
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    """sum of log pi_ref(y_w | x); None for reference-free losses"""
    ref_rejected_logps: Tensor | None = None

    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen_logps - _need_ref(self.ref_chosen_logps)

    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected_logps - _need_ref(self.ref_rejected_logps)


def _need_ref(t: Tensor | None) -> Tensor:
    if t is None:
        raise ValueError("this loss needs reference log-probs but the batch has none")
    return t


@dataclass
class LossOut:
    losses: Tensor
    """(B,) per-pair loss; the trainer averages over all pairs of an optimiser step"""
    chosen_rewards: Tensor
    """(B,) implicit reward of y_w (detached), e.g. beta * r(y_w) for DPO"""
    rejected_rewards: Tensor
    """(B,) implicit reward of y_l (detached)"""


def _dpo_rewards(lp: Logps, beta: float) -> tuple[Tensor, Tensor]:
    return (beta * lp.chosen_logratios()).detach(), (beta * lp.rejected_logratios()).detach()


def dpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOut:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7:  -log sigma(beta h).

    With label_smoothing eps > 0 this is conservative DPO (cDPO; Mitchell 2023, and the DPO reference code),
    which assumes each preference label is flipped with probability eps:
        -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    """
    h = lp.chosen_logratios() - lp.rejected_logratios()  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOut(losses, *_dpo_rewards(lp, beta))


def ipo(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17:  (h - 1 / (2 tau))^2 with tau = beta.

    This is the paper's convention with log-ratios summed over tokens; `ipo_norm` divides each log-ratio by
    its response length (the convention of TRL and HALOs).
    """
    h = lp.chosen_logratios() - lp.rejected_logratios()
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOut(losses, *_dpo_rewards(lp, beta))


def ipo_norm(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """IPO (arXiv:2310.12036, Eq. 17) on length-normalised log-ratios: h = r(y_w)/|y_w| - r(y_l)/|y_l|."""
    h = lp.chosen_logratios() / lp.chosen_lengths - lp.rejected_logratios() / lp.rejected_lengths
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOut(losses, *_dpo_rewards(lp, beta))


def hinge(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) / RSO (Liu et al. 2023, arXiv:2309.06657):
    max(0, 1 - beta h)."""
    h = lp.chosen_logratios() - lp.rejected_logratios()
    losses = torch.relu(1 - beta * h)
    return LossOut(losses, *_dpo_rewards(lp, beta))


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOut]
    needs_reference: bool
    """False: the trainer never loads or runs a reference model."""
    summary: str

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword-only hyperparameters and their defaults, read from the function's signature."""
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, needs_reference=True, summary="-log sigma(beta h); label_smoothing>0 gives cDPO"),
    "ipo": LossSpec(ipo, needs_reference=True, summary="(h - 1/(2 beta))^2 on summed log-ratios (IPO paper)"),
    "ipo_norm": LossSpec(ipo_norm, needs_reference=True,
                         summary="(h - 1/(2 beta))^2 on length-normalised log-ratios (TRL/HALOs)"),
    "hinge": LossSpec(hinge, needs_reference=True, summary="max(0, 1 - beta h) (SLiC-HF / RSO)"),
}


def bind(name: str, beta: float, params: dict[str, float]) -> Callable[[Logps], LossOut]:
    """The loss `name` with its hyperparameters fixed: beta where the loss takes it, then `params`."""
    spec = LOSSES[name]
    kwargs = dict(params)
    if "beta" in spec.hyperparameters():
        kwargs.setdefault("beta", beta)
    unknown = set(kwargs) - set(spec.hyperparameters())
    if unknown:
        raise ValueError(f"loss {name!r} takes no hyperparameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(spec.hyperparameters())}")
    return lambda lp: spec.fn(lp, **kwargs)
