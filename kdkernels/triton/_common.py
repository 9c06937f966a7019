"""What the Triton kernel modules of this package share, one definition each: every module under
``kdkernels.triton`` imports shared things from here only (``kdkernels.triton.aot`` excepted).

Constants
    ``LN2``, ``LOG2E`` (``tl.constexpr``, for use inside kernels); ``KIND_FORWARD``, ``KIND_REVERSE``,
    ``KIND_JSD`` (the divergence kinds of the ``KIND`` constexpr); ``_TL_NAME`` (torch dtype -> the
    triton dtype name of signatures and of the ``DOT`` constexprs: "fp32", "bf16", "fp16", "fp64").
Element-wise divergence helpers (``@triton.jit``; the math is in the header of
    :mod:`kdkernels.triton.softmax_kl`, they work on 1-D rows and 2-D tiles alike)
    ``_safe_max``, ``_logaddexp2``, ``_log2_mix``, ``_log_ratios``, ``_divergence_terms``,
    ``_divergence_value`` (and its host twin ``divergence_value``), ``_divergence_grads``.
Matmul-tile helpers (``@triton.jit``; the fused-linear, similarity and projected-feature kernels)
    ``_cast``, ``_dot`` (operand cast, ``tl.dot`` at the requested precision), ``_logits_tile``
    (``h Wᵀ + b`` over slices of K), ``_online`` (online max / sum of 2^x over a tile's rows),
    ``_accumulate`` (``dz W`` into ``dh``, ``dzᵀ h`` into ``dW``, ``Σ dz`` into ``db``, atomically).
Logit transforms (``@triton.jit``; kdkernels._core.logit_options)
    ``_xform`` (logit scale and soft-cap of a loaded tile, masked lanes kept at -inf), ``_xform_grad``
    (a gradient chained through it); host side ``xform_flag`` (the ``XF`` constexpr), ``xform_args``.
Host helpers
    ``hi_lo`` (a Python float as two fp32 halves, for fp64 kernels),
    ``_layout`` ([N, V] / [B, L, V] rows as the kernels take them, kdkernels._core.rows),
    ``_contig_last`` (last dim contiguous), ``dot_launch_config`` (the ``tl.dot`` tiles and warps),
    ``_dot_dtype``, ``_precision`` (matmul operand dtype and fp32 precision), ``_splits`` (column
    splits of a statistics pass), ``_merge`` (log-sum-exp merge of the splits).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from kdkernels._core.numerics import acc_dtype, safe_max

# natural log of 2 and log2(e), as constexprs for use inside kernels
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)

# the divergence kinds (the KIND constexpr)
KIND_FORWARD = 0
KIND_REVERSE = 1
KIND_JSD = 2
KIND_SKEW_FORWARD, KIND_SKEW_REVERSE, KIND_TVD = 3, 4, 5

# torch dtype -> triton dtype name (signatures, DOT constexprs)
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# --------------------------------------------------------------------------------------------
# element-wise divergence helpers (inlined into the kernels; math in triton/softmax_kl.py)
# --------------------------------------------------------------------------------------------
@triton.jit
def _safe_max(m):
    # a max that is still -inf (nothing seen yet / all padded) must not be subtracted: use 0
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _logaddexp2(x, y):
    # log2(2^x + 2^y); -inf when both are -inf
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    return mx + tl.log2(1.0 + tl.exp2(mn - _safe_max(mx)))


@triton.jit
def _log2_mix(lps2, lpt2, l2b, l2nb):
    # log2 m, m = beta pt + (1-beta) ps; exactly log2 ps where ps == pt (so D == 0 exactly
    # for identical rows, V == 1 included)
    return tl.where(lps2 == lpt2, lps2, _logaddexp2(lpt2 + l2b, lps2 + l2nb))


@triton.jit
def _log_ratios(lps2, lpt2, l2b, l2nb, KIND: tl.constexpr):
    # the natural-log ratios each kind needs, from log2 probabilities (NaN where both are -inf;
    # every use is guarded by p == 0)
    if KIND == 0:
        x = (lpt2 - lps2) * LN2  # log pt - log ps
        y = x
    elif KIND == 1:
        x = (lps2 - lpt2) * LN2  # log ps - log pt
        y = x
    elif KIND == 5:
        # TVD: sign(ps - pt) (0 where equal, both -inf included)
        x = tl.where(lps2 == lpt2, 0.0, tl.where(lps2 > lpt2, 1.0, -1.0))
        y = x
    else:
        # JSD, skew KL: m = beta pt + (1 - beta) ps
        lm2 = _log2_mix(lps2, lpt2, l2b, l2nb)
        x = (lps2 - lm2) * LN2  # log ps - log m
        y = (lpt2 - lm2) * LN2  # log pt - log m
    return x, y


@triton.jit
def _divergence_terms(ps, pt, x, y, KIND: tl.constexpr):
    # per-element terms whose row sums give D (KIND 0 / 1) or (K1, K2) (the kinds with a second
    # sweep, kdkernels/_core/divergences.py); 0 where p == 0
    if KIND == 0:
        d1 = tl.where(pt == 0.0, 0.0, pt * x)  # pt (log pt - log ps)
        d2 = d1
    elif KIND == 1:
        d1 = tl.where(ps == 0.0, 0.0, ps * x)  # ps (log ps - log pt)
        d2 = d1
    elif KIND == 2:
        d1 = tl.where(ps == 0.0, 0.0, ps * x)  # ps (log ps - log m)  -> Ks
        d2 = tl.where(pt == 0.0, 0.0, pt * y)  # pt (log pt - log m)  -> Kt
    elif KIND == 3:
        d1 = tl.where(ps == 0.0, 0.0, ps * tl.exp(y))  # ps pt / m          -> R
        d2 = tl.where(pt == 0.0, 0.0, pt * y)          # pt (log pt - log m) -> Kt
    elif KIND == 4:
        d1 = tl.where(ps == 0.0, 0.0, ps * x)          # ps (log ps - log m) -> Ks
        d2 = tl.where(pt == 0.0, 0.0, pt * tl.exp(x))  # pt ps / m          -> R
    else:
        d1 = ps * x                  # ps sign(ps - pt)
        d2 = tl.abs(ps - pt)         # |ps - pt|
    return d1, d2


@triton.jit
def _divergence_value(K1, K2, beta, KIND: tl.constexpr):
    # D of the kinds with a second sweep, from its two row sums
    if KIND == 2:
        D = beta * K2 + (1.0 - beta) * K1
    elif KIND == 3:
        D = K2
    elif KIND == 4:
        D = K1
    else:
        D = 0.5 * K2
    return D


def divergence_value(K1, K2, beta: float, kind: int):
    """:func:`_divergence_value` on the host (tensors of row sums)."""
    return {2: lambda: beta * K2 + (1.0 - beta) * K1, 3: lambda: K2, 4: lambda: K1, 5: lambda: 0.5 * K2}[kind]()


@triton.jit
def _divergence_grads(ps, pt, x, y, D, Ks, Kt, beta, KIND: tl.constexpr):
    # T dD/ds and T dD/dt (Ks, Kt: the row sums K1, K2 of the kinds with a second sweep)
    if KIND == 0:
        ds = ps - pt                                            # ps - pt
        dt = tl.where(pt == 0.0, 0.0, pt * (x - D))             # pt (log pt - log ps - D)
    elif KIND == 1:
        ds = tl.where(ps == 0.0, 0.0, ps * (x - D))             # ps (log ps - log pt - D)
        dt = pt - ps                                            # pt - ps
    elif KIND == 2:
        ds = (1.0 - beta) * tl.where(ps == 0.0, 0.0, ps * (x - Ks))  # (1-beta) ps (log ps - log m - Ks)
        dt = beta * tl.where(pt == 0.0, 0.0, pt * (y - Kt))          # beta pt (log pt - log m - Kt)
    elif KIND == 3:
        r = tl.exp(y)  # pt / m; R = Ks
        ds = (1.0 - beta) * tl.where(ps == 0.0, 0.0, ps * (Ks - r))  # -(1-beta) ps (r - R)
        dt = tl.where(pt == 0.0, 0.0, pt * (y - beta * r - Kt + 1.0 - (1.0 - beta) * Ks))
    elif KIND == 4:
        r = tl.exp(x)  # ps / m; R = Kt
        ds = tl.where(ps == 0.0, 0.0, ps * (x - (1.0 - beta) * r - Ks + 1.0 - beta * Kt))
        dt = beta * tl.where(pt == 0.0, 0.0, pt * (Kt - r))          # -beta pt (r - R)
    else:
        ds = 0.5 * ps * (x - Ks)                                # ps (sign - K1) / 2
        dt = 0.5 * pt * (Ks - Kt - x)                           # pt (K1 - K2 - sign) / 2
    return ds, dt


# --------------------------------------------------------------------------------------------
# matmul-tile helpers (tl.dot tiles of the fused-linear, similarity and hint kernels)
# --------------------------------------------------------------------------------------------
@triton.jit
def _cast(x, DOT: tl.constexpr):
    # DOT names the matmul operand dtype: "fp32", "bf16", "fp16" or "fp64"
    if DOT == "bf16":
        return x.to(tl.bfloat16)
    elif DOT == "fp16":
        return x.to(tl.float16)
    elif DOT == "fp64":
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot(x, y, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    # x [M, K] @ y [K, Nc] + acc; PREC chooses IEEE or TF32 products for fp32 operands
    if DOT == "fp32":
        return tl.dot(x, y, acc, input_precision=PREC)
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, K, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # z[rows, cols] = h[rows] . w[cols] (+ b[cols]), accumulated in ACC over slices of K
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h = _cast(tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0), DOT)
        w = _cast(tl.load(w_rows + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0), DOT)
        acc = _dot(h, tl.trans(w), acc, DOT, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _online(m, z, x2):
    # merge a [BLOCK_N, BLOCK_V] tile of base-2 exponents into the running (max, sum of 2^(x - max));
    # returns the new max, the new sum, the tile's 2^(x - new max) and the old sums' rescale factor
    m_new = tl.maximum(m, tl.max(x2, axis=1))
    sm = _safe_max(m_new)
    f = tl.exp2(m - sm)
    e = tl.exp2(x2 - sm[:, None])
    return m_new, z * f + tl.sum(e, axis=1), e, f


@triton.jit
def _accumulate(dz, x_ptr, x_idx, x_off, x_mask, w_ptr, w_idx, w_mask, stride_w, dx_ptr, dw_ptr, db_ptr, K,
                NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # dz [BLOCK_N, BLOCK_V] (zero outside the tile): dx[x_idx] += dz @ w[w_idx], dw[w_idx] += dzᵀ @ x[x_idx],
    # db[w_idx] += sum_rows dz; dx, dw are contiguous ACC buffers with row stride K; row x_idx of x
    # starts x_off elements into x
    if NEED_B:
        tl.atomic_add(db_ptr + w_idx, tl.sum(dz, axis=0), mask=w_mask)
    if NEED_X or NEED_W:
        dzc = _cast(dz, DOT)
        w_off = w_idx[:, None].to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            if NEED_X:
                w = _cast(tl.load(w_ptr + w_off * stride_w + ks[None, :], mask=w_mask[:, None] & kmask[None, :],
                                  other=0.0), DOT)
                part = _dot(dzc, w, tl.zeros([BLOCK_N, BLOCK_K], ACC), DOT, PREC)
                tl.atomic_add(dx_ptr + x_idx[:, None] * K + ks[None, :], part,
                              mask=x_mask[:, None] & kmask[None, :])
            if NEED_W:
                x = _cast(tl.load(x_ptr + x_off[:, None] + ks[None, :],
                                  mask=x_mask[:, None] & kmask[None, :], other=0.0), DOT)
                part = _dot(tl.trans(dzc), x, tl.zeros([BLOCK_V, BLOCK_K], ACC), DOT, PREC)
                tl.atomic_add(dw_ptr + w_off * K + ks[None, :], part, mask=w_mask[:, None] & kmask[None, :])


# --------------------------------------------------------------------------------------------
# the logit transform u = c tanh(k z / c) (u = k z without a cap; kdkernels._core.logit_options)
# XF: 0 none, 1 scale only, 2 scale and soft-cap (constexpr, so the default compiles to nothing)
# --------------------------------------------------------------------------------------------
@triton.jit
def _xform(z, k, ic, c, mask, XF: tl.constexpr):
    # masked lanes (loaded as -inf) stay -inf: a soft-cap would make them -c, and give them mass
    u = z
    if XF >= 1:
        u = z * k
    if XF == 2:
        # tanh(y) = 1 - 2 / (e^(2y) + 1): exact at +-inf, NaN kept
        u = c * (1.0 - 2.0 / (tl.exp2((u * ic) * (2.0 * LOG2E)) + 1.0))
        u = tl.where(mask, u, float("-inf"))
    return u


@triton.jit
def _xform_grad(g, u, k, ic, XF: tl.constexpr):
    # g du/dz with du/dz = k (1 - (u / c)^2), or k
    out = g
    if XF == 1:
        out = g * k
    if XF == 2:
        r = u * ic
        out = g * (k * (1.0 - r * r))
    return out


def hi_lo(x):
    """``x = hi + lo`` with both fp32 (triton passes Python floats as fp32): a kernel that
    accumulates in fp64 adds them back at fp64 precision; in fp32, hi + lo rounds back to hi."""
    x = float(x)
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def xform_flag(scale: float, cap: float) -> int:
    """The ``XF`` constexpr of a ``(scale, cap)`` transform (:func:`_xform`)."""
    return 2 if cap else (1 if scale != 1.0 else 0)


def xform_args(scale: float, cap: float):
    """``k, k_lo, c, c_lo`` (:func:`hi_lo` pairs) of a ``(scale, cap)`` transform; the kernel forms
    ``1 / c`` itself."""
    return (*hi_lo(scale), *hi_lo(cap if cap else 1.0))


# --------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------
def _layout(x):
    """(rows, stride(0), stride(1), L) of [N, V] or [B, L, V] rows, in the kernel's argument order."""
    if x.dim() == 2:
        return x.shape[0], 0, x.stride(0), max(1, x.shape[0])
    assert x.dim() == 3
    return x.shape[0] * x.shape[1], x.stride(0), x.stride(1), max(1, x.shape[1])


