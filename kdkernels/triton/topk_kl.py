"""Forward KL to a top-k (sparse) teacher in Triton: one program per row, two reads of the
student row (normalizer, gradient), the teacher's k values and indices read twice.

Kernel header
=============
Row ``s`` (length V), teacher values ``v_k`` and indices ``i_k`` (k of them), ``T`` = temperature,
base-2 exponents ``a2 = s log2(e)/T``, ``b2_k = v_k log2(e)/T``. For ``tail = uniform`` the
missing mass ``r = 1 - sum exp(v_k)`` is spread over the ``V - k`` other entries, each with
``b2_tail = ln(r / (V - k)) log2(e)/T`` (``-inf`` when ``r <= 0`` or ``k == V``; r in fp64).

    lse2_a = log2 sum 2^a2                                  (pass 1 over the row, online)
    lse2_b = log2 (sum_k 2^b2_k + (V - k) 2^b2_tail)        (over the k values)
    pt_k = 2^(b2_k - lse2_b),  pt_tail = 2^(b2_tail - lse2_b)
    D / ln 2 = sum_k pt_k (b2_k - lse2_b - a2_k + lse2_a)
               + pt_tail ((V - k)(b2_tail - lse2_b + lse2_a) - (sum_j a2_j - sum_k a2_k))
    dD/ds_j = (ps_j - pt_j) / T,  pt_j = pt_tail off the top-k (0 for tail = ignore)

``tail = bucket`` (``BUCKET``): the tail is one bin on both sides, ``b2_tail = log2(r) log2(e)/T``
among the k values for the teacher, ``ps_tail = 1 - sum_k ps_k = (z - z_k) / z`` for the student
(``z`` the row's sum of ``2^(a2 - m)``, ``z_k`` its top-k terms: no cancellation of a rounded
``lse2_a``);
``D / ln 2`` adds ``pt_tail (b2_tail - lse2_b - log2 ps_tail)`` and the gradient off the top-k is
``ps_j (1 - pt_tail / ps_tail) / T`` (csrc/cpu/topk_kl.cpp derives it).

Pass 2 writes ``g (keep ps_j - off) / T`` over the row (``keep = 1, off = pt_tail``, or for the
bucket ``keep = 1 - pt_tail / ps_tail, off = 0``); after a block barrier the k entries are
overwritten with ``g (ps_k - pt_k) / T``. Terms with ``pt == 0`` add nothing (``-inf`` values are
legal padding). A row labelled ``ignore_index`` gets a zero loss and a zero gradient row. NaN in
the student row reaches ``lse2_a``, hence the loss and the whole gradient row. This is the
computation of the C++ kernel (csrc/cpu/topk_kl.cpp), in base 2. With a student logit transform
(``XF``: scale, soft-cap) ``s`` is ``u = f(z)`` of each loaded logit and the gradient is chained
through it (``_common._xform_grad``), at no extra read.

Bytes moved per row: the student row twice (2 bs V), the gradient row once (bs V), the k values
and indices twice, plus k gathered student entries twice.
"""

import torch
import triton
import triton.language as tl

from kdkernels._core.debug import new_output
from kdkernels._core.numerics import acc_dtype
from kdkernels.triton._common import _TL_NAME, LN2, _layout, _safe_max, _xform, _xform_grad, xform_flag

__all__ = ["topk_kl_forward", "launch_config", "aot_cases"]

P_SCALE, P_INV_T, P_K, P_IC, P_C = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)


