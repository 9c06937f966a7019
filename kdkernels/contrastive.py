"""Contrastive losses, tiled: ``S = scale a bᵀ`` is computed one ``[R, C]`` tile at a time and
never held whole (flash-attention style).

info_nce, variant softmax (CLIP / InfoNCE). Pair i: row i of ``a`` with row ``l_i`` of ``b``.
    pass 1  per tile: online (max, sum of exponentials) per row of S and per column of S.
            pos_i = scale a_i . b_{l_i} is a row-wise dot, O(N D).
    loss    row_i = lse_row_i - pos_i; symmetric: 0.5 (row_i + lse_col_{l_i} - pos_i).
    pass 2  per tile: dS = w_r P_row + c P_col, with P the row / column softmaxes, w_r the rows'
            weights (g, or g / 2 when symmetric) and c_j = sum over pairs with l_i = j of their
            column weight; da += scale dS b, db += scale dSᵀ a, d log(scale) += sum dS ∘ S.
            The positives' term -(w_r + w_c)_i at (i, l_i) is applied once, outside the tiles.
info_nce, variant sigmoid (SigLIP): one pass. S = scale a bᵀ + bias, z = +1 at (i, l_i) else -1,
    row_i = sum_j softplus(-z S_ij), dS = -z σ(-z S) g_i; d bias = sum dS, d log(scale) = sum dS ∘ (S - bias).
clip_distill (open_clip's DistillClipLoss): CLIP's contrastive loss and the soft cross-entropy of
    the student's S against the teacher's T, rows and columns, from one pass over shared tiles.

Memory beyond the inputs and gradients: O(N) statistics and a few [R, C] tiles.

Backends: ``"torch"`` does the element-wise work of each tile in PyTorch operations (any device);
``"cpu"`` in the C++ sweeps of csrc/cpu/similarity.cpp (one pass over the tile per statistic instead
of a dozen operations); both take the matmuls from ATen. ``"triton"``: kdkernels/triton/similarity.py
(tensor-core tiles, the gradients in the same kernel).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from kdkernels._core import backends, checks, numerics
from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.fused_op import FusedOp, FusedStatsOp
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, safe_max, tiles
from kdkernels._core.online import OnlineLSE, OnlineLSECpu, sweeps

__all__ = ["info_nce", "clip_distill", "info_nce_tiled", "VARIANTS", "ROW_TILE", "COL_TILE"]

VARIANTS = ("softmax", "sigmoid")
ROW_TILE = 1024
COL_TILE = 2048

backends.register("info_nce", cpu=True, triton=True, cuda=False)
backends.register("clip_distill", cpu=True, triton=True, cuda=False)


def check_embeddings(name: str, x, D: Optional[int] = None) -> None:
    """``[N, D]`` float embeddings (of ``D`` features when given)."""
    checks.float_tensor(name, x, 2)
    if D is not None and x.shape[1] != D:
        raise ValueError(f"{name} must be [N, {D}], got {tuple(x.shape)}")


def _triton():
    from kdkernels.triton import similarity

    return similarity


def _softmax_dS(S, lse_r, w_r, lse_c, w_c, cpu):
    """dS = w_r exp(S - lse_r) (+ w_c exp(S - lse_c) per column), written over S; returns sum dS * S."""
    if cpu:
        return sweeps().sim_softmax_grad(S, lse_r, w_r, lse_c, w_c)
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
        return sweeps().sim_sigmoid(S, rows, g, bias)
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
    acc = acc_dtype(a, b)
    dev = a.device
    na, nb = a.shape[0], b.shape[0]
    A, B = a.to(acc).contiguous(), b.to(acc).contiguous()
    scale = log_scale.detach().to(acc).exp()
    # Python numbers where reading them is free (CPU tensors); 0-d tensors elsewhere, which the
    # Triton kernels load on the device (no host sync)
    host = numerics.host_reads_free(dev)
    scale_f = float(scale) if host else scale
    bias_f = (float(bias) if host else bias.detach().to(acc)) if bias is not None else 0.0
    rt, ct = tiles(na, row_tile or ROW_TILE), tiles(nb, col_tile or COL_TILE)
    g = grad_scale.to(acc).reshape(-1).expand(na).contiguous()
    da = torch.zeros_like(A) if need[0] else None
    db = torch.zeros_like(B) if need[1] else None
    d_ls = torch.zeros((), dtype=acc, device=dev) if need[2] else None
    d_bias = torch.zeros((), dtype=acc, device=dev) if (need[3] and bias is not None) else None
    any_grad = any(x is not None for x in (da, db, d_ls, d_bias))

    def tile(ri, ci):
        S = (A[ri] @ B[ci].t()).mul_(scale_f)  # S = scale a bᵀ, scaled per tile (no scaled copy of a)
        return S.add_(bias_f) if bias is not None else S

    def matmul_grads(ri, ci, dS):
        # S = scale a bᵀ (+ bias): d a = scale dS b, d b = scale dSᵀ a
        if isinstance(scale_f, Tensor):
            dS = dS * scale_f
        alpha = scale_f if not isinstance(scale_f, Tensor) else 1.0
        if da is not None:
            da[ri].addmm_(dS, B[ci], alpha=alpha)
        if db is not None:
            db[ci].addmm_(dS.t(), A[ri], alpha=alpha)

    pos = _positives(A, B, labels, rt) * scale  # S at the positive pairs, without the bias
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
            row_lse = (OnlineLSECpu if cpu else OnlineLSE)(na, acc, dev)
            col_lse = (OnlineLSECpu if cpu else OnlineLSE)(nb, acc, dev)
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
        ws = wp * scale
        for ri in rt:  # a tile of rows at a time: no [N, D] temporaries
            if da is not None:
                da[ri].addcmul_(ws[ri, None], B[labels[ri]])
            if db is not None:
                db.index_add_(0, labels[ri], ws[ri, None] * A[ri])
        if d_ls is not None:
            d_ls.add_((wp * pos).sum())
        if d_bias is not None:
            d_bias.add_(wp.sum())
    return [rows, da, db, d_ls, d_bias]


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
            sweeps().sim_xent_stats(s, t, self.ms[sl], self.zs[sl], self.mt[sl], self.zt[sl], self.u[sl], cols)
            return
        if cols:
            s, t = s.t(), t.t()
        ms = torch.maximum(self.ms[sl], s.max(1).values)
        mt = torch.maximum(self.mt[sl], t.max(1).values)
        ft = torch.exp(self.mt[sl] - safe_max(mt))
        e = torch.exp(t - safe_max(mt)[:, None])
        self.zs[sl] = self.zs[sl] * torch.exp(self.ms[sl] - safe_max(ms)) + torch.exp(s - safe_max(ms)[:, None]).sum(1)
        self.zt[sl] = self.zt[sl] * ft + e.sum(1)
        self.u[sl] = self.u[sl] * ft + (e * s).sum(1)
        self.ms[sl], self.mt[sl] = ms, mt

    def finish(self):
        """(lse_s, lse_t, soft cross-entropy) per row."""
        lse_s, lse_t = safe_max(self.ms) + torch.log(self.zs), safe_max(self.mt) + torch.log(self.zt)
        return lse_s, lse_t, lse_s - self.u / self.zt


def _xent_dS(S, T, row, col, cpu):
    """dS = a_r softmax_r(S) - b_r softmax_r(T) + a_c softmax_c(S) - b_c softmax_c(T), written over S;
    ``row`` / ``col`` = (lse_s, a, lse_t, b) of the tile's rows / columns. Returns Σ dS ∘ S."""
    if cpu:
        return sweeps().sim_xent_grad(S, T, *row, *col)
    (lsr, ar, ltr, br), (lsc, ac, ltc, bc) = row, col
    dS = ar[:, None] * torch.exp(S - lsr[:, None]) - br[:, None] * torch.exp(T - ltr[:, None])
    dS += ac[None, :] * torch.exp(S - lsc[None, :]) - bc[None, :] * torch.exp(T - ltc[None, :])
    total = (dS * S).sum()
    S.copy_(dS)
    return total


