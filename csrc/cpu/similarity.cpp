// The per-tile work of the similarity losses on the CPU (kdkernels/ops/similarity.py holds the tile
// loop and the matmuls): each function sweeps the rows of one [R, C] tile of similarities (float or
// double, contiguous) in place of a dozen PyTorch element-wise operations, in parallel over rows.
//
//   sim_rows_lse        online (max, sum of exponentials) per row          (info_nce rows)
//   sim_cols_lse        the same per column, vectorized along the row       (info_nce columns)
//   sim_softmax_grad    dS = w_r exp(S - lse_r) [+ c_j exp(S - lse_col_j)], returns sum dS * S
//   sim_sigmoid         every entry a negative pair: loss_r += sum softplus(S), dS = g_r sigmoid(S)
//   sim_rows_div        online statistics of D(teacher || student) per row (sweeps.h, the softmax-KL
//                       kernel's pass 1 with T = 1: the temperatures are folded into the matmuls)
//   sim_rows_jsd        the JSD pass (Ks, Kt per row)
//   sim_rows_grad       dD/dS per row times w_r (sweeps.h's gradient pass)
//   sim_xent_stats      per row (or per column) of a student tile S and a teacher tile T: online
//                       (max, sum of exponentials) of both and u = sum e^(T - max_T) S, for the soft
//                       cross-entropy -sum softmax(T) log softmax(S) = lse(S) - u / z_T (open_clip's
//                       DistillClipLoss, fused with CLIP's loss over the same S)
//   sim_xent_grad       dS = a_r softmax_r(S) - b_r softmax_r(T) + a_c softmax_c(S) - b_c softmax_c(T)
//                       written over S, returns sum dS * S
// Statistics are 1-D tensors of the tile's rows (or columns), updated in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kdkernels.h"
#include "sweeps.h"

namespace kdk {
namespace {

using namespace kdk::cpu;

template <typename acc_t>
using Vec = Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
inline acc_t safe(acc_t m) {
  return m == -kInf<acc_t> ? acc_t(0) : m;
}

void check_tile(const at::Tensor& S, const char* what) {
  TORCH_CHECK(S.dim() == 2 && S.is_contiguous() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble),
              what, ": a contiguous 2-D float or double tile expected");
}

void check_vec(const at::Tensor& v, int64_t n, at::ScalarType t, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n && v.is_contiguous() && v.scalar_type() == t, what,
              ": a contiguous 1-D tensor of ", n, " elements of the tile's dtype expected");
}

}  // namespace

void sim_rows_lse(const at::Tensor& S, at::Tensor& m, at::Tensor& z) {
  check_tile(S, "sim_rows_lse");
  const int64_t R = S.size(0), C = S.size(1);
  check_vec(m, R, S.scalar_type(), "sim_rows_lse m");
  check_vec(z, R, S.scalar_type(), "sim_rows_lse z");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_rows_lse", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t* s = S.data_ptr<acc_t>();
    acc_t *pm = m.data_ptr<acc_t>(), *pz = z.data_ptr<acc_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* row = s + r * C;
        const int64_t full = C / W * W;
        Vec<acc_t> vm(-kInf<acc_t>);
        for (int64_t j = 0; j < full; j += W) vm = at::vec::maximum(vm, Vec<acc_t>::loadu(row + j));
        acc_t mx = hmax(vm);
        for (int64_t j = full; j < C; ++j) mx = (row[j] != row[j] || row[j] > mx) ? row[j] : mx;
        const acc_t m_new = (mx != mx) ? mx : std::max(pm[r], mx);  // NaN reaches the row's sum
        const acc_t sm = safe(m_new);
        Vec<acc_t> vz(0);
        const Vec<acc_t> vsm(sm);
        for (int64_t j = 0; j < full; j += W) vz = vz + vexp(Vec<acc_t>::loadu(row + j) - vsm);
        acc_t zz = hsum(vz);
        for (int64_t j = full; j < C; ++j) zz += std::exp(row[j] - sm);
        pz[r] = pz[r] * std::exp(pm[r] - sm) + zz;
        pm[r] = m_new;
      }
    });
  });
}

