"""Fused-linear KL: the distillation loss straight from hidden states and lm_head weights, tiled
over the vocabulary, so that no ``[N, V]`` logits tensor ever exists (not even per chunk of rows).

Per row n (``z_s = h_s W_sᵀ + b_s``, ``z_t = h_t W_tᵀ + b_t`` or given teacher logits,
``a = z_s / T``, ``b = z_t / T``), the loss is the one of :func:`kdkernels.distill_loss`:
``ce_weight CE(z_s, label) + kd_weight D(b, a)``. Two passes over tiles of V columns:

    pass 1  per tile: logits tiles [R, Vt] (fp32 matmul accumulation), then per row the online
            (rescaled) log-sum-exp of a, b (and z_s at T = 1 for CE when T != 1), plus the running
            sum w = sum e^(b - mb)(b - a) (forward KL) / sum e^(a - ma)(a - b) (reverse KL), which
            gives D in closed form; z_s[label] is picked up in the tile that holds it.
    (JSD)   one more pass for Ks = sum ps (log ps - log m), Kt = sum pt (log pt - log m).
    pass 2  per tile: recompute the logits tiles, dZ_s = g (kd dD/dz_s + ce (softmax(z_s) - onehot)),
            dZ_t = g kd dD/dz_t (formulas in kdkernels/triton/softmax_kl.py), then
            dh_s += dZ_s W_s[tile], dW_s[tile] = dZ_sᵀ h_s, db_s[tile] = sum_n dZ_s (and the teacher's
            when it requires grad, or d(teacher_logits)[:, tile] = dZ_t).

Rows labelled ``ignore_index`` are dropped before any matmul (they cost nothing); with CE, a row
whose label is outside ``[0, V)`` gets a NaN loss and spreads NaN to every gradient it reaches (the
label range is not checked while torch.compile traces, and a wrong CE must not pass silently). Memory beyond
the gradients: per-row statistics O(N) and a few [R, Vt] fp32 tiles, independent of V. Matmuls
run in fp32 (fp64 for fp64 inputs): logits are never rounded to the input dtype before the softmax.

This module holds the PyTorch implementation of the tile loop (``backend="torch"``; any device);
the C++ backend (``backend="cpu"``, csrc/cpu/fused_linear_kl.cpp) runs the same two passes with the
per-row work fused into vectorized sweeps, and the Triton backend (``backend="triton"``,
kdkernels/triton/fused_linear_kl.py) runs them as tensor-core tiles with the gradients' matmuls
fused into the tile that produces ``dZ``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from kdkernels._backend import without_autocast
from kdkernels.ops.rows import row_count, take_rows

V_TILE = 2048  # vocabulary columns per tile
TILE_ELEMENTS = 1 << 19  # R * Vt per logits tile: 2 MiB of fp32 (a pass holds about ten such temporaries)


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def bad_labels(labels: Tensor, V: int) -> Tensor:
    """The rows whose cross-entropy label is outside ``[0, V)`` (the inputs are checked in eager
    mode, not while torch.compile traces): the kernels give them a NaN loss and NaN gradients."""
    return (labels < 0) | (labels >= V)


def _safe(m: Tensor) -> Tensor:
    # a running max that is still -inf must not be subtracted (-inf - -inf = NaN)
    return torch.where(m == -math.inf, torch.zeros_like(m), m)


def _xlogy_ratio(p: Tensor, diff: Tensor) -> Tensor:
    # p * diff where p > 0, else 0 (0 log 0 = 0; diff may be NaN or inf where p == 0)
    return torch.where(p > 0, p * diff, torch.zeros_like(p))


class _Tiles:
    """The logits tiles of one vocabulary slice for a block of rows. ``t_logits`` stays the
    caller's (strided) tensor: each tile gathers its [rows, columns] block from it, so that teacher
    logits are never copied whole."""

    def __init__(self, hs, Ws, bs, ht, Wt, bt, t_logits, keep, acc):
        self.hs, self.Ws, self.bs, self.ht, self.Wt, self.bt, self.tl = hs, Ws, bs, ht, Wt, bt, t_logits
        self.keep, self.acc = keep, acc

    def weights(self, v0: int, v1: int):
        acc = self.acc
        ws = self.Ws[v0:v1].to(acc)
        bs = None if self.bs is None else self.bs[v0:v1].to(acc)
        wt = None if self.Wt is None else self.Wt[v0:v1].to(acc)
        bt = None if self.bt is None else self.bt[v0:v1].to(acc)
        return ws, bs, wt, bt

    def logits(self, rows: slice, v0: int, v1: int, w) -> Tuple[Tensor, Tensor]:
        ws, bs, wt, bt = w
        hs = self.hs[rows].to(self.acc)
        zs = torch.addmm(bs, hs, ws.t()) if bs is not None else hs @ ws.t()
        if self.tl is not None:
            zt = take_rows(self.tl[..., v0:v1], self.keep[rows]).to(self.acc)
        else:
            ht = self.ht[rows].to(self.acc)
            zt = torch.addmm(bt, ht, wt.t()) if bt is not None else ht @ wt.t()
        return zs, zt


def tiled_forward(hs: Tensor, Ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], Wt: Optional[Tensor],
                  bt: Optional[Tensor], t_logits: Optional[Tensor], labels: Optional[Tensor], grad_scale: Tensor, *,
                  temperature: float, kind: int, beta: float, ignore_index: int, ce_weight: float,
                  kd_weight: float, need: Tuple[bool, ...], v_tile: Optional[int] = None,
                  merge=None) -> List[Optional[Tensor]]:
    """Loss rows and the requested gradients, pre-multiplied by ``grad_scale`` (a scalar, or one
    value per row). ``hs [N, H]``, ``Ws [V, H]``, ``bs [V]``; teacher ``ht [N, Ht]``, ``Wt [V, Ht]``,
    ``bt [V]`` or ``t_logits [N, V]``; the row tensors ``hs``, ``ht``, ``t_logits`` may also be
    ``[B, L, D]`` rows with free leading strides (:mod:`kdkernels.ops.rows`), read in place. ``need`` =
    which of (hs, Ws, bs, ht, Wt, bt, t_logits) get a gradient. Returns [loss_rows, d_hs, d_Ws,
    d_bs, d_ht, d_Wt, d_bt, d_tlogits] (None where not needed; those of the row tensors ``[N, D]``).

    ``merge``: for a vocabulary split across processes (kdkernels.distributed), an object whose
    ``stats(kind, ma, za, mb, zb, w)`` combines the per-row statistics of pass 1 over all slices
    and whose ``sums(K1, K2)`` adds the JSD sums; the gradients stay those of this slice.
    """
    acc = _acc_dtype(hs, Ws, ht, Wt, t_logits)
    v_tile = V_TILE if v_tile is None else v_tile
    N, V = row_count(hs), Ws.shape[0]
    dev = hs.device
    loss = torch.zeros(N, dtype=acc, device=dev)
    outs: List[Optional[Tensor]] = [loss] + [None] * 7
    grads_wanted = any(need)
    # gradients accumulate in the accumulation dtype and are cast at the end
    sources = (hs, Ws, bs, ht, Wt, bt, t_logits)
    flat = lambda i, x: (N, x.shape[-1]) if i in (0, 3, 6) else x.shape  # noqa: E731  row tensors: [N, D]
    acc_grads = [torch.zeros(flat(i, x), dtype=acc, device=dev) if (x is not None and need[i]) else None
                 for i, x in enumerate(sources)]

    # rows that count: ignored rows cost nothing
    if labels is not None:
        keep = (labels != ignore_index).nonzero().squeeze(1)
    else:
        keep = torch.arange(N, device=dev)
    n = keep.numel()
    if n == 0 or (V == 0 and merge is None):  # an empty slice still takes part in the merge
        return _finish(outs, acc_grads, sources)
    hs_k, ht_k = take_rows(hs, keep), take_rows(ht, keep)
    lab_k = None if labels is None else labels.index_select(0, keep)
    g = grad_scale.to(acc).reshape(-1)
    g_k = g if g.numel() == 1 else g.index_select(0, keep)
    bad = bad_labels(lab_k, V) if ce_weight != 0.0 else None
    if bad is not None:  # NaN rows, and NaN gradients wherever such a row reaches
        g_k = torch.where(bad, torch.full_like(bad, math.nan, dtype=acc), g_k.expand(n))
    tiles = _Tiles(hs_k, Ws, bs, ht_k, Wt, bt, t_logits, keep, acc)

    inv_t = 1.0 / temperature
    ce = ce_weight != 0.0
    ce_sep = ce and temperature != 1.0
    rows_per_block = max(1, min(n, TILE_ELEMENTS // v_tile))
    blocks = [slice(r, min(n, r + rows_per_block)) for r in range(0, n, rows_per_block)]
    vt = [(v0, min(V, v0 + v_tile)) for v0 in range(0, V, v_tile)]
    neg = torch.full((n,), -math.inf, dtype=acc, device=dev)
    ma, mb, mc = neg.clone(), neg.clone(), neg.clone()
    za, zb, zc, w = (torch.zeros(n, dtype=acc, device=dev) for _ in range(4))
    s_label = torch.zeros(n, dtype=acc, device=dev)

    # ---- pass 1: online statistics
    for v0, v1 in vt:
        wts = tiles.weights(v0, v1)
        for rb in blocks:
            zs, zt = tiles.logits(rb, v0, v1, wts)
            a, b = zs * inv_t, zt * inv_t
            ma_n = torch.maximum(ma[rb], a.max(1).values)
            mb_n = torch.maximum(mb[rb], b.max(1).values)
            fa, fb = torch.exp(ma[rb] - _safe(ma_n)), torch.exp(mb[rb] - _safe(mb_n))
            ea, eb = torch.exp(a - _safe(ma_n)[:, None]), torch.exp(b - _safe(mb_n)[:, None])
            za[rb] = za[rb] * fa + ea.sum(1)
            zb[rb] = zb[rb] * fb + eb.sum(1)
            if kind == 0:
                w[rb] = w[rb] * fb + _xlogy_ratio(eb, b - a).sum(1)
            elif kind == 1:
                w[rb] = w[rb] * fa + _xlogy_ratio(ea, a - b).sum(1)
            ma[rb], mb[rb] = ma_n, mb_n
            if ce_sep:
                mc_n = torch.maximum(mc[rb], zs.max(1).values)
                zc[rb] = zc[rb] * torch.exp(mc[rb] - _safe(mc_n)) + torch.exp(zs - _safe(mc_n)[:, None]).sum(1)
                mc[rb] = mc_n
            if ce:
                lab = lab_k[rb]
                inside = (lab >= v0) & (lab < v1)
                if bool(inside.any()):
                    idx = (lab - v0).clamp(0, v1 - v0 - 1)
                    picked = zs.gather(1, idx[:, None]).squeeze(1)
                    s_label[rb] = torch.where(inside, picked, s_label[rb])

    if merge is not None:
        ma, za, mb, zb, w = merge.stats(kind, ma, za, mb, zb, w)
    lse_a = _safe(ma) + torch.log(za)
    lse_b = _safe(mb) + torch.log(zb)
    lse_c = (_safe(mc) + torch.log(zc)) if ce_sep else lse_a * temperature  # lse(z_s) at T = 1
    K1 = K2 = None
    if kind == 0:
        D = w / zb - lse_b + lse_a  # sum pt (b - a) - lse(b) + lse(a)
    elif kind == 1:
        D = w / za - lse_a + lse_b  # sum ps (a - b) - lse(a) + lse(b)
    else:
        # ---- JSD pass: Ks, Kt
        K1 = torch.zeros(n, dtype=acc, device=dev)
        K2 = torch.zeros(n, dtype=acc, device=dev)
        lb, l1b = math.log(beta), math.log1p(-beta)
        for v0, v1 in vt:
            wts = tiles.weights(v0, v1)
            for rb in blocks:
                zs, zt = tiles.logits(rb, v0, v1, wts)
                lps, lpt = zs * inv_t - lse_a[rb, None], zt * inv_t - lse_b[rb, None]
                lm = torch.where(lps == lpt, lps, torch.logaddexp(lpt + lb, lps + l1b))
                K1[rb] += _xlogy_ratio(lps.exp(), lps - lm).sum(1)
                K2[rb] += _xlogy_ratio(lpt.exp(), lpt - lm).sum(1)
        if merge is not None:
            K1, K2 = merge.sums(K1, K2)
        D = beta * K2 + (1.0 - beta) * K1
    rows = kd_weight * D
    if ce:
        rows = rows + ce_weight * (lse_c - s_label)  # CE = lse(z_s) - z_s[label]
        rows = torch.where(bad, torch.full_like(rows, math.nan), rows)
    loss.index_copy_(0, keep, rows)

    if grads_wanted:
        # ---- pass 2: gradients
        want_s = any(need[:3])
        want_t = any(need[3:])
        g_kd = g_k * (kd_weight * inv_t)
        g_ce = g_k * ce_weight
        col = lambda x: x if x.dim() == 0 or x.numel() == 1 else x[:, None]  # noqa: E731
        for v0, v1 in vt:
            wts = tiles.weights(v0, v1)
            ws, _, wt, _ = wts
            for rb in blocks:
                zs, zt = tiles.logits(rb, v0, v1, wts)
                lps, lpt = zs * inv_t - lse_a[rb, None], zt * inv_t - lse_b[rb, None]
                ps, pt = lps.exp(), lpt.exp()
                gk = col(g_kd if g_kd.numel() == 1 else g_kd[rb])
                if kind == 0:
                    ds = ps - pt                                                  # ps - pt
                    dt = _xlogy_ratio(pt, lpt - lps - D[rb, None]) if want_t else None  # pt (log pt/ps - D)
                elif kind == 1:
                    ds = _xlogy_ratio(ps, lps - lpt - D[rb, None])                # ps (log ps/pt - D)
                    dt = pt - ps if want_t else None                              # pt - ps
                else:
                    lm = torch.where(lps == lpt, lps, torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta)))
                    ds = (1.0 - beta) * _xlogy_ratio(ps, lps - lm - K1[rb, None])   # (1-beta) ps (log ps/m - Ks)
                    dt = beta * _xlogy_ratio(pt, lpt - lm - K2[rb, None]) if want_t else None  # beta pt (log pt/m - Kt)
                if want_s:
                    dzs = ds * gk
                    if ce:
                        gc = g_ce if g_ce.numel() == 1 else g_ce[rb]
                        pc = ps if not ce_sep else torch.exp(zs - lse_c[rb, None])
                        dzs = dzs + pc * col(gc)                                  # softmax(z_s)
                        lab = lab_k[rb]
                        inside = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
                        if inside.numel():                                        # - onehot(label)
                            gc_rows = gc.reshape(-1).expand(dzs.shape[0])
                            dzs[inside, lab[inside] - v0] -= gc_rows[inside]
                    _accumulate(acc_grads[0:3], dzs, keep[rb], tiles.hs[rb].to(acc), ws, v0, v1)
                if want_t:
                    dzt = dt * gk
                    if tiles.ht is not None:
                        _accumulate(acc_grads[3:6], dzt, keep[rb], tiles.ht[rb].to(acc), wt, v0, v1)
                    if acc_grads[6] is not None:
                        acc_grads[6][keep[rb], v0:v1] = dzt
    return _finish(outs, acc_grads, sources)


def _accumulate(grads, dz, rows, hidden, weight, v0, v1):
    """dh[rows] += dZ W[tile], dW[tile] += dZ^T h, db[tile] += sum_rows dZ (grads = [dh, dW, db], None where
    not wanted)."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        d_hidden.index_add_(0, rows, dz @ weight)
    if d_weight is not None:
        d_weight[v0:v1] += dz.t() @ hidden
    if d_bias is not None:
        d_bias[v0:v1] += dz.sum(0)