def _clip_distill_setup(a, b, ta, tb, log_scale, backend):
    """(acc, A, B, TA, TB, scale): the inputs in the accumulation dtype (views for float32 inputs;
    the teacher's only for the ATen tile loops, the Triton kernels read the inputs as given). The
    scales are applied per tile (:func:`_clip_tiles`), never to a copy of the embeddings."""
    acc = acc_dtype(a, b, ta, tb)
    A, B = a.to(acc).contiguous(), b.to(acc).contiguous()
    scale = log_scale.detach().to(acc).exp()
    if backend == "triton":
        return acc, A, B, None, None, scale
    return acc, A, B, ta.to(acc).contiguous(), tb.to(acc).contiguous(), scale


def _clip_tiles(A, B, TA, TB, ri, ci, scale, t_scale):
    """The tiles S = scale A Bᵀ and T = t_scale TA TBᵀ of rows ``ri`` and columns ``ci``."""
    return (A[ri] @ B[ci].t()).mul_(scale), (TA[ri] @ TB[ci].t()).mul_(t_scale)


def _positives(A: Tensor, B: Tensor, labels: Optional[Tensor], rt) -> Tensor:
    """The row-wise dots A_i . B_{l_i} (l_i = i without labels), a tile of rows at a time."""
    if not A.shape[0]:
        return A.new_zeros(0)
    return torch.cat([(A[ri] * (B[ri] if labels is None else B[labels[ri]])).sum(1) for ri in rt])


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
    acc, A, B, TA, TB, scale = _clip_distill_setup(a, b, ta, tb, log_scale, backend)
    n, dev = A.shape[0], A.device
    pos = _positives(A, B, None, tiles(n, row_tile or ROW_TILE)) * scale
    if backend == "triton":
        TS = _triton()
        # the scale a 0-d tensor the kernels load (no host read); t_scale a Python constant
        kw = dict(cs=scale * TS.LOG2E, ct=float(t_scale) * TS.LOG2E, mode=TS.MODE_XENT)
        st_r, st_c = TS.pair_stats(a, b, ta, tb, **kw), TS.pair_stats(b, a, tb, ta, **kw)
        lsr, lsc = st_r["lse2_a"] * TS.LN2, st_c["lse2_a"] * TS.LN2
        stats = (lsr, st_r["lse2_b"] * TS.LN2, lsc, st_c["lse2_b"] * TS.LN2)
        return 0.5 * (lsr + lsc) - pos, 0.5 * (st_r["xent"] + st_c["xent"]), stats
    rows, cols = _Xent(n, acc, dev), _Xent(n, acc, dev)
    for ri in tiles(n, row_tile or ROW_TILE):
        for ci in tiles(n, col_tile or COL_TILE):
            S, T = _clip_tiles(A, B, TA, TB, ri, ci, scale, t_scale)
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
    acc, A, B, TA, TB, scale = _clip_distill_setup(a, b, ta, tb, log_scale, backend)
    n, dev = A.shape[0], A.device
    rt = tiles(n, row_tile or ROW_TILE)
    host = numerics.host_reads_free(dev)  # as in info_nce_tiled
    sf = float(scale) if host else scale
    da = torch.zeros_like(A) if need[0] else None
    db = torch.zeros_like(B) if need[1] else None
    d_ls = torch.zeros((), dtype=acc, device=dev)
    lsr, ltr, lsc, ltc = stats
    w_c, w_d = (torch.as_tensor(w, dtype=acc, device=dev) for w in (w_c, w_d))  # 0-d: no host read
    ws = (0.5 * (w_c + w_d)).expand(n).contiguous()
    wt = (0.5 * w_d).expand(n).contiguous()
    if backend == "triton":
        TS = _triton()
        to2 = lambda ls, lt: {"lse2_a": ls * TS.LOG2E, "lse2_b": lt * TS.LOG2E}  # noqa: E731
        d_ls += TS.pair_grads(a, b, ta, tb, cs=sf * TS.LOG2E, ct=float(t_scale) * TS.LOG2E, mode=TS.MODE_XENT,
                              row_values=TS.values(to2(lsr, ltr), ws * sf, wt * sf),
                              col_values=TS.values(to2(lsc, ltc), ws * sf, wt * sf), dx=da, dy=db)
    else:
        for ri in rt:
            for ci in tiles(n, col_tile or COL_TILE):
                S, T = _clip_tiles(A, B, TA, TB, ri, ci, scale, t_scale)
                d_ls += _xent_dS(S, T, (lsr[ri], ws[ri], ltr[ri], wt[ri]), (lsc[ci], ws[ci], ltc[ci], wt[ci]), cpu)
                if isinstance(sf, Tensor):
                    S.mul_(sf)
                alpha = 1.0 if isinstance(sf, Tensor) else sf
                if da is not None:
                    da[ri].addmm_(S, B[ci], alpha=alpha)
                if db is not None:
                    db[ci].addmm_(S.t(), A[ri], alpha=alpha)
    # the pairs: -w_c at (i, i)
    minus = -(w_c * sf)
    if da is not None:
        da.addcmul_(B, minus)
    if db is not None:
        db.addcmul_(A, minus)
    d_ls -= w_c * scale * _positives(A, B, None, rt).sum()
    return da, db, (d_ls if need[2] else None)