void sim_cols_lse(const at::Tensor& S, at::Tensor& m, at::Tensor& z) {
  check_tile(S, "sim_cols_lse");
  const int64_t R = S.size(0), C = S.size(1);
  check_vec(m, C, S.scalar_type(), "sim_cols_lse m");
  check_vec(z, C, S.scalar_type(), "sim_cols_lse z");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_cols_lse", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t* s = S.data_ptr<acc_t>();
    acc_t *pm = m.data_ptr<acc_t>(), *pz = z.data_ptr<acc_t>();
    // columns in chunks of 256 (a chunk's running values stay in cache), in parallel
    constexpr int64_t kCols = 256;
    at::parallel_for(0, (C + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) acc_t mx[kCols], acc[kCols];
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t j0 = cb * kCols, n = std::min(kCols, C - j0);
        for (int64_t k = 0; k < n; ++k) mx[k] = -kInf<acc_t>;
        for (int64_t r = 0; r < R; ++r) {
          const acc_t* row = s + r * C + j0;
          int64_t k = 0;
          for (; k + W <= n; k += W)
            at::vec::maximum(Vec<acc_t>::loadu(mx + k), Vec<acc_t>::loadu(row + k)).store(mx + k);
          for (; k < n; ++k) mx[k] = (row[k] != row[k] || row[k] > mx[k]) ? row[k] : mx[k];
        }
        for (int64_t k = 0; k < n; ++k) {
          const acc_t old = pm[j0 + k];
          const acc_t m_new = (mx[k] != mx[k]) ? mx[k] : std::max(old, mx[k]);
          pz[j0 + k] *= std::exp(old - safe(m_new));
          pm[j0 + k] = m_new;
          mx[k] = safe(m_new);
          acc[k] = 0;
        }
        for (int64_t r = 0; r < R; ++r) {
          const acc_t* row = s + r * C + j0;
          int64_t k = 0;
          for (; k + W <= n; k += W)
            (Vec<acc_t>::loadu(acc + k) + vexp(Vec<acc_t>::loadu(row + k) - Vec<acc_t>::loadu(mx + k))).store(acc + k);
          for (; k < n; ++k) acc[k] += std::exp(row[k] - mx[k]);
        }
        for (int64_t k = 0; k < n; ++k) pz[j0 + k] += acc[k];
      }
    });
  });
}

double sim_softmax_grad(at::Tensor& S, const at::Tensor& lse_r, const at::Tensor& w_r,
                        const std::optional<at::Tensor>& lse_c, const std::optional<at::Tensor>& w_c) {
  check_tile(S, "sim_softmax_grad");
  const int64_t R = S.size(0), C = S.size(1);
  check_vec(lse_r, R, S.scalar_type(), "sim_softmax_grad lse_r");
  check_vec(w_r, R, S.scalar_type(), "sim_softmax_grad w_r");
  const bool cols = lse_c.has_value() && lse_c->defined();
  if (cols) {
    check_vec(*lse_c, C, S.scalar_type(), "sim_softmax_grad lse_c");
    check_vec(*w_c, C, S.scalar_type(), "sim_softmax_grad w_c");
  }
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_softmax_grad", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    acc_t* s = S.data_ptr<acc_t>();
    const acc_t *lr = lse_r.data_ptr<acc_t>(), *wr = w_r.data_ptr<acc_t>();
    const acc_t* lc = cols ? lse_c->data_ptr<acc_t>() : nullptr;
    const acc_t* wc = cols ? w_c->data_ptr<acc_t>() : nullptr;
    // sum dS * S (the log-scale gradient), reduced per row block
    total = at::parallel_reduce(0, R, 16, 0.0, [&](int64_t r0, int64_t r1, double ident) {
      double part = ident;
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* row = s + r * C;
        const Vec<acc_t> vl(lr[r]), vw(wr[r]);
        Vec<acc_t> vsum(0);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> x = Vec<acc_t>::loadu(row + j);
          Vec<acc_t> d = vw * vexp(x - vl);
          if (cols) d = at::vec::fmadd(Vec<acc_t>::loadu(wc + j), vexp(x - Vec<acc_t>::loadu(lc + j)), d);
          vsum = at::vec::fmadd(d, x, vsum);
          d.store(row + j);
        }
        acc_t rs = hsum(vsum);
        for (int64_t j = full; j < C; ++j) {
          const acc_t x = row[j];
          acc_t d = wr[r] * std::exp(x - lr[r]);
          if (cols) d += wc[j] * std::exp(x - lc[j]);
          rs += d * x;
          row[j] = d;
        }
        part += rs;
      }
      return part;
    }, std::plus<double>());
  });
  return total;
}

