"""Temperature scaling (Guo et al., ICML 2017), vectorised over many candidate predictors at once.

Greedy policy search (:mod:`ltta.tta.gps`) scores every pool member by the *calibrated*
log-likelihood of the ensemble it would make, so one temperature is fitted per candidate at every
greedy step: hundreds of one-dimensional fits. The reference (bayesgroup/gps-augment
``metrics.py``, ``ts``) runs scipy's Nelder-Mead on T for each, one at a time. Here the fit is over
beta = 1/T, where the NLL ``mean_n [logsumexp(beta z_n) - beta z_n,y]`` is convex (its second
derivative is the mean variance of z under softmax(beta z)), so its derivative is monotone and a
bisection on log beta finds the one minimum for all candidates together, one softmax per step, on
whatever device the logits are on. The same optimum as Nelder-Mead wherever that converges.
"""

from __future__ import annotations

import math

import torch

#: beta = 1/T is searched in [1/BETA_RANGE, BETA_RANGE]; a fit at an end means the minimum lies beyond it
BETA_RANGE = 1000.0
_STEPS = 40  # bisection steps on log beta: the bracket (13.8 wide) shrinks below 1e-10


def _nll_slope(z: torch.Tensor, y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """d NLL / d beta for logits ``z`` [..., N, K] at ``beta`` [...]: mean_n (E_softmax(beta z)[z] - z_y)."""
    scaled = z * beta[..., None, None]
    p = torch.softmax(scaled, dim=-1)
    z_true = z.gather(-1, y.expand(*z.shape[:-1])[..., None]).squeeze(-1)
    return ((p * z).sum(-1) - z_true).mean(-1)


def _finite(z: torch.Tensor) -> torch.Tensor:
    """Log-probabilities may hold -inf (a class with probability 0): clamp so that beta * z stays finite."""
    return z.float().clamp_min(math.log(torch.finfo(torch.float32).tiny))


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The NLL-minimising temperature of ``logits`` [..., N, K] (or log-probabilities) for labels ``y`` [N].

    Returns T with the leading shape ``[...]`` (a 0-d tensor for one predictor). Vectorised over the
    leading dimensions: each gets its own T.
    """
    if logits.dim() < 2 or logits.shape[-2] != y.shape[0] or y.dim() != 1:
        raise ValueError(f"fit_temperature: logits [..., N, K] and labels [N], got {tuple(logits.shape)} and {tuple(y.shape)}")
    z = _finite(logits)
    yl = y.to(z.device).long()
    lo = torch.full(z.shape[:-2], -math.log(BETA_RANGE), device=z.device)
    hi = torch.full_like(lo, math.log(BETA_RANGE))
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        rising = _nll_slope(z, yl, mid.exp()) > 0  # past the minimum: it lies below mid
        hi = torch.where(rising, mid, hi)
        lo = torch.where(rising, lo, mid)
    return 1.0 / ((lo + hi) / 2).exp()


def scaled_log_probs(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``log_softmax(logits / T)`` with T broadcast over the leading dimensions of ``logits`` [..., N, K]."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    return torch.log_softmax(_finite(logits) / t[..., None, None], dim=-1)


def nll_of(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood [...] of ``log_probs`` [..., N, K] for labels ``y`` [N]."""
    yl = y.to(log_probs.device).long()
    return -log_probs.gather(-1, yl.expand(*log_probs.shape[:-1])[..., None]).squeeze(-1).mean(-1)


def calibrated_nll(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(NLL after temperature scaling [...], T [...])``: GPS's calibrated log-likelihood, negated."""
    t = fit_temperature(logits, y)
    return nll_of(scaled_log_probs(logits, t), y), t
