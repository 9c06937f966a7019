"""Pointwise divergences of log-probabilities, row-chunked: the semantics of
``torch.nn.functional.kl_div`` and of Liger-Kernel's ``LigerJSD``.

Both take log-probabilities (never logits) and differentiate the loss *as a function of the
numbers given*, element by element: nothing is renormalized, so the gradient is the same whether or
not a ``log_softmax`` comes before the loss. The loss is summed over row chunks of at most
``CHUNK_ELEMS`` elements in float32 (float64 for float64 inputs) and the input gradient is written
in the forward pass, in the input's dtype, so the only full-size allocation is that gradient;
backward only scales it by ``grad_output`` (and hands it over as it is when that is 1). On CPU
tensors ``ChunkedLogProbJSD`` runs the C++ kernel csrc/cpu/logprob_jsd.cpp instead (one sweep of
each row, rows read through their strides).

``ChunkedKLDiv`` (``x`` = input log-probabilities, ``t`` = target, ``log_target`` as in torch):
    loss = sum t (log t - x)            d/dx = -t
    loss = sum e^t (t - x)              d/dx = -e^t          (log_target)
with ``0 log 0 = 0`` (``xlogy``, as torch), or, given ``eps``, Liger's ``t (log max(t, eps) - x)``.

``ChunkedLogProbJSD`` (Liger's generalized JSD; ``X = log q`` the student, ``Y = log p`` the
teacher, ``log m = log(beta e^Y + (1 - beta) e^X)``):
    beta = 0:  loss = sum e^Y (Y - X)                               d/dX = -e^Y
    beta = 1:  loss = sum e^X (X - Y)                               d/dX = e^X (X - Y) + e^X
    else:      loss = sum beta e^Y (Y - log m) + (1 - beta) e^X (X - log m)
                                                                   d/dX = (1 - beta) e^X (X - log m)
(the last because d log m / dX = (1 - beta) e^X / m, and the two terms it adds cancel). Terms
whose probability is exactly 0 (a ``-inf`` log-probability) contribute 0 to the loss and the
gradient; a NaN propagates.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import _ext
from kdkernels.ops.rows import rows3

CHUNK_ELEMS = 1 << 20


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scaled(grad: Tensor, grad_output: Tensor) -> Tensor:
    """The saved gradient times grad_output; the saved gradient itself when that is 1 (loss.backward())."""
    from kdkernels.ops.softmax_kl import _is_one

    return grad if _is_one(grad_output) else grad * grad_output.to(grad.dtype)


def _times(p: Tensor, d: Tensor) -> Tensor:
    # p * d where p != 0, else 0 (a zero probability times an infinite log ratio); NaN stays NaN
    return torch.where(p == 0, torch.zeros_like(p), p * d)


class ChunkedKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, log_target: bool, scale: float, eps: Optional[float],
                out_dtype: torch.dtype):
        x2 = input.reshape(-1, input.shape[-1]) if input.dim() else input.reshape(1, 1)
        t2 = target.reshape(x2.shape)
        rows = max(1, CHUNK_ELEMS // max(1, x2.shape[1]))
        acc = _acc(input)
        total = torch.zeros((), dtype=acc, device=input.device)
        grad = torch.empty_like(x2, memory_format=torch.contiguous_format) if input.requires_grad else None
        for i in range(0, x2.shape[0], rows):
            x = x2[i:i + rows].to(acc)
            tg = t2[i:i + rows].to(acc)
            if log_target:
                p = tg.exp()
                total += (p * (tg - x)).sum()                  # e^t (t - x)
            elif eps is None:
                p = tg
                total += (torch.xlogy(tg, tg) - tg * x).sum()  # t log t - t x
            else:
                p = tg
                total += (tg * (tg.clamp_min(eps).log() - x)).sum()  # Liger: t (log max(t, eps) - x)
            if grad is not None:
                grad[i:i + rows] = p * -scale  # d/dx = -p (never in place: p may be the target itself)
        ctx.save_for_backward(grad.reshape(input.shape) if grad is not None else None)
        return (total * scale).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        return _scaled(grad, grad_output), None, None, None, None, None


class ChunkedLogProbJSD(torch.autograd.Function):
    """``sum over kept rows of JSD_beta(X, Y) * scale`` (see the module docstring), in ``X``'s dtype;
    the gradient goes to ``X`` only (the teacher ``Y`` is a constant, as in Liger). CPU tensors run
    the C++ kernel (csrc/cpu/logprob_jsd.cpp: one sweep of each row, rows read through their
    strides) when the extension is built; other devices the row chunks of PyTorch operations below."""

    @staticmethod
    def forward(ctx, log_q: Tensor, log_p: Tensor, keep: Optional[Tensor], beta: float, scale: Tensor):
        V = log_q.shape[-1]
        if log_q.device.type == "cpu" and _ext.available() and \
                (log_q.dtype == torch.float64) == (log_p.dtype == torch.float64):
            rows, grad = _ext._C.logprob_jsd_forward_cpu(rows3(log_q), rows3(log_p), keep, float(beta),
                                                          float(scale), log_q.requires_grad)
            ctx.save_for_backward(grad.view(log_q.shape) if grad is not None else None)
            return (rows.sum() * scale.to(rows.dtype)).to(log_q.dtype)
        x2, y2 = log_q.reshape(-1, V), log_p.reshape(-1, V)
        kp = None if keep is None else keep.reshape(-1)
        rows = max(1, CHUNK_ELEMS // max(1, V))
        acc = _acc(log_q)
        total = torch.zeros((), dtype=acc, device=log_q.device)
        grad = torch.empty_like(x2, memory_format=torch.contiguous_format) if log_q.requires_grad else None
        for i in range(0, x2.shape[0], rows):
            x, y = x2[i:i + rows].to(acc), y2[i:i + rows].to(acc)
            q, p = x.exp(), y.exp()
            if beta == 0.0:
                loss = _times(p, y - x)                       # e^Y (Y - X)
                dx = -p                                       # -e^Y
            elif beta == 1.0:
                loss = _times(q, x - y)                       # e^X (X - Y)
                dx = loss + q                                 # e^X (X - Y) + e^X
            else:
                mx = torch.maximum(x, y)
                mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)  # both -inf: m = 0, both terms vanish
                log_m = mx + torch.log(beta * torch.exp(y - mx) + (1.0 - beta) * torch.exp(x - mx))
                lq = _times(q, x - log_m)                     # e^X (X - log m)
                loss = beta * _times(p, y - log_m) + (1.0 - beta) * lq
                dx = (1.0 - beta) * lq                        # (1 - beta) e^X (X - log m)
            if kp is not None:
                k = kp[i:i + rows, None]
                loss = torch.where(k, loss, torch.zeros_like(loss))
                dx = torch.where(k, dx, torch.zeros_like(dx))
            total += loss.sum()
            if grad is not None:
                grad[i:i + rows] = dx * scale
        ctx.save_for_backward(grad.reshape(log_q.shape) if grad is not None else None)
        return (total * scale).to(log_q.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        return _scaled(grad, grad_output), None, None, None, None
