// Fused softmax-KL distillation loss on the CPU: loss and gradients in one sweep per row.
//
// Per row, with a = s / T and b = t / T (student and teacher logits, V entries):
//   p_s = softmax(a), p_t = softmax(b), lse_a = logsumexp(a), lse_b = logsumexp(b)
//   forward  D = KL(p_t || p_s) = sum p_t (b - a) - lse_b + lse_a
//            dD/ds = (p_s - p_t) / T
//            dD/dt = p_t (log p_t - log p_s - D) / T
//   reverse  D = KL(p_s || p_t) = sum p_s (a - b) - lse_a + lse_b
//            dD/ds = p_s (log p_s - log p_t - D) / T
//            dD/dt = (p_t - p_s) / T
//   jsd      m = beta p_t + (1 - beta) p_s, Ks = KL(p_s || m), Kt = KL(p_t || m)
//            D = beta Kt + (1 - beta) Ks
//            dD/ds = (1 - beta) p_s (log p_s - log m - Ks) / T
//            dD/dt = beta p_t (log p_t - log m - Kt) / T
//   hard-label CE at temperature 1: CE = logsumexp(s) - s[y], dCE/ds = softmax(s) - onehot(y)
//   logit transforms (scale k, soft-cap c, before the temperature): s, t above are u = c tanh(k z / c)
//            (u = k z without a cap) of the raw logits z; dL/dz = dL/du k (1 - (u / c)^2). A row
//            with a transform is transformed into a per-thread scratch of V floats per side first
//            (one more sweep, from cache), and its gradients chained through f at the end.
//   row loss = ce_weight CE + kd_weight D; gradients are scaled by grad_scale (1/rows for "mean").
//
// Memory: pass 1 sweeps each row in chunks of kChunk logits: the chunk's max (first read, from
// DRAM), then its exponentials (second read, from L1), one exp per logit, the running sums rescaled
// only when a chunk raises the max. It also accumulates sum e^(b-Mb) (b - a) (forward) or
// sum e^(a-Ma) (a - b) (reverse), so the loss is known after one read of the row from DRAM. Pass 2
// writes the gradients: for forward KL with a frozen teacher (the common training call) from the
// exponentials pass 1 left in a per-thread scratch of 2 V floats (two multiplies per logit, no
// second read of the logits); otherwise it reads the row again (from L2/L3: a 128k-logit fp32 row
// pair is 1 MiB) and recomputes them.
// "jsd" needs Ks and Kt before its gradient and adds one more sweep; so do the skew KL and TVD
// (their two row sums K1, K2: sweeps.h sweep_pair, derived in kdkernels/_core/divergences.py). DRAM traffic per logit:
// read student + read teacher + write each requested gradient; nothing of size N x V is allocated
// besides the gradients.
//
// 0 log 0 = 0 everywhere (where-guards on p > 0), so -inf logits are legal. A NaN anywhere in a
// row makes that row's loss and gradients NaN, and so does a cross-entropy label outside [0, V)
// that is not ignore_index (the Python-side range check does not run under torch.compile).

#include "../kdkernels.h"
#include "sweeps.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdk {

const char* cpu_simd() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "generic";
#endif
}

namespace {
std::atomic<bool> g_poison_outputs{false};
}  // namespace