# ------------------------------------------------------------------------------ the info_nce op

def _info_nce_kernel(backend, inputs, extras, scale, need, *, sigmoid, symmetric):
    a, b, log_scale, bias = inputs
    (labels,) = extras
    return info_nce_tiled(a, b, log_scale, bias, labels, scale, sigmoid=sigmoid, symmetric=symmetric, need=need,
                          backend=backend)


info_nce_op = FusedOp("kdkernels::info_nce", inputs=("a", "b", "log_scale", "bias"), extras=("labels",),
                      params=dict(sigmoid=bool, symmetric=bool), kernel=_info_nce_kernel, none="recompute")


def info_nce(a: Tensor, b: Tensor, *, temperature: Optional[float] = None, logit_scale: Optional[Tensor] = None,
             logit_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None, symmetric: bool = True,
             variant: str = "softmax", reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Contrastive loss on ``S = scale · a bᵀ`` without forming ``S``.

    ``variant="softmax"`` (InfoNCE / CLIP): row i of ``a`` matches row ``labels[i]`` of ``b`` (default
    i); its loss is the cross-entropy of row i of S with target ``labels[i]``; with ``symmetric``
    it is averaged with the cross-entropy of column ``labels[i]`` with target i (CLIP's two
    directions). ``variant="sigmoid"`` (SigLIP): ``Σ_j −log σ(z_ij (S_ij + logit_bias))`` with
    ``z = +1`` for the matching pair and ``−1`` otherwise (``symmetric`` does not apply).

    Args:
        a: ``[N_a, D]``; b: ``[N_b, D]`` (``N_b ≥ N_a`` without labels). Any float dtype; the
            products accumulate in float32 (float64 for float64 inputs).
        temperature: ``scale = 1 / temperature``; or ``logit_scale``: a 0-d tensor holding
            ``log(scale)`` (as CLIP stores it), which gets a gradient when it requires one.
        logit_bias: a 0-d tensor (``variant="sigmoid"`` only), with gradient.
        labels: int ``[N_a]`` in ``[0, N_b)``, or None.
        reduction: ``"mean"`` over rows of ``a``, ``"sum"``, or ``"none"`` (``[N_a]``).
        backend: ``"auto"`` (``"triton"`` for CUDA tensors, ``"cpu"`` for CPU tensors when the
            extension is built, else ``"torch"``), ``"triton"`` (tensor-core tiles, the gradients
            in the same kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpu"`` (ATen
            matmuls per tile, the element-wise work in C++ sweeps) or ``"torch"`` (the same tiles
            in PyTorch operations, any device).

    Memory beyond the inputs and their gradients: O(N) statistics and fixed-size tiles of S.
    """
    check_embeddings("a", a)
    check_embeddings("b", b, a.shape[1])
    checks.choice("variant", variant, VARIANTS)
    if (temperature is None) == (logit_scale is None):
        raise ValueError("give exactly one of temperature (scale = 1 / temperature) and logit_scale "
                         "(a 0-d tensor holding log(scale))")
    if temperature is not None:
        temperature = checks.positive("temperature", temperature)
    if logit_scale is not None:
        checks.one_element("logit_scale", logit_scale, "holding log(scale)")
    if logit_bias is not None:
        if variant != "sigmoid":
            raise ValueError("logit_bias is only used by variant='sigmoid' (it cancels in a softmax)")
        checks.one_element("logit_bias", logit_bias)
    checks.reduction(reduction, ("mean", "sum", "none"))
    na, nb = a.shape[0], b.shape[0]
    if labels is None:
        if nb < na:
            raise ValueError(f"without labels row i of a matches row i of b: b needs at least N_a = {na} rows, "
                             f"got {nb}")
        lab = torch.arange(na, device=a.device)
    else:
        checks.int_tensor("labels", labels, (na,))
        lab = labels.to(torch.int64)
        if na and not torch.compiler.is_compiling() and bool(((lab < 0) | (lab >= nb)).any()):
            raise ValueError(f"labels must be in [0, N_b = {nb})")
    checks.one_device(a=a, b=b, logit_scale=logit_scale, logit_bias=logit_bias, labels=labels)
    backend = backends.resolve(backend, a.device, "info_nce")
    a, b = autocast_operands(a.device, a, b)
    acc = acc_dtype(a, b)
    log_scale = logit_scale.reshape(()) if logit_scale is not None else \
        torch.tensor(-math.log(temperature), dtype=acc, device=a.device)
    bias = None if logit_bias is None else logit_bias.reshape(())
    scale = torch.full((), 1.0 / max(na, 1) if reduction == "mean" else 1.0, dtype=acc, device=a.device)
    return info_nce_op((a, b, log_scale, bias), (lab,), scale,
                       dict(sigmoid=variant == "sigmoid", symmetric=bool(symmetric)), REDUCTION_IDS[reduction], backend)


# ------------------------------------------------------------------------------ clip_distill

def _clip_kernel(backend, inputs, extras, need, *, t_scale):
    a, b, log_scale = inputs
    ta, tb = extras
    contrastive, distill, stats = clip_distill_forward(a, b, ta, tb, log_scale, t_scale, backend=backend)
    n = max(a.shape[0], 1)
    return [contrastive.sum() / n, distill.sum() / n], list(stats)


def _clip_backward(backend, inputs, extras, stats, grad_losses, need, *, t_scale):
    a, b, log_scale = inputs
    ta, tb = extras
    n = max(a.shape[0], 1)
    return clip_distill_backward(a, b, ta, tb, log_scale, t_scale, stats, grad_losses[0] / n, grad_losses[1] / n,
                                 need, backend=backend)


def _clip_fake_stats(inputs, extras):
    a = inputs[0]
    return [a.new_empty(a.shape[0], dtype=acc_dtype(*inputs, *extras)) for _ in range(4)]


clip_distill_op = FusedStatsOp("kdkernels::clip_distill", inputs=("a", "b", "log_scale"), extras=("ta", "tb"),
                               params=dict(t_scale=float), kernel=_clip_kernel, backward=_clip_backward, losses=2,
                               fake_stats=_clip_fake_stats)


def clip_distill(image: Tensor, text: Tensor, t_image: Tensor, t_text: Tensor, log_scale: Tensor, t_scale: float,
                 backend: str = "auto"):
    """(CLIP's contrastive loss, the soft cross-entropy distillation loss) of open_clip's
    ``DistillClipLoss`` (pairs i ↔ i, both means over the N pairs), from one pass over the tiles of
    the student's ``S = exp(log_scale) image textᵀ`` and the teacher's ``T = t_scale t_image t_textᵀ``:
    the two losses share S and its log-sum-exps. Gradients go to ``image``, ``text`` and
    ``log_scale`` (a 0-d tensor); the teacher is a constant."""
    check_embeddings("image", image)
    check_embeddings("text", text, image.shape[1])
    check_embeddings("t_image", t_image)
    check_embeddings("t_text", t_text, t_image.shape[1])
    n = image.shape[0]
    if not (text.shape[0] == t_image.shape[0] == t_text.shape[0] == n):
        raise ValueError(f"image, text, t_image and t_text must have the same rows, got {image.shape[0]}, "
                         f"{text.shape[0]}, {t_image.shape[0]}, {t_text.shape[0]}")
    checks.one_element("log_scale", log_scale)
    t_scale = checks.positive("t_scale", float(t_scale))
    checks.one_device(image=image, text=text, t_image=t_image, t_text=t_text, log_scale=log_scale)
    backend = backends.resolve(backend, image.device, "clip_distill")
    image, text, t_image, t_text = autocast_operands(image.device, image, text, t_image, t_text)
    log_scale = log_scale.reshape(())
    return clip_distill_op((image, text, log_scale), (t_image.detach(), t_text.detach()), dict(t_scale=t_scale),
                           backend)
