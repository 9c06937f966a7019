"""Softmax-KL distillation losses in Triton: forward KL, reverse KL, generalized JSD, with an
optional hard-label cross-entropy, loss and both input gradients from one kernel launch.

Read top to bottom: math helpers, the kernel, launch configuration, the launcher, and the list of
compile cases that ``tests/test_aot.py`` compiles for sm_80 / sm_90 to check for register spills.
The element-wise divergence helpers the formulas below describe (``_log_ratios``,
``_divergence_terms``, ``_divergence_grads``, ``_safe_max``) are in :mod:`kdkernels.triton._common`,
shared with the fused-linear and similarity kernels.

Kernel header
=============
One program per row (grid ``(N,)``); ``s`` = student logits row, ``t`` = teacher logits row,
length ``V``, ``T`` = temperature.

    a = s/T, b = t/T, ps = softmax(a), pt = softmax(b), log ps = a - lse(a), log pt = b - lse(b)

All exponentials are base 2: the kernel works with ``a2 = s * log2(e)/T`` so that
``ps = exp2(a2 - lse2(a2))`` and ``log ps = ln2 * (a2 - lse2(a2))`` (``lse2`` = log2-sum-exp2).

KIND 0, forward KL:  D = KL(pt||ps) = sum pt (log pt - log ps) = sum pt (b - a) - lse(b) + lse(a)
    dD/ds = (ps - pt) / T
    dD/dt = pt (log pt - log ps - D) / T
KIND 1, reverse KL:  D = KL(ps||pt) = sum ps (log ps - log pt) = sum ps (a - b) - lse(a) + lse(b)
    dD/ds = ps (log ps - log pt - D) / T
    dD/dt = (pt - ps) / T
KIND 2, generalized JSD (0 < beta < 1):  m = beta pt + (1-beta) ps,
    Ks = KL(ps||m), Kt = KL(pt||m), D = beta Kt + (1-beta) Ks,
    log m = logaddexp(log pt + log beta, log ps + log(1-beta))   (never log of an underflowed 0)
    dD/ds = (1-beta) ps (log ps - log m - Ks) / T
    dD/dt = beta pt (log pt - log m - Kt) / T
    (the dm/ds terms cancel: sum_j (beta pt_j + (1-beta) ps_j)/m_j dm_j = d(sum m) = 0)
KIND 3, 4, 5 (skew forward KL, skew reverse KL, TVD): the two row sums K1, K2 of
    kdkernels/_core/divergences.py (with m of the JSD, beta = skew for KIND 3, 1 - skew for KIND 4),
    the same passes and bytes as the JSD below; their gradients there (triton/_common.py).
Hard-label CE (temperature 1, ``CE``):  CE = lse(s) - s[label]
    dCE/ds = softmax(s) - onehot(label)        (= ps when T == 1: ``SAME_T`` reuses lse(a))

Row loss = ce_weight CE + kd_weight D (fp32, fp64 for fp64 inputs); written gradients:
    grad_s = g (ce_weight dCE/ds + kd_weight dD/ds),  grad_t = g kd_weight dD/dt,
with ``g = grad_scale[0]`` read on the device. A row whose label is ``ignore_index`` writes a
zero loss and zero gradient rows and does no exponentials; with CE, a row whose label is outside
``[0, V)`` writes a NaN loss and NaN gradient rows (and reads nothing past the row).

Zeros and NaN: a term ``x (log x - log y)`` is taken as 0 where ``x == 0`` (padded ``-inf``
logits give x == 0 and log x == -inf; 0 * inf would be NaN). The test is ``x == 0`` rather than
``x > 0`` so that a NaN x keeps its NaN. A running max that is still ``-inf`` is replaced by 0
before it is subtracted (no ``-inf - -inf``). NaN in an input reaches the row's sum of
exponentials, hence its loss.

Passes and bytes moved (per row element; bs / bt = bytes per student / teacher element; the
gradient writes are counted only when that gradient is requested):
    SINGLE_PASS (next_power_of_2(V) <= MAX_SINGLE_BLOCK, row held in registers):
        every kind:       bs + bt (read)              + bs + bt (write grads)
    streaming (tiles of BLOCK; pass 1 = online, rescaled log-sum-exp of a, b (and s when CE and
    T != 1), plus for KIND 0 / 1 the running sum  sum e^(b-mb)(b-a)  /  sum e^(a-ma)(a-b)):
        KIND 0, 1:        2 (bs + bt) (pass 1, pass 2) + bs + bt
        KIND 2-5 (JSD, skew KL, TVD): 3 (bs + bt)      + bs + bt
        JSD needs Ks, Kt inside its gradient, and they depend on lse(a), lse(b) through log m,
        so it takes 3 passes: lse, then Ks/Kt, then gradients.
    Loss only (no gradient requested): KIND 0/1 streaming stop after pass 1, JSD after pass 2.
    Per row on top: 8 B label (when given) + 4 B (8 B fp64) loss. Ignored rows: writes only.
    Nothing of size N x V is allocated except the gradient outputs.
"""

