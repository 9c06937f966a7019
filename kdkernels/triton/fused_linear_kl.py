"""Fused-linear KL in Triton: the distillation loss from hidden states and lm_head weights, with
tensor-core ``tl.dot`` tiles, never forming the ``[N, V]`` logits (not even per chunk of rows).

The math is that of :mod:`kdkernels.fused_linear` (the PyTorch tile loop, read it first)
and of the softmax-KL kernel header (:mod:`kdkernels.triton.softmax_kl`, whose element-wise
helpers, in :mod:`kdkernels.triton._common`, this module reuses on 2-D tiles; so are the tile
helpers ``_logits_tile``, ``_online``, ``_accumulate``, shared with the similarity and hint kernels).
Base-2 exponentials throughout: ``a2 = z_s log2(e)/T``.

Kernels
=======
``_stats_kernel`` (PHASE 0), grid ``(row blocks, vocabulary splits)``: each program walks its
    split of V in ``BLOCK_V`` columns; per tile it computes ``z_s = h_s W_sᵀ + b_s`` (and ``z_t``, or
    loads the teacher logits) as ``[BLOCK_N, BLOCK_V]`` fp32 accumulators over ``BLOCK_K`` slices
    of H, and keeps per row the online statistics (max, rescaled sum of exponentials) of ``a2``,
    ``b2`` and, for CE at ``T != 1``, ``z_s log2(e)``; the running ``sum 2^(b2-mb) (b2 - a2)``
    (forward KL) or ``sum 2^(a2-ma) (a2 - b2)`` (reverse KL); and ``z_s[label]``. It writes them per
    (split, row); the launcher combines the splits (a log-sum-exp merge of ``[splits, N]`` numbers).
``_stats_kernel`` (PHASE 1, JSD only): the same walk with the final ``lse`` known, summing
    ``Ks = sum ps log(ps/m)`` and ``Kt = sum pt log(pt/m)`` per (split, row).
``_grad_kernel``, grid ``(row blocks, vocabulary tiles)``: recomputes one logits tile, forms
    ``dZ_s = g (kd dD/dz_s + ce (softmax(z_s) - onehot))`` and ``dZ_t`` in registers, then for each
    ``BLOCK_K`` slice of H adds ``dZ_s W_s[tile]`` into ``d h_s`` and ``dZ_sᵀ h_s`` into
    ``d W_s[tile]`` (and ``sum_rows dZ_s`` into ``d b_s``) with atomic adds into fp32 (fp64)
    buffers; the teacher's the same when it requires grad, or ``dZ_t`` stored into ``d z_t``.

Rows labelled ``ignore_index`` cost no matmul, with no host sync: the launcher orders the rows on
the device, kept rows first (a stable cumsum scatter, fixed size N), and passes their count ``n`` as
a 1-element device tensor (``n_ptr``); the grids cover all N positions, the kernels read the rows
through the index vector, mask positions ``>= n`` and return at once from row blocks that start
past ``n``; the ignored rows' losses and gradients stay 0. Matmuls take the inputs' dtype on the
tensor cores (both operands cast to fp32 when the hidden states and the weight differ in dtype)
and accumulate in fp32 (fp64 for fp64 inputs); fp32 operands use 3xTF32 products (each operand
split into a TF32 high part and a TF32 remainder, three tensor-core products: about fp32
accuracy), or one TF32 product when ``torch.backends.cuda.matmul.allow_tf32`` is set. The
gradient tiles ``dZ`` are rounded to the operand dtype for the backward matmuls, as autograd's
16-bit matmul backward does; the softmax statistics never are. The atomic adds make the gradients'
last bits depend on the order in which programs finish (run to run, on a GPU).

Work per step, with ``F = N V H`` (student) and ``Ft = N V Ht`` (teacher from hidden states):
    statistics: F + Ft multiply-adds; JSD: again F + Ft; gradients: F + Ft to recompute, then
    2 F for ``d h_s``, ``d W_s`` (and 2 Ft for the teacher's when it requires grad).
    Memory beyond the gradients: ``[splits, N]`` statistics; nothing grows with V.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (
    _TL_NAME,
    KIND_JSD,
    KIND_SKEW_FORWARD,
    KIND_SKEW_REVERSE,
    KIND_TVD,
    LOG2E,
    _accumulate,
    _contig_last,
    _divergence_grads,
    _divergence_terms,
    _dot_dtype,
    _layout,
    _log_ratios,
    _logits_tile,
    _merge,
    _online,
    _precision,
    _splits,
    _xform,
    _xform_grad,
    divergence_value,
    dot_launch_config as launch_config,
    safe_max,
    xform_flag,
)

__all__ = ["fused_linear_kl_forward", "launch_config", "aot_cases"]

# parameters read from a small tensor (in the accumulation dtype, so fp64 runs keep every digit)
P_SCALE, P_LOG2_BETA, P_LOG2_1MBETA, P_BETA, P_SK, P_SIC, P_SC, P_TK, P_TIC, P_TC = (tl.constexpr(i) for i in range(10))

# statistics rows written by PHASE 0 (per split, per row position; the kept rows, the first n, only)
S_MA, S_ZA, S_MB, S_ZB, S_W, S_MC, S_ZC, S_LABEL = (tl.constexpr(i) for i in range(8))
N_STATS = 8


# --------------------------------------------------------------------------------------------
# tile helpers (the shared ones, _logits_tile, _online, _accumulate, are in triton/_common.py)
# --------------------------------------------------------------------------------------------
@triton.jit
def _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, params_ptr, off_s, off_t, rmask, cols, cmask,
                H, Ht, stride_ws, stride_wt,
                HAS_BS: tl.constexpr, TEACHER_LOGITS: tl.constexpr, HAS_BT: tl.constexpr,
                DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                S_XF: tl.constexpr, T_XF: tl.constexpr):
    # off_s, off_t: element offsets of the rows of the student's hidden states and of the teacher's
    # hidden states or logits (computed on the host: offs_ptr of the kernels). The tiles come back
    # through the models' logit transforms (S_XF / T_XF, _common._xform); the columns past V stay
    # finite here and are masked by the callers.
    zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, off_s, rmask, cols, cmask, H, 1, stride_ws,
                      HAS_BS, DOT_S, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    if TEACHER_LOGITS:
        zt = tl.load(zt_ptr + off_t[:, None] + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    else:
        zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, off_t, rmask, cols, cmask, Ht, 1, stride_wt,
                          HAS_BT, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    if S_XF != 0:
        zs = _xform(zs, tl.load(params_ptr + P_SK), tl.load(params_ptr + P_SIC), tl.load(params_ptr + P_SC), True,
                    S_XF)
    if T_XF != 0:
        zt = _xform(zt, tl.load(params_ptr + P_TK), tl.load(params_ptr + P_TIC), tl.load(params_ptr + P_TC), True,
                    T_XF)
    return zs, zt


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, rows_ptr, offs_ptr, labels_ptr, params_ptr, n_ptr,
    lse_ptr, out_ptr, N, V, H, Ht, stride_ws, stride_wt, split_cols,
    PHASE: tl.constexpr, KIND: tl.constexpr, CE: tl.constexpr, CE_SEP: tl.constexpr,
    HAS_BS: tl.constexpr, TEACHER_LOGITS: tl.constexpr, HAS_BT: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    S_XF: tl.constexpr = 0, T_XF: tl.constexpr = 0,
):
    # N: the rows (kept ones first, launcher); n_ptr: the kept count, read here (never on the host)
    ACC = out_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.load(n_ptr)
    if pid_n * BLOCK_N >= n:  # a block of ignored rows: no work, its statistics are never read
        return
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < n
    # the rows' element offsets in the student's and the teacher's row tensors (any layout)
    off_s = tl.load(offs_ptr + r, mask=rmask, other=0)
    off_t = tl.load(offs_ptr + N + r, mask=rmask, other=0)
    scale = tl.load(params_ptr + P_SCALE)
    v_lo = split * split_cols
    v_hi = tl.minimum(V, v_lo + split_cols)
    out = out_ptr + split.to(tl.int64) * N + r  # out[stat, split, r], stat stride = splits * N
    stat_stride = tl.num_programs(1).to(tl.int64) * N

    if PHASE == 0:
        ma = tl.full([BLOCK_N], NEG_INF, ACC)
        mb = tl.full([BLOCK_N], NEG_INF, ACC)
        mc = tl.full([BLOCK_N], NEG_INF, ACC)
        za = tl.zeros([BLOCK_N], ACC)
        zb = tl.zeros([BLOCK_N], ACC)
        zc = tl.zeros([BLOCK_N], ACC)
        w = tl.zeros([BLOCK_N], ACC)
        s_label = tl.zeros([BLOCK_N], ACC)
        label = tl.zeros([BLOCK_N], tl.int64)
        if CE:
            label = tl.load(labels_ptr + r, mask=rmask, other=-1)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < v_hi
            zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, params_ptr, off_s, off_t,
                                 rmask, cols, cmask, H, Ht, stride_ws, stride_wt,
                                 HAS_BS, TEACHER_LOGITS, HAS_BT, DOT_S, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K,
                                 S_XF, T_XF)
            a2 = tl.where(cmask[None, :], zs * scale, NEG_INF)
            b2 = tl.where(cmask[None, :], zt * scale, NEG_INF)
            ma, za, ea, fa = _online(ma, za, a2)
            mb, zb, eb, fb = _online(mb, zb, b2)
            if KIND == 0:    # sum 2^(b2 - mb) (b2 - a2), 0 where the teacher's probability is 0
                w = w * fb + tl.sum(tl.where(eb == 0.0, 0.0, eb * (b2 - a2)), axis=1)
            elif KIND == 1:  # sum 2^(a2 - ma) (a2 - b2)
                w = w * fa + tl.sum(tl.where(ea == 0.0, 0.0, ea * (a2 - b2)), axis=1)
            if CE_SEP:       # CE at T = 1 when T != 1: statistics of z_s log2(e)
                c2 = tl.where(cmask[None, :], zs * LOG2E, NEG_INF)
                mc, zc, _ec, _fc = _online(mc, zc, c2)
            if CE:
                hit = (cols[None, :] == label[:, None]) & cmask[None, :]
                s_label += tl.sum(tl.where(hit, zs, 0.0), axis=1)
        tl.store(out + S_MA * stat_stride, ma, mask=rmask)
        tl.store(out + S_ZA * stat_stride, za, mask=rmask)
        tl.store(out + S_MB * stat_stride, mb, mask=rmask)
        tl.store(out + S_ZB * stat_stride, zb, mask=rmask)
        tl.store(out + S_W * stat_stride, w, mask=rmask)
        tl.store(out + S_MC * stat_stride, mc, mask=rmask)
        tl.store(out + S_ZC * stat_stride, zc, mask=rmask)
        tl.store(out + S_LABEL * stat_stride, s_label, mask=rmask)
    else:
        # JSD: Ks, Kt with lse2(a2), lse2(b2) known
        l2b = tl.load(params_ptr + P_LOG2_BETA)
        l2nb = tl.load(params_ptr + P_LOG2_1MBETA)
        lse2_a = tl.load(lse_ptr + r, mask=rmask, other=0.0)
        lse2_b = tl.load(lse_ptr + N + r, mask=rmask, other=0.0)
        k1 = tl.zeros([BLOCK_N], ACC)
        k2 = tl.zeros([BLOCK_N], ACC)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < v_hi
            zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, params_ptr, off_s, off_t,
                                 rmask, cols, cmask, H, Ht, stride_ws, stride_wt,
                                 HAS_BS, TEACHER_LOGITS, HAS_BT, DOT_S, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K,
                                 S_XF, T_XF)
            lps2 = tl.where(cmask[None, :], zs * scale - lse2_a[:, None], NEG_INF)
            lpt2 = tl.where(cmask[None, :], zt * scale - lse2_b[:, None], NEG_INF)
            x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
            d1, d2 = _divergence_terms(tl.exp2(lps2), tl.exp2(lpt2), x, y, KIND)
            k1 += tl.sum(d1, axis=1)
            k2 += tl.sum(d2, axis=1)
        tl.store(out, k1, mask=rmask)
        tl.store(out + stat_stride, k2, mask=rmask)


@triton.jit
def _grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, rows_ptr, offs_ptr, labels_ptr, params_ptr, n_ptr,
    row_ptr, dhs_ptr, dws_ptr, dbs_ptr, dht_ptr, dwt_ptr, dbt_ptr, dzt_ptr,
    N, V, H, Ht, stride_ws, stride_wt, stride_dzt,
    KIND: tl.constexpr, CE: tl.constexpr, CE_SEP: tl.constexpr,
    HAS_BS: tl.constexpr, TEACHER_LOGITS: tl.constexpr, HAS_BT: tl.constexpr,
    NEED_HS: tl.constexpr, NEED_WS: tl.constexpr, NEED_BS: tl.constexpr,
    NEED_HT: tl.constexpr, NEED_WT: tl.constexpr, NEED_BT: tl.constexpr, NEED_ZT: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    S_XF: tl.constexpr = 0, T_XF: tl.constexpr = 0,
):
    # row_ptr: per row position, [lse2_a, lse2_b, lse2_c, D, Ks, Kt, g_kd, g_ce] each of length N (the
    # first n, n = *n_ptr, are the kept rows' and the only ones read)
    ACC = dhs_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n = tl.load(n_ptr)
    if pid_n * BLOCK_N >= n:  # a block of ignored rows: no work, their gradients stay 0
        return
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < n
    rows = tl.load(rows_ptr + r, mask=rmask, other=0)  # int64 row indices of the kept rows (gradient rows)
    off_s = tl.load(offs_ptr + r, mask=rmask, other=0)
    off_t = tl.load(offs_ptr + N + r, mask=rmask, other=0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    scale = tl.load(params_ptr + P_SCALE)
    l2b = tl.load(params_ptr + P_LOG2_BETA)
    l2nb = tl.load(params_ptr + P_LOG2_1MBETA)
    beta = tl.load(params_ptr + P_BETA)
    lse2_a = tl.load(row_ptr + r, mask=rmask, other=0.0)
    lse2_b = tl.load(row_ptr + N + r, mask=rmask, other=0.0)
    D = tl.load(row_ptr + 3 * N + r, mask=rmask, other=0.0)
    Ks = tl.load(row_ptr + 4 * N + r, mask=rmask, other=0.0)
    Kt = tl.load(row_ptr + 5 * N + r, mask=rmask, other=0.0)
    g_kd = tl.load(row_ptr + 6 * N + r, mask=rmask, other=0.0)

    zs, zt = _both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, params_ptr, off_s, off_t, rmask,
                         cols, cmask, H, Ht, stride_ws, stride_wt,
                         HAS_BS, TEACHER_LOGITS, HAS_BT, DOT_S, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K,
                         S_XF, T_XF)
    tile = rmask[:, None] & cmask[None, :]
    lps2 = tl.where(cmask[None, :], zs * scale - lse2_a[:, None], NEG_INF)
    lpt2 = tl.where(cmask[None, :], zt * scale - lse2_b[:, None], NEG_INF)
    x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
    ps = tl.exp2(lps2)
    pt = tl.exp2(lpt2)
    ds, dt = _divergence_grads(ps, pt, x, y, D[:, None], Ks[:, None], Kt[:, None], beta, KIND)

    NEED_S: tl.constexpr = NEED_HS or NEED_WS or NEED_BS
    NEED_T: tl.constexpr = NEED_HT or NEED_WT or NEED_BT or NEED_ZT
    if NEED_S:
        dzs = ds * g_kd[:, None]
        if CE:
            g_ce = tl.load(row_ptr + 7 * N + r, mask=rmask, other=0.0)
            label = tl.load(labels_ptr + r, mask=rmask, other=-1)
            if CE_SEP:
                lse2_c = tl.load(row_ptr + 2 * N + r, mask=rmask, other=0.0)
                pc = tl.exp2(zs * LOG2E - lse2_c[:, None])
            else:
                pc = ps
            onehot = (cols[None, :] == label[:, None]).to(ACC)
            dzs += g_ce[:, None] * (pc - onehot)
        if S_XF != 0:  # through the student's logit transform
            dzs = _xform_grad(dzs, zs, tl.load(params_ptr + P_SK), tl.load(params_ptr + P_SIC), S_XF)
        dzs = tl.where(tile, dzs, 0.0)
        _accumulate(dzs, hs_ptr, rows, off_s, rmask, ws_ptr, cols, cmask, stride_ws, dhs_ptr, dws_ptr, dbs_ptr,
                    H, NEED_HS, NEED_WS, NEED_BS, DOT_S, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)
    if NEED_T:
        dzt = dt * g_kd[:, None]
        if T_XF != 0:
            dzt = _xform_grad(dzt, zt, tl.load(params_ptr + P_TK), tl.load(params_ptr + P_TIC), T_XF)
        dzt = tl.where(tile, dzt, 0.0)
        if NEED_ZT:
            tl.store(dzt_ptr + rows[:, None] * stride_dzt + cols[None, :], dzt.to(dzt_ptr.dtype.element_ty),
                     mask=tile)
        else:
            _accumulate(dzt, ht_ptr, rows, off_t, rmask, wt_ptr, cols, cmask, stride_wt, dht_ptr, dwt_ptr,
                        dbt_ptr, Ht, NEED_HT, NEED_WT, NEED_BT, DOT_T, PREC, ACC, BLOCK_N, BLOCK_V, BLOCK_K)


# --------------------------------------------------------------------------------------------
# the launcher (launch_config: the tl.dot tiles of triton/_common.py, dot_launch_config)
# --------------------------------------------------------------------------------------------
def _offsets(layout, rows):
    """Element offsets of ``rows`` in rows of ``layout`` = (N, stride(0), stride(1), L) (kdkernels._core.rows)."""
    _, outer, stride, L = layout
    return (rows // L) * outer + (rows % L) * stride


def _cast_grads(outs, acc_grads, sources):
    """outs[1 + i]: the accumulated gradient of sources[i] in its dtype."""
    for i, (gacc, src) in enumerate(zip(acc_grads, sources)):
        if gacc is not None:
            outs[1 + i] = gacc.to(src.dtype)
    return outs


def fused_linear_kl_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, *, temperature, kind, beta,
                            ignore_index, ce_weight, kd_weight, need, splits=None, s_scale=1.0, s_cap=0.0,
                            t_scale=1.0, t_cap=0.0):
    """The contract of :func:`kdkernels.fused_linear.tiled_forward` (same arguments and
    outputs), on CUDA tensors or under ``TRITON_INTERPRET=1``. ``splits`` forces the number of
    vocabulary splits of the statistics pass (tests)."""
    from kdkernels._core.numerics import acc_dtype as _acc_dtype, bad_labels

    hs, Ws, ht, Wt, t_logits = (_contig_last(x) for x in (hs, Ws, ht, Wt, t_logits))
    bs = None if bs is None else bs.contiguous()
    bt = None if bt is None else bt.contiguous()
    acc = _acc_dtype(hs, Ws, ht, Wt, t_logits)
    dev = hs.device
    # hs, ht, t_logits: [N, D] or [B, L, D] rows (kdkernels._core.rows), read through their strides
    lay_s = _layout(hs)
    teacher_rows = t_logits if t_logits is not None else ht
    lay_t = _layout(teacher_rows)
    N, H, V = lay_s[0], hs.shape[-1], Ws.shape[0]
    Ht = 0 if ht is None else ht.shape[-1]
    sources = (hs, Ws, bs, ht, Wt, bt, t_logits)
    loss = torch.zeros(N, dtype=acc, device=dev)
    outs = [loss] + [None] * 7
    # d(teacher logits) is stored tile by tile (zero rows for ignored rows); the others accumulate;
    # the row tensors' gradients are [N, D]
    flat = lambda i, x: (N, x.shape[-1]) if i in (0, 3) else x.shape  # noqa: E731
    acc_grads = [torch.zeros(flat(i, x), dtype=acc, device=dev) if (x is not None and need[i] and i < 6) else None
                 for i, x in enumerate(sources)]
    if need[6]:
        acc_grads[6] = torch.zeros((N, V), dtype=t_logits.dtype, device=dev)
    if N == 0:
        return _cast_grads(outs, acc_grads, sources)
    # the rows in a fixed-size order, kept rows first (stable), and their count n as a device tensor:
    # no host sync (no nonzero, no grid sized by n). Kept row i goes to position (kept rows before it),
    # ignored row i to n + (ignored rows before it). The kernels load n and mask positions >= n;
    # their row blocks past n return at once, so ignored rows cost no arithmetic.
    if labels is not None:
        kept = labels != ignore_index
        kc = kept.to(torch.int64).cumsum(0)
        n_t = kc[-1:].to(torch.int32)  # a fresh (aligned) 1-element tensor, read by the kernels only
        i = torch.arange(N, device=dev)
        pos = torch.where(kept, kc - 1, kc[-1:] + i - kc)
        keep = torch.empty_like(i).scatter_(0, pos, i)  # position -> row
        lab_k = labels.index_select(0, keep).contiguous()
    else:
        keep = torch.arange(N, device=dev)
        n_t = torch.full((1,), N, dtype=torch.int32, device=dev)
        lab_k = keep
    valid = torch.arange(N, device=dev) < n_t  # the positions holding kept rows

    wide = [x.dtype for x in (hs, Ws, ht, Wt, t_logits) if x is not None and x.dtype in (torch.float32, torch.float64)]
    key = acc if wide else torch.bfloat16  # the tiles of 16-bit operands, else those of fp32 / fp64
    prec = _precision()
    cfg = launch_config(key, interpreted=dev.type == "cpu", precision=prec)
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    ce = ce_weight != 0.0
    ce_sep = ce and temperature != 1.0
    mixed = kind in (KIND_JSD, KIND_SKEW_FORWARD, KIND_SKEW_REVERSE)  # m = beta pt + (1 - beta) ps
    lb = math.log2(beta) if mixed else 0.0
    lnb = math.log2(1.0 - beta) if mixed else 0.0
    params = torch.tensor([math.log2(math.e) / temperature, lb, lnb, beta if mixed else 0.5,
                           s_scale, 1.0 / s_cap if s_cap else 0.0, s_cap,
                           t_scale, 1.0 / t_cap if t_cap else 0.0, t_cap],
                          dtype=acc, device=dev)  # at P_SCALE, P_LOG2_BETA, P_LOG2_1MBETA, P_BETA, P_SK ... P_TC
    teacher_logits = t_logits is not None
    dot_s = _TL_NAME[_dot_dtype(hs, Ws)]
    dot_t = _TL_NAME[_dot_dtype(ht, Wt)] if not teacher_logits else dot_s
    if dev.type == "cpu":
        # triton 3.9's interpreter multiplies bf16 dot operands as raw bits: give it the same values
        # in fp32 (exact), with products accumulated in fp32 as bf16 tensor-core MMAs do
        dot_s, dot_t = ("fp32" if d == "bf16" else d for d in (dot_s, dot_t))
    placeholder = params
    # the element offsets of the rows, in that order, in the student's and the teacher's row tensors, whatever
    # their layout ([N, D], or a strided [B, L, D] view such as hidden[:, :-1]): no division in the kernels
    offs = torch.stack([_offsets(lay_s, keep), _offsets(lay_t, keep)]).contiguous()
    ptrs = (hs, Ws, bs if bs is not None else placeholder,
            ht if ht is not None else placeholder, Wt if Wt is not None else placeholder,
            bt if bt is not None else placeholder, t_logits if teacher_logits else placeholder, keep, offs, lab_k,
            params, n_t)
    strides = (Ws.stride(0), Wt.stride(0) if Wt is not None else 0)
    common = dict(KIND=kind, CE=ce, CE_SEP=ce_sep, HAS_BS=bs is not None, TEACHER_LOGITS=teacher_logits,
                  HAS_BT=bt is not None, DOT_S=dot_s, DOT_T=dot_t, PREC=prec, BLOCK_N=BN, BLOCK_V=BV,
                  BLOCK_K=BK, S_XF=xform_flag(s_scale, s_cap), T_XF=xform_flag(t_scale, t_cap),
                  num_warps=cfg["num_warps"])

    # every row position gets a row block (those past n exit at once); the splits are sized for N rows
    row_blocks = triton.cdiv(N, BN)
    S = splits if splits is not None else _splits(row_blocks, V, BV, dev)
    S = max(1, min(S, triton.cdiv(V, BV)))
    split_cols = triton.cdiv(triton.cdiv(V, S), BV) * BV
    S = triton.cdiv(V, split_cols)
    stats = torch.empty((N_STATS, S, N), dtype=acc, device=dev)  # unwritten past n: masked below
    _stats_kernel[(row_blocks, S)](*ptrs, stats, stats, N, V, H, Ht, *strides, split_cols, PHASE=0, **common)

    # merge the splits
    ma, za, mb, zb, w, mc, zc, s_label = stats.unbind(0)  # the order of S_MA ... S_LABEL
    Ma, Za, fa = _merge(ma, za)
    Mb, Zb, fb = _merge(mb, zb)
    lse2_a = safe_max(Ma) + torch.log2(Za)
    lse2_b = safe_max(Mb) + torch.log2(Zb)
    if ce_sep:
        Mc, Zc, _ = _merge(mc, zc)
        lse_c = (safe_max(Mc) + torch.log2(Zc)) * math.log(2)
    else:
        lse_c = lse2_a * math.log(2)  # T == 1: lse(z_s) = lse(a)
    Ks = Kt = torch.zeros(N, dtype=acc, device=dev)
    ln2 = math.log(2)
    if kind == 0:
        D = ln2 * ((w * fb).sum(0) / Zb - lse2_b + lse2_a)
    elif kind == 1:
        D = ln2 * ((w * fa).sum(0) / Za - lse2_a + lse2_b)
    else:
        lse = torch.stack([lse2_a, lse2_b]).contiguous()
        kk = torch.empty((2, S, N), dtype=acc, device=dev)
        _stats_kernel[(row_blocks, S)](*ptrs, lse, kk, N, V, H, Ht, *strides, split_cols, PHASE=1, **common)
        Ks, Kt = kk[0].sum(0), kk[1].sum(0)
        D = divergence_value(Ks, Kt, beta, kind)
    rows_loss = kd_weight * D
    bad = bad_labels(lab_k, V) if ce else None  # NaN rows (labels are unchecked under torch.compile)
    if ce:
        rows_loss = rows_loss + ce_weight * (lse_c - s_label.sum(0))
        rows_loss = torch.where(bad, torch.full_like(rows_loss, math.nan), rows_loss)
    # positions past n hold whatever the unwritten statistics gave: the ignored rows' loss is 0
    rows_loss = torch.where(valid, rows_loss, torch.zeros_like(rows_loss))
    loss.index_copy_(0, keep, rows_loss)

    if any(need):
        g = grad_scale.to(acc).reshape(-1)
        g_k = g.expand(N).index_select(0, keep) if g.numel() == 1 else g.index_select(0, keep)
        if bad is not None:  # and NaN gradients wherever such a row reaches
            g_k = torch.where(bad, torch.full_like(g_k, math.nan), g_k)
        per_row = torch.stack([lse2_a, lse2_b, lse_c * math.log2(math.e), D, Ks, Kt,
                               g_k * (kd_weight / temperature), g_k * ce_weight]).contiguous()
        dummy = stats
        grads = [acc_grads[i] if acc_grads[i] is not None else dummy for i in range(7)]
        dzt_stride = acc_grads[6].stride(0) if acc_grads[6] is not None else 0
        _grad_kernel[(row_blocks, triton.cdiv(V, BV))](
            *ptrs, per_row, *grads, N, V, H, Ht, *strides, dzt_stride,
            NEED_HS=need[0], NEED_WS=need[1], NEED_BS=need[2], NEED_HT=need[3], NEED_WT=need[4], NEED_BT=need[5],
            NEED_ZT=need[6], **common)
    return _cast_grads(outs, acc_grads, sources)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot.py)
# --------------------------------------------------------------------------------------------
_SCALARS = ("N", "V", "H", "Ht", "stride_ws", "stride_wt")


def aot_case(kernel, dt, *, teacher_logits, kind, ce_weight, temperature, need=None, phase=0, prec="tf32x3", xf=0):
    """(signature, constexprs, num_warps) of one variant of ``kernel`` ("stats" or "grad") for inputs of
    dtype ``dt``, with biases, as the launcher passes them (every pointer 16-byte aligned)."""
    acc = "fp64" if dt == torch.float64 else "fp32"
    name = _TL_NAME[dt]
    sig = {p: "*" + name for p in ("hs_ptr", "ws_ptr", "bs_ptr", "ht_ptr", "wt_ptr", "bt_ptr", "zt_ptr")}
    sig.update({"rows_ptr": "*i64", "offs_ptr": "*i64", "labels_ptr": "*i64", "params_ptr": "*" + acc,
                "n_ptr": "*i32"})
    if kernel == "stats":
        sig.update({"lse_ptr": "*" + acc, "out_ptr": "*" + acc})
    else:
        sig["row_ptr"] = "*" + acc
        sig.update({p: "*" + acc for p in ("dhs_ptr", "dws_ptr", "dbs_ptr", "dht_ptr", "dwt_ptr", "dbt_ptr")})
        sig["dzt_ptr"] = "*" + name
    sig = {k: v + ":16" for k, v in sig.items()}
    sig.update({k: "i32" for k in _SCALARS})
    sig["split_cols" if kernel == "stats" else "stride_dzt"] = "i32"
    cfg = launch_config(dt if dt in (torch.float32, torch.float64) else torch.bfloat16, precision=prec)
    flags = {"PHASE": phase} if kernel == "stats" else {}
    flags.update(KIND=kind, CE=ce_weight != 0, CE_SEP=ce_weight != 0 and temperature != 1.0, HAS_BS=True,
                 TEACHER_LOGITS=teacher_logits, HAS_BT=not teacher_logits)
    if kernel == "grad":
        flags.update(zip(("NEED_HS", "NEED_WS", "NEED_BS", "NEED_HT", "NEED_WT", "NEED_BT", "NEED_ZT"), need))
    flags.update(DOT_S=name, DOT_T=name, PREC=prec, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                 BLOCK_K=cfg["BLOCK_K"], S_XF=xf, T_XF=xf)
    sig.update({k: "constexpr" for k in flags})
    return sig, flags, cfg["num_warps"]


def aot_cases() -> list:
    """(kernel, signature, constexprs, num_warps) of the variants that matter for registers, per
    dtype: the statistics pass (forward KL, CE at T != 1, teacher from hidden states), JSD's second
    phase, the gradient kernel with every student and teacher gradient, and the gradient kernel for
    a teacher given as logits (JSD, its gradient stored), bf16 with both sides soft-capped, and the
    skew KL and TVD in bf16 (second phase, gradients). fp16
    is left out: it compiled to the same registers as bf16 in every variant (229/189, 232/235,
    246/224, 246/229 on sm_80/sm_90)."""
    cases = []
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        cases.append(("fused_linear_kl_stats",
                      *aot_case("stats", dt, teacher_logits=False, kind=0, ce_weight=0.5, temperature=2.0)))
        cases.append(("fused_linear_kl_stats",
                      *aot_case("stats", dt, teacher_logits=True, kind=KIND_JSD, ce_weight=0.0, temperature=2.0,
                                phase=1)))
        cases.append(("fused_linear_kl_grad",
                      *aot_case("grad", dt, teacher_logits=False, kind=0, ce_weight=0.5, temperature=2.0,
                                need=(True,) * 6 + (False,))))
        cases.append(("fused_linear_kl_grad",
                      *aot_case("grad", dt, teacher_logits=True, kind=KIND_JSD, ce_weight=0.0, temperature=1.0,
                                need=(True, True, True, False, False, False, True))))
    for kernel, need in (("stats", None), ("grad", (True,) * 6 + (False,))):  # fp32 with allow_tf32
        cases.append(("fused_linear_kl_" + kernel,
                      *aot_case(kernel, torch.float32, teacher_logits=False, kind=1, ce_weight=0.5, temperature=2.0,
                                need=need, prec="tf32")))
    for kernel, need in (("stats", None), ("grad", (True,) * 6 + (False,))):  # bf16, both sides soft-capped
        cases.append(("fused_linear_kl_" + kernel,
                      *aot_case(kernel, torch.bfloat16, teacher_logits=False, kind=0, ce_weight=0.5, temperature=2.0,
                                need=need, xf=2)))
    for kind in (KIND_SKEW_FORWARD, KIND_SKEW_REVERSE, KIND_TVD):  # bf16: their second phase and gradients
        cases.append(("fused_linear_kl_stats",
                      *aot_case("stats", torch.bfloat16, teacher_logits=False, kind=kind, ce_weight=0.0,
                                temperature=2.0, phase=1)))
        cases.append(("fused_linear_kl_grad",
                      *aot_case("grad", torch.bfloat16, teacher_logits=False, kind=kind, ce_weight=0.5,
                                temperature=2.0, need=(True,) * 6 + (False,))))
    return cases