// Returns (sum dS, sum dS * S) for the bias and log-scale gradients; S is overwritten with dS when
// grads are wanted. loss (per row) is accumulated.
std::tuple<double, double> sim_sigmoid(at::Tensor& S, at::Tensor& loss, const std::optional<at::Tensor>& g,
                                       double bias) {
  check_tile(S, "sim_sigmoid");
  const int64_t R = S.size(0), C = S.size(1);
  check_vec(loss, R, S.scalar_type(), "sim_sigmoid loss");
  const bool grad = g.has_value() && g->defined();
  if (grad) check_vec(*g, R, S.scalar_type(), "sim_sigmoid g");
  double sum_d = 0, sum_ds = 0;
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_sigmoid", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    acc_t* s = S.data_ptr<acc_t>();
    acc_t* pl = loss.data_ptr<acc_t>();
    const acc_t* pg = grad ? g->data_ptr<acc_t>() : nullptr;
    std::vector<double> parts(static_cast<size_t>(2 * R), 0.0);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      const Vec<acc_t> zero(0), one(1), vb(static_cast<acc_t>(bias));
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* row = s + r * C;
        const Vec<acc_t> vg(grad ? pg[r] : acc_t(0));
        Vec<acc_t> vl(0), vd(0), vds(0);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> x = Vec<acc_t>::loadu(row + j);
          // softplus(x) = max(x, 0) + log1p(exp(-|x|)); sigmoid(x) = exp(x - softplus(x))
          const Vec<acc_t> sp = at::vec::maximum(x, zero) + vexp(zero - x.abs()).log1p();
          vl = vl + sp;
          if (grad) {
            const Vec<acc_t> d = vg * vexp(x - sp);
            vd = vd + d;
            vds = at::vec::fmadd(d, x - vb, vds);
            d.store(row + j);
          }
        }
        acc_t l = hsum(vl), sd = hsum(vd), sds = hsum(vds);
        for (int64_t j = full; j < C; ++j) {
          const acc_t x = row[j];
          const acc_t sp = std::max(x, acc_t(0)) + std::log1p(std::exp(-std::abs(x)));
          l += sp;
          if (grad) {
            const acc_t d = pg[r] * std::exp(x - sp);
            sd += d;
            sds += d * (x - static_cast<acc_t>(bias));
            row[j] = d;
          }
        }
        pl[r] += l;
        parts[2 * r] = sd;
        parts[2 * r + 1] = sds;
      }
    });
    for (int64_t r = 0; r < R; ++r) {
      sum_d += parts[2 * r];
      sum_ds += parts[2 * r + 1];
    }
  });
  return {sum_d, sum_ds};
}

