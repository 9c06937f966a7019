// The per-tile epilogue of the feature-projection (hint) losses on the CPU
// (kdkernels/ops/projected_feature.py holds the tile loop and the ATen matmuls): one sweep over
// the rows of a projected tile P [R, C] and the teacher's tile T [R, C] (float or double,
// contiguous) in place of a handful of PyTorch element-wise operations, in parallel over rows.
//
//   feat_elementwise   rows += Σ_j loss(P - T) / Dt (mse, l1, smooth_l1); with g, P <- g dloss/dP
//   feat_cos_stats     stats[r] += (Σ P², Σ P T, Σ T²)
//   feat_cos_grad      P <- a_r P + c_r T and, when given, dT <- e_r P + f_r T
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "../kdkernels.h"
#include "sweeps.h"

namespace kdk {
namespace {

using namespace kdk::cpu;

template <typename acc_t>
using Vec = Vectorized<acc_t>;

void check_pair(const at::Tensor& P, const at::Tensor& T, const char* what) {
  TORCH_CHECK(P.dim() == 2 && P.is_contiguous() && (P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble),
              what, ": a contiguous 2-D float or double tile expected");
  TORCH_CHECK(T.sizes() == P.sizes() && T.is_contiguous() && T.scalar_type() == P.scalar_type(), what,
              ": the teacher tile must match the projected tile");
}

template <typename acc_t>
inline acc_t sgn(acc_t x) {
  return x > 0 ? acc_t(1) : (x < 0 ? acc_t(-1) : acc_t(0));
}

}  // namespace

void feat_elementwise(at::Tensor& P, const at::Tensor& T, int64_t kind, double beta, double inv_dt, at::Tensor& rows,
                      const std::optional<at::Tensor>& g) {
  check_pair(P, T, "feat_elementwise");
  const int64_t R = P.size(0), C = P.size(1);
  TORCH_CHECK(kind >= 0 && kind <= 2, "feat_elementwise: kind 0 (mse), 1 (l1) or 2 (smooth_l1)");
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == R && rows.is_contiguous() && rows.scalar_type() == P.scalar_type(),
              "feat_elementwise: rows must be [R] of the tile's dtype");
  const bool grad = g.has_value() && g->defined();
  if (grad)
    TORCH_CHECK(g->dim() == 1 && g->size(0) == R && g->is_contiguous() && g->scalar_type() == P.scalar_type(),
                "feat_elementwise: g must be [R] of the tile's dtype");
  const bool l1 = kind == 1 || (kind == 2 && beta == 0.0);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "feat_elementwise", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    acc_t* p = P.data_ptr<acc_t>();
    const acc_t* t = T.data_ptr<acc_t>();
    acc_t* pr = rows.data_ptr<acc_t>();
    const acc_t* pg = grad ? g->data_ptr<acc_t>() : nullptr;
    const acc_t b = static_cast<acc_t>(beta), hb = static_cast<acc_t>(0.5 * beta);
    const acc_t inv_b = beta > 0 ? static_cast<acc_t>(1.0 / beta) : acc_t(0);
    const acc_t idt = static_cast<acc_t>(inv_dt);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* prow = p + r * C;
        const acc_t* trow = t + r * C;
        const acc_t gs = grad ? pg[r] * idt : acc_t(0);
        Vec<acc_t> vs(0);
        const Vec<acc_t> vgs(gs), two(2), zero(0), one(1), mone(-1), vb(b), vhb(hb), vib(inv_b), vhib(0.5 * inv_b);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> d = Vec<acc_t>::loadu(prow + j) - Vec<acc_t>::loadu(trow + j);
          Vec<acc_t> dl;
          if (kind == 0) {
            vs = at::vec::fmadd(d, d, vs);
            dl = two * d;
          } else {
            const Vec<acc_t> a = d.abs();
            const Vec<acc_t> s = Vec<acc_t>::blendv(Vec<acc_t>::blendv(zero, one, d > zero), mone, d < zero);
            if (l1) {
              vs = vs + a;
              dl = s;
            } else {
              const Vec<acc_t> small = a < vb;
              vs = vs + Vec<acc_t>::blendv(a - vhb, d * d * vhib, small);
              dl = Vec<acc_t>::blendv(s, d * vib, small);
            }
          }
          if (grad) (dl * vgs).store(prow + j);
        }
        acc_t sum = hsum(vs);
        for (int64_t j = full; j < C; ++j) {
          const acc_t d = prow[j] - trow[j];
          acc_t dl;
          if (kind == 0) {
            sum += d * d;
            dl = 2 * d;
          } else if (l1) {
            sum += std::abs(d);
            dl = sgn(d);
          } else if (std::abs(d) < b) {
            sum += d * d * acc_t(0.5) * inv_b;
            dl = d * inv_b;
          } else {
            sum += std::abs(d) - hb;
            dl = sgn(d);
          }
          if (grad) prow[j] = dl * gs;
        }
        pr[r] += sum * idt;
      }
    });
  });
}