def _contig_last(x):
    return None if x is None else (x if x.stride(-1) == 1 else x.contiguous())


def dot_launch_config(key_dtype, interpreted: bool = False, precision: str = "tf32x3") -> dict:
    """Tile sizes and warps, chosen so that no variant spills registers on sm_80 / sm_90
    (tests/test_aot.py): [64, 64] logits tiles over 32-wide slices of H with 8 warps for 16-bit
    operands; for fp32, [32, 64] tiles over 16-wide slices with 3xTF32 products ([64, 64] spills on
    sm_80) and [64, 64] with plain TF32; [32, 32] tiles with 4 warps for fp64.
    ``key_dtype``: fp64 or fp32 when any operand (or the teacher logits) is, else a 16-bit dtype.
    Under the interpreter the tiles only set how many programs numpy runs."""
    if interpreted:
        return {"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_K": 64, "num_warps": 4}
    if key_dtype == torch.float64:
        return {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 4}
    if key_dtype == torch.float32:
        if precision == "tf32":
            return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 16, "num_warps": 8}
        return {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 16, "num_warps": 8}
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 8}


def _dot_dtype(x, w):
    return x.dtype if x.dtype == w.dtype else acc_dtype(x, w)


def _precision() -> str:
    # fp32 operands: 3xTF32 (products split into high and low TF32 parts, about fp32 accuracy, on the
    # tensor cores) unless the user allowed plain TF32 for matmuls
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _splits(n_row_blocks: int, V: int, block_v: int, device) -> int:
    """Vocabulary splits of the statistics pass: enough programs for two waves over the SMs."""
    if device.type != "cuda":
        return 3  # the interpreter: every test exercises the merge of splits
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(V, block_v), triton.cdiv(2 * sms, n_row_blocks)))


def _merge(m, z):
    M = m.max(0).values
    f = torch.exp2(m - safe_max(M)[None])
    return M, (z * f).sum(0), f
