// The vectorized sweeps over a stretch of logits that the CPU kernels share (softmax_kl.cpp,
// fused_linear_kl.cpp): loads and stores in the accumulation type, the online max / sum-of-
// exponentials pass, the JSD pass and the gradient pass, each over whole vectors with the partial
// last vector padded (Tail). The math is derived in the header comment of softmax_kl.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "../kdkernels.h"

namespace kdk {
namespace cpu {

using at::vec::Vectorized;

// fn(T{}) for the floating dtype st (float32, bfloat16, float16, float64); a TypeError naming
// `name` for any other.
template <typename F>
void dispatch_float(at::ScalarType st, const char* name, F&& fn) {
  switch (st) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble: return fn(double{});
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or float64, got ", st);
  }
}

// ---- loads and stores of one vector of logits / gradients in the accumulation type ---------
// VecIO<acc_t, T>::load(p) reads Vectorized<acc_t>::size() elements of type T; store writes them
// back in T (bfloat16: round to nearest even, NaN kept). Partial vectors go through Tail below.

template <typename acc_t, typename T>
struct VecIO {  // portable fallback
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static Vec load(const T* p) {
    alignas(64) acc_t b[W];
    for (int64_t k = 0; k < W; ++k) b[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(b);
  }
  static void store(T* p, const Vec& v) {
    alignas(64) acc_t b[W];
    v.store(b);
    for (int64_t k = 0; k < W; ++k) p[k] = static_cast<T>(b[k]);
  }
};

template <typename acc_t>
struct VecIO<acc_t, acc_t> {  // float -> float, double -> double: no conversion
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static Vec load(const acc_t* p) { return Vec::loadu(p); }
  static void store(acc_t* p, const Vec& v) { v.store(p); }
};

#if defined(CPU_CAPABILITY_AVX2) && defined(__F16C__)
template <>
struct VecIO<float, c10::BFloat16> {
  using Vec = Vectorized<float>;
  static constexpr int64_t W = 8;
  static Vec load(const c10::BFloat16* p) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
  }
  static void store(c10::BFloat16* p, const Vec& v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

template <>
struct VecIO<float, c10::Half> {
  using Vec = Vectorized<float>;
  static constexpr int64_t W = 8;
  static Vec load(const c10::Half* p) {
    return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(c10::Half* p, const Vec& v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};
#endif

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


// ---- the sweeps over a row --------------------------------------------------------------
// Each sweep is a plain loop over nvec whole vectors with its accumulators in local variables
// (registers). The last, partial vector of a row is copied into a W-element scratch padded with
// -inf (exp(-inf) = 0: padding adds nothing) and run through the same loop with nvec = 1.

template <typename acc_t>
struct RowConsts {
  Vectorized<acc_t> inv_t, ma, mb, mc, lse_a, lse_b, lse_c, beta, beta1, D, Ks, Kt, cs_s, cs_t, ce;
  acc_t ce_scale;
  bool ce_on, ce_own_lse, same_t, want_s, want_t;
};

template <typename acc_t>
struct Sums {
  Vectorized<acc_t> a, b, w, c;
};

template <typename acc_t, typename TS, typename TT>
void sweep_max(const TS* s, const TT* t, int64_t nvec, Vectorized<acc_t>& vma, Vectorized<acc_t>& vmb) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec ma = vma, mb = vmb;
  for (int64_t i = 0; i < nvec; ++i) {
    ma = at::vec::maximum(ma, VecIO<acc_t, TS>::load(s + i * W));  // NaN-propagating
    mb = at::vec::maximum(mb, VecIO<acc_t, TT>::load(t + i * W));
  }
  vma = ma;
  vmb = mb;
}

template <typename acc_t, Kind K, typename TS, typename TT>
void sweep_sums(const TS* s, const TT* t, int64_t nvec, const RowConsts<acc_t>& c, Sums<acc_t>& out,
                acc_t* cache_a = nullptr, acc_t* cache_b = nullptr) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec inv_t = c.inv_t, ma = c.ma, mb = c.mb, mc = c.mc;
  Vec va = out.a, vb = out.b, vw = out.w, vc = out.c;
  for (int64_t i = 0; i < nvec; ++i) {
    const Vec x = VecIO<acc_t, TS>::load(s + i * W), y = VecIO<acc_t, TT>::load(t + i * W);
    const Vec a = x * inv_t, b = y * inv_t;
    const Vec ea = vexp(a - ma), eb = vexp(b - mb);
    if (cache_a) {  // kept for pass 2, which then needs no exponentials and no second read of s, t
      ea.store(cache_a + i * W);
      eb.store(cache_b + i * W);
    }
    va = va + ea;
    vb = vb + eb;
    if (K == Kind::Forward) vw = at::vec::fmadd(eb, where_pos(eb, b - a), vw);  // sum e^(b-Mb) (b - a)
    if (K == Kind::Reverse) vw = at::vec::fmadd(ea, where_pos(ea, a - b), vw);  // sum e^(a-Ma) (a - b)
    if (c.ce_own_lse) vc = vc + vexp(x - mc);                                  // sum e^(s-Ms)
  }
  out.a = va;
  out.b = vb;
  out.w = vw;
  out.c = vc;
}

template <typename acc_t, typename TS, typename TT>
void sweep_jsd(const TS* s, const TT* t, int64_t nvec, const RowConsts<acc_t>& c, Sums<acc_t>& out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec inv_t = c.inv_t, lse_a = c.lse_a, lse_b = c.lse_b, beta = c.beta, beta1 = c.beta1;
  Vec ks = out.a, kt = out.b;
  for (int64_t i = 0; i < nvec; ++i) {
    const Vec lps = VecIO<acc_t, TS>::load(s + i * W) * inv_t - lse_a;
    const Vec lpt = VecIO<acc_t, TT>::load(t + i * W) * inv_t - lse_b;
    const Vec ps = vexp(lps), pt = vexp(lpt);
    const Vec lm = at::vec::fmadd(beta, pt, beta1 * ps).log();
    ks = at::vec::fmadd(ps, where_pos(ps, lps - lm), ks);  // KL(p_s || m)
    kt = at::vec::fmadd(pt, where_pos(pt, lpt - lm), kt);  // KL(p_t || m)
  }
  out.a = ks;
  out.b = kt;
}

// label_rel: the label's index relative to s (may lie outside [0, nvec W)).
template <typename acc_t, Kind K, typename TS, typename TT>
void sweep_grad(const TS* s, const TT* t, TS* gs, TT* gt, int64_t nvec, int64_t label_rel,
                const RowConsts<acc_t>& c) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec inv_t = c.inv_t, lse_a = c.lse_a, lse_b = c.lse_b, lse_c = c.lse_c, D = c.D;
  const Vec cs_s = c.cs_s, cs_t = c.cs_t, ce = c.ce;
  const bool want_s = c.want_s, want_t = c.want_t, ce_on = c.ce_on, same_t = c.same_t;
  for (int64_t i = 0; i < nvec; ++i) {
    const Vec x = VecIO<acc_t, TS>::load(s + i * W), y = VecIO<acc_t, TT>::load(t + i * W);
    const Vec lps = x * inv_t - lse_a, lpt = y * inv_t - lse_b;
    const Vec ps = vexp(lps), pt = vexp(lpt);
    Vec gsv(0), gtv(0);
    if (K == Kind::Forward) {
      gsv = cs_s * (ps - pt);                                     // (p_s - p_t) / T
      if (want_t) gtv = cs_t * pt * where_pos(pt, lpt - lps - D);  // p_t (log p_t - log p_s - D) / T
    } else if (K == Kind::Reverse) {
      if (want_s) gsv = cs_s * ps * where_pos(ps, lps - lpt - D);  // p_s (log p_s - log p_t - D) / T
      gtv = cs_t * (pt - ps);                                      // (p_t - p_s) / T
    } else {
      const Vec lm = at::vec::fmadd(c.beta, pt, c.beta1 * ps).log();
      if (want_s) gsv = cs_s * ps * where_pos(ps, lps - lm - c.Ks);  // (1 - beta) p_s (log p_s - log m - Ks) / T
      if (want_t) gtv = cs_t * pt * where_pos(pt, lpt - lm - c.Kt);  // beta p_t (log p_t - log m - Kt) / T
    }
    if (want_s) {
      if (ce_on) {
        gsv = at::vec::fmadd(ce, same_t ? ps : vexp(x - lse_c), gsv);  // + softmax(s)
        const int64_t lane = label_rel - i * W;
        if (lane >= 0 && lane < W) {  // - onehot(y)
          alignas(64) acc_t buf[W];
          gsv.store(buf);
          buf[lane] -= c.ce_scale;
          gsv = Vec::loadu(buf);
        }
      }
      VecIO<acc_t, TS>::store(gs + i * W, gsv);
    }
    if (want_t) VecIO<acc_t, TT>::store(gt + i * W, gtv);
  }
}

// Pass 2 of forward KL from the exponentials cached by pass 1 (student gradient only, CE at T = 1
// allowed): p_s = e_a exp(Ma_chunk - lse_a), p_t = e_b exp(Mb_chunk - lse_b), where Ma_chunk,
// Mb_chunk are the running maxima the chunk's exponentials were taken against.
// grad_s = cs (p_s - p_t) + ce (p_s - onehot) = fa e_a - fb e_b (- ce at the label).
template <typename acc_t, typename TS>
void sweep_grad_cached(const acc_t* ea, const acc_t* eb, TS* gs, int64_t nvec, int64_t label_rel, acc_t fa,
                       acc_t fb, acc_t ce_scale) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec va(fa), vb(fb);
  for (int64_t i = 0; i < nvec; ++i) {
    Vec g = Vec::loadu(ea + i * W) * va - Vec::loadu(eb + i * W) * vb;
    const int64_t lane = label_rel - i * W;
    if (lane >= 0 && lane < W) {  // - onehot(y)
      alignas(64) acc_t buf[W];
      g.store(buf);
      buf[lane] -= ce_scale;
      g = Vec::loadu(buf);
    }
    VecIO<acc_t, TS>::store(gs + i * W, g);
  }
}

// The last partial vector [j, j + cnt) of a row, padded with -inf.
template <typename acc_t, typename TS, typename TT>
struct Tail {
  static constexpr int64_t W = Vectorized<acc_t>::size();
  TS s[W];
  TT t[W];
  TS gs[W];
  TT gt[W];
  Tail(const TS* src_s, const TT* src_t, int64_t cnt) {
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    for (int64_t k = 0; k < W; ++k) {
      s[k] = k < cnt ? src_s[k] : static_cast<TS>(-inf);
      t[k] = k < cnt ? src_t[k] : static_cast<TT>(-inf);
    }
  }
};

}  // namespace cpu
}  // namespace kdk
