"""Relational similarity distillation, tiled: the student's similarity rows pulled to the teacher's.

``S_s = a_s b_sᵀ / T_s`` (student), ``S_t = a_t b_tᵀ / T`` (teacher); self-similarity (b = a)
drops the diagonal. Per row (and per column when symmetric) the online statistics of
:mod:`kdkernels._core.online` give ``D(teacher || student)`` of each divergence (the math of
:mod:`kdkernels.softmax_divergence`); JSD takes one more pass for ``K_s``, ``K_t``; the gradient pass forms
``dS_s`` per tile and adds ``dS_s b_s`` into ``d a_s`` and ``dS_sᵀ a_s`` into ``d b_s``. The teacher
is a constant. Neither matrix is ever formed: memory beyond the inputs and gradients is O(N)
statistics and a few ``[R, C]`` tiles.

Backends: ``"torch"`` (PyTorch operations per tile, any device), ``"cpu"`` (the C++ sweeps of
csrc/cpu/similarity.cpp per tile), ``"triton"`` (kdkernels/triton/similarity.py).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from kdkernels._core import backends, checks, numerics
from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, tiles
from kdkernels._core.online import OnlineDivergence, OnlineDivergenceCpu
from kdkernels.contrastive import COL_TILE, ROW_TILE, check_embeddings
from kdkernels.softmax_divergence import KL_AND_JSD, divergence_id

__all__ = ["similarity_kd", "similarity_kd_masked", "similarity_kd_tiled"]

backends.register("similarity_kd", cpu=True, triton=True, cuda=False)


def _triton():
    from kdkernels.triton import similarity

    return similarity


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
    Div = OnlineDivergenceCpu if cpu else OnlineDivergence
    acc = acc_dtype(sa, sb)
    dev = sa.device
    self_sim = sb is None
    SA, TA = sa.to(acc).contiguous(), ta.to(acc).contiguous()
    SB, TB = (SA, TA) if self_sim else (sb.to(acc).contiguous(), tb.to(acc).contiguous())
    na, nb = SA.shape[0], SB.shape[0]
    both = symmetric and not self_sim
    rt, ct = tiles(na, row_tile or ROW_TILE), tiles(nb, col_tile or COL_TILE)
    g = grad_scale.to(acc).reshape(-1).expand(na).contiguous()
    want_t = len(need) > 2 and need[2]
    dsa = torch.zeros_like(SA) if need[0] or want_t else None
    dsb = torch.zeros_like(SB) if (need[1] and not self_sim) else None

    off = 0 if self_sim else mask_offset

    def tile(ri, ci):
        s, t = (SA[ri] @ SB[ci].t()).mul_(inv_ts), (TA[ri] @ TB[ci].t()).mul_(inv_t)  # temperatures per tile
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


def _kernel(backend, inputs, extras, scale, need, *, inv_t, kind, beta, symmetric, mask_offset):
    sa, sb, inv_ts = inputs
    ta, tb = extras
    # a Python number where reading it is free (CPU tensors); a 0-d tensor elsewhere, which the
    # Triton kernels load on the device (no host sync)
    host = numerics.host_reads_free(sa.device)
    inv = float(inv_ts) if host else inv_ts.detach()
    return similarity_kd_tiled(sa, ta, sb, tb, scale, inv_ts=inv, inv_t=inv_t, kind=kind, beta=beta,
                               symmetric=symmetric, need=need, backend=backend, mask_offset=mask_offset)


similarity_kd_op = FusedOp("kdkernels::similarity_kd", inputs=("sa", "sb", "inv_ts"), extras=("ta", "tb"),
                           params=dict(inv_t=float, kind=int, beta=float, symmetric=bool, mask_offset="int?"),
                           kernel=_kernel, none="recompute")


def similarity_kd(student_a: Tensor, teacher_a: Tensor, student_b: Optional[Tensor] = None,
                  teacher_b: Optional[Tensor] = None, *, temperature: float = 1.0,
                  student_temperature: Optional[float] = None, divergence: str = "forward", beta: float = 0.5,
                  normalize: bool = True, symmetric: bool = True, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    r"""Relational distillation: the student's similarity rows pulled to the teacher's.

    The teacher's ``S_t = a_t b_tᵀ / temperature`` and the student's ``S_s = a_s b_sᵀ /
    student_temperature`` (self-similarity ``a aᵀ`` without its diagonal when the ``*_b`` are None;
    cross-modal, e.g. image-text, when given) are turned into row-wise softmaxes and compared with
    ``D(teacher row, student row)`` (``divergence`` as in :func:`kdkernels.softmax_kl`); with ``b`` given and
    ``symmetric``, averaged with the same over columns. Neither matrix is ever formed.

    Args:
        student_a: ``[N, Ds]``; teacher_a: ``[N, Dt]`` (the dims may differ); student_b, teacher_b:
            ``[N, Ds]``, ``[N, Dt]`` or None.
        temperature: the teacher's; student_temperature: the student's (default: the same): a
            float, or a one-element tensor that gets a gradient when it requires one.
        normalize: L2-normalize every embedding first (cosine similarities).
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (``[N]``).
        backend: ``"auto"``, ``"cpu"`` or ``"torch"``, as in :func:`info_nce`.

    Gradients go to the student's embeddings; the teacher's are constants.
    """
    return similarity_kd_masked(student_a, teacher_a, student_b, teacher_b, temperature=temperature,
                                student_temperature=student_temperature, divergence=divergence, beta=beta,
                                normalize=normalize, symmetric=symmetric, reduction=reduction, backend=backend)


def similarity_kd_masked(student_a, teacher_a, student_b=None, teacher_b=None, *, temperature=1.0,
                   student_temperature=None, divergence="forward", beta=0.5, normalize=True, symmetric=True,
                   reduction="mean", backend="auto", mask_offset=None):
    """:func:`similarity_kd` with ``mask_offset``: the entries (i, i + mask_offset) of a cross
    similarity are left out (kdkernels.distributed's self-similarity of a rank's rows)."""
    check_embeddings("student_a", student_a)
    check_embeddings("teacher_a", teacher_a)
    n = student_a.shape[0]
    if teacher_a.shape[0] != n:
        raise ValueError(f"student_a and teacher_a must have the same rows, got {tuple(student_a.shape)} and "
                         f"{tuple(teacher_a.shape)}")
    if (student_b is None) != (teacher_b is None):
        raise ValueError("give both student_b and teacher_b (cross similarity) or neither (self-similarity)")
    if student_b is not None:
        check_embeddings("student_b", student_b, student_a.shape[1])
        check_embeddings("teacher_b", teacher_b, teacher_a.shape[1])
        if teacher_b.shape[0] != student_b.shape[0]:
            raise ValueError(f"student_b and teacher_b must have the same rows, got {tuple(student_b.shape)} and "
                             f"{tuple(teacher_b.shape)}")
        if symmetric and student_b.shape[0] != n:
            raise ValueError(f"symmetric=True averages rows and columns pair by pair: a and b need the same number "
                             f"of rows, got {n} and {student_b.shape[0]}")
    temperature = checks.positive("temperature", temperature)
    if isinstance(student_temperature, Tensor):  # a learnable temperature: it gets a gradient
        if student_temperature.numel() != 1 or not student_temperature.is_floating_point():
            raise TypeError("student_temperature must be a float or a one-element float tensor")
        if not torch.compiler.is_compiling() and not bool(student_temperature.detach() > 0):
            raise ValueError(f"student_temperature must be > 0, got {float(student_temperature)}")
        ts = student_temperature.reshape(())
    else:
        ts = temperature if student_temperature is None else \
            checks.positive("student_temperature", student_temperature)
    checks.choice("divergence", divergence, KL_AND_JSD)
    beta = checks.scalar("beta", beta, 0.0, 1.0)
    checks.reduction(reduction, ("mean", "sum", "none"))
    checks.one_device(student_a=student_a, teacher_a=teacher_a, student_b=student_b, teacher_b=teacher_b)
    backend = backends.resolve(backend, student_a.device, "similarity_kd")
    student_a, teacher_a, student_b, teacher_b = autocast_operands(student_a.device, student_a, teacher_a,
                                                                            student_b, teacher_b)
    prep = (lambda x: torch.nn.functional.normalize(x, dim=-1)) if normalize else (lambda x: x)  # noqa: E731
    sa, sb = prep(student_a), None if student_b is None else prep(student_b)
    with torch.no_grad():
        ta, tb = prep(teacher_a), None if teacher_b is None else prep(teacher_b)
    acc = acc_dtype(student_a, teacher_a)
    grad_scale = torch.full((), 1.0 / max(n, 1) if reduction == "mean" else 1.0, dtype=acc, device=sa.device)
    inv_ts = 1.0 / ts if isinstance(ts, Tensor) else torch.tensor(1.0 / ts, dtype=acc, device=sa.device)
    params = dict(inv_t=1.0 / temperature, kind=divergence_id(divergence, beta), beta=beta, symmetric=bool(symmetric),
                  mask_offset=mask_offset)
    return similarity_kd_op((sa, sb, inv_ts), (ta, tb), grad_scale, params, REDUCTION_IDS[reduction], backend)
