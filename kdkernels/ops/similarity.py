"""Contrastive and relational similarity losses, tiled: ``S = scale a bᵀ`` is computed one
``[R, C]`` tile at a time and never held whole (flash-attention style).

info_nce, kind softmax (CLIP / InfoNCE). Pair i: row i of ``a`` with row ``l_i`` of ``b``.
    pass 1  per tile: online (max, sum of exponentials) per row of S and per column of S.
            pos_i = scale a_i . b_{l_i} is a row-wise dot, O(N D).
    loss    row_i = lse_row_i - pos_i; symmetric: 0.5 (row_i + lse_col_{l_i} - pos_i).
    pass 2  per tile: dS = w_r P_row + c P_col, with P the row / column softmaxes, w_r the rows'
            weights (g, or g / 2 when symmetric) and c_j = sum over pairs with l_i = j of their
            column weight; da += scale dS b, db += scale dSᵀ a, d log(scale) += sum dS ∘ S.
            The positives' term -(w_r + w_c)_i at (i, l_i) is applied once, outside the tiles.
info_nce, kind sigmoid (SigLIP): one pass. S = scale a bᵀ + bias, z = +1 at (i, l_i) else -1,
    row_i = sum_j softplus(-z S_ij), dS = -z σ(-z S) g_i; d bias = sum dS, d log(scale) = sum dS ∘ (S - bias).
similarity_kd: S_s = a_s b_sᵀ / T_s (student), S_t = a_t b_tᵀ / T (teacher); self-similarity
    (b = a) drops the diagonal. Per row (and per column when symmetric) the online statistics of
    kdkernels.ops.fused_linear_kl give D(teacher || student) of each kind; JSD takes one more pass
    for Ks, Kt; the gradient pass forms dS_s per tile and adds dS_s b_s into d a_s and dS_sᵀ a_s into
    d b_s. The teacher is a constant.

Memory beyond the inputs and gradients: O(N) statistics and a few [R, C] tiles.

Backends: ``"torch"`` does the element-wise work of each tile in PyTorch operations (any device);
``"cpu"`` in the C++ sweeps of csrc/cpu/similarity.cpp (one pass over the tile per statistic instead
of a dozen operations). Both take the matmuls from ATen.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from kdkernels._backend import without_autocast

ROW_TILE = 1024
COL_TILE = 2048


def _safe(m: Tensor) -> Tensor:
    return torch.where(m == -math.inf, torch.zeros_like(m), m)


def _xlogy(p: Tensor, diff: Tensor) -> Tensor:
    return torch.where(p > 0, p * diff, torch.zeros_like(p))


def _tiles(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _acc(*xs) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


class _LSE:
    """Online log-sum-exp of the rows of a matrix seen in column tiles."""

    def __init__(self, n, acc, dev):
        self.m = torch.full((n,), -math.inf, dtype=acc, device=dev)
        self.z = torch.zeros(n, dtype=acc, device=dev)

    def update(self, sl, x):
        m_new = torch.maximum(self.m[sl], x.max(1).values)
        self.z[sl] = self.z[sl] * torch.exp(self.m[sl] - _safe(m_new)) + torch.exp(x - _safe(m_new)[:, None]).sum(1)
        self.m[sl] = m_new

    def update_cols(self, sl, x):
        self.update(sl, x.t())

    def lse(self):
        return _safe(self.m) + torch.log(self.z)


class _LSECpu(_LSE):
    """:class:`_LSE` with the sweeps of csrc/cpu/similarity.cpp (contiguous float / double tiles)."""

    def update(self, sl, x):
        _C().sim_rows_lse(x.contiguous(), self.m[sl], self.z[sl])

    def update_cols(self, sl, x):
        _C().sim_cols_lse(x, self.m[sl], self.z[sl])


class _Divergence:
    """Per-row D(teacher || student) of ``kind`` over logits seen in column tiles: pass 1 is
    :meth:`update`, then :meth:`finish`; JSD also needs :meth:`update_jsd` over every tile before
    :meth:`finish_jsd`; then :meth:`grad` gives dD/d(student logits) of a tile."""

    def __init__(self, n, kind, beta, acc, dev):
        self.kind, self.beta = kind, beta
        self.a, self.b = _LSE(n, acc, dev), _LSE(n, acc, dev)
        self.w = torch.zeros(n, dtype=acc, device=dev)
        self.K1 = torch.zeros(n, dtype=acc, device=dev)
        self.K2 = torch.zeros(n, dtype=acc, device=dev)

    def update(self, sl, a, b):
        ma, mb = self.a.m[sl], self.b.m[sl]
        ma_n = torch.maximum(ma, a.max(1).values)
        mb_n = torch.maximum(mb, b.max(1).values)
        if self.kind == 0:    # sum e^(b - mb) (b - a)
            f = torch.exp(mb - _safe(mb_n))
            self.w[sl] = self.w[sl] * f + _xlogy(torch.exp(b - _safe(mb_n)[:, None]), b - a).sum(1)
        elif self.kind == 1:  # sum e^(a - ma) (a - b)
            f = torch.exp(ma - _safe(ma_n))
            self.w[sl] = self.w[sl] * f + _xlogy(torch.exp(a - _safe(ma_n)[:, None]), a - b).sum(1)
        self.a.update(sl, a)
        self.b.update(sl, b)

    def finish(self):
        self.lse_a, self.lse_b = self.a.lse(), self.b.lse()
        if self.kind == 0:
            self.D = self.w / self.b.z - self.lse_b + self.lse_a
        elif self.kind == 1:
            self.D = self.w / self.a.z - self.lse_a + self.lse_b

    def _logs(self, sl, a, b):
        lps, lpt = a - self.lse_a[sl, None], b - self.lse_b[sl, None]
        return lps, lpt, lps.exp(), lpt.exp()

    def _log_m(self, lps, lpt):
        return torch.where(lps == lpt, lps, torch.logaddexp(lpt + math.log(self.beta), lps + math.log1p(-self.beta)))

    def update_jsd(self, sl, a, b):
        lps, lpt, ps, pt = self._logs(sl, a, b)
        lm = self._log_m(lps, lpt)
        self.K1[sl] += _xlogy(ps, lps - lm).sum(1)
        self.K2[sl] += _xlogy(pt, lpt - lm).sum(1)

    def finish_jsd(self):
        self.D = self.beta * self.K2 + (1.0 - self.beta) * self.K1

    def grad(self, sl, a, b, w):
        """w_r dD_r/da for the tile's rows."""
        lps, lpt, ps, pt = self._logs(sl, a, b)
        if self.kind == 0:
            d = ps - pt
        elif self.kind == 1:
            d = _xlogy(ps, lps - lpt - self.D[sl, None])
        else:
            d = (1.0 - self.beta) * _xlogy(ps, lps - self._log_m(lps, lpt) - self.K1[sl, None])
        return d * w[:, None]