void set_poison_outputs(bool on) { g_poison_outputs.store(on); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (g_poison_outputs.load()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A gradient buffer is fresh memory that the kernel writes once, front to back: ask for
  // transparent huge pages before the first touch, so it takes one page fault per 2 MiB instead
  // of one per 4 KiB (faults dominate the cost of a new buffer on virtualized hosts).
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (options.device().is_cpu() && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory: failure is harmless
  }
#endif
  return out;
}

namespace {

using at::vec::Vectorized;
using namespace kdk::cpu;

constexpr int64_t kChunk = 2048;

template <typename acc_t>
struct Params {
  acc_t inv_t, temp, beta, ce_weight, kd_weight, grad_scale;
  int64_t ignore_index;
  bool same_t, ce, kd, grad_s, grad_t;
};

// One row: pass 1 (online normalizers and the loss), "jsd": one more sweep, pass 2 (gradients).
template <typename acc_t, Kind K, typename TS, typename TT>
acc_t row_loss_and_grad(const TS* s, const TT* t, int64_t V, int64_t label, TS* gs, TT* gt,
                        const Params<acc_t>& p, std::vector<acc_t>& scratch) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t V_full = V / W * W, rem = V - V_full;
  Tail<acc_t, TS, TT> tail(s + V_full, t + V_full, rem);  // its gs/gt take pass 2's last vector
  // Forward KL with only the student gradient (the common case) keeps pass 1's exponentials in a
  // per-thread scratch of 2 V + O(V / kChunk) values, so pass 2 is two multiplies per logit.
  const bool cached = K == Kind::Forward && p.grad_s && !p.grad_t && !(p.ce && !p.same_t) && p.kd;
  const int64_t n_chunks = (V + kChunk - 1) / kChunk, V_pad = V_full + (rem ? W : 0);
  acc_t *cache_a = nullptr, *cache_b = nullptr, *chunk_ma = nullptr, *chunk_mb = nullptr;
  if (cached) {
    scratch.resize(2 * V_pad + 2 * n_chunks);
    cache_a = scratch.data();
    cache_b = cache_a + V_pad;
    chunk_ma = cache_b + V_pad;
    chunk_mb = chunk_ma + n_chunks;
  }

  RowConsts<acc_t> c;
  c.inv_t = Vec(p.inv_t);
  c.ce_on = p.ce;
  c.ce_own_lse = p.ce && !p.same_t;
  c.same_t = p.same_t;
  c.want_s = p.grad_s;
  c.want_t = p.grad_t;

  // ---- pass 1: max, normalizers and the linear term of the loss, online over chunks ----
  // the running sums in double (float32 lanes within a chunk, sweep_sums): D is a difference of
  // terms near lse, where float32 totals cost 1e-6 relative
  acc_t Ma = -kInf, Mb = -kInf;
  double za = 0, zb = 0, w = 0, zc = 0;
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    const int64_t nvec = n / W;
    const bool has_tail = off + n == V && rem > 0;
    Vec vma(-kInf), vmb(-kInf);  // the chunk's maxima, then one rescale per chunk
    sweep_max<acc_t>(s + off, t + off, nvec, vma, vmb);
    if (has_tail) sweep_max<acc_t>(tail.s, tail.t, 1, vma, vmb);
    const acc_t cma = hmax(vma) * p.inv_t, cmb = hmax(vmb) * p.inv_t;
    if (std::isnan(cma) || std::isnan(cmb)) {  // NaN in the row: its loss and gradients are NaN
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      if (p.grad_s) std::fill(gs, gs + V, static_cast<TS>(nan));
      if (p.grad_t) std::fill(gt, gt + V, static_cast<TT>(nan));
      return nan;
    }
    if (cma > Ma) {  // the chunk raised the running max: rescale what was summed so far
      const double f = std::exp(double(Ma) - double(cma));
      if (c.ce_own_lse) zc *= std::exp((double(Ma) - double(cma)) * double(p.temp));
      za *= f;
      if (K == Kind::Reverse) w *= f;
      Ma = cma;
    }
    if (cmb > Mb) {
      const double f = std::exp(double(Mb) - double(cmb));
      zb *= f;
      if (K == Kind::Forward) w *= f;
      Mb = cmb;
    }
    c.ma = Vec(Ma == -kInf ? acc_t(0) : Ma);  // an all -inf prefix must not give -inf - -inf
    c.mb = Vec(Mb == -kInf ? acc_t(0) : Mb);
    c.mc = Vec(Ma == -kInf ? acc_t(0) : Ma * p.temp);
    Sums<acc_t> sums{Vec(0), Vec(0), Vec(0), Vec(0)};
    if (cached) {
      chunk_ma[off / kChunk] = Ma;
      chunk_mb[off / kChunk] = Mb;
      sweep_sums<acc_t, K>(s + off, t + off, nvec, c, sums, cache_a + off, cache_b + off);
      if (has_tail) sweep_sums<acc_t, K>(tail.s, tail.t, 1, c, sums, cache_a + V_full, cache_b + V_full);
    } else {
      sweep_sums<acc_t, K>(s + off, t + off, nvec, c, sums);
      if (has_tail) sweep_sums<acc_t, K>(tail.s, tail.t, 1, c, sums);
    }
    za += hsum_wide(sums.a);
    zb += hsum_wide(sums.b);
    w += hsum_wide(sums.w);
    if (c.ce_own_lse) zc += hsum_wide(sums.c);
  }

  const acc_t lse_a = static_cast<acc_t>(double(Ma) + std::log(za));
  const acc_t lse_b = static_cast<acc_t>(double(Mb) + std::log(zb));
  const acc_t lse_c = p.same_t ? lse_a : static_cast<acc_t>(double(Ma) * double(p.temp) + std::log(zc));
  c.lse_a = Vec(lse_a);
  c.lse_b = Vec(lse_b);
  c.lse_c = Vec(lse_c);
  c.beta = Vec(p.beta);
  c.beta1 = Vec(acc_t(1) - p.beta);

  // ---- the divergence ----
  acc_t D = 0, Ks = 0, Kt = 0;
  // (lse_b - lse_a) grouped as (Mb - Ma) + log(zb / za): no cancellation of the maxima
  const double dm = double(Mb) - double(Ma), dl = std::log(zb) - std::log(za);
  if (K == Kind::Forward) D = static_cast<acc_t>(w / zb - (dm + dl));
  if (K == Kind::Reverse) D = static_cast<acc_t>(w / za + (dm + dl));
  if (second_sweep(K)) {  // K1, K2 need the normalizers of both rows: one more sweep
    Sums<acc_t> k{Vec(0), Vec(0), Vec(0), Vec(0)};
    sweep_pair<acc_t, K>(s, t, V_full / W, c, k);
    if (rem) sweep_pair<acc_t, K>(tail.s, tail.t, 1, c, k);
    Ks = hsum(k.a);
    Kt = hsum(k.b);
    D = pair_value<acc_t, K>(Ks, Kt, p.beta);
  }
  const acc_t ce_loss = p.ce ? lse_c - static_cast<acc_t>(s[label]) : acc_t(0);
  const acc_t loss = (p.ce ? p.ce_weight * ce_loss : acc_t(0)) + (p.kd ? p.kd_weight * D : acc_t(0));
  if (!p.grad_s && !p.grad_t) return loss;

  // ---- pass 2: gradients, written in the inputs' dtypes ----
  const acc_t cs = p.kd ? p.grad_scale * p.kd_weight * p.inv_t : acc_t(0);
  c.cs_s = Vec(K == Kind::JSD ? cs * (acc_t(1) - p.beta) : (K == Kind::TVD ? cs * acc_t(0.5) : cs));
  c.cs_t = Vec(K == Kind::JSD ? cs * p.beta : (K == Kind::TVD ? cs * acc_t(0.5) : cs));
  c.ce_scale = p.grad_scale * p.ce_weight;
  c.ce = Vec(c.ce_scale);
  c.D = Vec(D);
  c.Ks = Vec(Ks);
  c.Kt = Vec(Kt);
  const int64_t lab = p.ce ? label : -1;
  if (cached) {
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off), k = off / kChunk;
      // a running max that was still -inf means every exponential of that chunk is 0
      const acc_t ua = chunk_ma[k] == -kInf ? acc_t(0) : std::exp(chunk_ma[k] - lse_a);
      const acc_t ub = chunk_mb[k] == -kInf ? acc_t(0) : std::exp(chunk_mb[k] - lse_b);
      const acc_t fa = (cs + c.ce_scale) * ua, fb = cs * ub;
      sweep_grad_cached<acc_t>(cache_a + off, cache_b + off, gs + off, n / W, lab - off, fa, fb, c.ce_scale);
      if (off + n == V && rem) {
        alignas(64) TS out[W];
        sweep_grad_cached<acc_t>(cache_a + V_full, cache_b + V_full, out, 1, lab - V_full, fa, fb, c.ce_scale);
        std::copy(out, out + rem, gs + V_full);
      }
    }
    return loss;
  }
  sweep_grad<acc_t, K>(s, t, gs, gt, V_full / W, lab, c);
  if (rem) {
    sweep_grad<acc_t, K>(tail.s, tail.t, tail.gs, tail.gt, 1, p.ce ? label - V_full : -1, c);
    if (p.grad_s) std::copy(tail.gs, tail.gs + rem, gs + V_full);
    if (p.grad_t) std::copy(tail.gt, tail.gt + rem, gt + V_full);
  }
  return loss;
}

