"""Pointwise divergences of log-probabilities, row-chunked: the semantics of
``torch.nn.functional.kl_div`` and of Liger-Kernel's ``LigerJSD``.

Both take log-probabilities (never logits) and differentiate the loss *as a function of the
numbers given*, element by element: nothing is renormalized, so the gradient is the same whether or
not a ``log_softmax`` comes before the loss. The loss is summed over row chunks of at most
``CHUNK_ELEMS`` elements in float32 (float64 for float64 inputs) and the input gradient is written
in the forward pass, in the input's dtype, so the only full-size allocation is that gradient;
backward only scales it by ``grad_output`` (:mod:`kdkernels._core.fused_op`). On CPU
tensors :func:`logprob_jsd_sum` runs the C++ kernel csrc/cpu/logprob_jsd.cpp instead (one sweep of
each row, rows read through their strides).

:func:`kl_div_sum` (``x`` = input log-probabilities, ``t`` = target, ``log_target`` as in torch):
    loss = sum t (log t - x)            d/dx = -t
    loss = sum e^t (t - x)              d/dx = -e^t          (log_target)
with ``0 log 0 = 0`` (``xlogy``, as torch), or, given ``eps``, Liger's ``t (log max(t, eps) - x)``.

:func:`logprob_jsd_sum` (Liger's generalized JSD; ``X = log q`` the student, ``Y = log p`` the
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

from kdkernels._core import backends, checks, ext as _ext
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.numerics import acc_dtype, p_times
from kdkernels._core.rows import rows3

__all__ = ["kl_div_sum", "logprob_jsd_sum"]

CHUNK_ELEMS = 1 << 20

backends.register("kl_div", cpu=False, triton=False, cuda=False)
backends.register("logprob_jsd", cpu=True, triton=False, cuda=False)


def _kl_kernel(backend, inputs, extras, scale, need, *, log_target, eps):
    input, target = inputs
    x2 = input.reshape(-1, input.shape[-1]) if input.dim() else input.reshape(1, 1)
    t2 = target.reshape(x2.shape)
    step = max(1, CHUNK_ELEMS // max(1, x2.shape[1]))
    acc = acc_dtype(input)
    total = torch.zeros(1, dtype=acc, device=input.device)
    grad = torch.empty_like(x2, memory_format=torch.contiguous_format) if need[0] else None
    s = scale.to(acc)
    for i in range(0, x2.shape[0], step):
        x, tg = x2[i:i + step].to(acc), t2[i:i + step].to(acc)
        if log_target:
            p = tg.exp()
            total += (p * (tg - x)).sum()                        # e^t (t - x)
        elif eps is None:
            p = tg
            total += (torch.xlogy(tg, tg) - tg * x).sum()        # t log t - t x
        else:
            p = tg
            total += (tg * (tg.clamp_min(eps).log() - x)).sum()  # Liger: t (log max(t, eps) - x)
        if grad is not None:
            grad[i:i + step] = p * -s  # d/dx = -p (never in place: p may be the target itself)
    return total, grad, None


_kl_op = FusedOp("kdkernels::kl_div", inputs=("input", "target"), params=dict(log_target=bool, eps="float?"),
                 kernel=_kl_kernel, none="scale_rows", rows=lambda ins, ext: 1)


def kl_div_sum(input: Tensor, target: Tensor, *, scale: float = 1.0, log_target: bool = False,
               eps: Optional[float] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``scale * sum(F.kl_div(input, target, reduction="none", log_target=log_target))`` (module
    docstring; with ``eps``, Liger's floor) in ``out_dtype`` (default: the accumulation dtype),
    the gradient of ``input`` written in the forward pass. The target gets no gradient."""
    checks.float_tensor("input", input, what="log-probabilities")
    checks.float_tensor("target", target)
    checks.same_shape("input and target", input, target)
    acc = acc_dtype(input)
    loss = _kl_op((input, target.detach()), (), torch.full((), float(scale), dtype=acc, device=input.device),
                  dict(log_target=bool(log_target), eps=None if eps is None else float(eps)), 1, "torch")
    return loss if out_dtype is None else loss.to(out_dtype)


