"""torchtune's ``ForwardKLLoss`` against ``kdkernels.compat.torchtune.ForwardKLLoss`` (the drop-in),
forward + backward.

Inputs: student logits ``s [N, V]`` (requires grad), teacher logits ``t [N, V]``, labels ``[N]``
(one in eight ignored). torchtune computes ``-sum softmax(t) log_softmax(s)`` in float32 with
masking; the shim runs the fused kernel plus the teacher's entropy. torchtune is the reference of
the check column.

Minimum traffic: read s and t and write grad_s once each, ``3 * itemsize * N * V`` bytes (the
labels' ``8 N`` bytes are left out).
"""

from __future__ import annotations

import torch

from bench.common import Family, Provider, peer_provider

SHAPES = [(4096, 32768)]
QUICK_SHAPES = [(512, 32768)]


def make_inputs(shape, dtype, device, seed=0):
    n, v = shape
    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::8] = -100
    return {"s": torch.randn(shape, device=device, generator=g).to(dtype).requires_grad_(),
            "t": torch.randn(shape, device=device, generator=g).to(dtype), "labels": labels}


def min_bytes(shape, dtype):
    n, v = shape
    return 3 * n * v * torch.empty((), dtype=dtype).element_size()


def _import_torchtune():
    from torchtune.modules.loss import ForwardKLLoss

    return ForwardKLLoss()


def _loss(module):
    def loss(s, t, labels):
        return module(s, t, labels)

    return loss


def providers(device, notes):
    from kdkernels.compat.torchtune import ForwardKLLoss

    original = peer_provider("torchtune", _import_torchtune, _loss, notes,
                             "pip install --no-deps torchtune==0.6.1 torchao==0.13.0 && pip install omegaconf "
                             "sentencepiece tiktoken blobfile")
    return [*original, Provider("kdkernels-compat", _loss(ForwardKLLoss()))]


FAMILY = Family(name="compat_torchtune", title="torchtune ForwardKLLoss vs its kdkernels drop-in",
                shapes=SHAPES, quick_shapes=QUICK_SHAPES, tiny_shape=(2, 512), make_inputs=make_inputs,
                min_bytes=min_bytes, providers=providers)
