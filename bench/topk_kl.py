"""Top-k teacher KL: forward KL(p_t || p_s) to a teacher stored as its top-k log-probabilities,
the mass outside the top-k dropped (``tail="ignore"``: the top-k renormalized), T = 1, forward +
backward (the gradient to the student logits).

Inputs: student logits ``s [N, V]`` (requires grad); the teacher's top-k ``values`` (float32
log-probabilities) and ``indices`` (int64) ``[N, k]``, made once from random teacher logits as
``log_softmax(t).topk(k)``. Shapes are ``N x V x k``. The loss is the batch mean over rows.

Eager PyTorch scatters the top-k into a dense ``[N, V]`` teacher distribution (what a user without
a sparse kernel writes) and calls ``kl_div`` on the student's float32 log-softmax.

Minimum traffic of one forward+backward: read s and write its gradient once each, in the input
dtype, and read the top-k values and indices: ``2 * itemsize * N * V + (4 + 8) * N * k`` bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, kdkernels_providers

TAIL = "ignore"

SHAPES = [(4096, 131072, 64), (4096, 32768, 256)]  # N x V x k
QUICK_SHAPES = [(512, 32768, 64)]


def make_inputs(shape, dtype, device, seed=0):
    n, v, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randn(n, v, device=device, generator=g) * 3
    top = torch.log_softmax(t, -1).topk(k, -1)
    del t
    return {"s": s, "values": top.values.contiguous(), "indices": top.indices.contiguous()}


def min_bytes(shape, dtype):
    n, v, k = shape
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * item * n * v + (4 + 8) * n * k


def eager_loss(s, values, indices):
    # the dense teacher: the top-k log-probabilities at their indices, -inf elsewhere, renormalized.
    # kl_div gets probabilities as its target: with log_target=True a -inf entry gives
    # exp(-inf) * (-inf - x) = nan.
    log_pt = torch.full(s.shape, -math.inf, device=s.device).scatter_(-1, indices, values)
    pt = torch.softmax(log_pt, -1)
    return F.kl_div(F.log_softmax(s.float(), -1), pt, reduction="batchmean")


def kdkernels_loss(backend):
    import kdkernels

    def loss(s, values, indices):
        return kdkernels.topk_kl(s, values, indices, topk_format="logprobs", tail=TAIL, temperature=1.0,
                                 backend=backend)

    return loss


def providers(device, notes):
    ours = kdkernels_providers(device, kdkernels_loss, notes)
    if any(p.name == "kdkernels-cuda" for p in ours):
        notes.append("kdkernels-cuda not run: topk_kl has no CUDA C++ kernel (Triton runs it on CUDA)")
        ours = [p for p in ours if p.name != "kdkernels-cuda"]
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *ours]


FAMILY = Family(
    name="topk_kl",
    title=f"forward KL to a top-k teacher (log-probabilities, tail {TAIL}), T=1, batch mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(2, 512, 8),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
    dims="N×V×k",
)
