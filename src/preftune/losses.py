"""Preference losses: one pure tensor function each, plus one line in `LOSSES`.

Every function takes the log-probabilities of a batch (`Logps` for pairs, `UnpairedLogps` for KTO) and
keyword-only hyperparameters with the papers' defaults, and returns per-example losses and the implicit
rewards that the trainer logs. Nothing here knows about models, devices or the training loop: what a loss
needs (a reference, per-token log-probs, a KL estimate, unpaired data, running state) is declared on its
`LossSpec`, and the loop reads those declarations to compute exactly that and no more.

Modifiers (WPO weights, LD-DPO, f-divergences) are small pure functions too; `bind()` composes them with a
loss. Stateful pieces (BCO's running reward mean, TR-DPO's reference syncing) live in the loop, which passes
state in explicitly.

Notation (../shared/ANCHORS.md): log-ratio r(y) = log pi(y|x) - log pi_ref(y|x), summed over response tokens;
h = r(y_w) - r(y_l); sigma = logistic; l(y) = log pi(y|x) / |y| the mean-token log-prob.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from preftune.config import LossConfig
    from preftune.logps import SequenceLogps


@dataclass
class Logps:
    """Log-probabilities of one batch of B pairs; sequence tensors are (B,), token tensors (B, T)."""

    policy_chosen_logps: Tensor
    """sum over response tokens of log pi(y_w | x)"""
    policy_rejected_logps: Tensor
    chosen_lengths: Tensor
    """number of response tokens of y_w (float, for length normalisation)"""
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    """sum of log pi_ref(y_w | x); None for reference-free losses"""
    ref_rejected_logps: Tensor | None = None
    # --- per-token views, present only when the bound loss declares needs_token_logps (LD-DPO, WPO) ---
    policy_chosen_tokens: Tensor | None = None
    """(B, T) log pi(y_t | x, y_<t) at response positions of y_w, 0 elsewhere"""
    policy_rejected_tokens: Tensor | None = None
    ref_chosen_tokens: Tensor | None = None
    ref_rejected_tokens: Tensor | None = None
    chosen_mask: Tensor | None = None
    """(B, T) True at response positions of y_w"""
    rejected_mask: Tensor | None = None
    policy_chosen_sq_mass: Tensor | None = None
    """(B, T) log sum_v pi(v | x, y_<t)^2 at each position (WPO's weight alignment), detached"""
    policy_rejected_sq_mass: Tensor | None = None
    logratio_fn: Callable[[Tensor], Tensor] | None = None
    """f-DPO: maps the log-ratio r = log u to f'(u) (constants dropped); None = reverse KL, i.e. r itself"""

    def chosen_logratios(self) -> Tensor:
        return self._f(self.policy_chosen_logps - _need_ref(self.ref_chosen_logps))

    def rejected_logratios(self) -> Tensor:
        return self._f(self.policy_rejected_logps - _need_ref(self.ref_rejected_logps))

    def _f(self, logratio: Tensor) -> Tensor:
        return logratio if self.logratio_fn is None else self.logratio_fn(logratio)


def _need_ref(t: Tensor | None) -> Tensor:
    if t is None:
        raise ValueError("this loss needs reference log-probs but the batch has none")
    return t


def pair_logps(policy_chosen: SequenceLogps, policy_rejected: SequenceLogps,
               ref_chosen: SequenceLogps | None = None, ref_rejected: SequenceLogps | None = None) -> Logps:
    """`Logps` from the two halves of `sequence_logps` for the policy (and the reference, if any)."""
    return Logps(
        policy_chosen.logps, policy_rejected.logps, policy_chosen.lengths, policy_rejected.lengths,
        None if ref_chosen is None else ref_chosen.logps, None if ref_rejected is None else ref_rejected.logps,
        policy_chosen.token_logps, policy_rejected.token_logps,
        None if ref_chosen is None else ref_chosen.token_logps,
        None if ref_rejected is None else ref_rejected.token_logps,
        policy_chosen.token_mask, policy_rejected.token_mask,
        policy_chosen.token_log_sq_mass, policy_rejected.token_log_sq_mass,
    )


@dataclass
class UnpairedLogps:
    """Log-probabilities of B unpaired completions, each desirable or not (KTO); tensors are (B,)."""

    policy_logps: Tensor
    """sum over completion tokens of log pi(y | x)"""
    ref_logps: Tensor
    lengths: Tensor
    desirable: Tensor
    """(B,) bool: the completion is desirable (True) or undesirable (False)"""
    kl_estimate: Tensor | None
    """() mean over the optimiser step's mismatched (x_i, y_j) pairs of log pi(y_j|x_i) - log pi_ref(y_j|x_i),
    over every micro-batch and process (the loop's step_kl_estimate); None for a loss without kl_estimate"""

    def logratios(self) -> Tensor:
        return self.policy_logps - self.ref_logps


@dataclass(frozen=True)
class RunningMean:
    """Mean of every value seen so far (BCO's reward shift delta); the loop owns and updates it."""

    total: float = 0.0
    count: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, total: float, count: float) -> RunningMean:
        return RunningMean(self.total + total, self.count + count)


