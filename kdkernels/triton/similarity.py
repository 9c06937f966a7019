"""The similarity losses in Triton: ``S = c · x yᵀ`` one ``[BLOCK_N, BLOCK_V]`` tile at a time with
tensor-core ``tl.dot``, never the ``N × N`` matrix.

The math is that of :mod:`kdkernels.contrastive` (the PyTorch tile loops, read them first); the
tile helpers (``_logits_tile``, ``_online``, ``_accumulate``) are those of the fused-linear kernels
(in :mod:`kdkernels.triton._common`: here the "hidden states" are the rows of ``x`` and the
"lm_head" the rows of ``y``) and the per-element divergence formulas those of the softmax-KL
kernel. Scores are kept in base 2: ``a2 = x·y · c_s`` with ``c_s = scale · log2(e)``.

Kernels
=======
``_stats_kernel``, grid ``(row blocks, column splits)``: each program walks its split of the
    columns of ``y`` in ``BLOCK_V`` tiles and keeps online per-row statistics, written per
    (split, row) and merged on the host (a log-sum-exp merge of ``[splits, N]`` numbers):
    MODE 0 (InfoNCE): (max, sum of 2^(a2 - max)) of the student's rows;
    MODE 1 (similarity_kd), PHASE 0: the same for the student and the teacher ``b2 = tx·ty · c_t``
      and ``Σ 2^(b2-mb)(b2-a2)`` (forward KL) or ``Σ 2^(a2-ma)(a2-b2)`` (reverse KL); PHASE 1 (JSD):
      ``Ks``, ``Kt`` with the final log-sum-exps known;
    MODE 2 (open_clip's DistillClipLoss): the student's and the teacher's (max, sum) and
      ``u = Σ 2^(b2-mb) a2``, for the soft cross-entropy ``lse(S) - Σ softmax(T) S``.
    Columns (CLIP's text→image direction) are the rows of the same kernel with ``x`` and ``y``
    swapped: one more recompute of S, no atomics, no transposed tiles.
``_grad_kernel``, grid ``(row blocks, column tiles)``: recomputes one tile (and the teacher's),
    forms ``dS`` from the row statistics and, when ``COLS``, the column statistics, writes the tile's
    ``Σ dS ∘ (x·y)`` (the log-scale gradient) to its own slot, and adds ``dS y`` into ``d x`` and
    ``dSᵀ x`` into ``d y`` with atomic adds into fp32 (fp64) buffers (for a self-similarity both go
    to ``d x``).
``_sigmoid_kernel`` (SigLIP), grid ``(row blocks, column tiles)``: one pass; every pair but the
    positives is taken as a negative (the positives are added on the host, O(N D): never as a
    correction of a negative, which would cancel); the per-row losses ``Σ softplus(S)``
    are added atomically; with gradients, ``dS = g σ(S)`` goes into ``d x``, ``d y`` as above and the
    tile's ``Σ dS``, ``Σ dS ∘ (S - bias)`` (bias and log-scale gradients) to its slots.

The multipliers (``c_s``, ``c_t``; SigLIP's scale and bias) reach the kernels in a small parameter
tensor (``params_ptr``, ``tl.load``), filled on the device: the launchers take them as Python floats
(constants) or as 0-d tensors (a learnable scale, bias or temperature), never read on the host.

``MASK`` leaves out the entries ``(i, i + mask_off)`` (the diagonal of a self-similarity; a rank's
rows against the gathered batch in kdkernels.distributed). Matmul operands keep the inputs' dtype
(fp32 as 3xTF32, or TF32 when ``torch.backends.cuda.matmul.allow_tf32``), accumulation is fp32
(fp64 for fp64 inputs); ``dS`` is rounded to the operand dtype for the gradient matmuls, as
autograd's 16-bit matmul backward does. The atomic adds make the gradients' last bits depend on
the order in which programs finish (run to run, on a GPU).

Work per step (``F = N² D`` multiply-adds, teacher ``Ft = N² Dt``): InfoNCE symmetric: 2 F
statistics, 3 F gradients; similarity_kd: (F + Ft) per statistics pass (two for columns, two more
for JSD) and F + Ft + 2 F for the gradients; SigLIP: 3 F in one pass. Memory beyond the gradients:
``[splits, N]`` statistics and one slot per tile for the scalar gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdkernels._core.numerics import acc_dtype
from kdkernels.triton._common import (
    _TL_NAME,
    KIND_JSD,
    _accumulate,
    _contig_last,
    _divergence_grads,
    _divergence_terms,
    _dot_dtype,
    _log_ratios,
    _logits_tile,
    _merge,
    _online,
    _precision,
    _splits,
    dot_launch_config,
    safe_max,
)

__all__ = ["pair_stats", "pair_grads", "sigmoid_tiles", "launch_config", "aot_cases"]

# host-side floats, for the callers' scales (the kernels' constexprs are in triton/_common.py)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# parameters read from a small tensor (accumulation dtype)
P_CS, P_CT, P_LOG2_BETA, P_LOG2_1MBETA, P_BETA = (tl.constexpr(i) for i in range(5))
# per-row values of the gradient kernel, each a vector of the rows (or columns)
V_LSE_A, V_LSE_B, V_D, V_KS, V_KT, V_WS, V_WT = (tl.constexpr(i) for i in range(7))
N_VALUES = 7
MODE_LSE, MODE_KD, MODE_XENT = 0, 1, 2


@triton.jit
def _tile_pair(x_ptr, y_ptr, tx_ptr, ty_ptr, rows, rmask, cols, cmask, keep, cs, ct, D, Dt,
               stride_x, stride_y, stride_tx, stride_ty, TEACHER: tl.constexpr, DOT_S: tl.constexpr,
               DOT_T: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # the raw student dots x·y, their base-2 scores a2 (-inf outside ``keep``) and the teacher's b2
    NEG_INF: tl.constexpr = float("-inf")
    zs = _logits_tile(x_ptr, y_ptr, x_ptr, rows, rmask, cols, cmask, D, stride_x, stride_y,
                      False, DOT_S, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    a2 = tl.where(keep, zs * cs, NEG_INF)
    if TEACHER:
        zt = _logits_tile(tx_ptr, ty_ptr, tx_ptr, rows, rmask, cols, cmask, Dt, stride_tx, stride_ty,
                          False, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
        b2 = tl.where(keep, zt * ct, NEG_INF)
    else:
        b2 = a2
    return zs, a2, b2


@triton.jit
def _stats_kernel(
    x_ptr, y_ptr, tx_ptr, ty_ptr, params_ptr, lse_ptr, out_ptr,
    n, m, D, Dt, stride_x, stride_y, stride_tx, stride_ty, split_cols, mask_off,
    PHASE: tl.constexpr, MODE: tl.constexpr, KIND: tl.constexpr, MASK: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC = out_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    TEACHER: tl.constexpr = MODE != 0
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < n
    rows = r.to(tl.int64)
    cs = tl.load(params_ptr + P_CS)
    ct = tl.load(params_ptr + P_CT)
    c_lo = split * split_cols
    c_hi = tl.minimum(m, c_lo + split_cols)
    out = out_ptr + split.to(tl.int64) * n + r  # out[stat, split, r]
    stat_stride = tl.num_programs(1).to(tl.int64) * n

    ma = tl.full([BLOCK_N], NEG_INF, ACC)
    mb = tl.full([BLOCK_N], NEG_INF, ACC)
    za = tl.zeros([BLOCK_N], ACC)
    zb = tl.zeros([BLOCK_N], ACC)
    w = tl.zeros([BLOCK_N], ACC)
    k1 = tl.zeros([BLOCK_N], ACC)
    k2 = tl.zeros([BLOCK_N], ACC)
    lse2_a = tl.zeros([BLOCK_N], ACC)
    lse2_b = tl.zeros([BLOCK_N], ACC)
    l2b = tl.load(params_ptr + P_LOG2_BETA)
    l2nb = tl.load(params_ptr + P_LOG2_1MBETA)
    if PHASE == 1:
        lse2_a = tl.load(lse_ptr + r, mask=rmask, other=0.0)
        lse2_b = tl.load(lse_ptr + n + r, mask=rmask, other=0.0)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        cmask = cols < c_hi
        keep = cmask[None, :] & rmask[:, None]
        if MASK:
            keep = keep & (cols[None, :] != r[:, None] + mask_off)
        _zs, a2, b2 = _tile_pair(x_ptr, y_ptr, tx_ptr, ty_ptr, rows, rmask, cols.to(tl.int64), cmask, keep, cs, ct,
                                 D, Dt, stride_x, stride_y, stride_tx, stride_ty, TEACHER, DOT_S, DOT_T, PREC, ACC,
                                 BLOCK_N, BLOCK_V, BLOCK_K)
        if PHASE == 0:
            ma, za, ea, fa = _online(ma, za, a2)
            if TEACHER:
                mb, zb, eb, fb = _online(mb, zb, b2)
                if MODE == 2:    # u = sum 2^(b2 - mb) a2
                    w = w * fb + tl.sum(tl.where(eb == 0.0, 0.0, eb * a2), axis=1)
                elif KIND == 0:  # sum 2^(b2 - mb) (b2 - a2), 0 where the teacher's probability is 0
                    w = w * fb + tl.sum(tl.where(eb == 0.0, 0.0, eb * (b2 - a2)), axis=1)
                elif KIND == 1:  # sum 2^(a2 - ma) (a2 - b2)
                    w = w * fa + tl.sum(tl.where(ea == 0.0, 0.0, ea * (a2 - b2)), axis=1)
        else:
            lps2 = a2 - lse2_a[:, None]
            lpt2 = b2 - lse2_b[:, None]
            x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
            d1, d2 = _divergence_terms(tl.exp2(lps2), tl.exp2(lpt2), x, y, KIND)
            k1 += tl.sum(d1, axis=1)
            k2 += tl.sum(d2, axis=1)
    if PHASE == 0:
        tl.store(out, ma, mask=rmask)
        tl.store(out + stat_stride, za, mask=rmask)
        if TEACHER:
            tl.store(out + 2 * stat_stride, mb, mask=rmask)
            tl.store(out + 3 * stat_stride, zb, mask=rmask)
            tl.store(out + 4 * stat_stride, w, mask=rmask)
    else:
        tl.store(out, k1, mask=rmask)
        tl.store(out + stat_stride, k2, mask=rmask)


@triton.jit
def _tile_indices(n, m, mask_off, MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    # this program's tile of rows and columns: indices (int32 and int64), bounds, and the entries kept
    # (in bounds and, with MASK, off the (i, i + mask_off) diagonal)
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = r < n
    cmask = c < m
    keep = rmask[:, None] & cmask[None, :]
    if MASK:
        keep = keep & (c[None, :] != r[:, None] + mask_off)
    return r, rmask, r.to(tl.int64), c, cmask, c.to(tl.int64), keep


@triton.jit
def _dS(a2, b2, vals_ptr, idx, imask, count, l2b, l2nb, beta, MODE: tl.constexpr, KIND: tl.constexpr,
        AXIS: tl.constexpr):
    # the gradient tile of one direction: the per-row values of ``idx`` (rows when AXIS == 1,
    # columns when AXIS == 0) broadcast along the tile
    lse_a = tl.load(vals_ptr + V_LSE_A * count + idx, mask=imask, other=0.0)
    ws = tl.load(vals_ptr + V_WS * count + idx, mask=imask, other=0.0)
    if AXIS == 1:
        lse_a = lse_a[:, None]
        ws = ws[:, None]
    else:
        lse_a = lse_a[None, :]
        ws = ws[None, :]
    ps = tl.exp2(a2 - lse_a)
    if MODE == 0:
        out = ws * ps
    else:
        lse_b = tl.load(vals_ptr + V_LSE_B * count + idx, mask=imask, other=0.0)
        lse_b = lse_b[:, None] if AXIS == 1 else lse_b[None, :]
        lpt2 = b2 - lse_b
        if MODE == 2:
            wt = tl.load(vals_ptr + V_WT * count + idx, mask=imask, other=0.0)
            wt = wt[:, None] if AXIS == 1 else wt[None, :]
            out = ws * ps - wt * tl.exp2(lpt2)
        else:
            Dv = tl.load(vals_ptr + V_D * count + idx, mask=imask, other=0.0)
            Ks = tl.load(vals_ptr + V_KS * count + idx, mask=imask, other=0.0)
            Kt = tl.load(vals_ptr + V_KT * count + idx, mask=imask, other=0.0)
            if AXIS == 1:
                Dv, Ks, Kt = Dv[:, None], Ks[:, None], Kt[:, None]
            else:
                Dv, Ks, Kt = Dv[None, :], Ks[None, :], Kt[None, :]
            lps2 = a2 - lse_a
            x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
            ds, _dt = _divergence_grads(ps, tl.exp2(lpt2), x, y, Dv, Ks, Kt, beta, KIND)
            out = ws * ds
    return out


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, tx_ptr, ty_ptr, params_ptr, row_ptr, col_ptr, dx_ptr, dy_ptr, part_ptr,
    n, m, D, Dt, stride_x, stride_y, stride_tx, stride_ty, mask_off,
    MODE: tl.constexpr, KIND: tl.constexpr, COLS: tl.constexpr, MASK: tl.constexpr,
    NEED_X: tl.constexpr, NEED_Y: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # row_ptr / col_ptr: [N_VALUES, n] / [N_VALUES, m] per-row (per-column) values, V_* order
    ACC = dx_ptr.dtype.element_ty
    r, rmask, rows, c, cmask, cols, keep = _tile_indices(n, m, mask_off, MASK, BLOCK_N, BLOCK_V)
    cs = tl.load(params_ptr + P_CS)
    ct = tl.load(params_ptr + P_CT)
    l2b = tl.load(params_ptr + P_LOG2_BETA)
    l2nb = tl.load(params_ptr + P_LOG2_1MBETA)
    beta = tl.load(params_ptr + P_BETA)
    zs, a2, b2 = _tile_pair(x_ptr, y_ptr, tx_ptr, ty_ptr, rows, rmask, cols, cmask, keep, cs, ct, D, Dt,
                            stride_x, stride_y, stride_tx, stride_ty, MODE != 0, DOT_S, DOT_T, PREC, ACC,
                            BLOCK_N, BLOCK_V, BLOCK_K)
    dz = _dS(a2, b2, row_ptr, r, rmask, n, l2b, l2nb, beta, MODE, KIND, 1)
    if COLS:
        dz += _dS(a2, b2, col_ptr, c, cmask, m, l2b, l2nb, beta, MODE, KIND, 0)
    dz = tl.where(keep, dz, 0.0)
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + slot, tl.sum(tl.sum(dz * zs, axis=1), axis=0))
    _accumulate(dz, x_ptr, rows, rows.to(tl.int64) * stride_x, rmask, y_ptr, cols, cmask, stride_y, dx_ptr, dy_ptr,
                dx_ptr, D, NEED_X, NEED_Y, False, DOT_S, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)


@triton.jit
def _sigmoid_kernel(
    x_ptr, y_ptr, labels_ptr, params_ptr, g_ptr, loss_ptr, dx_ptr, dy_ptr, part_ptr,
    n, m, D, stride_x, stride_y,
    NEED_GRAD: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # params: [scale, bias]; every pair but the positive (r, labels[r]) a negative:
    # loss_r += sum_j softplus(S_rj), dS = g_r sigmoid(S); the positives are added on the host
    ACC = loss_ptr.dtype.element_ty
    r, rmask, rows, _c, cmask, cols, keep = _tile_indices(n, m, 0, False, BLOCK_N, BLOCK_V)
    label = tl.load(labels_ptr + r, mask=rmask, other=-1)
    keep = keep & (cols[None, :] != label[:, None])
    scale = tl.load(params_ptr + P_CS)
    bias = tl.load(params_ptr + P_CT)
    zs = _logits_tile(x_ptr, y_ptr, x_ptr, rows, rmask, cols, cmask, D, stride_x, stride_y,
                      False, DOT, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    s = zs * scale + bias
    # softplus(s) = max(s, 0) + log1p(e^-|s|), log1p(u) = log(1 + u) u / ((1 + u) - 1) (exact to a few ulp)
    u = tl.exp(-tl.abs(s))
    one_u = 1.0 + u
    lp = tl.where(one_u == 1.0, u, tl.log(one_u) * u / (one_u - 1.0))
    sp = tl.maximum(s, 0.0) + lp
    tl.atomic_add(loss_ptr + r, tl.sum(tl.where(keep, sp, 0.0), axis=1), mask=rmask)
    if NEED_GRAD:
        g = tl.load(g_ptr + r, mask=rmask, other=0.0)
        ds = tl.where(keep, g[:, None] * tl.exp(s - sp), 0.0)  # g sigmoid(s)
        slot = 2 * (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))
        tl.store(part_ptr + slot, tl.sum(tl.sum(ds, axis=1), axis=0))
        tl.store(part_ptr + slot + 1, tl.sum(tl.sum(ds * (s - bias), axis=1), axis=0))
        _accumulate(ds * scale, x_ptr, rows, rows.to(tl.int64) * stride_x, rmask, y_ptr, cols, cmask, stride_y,
                    dx_ptr, dy_ptr, dx_ptr, D, NEED_X, NEED_Y, False, DOT, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def launch_config(key_dtype, interpreted: bool = False, precision: str = "tf32x3", jsd_phase: bool = False) -> dict:
    """The fused-linear kernels' tiles (:func:`kdkernels.triton._common.dot_launch_config`) where
    they compile without spills here too (tests/test_aot.py), else smaller ones: fp64 takes
    [16, 32] tiles with 4 warps (the JSD gradient spilled 48-120 B at [32, 32]); fp32's JSD second
    phase [64, 64] (8 B spilled on sm_80 at [32, 64]; same columns, so the splits still align)."""
    cfg = dot_launch_config(key_dtype, interpreted=interpreted, precision=precision)
    if interpreted:
        return cfg
    if key_dtype == torch.float64:
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 4}
    if key_dtype == torch.float32 and jsd_phase and cfg["BLOCK_N"] == 32:
        return dict(cfg, BLOCK_N=64)
    return cfg


_acc = acc_dtype


def _setup(x, y, tx, ty, jsd_phase=False):
    """(acc dtype, launch config, DOT_S, DOT_T, precision) for these operands."""
    acc = _acc(x, y, tx, ty)
    wide = [t.dtype for t in (x, y, tx, ty) if t is not None and t.dtype in (torch.float32, torch.float64)]
    prec = _precision()
    interpreted = x.device.type == "cpu"
    cfg = launch_config(acc if wide else torch.bfloat16, interpreted=interpreted, precision=prec, jsd_phase=jsd_phase)
    dot_s = _TL_NAME[_dot_dtype(x, y)]
    dot_t = _TL_NAME[_dot_dtype(tx, ty)] if tx is not None else dot_s
    if interpreted:
        # triton 3.9's interpreter multiplies bf16 dot operands as raw bits: the same values in fp32
        dot_s, dot_t = ("fp32" if d == "bf16" else d for d in (dot_s, dot_t))
    return acc, cfg, dot_s, dot_t, prec


def _params(acc, dev, cs, ct=0.0, beta=0.5, kind=0):
    """The kernels' ``params`` tensor, ``[cs, ct, log2 beta, log2(1 - beta), beta]`` (P_* order; for
    SigLIP ``[scale, bias, ...]``). ``cs`` and ``ct``: Python floats (true constants), or 0-d /
    1-element tensors (a learnable scale or temperature), copied into it on the device: the kernels
    load them, nothing reads them on the host (no sync)."""
    lb = math.log2(beta) if kind == KIND_JSD else 0.0
    lnb = math.log2(1.0 - beta) if kind == KIND_JSD else 0.0
    head = [0.0 if isinstance(v, torch.Tensor) else v for v in (cs, ct)]
    params = torch.tensor([*head, lb, lnb, beta if kind == KIND_JSD else 0.5], dtype=acc, device=dev)
    for i, v in enumerate((cs, ct)):
        if isinstance(v, torch.Tensor):
            params[i : i + 1].copy_(v.detach().reshape(1))
    return params


def pair_stats(x, y, tx=None, ty=None, *, cs, ct=0.0, mode=MODE_LSE, kind=0, beta=0.5, mask_off=None, splits=None):
    """Per-row statistics of ``S = x yᵀ`` (base 2: ``a2 = S cs``) and, for ``mode`` 1 / 2, of the
    teacher's ``tx tyᵀ`` (``b2 = · ct``); ``cs``, ``ct``: floats or 0-d tensors. Returns a dict of [n] tensors:
    mode 0: ``lse2_a``; mode 1: ``lse2_a``, ``lse2_b``, ``D`` (natural units), ``Ks``, ``Kt`` (JSD);
    mode 2: ``lse2_a``, ``lse2_b``, ``xent`` (the soft cross-entropy, natural units)."""
    x, y, tx, ty = (_contig_last(t) for t in (x, y, tx, ty))
    acc, cfg, dot_s, dot_t, prec = _setup(x, y, tx, ty)
    dev = x.device
    n, m = x.shape[0], y.shape[0]
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    row_blocks = triton.cdiv(n, BN)
    S = splits if splits is not None else _splits(row_blocks, m, BV, dev)
    S = max(1, min(S, triton.cdiv(m, BV)))
    split_cols = max(BV, triton.cdiv(triton.cdiv(m, S), BV) * BV)
    S = max(1, triton.cdiv(m, split_cols))
    params = _params(acc, dev, cs, ct, beta, kind if mode == MODE_KD else 0)
    teacher = mode != MODE_LSE
    ptrs = (x, y, tx if teacher else x, ty if teacher else y, params)
    dims = (n, m, x.shape[1], tx.shape[1] if teacher else 0, x.stride(0), y.stride(0),
            tx.stride(0) if teacher else 0, ty.stride(0) if teacher else 0)
    common = dict(MODE=mode, KIND=kind if mode == MODE_KD else 0, MASK=mask_off is not None, DOT_S=dot_s,
                  DOT_T=dot_t, PREC=prec, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=cfg["num_warps"])
    off = 0 if mask_off is None else int(mask_off)
    stats = torch.empty((5 if teacher else 2, S, n), dtype=acc, device=dev)
    if n and m:
        _stats_kernel[(row_blocks, S)](*ptrs, params, stats, *dims, split_cols, off, PHASE=0, **common)
    else:  # nothing to see: empty rows, or rows with no columns (log-sum-exp -inf)
        stats.zero_()
        stats[0] = -math.inf  # the maxima
        if teacher:
            stats[2] = -math.inf
    Ma, Za, fa = _merge(stats[0], stats[1])
    out = {"lse2_a": safe_max(Ma) + torch.log2(Za)}
    if not teacher:
        return out
    Mb, Zb, fb = _merge(stats[2], stats[3])
    out["lse2_b"] = lse2_b = safe_max(Mb) + torch.log2(Zb)
    lse2_a = out["lse2_a"]
    zero = torch.zeros(n, dtype=acc, device=dev)
    if mode == MODE_XENT:
        out["xent"] = LN2 * (lse2_a - (stats[4] * fb).sum(0) / Zb)
        return out
    out["Ks"] = out["Kt"] = zero
    if kind == 0:
        out["D"] = LN2 * ((stats[4] * fb).sum(0) / Zb - lse2_b + lse2_a)
    elif kind == 1:
        out["D"] = LN2 * ((stats[4] * fa).sum(0) / Za - lse2_a + lse2_b)
    else:
        lse = torch.stack([lse2_a, lse2_b]).contiguous()
        kk = torch.zeros((2, S, n), dtype=acc, device=dev)
        cfg1 = _setup(x, y, tx, ty, jsd_phase=True)[1]  # the same BLOCK_V: the splits are unchanged
        if n and m:
            _stats_kernel[(triton.cdiv(n, cfg1["BLOCK_N"]), S)](
                *ptrs, lse, kk, *dims, split_cols, off, PHASE=1,
                **dict(common, BLOCK_N=cfg1["BLOCK_N"], BLOCK_K=cfg1["BLOCK_K"], num_warps=cfg1["num_warps"]))
        out["Ks"], out["Kt"] = kk[0].sum(0), kk[1].sum(0)
        out["D"] = beta * out["Kt"] + (1.0 - beta) * out["Ks"]
    return out


def values(stats: dict, ws, wt=None):
    """The ``[N_VALUES, n]`` per-row values of :func:`pair_grads` from :func:`pair_stats`' dict and
    the weights of the student's (``ws``) and the teacher's (``wt``, mode 2) softmaxes."""
    lse_a = stats["lse2_a"]
    zero = torch.zeros_like(lse_a)
    get = lambda k: stats.get(k, zero)  # noqa: E731
    return torch.stack([lse_a, get("lse2_b"), get("D"), get("Ks"), get("Kt"),
                        ws.to(lse_a.dtype).expand_as(lse_a), zero if wt is None else wt.to(lse_a.dtype).expand_as(lse_a)
                        ]).contiguous()


def pair_grads(x, y, tx=None, ty=None, *, cs, ct=0.0, mode=MODE_LSE, kind=0, beta=0.5, mask_off=None, row_values,
               col_values=None, dx=None, dy=None):
    """Adds ``dS y`` into ``dx`` and ``dSᵀ x`` into ``dy`` (contiguous accumulation-dtype buffers;
    the same buffer for a self-similarity; None when not needed) with ``dS`` from ``row_values``
    (and ``col_values``, ``[N_VALUES, m]``) of :func:`values`; returns ``Σ dS ∘ (x yᵀ)``. ``cs``, ``ct``
    as in :func:`pair_stats`."""
    x, y, tx, ty = (_contig_last(t) for t in (x, y, tx, ty))
    acc, cfg, dot_s, dot_t, prec = _setup(x, y, tx, ty)
    dev = x.device
    n, m = x.shape[0], y.shape[0]
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    grid = (triton.cdiv(n, BN), triton.cdiv(m, BV))
    params = _params(acc, dev, cs, ct, beta, kind if mode == MODE_KD else 0)
    teacher = mode != MODE_LSE
    part = torch.zeros(max(1, grid[0] * grid[1]), dtype=acc, device=dev)
    if not (n and m):
        return part.sum()
    dummy = part
    _grad_kernel[grid](
        x, y, tx if teacher else x, ty if teacher else y, params, row_values,
        col_values if col_values is not None else row_values, dx if dx is not None else dummy,
        dy if dy is not None else dummy, part,
        n, m, x.shape[1], tx.shape[1] if teacher else 0, x.stride(0), y.stride(0),
        tx.stride(0) if teacher else 0, ty.stride(0) if teacher else 0, 0 if mask_off is None else int(mask_off),
        MODE=mode, KIND=kind if mode == MODE_KD else 0, COLS=col_values is not None, MASK=mask_off is not None,
        NEED_X=dx is not None, NEED_Y=dy is not None, DOT_S=dot_s, DOT_T=dot_t, PREC=prec,
        BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=cfg["num_warps"])
    return part.sum()


def sigmoid_tiles(x, y, labels, *, scale, bias, g=None, dx=None, dy=None):
    """SigLIP's negatives: per-row ``Σ_{j ≠ labels[i]} softplus(scale x_i·y_j + bias)``; with ``g``
    (per-row weights), adds ``scale dS y`` into ``dx`` and ``scale dSᵀ x`` into ``dy`` for
    ``dS = g σ(S)`` and returns (rows, Σ dS, Σ dS ∘ (S - bias)); else (rows, 0, 0). The positive
    pairs (i, labels[i]) are left out (the caller adds them exactly). ``scale``, ``bias``: floats or
    0-d tensors."""
    x, y = _contig_last(x), _contig_last(y)
    acc, cfg, dot_s, _, prec = _setup(x, y, None, None)
    dev = x.device
    n, m = x.shape[0], y.shape[0]
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    grid = (triton.cdiv(n, BN), triton.cdiv(m, BV))
    params = _params(acc, dev, scale, bias)
    rows = torch.zeros(n, dtype=acc, device=dev)
    need = g is not None
    part = torch.zeros(2 * grid[0] * grid[1] if need else 2, dtype=acc, device=dev)
    if not (n and m):
        return rows, part.sum(), part.sum()
    dummy = part
    _sigmoid_kernel[grid](
        x, y, labels.contiguous(), params, g.to(acc).contiguous() if need else dummy, rows,
        dx if dx is not None else dummy,
        dy if dy is not None else dummy, part, n, m, x.shape[1], x.stride(0), y.stride(0),
        NEED_GRAD=need, NEED_X=dx is not None, NEED_Y=dy is not None, DOT=dot_s, PREC=prec,
        BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=cfg["num_warps"])
    sums = part.view(-1, 2).sum(0)
    return rows, sums[0], sums[1]


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot.py)
# --------------------------------------------------------------------------------------------
_PTRS = {"stats": ("x_ptr", "y_ptr", "tx_ptr", "ty_ptr"), "grad": ("x_ptr", "y_ptr", "tx_ptr", "ty_ptr"),
         "sigmoid": ("x_ptr", "y_ptr")}
_ACC_PTRS = {"stats": ("params_ptr", "lse_ptr", "out_ptr"),
             "grad": ("params_ptr", "row_ptr", "col_ptr", "dx_ptr", "dy_ptr", "part_ptr"),
             "sigmoid": ("params_ptr", "g_ptr", "loss_ptr", "dx_ptr", "dy_ptr", "part_ptr")}
_INTS = {"stats": ("n", "m", "D", "Dt", "stride_x", "stride_y", "stride_tx", "stride_ty", "split_cols", "mask_off"),
         "grad": ("n", "m", "D", "Dt", "stride_x", "stride_y", "stride_tx", "stride_ty", "mask_off"),
         "sigmoid": ("n", "m", "D", "stride_x", "stride_y")}


def aot_case(kernel, dt, prec="tf32x3", **flags):
    """(kernel name, signature, constexprs, num_warps) of one variant of ``kernel`` ("stats",
    "grad" or "sigmoid") for inputs of dtype ``dt``, as the launchers pass them."""
    acc = "fp64" if dt == torch.float64 else "fp32"
    name = _TL_NAME[dt]
    sig = {p: f"*{name}:16" for p in _PTRS[kernel]}
    if kernel == "sigmoid":
        sig["labels_ptr"] = "*i64:16"
    sig.update({p: f"*{acc}:16" for p in _ACC_PTRS[kernel]})
    sig.update({k: "i32" for k in _INTS[kernel]})
    cfg = launch_config(dt if dt in (torch.float32, torch.float64) else torch.bfloat16, precision=prec,
                        jsd_phase=flags.get("PHASE") == 1)
    assert cfg["BLOCK_V"] == launch_config(dt if dt in (torch.float32, torch.float64) else torch.bfloat16,
                                           precision=prec)["BLOCK_V"]
    if kernel == "sigmoid":
        flags = dict(flags, DOT=name)
    else:
        flags = dict(flags, DOT_S=name, DOT_T=name)
    flags.update(PREC=prec, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"])
    sig.update({k: "constexpr" for k in flags})
    return "similarity_" + kernel, sig, flags, cfg["num_warps"]


def aot_cases() -> list:
    """The variants that matter for registers, per dtype: InfoNCE's statistics and its symmetric
    gradient; similarity_kd's statistics (forward KL, masked diagonal), JSD's second phase and the
    JSD gradient over rows and columns; DistillClipLoss's statistics and gradient; SigLIP with
    gradients."""
    cases = []
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        cases += [
            aot_case("stats", dt, PHASE=0, MODE=MODE_LSE, KIND=0, MASK=False),
            aot_case("grad", dt, MODE=MODE_LSE, KIND=0, COLS=True, MASK=False, NEED_X=True, NEED_Y=True),
            aot_case("stats", dt, PHASE=0, MODE=MODE_KD, KIND=0, MASK=True),
            aot_case("stats", dt, PHASE=1, MODE=MODE_KD, KIND=KIND_JSD, MASK=False),
            aot_case("grad", dt, MODE=MODE_KD, KIND=KIND_JSD, COLS=True, MASK=False, NEED_X=True, NEED_Y=True),
            aot_case("stats", dt, PHASE=0, MODE=MODE_XENT, KIND=0, MASK=False),
            aot_case("grad", dt, MODE=MODE_XENT, KIND=0, COLS=True, MASK=False, NEED_X=True, NEED_Y=True),
            aot_case("sigmoid", dt, NEED_GRAD=True, NEED_X=True, NEED_Y=True),
        ]
    return cases