void feat_cos_stats(const at::Tensor& P, const at::Tensor& T, at::Tensor& stats) {
  check_pair(P, T, "feat_cos_stats");
  const int64_t R = P.size(0), C = P.size(1);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == R && stats.size(1) == 3 && stats.is_contiguous() &&
                  stats.scalar_type() == P.scalar_type(),
              "feat_cos_stats: stats must be [R, 3] of the tile's dtype");
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "feat_cos_stats", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t *p = P.data_ptr<acc_t>(), *t = T.data_ptr<acc_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t *prow = p + r * C, *trow = t + r * C;
        Vec<acc_t> pp(0), pt(0), tt(0);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> x = Vec<acc_t>::loadu(prow + j), y = Vec<acc_t>::loadu(trow + j);
          pp = at::vec::fmadd(x, x, pp);
          pt = at::vec::fmadd(x, y, pt);
          tt = at::vec::fmadd(y, y, tt);
        }
        acc_t spp = hsum(pp), spt = hsum(pt), stt = hsum(tt);
        for (int64_t j = full; j < C; ++j) {
          spp += prow[j] * prow[j];
          spt += prow[j] * trow[j];
          stt += trow[j] * trow[j];
        }
        st[3 * r] += spp;
        st[3 * r + 1] += spt;
        st[3 * r + 2] += stt;
      }
    });
  });
}

void feat_cos_grad(at::Tensor& P, const at::Tensor& T, const at::Tensor& coef, const std::optional<at::Tensor>& dT) {
  check_pair(P, T, "feat_cos_grad");
  const int64_t R = P.size(0), C = P.size(1);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == R && coef.size(1) == 4 && coef.is_contiguous() &&
                  coef.scalar_type() == P.scalar_type(),
              "feat_cos_grad: coef must be [R, 4] of the tile's dtype");
  const bool want_t = dT.has_value() && dT->defined();
  if (want_t) check_pair(*dT, P, "feat_cos_grad dT");
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "feat_cos_grad", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    acc_t* p = P.data_ptr<acc_t>();
    const acc_t* t = T.data_ptr<acc_t>();
    const acc_t* cf = coef.data_ptr<acc_t>();
    acc_t* dt = want_t ? dT->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* prow = p + r * C;
        const acc_t* trow = t + r * C;
        const acc_t a = cf[4 * r], c = cf[4 * r + 1], e = cf[4 * r + 2], f = cf[4 * r + 3];
        const Vec<acc_t> va(a), vc(c), ve(e), vf(f);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> x = Vec<acc_t>::loadu(prow + j), y = Vec<acc_t>::loadu(trow + j);
          if (want_t) at::vec::fmadd(ve, x, vf * y).store(dt + r * C + j);
          at::vec::fmadd(va, x, vc * y).store(prow + j);
        }
        for (int64_t j = full; j < C; ++j) {
          const acc_t x = prow[j], y = trow[j];
          if (want_t) dt[r * C + j] = e * x + f * y;
          prow[j] = a * x + c * y;
        }
      }
    });
  });
}

}  // namespace kdk