@dataclass
class LossOut:
    losses: Tensor
    """(B,) per-example loss; the trainer averages over all examples of an optimiser step"""
    chosen_rewards: Tensor
    """implicit reward of each y_w (detached), e.g. beta * r(y_w) for DPO; (B,) for pairs, (#desirable,) KTO"""
    rejected_rewards: Tensor
    """implicit reward of each y_l (detached); (B,) for pairs, (#undesirable,) for KTO"""
    correct: Tensor | None = None
    """(B,) bool, the reward ranks the example right; None = chosen_rewards > rejected_rewards"""

    def accuracies(self) -> Tensor:
        return self.chosen_rewards > self.rejected_rewards if self.correct is None else self.correct


def _rewards(lp: Logps, beta: float) -> tuple[Tensor, Tensor]:
    return (beta * lp.chosen_logratios()).detach(), (beta * lp.rejected_logratios()).detach()


def _h(lp: Logps) -> Tensor:
    return lp.chosen_logratios() - lp.rejected_logratios()  # (B,)


# ----------------------------------------------------------------------------------------------------------
# losses on pairs with a reference
# ----------------------------------------------------------------------------------------------------------

def dpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOut:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7:  -log sigma(beta h).

    With label_smoothing eps > 0 this is conservative DPO (cDPO; Mitchell 2023, and the DPO reference code),
    which assumes each preference label is flipped with probability eps:
        -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    """
    h = _h(lp)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOut(losses, *_rewards(lp, beta))


def cdpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOut:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; the DPO reference code):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), eps = label_smoothing, the label-flip rate.
    `dpo` with label_smoothing > 0 is the same loss; this name sets a non-zero default."""
    return dpo(lp, beta=beta, label_smoothing=label_smoothing)


