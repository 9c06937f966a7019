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

This module holds the public function, its checks, its op and the PyTorch implementation of the
tile loop (``backend="torch"``; any device);
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

from kdkernels._core import backends, checks, ext as _ext
from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.divergences import pair_grads, pair_sums, value
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.logit_options import IDENTITY, num_items, shared_vocab, transform, transform_grad, transforms
from kdkernels._core.numerics import (
    REDUCTION_IDS,
    acc_dtype,
    bad_labels,
    batch_size,
    grad_scale,
    kept_rows,
    p_times,
    safe_max,
)
from kdkernels._core.rows import row_count, rows3, take_rows
from kdkernels._core.sharded import any_dtensor, handler as sharded_handler
from kdkernels.softmax_divergence import kernel_divergence, validate as validate_logits

__all__ = ["fused_linear_kl", "fused_linear_distill", "validate_fused_linear", "tiled_forward", "accumulate",
           "finish", "V_TILE", "TILE_ELEMENTS"]

backends.register("fused_linear_kl", cpu=True, triton=True, cuda=False)

V_TILE = 2048  # vocabulary columns per tile
TILE_ELEMENTS = 1 << 19  # R * Vt per logits tile: 2 MiB of fp32 (a pass holds about ten such temporaries)


class _Tiles:
    """The logits tiles of one vocabulary slice for a block of rows. ``t_logits`` stays the
    caller's (strided) tensor: each tile gathers its [rows, columns] block from it, so that teacher
    logits are never copied whole."""

    def __init__(self, hs, Ws, bs, ht, Wt, bt, t_logits, keep, acc, s_tf=IDENTITY, t_tf=IDENTITY):
        self.hs, self.Ws, self.bs, self.ht, self.Wt, self.bt, self.tl = hs, Ws, bs, ht, Wt, bt, t_logits
        self.keep, self.acc, self.s_tf, self.t_tf = keep, acc, s_tf, t_tf

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
        return transform(zs, *self.s_tf), transform(zt, *self.t_tf)  # the models' logit transforms

    def chain(self, dzs: Optional[Tensor], zs: Tensor, dzt: Optional[Tensor], zt: Tensor):
        """dZ through the transforms of :meth:`logits` (``zs``, ``zt`` its transformed tiles)."""
        if dzs is not None and self.s_tf != IDENTITY:
            dzs = dzs * transform_grad(zs, *self.s_tf)
        if dzt is not None and self.t_tf != IDENTITY:
            dzt = dzt * transform_grad(zt, *self.t_tf)
        return dzs, dzt