void sim_rows_div(const at::Tensor& S, const at::Tensor& T, at::Tensor& ma, at::Tensor& za, at::Tensor& mb,
                  at::Tensor& zb, at::Tensor& w, int64_t kind) {
  check_tile(S, "sim_rows_div");
  check_tile(T, "sim_rows_div teacher");
  TORCH_CHECK(S.sizes() == T.sizes() && S.scalar_type() == T.scalar_type(), "sim_rows_div: tiles differ");
  const int64_t R = S.size(0), C = S.size(1);
  for (auto* v : {&ma, &za, &mb, &zb, &w}) check_vec(*v, R, S.scalar_type(), "sim_rows_div statistics");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_rows_div", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t *s = S.data_ptr<acc_t>(), *t = T.data_ptr<acc_t>();
    acc_t *pma = ma.data_ptr<acc_t>(), *pza = za.data_ptr<acc_t>(), *pmb = mb.data_ptr<acc_t>();
    acc_t *pzb = zb.data_ptr<acc_t>(), *pw = w.data_ptr<acc_t>();
    const int64_t nvec = C / W, rem = C - nvec * W;
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t *sr = s + r * C, *tr = t + r * C;
        Tail<acc_t, acc_t, acc_t> tail(sr + nvec * W, tr + nvec * W, rem);
        Vec<acc_t> vma(-kInf<acc_t>), vmb(-kInf<acc_t>);
        sweep_max<acc_t>(sr, tr, nvec, vma, vmb);
        if (rem) sweep_max<acc_t>(tail.s, tail.t, 1, vma, vmb);
        const acc_t cma = hmax(vma), cmb = hmax(vmb);
        const acc_t na = (cma != cma) ? cma : std::max(pma[r], cma), nb = (cmb != cmb) ? cmb : std::max(pmb[r], cmb);
        const acc_t fa = std::exp(pma[r] - safe(na)), fb = std::exp(pmb[r] - safe(nb));
        RowConsts<acc_t> c{};
        c.inv_t = Vec<acc_t>(1);
        c.ma = Vec<acc_t>(safe(na));
        c.mb = Vec<acc_t>(safe(nb));
        c.ce_own_lse = false;
        Sums<acc_t> sums{Vec<acc_t>(0), Vec<acc_t>(0), Vec<acc_t>(0), Vec<acc_t>(0)};
        auto run = [&](auto K) {
          sweep_sums<acc_t, decltype(K)::value>(sr, tr, nvec, c, sums);
          if (rem) sweep_sums<acc_t, decltype(K)::value>(tail.s, tail.t, 1, c, sums);
        };
        if (kind == 0) run(std::integral_constant<Kind, Kind::Forward>{});
        else if (kind == 1) run(std::integral_constant<Kind, Kind::Reverse>{});
        else run(std::integral_constant<Kind, Kind::JSD>{});
        pza[r] = pza[r] * fa + hsum(sums.a);
        pzb[r] = pzb[r] * fb + hsum(sums.b);
        if (kind == 0) pw[r] = pw[r] * fb + hsum(sums.w);
        if (kind == 1) pw[r] = pw[r] * fa + hsum(sums.w);
        pma[r] = na;
        pmb[r] = nb;
      }
    });
  });
}

void sim_rows_jsd(const at::Tensor& S, const at::Tensor& T, const at::Tensor& lse_a, const at::Tensor& lse_b,
                  at::Tensor& K1, at::Tensor& K2, double beta) {
  check_tile(S, "sim_rows_jsd");
  check_tile(T, "sim_rows_jsd teacher");
  const int64_t R = S.size(0), C = S.size(1);
  for (auto* v : {&lse_a, &lse_b}) check_vec(*v, R, S.scalar_type(), "sim_rows_jsd lse");
  for (auto* v : {&K1, &K2}) check_vec(*v, R, S.scalar_type(), "sim_rows_jsd sums");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_rows_jsd", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t *s = S.data_ptr<acc_t>(), *t = T.data_ptr<acc_t>();
    const acc_t *la = lse_a.data_ptr<acc_t>(), *lb = lse_b.data_ptr<acc_t>();
    acc_t *k1 = K1.data_ptr<acc_t>(), *k2 = K2.data_ptr<acc_t>();
    const int64_t nvec = C / W, rem = C - nvec * W;
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t *sr = s + r * C, *tr = t + r * C;
        Tail<acc_t, acc_t, acc_t> tail(sr + nvec * W, tr + nvec * W, rem);
        RowConsts<acc_t> c{};
        c.inv_t = Vec<acc_t>(1);
        c.lse_a = Vec<acc_t>(la[r]);
        c.lse_b = Vec<acc_t>(lb[r]);
        c.beta = Vec<acc_t>(static_cast<acc_t>(beta));
        c.beta1 = Vec<acc_t>(static_cast<acc_t>(1.0 - beta));
        Sums<acc_t> sums{Vec<acc_t>(0), Vec<acc_t>(0), Vec<acc_t>(0), Vec<acc_t>(0)};
        sweep_pair<acc_t, Kind::JSD>(sr, tr, nvec, c, sums);
        if (rem) sweep_pair<acc_t, Kind::JSD>(tail.s, tail.t, 1, c, sums);
        k1[r] += hsum(sums.a);
        k2[r] += hsum(sums.b);
      }
    });
  });
}

