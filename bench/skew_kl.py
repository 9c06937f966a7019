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

from bench.common import CompiledProvider, Family, Provider, kdkernels_providers
from bench.softmax_kl import make_inputs, min_bytes

TEMPERATURE = 2.0
SKEW = 0.1

SHAPES = [(256, 32000), (64, 131072), (512, 131072)]
QUICK_SHAPES = [(256, 32000)]


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


def providers(device, notes):
    ours = [p for p in kdkernels_providers(device, kdkernels_loss, notes) if p.name != "kdkernels-cuda"]
    if device == "cuda":
        notes.append("kdkernels-cuda skipped: the CUDA C++ kernel has forward, reverse KL and JSD only (Triton "
                     "has the skew KL)")
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *ours]


FAMILY = Family(
    name="skew_kl",
    title=f"skew forward KL(p_t || {SKEW:g} p_t + {1 - SKEW:g} p_s), T={TEMPERATURE}, batch mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(2, 5000),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
)
