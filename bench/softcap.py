"""Soft-capped softmax-KL: Gemma 2's ``final_logit_softcapping`` (30) on both models' logits, then
forward KL(p_t || p_s) at temperature 2, forward + backward.

Student logits ``s [N, V]`` (requires grad) and teacher logits ``t [N, V]`` (no grad) of std 20,
where the cap bends the logits; eager PyTorch writes ``c * tanh(z / c)`` as two more ``[N, V]``
tensors (and keeps them for backward), kdkernels applies it inside the kernel
(``student_softcap`` / ``teacher_softcap``). Minimum traffic as :mod:`bench.softmax_kl`: read s and
t, write the gradient, ``3 * itemsize * N * V`` bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.softmax_kl import variant_family

TEMPERATURE = 2.0
CAP = 30.0

SHAPES = [(256, 32000), (64, 131072), (512, 131072)]


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(shape, device=device, generator=g) * 20).to(dtype).requires_grad_()
    t = (torch.randn(shape, device=device, generator=g) * 20).to(dtype)
    return {"s": s, "t": t}


def eager_loss(s, t):
    # What a user writes today: the cap, then log_softmax + kl_div, in float32
    T = TEMPERATURE
    cs, ct = CAP * torch.tanh(s.float() / CAP), CAP * torch.tanh(t.float() / CAP)
    return F.kl_div(F.log_softmax(cs / T, -1), F.log_softmax(ct / T, -1), reduction="batchmean", log_target=True)


def kdkernels_loss(backend):
    import kdkernels

    def loss(s, t):
        return kdkernels.softmax_kl(s, t, temperature=TEMPERATURE, reduction="mean", student_softcap=CAP,
                                    teacher_softcap=CAP, backend=backend)

    return loss


FAMILY = variant_family(
    "softcap", f"soft-capped (c={CAP:g}) forward KL(p_t || p_s), T={TEMPERATURE}, batch mean, forward+backward",
    eager_loss, kdkernels_loss, SHAPES, inputs=make_inputs)
