"""Pointwise KL divergence with the semantics of ``torch.nn.functional.kl_div``, row-chunked.

``F.kl_div(input, target)`` (``input`` = log-probabilities) materializes the pointwise loss and
several temporaries of the input's full size, in float32 for reduced-precision inputs. Here the
loss is summed over row chunks of at most ``CHUNK_ELEMS`` elements and the input gradient
(``-target`` or ``-exp(target)``, times the reduction's scale) is written in the forward pass, so
the only full-size allocation is that gradient. Backward only scales it.

Used by :class:`kdkernels.nn.KLDivLoss` whenever the reduction is not ``"none"``, the shapes match
and the target needs no gradient; otherwise it defers to ``F.kl_div``.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMS = 1 << 20


class ChunkedKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, log_target: bool, scale: float):
        x2 = input.reshape(-1, input.shape[-1]) if input.dim() else input.reshape(1, 1)
        t2 = target.reshape(x2.shape)
        rows = max(1, CHUNK_ELEMS // max(1, x2.shape[1]))
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=input.device)
        grad = torch.empty_like(x2) if input.requires_grad else None
        for i in range(0, x2.shape[0], rows):
            x = x2[i:i + rows].to(acc)
            tg = t2[i:i + rows].to(acc)
            if log_target:
                p = tg.exp()
                total += (p * (tg - x)).sum()       # exp(t) (t - x)
            else:
                p = tg
                total += (torch.xlogy(tg, tg) - tg * x).sum()  # t log t - t x
            if grad is not None:
                grad[i:i + rows] = p * -scale  # d/dx = -p (never in place: p may be the target itself)
        ctx.save_for_backward(grad.reshape(input.shape) if grad is not None else None)
        return (total * scale).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None
