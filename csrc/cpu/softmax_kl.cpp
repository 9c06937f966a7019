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
//   row loss = ce_weight CE + kd_weight D; gradients are scaled by grad_scale (1/rows for "mean").
//
// Memory: each row is swept in chunks of kChunk logits converted to the accumulation type in
// L1-resident buffers. Pass 1 keeps a running max per chunk (one exp per logit, sums rescaled
// only when a chunk raises the max) and accumulates sum e^(b-Mb) (b - a) (forward) or
// sum e^(a-Ma) (a - b) (reverse), so the loss is known after one read of the row. Pass 2 reads
// the row again (from L2/L3: a 128k-logit fp32 row pair is 1 MiB) and writes the gradients.
// "jsd" needs Ks and Kt before its gradient and adds one more sweep. DRAM traffic per logit:
// read student + read teacher + write each requested gradient; nothing of size N x V is allocated
// besides the gradients.
//
// 0 log 0 = 0 everywhere (where-guards on p > 0), so -inf logits are legal. A NaN anywhere in a
// row makes that row's loss and gradients NaN.

#include "../kdkernels.h"

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

constexpr int64_t kChunk = 2048;

// ---- conversion of a chunk of logits into the accumulation type, and back ------------------

template <typename acc_t, typename T>
inline void load_chunk(const T* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

inline void load_chunk(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void load_chunk(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename acc_t, typename T>
inline void store_chunk(const acc_t* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

inline void store_chunk(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

// Round to nearest even, NaN stays NaN; written branch-free so the loop vectorizes.
inline void store_chunk(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
  }
}

inline void store_chunk(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// ---- vector math -------------------------------------------------------------------------

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// x where p > 0, else 0 (the 0 log 0 = 0 guard).
template <typename acc_t>
inline Vectorized<acc_t> where_pos(const Vectorized<acc_t>& p, const Vectorized<acc_t>& x) {
  return Vectorized<acc_t>::blendv(Vectorized<acc_t>(acc_t(0)), x, p > Vectorized<acc_t>(acc_t(0)));
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t r = 0;
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) r += buf[k];
  return r;
}

// Horizontal max that keeps a NaN (at::vec::maximum propagates NaN lane-wise).
template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t r = -std::numeric_limits<acc_t>::infinity();
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) {
    if (buf[k] != buf[k] || buf[k] > r) r = buf[k];
  }
  return r;
}

template <typename acc_t>
struct Params {
  acc_t inv_t, temp, beta, ce_weight, kd_weight, grad_scale;
  int64_t ignore_index;
  bool same_t, ce, kd, grad_s, grad_t;
};

// One row. A, B, GA, GB are kChunk + vector-width scratch buffers owned by the calling thread.
template <typename acc_t, Kind K, typename TS, typename TT>
acc_t row_loss_and_grad(const TS* s, const TT* t, int64_t V, int64_t label, TS* gs, TT* gt,
                        const Params<acc_t>& p, acc_t* A, acc_t* B, acc_t* GA, acc_t* GB) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const Vec inv_t(p.inv_t), zero(acc_t(0));

  auto load = [&](int64_t off, int64_t n) {
    load_chunk(s + off, A, n);
    load_chunk(t + off, B, n);
    const int64_t nr = (n + W - 1) / W * W;
    for (int64_t i = n; i < nr; ++i) A[i] = B[i] = -kInf;  // padding contributes exp(-inf) = 0
    return nr;
  };

  // ---- pass 1: max, normalizers and the linear term of the loss, online over chunks ----
  acc_t Ma = -kInf, Mb = -kInf, za = 0, zb = 0, w = 0, zc = 0;
  bool has_nan = false;
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    const int64_t nr = load(off, n);
    Vec vma(-kInf), vmb(-kInf);
    for (int64_t i = 0; i < nr; i += W) {
      vma = at::vec::maximum(vma, Vec::loadu(A + i));
      vmb = at::vec::maximum(vmb, Vec::loadu(B + i));
    }
    const acc_t cma = hmax(vma) * p.inv_t, cmb = hmax(vmb) * p.inv_t;
    if (std::isnan(cma) || std::isnan(cmb)) {
      has_nan = true;
      break;
    }
    if (cma > Ma) {  // a chunk raised the running max: rescale what was summed so far
      const acc_t f = std::exp(Ma - cma);
      if (p.ce && !p.same_t) zc *= std::exp((Ma - cma) * p.temp);
      za *= f;
      if (K == Kind::Reverse) w *= f;
      Ma = cma;
    }
    if (cmb > Mb) {
      const acc_t f = std::exp(Mb - cmb);
      zb *= f;
      if (K == Kind::Forward) w *= f;
      Mb = cmb;
    }
    const Vec ma(Ma == -kInf ? acc_t(0) : Ma), mb(Mb == -kInf ? acc_t(0) : Mb);
    const Vec mc(Ma == -kInf ? acc_t(0) : Ma * p.temp);
    Vec va(0), vb(0), vw(0), vc(0);
    for (int64_t i = 0; i < nr; i += W) {
      const Vec x = Vec::loadu(A + i), a = x * inv_t, b = Vec::loadu(B + i) * inv_t;
      const Vec ea = vexp(a - ma), eb = vexp(b - mb);
      va = va + ea;
      vb = vb + eb;
      if (K == Kind::Forward) vw = at::vec::fmadd(eb, where_pos(eb, b - a), vw);
      if (K == Kind::Reverse) vw = at::vec::fmadd(ea, where_pos(ea, a - b), vw);
      if (p.ce && !p.same_t) vc = vc + vexp(x - mc);
    }
    za += hsum(va);
    zb += hsum(vb);
    w += hsum(vw);
    if (p.ce && !p.same_t) zc += hsum(vc);
  }

  if (has_nan) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off);
      std::fill(GA, GA + n, nan);
      if (p.grad_s) store_chunk(GA, gs + off, n);
      if (p.grad_t) store_chunk(GA, gt + off, n);
    }
    return nan;
  }

  const acc_t lse_a = Ma + std::log(za), lse_b = Mb + std::log(zb);
  const acc_t lse_c = p.same_t ? lse_a : Ma * p.temp + std::log(zc);
  const Vec vlse_a(lse_a), vlse_b(lse_b), vlse_c(lse_c);
  const Vec vbeta(p.beta), vbeta1(acc_t(1) - p.beta);

  // ---- the divergence ----
  acc_t D = 0, Ks = 0, Kt = 0;
  // (lse_b - lse_a) grouped as (Mb - Ma) + log(zb / za): no cancellation of the maxima
  if (K == Kind::Forward) D = w / zb - ((Mb - Ma) + (std::log(zb) - std::log(za)));
  if (K == Kind::Reverse) D = w / za - ((Ma - Mb) + (std::log(za) - std::log(zb)));
  if (K == Kind::JSD) {  // needs the normalizers of both rows: one more sweep
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t nr = load(off, std::min(kChunk, V - off));
      Vec vks(0), vkt(0);
      for (int64_t i = 0; i < nr; i += W) {
        const Vec lps = Vec::loadu(A + i) * inv_t - vlse_a, lpt = Vec::loadu(B + i) * inv_t - vlse_b;
        const Vec ps = vexp(lps), pt = vexp(lpt);
        const Vec lm = at::vec::fmadd(vbeta, pt, vbeta1 * ps).log();
        vks = at::vec::fmadd(ps, where_pos(ps, lps - lm), vks);
        vkt = at::vec::fmadd(pt, where_pos(pt, lpt - lm), vkt);
      }
      Ks += hsum(vks);
      Kt += hsum(vkt);
    }
    D = p.beta * Kt + (acc_t(1) - p.beta) * Ks;
  }
  const acc_t ce = p.ce ? lse_c - static_cast<acc_t>(s[label]) : acc_t(0);
  const acc_t loss = (p.ce ? p.ce_weight * ce : acc_t(0)) + (p.kd ? p.kd_weight * D : acc_t(0));
  if (!p.grad_s && !p.grad_t) return loss;

  // ---- pass 2: gradients ----
  const acc_t cs = p.kd ? p.grad_scale * p.kd_weight * p.inv_t : acc_t(0);
  const Vec vcs_s(K == Kind::JSD ? cs * (acc_t(1) - p.beta) : cs), vcs_t(K == Kind::JSD ? cs * p.beta : cs);
  const Vec vce(p.grad_scale * p.ce_weight), vD(D), vKs(Ks), vKt(Kt);
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    const int64_t nr = load(off, n);
    for (int64_t i = 0; i < nr; i += W) {
      const Vec x = Vec::loadu(A + i);
      const Vec lps = x * inv_t - vlse_a, lpt = Vec::loadu(B + i) * inv_t - vlse_b;
      const Vec ps = vexp(lps), pt = vexp(lpt);
      Vec gsv(0), gtv(0);
      if (K == Kind::Forward) {
        gsv = vcs_s * (ps - pt);                                        // (p_s - p_t) / T
        if (p.grad_t) gtv = vcs_t * pt * where_pos(pt, lpt - lps - vD);  // p_t (log p_t - log p_s - D) / T
      } else if (K == Kind::Reverse) {
        gsv = vcs_s * ps * where_pos(ps, lps - lpt - vD);  // p_s (log p_s - log p_t - D) / T
        gtv = vcs_t * (pt - ps);                           // (p_t - p_s) / T
      } else {
        const Vec lm = at::vec::fmadd(vbeta, pt, vbeta1 * ps).log();
        gsv = vcs_s * ps * where_pos(ps, lps - lm - vKs);  // (1 - beta) p_s (log p_s - log m - Ks) / T
        if (p.grad_t) gtv = vcs_t * pt * where_pos(pt, lpt - lm - vKt);  // beta p_t (log p_t - log m - Kt) / T
      }
      if (p.ce) gsv = at::vec::fmadd(vce, p.same_t ? ps : vexp(x - vlse_c), gsv);  // softmax(s)
      if (p.grad_s) gsv.store(GA + i);
      if (p.grad_t) gtv.store(GB + i);
    }
    if (p.ce && label >= off && label < off + n) GA[label - off] -= p.grad_scale * p.ce_weight;  // - onehot(y)
    if (p.grad_s) store_chunk(GA, gs + off, n);
    if (p.grad_t) store_chunk(GB, gt + off, n);
  }
  return loss;
}

