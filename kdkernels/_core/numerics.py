"""Small numeric helpers every family's PyTorch path shares: the accumulation dtype, the reductions
over rows, the safe running max and ``p · x`` with ``0 · (anything) = 0``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# the fused ops sum their rows times grad_scale: "mean" and "batchmean" differ only in grad_scale
REDUCTION_IDS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}


def host_reads_free(device) -> bool:
    """Whether reading a tensor value on the host is free for tensors on ``device`` (the CPU), so
    that a PyTorch path may compact rows (``nonzero``) or test ``grad_output == 1``. Elsewhere such
    a read would sync the host with the device: the paths mask instead, and scale in place."""
    return torch.device(device).type == "cpu"


def kept_rows(labels: Optional[Tensor], ignore_index: int, N: int, device):
    """(keep, valid): the rows of a tile loop. On the CPU the rows whose label is ``ignore_index``
    are dropped (``keep`` the others' indices, ``valid`` None: they cost nothing); elsewhere that
    would read their number on the host (a sync), so ``keep`` is every row and ``valid`` the mask
    by which the loop zeroes the ignored rows' losses and gradients."""
    if labels is not None and host_reads_free(device):
        return (labels != ignore_index).nonzero().squeeze(1), None
    return torch.arange(N, device=device), None if labels is None else labels != ignore_index


def acc_dtype(*tensors) -> torch.dtype:
    """The accumulation dtype of a kernel on these tensors: float64 when any is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def safe_max(m: Tensor) -> Tensor:
    """A running max with ``-inf`` replaced by 0, so that it can be subtracted (``-inf - -inf`` is NaN)."""
    return torch.where(m == -math.inf, torch.zeros_like(m), m)


def p_times(p: Tensor, d: Tensor) -> Tensor:
    """``p · d`` where ``p > 0``, else 0: the terms ``p log(p / q)`` of a divergence, with
    ``0 log 0 = 0`` (``d`` may be NaN or infinite where ``p`` is 0). NaN in ``p`` stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * d)


def log_mix(lps: Tensor, lpt: Tensor, beta: float) -> Tensor:
    """``log m`` of the JSD mixture ``m = beta p_t + (1 - beta) p_s`` from the log-probabilities."""
    return torch.where(lps == lpt, lps, torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta)))


def bad_labels(labels: Tensor, V: int) -> Tensor:
    """The rows whose cross-entropy label is outside ``[0, V)`` (the inputs are checked in eager
    mode, not while torch.compile traces): the kernels give them a NaN loss and NaN gradients."""
    return (labels < 0) | (labels >= V)


def batch_size(shape) -> int:
    """``input.size(0)`` of logits of this shape, the divisor of PyTorch's ``"batchmean"``: the
    first leading dimension (the batch of ``[B, L, V]`` logits), or ``V`` for a single ``[V]`` row
    (as ``F.kl_div`` divides a 1-D input's sum by its length)."""
    return int(shape[0])


def grad_scale(N: int, labels: Optional[Tensor], ignore_index: int, reduction: str, dtype, device,
               batch: Optional[int] = None, num_items: Optional[Tensor] = None) -> Tensor:
    """The gradient scale of a reduction over rows, a 0-d tensor (no host sync): 1 / (non-ignored
    rows) for ``"mean"``, 1 / ``batch`` (the logits' ``size(0)``, :func:`batch_size`) for
    ``"batchmean"`` (NaN for an empty batch, as ``F.kl_div`` gives), else 1. ``num_items`` (a 0-d
    tensor, :func:`kdkernels._core.logit_options.num_items`) replaces the divisor of ``"mean"``."""
    if num_items is not None:
        return num_items.reciprocal().to(dtype).reshape(())
    if reduction == "batchmean":
        if batch is None:
            raise ValueError("reduction='batchmean' needs the logits' size(0)")
        return torch.full((), 1.0 / batch if batch else math.nan, dtype=dtype, device=device)
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if labels is None:
        return torch.full((), 1.0 / max(N, 1), dtype=dtype, device=device)
    return (labels != ignore_index).sum().clamp_min(1).to(dtype).reciprocal().reshape(())


COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's

def cosine_terms(pp: Tensor, pt: Tensor, tt: Tensor, g: Optional[Tensor]):
    """From the per-row sums ``pp = Σ P²``, ``pt = Σ P T``, ``tt = Σ T²``: the cosines and, with per-row weights
    ``g``, the [4, R] coefficients (a, c, e, f) of ``dP = a P + c T``, ``dT = e P + f T`` for the loss ``g (1 - cos)``,
    where ``cos = P·T / (max(|P|, eps) max(|T|, eps))``: ``a = g cos / |P|²`` (0 where |P| <= eps),
    ``c = e = -g / den``, ``f = g cos / |T|²`` (0 where |T| <= eps)."""
    n_p, n_t = torch.sqrt(pp), torch.sqrt(tt)
    den = torch.clamp(n_p, min=COSINE_EPS) * torch.clamp(n_t, min=COSINE_EPS)
    cos = pt / den
    if g is None:
        return cos, None
    zero = torch.zeros_like(pp)
    a = torch.where(n_p > COSINE_EPS, g * cos / torch.where(n_p > COSINE_EPS, pp, 1.0), zero)
    f = torch.where(n_t > COSINE_EPS, g * cos / torch.where(n_t > COSINE_EPS, tt, 1.0), zero)
    return cos, torch.stack([a, -g / den, -g / den, f])



def tiles(n: int, size: int):
    """``[0, n)`` in slices of at most ``size``."""
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]