class _DivergenceCpu(_Divergence):
    """:class:`_Divergence` with the sweeps of csrc/cpu/similarity.cpp."""

    def __init__(self, n, kind, beta, acc, dev):
        super().__init__(n, kind, beta, acc, dev)
        self.a, self.b = _LSECpu(n, acc, dev), _LSECpu(n, acc, dev)

    def update(self, sl, a, b):
        _C().sim_rows_div(a.contiguous(), b.contiguous(), self.a.m[sl], self.a.z[sl], self.b.m[sl], self.b.z[sl],
                          self.w[sl], self.kind)

    def update_jsd(self, sl, a, b):
        _C().sim_rows_jsd(a.contiguous(), b.contiguous(), self.lse_a[sl], self.lse_b[sl], self.K1[sl], self.K2[sl],
                          self.beta)

    def grad(self, sl, a, b, w):
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
        D = self.D if self.kind != 2 else self.K1  # unused by JSD; any [n] vector
        _C().sim_rows_grad(a.contiguous(), b.contiguous(), out, self.lse_a[sl], self.lse_b[sl], D[sl].contiguous(),
                           self.K1[sl], w.contiguous(), self.kind, self.beta)
        return out


def _C():
    from kdkernels import _ext

    return _ext.require("the similarity losses (backend='cpu')")