@triton.jit
def _topk_kl_kernel(
    s_ptr, v_ptr, i_ptr, labels_ptr, params_ptr, grad_scale_ptr, loss_ptr, gs_ptr,
    stride_s0, stride_s, inner_s, stride_v, stride_i, stride_gs, V, k, ignore_index,
    UNIFORM: tl.constexpr, HAS_LABELS: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, XF: tl.constexpr = 0, BUCKET: tl.constexpr = False,
):
    ACC = loss_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + (row // inner_s) * stride_s0 + (row % inner_s) * stride_s  # [B, L, V] rows, L = inner_s
    v_row = v_ptr + row * stride_v
    i_row = i_ptr + row * stride_i
    gs_row = gs_ptr + row * stride_gs
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            if GRAD:
                for v0 in range(0, V, BLOCK_V):
                    tl.store(gs_row + v0 + cols, tl.zeros([BLOCK_V], gs_ptr.dtype.element_ty), mask=v0 + cols < V)
            tl.store(loss_ptr + row, tl.zeros([], ACC))
            return
    scale = tl.load(params_ptr + P_SCALE)
    inv_t = tl.load(params_ptr + P_INV_T)
    # the student's logit transform (XF: 0 none, 1 scale, 2 scale and soft-cap; triton/_common.py)
    xk = tl.load(params_ptr + P_K)
    xic = tl.load(params_ptr + P_IC)
    xc = tl.load(params_ptr + P_C)

    # ---- pass 1: the student's normalizer (and row sum, for the uniform tail)
    m = tl.full([], NEG_INF, ACC)
    z = tl.zeros([], ACC)
    sum_a = tl.zeros([], ACC)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        a2 = _xform(tl.load(s_row + v0 + cols, mask=mask, other=NEG_INF).to(ACC), xk, xic, xc, mask, XF) * scale
        m_new = tl.maximum(m, tl.max(a2, axis=0))
        z = z * tl.exp2(m - _safe_max(m_new)) + tl.sum(tl.exp2(a2 - _safe_max(m_new)), axis=0)
        m = m_new
        if UNIFORM:
            sum_a += tl.sum(tl.where(mask, a2, 0.0), axis=0)
    lse2_a = _safe_max(m) + tl.log2(z)

    # ---- the teacher at T; its tail mass 1 - sum exp(v_k) in fp64 (k terms a row): in fp32 it
    # cancels when the top-k hold nearly all the mass (1 - 0.999999 keeps one digit)
    mb = tl.full([], NEG_INF, ACC)
    mass = tl.full([], 1.0, tl.float64)
    for k0 in range(0, k, BLOCK_K):
        kmask = k0 + ks < k
        vals = tl.load(v_row + k0 + ks, mask=kmask, other=NEG_INF).to(ACC)
        mb = tl.maximum(mb, tl.max(vals * scale, axis=0))
        if UNIFORM or BUCKET:
            mass -= tl.sum(tl.exp(vals.to(tl.float64)), axis=0)
    tail_n = tl.zeros([], ACC) + (V - k)
    b2_tail = tl.full([], NEG_INF, ACC)
    if UNIFORM:
        b2_tail = tl.where((mass > 0) & (tail_n > 0), (tl.log(mass).to(ACC) - tl.log(tail_n)) * scale, NEG_INF)
    if BUCKET:  # one bin for the whole tail
        b2_tail = tl.where((mass > 0) & (tail_n > 0), tl.log(mass).to(ACC) * scale, NEG_INF)
        tail_n = tl.zeros([], ACC) + 1.0
    mt = tl.maximum(mb, b2_tail + tl.log2(tail_n))
    zt = tl.where(b2_tail == NEG_INF, 0.0, tail_n * tl.exp2(b2_tail - _safe_max(mt)))
    for k0 in range(0, k, BLOCK_K):
        kmask = k0 + ks < k
        b2 = tl.load(v_row + k0 + ks, mask=kmask, other=NEG_INF).to(ACC) * scale
        zt += tl.sum(tl.exp2(b2 - _safe_max(mt)), axis=0)
    lse2_b = _safe_max(mt) + tl.log2(zt)
    pt_tail = tl.where(b2_tail == NEG_INF, 0.0, tl.exp2(b2_tail - lse2_b))

    # ---- the divergence
    d = tl.zeros([], ACC)
    sum_ak = tl.zeros([], ACC)
    z_k = tl.zeros([], ACC)  # the student's top-k share of z (the bucket's complement)
    n_bad = tl.zeros([], tl.int32)  # indices outside [0, V) (unchecked under torch.compile): never read
    for k0 in range(0, k, BLOCK_K):
        kmask = k0 + ks < k
        idx = tl.load(i_row + k0 + ks, mask=kmask, other=0)
        inside = (idx >= 0) & (idx < V)
        n_bad += tl.sum((kmask & ~inside).to(tl.int32), axis=0)
        kmask = kmask & inside
        a2k = _xform(tl.load(s_row + idx, mask=kmask, other=0.0).to(ACC), xk, xic, xc, kmask, XF) * scale
        lpt2 = tl.load(v_row + k0 + ks, mask=kmask, other=NEG_INF).to(ACC) * scale - lse2_b
        pt = tl.exp2(lpt2)
        d += tl.sum(tl.where(pt == 0.0, 0.0, pt * (lpt2 - a2k + lse2_a)), axis=0)
        if UNIFORM:
            sum_ak += tl.sum(tl.where(kmask, a2k, 0.0), axis=0)
        if BUCKET:
            z_k += tl.sum(tl.where(kmask, tl.exp2(a2k - _safe_max(m)), 0.0), axis=0)
    keep = tl.full([], 1.0, ACC)  # off the top-k, the gradient is g (keep ps - off)
    off = pt_tail
    if BUCKET:
        # the student's tail bin (z - z_k) / z, not 1 - sum_k ps_k: no rounding of lse2_a in it
        ps_tail = tl.maximum((z - z_k) / z, 0.0)
        d += tl.where(pt_tail == 0.0, 0.0, pt_tail * ((b2_tail - lse2_b) - tl.log2(ps_tail)))
        keep = tl.where(pt_tail == 0.0, 1.0, 1.0 - pt_tail / ps_tail)
        off = tl.zeros([], ACC)
    if UNIFORM:
        d += tl.where(pt_tail == 0.0, 0.0, pt_tail * (tail_n * (b2_tail - lse2_b + lse2_a) - (sum_a - sum_ak)))
    nan_if_bad = tl.where(n_bad > 0, float("nan"), 1.0).to(ACC)  # such a row: NaN loss and gradient
    tl.store(loss_ptr + row, d * LN2 * nan_if_bad)

    # ---- pass 2: the gradient g (ps - pt) / T
    if GRAD:
        g = tl.load(grad_scale_ptr).to(ACC) * inv_t * nan_if_bad
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            u = _xform(tl.load(s_row + v0 + cols, mask=mask, other=NEG_INF).to(ACC), xk, xic, xc, mask, XF)
            gv = _xform_grad(g * (tl.exp2(u * scale - lse2_a) * keep - off), u, xk, xic, XF)
            tl.store(gs_row + v0 + cols, gv.to(gs_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the k entries below overwrite values other threads stored above
        for k0 in range(0, k, BLOCK_K):
            kmask = k0 + ks < k
            idx = tl.load(i_row + k0 + ks, mask=kmask, other=0)
            kmask = kmask & (idx >= 0) & (idx < V)
            uk = _xform(tl.load(s_row + idx, mask=kmask, other=0.0).to(ACC), xk, xic, xc, kmask, XF)
            b2 = tl.load(v_row + k0 + ks, mask=kmask, other=NEG_INF).to(ACC) * scale
            gk = _xform_grad(g * (tl.exp2(uk * scale - lse2_a) - tl.exp2(b2 - lse2_b)), uk, xk, xic, XF)
            tl.store(gs_row + idx, gk.to(gs_ptr.dtype.element_ty), mask=kmask)


def launch_config(V: int, k: int, dtype) -> dict:
    """BLOCK_V (student tile, up to 4096 elements, 2048 for fp64), BLOCK_K (up to 1024, 512 for fp64)
    and warps."""
    cap = 2048 if dtype == torch.float64 else 4096
    block_v = min(triton.next_power_of_2(max(V, 1)), cap)
    # fp64 k-blocks of 1024 spilled 16 bytes on sm_90 with the bucket tail (tests/test_aot.py)
    block_k = min(triton.next_power_of_2(max(k, 1)), 512 if dtype == torch.float64 else 1024)
    # 8 values a thread in the k-blocks: 1024 entries on 4 warps spilled with the bucket tail on sm_90
    warps = max(1, min(8, max(block_v // 256, block_k // 128)))
    return {"BLOCK_V": block_v, "BLOCK_K": block_k, "num_warps": warps}


def topk_kl_forward(student, values, indices, labels, grad_scale, *, values_are_logits: bool, uniform_tail: bool,
                    temperature: float, ignore_index: int, need_grad: bool, s_scale: float = 1.0,
                    s_cap: float = 0.0, bucket_tail: bool = False):
    """student [N, V] or [B, L, V] rows (last dim contiguous), values / indices [N, k], labels int64 [N] or None,
    grad_scale a 1-element tensor. Returns (loss rows [N] fp32 (fp64 for fp64 students),
    gradient [N, V] in the student's dtype or None), as the C++ kernel does."""
    import math

    assert student.stride(-1) == 1
    assert not (values_are_logits and uniform_tail)
    lay = _layout(student)  # [N, V] or [B, L, V] rows (kdkernels._core.rows)
    N, V = lay[0], student.shape[-1]
    k = values.shape[1]
    acc = acc_dtype(student)
    dev = student.device
    loss = new_output((N,), dtype=acc, device=dev)
    grad = new_output((N, V), dtype=student.dtype, device=dev) if need_grad else None
    if N == 0:
        return loss, grad
    values = values if values.stride(-1) == 1 else values.contiguous()
    indices = indices.to(torch.int64)
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    params = torch.tensor([math.log2(math.e) / temperature, 1.0 / temperature, s_scale, 1.0 / s_cap if s_cap else 0.0,
                           s_cap], dtype=acc, device=dev)
    cfg = launch_config(V, k, student.dtype)
    _topk_kl_kernel[(N,)](
        student, values, indices, labels if labels is not None else indices, params, grad_scale, loss,
        grad if grad is not None else student,
        *lay[1:], values.stride(0), indices.stride(0), grad.stride(0) if grad is not None else 0,
        V, k, int(ignore_index),
        UNIFORM=bool(uniform_tail), HAS_LABELS=labels is not None, GRAD=bool(need_grad),
        BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], XF=xform_flag(s_scale, s_cap), BUCKET=bool(bucket_tail),
        num_warps=cfg["num_warps"])
    return loss, grad


def aot_cases() -> list:
    """(signature, constexprs, num_warps) at V = 131072, k = 64 and V = 1000, k = 1000: every
    student dtype with labels and the gradient, each tail, and a soft-capped student."""
    cases = []
    for V, k in ((131072, 64), (1000, 1000)):
        for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            # each tail (ignore, uniform, bucket); xf 2: a soft-capped student
            for uniform, bucket, xf in ((False, False, 0), (True, False, 0), (False, True, 0), (False, False, 2)):
                name = _TL_NAME[dt]
                acc = "fp64" if dt == torch.float64 else "fp32"
                sig = {"s_ptr": "*" + name, "v_ptr": "*fp32", "i_ptr": "*i64", "labels_ptr": "*i64",
                       "params_ptr": "*" + acc, "grad_scale_ptr": "*fp32", "loss_ptr": "*" + acc,
                       "gs_ptr": "*" + name}
                sig = {key: val + ":16" for key, val in sig.items()}
                sig.update({key: "i32" for key in ("stride_s0", "stride_s", "inner_s", "stride_v", "stride_i",
                                                   "stride_gs", "V", "k", "ignore_index")})
                cfg = launch_config(V, k, dt)
                flags = {"UNIFORM": uniform, "HAS_LABELS": True, "GRAD": True, "BLOCK_V": cfg["BLOCK_V"],
                         "BLOCK_K": cfg["BLOCK_K"], "XF": xf, "BUCKET": bucket}
                sig.update({key: "constexpr" for key in flags})
                cases.append((sig, flags, cfg["num_warps"]))
    return cases