// A row with a logit transform (logit scale, soft-cap; see the header): the transformed row u = f(z)
// in the accumulation type in a per-thread scratch, the untransformed kernel on it, and the gradient
// chained through f from u itself: df/dz = scale (1 - (u / cap)^2), or scale without a cap.
template <typename acc_t, Kind K, typename TS, typename TT>
acc_t row_transformed(const TS* s, const TT* t, int64_t V, int64_t label, TS* gs, TT* gt, const Params<acc_t>& p,
                      const Transform<acc_t>& fs, const Transform<acc_t>& ft, std::vector<acc_t>& rows,
                      std::vector<acc_t>& scratch) {
  rows.resize(4 * V);
  acc_t *us = rows.data(), *ut = us + V, *gus = ut + V, *gut = gus + V;
  transform_row<acc_t>(s, us, V, fs);
  transform_row<acc_t>(t, ut, V, ft);
  const acc_t loss = row_loss_and_grad<acc_t, K, acc_t, acc_t>(us, ut, V, label, p.grad_s ? gus : nullptr,
                                                                p.grad_t ? gut : nullptr, p, scratch);
  if (p.grad_s) chain_row<acc_t>(gus, us, gs, V, fs);
  if (p.grad_t) chain_row<acc_t>(gut, ut, gt, V, ft);
  return loss;
}