def _triton():
    from kdkernels.triton import similarity

    return similarity


def _softmax_dS(S, lse_r, w_r, lse_c, w_c, cpu):
    """dS = w_r exp(S - lse_r) (+ w_c exp(S - lse_c) per column), written over S; returns sum dS * S."""
    if cpu:
        return _C().sim_softmax_grad(S, lse_r, w_r, lse_c, w_c)
    dS = torch.exp(S - lse_r[:, None]) * w_r[:, None]
    if lse_c is not None:
        dS += torch.exp(S - lse_c[None, :]) * w_c[None, :]
    total = (dS * S).sum()
    S.copy_(dS)
    return total


def _leave_out_positives(S, ri: slice, ci: slice, labels: Tensor) -> None:
    """Set the positive entries (i, labels[i]) of the tile S[ri, ci] to a finite value so negative
    that as negatives they contribute exactly 0: softplus = 0, sigmoid = 0, dS (S - bias) = 0."""
    col = labels[ri] - ci.start
    inside = (col >= 0) & (col < S.shape[1])
    col = col.clamp(0, S.shape[1] - 1)
    r = torch.arange(S.shape[0], device=S.device)
    # no host sync: every row writes its (clamped) column, the rows whose positive is elsewhere keep theirs
    S[r, col] = torch.where(inside, torch.full_like(S[r, col], -torch.finfo(S.dtype).max / 4), S[r, col])


def _sigmoid_negatives(S, rows, g, bias, cpu):
    """Every entry of the tile a negative pair: rows += sum softplus(S); with g, S is overwritten with
    dS = g sigmoid(S); returns (sum dS, sum dS (S - bias))."""
    if cpu:
        return _C().sim_sigmoid(S, rows, g, bias)
    rows += torch.nn.functional.softplus(S).sum(1)
    if g is None:
        return 0.0, 0.0
    dS = torch.sigmoid(S) * g[:, None]
    out = dS.sum(), (dS * (S - bias)).sum()
    S.copy_(dS)
    return out


# ------------------------------------------------------------------------------ info_nce

