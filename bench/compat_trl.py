"""TRL's ``GKDTrainer.generalized_jsd_loss`` against ``kdkernels.compat.trl.generalized_jsd_loss``
(the drop-in), beta = 0.5, T = 1, ``reduction="batchmean"``, forward + backward.

Inputs: student logits ``s [N, V]`` (requires grad), teacher logits ``t [N, V]`` (frozen), same
dtype. TRL computes in the input dtype and materializes the mixture and both log-softmaxes; the
shim runs the fused softmax-KL kernel in float32. TRL is the reference of the check column, so
in bf16 that column measures TRL's own bf16 rounding.

Minimum traffic: read s and t and write grad_s once each, ``3 * itemsize * N * V`` bytes.
"""

from __future__ import annotations

import torch

from bench.common import Family, Provider, peer_provider
from bench.softmax_kl import _import_trl

SHAPES = [(4096, 32768)]
QUICK_SHAPES = [(512, 32768)]


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return {"s": torch.randn(shape, device=device, generator=g).to(dtype).requires_grad_(),
            "t": torch.randn(shape, device=device, generator=g).to(dtype)}


def min_bytes(shape, dtype):
    n, v = shape
    return 3 * n * v * torch.empty((), dtype=dtype).element_size()


def _loss(fn):
    def loss(s, t):
        return fn(s, t, beta=0.5, temperature=1.0, reduction="batchmean")

    return loss


def providers(device, notes):
    from kdkernels.compat.trl import generalized_jsd_loss

    original = peer_provider("trl", _import_trl, _loss, notes, "pip install .[bench]")
    return [*original, Provider("kdkernels-compat", _loss(generalized_jsd_loss))]


FAMILY = Family(name="compat_trl", title="TRL generalized_jsd_loss (beta 0.5) vs its kdkernels drop-in",
                shapes=SHAPES, quick_shapes=QUICK_SHAPES, tiny_shape=(2, 512), make_inputs=make_inputs,
                min_bytes=min_bytes, providers=providers)