import torch
import triton
import triton.language as tl

from kdkernels._core.debug import new_output
from kdkernels._core.numerics import acc_dtype
from kdkernels.triton._common import (
    _TL_NAME,
    KIND_FORWARD,
    KIND_JSD,
    KIND_REVERSE,
    KIND_SKEW_FORWARD,
    KIND_SKEW_REVERSE,
    KIND_TVD,
    LN2,
    LOG2E,
    _divergence_grads,
    _divergence_terms,
    _divergence_value,
    _layout,
    _log_ratios,
    _safe_max,
    _xform,
    _xform_grad,
    hi_lo,
    xform_args,
    xform_flag,
)

__all__ = ["softmax_kl_forward", "launch_config", "documented_traffic", "aot_cases", "MAX_SINGLE_BLOCK",
           "STREAM_BLOCK"]


# --------------------------------------------------------------------------------------------
# math helpers (inlined into the kernel; the shared element-wise ones are in triton/_common.py)
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_pair(s_row, t_row, offs, mask, sk, sic, sc, tk, tic, tc, ACC: tl.constexpr, S_XF: tl.constexpr,
               T_XF: tl.constexpr):
    # a tile of student and teacher logits (-inf past the row), through their logit transforms
    s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(ACC)
    t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(ACC)
    return _xform(s, sk, sic, sc, mask, S_XF), _xform(t, tk, tic, tc, mask, T_XF)