@without_autocast
def info_nce_tiled(a: Tensor, b: Tensor, log_scale: Tensor, bias: Optional[Tensor], labels: Tensor,
                   grad_scale: Tensor, *, sigmoid: bool, symmetric: bool, need, backend: str = "torch",
                   row_tile=None, col_tile=None) -> List[Optional[Tensor]]:
    """[rows, d a, d b, d log_scale, d bias] (None where not needed). ``log_scale``: a 0-d tensor
    (the log of the multiplier); ``bias``: a 0-d tensor or None; ``labels``: int64 [N_a];
    ``grad_scale``: a scalar or one value per row; ``need`` = (a, b, log_scale, bias);
    ``backend``: "torch" (element-wise work in PyTorch operations) or "cpu" (C++ sweeps)."""
    cpu = backend == "cpu"
    acc = _acc(a, b)
    dev = a.device
    na, nb = a.shape[0], b.shape[0]
    A, B = a.to(acc).contiguous(), b.to(acc).contiguous()
    scale = log_scale.detach().to(acc).exp()
    scale_f = float(scale)
    bias_f = float(bias) if bias is not None else 0.0
    As = A * scale  # S = (scale a) bᵀ: the scale applied once, to [N_a, D]
    rt, ct = _tiles(na, row_tile or ROW_TILE), _tiles(nb, col_tile or COL_TILE)
    g = grad_scale.to(acc).reshape(-1).expand(na).contiguous()
    da = torch.zeros_like(A) if need[0] else None
    db = torch.zeros_like(B) if need[1] else None
    d_ls = torch.zeros((), dtype=acc, device=dev) if need[2] else None
    d_bias = torch.zeros((), dtype=acc, device=dev) if (need[3] and bias is not None) else None
    any_grad = any(x is not None for x in (da, db, d_ls, d_bias))

    def tile(ri, ci):
        S = As[ri] @ B[ci].t()
        return S.add_(bias_f) if bias is not None else S

    def matmul_grads(ri, ci, dS):
        # S = scale a bᵀ (+ bias): d a = scale dS b, d b = scale dSᵀ a
        if da is not None:
            da[ri].addmm_(dS, B[ci], alpha=scale_f)
        if db is not None:
            db[ci].addmm_(dS.t(), A[ri], alpha=scale_f)

    pos = (As * B[labels]).sum(1)  # S at the positive pairs, without the bias
    if sigmoid:
        # the negatives in the tiles, the positives (i, labels[i]) left out of them and added here
        # exactly: loss softplus(-S), dS = -g sigmoid(-S). (Taking them as negatives and correcting
        # by -S and -g cancels: a trained positive has S >> 0, softplus(S) ~ S and sigmoid(S) ~ 1.)
        if backend == "triton":
            rows, sum_d, sum_ds = _triton().sigmoid_tiles(a, b, labels, scale=scale_f, bias=bias_f,
                                                         g=g if any_grad else None, dx=da, dy=db)
            if d_bias is not None:
                d_bias.add_(sum_d)
            if d_ls is not None:
                d_ls.add_(sum_ds)
        else:
            rows = torch.zeros(na, dtype=acc, device=dev)
            for ri in rt:
                for ci in ct:
                    S = tile(ri, ci)
                    _leave_out_positives(S, ri, ci, labels)
                    sum_d, sum_ds = _sigmoid_negatives(S, rows[ri], g[ri] if any_grad else None, bias_f, cpu)
                    if any_grad:
                        if d_bias is not None:
                            d_bias.add_(sum_d)
                        if d_ls is not None:
                            d_ls.add_(sum_ds)
                        matmul_grads(ri, ci, S)
        sp = pos + bias_f
        rows += torch.nn.functional.softplus(-sp)
        wp = -g * torch.sigmoid(-sp)
    else:
        if backend == "triton":
            TS = _triton()
            cs = scale_f * TS.LOG2E
            lse_r = TS.pair_stats(a, b, cs=cs)["lse2_a"] * TS.LN2
            lse_c = TS.pair_stats(b, a, cs=cs)["lse2_a"] * TS.LN2 if symmetric else None
        else:
            row_lse = (_LSECpu if cpu else _LSE)(na, acc, dev)
            col_lse = (_LSECpu if cpu else _LSE)(nb, acc, dev)
            for ri in rt:
                for ci in ct:
                    S = tile(ri, ci)
                    row_lse.update(ri, S)
                    if symmetric:
                        col_lse.update_cols(ci, S)
            lse_r = row_lse.lse()
            lse_c = col_lse.lse() if symmetric else None
        rows = lse_r - pos
        if symmetric:
            rows = 0.5 * (rows + lse_c[labels] - pos)
        w = g * (0.5 if symmetric else 1.0)
        if any_grad and backend == "triton":
            c = torch.zeros(nb, dtype=acc, device=dev).index_add_(0, labels, w) if symmetric else None
            rv = TS.values({"lse2_a": lse_r * TS.LOG2E}, w * scale)
            cv = TS.values({"lse2_a": lse_c * TS.LOG2E}, c * scale) if symmetric else None
            total = TS.pair_grads(a, b, cs=cs, row_values=rv, col_values=cv, dx=da, dy=db)
            if d_ls is not None:
                d_ls.add_(total)
        elif any_grad:
            c = torch.zeros(nb, dtype=acc, device=dev).index_add_(0, labels, w) if symmetric else None
            for ri in rt:
                for ci in ct:
                    S = tile(ri, ci)
                    total = _softmax_dS(S, lse_r[ri], w[ri], lse_c[ci] if symmetric else None,
                                        c[ci] if symmetric else None, cpu)
                    if d_ls is not None:
                        d_ls.add_(total)
                    matmul_grads(ri, ci, S)
        wp = -(w * (2.0 if symmetric else 1.0))  # the positives: -(w_row + w_col) at (i, l_i)
    if any_grad:
        if da is not None:
            da += (wp * scale)[:, None] * B[labels]
        if db is not None:
            db.index_add_(0, labels, (wp * scale)[:, None] * A)
        if d_ls is not None:
            d_ls.add_((wp * pos).sum())
        if d_bias is not None:
            d_bias.add_(wp.sum())
    return [rows, da, db, d_ls, d_bias]


