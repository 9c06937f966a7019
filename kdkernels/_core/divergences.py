r"""The divergences that need a second sweep of a row (every kind but forward and reverse KL), in
PyTorch operations, for the PyTorch paths of the softmax-KL, fused-linear and vocab-parallel losses.
The kernels (csrc/cpu/sweeps.h, kdkernels/triton/_common.py) compute the same terms.

Per row, with ``m = beta p_t + (1 - beta) p_s`` (``beta`` the kernels' mixture weight), two sums
``K1``, ``K2`` over the row give the divergence ``D`` and, with it, the gradients (``a = s / T``,
``b = t / T``; the functions return ``T dD/da`` and ``T dD/db``):

    kind 2, generalized JSD    K1 = Σ p_s log(p_s/m)       K2 = Σ p_t log(p_t/m)
                               D = beta K2 + (1 - beta) K1
                               dD/da = (1 - beta) p_s (log(p_s/m) - K1)
                               dD/db = beta p_t (log(p_t/m) - K2)
    kind 3, skew forward KL    KL(p_t || λ p_t + (1 - λ) p_s): beta = λ
                               K1 = R = Σ p_s p_t / m      K2 = Σ p_t log(p_t/m),   D = K2
                               dD/da = -(1 - beta) p_s (p_t/m - R)
                               dD/db = p_t (log(p_t/m) - beta p_t/m - K2 + 1 - (1 - beta) R)
    kind 4, skew reverse KL    KL(p_s || λ p_s + (1 - λ) p_t): beta = 1 - λ
                               K1 = Σ p_s log(p_s/m)       K2 = R = Σ p_s p_t / m,  D = K1
                               dD/da = p_s (log(p_s/m) - (1 - beta) p_s/m - K1 + 1 - beta R)
                               dD/db = -beta p_t (p_s/m - R)
    kind 5, total variation    σ = sign(p_s - p_t)
                               K1 = Σ p_s σ                K2 = Σ |p_s - p_t|,      D = K2 / 2
                               dD/da = p_s (σ - K1) / 2
                               dD/db = p_t (K1 - K2 - σ) / 2      (Σ p_t σ = K1 - K2)

The skew KL's gradients come from ``dD/dp_s = -(1 - λ) p_t / m`` and ``dD/dp_t = log(p_t/m) + 1 -
λ p_t/m`` through the softmax, with ``λ Σ p_t²/m = 1 - (1 - λ) R`` (from ``λ p_t + (1 - λ) p_s = m``),
so that no sum is divided by ``λ``. Terms where a probability is 0 are 0 (``-inf`` logits are
legal); ``sign(0) = 0`` is TVD's subgradient where the two probabilities are equal.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from kdkernels._core.numerics import log_mix, p_times

__all__ = ["KIND_NAMES", "SECOND_SWEEP", "pair_sums", "value", "pair_grads", "mixture_weight"]

KIND_NAMES = {0: "forward", 1: "reverse", 2: "jsd", 3: "skew_forward", 4: "skew_reverse", 5: "tvd"}
SECOND_SWEEP = (2, 3, 4, 5)  # the kinds that need K1, K2 before their gradient


def mixture_weight(kind: int, beta: float, skew: float) -> float:
    """The kernels' ``beta`` of a kind: JSD's own, ``skew`` (kind 3), ``1 - skew`` (kind 4), 0.5 (unused)."""
    if kind == 2:
        return beta
    if kind == 3:
        return skew
    if kind == 4:
        return 1.0 - skew
    return 0.5


def _terms(lps: Tensor, lpt: Tensor, kind: int, beta: float):
    ps, pt = lps.exp(), lpt.exp()
    if kind == 5:
        sigma = torch.where(lps == lpt, torch.zeros_like(lps), torch.sign(lps - lpt))
        return ps, pt, sigma, None
    lm = log_mix(lps, lpt, beta)
    return ps, pt, lps - lm, lpt - lm


def pair_sums(lps: Tensor, lpt: Tensor, kind: int, beta: float) -> Tuple[Tensor, Tensor]:
    """(K1, K2) of ``[R, V]`` log-probabilities (the row sums of the module docstring)."""
    ps, pt, x, y = _terms(lps, lpt, kind, beta)
    if kind == 2:
        return p_times(ps, x).sum(-1), p_times(pt, y).sum(-1)
    if kind == 3:
        return p_times(ps, y.exp()).sum(-1), p_times(pt, y).sum(-1)
    if kind == 4:
        return p_times(ps, x).sum(-1), p_times(pt, x.exp()).sum(-1)
    return (ps * x).sum(-1), (ps - pt).abs().sum(-1)


def value(K1: Tensor, K2: Tensor, kind: int, beta: float) -> Tensor:
    """D from (K1, K2)."""
    if kind == 2:
        return beta * K2 + (1.0 - beta) * K1
    if kind == 3:
        return K2
    if kind == 4:
        return K1
    return 0.5 * K2


def pair_grads(lps: Tensor, lpt: Tensor, K1: Tensor, K2: Tensor, kind: int, beta: float):
    """(T dD/da, T dD/db) of ``[R, V]`` log-probabilities; ``K1``, ``K2`` per row ``[R]``."""
    ps, pt, x, y = _terms(lps, lpt, kind, beta)
    k1, k2 = K1[:, None], K2[:, None]
    if kind == 2:
        return (1.0 - beta) * p_times(ps, x - k1), beta * p_times(pt, y - k2)
    if kind == 3:
        r = y.exp()  # p_t / m
        return (-(1.0 - beta)) * p_times(ps, r - k1), p_times(pt, y - beta * r - k2 + 1.0 - (1.0 - beta) * k1)
    if kind == 4:
        r = x.exp()  # p_s / m
        return p_times(ps, x - (1.0 - beta) * r - k1 + 1.0 - beta * k2), (-beta) * p_times(pt, r - k2)
    return 0.5 * ps * (x - k1), 0.5 * pt * (k1 - k2 - x)