def tiled_forward(hs: Tensor, Ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], Wt: Optional[Tensor],
                  bt: Optional[Tensor], t_logits: Optional[Tensor], labels: Optional[Tensor], grad_scale: Tensor, *,
                  temperature: float, kind: int, beta: float, ignore_index: int, ce_weight: float,
                  kd_weight: float, need: Tuple[bool, ...], v_tile: Optional[int] = None,
                  merge=None, s_tf=IDENTITY, t_tf=IDENTITY) -> List[Optional[Tensor]]:
    """Loss rows and the requested gradients, pre-multiplied by ``grad_scale`` (a scalar, or one
    value per row). ``hs [N, H]``, ``Ws [V, H]``, ``bs [V]``; teacher ``ht [N, Ht]``, ``Wt [V, Ht]``,
    ``bt [V]`` or ``t_logits [N, V]``; the row tensors ``hs``, ``ht``, ``t_logits`` may also be
    ``[B, L, D]`` rows with free leading strides (:mod:`kdkernels._core.rows`), read in place. ``need`` =
    which of (hs, Ws, bs, ht, Wt, bt, t_logits) get a gradient. Returns [loss_rows, d_hs, d_Ws,
    d_bs, d_ht, d_Wt, d_bt, d_tlogits] (None where not needed; those of the row tensors ``[N, D]``).

    ``merge``: for a vocabulary split across processes (kdkernels.distributed), an object whose
    ``stats(kind, ma, za, mb, zb, w)`` combines the per-row statistics of pass 1 over all slices
    and whose ``sums(K1, K2)`` adds the JSD sums; the gradients stay those of this slice.
    ``s_tf``, ``t_tf``: the logit transforms (:mod:`kdkernels._core.logit_options`) of each tile.
    """
    acc = acc_dtype(hs, Ws, ht, Wt, t_logits)
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

    keep, valid = kept_rows(labels, ignore_index, N, dev)  # ignored rows: dropped, or masked (no sync)
    n = keep.numel()
    if n == 0 or (V == 0 and merge is None):  # an empty slice still takes part in the merge
        return finish(outs, acc_grads, sources)
    hs_k, ht_k = take_rows(hs, keep), take_rows(ht, keep)
    lab_k = None if labels is None else labels.index_select(0, keep)
    g = grad_scale.to(acc).reshape(-1)
    g_k = g if g.numel() == 1 else g.index_select(0, keep)
    bad = bad_labels(lab_k, V) if ce_weight != 0.0 else None
    if bad is not None and valid is not None:
        bad = bad & valid
    if valid is not None:
        g_k = torch.where(valid, g_k.expand(n), torch.zeros((), dtype=acc, device=dev))
    if bad is not None:  # NaN rows, and NaN gradients wherever such a row reaches
        g_k = torch.where(bad, torch.full_like(bad, math.nan, dtype=acc), g_k.expand(n))
    tiles = _Tiles(hs_k, Ws, bs, ht_k, Wt, bt, t_logits, keep, acc, s_tf, t_tf)

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
            fa, fb = torch.exp(ma[rb] - safe_max(ma_n)), torch.exp(mb[rb] - safe_max(mb_n))
            ea, eb = torch.exp(a - safe_max(ma_n)[:, None]), torch.exp(b - safe_max(mb_n)[:, None])
            za[rb] = za[rb] * fa + ea.sum(1)
            zb[rb] = zb[rb] * fb + eb.sum(1)
            if kind == 0:
                w[rb] = w[rb] * fb + p_times(eb, b - a).sum(1)
            elif kind == 1:
                w[rb] = w[rb] * fa + p_times(ea, a - b).sum(1)
            ma[rb], mb[rb] = ma_n, mb_n
            if ce_sep:
                mc_n = torch.maximum(mc[rb], zs.max(1).values)
                zc[rb] = zc[rb] * torch.exp(mc[rb] - safe_max(mc_n)) + torch.exp(zs - safe_max(mc_n)[:, None]).sum(1)
                mc[rb] = mc_n
            if ce:
                lab = lab_k[rb]
                inside = (lab >= v0) & (lab < v1)
                idx = (lab - v0).clamp(0, v1 - v0 - 1)
                picked = zs.gather(1, idx[:, None]).squeeze(1)
                s_label[rb] = torch.where(inside, picked, s_label[rb])

    if merge is not None:
        ma, za, mb, zb, w = merge.stats(kind, ma, za, mb, zb, w)
    lse_a = safe_max(ma) + torch.log(za)
    lse_b = safe_max(mb) + torch.log(zb)
    lse_c = (safe_max(mc) + torch.log(zc)) if ce_sep else lse_a * temperature  # lse(z_s) at T = 1
    K1 = K2 = None
    if kind == 0:
        D = w / zb - lse_b + lse_a  # sum pt (b - a) - lse(b) + lse(a)
    elif kind == 1:
        D = w / za - lse_a + lse_b  # sum ps (a - b) - lse(a) + lse(b)
    else:
        # ---- the second pass of JSD, skew KL, TVD: K1, K2 (kdkernels._core.divergences)
        K1 = torch.zeros(n, dtype=acc, device=dev)
        K2 = torch.zeros(n, dtype=acc, device=dev)
        for v0, v1 in vt:
            wts = tiles.weights(v0, v1)
            for rb in blocks:
                zs, zt = tiles.logits(rb, v0, v1, wts)
                k1, k2 = pair_sums(zs * inv_t - lse_a[rb, None], zt * inv_t - lse_b[rb, None], kind, beta)
                K1[rb] += k1
                K2[rb] += k2
        if merge is not None:
            K1, K2 = merge.sums(K1, K2)
        D = value(K1, K2, kind, beta)
    rows = kd_weight * D
    if ce:
        rows = rows + ce_weight * (lse_c - s_label)  # CE = lse(z_s) - z_s[label]
        rows = torch.where(bad, torch.full_like(rows, math.nan), rows)
    if valid is not None:
        rows = torch.where(valid, rows, 0.0)
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
                    dt = p_times(pt, lpt - lps - D[rb, None]) if want_t else None  # pt (log pt/ps - D)
                elif kind == 1:
                    ds = p_times(ps, lps - lpt - D[rb, None])                # ps (log ps/pt - D)
                    dt = pt - ps if want_t else None                              # pt - ps
                else:  # kdkernels._core.divergences
                    ds, dt = pair_grads(lps, lpt, K1[rb], K2[rb], kind, beta)
                if want_s:
                    dzs = ds * gk
                    if ce:
                        gc = g_ce if g_ce.numel() == 1 else g_ce[rb]
                        pc = ps if not ce_sep else torch.exp(zs - lse_c[rb, None])
                        dzs = dzs + pc * col(gc)                                  # softmax(z_s)
                        lab = lab_k[rb]                                           # - onehot(label)
                        inside = (lab >= v0) & (lab < v1)
                        minus = torch.where(inside, -gc.reshape(-1).expand(dzs.shape[0]), 0.0)
                        dzs.scatter_add_(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None], minus[:, None])
                    dzs, _ = tiles.chain(dzs, zs, None, zt)
                    if valid is not None:  # masked rows: exactly zero, whatever their logits
                        dzs = torch.where(valid[rb, None], dzs, 0.0)
                    accumulate(acc_grads[0:3], dzs, keep[rb], tiles.hs[rb].to(acc), ws, v0, v1)
                if want_t:
                    _, dzt = tiles.chain(None, zs, dt * gk, zt)
                    if valid is not None:
                        dzt = torch.where(valid[rb, None], dzt, 0.0)
                    if tiles.ht is not None:
                        accumulate(acc_grads[3:6], dzt, keep[rb], tiles.ht[rb].to(acc), wt, v0, v1)
                    if acc_grads[6] is not None:
                        acc_grads[6][keep[rb], v0:v1] = dzt
    return finish(outs, acc_grads, sources)