def _jsd_chunks(log_q, log_p, keep, beta, scale, need):
    V = log_q.shape[-1]
    x2, y2 = log_q.reshape(-1, V), log_p.reshape(-1, V)
    kp = None if keep is None else keep.reshape(-1)
    step = max(1, CHUNK_ELEMS // max(1, V))
    acc = acc_dtype(log_q)
    total = torch.zeros(1, dtype=acc, device=log_q.device)
    grad = torch.empty_like(x2, memory_format=torch.contiguous_format) if need else None
    s = scale.to(acc)
    for i in range(0, x2.shape[0], step):
        x, y = x2[i:i + step].to(acc), y2[i:i + step].to(acc)
        q, p = x.exp(), y.exp()
        if beta == 0.0:
            loss = p_times(p, y - x)                      # e^Y (Y - X)
            dx = -p                                       # -e^Y
        elif beta == 1.0:
            loss = p_times(q, x - y)                      # e^X (X - Y)
            dx = loss + q                                 # e^X (X - Y) + e^X
        else:
            mx = torch.maximum(x, y)
            mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)  # both -inf: m = 0, both terms vanish
            log_m = mx + torch.log(beta * torch.exp(y - mx) + (1.0 - beta) * torch.exp(x - mx))
            lq = p_times(q, x - log_m)                    # e^X (X - log m)
            loss = beta * p_times(p, y - log_m) + (1.0 - beta) * lq
            dx = (1.0 - beta) * lq                        # (1 - beta) e^X (X - log m)
        if kp is not None:
            k = kp[i:i + step, None]
            loss = torch.where(k, loss, torch.zeros_like(loss))
            dx = torch.where(k, dx, torch.zeros_like(dx))
        total += loss.sum()
        if grad is not None:
            grad[i:i + step] = dx * s
    return total, grad


def _jsd_kernel(backend, inputs, extras, scale, need, *, beta):
    log_q, log_p = inputs
    (keep,) = extras
    if backend == "cpu":
        rows, grad = _ext.require("logprob_jsd(backend='cpu')").logprob_jsd_forward_cpu(
            rows3(log_q), rows3(log_p), keep, float(beta), float(scale), need[0])
        return rows.sum().reshape(1), grad, None
    total, grad = _jsd_chunks(log_q, log_p, keep, beta, scale, need[0])
    return total, grad, None


_jsd_op = FusedOp("kdkernels::logprob_jsd", inputs=("log_q", "log_p"), extras=("keep",), params=dict(beta=float),
                  kernel=_jsd_kernel, none="scale_rows", rows=lambda ins, ext: 1)


def logprob_jsd_sum(log_q: Tensor, log_p: Tensor, *, beta: float, scale: Tensor, keep: Optional[Tensor] = None,
                    backend: str = "auto") -> Tensor:
    """``scale * sum over kept rows of JSD_beta(X, Y)`` (Liger's generalized JSD of the module
    docstring, ``X = log_q`` the student, ``Y = log_p`` the teacher) in ``log_q``'s dtype; the
    gradient goes to ``log_q`` only. ``keep``: a bool mask of the rows (the leading shape) or None.
    Backends: ``"cpu"`` (csrc/cpu/logprob_jsd.cpp, one sweep of each row through its strides) and
    ``"torch"`` (row chunks of PyTorch operations, any device)."""
    checks.float_tensor("log_q", log_q, what="log-probabilities")
    checks.float_tensor("log_p", log_p, what="log-probabilities")
    checks.same_shape("log_q and log_p", log_q, log_p)
    beta = checks.scalar("beta", beta, 0.0, 1.0)
    if (log_q.dtype == torch.float64) != (log_p.dtype == torch.float64):  # the C++ kernel pairs float64 with itself
        backend = "torch" if backend == "auto" else backend
    backend = backends.resolve(backend, log_q.device, "logprob_jsd")
    loss = _jsd_op((log_q, log_p.detach()), (keep,), scale.reshape(()), dict(beta=beta), 1, backend)
    return loss.to(log_q.dtype)