# ------------------------------------------------------------------------------ similarity_kd

@without_autocast
def similarity_kd_tiled(sa: Tensor, ta: Tensor, sb: Optional[Tensor], tb: Optional[Tensor], grad_scale: Tensor, *,
                        inv_ts: float, inv_t: float, kind: int, beta: float, symmetric: bool, need,
                        backend: str = "torch", mask_offset: Optional[int] = None,
                        row_tile=None, col_tile=None) -> List[Optional[Tensor]]:
    """[rows, d sa, d sb, d inv_ts]: per-row D(teacher || student) of the
    similarity rows (averaged with the columns' when ``symmetric`` and b is given); ``sb``/``tb``
    None means self-similarity without the diagonal. ``need`` = (sa, sb, inv_ts). Embeddings are
    used as given (normalize before). d inv_ts = sum dL/dS_s ∘ (a_s b_sᵀ) = sum_i a_i . (d a)_i /
    inv_ts (halved for self-similarity, where d a holds both the row and the column terms).
    ``mask_offset`` (b given): the entries (i, i + mask_offset) are left out, as the diagonal of a
    self-similarity is: rows of a rank's slice against the gathered batch (kdkernels.distributed)."""
    cpu = backend == "cpu"
    Div = _DivergenceCpu if cpu else _Divergence
    acc = _acc(sa, sb)
    dev = sa.device
    self_sim = sb is None
    SA, TA = sa.to(acc).contiguous(), ta.to(acc).contiguous()
    SB, TB = (SA, TA) if self_sim else (sb.to(acc).contiguous(), tb.to(acc).contiguous())
    SAs, TAs = SA * inv_ts, TA * inv_t  # the temperatures applied once, to [N, D]
    na, nb = SA.shape[0], SB.shape[0]
    both = symmetric and not self_sim
    rt, ct = _tiles(na, row_tile or ROW_TILE), _tiles(nb, col_tile or COL_TILE)
    g = grad_scale.to(acc).reshape(-1).expand(na).contiguous()
    want_t = len(need) > 2 and need[2]
    dsa = torch.zeros_like(SA) if need[0] or want_t else None
    dsb = torch.zeros_like(SB) if (need[1] and not self_sim) else None

    off = 0 if self_sim else mask_offset

    def tile(ri, ci):
        s, t = SAs[ri] @ SB[ci].t(), TAs[ri] @ TB[ci].t()
        if off is not None and ri.start + off < ci.stop and ci.start < ri.stop + off:  # (i, i + off) in this tile
            r = torch.arange(max(ri.start, ci.start - off), min(ri.stop, ci.stop - off), device=dev)
            s[r - ri.start, r + off - ci.start] = -math.inf
            t[r - ri.start, r + off - ci.start] = -math.inf
        return s, t

    if backend == "triton":
        TS = _triton()
        x, y = sa, (sa if self_sim else sb)
        tx, ty = ta, (ta if self_sim else tb)
        kw = dict(cs=inv_ts * TS.LOG2E, ct=inv_t * TS.LOG2E, mode=TS.MODE_KD, kind=kind, beta=beta)
        st_r = TS.pair_stats(x, y, tx, ty, mask_off=off, **kw)
        st_c = TS.pair_stats(y, x, ty, tx, mask_off=None if off is None else -off, **kw) if both else None
        if self_sim and na < 2:
            st_r["D"] = torch.zeros(na, dtype=acc, device=dev)
        rows = 0.5 * (st_r["D"] + st_c["D"]) if both else st_r["D"]
        if (dsa is not None or dsb is not None) and not (self_sim and na < 2):
            w = g * (0.5 if both else 1.0) * inv_ts
            TS.pair_grads(x, y, tx, ty, mask_off=off, row_values=TS.values(st_r, w),
                          col_values=TS.values(st_c, w) if both else None, dx=dsa,
                          dy=dsa if self_sim else dsb, **kw)
        d_inv = (SA * dsa).sum() / inv_ts * (0.5 if self_sim else 1.0) if want_t else None
        return [rows, dsa if need[0] else None, dsb, d_inv]
    rows_d = Div(na, kind, beta, acc, dev)
    cols_d = Div(nb, kind, beta, acc, dev) if both else None
    for phase in range(2 if kind == 2 else 1):
        for ri in rt:
            for ci in ct:
                s, t = tile(ri, ci)
                for d, sl, x, y in ((rows_d, ri, s, t),) + (((cols_d, ci, s.t(), t.t()),) if both else ()):
                    (d.update if phase == 0 else d.update_jsd)(sl, x, y)
        for d in (rows_d, cols_d):
            if d is not None:
                d.finish() if phase == 0 else d.finish_jsd()
    if self_sim and na < 2:
        rows_d.D = torch.zeros(na, dtype=acc, device=dev)
    rows = 0.5 * (rows_d.D + cols_d.D) if both else rows_d.D
    if (dsa is not None or dsb is not None) and not (self_sim and na < 2):
        w = (g * (0.5 if both else 1.0) * inv_ts).contiguous()
        for ri in rt:
            for ci in ct:
                s, t = tile(ri, ci)
                dS = rows_d.grad(ri, s, t, w[ri])
                if both:
                    dS += cols_d.grad(ci, s.t(), t.t(), w[ci]).t()
                if dsa is not None:
                    dsa[ri].addmm_(dS, SB[ci])
                    if self_sim:
                        dsa[ci].addmm_(dS.t(), SA[ri])
                if dsb is not None:
                    dsb[ci].addmm_(dS.t(), SA[ri])
    d_inv = None
    if want_t:
        d_inv = (SA * dsa).sum() / inv_ts * (0.5 if self_sim else 1.0)
    return [rows, dsa if need[0] else None, dsb, d_inv]