def accumulate(grads, dz, rows, hidden, weight, v0, v1):
    """dh[rows] += dZ W[tile], dW[tile] += dZ^T h, db[tile] += sum_rows dZ (grads = [dh, dW, db], None where
    not wanted)."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        d_hidden.index_add_(0, rows, dz @ weight)
    if d_weight is not None:
        d_weight[v0:v1] += dz.t() @ hidden
    if d_bias is not None:
        d_bias[v0:v1] += dz.sum(0)


def finish(outs, acc_grads, sources):
    for i, (gacc, src) in enumerate(zip(acc_grads, sources)):
        if gacc is not None:
            outs[1 + i] = gacc.to(src.dtype)
    return outs


# ------------------------------------------------------------------------------ the op

NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias",
         "teacher_logits")


@without_autocast
def _kernel(backend, inputs, extras, scale, need, *, temperature, kind, beta, ignore_index, ce_weight, kd_weight,
            s_scale, s_cap, t_scale, t_cap):
    """One backend's kernels on ``[B, L, D]`` row tensors (hs, ht, t_logits): [rows, 7 gradients]."""
    hs, Ws, bs, ht, Wt, bt, t_logits = inputs
    (labels,) = extras
    if backend == "cpu":
        C = _ext.require("fused_linear_kl(backend='cpu')")
        return list(C.fused_linear_kl_forward_cpu(hs, Ws, bs, ht, Wt, bt, t_logits, labels, scale, temperature, kind,
                                                  beta, ignore_index, ce_weight, kd_weight, list(need), V_TILE,
                                                  TILE_ELEMENTS, s_scale, s_cap, t_scale, t_cap))
    kw = dict(temperature=temperature, kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
              kd_weight=kd_weight, need=need)
    if backend == "triton":
        from kdkernels.triton.fused_linear_kl import fused_linear_kl_forward

        return fused_linear_kl_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, scale, **kw, s_scale=s_scale,
                                       s_cap=s_cap, t_scale=t_scale, t_cap=t_cap)
    return tiled_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, scale, **kw, s_tf=(s_scale, s_cap),
                         t_tf=(t_scale, t_cap))


