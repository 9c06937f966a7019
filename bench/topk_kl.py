"""Top-k teacher KL: forward KL(p_t || p_s) to a teacher stored as its top-k log-probabilities,
the missing mass spread uniformly over the other V - k entries (``tail="uniform"``), T = 1,
forward + backward.

Inputs: student logits ``s [N, V]`` (requires grad); the teacher's top-k ``values`` (float32
log-probabilities) and ``indices`` (int64) ``[N, k]``, made once from random teacher logits. Shapes
are ``N x V x k``. Eager PyTorch scatters the top-k into a dense ``[N, V]`` teacher log-distribution
(what a user without a sparse kernel writes) and calls ``kl_div`` on the student's log-softmax.

Minimum traffic: read s once, write its gradient once, read the top-k: ``2 N V itemsize + 12 N k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, kdkernels_providers

SHAPES = [(4096, 32768, 64), (2048, 131072, 64)]
QUICK_SHAPES = [(512, 32768, 64)]


def make_inputs(shape, dtype, device, seed=0):
    n, v, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randn(n, v, device=device, generator=g) * 3
    top = torch.log_softmax(t, -1).topk(k, -1)
    return {"s": s, "values": top.values.contiguous(), "indices": top.indices.contiguous()}


def min_bytes(shape, dtype):
    n, v, k = shape
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * n * v * item + 12 * n * k


def eager_loss(s, values, indices):
    n, v = s.shape
    k = values.shape[-1]
    mass = (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    log_pt = torch.full((n, v), 0.0, device=s.device).add_(torch.log(mass) - math.log(v - k))
    log_pt = log_pt.scatter(-1, indices, values)
    return F.kl_div(F.log_softmax(s.float(), -1), log_pt, reduction="batchmean", log_target=True)


def kdkernels_loss(backend):
    import kdkernels

    def loss(s, values, indices):
        return kdkernels.topk_kl(s, values, indices, tail="uniform", backend=backend)

    return loss


def providers(device, notes):
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss),
            *kdkernels_providers(device, kdkernels_loss, notes)]


FAMILY = Family(
    name="topk_kl",
    title="forward KL to a top-k teacher (uniform tail), T=1, batch mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(2, 512, 8),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
)
