// Forward KL to a top-k (sparse) teacher on the CPU: one sweep of each student row for its
// normalizer, one to write the gradient; the teacher is k values and indices per row.
//
// Per row, a = s / T over the full vocabulary, lse_a = logsumexp(a), and the teacher at T given by
// its top-k entries b_k (log-probabilities / T, or logits / T) and, for tail = uniform, one value
// b_tail = log(r / (V - k)) / T shared by the V - k other entries (r = 1 - sum_k exp(logp_k)):
//   lse_b = logsumexp(b_k, b_tail + log(V - k)),  pt_k = exp(b_k - lse_b),  pt_tail = exp(b_tail - lse_b)
//   D = sum_k pt_k (b_k - lse_b - a_k + lse_a)
//       + pt_tail ((V - k)(b_tail - lse_b + lse_a) - (sum_j a_j - sum_k a_k))      (uniform tail only)
//   dD/ds_j = (ps_j - pt_j) / T, with pt_j = pt_tail off the top-k (0 for tail = ignore)
// tail = bucket: the mass outside the top-k is one more bin on both sides (a KL over k + 1 bins):
// the teacher's b_tail = log(r) / T joins the k values in lse_b; the student's bin is
// ps_tail = 1 - sum_k ps_k, formed as (z - z_k) / z from the row's sum of exponentials z and its
// top-k terms z_k; D adds pt_tail (log pt_tail - log ps_tail), and off the top-k
// dD/ds_j = ps_j (1 - pt_tail / ps_tail) / T (the tail bin's share of ps_j), on it (ps_k - pt_k) / T.
// The row's sum of a (for the uniform tail) comes from the same sweep as lse_a. The O(k) part (the
// teacher, its tail mass r, the loss) is in double: r and ps_tail are differences of near-equal
// numbers when the top-k hold nearly all the mass. Terms with pt = 0
// contribute nothing (-inf values are legal). Rows labelled ignore_index: zero loss and gradient. A
// row with an index outside [0, V) (unchecked under torch.compile): NaN loss and gradient.
// A student logit transform (scale, soft-cap; sweeps.h Transform): s above is u = f(z), the row
// transformed into a per-thread scratch first and its gradient chained through f.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kdkernels.h"
#include "sweeps.h"