# ------------------------------------------------------------------------------ CLIP + distillation

class _Xent:
    """Online statistics, per row, of a student tile S and a teacher tile T seen in column tiles:
    (m_s, z_s), (m_t, z_t) and u = Σ e^(T - m_t) S, for the soft cross-entropy
    -Σ softmax(T) log softmax(S) = lse(S) - u / z_t."""

    def __init__(self, n, acc, dev):
        self.ms, self.mt = (torch.full((n,), -math.inf, dtype=acc, device=dev) for _ in range(2))
        self.zs, self.zt, self.u = (torch.zeros(n, dtype=acc, device=dev) for _ in range(3))

    def update(self, sl, s, t, cols, cpu):
        if cpu:
            _C().sim_xent_stats(s, t, self.ms[sl], self.zs[sl], self.mt[sl], self.zt[sl], self.u[sl], cols)
            return
        if cols:
            s, t = s.t(), t.t()
        ms = torch.maximum(self.ms[sl], s.max(1).values)
        mt = torch.maximum(self.mt[sl], t.max(1).values)
        ft = torch.exp(self.mt[sl] - _safe(mt))
        e = torch.exp(t - _safe(mt)[:, None])
        self.zs[sl] = self.zs[sl] * torch.exp(self.ms[sl] - _safe(ms)) + torch.exp(s - _safe(ms)[:, None]).sum(1)
        self.zt[sl] = self.zt[sl] * ft + e.sum(1)
        self.u[sl] = self.u[sl] * ft + (e * s).sum(1)
        self.ms[sl], self.mt[sl] = ms, mt

    def finish(self):
        """(lse_s, lse_t, soft cross-entropy) per row."""
        lse_s, lse_t = _safe(self.ms) + torch.log(self.zs), _safe(self.mt) + torch.log(self.zt)
        return lse_s, lse_t, lse_s - self.u / self.zt