def _finish(outs, acc_grads, sources):
    for i, (gacc, src) in enumerate(zip(acc_grads, sources)):
        if gacc is not None:
            outs[1 + i] = gacc.to(src.dtype)
    return outs


def shaped(outs, sources):
    """The gradients of the row tensors (hs, ht, t_logits), ``[N, D]`` from the kernels, in their
    sources' row shapes (a view: the kernels write them contiguous)."""
    return [outs[0]] + [g if g is None or g.shape == x.shape else g.view(x.shape) for g, x in zip(outs[1:], sources)]


# ------------------------------------------------------------------------------ the custom op

NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias",
         "teacher_logits")


@without_autocast
def launch(backend: str, hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, *, temperature, kind, beta,
           ignore_index, ce_weight, kd_weight, need):
    """One backend's kernels on ``[N, D]`` or ``[B, L, D]`` row tensors (hs, ht, t_logits); the
    gradients of those come back in their shapes."""
    srcs = (hs, Ws, bs, ht, Wt, bt, t_logits)
    if backend == "torch":
        return shaped(tiled_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, temperature=temperature,
                                    kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
                                    kd_weight=kd_weight, need=need), srcs)
    if backend == "cpu":
        from kdkernels import _ext

        C = _ext.require("fused_linear_kl(backend='cpu')")
        return shaped(list(C.fused_linear_kl_forward_cpu(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale,
                                                         temperature, kind, beta, ignore_index, ce_weight, kd_weight,
                                                         list(need), V_TILE, TILE_ELEMENTS)), srcs)
    if backend == "triton":
        from kdkernels.triton.fused_linear_kl import fused_linear_kl_forward

        return shaped(fused_linear_kl_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale,
                                              temperature=temperature, kind=kind, beta=beta, ignore_index=ignore_index,
                                              ce_weight=ce_weight, kd_weight=kd_weight, need=need), srcs)
    raise ValueError(f"no fused_linear_kl kernel for backend {backend!r}")