namespace kdk {
namespace {

using namespace kdk::cpu;

constexpr int64_t kChunk = 2048;

template <typename acc_t, typename TS>
acc_t row(const TS* s, int64_t V, const acc_t* b_in, const int64_t* idx, int64_t k, bool uniform, bool bucket,
          acc_t inv_t, acc_t g, TS* gs) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t V_full = V / W * W, rem = V - V_full;
  // ---- the student's normalizer and row sum, online over chunks (float32 lanes in blocks of
  // kSumBlock vectors, Kahan-compensated across blocks, double across chunks: sweeps.h sweep_sums)
  acc_t M = -kInf;
  double z = 0, sum_a = 0;
  alignas(64) TS tail_s[W];
  for (int64_t j = 0; j < W; ++j) tail_s[j] = j < rem ? s[V_full + j] : static_cast<TS>(-kInf);
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off), nvec = n / W;
    const bool has_tail = off + n == V && rem > 0;
    Vec vm(-kInf), dummy(-kInf);
    sweep_max<acc_t>(s + off, s + off, nvec, vm, dummy);
    if (has_tail) sweep_max<acc_t>(tail_s, tail_s, 1, vm, dummy);
    const acc_t cm = hmax(vm) * inv_t;
    if (cm > M) {
      z *= std::exp(double(M) - double(cm));
      M = cm;
    }
    const Vec vinv(inv_t), vM(M == -kInf ? acc_t(0) : M);
    Vec vz(0), vs(0), cz(0), cs(0);
    for (int64_t i0 = 0; i0 < nvec; i0 += kSumBlock) {
      Vec bz(0), bs(0);
      for (int64_t i = i0; i < std::min(nvec, i0 + kSumBlock); ++i) {
        const Vec a = VecIO<acc_t, TS>::load(s + off + i * W) * vinv;
        bz = bz + vexp(a - vM);
        if (uniform) bs = bs + a;
      }
      kahan_add(vz, cz, bz);
      if (uniform) kahan_add(vs, cs, bs);
    }
    if (has_tail) {  // the padding is -inf: it adds nothing to the exponentials, and is left out of the sum
      kahan_add(vz, cz, vexp(VecIO<acc_t, TS>::load(tail_s) * vinv - vM));
      if (uniform)
        for (int64_t j = V_full; j < V; ++j) sum_a += static_cast<double>(static_cast<acc_t>(s[j]) * inv_t);
    }
    z += hsum_wide(Vec(vz - cz));
    if (uniform) sum_a += hsum_wide(Vec(vs - cs));
  }
  const double M_s = M == -kInf ? 0.0 : double(M);  // what the exponentials of z were taken against
  const double lse_a_w = M_s + std::log(z);
  const acc_t lse_a = static_cast<acc_t>(lse_a_w);
  if (std::isnan(lse_a)) {  // NaN in the row
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (gs) std::fill(gs, gs + V, static_cast<TS>(nan));
    return nan;
  }

  // ---- the teacher at T from its top-k, and the loss, in double: the tail bins 1 - sum are
  // differences of near-equal numbers when the top-k hold nearly all the mass (k terms a row)
  constexpr double kInfW = std::numeric_limits<double>::infinity();
  const double it = double(inv_t);
  double mb = -kInfW;
  for (int64_t i = 0; i < k; ++i) mb = std::max(mb, double(b_in[i]));
  // the tail's entries: V - k of them sharing the uniform tail, one bin for the bucket
  const double tail_n = bucket ? 1.0 : static_cast<double>(V - k);
  double b_tail = -kInfW;
  if ((uniform || bucket) && V > k) {
    double mass = 1;
    for (int64_t i = 0; i < k; ++i) mass -= std::exp(double(b_in[k + i]));  // b_in[k..2k): the raw log-probabilities
    if (mass > 0) b_tail = (std::log(mass) - std::log(tail_n)) * it;
  }
  const double mt = std::max(mb, b_tail == -kInfW ? -kInfW : b_tail + std::log(tail_n));
  const double mt_s = mt == -kInfW ? 0.0 : mt;
  double zt = 0;
  for (int64_t i = 0; i < k; ++i) zt += std::exp(double(b_in[i]) - mt_s);
  if (b_tail != -kInfW) zt += tail_n * std::exp(b_tail - mt_s);
  const double lse_b = mt_s + std::log(zt);
  const double pt_tail = b_tail == -kInfW ? 0.0 : std::exp(b_tail - lse_b);

  double D = 0, sum_ak = 0, z_k = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double a_k = double(static_cast<acc_t>(s[idx[i]]) * inv_t);  // as the sweep forms it
    sum_ak += a_k;
    z_k += std::exp(a_k - M_s);
    const double lpt = double(b_in[i]) - lse_b, pt = std::exp(lpt);
    if (pt > 0) D += pt * (lpt - (a_k - lse_a_w));
  }
  // the bucket: the student's tail bin, (z - z_k) / z (clamped: rounding may leave it slightly below 0)
  const double ps_tail = std::max((z - z_k) / z, 0.0);
  double keep = 1, off = pt_tail;  // off the top-k, dD/da_j = keep ps_j - off
  if (bucket) {
    if (pt_tail > 0) D += pt_tail * ((b_tail - lse_b) - std::log(ps_tail));
    keep = pt_tail > 0 ? 1.0 - pt_tail / ps_tail : 1.0;
    off = 0;
  } else if (pt_tail > 0) {
    D += pt_tail * (tail_n * (b_tail - lse_b + lse_a_w) - (sum_a - sum_ak));
  }

  // ---- gradient: g (ps - pt) / T, the tail value everywhere, then the k entries
  if (gs) {
    const acc_t keep_a = static_cast<acc_t>(keep), off_a = static_cast<acc_t>(off);
    const Vec vinv(inv_t), vl(lse_a), vc(g * inv_t), vkeep(keep_a), voff(off_a);
    for (int64_t i = 0; i < V_full / W; ++i) {
      const Vec a = VecIO<acc_t, TS>::load(s + i * W) * vinv;
      VecIO<acc_t, TS>::store(gs + i * W, vc * (vexp(a - vl) * vkeep - voff));
    }
    for (int64_t j = V_full; j < V; ++j) {
      const acc_t a = static_cast<acc_t>(s[j]) * inv_t;
      gs[j] = static_cast<TS>(g * inv_t * (std::exp(a - lse_a) * keep_a - off_a));
    }
    for (int64_t i = 0; i < k; ++i) {
      const double a = double(static_cast<acc_t>(s[idx[i]]) * inv_t);
      gs[idx[i]] = static_cast<TS>(double(g * inv_t) * (std::exp(a - lse_a_w) - std::exp(double(b_in[i]) - lse_b)));
    }
  }
  return static_cast<acc_t>(D);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_kl_forward_cpu(const at::Tensor& student, const at::Tensor& values,
                                                       const at::Tensor& indices,
                                                       const std::optional<at::Tensor>& labels,
                                                       const at::Tensor& grad_scale, bool values_are_logits,
                                                       bool uniform_tail, double temperature, int64_t ignore_index,
                                                       bool need_grad, double s_scale, double s_cap,
                                                       bool bucket_tail) {
  TORCH_CHECK(student.device().is_cpu(), "topk_kl_forward_cpu: CPU tensors expected");
  const RowLayout ls = row_layout(student, "student");
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes() && values.size(0) == ls.rows,
              "topk_kl_forward_cpu: student rows [N, V] (or [B, L, V]), values and indices [N, k] expected");
  TORCH_CHECK(!(values_are_logits && (uniform_tail || bucket_tail)), "a uniform or bucket tail needs log-probabilities");
  TORCH_CHECK(!(uniform_tail && bucket_tail), "one tail: uniform or bucket");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const int64_t N = ls.rows, V = student.size(-1), k = values.size(1);
  TORCH_CHECK(k <= V, "k must be <= V");
  const bool fp64 = student.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  at::Tensor loss = new_output({N}, student.options().dtype(acc));
  at::Tensor grad = need_grad ? new_output({N, V}, student.options()) : at::Tensor();
  if (N == 0) return {loss, grad};
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor lab = labels.has_value() && labels->defined() ? labels->to(at::kLong).contiguous() : at::Tensor();
  // per row: b_k = values / T (k of them), then the raw values (k more, for the uniform tail's mass)
  const at::Tensor raw = values.to(acc);
  const at::Tensor b = at::cat({raw / temperature, raw}, 1).contiguous();
  const double g = grad_scale.to(at::kDouble).item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "topk_kl_forward_cpu", [&] {
    using TS = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<TS, double>, double, float>;
    const TS* s_base = student.data_ptr<TS>();
    TS* g_base = need_grad ? grad.data_ptr<TS>() : nullptr;
    const acc_t* b_base = b.data_ptr<acc_t>();
    const int64_t* idx_base = idx.data_ptr<int64_t>();
    const int64_t* lab_base = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    const Transform<acc_t> f(s_scale, s_cap);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch;  // the transformed row and its gradient, per thread
      for (int64_t r = begin; r < end; ++r) {
        TS* gs = g_base ? g_base + r * V : nullptr;
        if (lab_base && lab_base[r] == ignore_index) {
          loss_ptr[r] = 0;
          if (gs) std::fill(gs, gs + V, static_cast<TS>(0));
          continue;
        }
        const int64_t* ir = idx_base + r * k;
        if (std::any_of(ir, ir + k, [V](int64_t i) { return i < 0 || i >= V; })) {
          // an index outside [0, V) (unchecked under torch.compile): a NaN row, never a read past it
          loss_ptr[r] = std::numeric_limits<acc_t>::quiet_NaN();
          if (gs) std::fill(gs, gs + V, static_cast<TS>(std::numeric_limits<acc_t>::quiet_NaN()));
          continue;
        }
        const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
        if (f.identity()) {
          loss_ptr[r] = row<acc_t, TS>(s_base + ls.offset(r), V, b_base + r * 2 * k, ir, k, uniform_tail,
                                       bucket_tail, inv_t, static_cast<acc_t>(g), gs);
          continue;
        }
        scratch.resize(2 * V);
        acc_t *u = scratch.data(), *gu = u + V;
        transform_row<acc_t>(s_base + ls.offset(r), u, V, f);
        loss_ptr[r] = row<acc_t, acc_t>(u, V, b_base + r * 2 * k, ir, k, uniform_tail, bucket_tail, inv_t,
                                        static_cast<acc_t>(g), gs ? gu : nullptr);
        if (gs) chain_row<acc_t>(gu, u, gs, V, f);
      }
    });
  });
  return {loss, grad};
}

}  // namespace kdk