template <typename acc_t, Kind K, typename TS, typename TT>
void run_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& loss,
              at::Tensor& grad_s, at::Tensor& grad_t, const Params<acc_t>& p, const Transform<acc_t>& fs,
              const Transform<acc_t>& ft) {
  const RowLayout ls = row_layout(student, "student"), lt = row_layout(teacher, "teacher");
  const int64_t N = ls.rows, V = student.size(-1);
  const TS* s_base = student.data_ptr<TS>();
  const TT* t_base = teacher.data_ptr<TT>();
  TS* gs_base = p.grad_s ? grad_s.data_ptr<TS>() : nullptr;
  TT* gt_base = p.grad_t ? grad_t.data_ptr<TT>() : nullptr;
  acc_t* loss_ptr = loss.data_ptr<acc_t>();

  const bool transformed = !fs.identity() || !ft.identity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch, rows;  // per thread, see row_loss_and_grad and row_transformed
    for (int64_t r = begin; r < end; ++r) {
      TS* gs = gs_base ? gs_base + r * V : nullptr;
      TT* gt = gt_base ? gt_base + r * V : nullptr;
      const int64_t label = labels ? labels[r] : 0;
      if (labels && label == p.ignore_index) {  // ignored row: no arithmetic, zero gradient
        loss_ptr[r] = 0;
        if (gs) std::memset(static_cast<void*>(gs), 0, V * sizeof(TS));
        if (gt) std::memset(static_cast<void*>(gt), 0, V * sizeof(TT));
        continue;
      }
      if (p.ce && (label < 0 || label >= V)) {  // a label out of range (unchecked under torch.compile):
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();  // a NaN row, never a read past it
        loss_ptr[r] = nan;
        if (gs) std::fill(gs, gs + V, static_cast<TS>(nan));
        if (gt) std::fill(gt, gt + V, static_cast<TT>(nan));
        continue;
      }
      if (transformed) {
        loss_ptr[r] = row_transformed<acc_t, K, TS, TT>(s_base + ls.offset(r), t_base + lt.offset(r), V, label, gs,
                                                        gt, p, fs, ft, rows, scratch);
      } else {
        loss_ptr[r] = row_loss_and_grad<acc_t, K, TS, TT>(s_base + ls.offset(r), t_base + lt.offset(r), V, label,
                                                           gs, gt, p, scratch);
      }
    }
  });
}


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, int64_t kind, double beta, int64_t ignore_index,
    double ce_weight, double kd_weight, bool need_grad_student, bool need_grad_teacher, double s_scale, double s_cap,
    double t_scale, double t_cap) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "softmax_kl_forward_cpu: CPU tensors expected");
  TORCH_CHECK(s_scale > 0 && t_scale > 0 && s_cap >= 0 && t_cap >= 0, "logit scales must be > 0 and soft-caps >= 0");
  const RowLayout ls = row_layout(student, "student"), lt = row_layout(teacher, "teacher");
  TORCH_CHECK(ls.rows == lt.rows && student.size(-1) == teacher.size(-1),
              "student and teacher must hold the same [N, V] rows, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  TORCH_CHECK(kind >= 0 && kind <= 5, "kind must be 0 (forward), 1 (reverse), 2 (jsd), 3 (skew forward), "
              "4 (skew reverse) or 5 (tvd)");
  TORCH_CHECK(kind < 2 || kind > 4 || (beta > 0 && beta < 1), "jsd and the skew KL need 0 < beta < 1");
  const bool is_double = student.scalar_type() == at::kDouble;
  TORCH_CHECK(is_double == (teacher.scalar_type() == at::kDouble),
              "float64 student and teacher go together; cast both");
  const int64_t N = ls.rows, V = student.size(-1);
  const int64_t* label_ptr = nullptr;
  at::Tensor labels_c;
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == N,
                "labels must be int64 [N]");
    labels_c = labels->contiguous();
    label_ptr = labels_c.data_ptr<int64_t>();
  }
  TORCH_CHECK(ce_weight == 0 || label_ptr != nullptr, "ce_weight > 0 needs labels");

  const auto acc_type = is_double ? at::kDouble : at::kFloat;
  at::Tensor loss = new_output({N}, student.options().dtype(acc_type));
  at::Tensor grad_s = need_grad_student ? new_output({N, V}, student.options()) : at::Tensor();
  at::Tensor grad_t = need_grad_teacher ? new_output({N, V}, teacher.options()) : at::Tensor();
  if (N == 0) return {loss, grad_s, grad_t};
  TORCH_CHECK(V > 0, "the vocabulary (last) dimension must be non-empty");

  const double scale = grad_scale.to(at::kDouble).item<double>();
  dispatch_float(student.scalar_type(), "student", [&](auto s_tag) {
    dispatch_float(teacher.scalar_type(), "teacher", [&](auto t_tag) {
      using TS = decltype(s_tag);
      using TT = decltype(t_tag);
      if constexpr (std::is_same_v<TS, double> == std::is_same_v<TT, double>) {
        using acc_t = std::conditional_t<std::is_same_v<TS, double>, double, float>;
        Params<acc_t> p;
        p.inv_t = static_cast<acc_t>(1.0 / temperature);
        p.temp = static_cast<acc_t>(temperature);
        p.beta = static_cast<acc_t>(beta);
        p.ce_weight = static_cast<acc_t>(ce_weight);
        p.kd_weight = static_cast<acc_t>(kd_weight);
        p.grad_scale = static_cast<acc_t>(scale);
        p.ignore_index = ignore_index;
        p.same_t = temperature == 1.0;
        p.ce = ce_weight != 0;
        p.kd = kd_weight != 0;
        p.grad_s = need_grad_student;
        p.grad_t = need_grad_teacher;
        const cpu::Transform<acc_t> fs(s_scale, s_cap), ft(t_scale, t_cap);
        switch (static_cast<Kind>(kind)) {
          case Kind::Forward: run_rows<acc_t, Kind::Forward, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
          case Kind::Reverse: run_rows<acc_t, Kind::Reverse, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
          case Kind::JSD: run_rows<acc_t, Kind::JSD, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
          case Kind::SkewForward: run_rows<acc_t, Kind::SkewForward, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
          case Kind::SkewReverse: run_rows<acc_t, Kind::SkewReverse, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
          case Kind::TVD: run_rows<acc_t, Kind::TVD, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p, fs, ft); break;
        }
      }
    });
  });
  return {loss, grad_s, grad_t};
}

}  // namespace kdk