@torch.library.custom_op("kdkernels::fused_linear_kl", mutates_args=())
def fused_linear_kl_op(hs: Tensor, Ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], Wt: Optional[Tensor],
                       bt: Optional[Tensor], t_logits: Optional[Tensor], labels: Optional[Tensor],
                       grad_scale: Tensor, temperature: float, kind: int, beta: float, ignore_index: int,
                       ce_weight: float, kd_weight: float, reduction: int, need: List[bool],
                       backend: str) -> List[Tensor]:
    # per-row losses ("none") get their gradients in backward, where each row's grad_output is known
    outs = launch(backend, hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, temperature=temperature,
                  kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                  need=tuple(need) if reduction else (False,) * 7)
    rows = outs[0]
    loss = rows if reduction == 0 else rows.sum() * grad_scale.to(rows.dtype)
    return [loss] + [g if g is not None else hs.new_empty(0) for g in outs[1:]]


@fused_linear_kl_op.register_fake
def _(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, temperature, kind, beta, ignore_index, ce_weight,
      kd_weight, reduction, need, backend):
    acc = _acc_dtype(hs, Ws, ht, Wt, t_logits)
    loss = hs.new_empty((row_count(hs),) if reduction == 0 else (), dtype=acc)
    srcs = (hs, Ws, bs, ht, Wt, bt, t_logits)
    return [loss] + [torch.empty_like(x) if (x is not None and need[i] and reduction) else hs.new_empty(0)
                     for i, x in enumerate(srcs)]