def _xent_dS(S, T, row, col, cpu):
    """dS = a_r softmax_r(S) - b_r softmax_r(T) + a_c softmax_c(S) - b_c softmax_c(T), written over S;
    ``row`` / ``col`` = (lse_s, a, lse_t, b) of the tile's rows / columns. Returns Σ dS ∘ S."""
    if cpu:
        return _C().sim_xent_grad(S, T, *row, *col)
    (lsr, ar, ltr, br), (lsc, ac, ltc, bc) = row, col
    dS = ar[:, None] * torch.exp(S - lsr[:, None]) - br[:, None] * torch.exp(T - ltr[:, None])
    dS += ac[None, :] * torch.exp(S - lsc[None, :]) - bc[None, :] * torch.exp(T - ltc[None, :])
    total = (dS * S).sum()
    S.copy_(dS)
    return total


def _clip_distill_setup(a, b, ta, tb, log_scale, t_scale, backend):
    """(acc, A, B, scale · A, TA, TB, scale): accumulation-dtype copies; the teacher's (with t_scale
    applied) only for the ATen tile loops (the Triton kernels read the inputs as given)."""
    acc = _acc(a, b, ta, tb)
    A, B = a.to(acc).contiguous(), b.to(acc).contiguous()
    scale = log_scale.detach().to(acc).exp()
    if backend == "triton":
        return acc, A, B, A * scale, None, None, scale
    TA, TB = (ta.to(acc) * float(t_scale)).contiguous(), tb.to(acc).contiguous()
    return acc, A, B, A * scale, TA, TB, scale


@without_autocast
def clip_distill_forward(a: Tensor, b: Tensor, ta: Tensor, tb: Tensor, log_scale: Tensor, t_scale: float, *,
                         backend: str = "torch", row_tile=None, col_tile=None):
    """open_clip's ``DistillClipLoss`` over one pass of tiles: with ``S = exp(log_scale) a bᵀ``
    (pairs i ↔ i) and the teacher's ``T = t_scale ta tbᵀ``, returns (contrastive rows, distillation
    rows, statistics): ``contrastive_i = (lse_row(S)_i + lse_col(S)_i) / 2 - S_ii`` (CLIP's two
    cross-entropies) and ``distill_i = (xent_row_i + xent_col_i) / 2`` with ``xent`` the soft
    cross-entropy of a row (column) of S against the same row (column) of T. Both share the
    student's tile and its log-sum-exps. ``statistics`` feed :func:`clip_distill_backward`."""
    cpu = backend == "cpu"
    acc, A, B, As, TA, TB, scale = _clip_distill_setup(a, b, ta, tb, log_scale, t_scale, backend)
    n, dev = A.shape[0], A.device
    pos = (As * B).sum(1)
    if backend == "triton":
        TS = _triton()
        kw = dict(cs=float(scale) * TS.LOG2E, ct=float(t_scale) * TS.LOG2E, mode=TS.MODE_XENT)
        st_r, st_c = TS.pair_stats(a, b, ta, tb, **kw), TS.pair_stats(b, a, tb, ta, **kw)
        lsr, lsc = st_r["lse2_a"] * TS.LN2, st_c["lse2_a"] * TS.LN2
        stats = (lsr, st_r["lse2_b"] * TS.LN2, lsc, st_c["lse2_b"] * TS.LN2)
        return 0.5 * (lsr + lsc) - pos, 0.5 * (st_r["xent"] + st_c["xent"]), stats
    rows, cols = _Xent(n, acc, dev), _Xent(n, acc, dev)
    for ri in _tiles(n, row_tile or ROW_TILE):
        for ci in _tiles(n, col_tile or COL_TILE):
            S, T = As[ri] @ B[ci].t(), TA[ri] @ TB[ci].t()
            rows.update(ri, S, T, False, cpu)
            cols.update(ci, S, T, True, cpu)
    lsr, ltr, xr = rows.finish()
    lsc, ltc, xc = cols.finish()
    return 0.5 * (lsr + lsc) - pos, 0.5 * (xr + xc), (lsr, ltr, lsc, ltc)