fused_linear_kl_op = FusedOp("kdkernels::fused_linear_kl", inputs=NAMES, extras=("labels",),
                             params=dict(temperature=float, kind=int, beta=float, ignore_index=int, ce_weight=float,
                                         kd_weight=float, s_scale=float, s_cap=float, t_scale=float, t_cap=float),
                             kernel=_kernel, none="recompute")


# ------------------------------------------------------------------------------ the public function

def check_student_linear(student_hidden, student_weight):
    """The student's ``[..., H]`` hidden states and ``[V, H]`` weight; returns (leading shape, V)."""
    checks.float_tensor("student_hidden", student_hidden)
    checks.float_tensor("student_weight", student_weight, 2)
    lead, H = student_hidden.shape[:-1], student_hidden.shape[-1]
    if student_weight.shape[1] != H:
        raise ValueError(f"student_weight must be [V, H] with H = {H} (student_hidden {tuple(student_hidden.shape)}), "
                         f"got {tuple(student_weight.shape)}")
    return lead, student_weight.shape[0]


def check_bias(name, bias, V):
    if bias is not None:
        checks.float_tensor(name, bias, 1)
        if bias.shape[0] != V:
            raise ValueError(f"{name} must be [V] = [{V}], got {tuple(bias.shape)}")


def validate_fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                          student_bias, teacher_bias, labels, temperature, divergence, beta, alpha, ignore_index,
                          reduction, backend, allow_empty_vocab=False, vocab_size=None, skew=0.1):
    """The checks of :func:`fused_linear_kl`; returns (temperature, beta, alpha) as floats.
    ``allow_empty_vocab``: V = 0 is legal (a rank's empty vocabulary slice). The teacher's
    vocabulary may differ from the student's when ``vocab_size`` says how many entries both share."""
    lead, V = check_student_linear(student_hidden, student_weight)
    if V == 0 and not allow_empty_vocab:
        raise ValueError("student_weight has an empty vocabulary: V = 0")
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give either teacher_logits or teacher_hidden and teacher_weight (and teacher_bias), "
                             "not both")
        checks.float_tensor("teacher_logits", teacher_logits)
        Vt = teacher_logits.shape[-1]
        if teacher_logits.shape[:-1] != lead or (vocab_size is None and Vt != V):
            raise ValueError(f"teacher_logits must be {(*lead, V)} (student_hidden's leading shape and V), got "
                             f"{tuple(teacher_logits.shape)}" + ("" if teacher_logits.shape[:-1] != lead else
                             f": with a vocabulary of another size, pass vocab_size=min(...) = {min(V, Vt)} to "
                             f"compare the leading entries both share"))
        what = "student_weight and teacher_logits"
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits")
        checks.float_tensor("teacher_hidden", teacher_hidden)
        checks.float_tensor("teacher_weight", teacher_weight, 2)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(lead)}, got "
                             f"{tuple(teacher_hidden.shape)}")
        Vt = teacher_weight.shape[0]
        if teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_weight must be [Vt, Ht] with Ht = {teacher_hidden.shape[-1]} (from "
                             f"teacher_hidden), got {tuple(teacher_weight.shape)}")
        if Vt != V and vocab_size is None:
            raise ValueError(f"teacher_weight must be [V, Ht] = {(V, teacher_hidden.shape[-1])} (V from "
                             f"student_weight, Ht from teacher_hidden), got {tuple(teacher_weight.shape)}: with "
                             f"padded vocabularies of different sizes ({V} and {Vt}), pass vocab_size=min(...) = "
                             f"{min(V, Vt)} to compare the leading entries both share")
        what = "student_weight and teacher_weight"
    Vs = V
    V = shared_vocab(what, V, Vt, vocab_size)
    check_bias("student_bias", student_bias, Vs)
    check_bias("teacher_bias", teacher_bias, Vt)
    checks.one_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      teacher_logits=teacher_logits)
    # labels, scalars, divergence, reduction: the checks of distill_loss on a [..., V] stand-in
    stand_in = student_hidden.new_zeros(()).expand(*lead, max(V, 1))  # the logits' shape, no memory
    return validate_logits(stand_in, stand_in, labels, temperature, divergence, beta, ignore_index, reduction, backend,
                           alpha=alpha, skew=skew)


