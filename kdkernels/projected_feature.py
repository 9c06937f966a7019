"""Feature-projection (hint) losses, tiled: ``P = X Wᵀ + b`` is computed one ``[R, C]`` tile at a
time (``R`` kept rows, ``C`` teacher features) and compared with the same tile of the teacher's
features; the projected ``[N, Dt]`` tensor is never held.

Per-row losses (``Dt`` teacher features, ``d = P - T``):
    mse        Σ_j d_j² / Dt                dP = 2 d / Dt
    l1         Σ_j |d_j| / Dt               dP = sign(d) / Dt
    smooth_l1  Σ_j h(d_j) / Dt, h = d²/(2β) where |d| < β else |d| - β/2 (β = 0: l1)
                                           dP = (d / β where |d| < β else sign(d)) / Dt
    cosine     1 - P·T / (max(|P|, eps) max(|T|, eps))   (torch.nn.functional.cosine_similarity)
               dP = cos P / |P|² - T / (max(|P|, eps) max(|T|, eps)) (the first term where |P| > eps),
               dT the same with P and T exchanged
dT = -dP for the element-wise kinds. Then d X = dP W, d W = dPᵀ X, d b = Σ_rows dP.

Element-wise kinds take one pass over the tiles: each tile's loss and ``dP`` are formed together
and ``dP`` goes straight into the three gradient matmuls (3 ``N Dt Ds`` matmuls per step, as
eager autograd). ``cosine`` first sums ``|P|²``, ``P·T``, ``|T|²`` per row over all column tiles,
then recomputes the tiles for the gradients (4 matmuls).

Masked rows are dropped before any matmul: the tiles read the kept rows through an index vector.

Backends: ``"torch"`` (the epilogue in PyTorch operations, any device) and ``"cpu"`` (the
epilogue in the C++ sweeps of csrc/cpu/projected_feature.cpp); both take the matmuls from ATen,
the projection in fp32 (fp64), the gradient matmuls in bf16 when features and weight are bf16.
The Triton kernels are in :mod:`kdkernels.triton.projected_feature` (``"triton"``).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from kdkernels._core import backends, checks, ext as _ext, numerics
from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, cosine_terms, tiles

__all__ = ["projected_feature_loss", "projected_feature_tiled", "METRICS"]

backends.register("projected_feature_loss", cpu=True, triton=True, cuda=False)


def _sweeps():
    return _ext.require("projected_feature_loss(backend='cpu')")


METRICS = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
COSINE = 3
ROW_TILE = 512
COL_TILE = 2048


def _elementwise(P: Tensor, T: Tensor, kind: int, beta: float, inv_dt: float, rows: Tensor, g: Optional[Tensor],
                 cpu: bool) -> None:
    """rows += Σ_j loss(P - T) / Dt per row; with ``g`` (per-row weights) P is overwritten with
    dP = g ∂loss/∂P."""
    if cpu:
        _sweeps().feat_elementwise(P, T, kind, beta, inv_dt, rows, g)
        return
    d = P - T
    if kind == 0:
        rows += (d * d).sum(1) * inv_dt
        dP = 2.0 * d if g is not None else None
    elif kind == 1 or beta == 0.0:
        rows += d.abs().sum(1) * inv_dt
        dP = torch.sign(d) if g is not None else None
    else:
        a = d.abs()
        rows += torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta).sum(1) * inv_dt
        dP = torch.where(a < beta, d / beta, torch.sign(d)) if g is not None else None
    if g is not None:
        P.copy_(dP * (g * inv_dt)[:, None])


def _cos_stats(P: Tensor, T: Tensor, stats: Tensor, cpu: bool) -> None:
    """stats[:, 0..2] += Σ P², Σ P T, Σ T² per row."""
    if cpu:
        _sweeps().feat_cos_stats(P, T, stats)
        return
    stats[:, 0] += (P * P).sum(1)
    stats[:, 1] += (P * T).sum(1)
    stats[:, 2] += (T * T).sum(1)


def _cos_grad(P: Tensor, T: Tensor, coef: Tensor, dT: Optional[Tensor], cpu: bool) -> None:
    """P <- a P + c T and, with ``dT``, dT <- e P + f T, with per-row ``coef`` = [a, c, e, f]."""
    if cpu:
        _sweeps().feat_cos_grad(P, T, coef, dT)
        return
    if dT is not None:
        dT.copy_(coef[:, 2:3] * P + coef[:, 3:4] * T)
    P.mul_(coef[:, 0:1]).add_(coef[:, 1:2] * T)


def projected_feature_tiled(X: Tensor, W: Tensor, b: Optional[Tensor], T: Tensor, keep: Tensor, grad_scale: Tensor, *,
                            kind: int, beta: float, need, backend: str = "torch", row_tile=None,
                            col_tile=None) -> List[Optional[Tensor]]:
    """[rows (of the kept rows), d X, d W, d b, d T] (None where ``need`` = (X, W, b, T) is False).
    ``X``: [N, Ds]; ``W``: [Dt, Ds]; ``b``: [Dt] or None; ``T``: [N, Dt]; ``keep``: int64 indices of
    the kept rows; ``grad_scale``: a scalar or one value per kept row. Gradients are in the
    accumulation dtype (fp32, fp64 for fp64 inputs), zero on dropped rows."""
    cpu = backend == "cpu"
    acc = acc_dtype(X, W, T)
    dev = X.device
    Dt = W.shape[0]
    n = keep.numel()
    # the projection is computed in ``acc`` (P is never rounded to 16 bits); the two gradient matmuls
    # take bf16 operands when features and weight are bf16 (dP rounded to bf16, as autograd's bf16
    # matmul backward does; fp16 would flush the small dP of a mean to zero, so it stays in fp32)
    mm = torch.bfloat16 if (X.dtype == W.dtype == torch.bfloat16) else acc
    Wa = W.to(acc).contiguous()
    Wm = W.contiguous() if mm != acc else Wa
    ba = None if b is None else b.to(acc)
    inv_dt = 1.0 / max(Dt, 1)
    g = grad_scale.to(acc).reshape(-1).expand(n).contiguous()
    dX = torch.zeros(X.shape, dtype=acc, device=dev) if need[0] else None
    dW = torch.zeros(W.shape, dtype=acc, device=dev) if need[1] else None
    db = torch.zeros(Dt, dtype=acc, device=dev) if (need[2] and b is not None) else None
    dT = torch.zeros(T.shape, dtype=acc, device=dev) if need[3] else None
    any_grad = any(x is not None for x in (dX, dW, db, dT))
    rows = torch.zeros(n, dtype=acc, device=dev)
    rt, ct = tiles(n, row_tile or ROW_TILE), tiles(Dt, col_tile or COL_TILE)

    def load(ri):
        idx = keep[ri]
        Xm = X.index_select(0, idx)
        return idx, Xm.to(acc), Xm.to(mm), T.index_select(0, idx)

    def proj(Xr, cj):
        P = Xr @ Wa[cj].t()
        return P.add_(ba[cj]) if ba is not None else P

    def matmul_grads(Xr, cj, dP, dXr):
        if db is not None:
            db[cj] += dP.sum(0)
        if mm == acc:
            if dXr is not None:
                dXr.addmm_(dP, Wm[cj])
            if dW is not None:
                dW[cj].addmm_(dP.t(), Xr)
            return
        dPm = dP.to(mm)  # rounded to the operand dtype, as autograd's 16-bit matmul backward does
        if dXr is not None:
            dXr += dPm @ Wm[cj]
        if dW is not None:
            dW[cj] += dPm.t() @ Xr

    for ri in rt:
        idx, Xr, Xm, Tr = load(ri)
        dXr = torch.zeros(Xr.shape, dtype=acc, device=dev) if dX is not None else None
        if kind != COSINE:
            for cj in ct:
                P, Tt = proj(Xr, cj), Tr[:, cj].to(acc).contiguous()
                _elementwise(P, Tt, kind, beta, inv_dt, rows[ri], g[ri] if any_grad else None, cpu)
                if any_grad:
                    if dT is not None:
                        dT[idx, cj] = -P
                    matmul_grads(Xm, cj, P, dXr)
        else:
            stats = torch.zeros(ri.stop - ri.start, 3, dtype=acc, device=dev)
            for cj in ct:
                _cos_stats(proj(Xr, cj), Tr[:, cj].to(acc).contiguous(), stats, cpu)
            cos, coef = cosine_terms(*stats.unbind(1), g[ri] if any_grad else None)
            rows[ri] = 1.0 - cos
            if any_grad:
                coef = coef.t().contiguous()  # [R, 4] for the row sweeps
                for cj in ct:
                    P, Tt = proj(Xr, cj), Tr[:, cj].to(acc).contiguous()
                    dTt = torch.empty_like(P) if dT is not None else None
                    _cos_grad(P, Tt, coef, dTt, cpu)
                    if dT is not None:
                        dT[idx, cj] = dTt
                    matmul_grads(Xm, cj, P, dXr)
        if dX is not None:
            dX.index_copy_(0, idx, dXr)
    return [rows, dX, dW, db, dT]


# ------------------------------------------------------------------------------ the op

@without_autocast
def _kernel(backend, inputs, extras, scale, need, *, kind, beta):
    """[rows of all N rows (0 where masked), d X, d W, d b, d T]."""
    X, W, b, T = inputs
    keep, valid = extras
    g = scale if scale.numel() == 1 else scale.index_select(0, keep)  # per-row grad_outputs: the kept rows'
    if valid is not None:  # masked rather than dropped rows (no host sync): zero weight, zero loss
        g = torch.where(valid, g.expand(keep.numel()), 0.0)
    if backend == "triton":
        from kdkernels.triton.projected_feature import projected_feature_forward

        outs = projected_feature_forward(X, W, b, T, keep, g, kind=kind, beta=beta, need=need)
    else:
        outs = projected_feature_tiled(X, W, b, T, keep, g, kind=kind, beta=beta, need=need, backend=backend)
    rows = outs[0].new_zeros(X.shape[0]).index_copy_(0, keep, outs[0])
    if valid is not None:
        rows = torch.where(valid, rows, 0.0)
    return [rows, *outs[1:]]


projected_feature_op = FusedOp("kdkernels::projected_feature", inputs=("X", "W", "b", "T"), extras=("keep", "valid"),
                               params=dict(kind=int, beta=float), kernel=_kernel, none="recompute")


def projected_feature_loss(student_feat: Tensor, weight: Tensor, teacher_feat: Tensor, *, bias: Optional[Tensor] = None,
                           metric: str = "mse", beta: float = 1.0, mask: Optional[Tensor] = None,
                           reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Hint loss (FitNets): ``D(student_feat · weightᵀ + bias, teacher_feat)`` per row, without the
    projected ``[N, Dt]`` tensor.

    Per row (``Dt`` teacher features, ``d = P - T``, ``P`` the projection), ``metric``: ``"mse"`` ``mean_j d_j²``,
    ``"l1"`` ``mean_j |d_j|``, ``"smooth_l1"`` ``mean_j`` of Huber's ``d²/(2β)`` below ``|d| < β``
    and ``|d| − β/2`` above (``β = 0``: l1), ``"cosine"`` ``1 − cos(P, T)`` (as
    ``F.cosine_similarity``, eps 1e-8). Unmasked, ``"mean"`` equals ``F.mse_loss(P, T)`` /
    ``F.l1_loss`` / ``F.smooth_l1_loss`` (``reduction="mean"``) and ``(1 − F.cosine_similarity(P, T)).mean()``.

    Args:
        student_feat: ``[..., Ds]``; weight: ``[Dt, Ds]``; teacher_feat: ``[..., Dt]`` (same leading
            shape); bias: ``[Dt]`` or None. float32, bfloat16, float16 or float64 (may differ);
            the products accumulate in float32 (float64 when any input is float64).
        mask: the leading shape, bool or 0/1: rows where it is False/0 are dropped before any
            matmul, cost nothing, contribute 0 and get zero gradients.
        reduction: ``"mean"`` over the kept rows (0 when none is kept), ``"sum"`` of the per-row
            losses, or ``"none"`` (the leading shape, 0 on masked rows).
        backend: ``"auto"`` (``"triton"`` for CUDA tensors, ``"cpu"`` for CPU tensors when the
            extension is built, else ``"torch"``), ``"triton"``, ``"cpu"`` (ATen matmuls per tile,
            the epilogue in C++ sweeps) or ``"torch"`` (the same tiles in PyTorch operations).

    Gradients go to ``student_feat``, ``weight``, ``bias`` and ``teacher_feat``, each when it
    requires one. Memory beyond the inputs and their gradients: one ``[512, 2048]`` tile of ``P``
    (CPU) and O(N) per-row values.
    """
    checks.float_tensor("student_feat", student_feat)
    checks.float_tensor("weight", weight, 2)
    checks.float_tensor("teacher_feat", teacher_feat)
    if bias is not None:
        checks.float_tensor("bias", bias, 1)
    Ds, Dt = student_feat.shape[-1], teacher_feat.shape[-1]
    shapes = (f"student_feat {tuple(student_feat.shape)}, weight {tuple(weight.shape)}, teacher_feat "
              f"{tuple(teacher_feat.shape)}")
    if weight.shape != (Dt, Ds) or student_feat.shape[:-1] != teacher_feat.shape[:-1]:
        raise ValueError(f"expected student_feat [..., Ds], weight [Dt, Ds], teacher_feat [..., Dt] with the same "
                         f"leading shape; got {shapes}")
    if bias is not None and bias.shape != (Dt,):
        raise ValueError(f"bias must be [Dt] = [{Dt}], got {tuple(bias.shape)} ({shapes})")
    checks.choice("metric", metric, METRICS)
    beta = checks.scalar("beta", beta, 0.0, math.inf)
    checks.reduction(reduction, ("mean", "sum", "none"))
    lead = student_feat.shape[:-1]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError("mask must be a tensor (bool or 0/1) of the leading shape")
        if mask.shape != lead:
            raise ValueError(f"mask must have the leading shape {tuple(lead)}, got {tuple(mask.shape)}")
    checks.one_device(student_feat=student_feat, weight=weight, teacher_feat=teacher_feat, bias=bias, mask=mask)
    backend = backends.resolve(backend, student_feat.device, "projected_feature_loss")
    student_feat, weight, bias = autocast_operands(student_feat.device, student_feat, weight, bias)
    X, T = student_feat.reshape(-1, Ds), teacher_feat.reshape(-1, Dt)
    N = X.shape[0]
    acc = acc_dtype(X, weight, T)
    valid = None
    if mask is None:
        keep = torch.arange(N, device=X.device)
        count = torch.full((), float(max(N, 1)), dtype=acc, device=X.device)
    elif numerics.host_reads_free(X.device):  # masked rows dropped before any matmul
        keep = (mask.reshape(-1) != 0).nonzero().squeeze(1)
        count = torch.full((), float(max(keep.numel(), 1)), dtype=acc, device=X.device)
    else:  # on a GPU: counted and masked on the device, no host sync
        valid = mask.reshape(-1) != 0
        keep = torch.arange(N, device=X.device)
        count = valid.sum().clamp_min(1).to(acc)
    scale = count.reciprocal() if reduction == "mean" else torch.ones((), dtype=acc, device=X.device)
    params = dict(kind=METRICS[metric], beta=beta)
    out = projected_feature_op((X, weight, bias, T), (keep, valid), scale, params, REDUCTION_IDS[reduction], backend)
    return out.reshape(lead) if reduction == "none" else out