@triton.jit
def _tile_probs(s_row, t_row, offs, V, scale, lse2_a, lse2_b, l2b, l2nb, sk, sic, sc, tk, tic, tc,
                ACC: tl.constexpr, KIND: tl.constexpr, S_XF: tl.constexpr, T_XF: tl.constexpr):
    # one tile of a row after pass 1: (transformed) student and teacher logits, ps, pt and the log
    # ratios of KIND
    mask = offs < V
    s, t = _load_pair(s_row, t_row, offs, mask, sk, sic, sc, tk, tic, tc, ACC, S_XF, T_XF)
    lps2 = s * scale - lse2_a
    lpt2 = t * scale - lse2_b
    x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
    return mask, s, t, tl.exp2(lps2), tl.exp2(lpt2), x, y


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _softmax_kl_kernel(
    s_ptr, t_ptr, labels_ptr, grad_scale_ptr, loss_ptr, gs_ptr, gt_ptr,
    stride_s0, stride_s, inner_s, stride_t0, stride_t, inner_t, stride_gs, stride_gt,
    V, ignore_index,
    inv_T, inv_T_lo, beta, beta_lo, ce_weight, ce_weight_lo, kd_weight, kd_weight_lo,
    s_k, s_k_lo, s_c, s_c_lo, t_k, t_k_lo, t_c, t_c_lo,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr, SAME_T: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK: tl.constexpr,
    S_XF: tl.constexpr, T_XF: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    # row r of [B, L, V] rows (L = inner): (r // L) stride(0) + (r % L) stride(1) (kdkernels._core.rows)
    s_row = s_ptr + (row // inner_s) * stride_s0 + (row % inner_s) * stride_s
    t_row = t_ptr + (row // inner_t) * stride_t0 + (row % inner_t) * stride_t
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    cols = tl.arange(0, BLOCK)

    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            # ignored row: zero loss, zero gradient rows, no exponentials
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                if GRAD_S:
                    tl.store(gs_row + offs, tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    tl.store(gt_row + offs, tl.zeros([BLOCK], dtype=gt_ptr.dtype.element_ty), mask=mask)
            tl.store(loss_ptr + row, tl.zeros([], dtype=ACC))
            return
        if CE:
            if (label < 0) | (label >= V):
                # a label out of range (unchecked under torch.compile): a NaN row, no read past the row
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    mask = offs < V
                    if GRAD_S:
                        tl.store(gs_row + offs, tl.full([BLOCK], float("nan"), dtype=gs_ptr.dtype.element_ty),
                                 mask=mask)
                    if GRAD_T:
                        tl.store(gt_row + offs, tl.full([BLOCK], float("nan"), dtype=gt_ptr.dtype.element_ty),
                                 mask=mask)
                tl.store(loss_ptr + row, tl.full([], float("nan"), dtype=ACC))
                return

    zero = tl.zeros([], dtype=ACC)
    # float arguments arrive as fp32 (hi) + fp32 (lo) pairs (_common.hi_lo) so that fp64
    # accumulation sees them at fp64 precision; in fp32, hi + lo rounds back to hi
    inv_t = (zero + inv_T) + inv_T_lo
    scale = inv_t * LOG2E  # a2 = s * log2(e) / T
    beta_a = (zero + beta) + beta_lo
    kd_w = (zero + kd_weight) + kd_weight_lo
    ce_w = (zero + ce_weight) + ce_weight_lo
    l2b = tl.log2(beta_a)  # JSD only; beta = 0.5 (unused) for the other kinds
    l2nb = tl.log2(1.0 - beta_a)
    g = tl.load(grad_scale_ptr).to(ACC)
    g_kd = g * kd_w * inv_t  # grad_scale * kd_weight / T
    g_ce = g * ce_w
    # the logit transforms (S_XF / T_XF: 0 none, 1 scale, 2 scale and soft-cap)
    sk = (zero + s_k) + s_k_lo
    sc = (zero + s_c) + s_c_lo
    sic = 1.0 / sc
    tk = (zero + t_k) + t_k_lo
    tc = (zero + t_c) + t_c_lo
    tic = 1.0 / tc
    s_label = zero
    if CE:
        s_label = _xform(tl.load(s_row + label).to(ACC), sk, sic, sc, True, S_XF)

    if SINGLE_PASS:
        # ---- the whole row in registers: one read, everything from there ----
        mask = cols < V
        s, t = _load_pair(s_row, t_row, cols, mask, sk, sic, sc, tk, tic, tc, ACC, S_XF, T_XF)
        a2 = s * scale
        b2 = t * scale
        ma = _safe_max(tl.max(a2, axis=0))
        mb = _safe_max(tl.max(b2, axis=0))
        ea = tl.exp2(a2 - ma)
        eb = tl.exp2(b2 - mb)
        za = tl.sum(ea, axis=0)
        zb = tl.sum(eb, axis=0)
        lse2_a = ma + tl.log2(za)
        lse2_b = mb + tl.log2(zb)
        ps = ea * (1.0 / za)
        pt = eb * (1.0 / zb)
        lps2 = a2 - lse2_a
        lpt2 = b2 - lse2_b
        x, y = _log_ratios(lps2, lpt2, l2b, l2nb, KIND)
        d1, d2 = _divergence_terms(ps, pt, x, y, KIND)
        K1 = tl.sum(d1, axis=0)
        K2 = tl.sum(d2, axis=0)
        if KIND >= 2:
            D = _divergence_value(K1, K2, beta_a, KIND)
        else:
            D = K1
        loss = kd_w * D
        pc = ps
        if CE:
            if SAME_T:
                lse2_c = lse2_a  # T == 1: lse(s) = lse(a)
                c2_label = s_label * scale
            else:
                c2 = s * LOG2E
                mc = _safe_max(tl.max(c2, axis=0))
                ec = tl.exp2(c2 - mc)
                zc = tl.sum(ec, axis=0)
                lse2_c = mc + tl.log2(zc)
                pc = ec * (1.0 / zc)
                c2_label = s_label * LOG2E
            loss += ce_w * ((lse2_c - c2_label) * LN2)  # CE = lse(s) - s[label]
        tl.store(loss_ptr + row, loss)
        if GRAD_S or GRAD_T:
            ds, dt = _divergence_grads(ps, pt, x, y, D, K1, K2, beta_a, KIND)
            if GRAD_S:
                gs = g_kd * ds
                if CE:
                    gs += g_ce * (pc - tl.where(cols == label, 1.0, 0.0))  # softmax(s) - onehot
                gs = _xform_grad(gs, s, sk, sic, S_XF)
                tl.store(gs_row + cols, gs.to(gs_ptr.dtype.element_ty), mask=mask)
            if GRAD_T:
                gt = _xform_grad(g_kd * dt, t, tk, tic, T_XF)
                tl.store(gt_row + cols, gt.to(gt_ptr.dtype.element_ty), mask=mask)
    else:
        # ---- pass 1: online (rescaled) log-sum-exp of a, b (and s for CE at T != 1) ----
        m_a = zero + NEG_INF
        m_b = zero + NEG_INF
        m_c = zero + NEG_INF
        z_a = zero
        z_b = zero
        z_c = zero
        w = zero  # KIND 0: sum e^(b2-mb) (b2-a2);  KIND 1: sum e^(a2-ma) (a2-b2)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            s, t = _load_pair(s_row, t_row, offs, mask, sk, sic, sc, tk, tic, tc, ACC, S_XF, T_XF)
            a2 = s * scale
            b2 = t * scale
            ma_new = tl.maximum(m_a, tl.max(a2, axis=0))
            mb_new = tl.maximum(m_b, tl.max(b2, axis=0))
            ma_s = _safe_max(ma_new)
            mb_s = _safe_max(mb_new)
            alpha_a = tl.exp2(m_a - ma_s)  # rescale of what was summed so far (0 if nothing yet)
            alpha_b = tl.exp2(m_b - mb_s)
            ea = tl.exp2(a2 - ma_s)
            eb = tl.exp2(b2 - mb_s)
            z_a = z_a * alpha_a + tl.sum(ea, axis=0)
            z_b = z_b * alpha_b + tl.sum(eb, axis=0)
            if KIND == 0:
                w = w * alpha_b + tl.sum(tl.where(eb == 0.0, 0.0, eb * (b2 - a2)), axis=0)
            elif KIND == 1:
                w = w * alpha_a + tl.sum(tl.where(ea == 0.0, 0.0, ea * (a2 - b2)), axis=0)
            m_a = ma_new
            m_b = mb_new
            if CE:
                if not SAME_T:
                    c2 = s * LOG2E
                    mc_new = tl.maximum(m_c, tl.max(c2, axis=0))
                    mc_s = _safe_max(mc_new)
                    z_c = z_c * tl.exp2(m_c - mc_s) + tl.sum(tl.exp2(c2 - mc_s), axis=0)
                    m_c = mc_new
        lse2_a = _safe_max(m_a) + tl.log2(z_a)
        lse2_b = _safe_max(m_b) + tl.log2(z_b)
        K1 = zero
        K2 = zero
        if KIND == 0:
            D = (w / z_b - lse2_b + lse2_a) * LN2  # sum pt (b - a) - lse(b) + lse(a)
        elif KIND == 1:
            D = (w / z_a - lse2_a + lse2_b) * LN2  # sum ps (a - b) - lse(a) + lse(b)
        else:
            # ---- pass 2 of JSD, skew KL, TVD: the row sums K1, K2 ----
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask, s, t, ps, pt, x, y = _tile_probs(s_row, t_row, offs, V, scale, lse2_a, lse2_b, l2b, l2nb,
                                                       sk, sic, sc, tk, tic, tc, ACC, KIND, S_XF, T_XF)
                d1, d2 = _divergence_terms(ps, pt, x, y, KIND)
                K1 += tl.sum(d1, axis=0)
                K2 += tl.sum(d2, axis=0)
            D = _divergence_value(K1, K2, beta_a, KIND)
        loss = kd_w * D
        lse2_c = lse2_a
        if CE:
            c2_label = s_label * scale
            if not SAME_T:
                lse2_c = _safe_max(m_c) + tl.log2(z_c)
                c2_label = s_label * LOG2E
            loss += ce_w * ((lse2_c - c2_label) * LN2)  # CE = lse(s) - s[label]
        tl.store(loss_ptr + row, loss)
        if GRAD_S or GRAD_T:
            # ---- last pass: gradients ----
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask, s, t, ps, pt, x, y = _tile_probs(s_row, t_row, offs, V, scale, lse2_a, lse2_b, l2b, l2nb,
                                                       sk, sic, sc, tk, tic, tc, ACC, KIND, S_XF, T_XF)
                ds, dt = _divergence_grads(ps, pt, x, y, D, K1, K2, beta_a, KIND)
                if GRAD_S:
                    gs = g_kd * ds
                    if CE:
                        if SAME_T:
                            pc = ps
                        else:
                            pc = tl.exp2(s * LOG2E - lse2_c)
                        gs += g_ce * (pc - tl.where(offs == label, 1.0, 0.0))  # softmax(s) - onehot
                    gs = _xform_grad(gs, s, sk, sic, S_XF)
                    tl.store(gs_row + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    gt = _xform_grad(g_kd * dt, t, tk, tic, T_XF)
                    tl.store(gt_row + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
# Largest whole-row block held in registers without register spills on sm_80 / sm_90, checked
# by tests/test_aot.py on the heaviest variant (JSD + CE at T != 1 + both gradients). With about
# 8 fp32 values per thread per row array the heaviest variant uses ~90 registers; measured
# (sm_90, triton 3.9, JSD + CE + both grads) the largest spill-free whole-row block is
#     4 warps: 2048   8 warps: 4096   16 warps: 4096 (8192 spills)   32 warps: 4096 (8192 spills)
# (forward / reverse KL alone fit 8192 with 32 warps, but every real LLM vocabulary is far above
# 8192, so one limit for all kinds keeps the configuration simple). fp64 (gradcheck) uses two
# registers per value, hence the smaller blocks.
MAX_SINGLE_BLOCK = {torch.float32: 4096, torch.bfloat16: 4096, torch.float16: 4096, torch.float64: 1024}
# streaming tile: 2048 logits per iteration with 8 warps (8 values per thread, 40-64 registers,
# so up to four programs share an SM). Larger tiles compile, but ptxas then spills a register
# in some variants (4096 / 8 warps: 8 bytes on sm_80 for fp16 JSD; 4096 / 16 warps and
# 8192 / 16 warps: 8 bytes on sm_80 / sm_90 for some variants).
STREAM_BLOCK = {torch.float32: 2048, torch.bfloat16: 2048, torch.float16: 2048, torch.float64: 1024}
STREAM_WARPS = 8


def _single_warps(block: int, key) -> int:
    # about 8 (fp32) / 4 (fp64) values per thread per row array, 1 to 16 warps
    per_warp = 128 if key == torch.float64 else 256
    return max(1, min(16, block // per_warp))


def _key_dtype(student_dtype, teacher_dtype):
    if torch.float64 in (student_dtype, teacher_dtype):
        return torch.float64
    if torch.float32 in (student_dtype, teacher_dtype):
        return torch.float32
    return student_dtype


def launch_config(V: int, student_dtype, teacher_dtype) -> dict:
    """BLOCK, num_warps and SINGLE_PASS for a row of V logits."""
    key = _key_dtype(student_dtype, teacher_dtype)
    block = triton.next_power_of_2(max(int(V), 1))
    if block <= MAX_SINGLE_BLOCK[key]:
        return {"BLOCK": block, "num_warps": _single_warps(block, key), "SINGLE_PASS": True}
    return {"BLOCK": STREAM_BLOCK[key], "num_warps": STREAM_WARPS, "SINGLE_PASS": False}


def documented_traffic(V: int, student_dtype, teacher_dtype, kind: int, need_grad_student: bool,
                       need_grad_teacher: bool) -> tuple:
    """(read, write) bytes per row element that the kernel header promises for this call: the row
    is read once when it is held in registers, twice (forward / reverse KL) or three times (JSD)
    when streamed; each requested gradient is written once. Per-row scalars (label, loss,
    grad_scale) come on top. ``bench.roofline`` measures the real traffic against this."""
    bs = torch.empty((), dtype=student_dtype).element_size()
    bt = torch.empty((), dtype=teacher_dtype).element_size()
    single = launch_config(V, student_dtype, teacher_dtype)["SINGLE_PASS"]
    reads = 1 if single else (3 if kind >= KIND_JSD else 2)
    if not (need_grad_student or need_grad_teacher) and not single:
        reads -= 1  # loss only: the gradient pass is skipped
    return reads * (bs + bt), bs * bool(need_grad_student) + bt * bool(need_grad_teacher)


def _flags(kind, has_labels, ce_weight, temperature, need_grad_student, need_grad_teacher, cfg, s_xf=0, t_xf=0):
    return {
        "KIND": int(kind),
        "HAS_LABELS": bool(has_labels),
        "CE": bool(ce_weight > 0),
        "SAME_T": bool(temperature == 1.0),
        "GRAD_S": bool(need_grad_student),
        "GRAD_T": bool(need_grad_teacher),
        "SINGLE_PASS": bool(cfg["SINGLE_PASS"]),
        "BLOCK": int(cfg["BLOCK"]),
        "S_XF": int(s_xf),
        "T_XF": int(t_xf),
    }


# --------------------------------------------------------------------------------------------
# the launcher
# --------------------------------------------------------------------------------------------
def softmax_kl_forward(student, teacher, labels, grad_scale, *, temperature: float, kind: int, beta: float,
                       ignore_index: int, ce_weight: float, kd_weight: float,
                       need_grad_student: bool, need_grad_teacher: bool, s_scale: float = 1.0, s_cap: float = 0.0,
                       t_scale: float = 1.0, t_cap: float = 0.0):
    """student, teacher: [N, V] or [B, L, V] rows (kdkernels._core.rows: the leading strides are free,
    the last dim contiguous; the two may be laid out differently), same device, possibly different
    float dtypes. labels: None or int64 [N]. grad_scale: 0-dim or 1-element float32 tensor on the
    same device. Returns (loss_rows [N] float32 (float64 for fp64 inputs), grad_student [N,V] in
    student.dtype or None, grad_teacher [N,V] in teacher.dtype or None), the gradients contiguous."""
    lay_s, lay_t = _layout(student), _layout(teacher)
    assert lay_s[0] == lay_t[0] and student.shape[-1] == teacher.shape[-1]
    assert student.stride(-1) == 1 and teacher.stride(-1) == 1
    assert kind in (KIND_FORWARD, KIND_REVERSE, KIND_JSD, KIND_SKEW_FORWARD, KIND_SKEW_REVERSE, KIND_TVD)
    assert kind not in (KIND_JSD, KIND_SKEW_FORWARD, KIND_SKEW_REVERSE) or 0.0 < beta < 1.0
    assert temperature > 0
    assert ce_weight <= 0 or labels is not None
    assert grad_scale.numel() == 1
    N, V = lay_s[0], student.shape[-1]
    assert V >= 1 and V <= 2**31 - 2**17, "V must fit int32 column offsets"
    acc = acc_dtype(student, teacher)
    device = student.device
    loss = new_output((N,), dtype=acc, device=device)
    grad_s = new_output((N, V), dtype=student.dtype, device=device) if need_grad_student else None
    grad_t = new_output((N, V), dtype=teacher.dtype, device=device) if need_grad_teacher else None
    if N == 0:
        return loss, grad_s, grad_t
    if labels is not None:
        assert labels.dtype == torch.int64 and labels.shape == (N,)
        labels = labels.contiguous()
    cfg = launch_config(V, student.dtype, teacher.dtype)
    flags = _flags(kind, labels is not None, ce_weight, temperature, need_grad_student, need_grad_teacher, cfg,
                   xform_flag(s_scale, s_cap), xform_flag(t_scale, t_cap))
    b = float(beta) if kind in (KIND_JSD, KIND_SKEW_FORWARD, KIND_SKEW_REVERSE) else 0.5  # the mixture weight
    _softmax_kl_kernel[(N,)](
        student, teacher,
        labels if labels is not None else loss,  # unused placeholders keep the argument list fixed
        grad_scale, loss,
        grad_s if grad_s is not None else student,
        grad_t if grad_t is not None else teacher,
        *lay_s[1:], *lay_t[1:],
        grad_s.stride(0) if grad_s is not None else 0,
        grad_t.stride(0) if grad_t is not None else 0,
        V, int(ignore_index),
        *hi_lo(1.0 / float(temperature)), *hi_lo(b), *hi_lo(ce_weight), *hi_lo(kd_weight),
        *xform_args(s_scale, s_cap), *xform_args(t_scale, t_cap),
        num_warps=cfg["num_warps"], **flags,
    )
    return loss, grad_s, grad_t


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot.py)
# --------------------------------------------------------------------------------------------
def _signature(student_dtype, teacher_dtype, has_labels, grad_s, grad_t, flags, aligned):
    """The argument types the launcher passes, in the form triton.compiler.ASTSource takes
    (constexpr arguments typed "constexpr", as triton >= 3.3 expects). A ":16" suffix marks an
    argument the JIT specializes as divisible by 16 (every pointer the launcher passes; the
    strides and V when V % 16 == 0), as in triton/tools/compile.py; strip it and turn it into
    ``attrs`` before compiling."""
    sd, td = _TL_NAME[student_dtype], _TL_NAME[teacher_dtype]
    acc = "fp64" if "fp64" in (sd, td) else "fp32"
    i = "i32:16" if aligned else "i32"
    sig = {
        "s_ptr": "*" + sd, "t_ptr": "*" + td,
        "labels_ptr": "*i64" if has_labels else "*" + acc,
        "grad_scale_ptr": "*fp32", "loss_ptr": "*" + acc,
        "gs_ptr": "*" + sd, "gt_ptr": "*" + td,
    }
    sig = {k: v + ":16" for k, v in sig.items()}
    sig.update({
        "stride_s0": i, "stride_s": i, "inner_s": "i32", "stride_t0": i, "stride_t": i, "inner_t": "i32",
        "stride_gs": i if grad_s else "i32:16",  # 0 when the gradient is not requested
        "stride_gt": i if grad_t else "i32:16",
        "V": i, "ignore_index": "i32",
        "inv_T": "fp32", "inv_T_lo": "fp32", "beta": "fp32", "beta_lo": "fp32",
        "ce_weight": "fp32", "ce_weight_lo": "fp32", "kd_weight": "fp32", "kd_weight_lo": "fp32",
        "s_k": "fp32", "s_k_lo": "fp32", "s_c": "fp32", "s_c_lo": "fp32",
        "t_k": "fp32", "t_k_lo": "fp32", "t_c": "fp32", "t_c_lo": "fp32",
    })
    for k in flags:
        sig[k] = "constexpr"
    return sig


def aot_case(V, student_dtype, teacher_dtype, kind, has_labels, ce_weight, temperature, need_grad_student,
             need_grad_teacher, xf=0):
    """(signature, constexprs, num_warps) of the kernel variant the launcher runs for this call
    (``xf``: the XF constexpr of both sides' logit transforms)."""
    cfg = launch_config(V, student_dtype, teacher_dtype)
    flags = _flags(kind, has_labels, ce_weight, temperature, need_grad_student, need_grad_teacher, cfg, xf, xf)
    sig = _signature(student_dtype, teacher_dtype, has_labels, need_grad_student, need_grad_teacher, flags,
                     aligned=V % 16 == 0)
    return sig, flags, cfg["num_warps"]


def aot_cases() -> list:
    """(signature, constexprs, num_warps) for the kernel variants the launcher uses at
    V in {1000, 32001, 131073, 262144} (and V = MAX_SINGLE_BLOCK, the largest whole row) x dtypes
    {fp32, bf16, fp16} (plus bf16 student / fp32
    teacher and fp64) x the feature combinations that matter for registers: each kind with
    labels + CE at T != 1 + both gradients (the heaviest), forward KL without labels and student
    gradient only, forward KL with CE at T == 1. Variants that compile to the same code are
    listed once (131073 and 262144 differ only in the divisibility of V and the strides); and the
    heaviest variant with both sides' logits soft-capped, and with the skew KL and TVD."""
    combos = [
        # kind, has_labels, ce_weight, temperature, grad_s, grad_t
        (0, True, 0.5, 2.0, True, True),
        (1, True, 0.5, 2.0, True, True),
        (2, True, 0.5, 2.0, True, True),
        (0, False, 0.0, 2.0, True, False),
        (0, True, 0.5, 1.0, True, False),
    ]
    cases, seen = [], set()

    def add(V, sd, td, combo):
        case = aot_case(V, sd, td, *combo)
        key = (tuple(case[0].items()), tuple(case[1].items()), case[2])
        if key not in seen:
            seen.add(key)
            cases.append(case)

    for V in (1000, 32001, 131073, 262144):
        for d in (torch.float32, torch.bfloat16, torch.float16):
            for combo in (combos if V != 262144 else combos[2:3]):  # aligned: heaviest only
                add(V, d, d, combo)
    for d in (torch.float32, torch.bfloat16):  # the largest whole-row block
        for combo in combos[:3]:
            add(MAX_SINGLE_BLOCK[d], d, d, combo)
    for V in (1000, 131073):
        add(V, torch.bfloat16, torch.float32, combos[2])
        add(V, torch.float64, torch.float64, combos[2])
    for V in (MAX_SINGLE_BLOCK[torch.bfloat16], 262144):  # both sides soft-capped, the heaviest variant
        add(V, torch.bfloat16, torch.bfloat16, (*combos[2], 2))
        for kind in (KIND_SKEW_FORWARD, KIND_SKEW_REVERSE, KIND_TVD):  # the other two-sum kinds, heaviest
            add(V, torch.bfloat16, torch.bfloat16, (kind, *combos[2][1:]))
    return cases