template <typename acc_t, Kind K, typename TS, typename TT>
void run_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& loss,
              at::Tensor& grad_s, at::Tensor& grad_t, const Params<acc_t>& p) {
  const int64_t N = student.size(0), V = student.size(1);
  const TS* s_base = student.data_ptr<TS>();
  const TT* t_base = teacher.data_ptr<TT>();
  const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
  TS* gs_base = p.grad_s ? grad_s.data_ptr<TS>() : nullptr;
  TT* gt_base = p.grad_t ? grad_t.data_ptr<TT>() : nullptr;
  acc_t* loss_ptr = loss.data_ptr<acc_t>();

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBuf = kChunk + 64;
    alignas(64) acc_t A[kBuf], B[kBuf], GA[kBuf], GB[kBuf];
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
      loss_ptr[r] = row_loss_and_grad<acc_t, K, TS, TT>(s_base + r * s_stride, t_base + r * t_stride, V, label,
                                                         gs, gt, p, A, B, GA, GB);
    }
  });
}

template <typename F>
void dispatch_float(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or float64, got ", st);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, int64_t kind, double beta, int64_t ignore_index,
    double ce_weight, double kd_weight, bool need_grad_student, bool need_grad_teacher) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "softmax_kl_forward_cpu: CPU tensors expected");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && student.sizes() == teacher.sizes(),
              "student and teacher must be [N, V] of the same shape, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(1) == 0 || (student.stride(1) == 1 && teacher.stride(1) == 1),
              "the last dimension of student and teacher must be contiguous");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (forward), 1 (reverse) or 2 (jsd)");
  TORCH_CHECK(kind != 2 || (beta > 0 && beta < 1), "jsd needs 0 < beta < 1");
  const bool is_double = student.scalar_type() == at::kDouble;
  TORCH_CHECK(is_double == (teacher.scalar_type() == at::kDouble),
              "float64 student and teacher go together; cast both");
  const int64_t N = student.size(0), V = student.size(1);
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
        switch (static_cast<Kind>(kind)) {
          case Kind::Forward: run_rows<acc_t, Kind::Forward, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p); break;
          case Kind::Reverse: run_rows<acc_t, Kind::Reverse, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p); break;
          case Kind::JSD: run_rows<acc_t, Kind::JSD, TS, TT>(student, teacher, label_ptr, loss, grad_s, grad_t, p); break;
        }
      }
    });
  });
  return {loss, grad_s, grad_t};
}

}  // namespace kdk