def fused_linear_distill(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         teacher_logits, labels, *, temperature, divergence, beta, ignore_index, reduction, ce_weight,
                         kd_weight, backend="auto", vocab_size=None, num_items_in_batch=None,
                         tf=(IDENTITY, IDENTITY), skew=0.1):
    """The fused-linear op on validated inputs (:func:`validate_fused_linear`), with explicit CE and
    divergence weights (the compat losses weigh the two terms their own way); ``tf``: the checked
    logit transforms (:func:`kdkernels._core.logit_options.transforms`)."""
    backend = backends.resolve(backend, student_hidden.device, "fused_linear_kl")
    items = num_items(num_items_in_batch, reduction, student_hidden.device)
    if vocab_size is not None:
        # the shared leading rows (views; autograd pads their gradients with zeros), or the shared
        # leading columns of given teacher logits (a strided view, read in place)
        cut = lambda x: None if x is None else x[:vocab_size]  # noqa: E731
        student_weight, student_bias, teacher_weight, teacher_bias = map(
            cut, (student_weight, student_bias, teacher_weight, teacher_bias))
        teacher_logits = None if teacher_logits is None else teacher_logits[..., :vocab_size]
    # under autocast, the matmul operands in autocast's dtype (as F.linear gets them); products in fp32
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        student_hidden.device, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        teacher_bias)
    lead = student_hidden.shape[:-1]
    # [B, L, D] rows read through their strides: a causal-shift view of the hidden states (or of the
    # teacher's logits) is not copied
    hs = rows3(student_hidden)
    ht = None if teacher_hidden is None else rows3(teacher_hidden)
    tl = None if teacher_logits is None else rows3(teacher_logits)
    inputs = (hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, tl)
    N = hs.shape[0] * hs.shape[1]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    # in the accumulation dtype: a float32 1/N would cost float64 inputs 8 digits
    scale = grad_scale(N, lab, ignore_index, reduction, acc_dtype(*inputs), hs.device,
                       batch_size((*lead, student_weight.shape[0])), items)
    (s_scale, s_cap), (t_scale, t_cap) = tf
    kind, beta_k = kernel_divergence(divergence, beta, skew)
    params = dict(temperature=temperature, kind=kind, beta=beta_k, ignore_index=ignore_index,
                  ce_weight=ce_weight, kd_weight=kd_weight, s_scale=s_scale, s_cap=s_cap, t_scale=t_scale, t_cap=t_cap)
    loss = fused_linear_kl_op(inputs, (lab,), scale, params, REDUCTION_IDS[reduction], backend)
    return loss.reshape(lead) if reduction == "none" else loss


