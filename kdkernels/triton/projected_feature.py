"""Feature-projection (hint) losses in Triton: the projection ``P = X Wᵀ + b`` one
``[BLOCK_N, BLOCK_V]`` tile at a time with tensor-core ``tl.dot``, the distance to the teacher's
tile in the epilogue, the gradients from the same registers; ``P`` is never written to memory.

The math is that of :mod:`kdkernels.projected_feature` (read it first); the tile helpers are
the fused-linear kernels', in :mod:`kdkernels.triton._common` (``_logits_tile`` computes ``P``,
``_accumulate`` adds ``dP W`` into ``d X``, ``dPᵀ X`` into ``d W`` and ``Σ_rows dP`` into ``d b``
with atomic adds).

``_hint_kernel``, grid ``(kept-row blocks, teacher-feature tiles)``:
    PHASE 0, element-wise kinds: the tile's per-row loss ``Σ_j loss(P - T) / Dt`` is added
      atomically to the row's loss; with gradients ``dP = g ∂loss/∂P`` feeds ``_accumulate`` and
      ``-dP`` is stored as the teacher's gradient. One pass: 3 ``N Dt Ds`` matmuls per step.
    PHASE 0, cosine: ``Σ P²``, ``Σ P T``, ``Σ T²`` per row, added atomically.
    PHASE 1, cosine: ``dP = a P + c T``, ``dT = e P + f T`` with the per-row coefficients the host
      formed from the sums.
Rows dropped by the mask are never read: the kernel takes the kept rows through an index vector.
Accumulation is fp32 (fp64 for fp64 inputs); the atomic adds make the last bits of the losses and
gradients depend on the order in which programs finish (run to run, on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (
    _TL_NAME,
    _accumulate,
    _contig_last,
    _dot_dtype,
    _logits_tile,
    _precision,
    dot_launch_config,
)

__all__ = ["projected_feature_forward", "aot_cases"]

COSINE = 3


@triton.jit
def _hint_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, rows_ptr, g_ptr, coef_ptr, params_ptr, loss_ptr, stats_ptr,
    dx_ptr, dw_ptr, db_ptr, dt_ptr,
    n, Dt, Ds, stride_x, stride_w, stride_t,
    KIND: tl.constexpr, PHASE: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_GRAD: tl.constexpr,
    NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_T: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < n
    rows = tl.load(rows_ptr + r, mask=rmask, other=0)  # int64 indices of the kept rows
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < Dt
    tile = rmask[:, None] & cmask[None, :]
    p = _logits_tile(x_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, Ds, stride_x, stride_w,
                     HAS_BIAS, DOT, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=tile, other=0.0).to(ACC)
    p = tl.where(tile, p, 0.0)
    if KIND != 3:
        # the host divides the row sums by Dt and passes g / Dt
        beta = tl.load(params_ptr)
        d = p - t
        a = tl.abs(d)
        if KIND == 0:
            val = d * d
            dl = 2.0 * d
        else:
            sgn = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
            if KIND == 1:
                val = a
                dl = sgn
            else:  # smooth_l1; beta == 0 comes here as l1 (KIND 1)
                small = a < beta
                val = tl.where(small, 0.5 * d * d / beta, a - 0.5 * beta)
                dl = tl.where(small, d / beta, sgn)
        tl.atomic_add(loss_ptr + r, tl.sum(tl.where(tile, val, 0.0), axis=1), mask=rmask)
        if NEED_GRAD:
            g = tl.load(g_ptr + r, mask=rmask, other=0.0)
            dp = tl.where(tile, dl * g[:, None], 0.0)
            if NEED_T:
                tl.store(dt_ptr + rows[:, None] * Dt + cols[None, :], -dp, mask=tile)
            _accumulate(dp, x_ptr, rows, rows.to(tl.int64) * stride_x, rmask, w_ptr, cols, cmask, stride_w, dx_ptr,
                        dw_ptr, db_ptr, Ds, NEED_X, NEED_W, NEED_B, DOT, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    elif PHASE == 0:
        tl.atomic_add(stats_ptr + r, tl.sum(p * p, axis=1), mask=rmask)
        tl.atomic_add(stats_ptr + n + r, tl.sum(p * t, axis=1), mask=rmask)
        tl.atomic_add(stats_ptr + 2 * n + r, tl.sum(t * t, axis=1), mask=rmask)
    else:
        ca = tl.load(coef_ptr + r, mask=rmask, other=0.0)[:, None]
        cc = tl.load(coef_ptr + n + r, mask=rmask, other=0.0)[:, None]
        dp = tl.where(tile, ca * p + cc * t, 0.0)
        if NEED_T:
            ce = tl.load(coef_ptr + 2 * n + r, mask=rmask, other=0.0)[:, None]
            cf = tl.load(coef_ptr + 3 * n + r, mask=rmask, other=0.0)[:, None]
            tl.store(dt_ptr + rows[:, None] * Dt + cols[None, :], ce * p + cf * t, mask=tile)
        _accumulate(dp, x_ptr, rows, rows.to(tl.int64) * stride_x, rmask, w_ptr, cols, cmask, stride_w, dx_ptr,
                    dw_ptr, db_ptr, Ds, NEED_X, NEED_W, NEED_B, DOT, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)


def projected_feature_forward(X, W, b, T, keep, grad_scale, *, kind, beta, need):
    """The contract of :func:`kdkernels.projected_feature.projected_feature_tiled` (same
    arguments and outputs), on CUDA tensors or under ``TRITON_INTERPRET=1``."""
    from kdkernels._core.numerics import acc_dtype, cosine_terms

    X, W, T = (_contig_last(x) for x in (X, W, T))
    b = None if b is None else b.contiguous()
    acc = acc_dtype(X, W, T)
    dev = X.device
    Dt, Ds = W.shape
    n = keep.numel()
    loss_rows = torch.zeros(n, dtype=acc, device=dev)
    dX = torch.zeros(X.shape, dtype=acc, device=dev) if need[0] else None
    dW = torch.zeros(W.shape, dtype=acc, device=dev) if need[1] else None
    db = torch.zeros(Dt, dtype=acc, device=dev) if (need[2] and b is not None) else None
    dT = torch.zeros(T.shape, dtype=acc, device=dev) if need[3] else None
    if n == 0 or Dt == 0:
        return [loss_rows, dX, dW, db, dT]
    grad = any(x is not None for x in (dX, dW, db, dT))
    g = grad_scale.to(acc).reshape(-1).expand(n).contiguous()
    wide = [x.dtype for x in (X, W, T) if x.dtype in (torch.float32, torch.float64)]
    prec = _precision()
    cfg = dot_launch_config(acc if wide else torch.bfloat16, interpreted=dev.type == "cpu", precision=prec)
    dot = _TL_NAME[_dot_dtype(X, W)]
    if dev.type == "cpu" and dot == "bf16":
        dot = "fp32"  # triton 3.9's interpreter multiplies bf16 dot operands as raw bits
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    grid = (triton.cdiv(n, BN), triton.cdiv(Dt, BV))
    k = 1 if (kind == 2 and beta == 0.0) else kind
    dummy = loss_rows
    params = torch.tensor([beta], dtype=acc, device=dev)
    g_dt = g / Dt  # the element-wise kinds' per-row weight: mean over the Dt features
    stats = torch.zeros((3, n), dtype=acc, device=dev) if kind == COSINE else dummy
    common = dict(KIND=k, HAS_BIAS=b is not None, NEED_X=dX is not None, NEED_W=dW is not None,
                  NEED_B=db is not None, NEED_T=dT is not None, DOT=dot, PREC=prec, BLOCK_N=BN, BLOCK_V=BV,
                  BLOCK_K=BK, num_warps=cfg["num_warps"])
    bufs = [x if x is not None else dummy for x in (dX, dW, db, dT)]

    def launch(phase, coef, need_grad):
        _hint_kernel[grid](X, W, b if b is not None else dummy, T, keep, g_dt, coef, params, loss_rows, stats,
                           *bufs, n, Dt, Ds, X.stride(0), W.stride(0), T.stride(0), PHASE=phase,
                           NEED_GRAD=need_grad, **common)

    launch(0, dummy, grad and kind != COSINE)
    if kind != COSINE:
        return [loss_rows / Dt, dX, dW, db, dT]
    cos, coef = cosine_terms(*stats.unbind(0), g if grad else None)
    if grad:
        launch(1, coef.contiguous(), True)
    return [1.0 - cos, dX, dW, db, dT]


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot.py)
# --------------------------------------------------------------------------------------------
def aot_case(dt, kind, phase, prec="tf32x3"):
    acc = "fp64" if dt == torch.float64 else "fp32"
    name = _TL_NAME[dt]
    sig = {p: f"*{name}:16" for p in ("x_ptr", "w_ptr", "b_ptr", "t_ptr")}
    sig["rows_ptr"] = "*i64:16"
    sig.update({p: f"*{acc}:16" for p in ("g_ptr", "coef_ptr", "params_ptr", "loss_ptr", "stats_ptr", "dx_ptr",
                                          "dw_ptr", "db_ptr", "dt_ptr")})
    sig.update({k: "i32" for k in ("n", "Dt", "Ds", "stride_x", "stride_w", "stride_t")})
    cfg = dot_launch_config(dt if dt in (torch.float32, torch.float64) else torch.bfloat16, precision=prec)
    flags = dict(KIND=kind, PHASE=phase, HAS_BIAS=True, NEED_GRAD=True, NEED_X=True, NEED_W=True, NEED_B=True,
                 NEED_T=True, DOT=name, PREC=prec, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                 BLOCK_K=cfg["BLOCK_K"])
    sig.update({k: "constexpr" for k in flags})
    return "projected_feature", sig, flags, cfg["num_warps"]


def aot_cases() -> list:
    """Per operand dtype: smooth-L1 with every gradient (the element-wise kinds' largest epilogue),
    the cosine statistics and the cosine gradient."""
    cases = []
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        cases += [aot_case(dt, 2, 0), aot_case(dt, COSINE, 0), aot_case(dt, COSINE, 1)]
    return cases
