"""Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, ``torch.compile``'d, which runs on the CPU)
against ``kdkernels.compat.liger.LigerFusedLinearJSDLoss`` (the drop-in, on ``fused_linear_kl``),
weight_hard_loss 0.5, weight_soft_loss 0.5, beta 0.5, T = 1, forward + backward.

Inputs: student hidden ``[N, H]`` and lm_head weight ``[V, H]`` (require grad), teacher hidden and
weight (frozen), labels ``[N]``. Shapes are ``N x H x V``. Liger-Kernel is the reference of the
check column.

As in ``fused_linear_kl`` the loss is bound by its matrix products; the minimum bytes (read the four
inputs, write the two gradients) are reported for completeness.
"""

from __future__ import annotations

import torch

from bench.common import Family, Provider, peer_provider
from bench.fused_linear_kl import make_inputs as _fl_inputs, min_bytes

SHAPES = [(1024, 512, 32768)]
QUICK_SHAPES = [(256, 256, 8192)]
KW = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)


def make_inputs(shape, dtype, device, seed=0):
    inputs = _fl_inputs(shape, dtype, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    inputs["labels"] = torch.randint(0, shape[2], (shape[0],), device=device, generator=g)
    return inputs


def _import_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(**KW, compiled=True)


def _loss(module):
    def loss(hs, Ws, ht, Wt, labels):
        return module(hs, Ws, ht, Wt, labels)

    return loss


def providers(device, notes):
    from kdkernels.compat.liger import LigerFusedLinearJSDLoss

    original = peer_provider("liger", _import_liger, _loss, notes, "pip install liger-kernel==0.8.5")
    return [*original, Provider("kdkernels-compat", _loss(LigerFusedLinearJSDLoss(**KW)))]


FAMILY = Family(name="compat_liger", title="Liger-Kernel LigerFusedLinearJSDLoss vs its kdkernels drop-in",
                shapes=SHAPES, quick_shapes=QUICK_SHAPES, tiny_shape=(4, 32, 256), make_inputs=make_inputs,
                min_bytes=min_bytes, providers=providers, dims="N×H×V")