def fused_linear_kl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                    teacher_weight: Optional[Tensor] = None, *, teacher_logits: Optional[Tensor] = None,
                    student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                    temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5, alpha: float = 0.0,
                    labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                    backend: str = "auto", skew: float = 0.1, vocab_size: Optional[int] = None,
                    num_items_in_batch=None,
                    student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                    student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0) -> Tensor:
    r""":func:`kdkernels.distill_loss` on the logits ``student_hidden @ student_weight.T + student_bias``
    and ``teacher_hidden @ teacher_weight.T + teacher_bias`` (or the given ``teacher_logits``), without
    ever forming a ``[N, V]`` logits tensor:

    ``alpha * CE(student, labels) + (1 - alpha) * T**2 * D(teacher, student)``

    The vocabulary is processed in tiles: a first pass keeps per-row online statistics, a second
    recomputes each logits tile and accumulates the gradients of the hidden states, weights and
    biases (of the teacher too, when its tensors require grad). Matmuls accumulate in float32
    (float64 for float64 inputs); logits are never rounded to the input dtype. Rows labelled
    ``ignore_index`` cost nothing. Peak extra memory: the gradients, O(rows) statistics and a few
    logits tiles, independent of V.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[..., Ht]`` (the same leading shape); teacher_weight: ``[V, Ht]``;
            teacher_bias: ``[V]`` or None. Or instead ``teacher_logits``: ``[..., V]``.
        temperature, divergence, beta, skew, alpha, labels, ignore_index, reduction: as in
            :func:`kdkernels.distill_loss` (every divergence of :func:`kdkernels.softmax_kl`; JSD, the
            skew KL and TVD take one more pass over the tiles, for their two row sums).
        backend: ``"auto"`` (the C++ kernel on CPU tensors when the extension is built, the Triton
            kernels on CUDA tensors, else ``"torch"``), ``"cpu"``, ``"triton"`` (tensor-core ``tl.dot``
            tiles; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), or ``"torch"`` (the same
            tiles in PyTorch operations; any device).
        vocab_size: with padded vocabularies of different sizes (``student_weight`` ``[Vs, H]``,
            ``teacher_weight`` ``[Vt, Ht]`` or ``teacher_logits`` ``[..., Vt]``), the number of
            leading entries both share; the rows past it take no part and get a zero gradient.
        num_items_in_batch: as in :func:`kdkernels.softmax_kl`.
        student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale: the models'
            final-logit transforms (as in :func:`kdkernels.softmax_kl`), applied to each logits
            tile inside the kernels, so that a soft-capped model (Gemma 2/3) or a scaled one
            (Cohere) is distilled on its own objective and the logits still never exist. Given
            ``teacher_logits`` get ``teacher_softcap`` / ``teacher_logit_scale`` too.

    DTensor weights (tensor parallelism; FSDP2 parameters outside their module's forward): sharded
    on the vocabulary (``Shard(0)``) with the same rows on every rank, the vocab-parallel loss over
    the mesh's group; otherwise gathered for the call, their gradients returned with their own
    placement (:mod:`kdkernels.distributed.sharded`).
    """
    if any_dtensor(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias,
                   teacher_bias):  # sharded weights (kdkernels.distributed.sharded)
        return sharded_handler("fused_linear_kl")(fused_linear_kl, dict(locals()))
    temperature, beta, alpha = validate_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias, teacher_bias,
        labels, temperature, divergence, beta, alpha, ignore_index, reduction, backend, vocab_size=vocab_size,
        skew=skew)
    tf = transforms(student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    return fused_linear_distill(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, teacher_logits, labels, temperature=temperature, divergence=divergence,
                                beta=beta, ignore_index=ignore_index, reduction=reduction, ce_weight=alpha,
                                kd_weight=(1.0 - alpha) * temperature * temperature, backend=backend,
                                vocab_size=vocab_size, num_items_in_batch=num_items_in_batch, tf=tf, skew=skew)