// out[r, :] = w_r dD/dS_s[r, :] (T = 1 formulas of sweeps.h with the per-row constants).
void sim_rows_grad(const at::Tensor& S, const at::Tensor& T, at::Tensor& out, const at::Tensor& lse_a,
                   const at::Tensor& lse_b, const at::Tensor& D, const at::Tensor& Ks, const at::Tensor& w_r,
                   int64_t kind, double beta) {
  check_tile(S, "sim_rows_grad");
  check_tile(T, "sim_rows_grad teacher");
  check_tile(out, "sim_rows_grad out");
  const int64_t R = S.size(0), C = S.size(1);
  for (auto* v : {&lse_a, &lse_b, &D, &Ks, &w_r}) check_vec(*v, R, S.scalar_type(), "sim_rows_grad row values");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_rows_grad", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t *s = S.data_ptr<acc_t>(), *t = T.data_ptr<acc_t>();
    acc_t* o = out.data_ptr<acc_t>();
    const acc_t *la = lse_a.data_ptr<acc_t>(), *lb = lse_b.data_ptr<acc_t>(), *pd = D.data_ptr<acc_t>();
    const acc_t *pk = Ks.data_ptr<acc_t>(), *pw = w_r.data_ptr<acc_t>();
    const int64_t nvec = C / W, rem = C - nvec * W;
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t *sr = s + r * C, *tr = t + r * C;
        acc_t* orow = o + r * C;
        Tail<acc_t, acc_t, acc_t> tail(sr + nvec * W, tr + nvec * W, rem);
        RowConsts<acc_t> c{};
        c.inv_t = Vec<acc_t>(1);
        c.lse_a = Vec<acc_t>(la[r]);
        c.lse_b = Vec<acc_t>(lb[r]);
        c.D = Vec<acc_t>(pd[r]);
        c.Ks = Vec<acc_t>(pk[r]);
        c.beta = Vec<acc_t>(static_cast<acc_t>(beta));
        c.beta1 = Vec<acc_t>(static_cast<acc_t>(1.0 - beta));
        // sweeps.h's JSD gradient is (1 - beta)-free: p_s (log p_s - log m - Ks); scale it here
        c.cs_s = Vec<acc_t>(kind == 2 ? pw[r] * static_cast<acc_t>(1.0 - beta) : pw[r]);
        c.want_s = true;
        c.want_t = false;
        c.ce_on = false;
        auto run = [&](auto K) {
          sweep_grad<acc_t, decltype(K)::value>(sr, tr, orow, static_cast<acc_t*>(nullptr), nvec, -1, c);
          if (rem) {
            sweep_grad<acc_t, decltype(K)::value>(tail.s, tail.t, tail.gs, static_cast<acc_t*>(nullptr), 1, -1, c);
            for (int64_t k = 0; k < rem; ++k) orow[nvec * W + k] = tail.gs[k];
          }
        };
        if (kind == 0) run(std::integral_constant<Kind, Kind::Forward>{});
        else if (kind == 1) run(std::integral_constant<Kind, Kind::Reverse>{});
        else run(std::integral_constant<Kind, Kind::JSD>{});
      }
    });
  });
}