@without_autocast
def clip_distill_backward(a, b, ta, tb, log_scale, t_scale, stats, w_c: float, w_d: float, need, *,
                          backend: str = "torch", row_tile=None, col_tile=None):
    """(d a, d b, d log_scale) of ``w_c Σ contrastive_i + w_d Σ distill_i`` (None where ``need`` is
    False), recomputing the tiles of :func:`clip_distill_forward` with its ``statistics``:
    ``dS = (w_c + w_d)/2 (P_row + P_col)(S) - w_d/2 (P_row + P_col)(T)`` minus ``w_c`` at the pairs."""
    cpu = backend == "cpu"
    acc, A, B, As, TA, TB, scale = _clip_distill_setup(a, b, ta, tb, log_scale, t_scale, backend)
    n, dev = A.shape[0], A.device
    sf = float(scale)
    da = torch.zeros_like(A) if need[0] else None
    db = torch.zeros_like(B) if need[1] else None
    d_ls = torch.zeros((), dtype=acc, device=dev)
    lsr, ltr, lsc, ltc = stats
    ws = torch.full((n,), 0.5 * (w_c + w_d), dtype=acc, device=dev)
    wt = torch.full((n,), 0.5 * w_d, dtype=acc, device=dev)
    if backend == "triton":
        TS = _triton()
        to2 = lambda ls, lt: {"lse2_a": ls * TS.LOG2E, "lse2_b": lt * TS.LOG2E}  # noqa: E731
        d_ls += TS.pair_grads(a, b, ta, tb, cs=sf * TS.LOG2E, ct=float(t_scale) * TS.LOG2E, mode=TS.MODE_XENT,
                              row_values=TS.values(to2(lsr, ltr), ws * sf, wt * sf),
                              col_values=TS.values(to2(lsc, ltc), ws * sf, wt * sf), dx=da, dy=db)
    else:
        for ri in _tiles(n, row_tile or ROW_TILE):
            for ci in _tiles(n, col_tile or COL_TILE):
                S, T = As[ri] @ B[ci].t(), TA[ri] @ TB[ci].t()
                d_ls += _xent_dS(S, T, (lsr[ri], ws[ri], ltr[ri], wt[ri]), (lsc[ci], ws[ci], ltc[ci], wt[ci]), cpu)
                if da is not None:
                    da[ri].addmm_(S, B[ci], alpha=sf)
                if db is not None:
                    db[ci].addmm_(S.t(), A[ri], alpha=sf)
    # the pairs: -w_c at (i, i)
    if da is not None:
        da.add_(B, alpha=-w_c * sf)
    if db is not None:
        db.add_(A, alpha=-w_c * sf)
    d_ls -= w_c * (As * B).sum()
    return da, db, (d_ls if need[2] else None)
