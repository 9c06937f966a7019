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
The Triton kernels are in :mod:`kdkernels.triton.projected_feature`.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

KINDS = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
COSINE = 3
EPS = 1e-8  # torch.nn.functional.cosine_similarity's
ROW_TILE = 512
COL_TILE = 2048


def _C():
    from kdkernels import _ext

    return _ext.require("projected_feature_loss(backend='cpu')")


def _elementwise(P: Tensor, T: Tensor, kind: int, beta: float, inv_dt: float, rows: Tensor, g: Optional[Tensor],
                 cpu: bool) -> None:
    """rows += Σ_j loss(P - T) / Dt per row; with ``g`` (per-row weights) P is overwritten with
    dP = g ∂loss/∂P."""
    if cpu:
        _C().feat_elementwise(P, T, kind, beta, inv_dt, rows, g)
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
        _C().feat_cos_stats(P, T, stats)
        return
    stats[:, 0] += (P * P).sum(1)
    stats[:, 1] += (P * T).sum(1)
    stats[:, 2] += (T * T).sum(1)


def _cos_grad(P: Tensor, T: Tensor, coef: Tensor, dT: Optional[Tensor], cpu: bool) -> None:
    """P <- a P + c T and, with ``dT``, dT <- e P + f T, with per-row ``coef`` = [a, c, e, f]."""
    if cpu:
        _C().feat_cos_grad(P, T, coef, dT)
        return
    if dT is not None:
        dT.copy_(coef[:, 2:3] * P + coef[:, 3:4] * T)
    P.mul_(coef[:, 0:1]).add_(coef[:, 1:2] * T)


def cosine_terms(pp: Tensor, pt: Tensor, tt: Tensor, g: Optional[Tensor]):
    """From the per-row sums ``pp = Σ P²``, ``pt = Σ P T``, ``tt = Σ T²``: the cosines and, with per-row weights ``g``, the [4, R] coefficients (a, c, e, f) of
    ``dP = a P + c T``, ``dT = e P + f T`` for the loss ``g (1 - cos)``, where
    ``cos = P·T / (max(|P|, eps) max(|T|, eps))``: ``a = g cos / |P|²`` (0 where |P| <= eps),
    ``c = e = -g / den``, ``f = g cos / |T|²`` (0 where |T| <= eps)."""
    n_p, n_t = torch.sqrt(pp), torch.sqrt(tt)
    den = torch.clamp(n_p, min=EPS) * torch.clamp(n_t, min=EPS)
    cos = pt / den
    if g is None:
        return cos, None
    zero = torch.zeros_like(pp)
    a = torch.where(n_p > EPS, g * cos / torch.where(n_p > EPS, pp, 1.0), zero)
    f = torch.where(n_t > EPS, g * cos / torch.where(n_t > EPS, tt, 1.0), zero)
    return cos, torch.stack([a, -g / den, -g / den, f])


def _tiles(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def projected_feature_tiled(X: Tensor, W: Tensor, b: Optional[Tensor], T: Tensor, keep: Tensor, grad_scale: Tensor, *,
                            kind: int, beta: float, need, backend: str = "torch", row_tile=None,
                            col_tile=None) -> List[Optional[Tensor]]:
    """[rows (of the kept rows), d X, d W, d b, d T] (None where ``need`` = (X, W, b, T) is False).
    ``X``: [N, Ds]; ``W``: [Dt, Ds]; ``b``: [Dt] or None; ``T``: [N, Dt]; ``keep``: int64 indices of
    the kept rows; ``grad_scale``: a scalar or one value per kept row. Gradients are in the
    accumulation dtype (fp32, fp64 for fp64 inputs), zero on dropped rows."""
    cpu = backend == "cpu"
    acc = torch.float64 if torch.float64 in (X.dtype, W.dtype, T.dtype) else torch.float32
    dev = X.device
    N, Dt = X.shape[0], W.shape[0]
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
    rt, ct = _tiles(n, row_tile or ROW_TILE), _tiles(Dt, col_tile or COL_TILE)

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