def _setup_context(ctx, inputs, output):
    hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale = inputs[:9]
    (ctx.temperature, ctx.kind, ctx.beta, ctx.ignore_index, ctx.ce_weight, ctx.kd_weight, ctx.reduction, need,
     ctx.backend) = inputs[9:]
    ctx.need = tuple(need)
    ctx.set_materialize_grads(False)
    if ctx.reduction == 0:
        # per-row losses: the gradients depend on each row's grad_output, so backward recomputes
        ctx.save_for_backward(hs, Ws, bs, ht, Wt, bt, t_logits, labels)
    else:
        ctx.save_for_backward(*[g if ctx.need[i] else None for i, g in enumerate(output[1:])])


def _backward(ctx, grads):
    grad_loss = grads[0]
    none_tail = (None,) * 11
    if grad_loss is None:
        return (None,) * 7 + none_tail
    if ctx.reduction == 0:
        hs, Ws, bs, ht, Wt, bt, t_logits, labels = ctx.saved_tensors
        outs = launch(ctx.backend, hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_loss, temperature=ctx.temperature,
                      kind=ctx.kind, beta=ctx.beta, ignore_index=ctx.ignore_index, ce_weight=ctx.ce_weight,
                      kd_weight=ctx.kd_weight, need=ctx.need)
        return tuple(outs[1:]) + none_tail
    from kdkernels.ops.softmax_kl import _is_one

    one = _is_one(grad_loss)
    out = []
    for g in ctx.saved_tensors:
        out.append(None if g is None else (g if one else g * grad_loss.to(g.dtype)))
    return tuple(out) + none_tail


fused_linear_kl_op.register_autograd(_backward, setup_context=_setup_context)
