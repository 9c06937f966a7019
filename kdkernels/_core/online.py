"""Online statistics of matrices seen one column tile at a time (the similarity losses' tiles of
``S = a bᵀ``): the log-sum-exp of each row, and each row's divergence ``D(teacher || student)``
between the softmaxes of two such matrices (forward KL, reverse KL, JSD; the math of
:mod:`kdkernels.softmax_divergence`). The ``*Cpu`` variants run the same updates as the C++ sweeps of
csrc/cpu/similarity.cpp on contiguous float / double tiles."""

from __future__ import annotations

import math

import torch

from kdkernels._core import ext as _ext
from kdkernels._core.numerics import log_mix, p_times, safe_max


def sweeps():
    """The compiled extension (its ``sim_*`` sweeps), or a RuntimeError saying how to build it."""
    return _ext.require("the similarity losses (backend='cpu')")


class OnlineLSE:
    """Online log-sum-exp of the rows of a matrix seen in column tiles."""

    def __init__(self, n, acc, dev):
        self.m = torch.full((n,), -math.inf, dtype=acc, device=dev)
        self.z = torch.zeros(n, dtype=acc, device=dev)

    def update(self, sl, x):
        m_new = torch.maximum(self.m[sl], x.max(1).values)
        self.z[sl] = (self.z[sl] * torch.exp(self.m[sl] - safe_max(m_new))
                      + torch.exp(x - safe_max(m_new)[:, None]).sum(1))
        self.m[sl] = m_new

    def update_cols(self, sl, x):
        self.update(sl, x.t())

    def lse(self):
        return safe_max(self.m) + torch.log(self.z)


class OnlineLSECpu(OnlineLSE):
    """:class:`OnlineLSE` with the sweeps of csrc/cpu/similarity.cpp (contiguous float / double tiles)."""

    def update(self, sl, x):
        sweeps().sim_rows_lse(x.contiguous(), self.m[sl], self.z[sl])

    def update_cols(self, sl, x):
        sweeps().sim_cols_lse(x, self.m[sl], self.z[sl])


class OnlineDivergence:
    """Per-row D(teacher || student) of ``kind`` over logits seen in column tiles: pass 1 is
    :meth:`update`, then :meth:`finish`; JSD also needs :meth:`update_jsd` over every tile before
    :meth:`finish_jsd`; then :meth:`grad` gives dD/d(student logits) of a tile."""

    def __init__(self, n, kind, beta, acc, dev):
        self.kind, self.beta = kind, beta
        self.a, self.b = OnlineLSE(n, acc, dev), OnlineLSE(n, acc, dev)
        self.w = torch.zeros(n, dtype=acc, device=dev)
        self.K1 = torch.zeros(n, dtype=acc, device=dev)
        self.K2 = torch.zeros(n, dtype=acc, device=dev)

    def update(self, sl, a, b):
        ma, mb = self.a.m[sl], self.b.m[sl]
        ma_n = torch.maximum(ma, a.max(1).values)
        mb_n = torch.maximum(mb, b.max(1).values)
        if self.kind == 0:    # sum e^(b - mb) (b - a)
            f = torch.exp(mb - safe_max(mb_n))
            self.w[sl] = self.w[sl] * f + p_times(torch.exp(b - safe_max(mb_n)[:, None]), b - a).sum(1)
        elif self.kind == 1:  # sum e^(a - ma) (a - b)
            f = torch.exp(ma - safe_max(ma_n))
            self.w[sl] = self.w[sl] * f + p_times(torch.exp(a - safe_max(ma_n)[:, None]), a - b).sum(1)
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
        return log_mix(lps, lpt, self.beta)

    def update_jsd(self, sl, a, b):
        lps, lpt, ps, pt = self._logs(sl, a, b)
        lm = self._log_m(lps, lpt)
        self.K1[sl] += p_times(ps, lps - lm).sum(1)
        self.K2[sl] += p_times(pt, lpt - lm).sum(1)

    def finish_jsd(self):
        self.D = self.beta * self.K2 + (1.0 - self.beta) * self.K1

    def grad(self, sl, a, b, w):
        """w_r dD_r/da for the tile's rows."""
        lps, lpt, ps, pt = self._logs(sl, a, b)
        if self.kind == 0:
            d = ps - pt
        elif self.kind == 1:
            d = p_times(ps, lps - lpt - self.D[sl, None])
        else:
            d = (1.0 - self.beta) * p_times(ps, lps - self._log_m(lps, lpt) - self.K1[sl, None])
        return d * w[:, None]


class OnlineDivergenceCpu(OnlineDivergence):
    """:class:`OnlineDivergence` with the sweeps of csrc/cpu/similarity.cpp."""

    def __init__(self, n, kind, beta, acc, dev):
        super().__init__(n, kind, beta, acc, dev)
        self.a, self.b = OnlineLSECpu(n, acc, dev), OnlineLSECpu(n, acc, dev)

    def update(self, sl, a, b):
        sweeps().sim_rows_div(a.contiguous(), b.contiguous(), self.a.m[sl], self.a.z[sl], self.b.m[sl], self.b.z[sl],
                          self.w[sl], self.kind)

    def update_jsd(self, sl, a, b):
        sweeps().sim_rows_jsd(a.contiguous(), b.contiguous(), self.lse_a[sl], self.lse_b[sl], self.K1[sl], self.K2[sl],
                          self.beta)

    def grad(self, sl, a, b, w):
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
        D = self.D if self.kind != 2 else self.K1  # unused by JSD; any [n] vector
        sweeps().sim_rows_grad(a.contiguous(), b.contiguous(), out, self.lse_a[sl], self.lse_b[sl], D[sl].contiguous(),
                           self.K1[sl], w.contiguous(), self.kind, self.beta)
        return out
