"""DistiLLM's skew forward KL, ``KL(p_t || λ p_t + (1 - λ) p_s)`` with λ = 0.1, at temperature 2,
forward + backward.

Student logits ``s [N, V]`` (requires grad) and teacher logits ``t [N, V]`` (no grad). The eager
formulation is the paper's: both softmaxes, the mixture, its log, the sum (five ``[N, V]`` float32
tensors, most kept for backward); kdkernels computes it in the softmax-KL kernels
(``divergence="skew_forward"``: two row sums, so a streamed row is read three times). Minimum
traffic as :mod:`bench.softmax_kl`: read s and t, write the gradient, ``3 * itemsize * N * V`` bytes.
"""

from __future__ import annotations

import torch

from bench.softmax_kl import variant_family

TEMPERATURE = 2.0
SKEW = 0.1

SHAPES = [(256, 32000), (64, 131072), (512, 131072)]


def eager_loss(s, t):
    T = TEMPERATURE
    ps = torch.softmax(s.float() / T, -1)
    pt = torch.softmax(t.float() / T, -1)
    log_mix = torch.log(SKEW * pt + (1.0 - SKEW) * ps)
    log_pt = torch.log_softmax(t.float() / T, -1)
    return (pt * (log_pt - log_mix)).sum(-1).mean()


def kdkernels_loss(backend):
    import kdkernels

    def loss(s, t):
        return kdkernels.softmax_kl(s, t, temperature=TEMPERATURE, divergence="skew_forward", skew=SKEW,
                                    reduction="mean", backend=backend)

    return loss


FAMILY = variant_family(
    "skew_kl",
    f"skew forward KL(p_t || {SKEW:g} p_t + {1 - SKEW:g} p_s), T={TEMPERATURE}, batch mean, forward+backward",
    eager_loss, kdkernels_loss, SHAPES)