// Rows (cols = false) or columns (cols = true) of the tiles S, T: online (m_s, z_s), (m_t, z_t) and
// u = sum e^(T - m_t) S, each rescaled to the new maxima.
void sim_xent_stats(const at::Tensor& S, const at::Tensor& T, at::Tensor& ms, at::Tensor& zs, at::Tensor& mt,
                    at::Tensor& zt, at::Tensor& u, bool cols) {
  check_tile(S, "sim_xent_stats");
  check_tile(T, "sim_xent_stats teacher");
  TORCH_CHECK(S.sizes() == T.sizes() && S.scalar_type() == T.scalar_type(), "sim_xent_stats: tiles differ");
  const int64_t R = S.size(0), C = S.size(1);
  for (auto* v : {&ms, &zs, &mt, &zt, &u}) check_vec(*v, cols ? C : R, S.scalar_type(), "sim_xent_stats statistics");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_xent_stats", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    const acc_t *s = S.data_ptr<acc_t>(), *t = T.data_ptr<acc_t>();
    acc_t *pms = ms.data_ptr<acc_t>(), *pzs = zs.data_ptr<acc_t>(), *pmt = mt.data_ptr<acc_t>();
    acc_t *pzt = zt.data_ptr<acc_t>(), *pu = u.data_ptr<acc_t>();
    auto merge_max = [](acc_t old, acc_t tile) { return (tile != tile) ? tile : std::max(old, tile); };
    if (!cols) {
      at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const acc_t *sr = s + r * C, *tr = t + r * C;
          const int64_t full = C / W * W;
          Vec<acc_t> vs(-kInf<acc_t>), vt(-kInf<acc_t>);
          for (int64_t j = 0; j < full; j += W) {
            vs = at::vec::maximum(vs, Vec<acc_t>::loadu(sr + j));
            vt = at::vec::maximum(vt, Vec<acc_t>::loadu(tr + j));
          }
          acc_t xs = hmax(vs), xt = hmax(vt);
          for (int64_t j = full; j < C; ++j) {
            xs = (sr[j] != sr[j] || sr[j] > xs) ? sr[j] : xs;
            xt = (tr[j] != tr[j] || tr[j] > xt) ? tr[j] : xt;
          }
          const acc_t ns = merge_max(pms[r], xs), nt = merge_max(pmt[r], xt);
          const Vec<acc_t> vns(safe(ns)), vnt(safe(nt));
          Vec<acc_t> as(0), at_(0), au(0);
          for (int64_t j = 0; j < full; j += W) {
            const Vec<acc_t> x = Vec<acc_t>::loadu(sr + j), e = vexp(Vec<acc_t>::loadu(tr + j) - vnt);
            as = as + vexp(x - vns);
            at_ = at_ + e;
            au = at::vec::fmadd(e, x, au);
          }
          acc_t zs_ = hsum(as), zt_ = hsum(at_), uu = hsum(au);
          for (int64_t j = full; j < C; ++j) {
            const acc_t e = std::exp(tr[j] - safe(nt));
            zs_ += std::exp(sr[j] - safe(ns));
            zt_ += e;
            uu += e * sr[j];
          }
          const acc_t fs = std::exp(pms[r] - safe(ns)), ft = std::exp(pmt[r] - safe(nt));
          pzs[r] = pzs[r] * fs + zs_;
          pzt[r] = pzt[r] * ft + zt_;
          pu[r] = pu[r] * ft + uu;
          pms[r] = ns;
          pmt[r] = nt;
        }
      });
      return;
    }
    // columns in chunks of 256 (their running values stay in cache), swept along the rows
    constexpr int64_t kCols = 256;
    at::parallel_for(0, (C + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) acc_t xs[kCols], xt[kCols], as[kCols], at_[kCols], au[kCols];
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t j0 = cb * kCols, n = std::min(kCols, C - j0);
        for (int64_t k = 0; k < n; ++k) xs[k] = xt[k] = -kInf<acc_t>;
        for (int64_t r = 0; r < R; ++r) {
          const acc_t *sr = s + r * C + j0, *tr = t + r * C + j0;
          int64_t k = 0;
          for (; k + W <= n; k += W) {
            at::vec::maximum(Vec<acc_t>::loadu(xs + k), Vec<acc_t>::loadu(sr + k)).store(xs + k);
            at::vec::maximum(Vec<acc_t>::loadu(xt + k), Vec<acc_t>::loadu(tr + k)).store(xt + k);
          }
          for (; k < n; ++k) {
            xs[k] = (sr[k] != sr[k] || sr[k] > xs[k]) ? sr[k] : xs[k];
            xt[k] = (tr[k] != tr[k] || tr[k] > xt[k]) ? tr[k] : xt[k];
          }
        }
        for (int64_t k = 0; k < n; ++k) {
          const int64_t j = j0 + k;
          const acc_t ns = merge_max(pms[j], xs[k]), nt = merge_max(pmt[j], xt[k]);
          const acc_t ft = std::exp(pmt[j] - safe(nt));
          pzs[j] *= std::exp(pms[j] - safe(ns));
          pzt[j] *= ft;
          pu[j] *= ft;
          pms[j] = ns;
          pmt[j] = nt;
          xs[k] = safe(ns);
          xt[k] = safe(nt);
          as[k] = at_[k] = au[k] = 0;
        }
        for (int64_t r = 0; r < R; ++r) {
          const acc_t *sr = s + r * C + j0, *tr = t + r * C + j0;
          int64_t k = 0;
          for (; k + W <= n; k += W) {
            const Vec<acc_t> x = Vec<acc_t>::loadu(sr + k);
            const Vec<acc_t> e = vexp(Vec<acc_t>::loadu(tr + k) - Vec<acc_t>::loadu(xt + k));
            (Vec<acc_t>::loadu(as + k) + vexp(x - Vec<acc_t>::loadu(xs + k))).store(as + k);
            (Vec<acc_t>::loadu(at_ + k) + e).store(at_ + k);
            at::vec::fmadd(e, x, Vec<acc_t>::loadu(au + k)).store(au + k);
          }
          for (; k < n; ++k) {
            const acc_t e = std::exp(tr[k] - xt[k]);
            as[k] += std::exp(sr[k] - xs[k]);
            at_[k] += e;
            au[k] += e * sr[k];
          }
        }
        for (int64_t k = 0; k < n; ++k) {
          pzs[j0 + k] += as[k];
          pzt[j0 + k] += at_[k];
          pu[j0 + k] += au[k];
        }
      }
    });
  });
}