def robust(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOut:
    """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409): an unbiased loss under labels flipped
    with known rate eps < 1/2:
        [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).
    """
    h = _h(lp)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return LossOut(losses, *_rewards(lp, beta))


def ipo(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17:  (h - 1 / (2 tau))^2 with tau = beta.

    The paper's convention: log-ratios summed over tokens. `ipo_norm` divides each log-ratio by its response
    length (the convention of TRL and HALOs), which changes what a given tau means: with sums, the target
    margin 1/(2 tau) is in nats per sequence; with means, in nats per token.
    """
    losses = (_h(lp) - 1 / (2 * beta)) ** 2
    return LossOut(losses, *_rewards(lp, beta))


def ipo_norm(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """IPO (arXiv:2310.12036, Eq. 17) on length-normalised log-ratios (TRL/HALOs convention):
    (r(y_w)/|y_w| - r(y_l)/|y_l| - 1/(2 tau))^2, tau = beta."""
    h = lp.chosen_logratios() / lp.chosen_lengths - lp.rejected_logratios() / lp.rejected_lengths
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOut(losses, *_rewards(lp, beta))


def hinge(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) / RSO (Liu et al. 2023, arXiv:2309.06657):
    max(0, 1 - beta h)."""
    losses = torch.relu(1 - beta * _h(lp))
    return LossOut(losses, *_rewards(lp, beta))


def rpo(lp: Logps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOut:
    """RPO / Iterative RPO, Pang et al. 2024 (arXiv:2404.19733): DPO plus a length-normalised NLL
    on the chosen response:  -log sigma(beta h) - alpha log pi(y_w|x) / |y_w|."""
    nll = -lp.policy_chosen_logps / lp.chosen_lengths  # (B,) mean-token NLL of y_w
    losses = -F.logsigmoid(beta * _h(lp)) + alpha * nll
    return LossOut(losses, *_rewards(lp, beta))


def nca_pair(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """NCA (pairwise), Chen et al. 2024 (arXiv:2402.05369), with K = 2 responses, r = beta * log-ratio:
    -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l). Optimises absolute likelihoods, so the
    chosen reward is pushed up rather than only the margin."""
    r_w, r_l = beta * lp.chosen_logratios(), beta * lp.rejected_logratios()
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return LossOut(losses, r_w.detach(), r_l.detach())


def bco_pair(lp: Logps, running: RunningMean, *, beta: float = 0.1) -> LossOut:
    """BCO (pairwise), Jung et al. 2024 (arXiv:2404.04656): a binary classifier with logit r - delta,
    r = beta * log-ratio:  -log sigma(r_w - delta) - log sigma(-(r_l - delta)).

    delta is the reward shift: here the mean of every chosen and rejected reward of all previous optimiser
    steps (0 at the first), so it is the same on every process; `running` carries it and the loop updates it.
    """
    delta = running.mean
    r_w, r_l = beta * lp.chosen_logratios(), beta * lp.rejected_logratios()
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    return LossOut(losses, r_w.detach(), r_l.detach())


def sppo_hard(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """SPPO with hard labels, Wu et al. 2024 (arXiv:2405.00675), with P(y_w > y_l) = 1, eta = 1/beta:
    (r(y_w) - 1/(2 beta))^2 + (r(y_l) + 1/(2 beta))^2 on raw log-ratios r: the winner's log-ratio is
    regressed to +eta/2 and the loser's to -eta/2."""
    lr_w, lr_l = lp.chosen_logratios(), lp.rejected_logratios()
    losses = (lr_w - 1 / (2 * beta)) ** 2 + (lr_l + 1 / (2 * beta)) ** 2
    return LossOut(losses, *_rewards(lp, beta))


def apo_zero(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), with r = beta * log-ratio:
    (1 - sigma(r_w)) + sigma(r_l). Pushes chosen up and rejected down: use when y_w is better than the
    current model's outputs."""
    r_w, r_l = beta * lp.chosen_logratios(), beta * lp.rejected_logratios()
    losses = 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)
    return LossOut(losses, r_w.detach(), r_l.detach())


def apo_down(lp: Logps, *, beta: float = 0.1) -> LossOut:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), with r = beta * log-ratio:
    sigma(r_w) + (1 - sigma(r_w - r_l)). Pushes both down, the rejected more: use when y_w is worse than the
    current model's outputs."""
    r_w, r_l = beta * lp.chosen_logratios(), beta * lp.rejected_logratios()
    losses = torch.sigmoid(r_w) + 1 - torch.sigmoid(r_w - r_l)
    return LossOut(losses, r_w.detach(), r_l.detach())


def exo_pair(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOut:
    """EXO (pairwise), Ji et al. 2024 (arXiv:2402.00856), with K = 2: the reverse KL from the model's
    distribution over the pair, p = softmax(beta r_w, beta r_l) = (sigma(beta h), sigma(-beta h)), to the
    label distribution (1 - eps, eps):
        sigma(beta h) [log sigma(beta h) - log(1 - eps)] + sigma(-beta h) [log sigma(-beta h) - log eps].
    eps > 0 keeps log eps finite."""
    h = _h(lp)
    eps = label_smoothing
    losses = (torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log(1 - eps))
              + torch.sigmoid(-beta * h) * (F.logsigmoid(-beta * h) - math.log(eps)))
    return LossOut(losses, *_rewards(lp, beta))


def discopop(lp: Logps, *, beta: float = 0.05, tau: float = 0.05) -> LossOut:
    """DiscoPOP (log-ratio modulated loss), Chris Lu et al. 2024 (arXiv:2406.08414):
    rho = sigma(beta h / tau);  (1 - rho) (-log sigma(beta h)) + rho exp(-beta h):
    a logistic (DPO) loss for small margins blended into an exponential loss for large ones."""
    logits = beta * _h(lp)
    rho = torch.sigmoid(logits / tau)
    losses = (1 - rho) * -F.logsigmoid(logits) + rho * torch.exp(-logits)
    return LossOut(losses, *_rewards(lp, beta))


def aot(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOut:
    """AOT (unpaired form), Melnyk et al. 2024 (arXiv:2406.05882): distributional alignment via
    optimal transport in 1-D, i.e. the (label-smoothed) DPO loss on sorted quantiles:
        delta_(i) = sort(r_w)_(i) - sort(r_l)_(i);  -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta).
    It asks the chosen rewards to dominate the rejected ones in distribution (first-order stochastic
    dominance), not pair by pair. The quantiles are those of the B pairs given: in training, one micro-batch
    of train.batch_size pairs on one process (LossSpec.per_micro_batch), not the whole optimiser step."""
    chosen_sorted, _ = torch.sort(lp.chosen_logratios())
    rejected_sorted, _ = torch.sort(lp.rejected_logratios())
    delta = chosen_sorted - rejected_sorted  # (B,) quantile i of chosen minus quantile i of rejected
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    return LossOut(losses, *_rewards(lp, beta))


# ----------------------------------------------------------------------------------------------------------
# reference-free losses on pairs
# ----------------------------------------------------------------------------------------------------------

def simpo(lp: Logps, *, beta: float = 2.0, gamma: float = 1.0) -> LossOut:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734): -log sigma(beta l(y_w) - beta l(y_l) - gamma),
    l(y) = log pi(y|x) / |y|. No reference. Paper settings: beta 2.0-2.5, gamma/beta 0.3-0.8; defaults
    beta 2, gamma 1 (gamma/beta = 0.5). Rewards reported: beta l(y), the paper's implicit reward."""
    chosen_rewards = beta * lp.policy_chosen_logps / lp.chosen_lengths  # (B,)
    rejected_rewards = beta * lp.policy_rejected_logps / lp.rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOut(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(lp: Logps, *, lam: float = 0.1) -> LossOut:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691). No reference:
        NLL(y_w) - lam log sigma(log odds(y_w) - log odds(y_l)),
    with p(y) = exp(l(y)) the geometric-mean token probability, odds = p / (1 - p), NLL = -l(y_w).
    Paper: lam = 0.1. Rewards reported: log odds(y), so accuracy = odds(y_w) > odds(y_l)."""
    mean_chosen = lp.policy_chosen_logps / lp.chosen_lengths  # (B,) l(y_w)
    mean_rejected = lp.policy_rejected_logps / lp.rejected_lengths
    log_odds_chosen = mean_chosen - _log1mexp(mean_chosen)  # log p - log(1 - p)
    log_odds_rejected = mean_rejected - _log1mexp(mean_rejected)
    losses = -mean_chosen - lam * F.logsigmoid(log_odds_chosen - log_odds_rejected)
    return LossOut(losses, log_odds_chosen.detach(), log_odds_rejected.detach())


# ----------------------------------------------------------------------------------------------------------
# unpaired
# ----------------------------------------------------------------------------------------------------------

def kto(ulp: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> LossOut:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), the constant lambda_y dropped:
        desirable:   lambda_D (1 - sigma(beta (r - z0)))
        undesirable: lambda_U (1 - sigma(beta (z0 - r)))
    z0 = max(0, KL estimate), detached: the mean log-ratio of mismatched (x, y') pairs of the optimiser step.
    The paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]. An example counts as ranked right when
    its log-ratio lies on its side of z0."""
    r = ulp.logratios()  # (B,)
    if ulp.kl_estimate is None:
        raise ValueError("KTO needs the step's KL estimate (LossSpec.kl_estimate); this batch has none")
    z0 = ulp.kl_estimate.detach().clamp(min=0)
    desirable = ulp.desirable
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    rewards = (beta * r).detach()
    correct = torch.where(desirable, r > z0, r < z0)
    return LossOut(losses, rewards[desirable], rewards[~desirable], correct.detach())


# ----------------------------------------------------------------------------------------------------------
# modifiers: pure transforms composed with a loss by bind()
# ----------------------------------------------------------------------------------------------------------

def ld_dpo(lp: Logps, *, alpha: float) -> Logps:
    """LD-DPO, Liu et al. 2024 (arXiv:2409.06411): tokens past the pair's shared length
    l_p = min(|y_w|, |y_l|) count with weight alpha in the sequence log-prob (policy and reference alike):
        log pi^(y|x) = sum_{t <= l_p} log pi(y_t|.) + alpha sum_{t > l_p} log pi(y_t|.).
    alpha = 1 is the plain sum; smaller alpha removes the length excess that inflates DPO's margins."""
    shared = torch.minimum(lp.chosen_lengths, lp.rejected_lengths).unsqueeze(-1)  # (B, 1)

    def desensitised(tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        if tokens is None or mask is None:
            raise ValueError("LD-DPO needs per-token log-probs; this batch has none")
        position = mask.cumsum(-1)  # (B, T) 1-based index of each response token
        weight = torch.where(position <= shared, 1.0, alpha) * mask
        return (tokens * weight).sum(-1)  # (B,)

    has_ref = lp.ref_chosen_logps is not None
    return dataclasses.replace(
        lp,
        policy_chosen_logps=desensitised(lp.policy_chosen_tokens, lp.chosen_mask),
        policy_rejected_logps=desensitised(lp.policy_rejected_tokens, lp.rejected_mask),
        ref_chosen_logps=desensitised(lp.ref_chosen_tokens, lp.chosen_mask) if has_ref else None,
        ref_rejected_logps=desensitised(lp.ref_rejected_tokens, lp.rejected_mask) if has_ref else None,
    )


def wpo_weights(lp: Logps) -> Tensor:
    """WPO, Zhou et al. 2024 (arXiv:2406.11827), with sampled weight alignment: the pair weight
    w(x, y_w) w(x, y_l), with w(x, y) = exp(mean over t of log [pi(y_t|.) / sum_v pi(v|.)^2]) under the
    current policy, detached. It re-weights off-policy pairs by how likely the policy is to generate them;
    dividing by sum_v pi^2 makes a token the policy would sample typically weigh about 1."""
    def log_weight(tokens: Tensor | None, sq_mass: Tensor | None, mask: Tensor | None,
                   lengths: Tensor) -> Tensor:
        if tokens is None or sq_mass is None or mask is None:
            raise ValueError("WPO needs per-token log-probs and squared-probability mass; this batch has none")
        return ((tokens - sq_mass) * mask).sum(-1) / lengths  # (B,)

    log_w = (log_weight(lp.policy_chosen_tokens, lp.policy_chosen_sq_mass, lp.chosen_mask, lp.chosen_lengths)
             + log_weight(lp.policy_rejected_tokens, lp.policy_rejected_sq_mass, lp.rejected_mask,
                          lp.rejected_lengths))
    return torch.exp(log_w).detach()


def f_prime(logratio: Tensor, *, divergence: str, alpha: float = 0.5) -> Tensor:
    """f-DPO, Wang et al. 2023 (arXiv:2309.16240): the derivative f'(u) at u = pi/pi_ref, written
    in the log-ratio r = log u, with additive constants dropped (they cancel in r_w - r_l):
        reverse_kl  f'(u) = log u + 1                 -> r            (DPO)
        forward_kl  f'(u) = -1/u                      -> -exp(-r)
        js          f'(u) = log(2u / (1 + u))         -> r - softplus(r)
        alpha       f'(u) = (1 - u^(-alpha)) / alpha  -> (1 - exp(-alpha r)) / alpha,  0 < alpha < 1
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return -torch.exp(-logratio)
    if divergence == "js":
        return logratio - F.softplus(logratio)
    if divergence == "alpha":
        return (1 - torch.exp(-alpha * logratio)) / alpha
    raise ValueError(f"unknown divergence {divergence!r}; choose from {list(DIVERGENCES)}")


DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
WEIGHTINGS = ("none", "wpo")


# ----------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOut]
    summary: str
    needs_reference: bool = True
    """False: the trainer never loads or runs a reference model."""
    length_normalised: bool = False
    """Uses mean-token log-probs l(y) = log pi(y|x) / |y| (documentation; lengths always come along)."""
    nll: bool = False
    """Adds an NLL (SFT) term on the chosen response."""
    unpaired: bool = False
    """Trains on unpaired {prompt, completion, label} data; the loop reads that format."""
    kl_estimate: bool = False
    """Needs the batch KL estimate: one extra no-grad forward over mismatched (x_i, y_j) rows."""
    running_state: bool = False
    """`fn(lp, running, ...)` takes a `RunningMean` the loop owns and updates after every step."""
    per_micro_batch: bool = False
    """Couples the pairs of one micro-batch (AOT's sort over train.batch_size pairs on one process), so a step's
    loss is the mean over its micro-batches and depends on batch_size, not only on the step's pairs: the one
    exception to batch x accumulation x processes invariance (docs/losses.md)."""

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword-only hyperparameters and their defaults, read from the function's signature."""
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def needs(self) -> list[str]:
        flags = ["reference" if self.needs_reference else "no reference"]
        flags += [name for name, on in (("length-normalised", self.length_normalised), ("NLL", self.nll),
                                        ("unpaired data", self.unpaired), ("KL estimate", self.kl_estimate),
                                        ("running state", self.running_state),
                                        ("sorts each micro-batch", self.per_micro_batch)) if on]
        return flags


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, "-log sigma(beta h); label_smoothing>0 gives cDPO (arXiv:2305.18290)"),
    "cdpo": LossSpec(cdpo, "-(1-eps) log sigma(beta h) - eps log sigma(-beta h): noisy labels (Mitchell 2023)"),
    "robust": LossSpec(robust, "unbiased DPO under label-flip rate eps, /(1-2eps) (arXiv:2403.00409)"),
    "ipo": LossSpec(ipo, "(h - 1/(2 beta))^2 on summed log-ratios, the IPO paper (arXiv:2310.12036)"),
    "ipo_norm": LossSpec(ipo_norm, "(h - 1/(2 beta))^2, length-normalised log-ratios (TRL/HALOs; arXiv:2310.12036)",
                         length_normalised=True),
    "hinge": LossSpec(hinge, "max(0, 1 - beta h), SLiC-HF / RSO (arXiv:2305.10425, 2309.06657)"),
    "rpo": LossSpec(rpo, "dpo + alpha * mean-token NLL of y_w (arXiv:2404.19733)", nll=True,
                    length_normalised=True),
    "nca_pair": LossSpec(nca_pair, "-log s(r_w) - .5 log s(-r_w) - .5 log s(-r_l) (arXiv:2402.05369)"),
    "bco_pair": LossSpec(bco_pair, "-log s(r_w - delta) - log s(delta - r_l), delta running mean reward "
                         "(arXiv:2404.04656)", running_state=True),
    "sppo_hard": LossSpec(sppo_hard, "(lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2 (arXiv:2405.00675)"),
    "apo_zero": LossSpec(apo_zero, "1 - s(r_w) + s(r_l): chosen up, rejected down (arXiv:2408.06266)"),
    "apo_down": LossSpec(apo_down, "s(r_w) + 1 - s(r_w - r_l): both down, rejected more (arXiv:2408.06266)"),
    "exo_pair": LossSpec(exo_pair, "KL(softmax(beta r) over the pair || [1-eps, eps]) (arXiv:2402.00856)"),
    "discopop": LossSpec(discopop, "logistic/exponential blend by s(beta h / tau) (arXiv:2406.08414)"),
    "aot": LossSpec(aot, "dpo on sorted quantiles of chosen vs rejected log-ratios (arXiv:2406.05882)",
                    per_micro_batch=True),
    "simpo": LossSpec(simpo, "-log s(beta l(y_w) - beta l(y_l) - gamma), l mean-token logp "
                      "(arXiv:2405.14734)", needs_reference=False, length_normalised=True),
    "orpo": LossSpec(orpo, "NLL(y_w) - lam log s(log odds y_w - log odds y_l) (arXiv:2403.07691)",
                     needs_reference=False, length_normalised=True, nll=True),
    "kto": LossSpec(kto, "lambda (1 - s(beta (r - z0))) per desirable/undesirable completion "
                    "(arXiv:2402.01306)", unpaired=True, kl_estimate=True),
}

MODIFIERS = {
    "loss.weighting=wpo": "WPO pair weights w(y_w) w(y_l) from the policy's token probabilities "
                          "(arXiv:2406.11827)",
    "loss.ld_alpha=A": "LD-DPO: tokens past the shared length weigh A in log pi(y|x) (arXiv:2409.06411)",
    "loss.divergence=D": f"f-DPO: log-ratio -> f'(pi/pi_ref), D in {list(DIVERGENCES)} (arXiv:2309.16240)",
    "loss.ref_sync=soft|hard": "TR-DPO: reference <- alpha policy + (1-alpha) reference every N steps "
                               "(arXiv:2404.09656)",
}


@dataclass(frozen=True)
class BoundLoss:
    """A registered loss with its hyperparameters and modifiers fixed; call it on a batch's log-probs.

    Its properties are what the loop branches on (never the loss's name)."""

    spec: LossSpec
    kwargs: dict[str, float]
    weighting: str = "none"
    ld_alpha: float = 1.0
    divergence: str = "reverse_kl"
    divergence_alpha: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    @property
    def unpaired(self) -> bool:
        return self.spec.unpaired

    @property
    def kl_estimate(self) -> bool:
        return self.spec.kl_estimate

    @property
    def running_state(self) -> bool:
        return self.spec.running_state

    @property
    def needs_token_logps(self) -> bool:
        """Per-token log-probs of policy (and reference) are needed: LD-DPO and WPO."""
        return self.ld_alpha != 1.0 or self.weighting == "wpo"

    @property
    def needs_sq_mass(self) -> bool:
        """The policy's log sum_v pi(v)^2 per token is needed: WPO's weight alignment."""
        return self.weighting == "wpo"

    def __call__(self, lp: Logps | UnpairedLogps, running: RunningMean | None = None) -> LossOut:
        if self.spec.unpaired:
            return self.spec.fn(lp, **self.kwargs)
        assert isinstance(lp, Logps)
        raw = lp
        if self.ld_alpha != 1.0:
            lp = ld_dpo(lp, alpha=self.ld_alpha)
        if self.divergence != "reverse_kl":
            lp = dataclasses.replace(lp, logratio_fn=partial(f_prime, divergence=self.divergence,
                                                             alpha=self.divergence_alpha))
        if self.spec.running_state:
            out = self.spec.fn(lp, running if running is not None else RunningMean(), **self.kwargs)
        else:
            out = self.spec.fn(lp, **self.kwargs)
        if self.weighting == "wpo":
            out = dataclasses.replace(out, losses=out.losses * wpo_weights(raw))  # weights of the raw policy
        return out


def bind(loss: str | LossConfig, beta: float | None = None, params: dict[str, float] | None = None) -> BoundLoss:
    """A loss with its hyperparameters and modifiers fixed, from a whole `LossConfig` or from a name with
    `beta` and `params` (no modifiers): `beta` where the loss takes it (unset = the paper's default), then
    `params`."""
    if isinstance(loss, str):
        from preftune.config import LossConfig  # late: config imports this module lazily too

        loss = LossConfig(name=loss, beta=beta, params=dict(params or {}))
    cfg = loss
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose from {sorted(LOSSES)}")
    spec = LOSSES[cfg.name]
    kwargs = dict(cfg.params)
    if cfg.beta is not None and "beta" in spec.hyperparameters():
        kwargs.setdefault("beta", cfg.beta)
    unknown = set(kwargs) - set(spec.hyperparameters())
    if unknown:
        raise ValueError(f"loss {cfg.name!r} takes no hyperparameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(spec.hyperparameters())}")
    return BoundLoss(spec, kwargs, cfg.weighting, cfg.ld_alpha, cfg.divergence, cfg.divergence_alpha)