double sim_xent_grad(at::Tensor& S, const at::Tensor& T, const at::Tensor& lse_sr, const at::Tensor& a_r,
                     const at::Tensor& lse_tr, const at::Tensor& b_r, const at::Tensor& lse_sc, const at::Tensor& a_c,
                     const at::Tensor& lse_tc, const at::Tensor& b_c) {
  check_tile(S, "sim_xent_grad");
  check_tile(T, "sim_xent_grad teacher");
  TORCH_CHECK(S.sizes() == T.sizes() && S.scalar_type() == T.scalar_type(), "sim_xent_grad: tiles differ");
  const int64_t R = S.size(0), C = S.size(1);
  for (auto* v : {&lse_sr, &a_r, &lse_tr, &b_r}) check_vec(*v, R, S.scalar_type(), "sim_xent_grad row values");
  for (auto* v : {&lse_sc, &a_c, &lse_tc, &b_c}) check_vec(*v, C, S.scalar_type(), "sim_xent_grad column values");
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sim_xent_grad", [&] {
    using acc_t = scalar_t;
    constexpr int64_t W = Vec<acc_t>::size();
    acc_t* s = S.data_ptr<acc_t>();
    const acc_t* t = T.data_ptr<acc_t>();
    const acc_t *lsr = lse_sr.data_ptr<acc_t>(), *ar = a_r.data_ptr<acc_t>();
    const acc_t *ltr = lse_tr.data_ptr<acc_t>(), *br = b_r.data_ptr<acc_t>();
    const acc_t *lsc = lse_sc.data_ptr<acc_t>(), *ac = a_c.data_ptr<acc_t>();
    const acc_t *ltc = lse_tc.data_ptr<acc_t>(), *bc = b_c.data_ptr<acc_t>();
    total = at::parallel_reduce(0, R, 16, 0.0, [&](int64_t r0, int64_t r1, double ident) {
      double part = ident;
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* row = s + r * C;
        const acc_t* trow = t + r * C;
        const Vec<acc_t> vlsr(lsr[r]), var(ar[r]), vltr(ltr[r]), vbr(br[r]);
        Vec<acc_t> vsum(0);
        const int64_t full = C / W * W;
        for (int64_t j = 0; j < full; j += W) {
          const Vec<acc_t> x = Vec<acc_t>::loadu(row + j), y = Vec<acc_t>::loadu(trow + j);
          Vec<acc_t> d = var * vexp(x - vlsr) - vbr * vexp(y - vltr);
          d = at::vec::fmadd(Vec<acc_t>::loadu(ac + j), vexp(x - Vec<acc_t>::loadu(lsc + j)), d);
          d = d - Vec<acc_t>::loadu(bc + j) * vexp(y - Vec<acc_t>::loadu(ltc + j));
          vsum = at::vec::fmadd(d, x, vsum);
          d.store(row + j);
        }
        acc_t rs = hsum(vsum);
        for (int64_t j = full; j < C; ++j) {
          const acc_t x = row[j], y = trow[j];
          const acc_t d = ar[r] * std::exp(x - lsr[r]) - br[r] * std::exp(y - ltr[r]) + ac[j] * std::exp(x - lsc[j]) -
                          bc[j] * std::exp(y - ltc[j]);
          rs += d * x;
          row[j] = d;
        }
        part += rs;
      }
      return part;
    }, std::plus<double>());
  });
  return total;
}

}  // namespace kdk
