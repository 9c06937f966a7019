// The vectorized sweeps over a stretch of logits that the CPU kernels share (softmax_kl.cpp,
// fused_linear_kl.cpp): loads and stores in the accumulation type, the online max / sum-of-
// exponentials pass, the second pass of JSD / skew KL / TVD and the gradient pass, each over whole vectors with the partial
// last vector padded (Tail). The math is derived in the header comment of softmax_kl.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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

// The lanes' sum in double (a row's normalizers, carried across chunks at double precision).
template <typename acc_t>
inline double hsum_wide(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  double r = 0;
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) r += static_cast<double>(buf[k]);
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

// sum += x with Kahan's compensation comp (the negated low part of sum that did not fit)
template <typename acc_t>
inline void kahan_add(Vectorized<acc_t>& sum, Vectorized<acc_t>& comp, const Vectorized<acc_t>& x) {
  const Vectorized<acc_t> y = x - comp, t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// The normalizers (and KL's linear term w) of a run of vectors. Blocks of kSumBlock vectors are
// summed in fresh accumulators and each block's sum is added to the running one with Kahan's
// compensation, so the rounding error grows with kSumBlock instead of the run's length: a forward
// KL of 16 nats is w / zb - lse_b + lse_a with w / zb near 20, where a relative error of 1e-6 in
// zb or w (a plain float32 sum of 256 terms per lane) is 2e-5 in D and in the teacher's gradient.
constexpr int64_t kSumBlock = 8;

template <typename acc_t, Kind K, typename TS, typename TT>
void sweep_sums(const TS* s, const TT* t, int64_t nvec, const RowConsts<acc_t>& c, Sums<acc_t>& out,
                acc_t* cache_a = nullptr, acc_t* cache_b = nullptr) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec inv_t = c.inv_t, ma = c.ma, mb = c.mb, mc = c.mc;
  Vec va = out.a, vb = out.b, vw = out.w, vc = out.c;
  Vec ca(acc_t(0)), cb(acc_t(0)), cw(acc_t(0)), cc(acc_t(0));
  for (int64_t i0 = 0; i0 < nvec; i0 += kSumBlock) {
    const int64_t i1 = std::min(nvec, i0 + kSumBlock);
    Vec ba(acc_t(0)), bb(acc_t(0)), bw(acc_t(0)), bc(acc_t(0));
    for (int64_t i = i0; i < i1; ++i) {
      const Vec x = VecIO<acc_t, TS>::load(s + i * W), y = VecIO<acc_t, TT>::load(t + i * W);
      const Vec a = x * inv_t, b = y * inv_t;
      const Vec ea = vexp(a - ma), eb = vexp(b - mb);
      if (cache_a) {  // kept for pass 2, which then needs no exponentials and no second read of s, t
        ea.store(cache_a + i * W);
        eb.store(cache_b + i * W);
      }
      ba = ba + ea;
      bb = bb + eb;
      if (K == Kind::Forward) bw = at::vec::fmadd(eb, where_pos(eb, b - a), bw);  // sum e^(b-Mb) (b - a)
      if (K == Kind::Reverse) bw = at::vec::fmadd(ea, where_pos(ea, a - b), bw);  // sum e^(a-Ma) (a - b)
      if (c.ce_own_lse) bc = bc + vexp(x - mc);                                  // sum e^(s-Ms)
    }
    kahan_add(va, ca, ba);
    kahan_add(vb, cb, bb);
    if (K == Kind::Forward || K == Kind::Reverse) kahan_add(vw, cw, bw);
    if (c.ce_own_lse) kahan_add(vc, cc, bc);
  }
  out.a = va - ca;
  out.b = vb - cb;
  out.w = vw - cw;
  out.c = vc - cc;
}

// sign(x) with sign(0) = 0 (TVD's subgradient where p_s = p_t)
template <typename acc_t>
inline Vectorized<acc_t> vsign(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), one(acc_t(1));
  return Vec::blendv(zero, one, x > zero) - Vec::blendv(zero, one, x < zero);
}

// The two row sums (K1, K2) of the kinds with a second sweep, m = beta p_t + (1 - beta) p_s
// (kdkernels/_core/divergences.py): JSD Ks, Kt; skew forward R = sum p_s p_t / m, Kt; skew
// reverse Ks, R; TVD sum p_s sign(p_s - p_t), sum |p_s - p_t|.
template <typename acc_t, Kind K, typename TS, typename TT>
void sweep_pair(const TS* s, const TT* t, int64_t nvec, const RowConsts<acc_t>& c, Sums<acc_t>& out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec inv_t = c.inv_t, lse_a = c.lse_a, lse_b = c.lse_b, beta = c.beta, beta1 = c.beta1;
  Vec k1 = out.a, k2 = out.b;
  for (int64_t i = 0; i < nvec; ++i) {
    const Vec lps = VecIO<acc_t, TS>::load(s + i * W) * inv_t - lse_a;
    const Vec lpt = VecIO<acc_t, TT>::load(t + i * W) * inv_t - lse_b;
    const Vec ps = vexp(lps), pt = vexp(lpt);
    if (K == Kind::TVD) {
      const Vec d = ps - pt;
      k1 = at::vec::fmadd(ps, vsign(d), k1);  // sum p_s sign(p_s - p_t)
      k2 = k2 + d.abs();                      // sum |p_s - p_t|
      continue;
    }
    const Vec m = at::vec::fmadd(beta, pt, beta1 * ps);
    if (K == Kind::JSD) {
      const Vec lm = m.log();
      k1 = at::vec::fmadd(ps, where_pos(ps, lps - lm), k1);  // KL(p_s || m)
      k2 = at::vec::fmadd(pt, where_pos(pt, lpt - lm), k2);  // KL(p_t || m)
    } else if (K == Kind::SkewForward) {  // r = p_t / m: log r = log p_t - log m (one log, no exp)
      const Vec r = pt / m;
      k1 = at::vec::fmadd(ps, where_pos(ps, r), k1);        // R = sum p_s p_t / m
      k2 = at::vec::fmadd(pt, where_pos(pt, r.log()), k2);  // KL(p_t || m)
    } else {  // SkewReverse: r = p_s / m
      const Vec r = ps / m;
      k1 = at::vec::fmadd(ps, where_pos(ps, r.log()), k1);  // KL(p_s || m)
      k2 = at::vec::fmadd(pt, where_pos(pt, r), k2);        // R
    }
  }
  out.a = k1;
  out.b = k2;
}

// D from the two sums of sweep_pair.
template <typename acc_t, Kind K>
inline acc_t pair_value(acc_t K1, acc_t K2, acc_t beta) {
  if (K == Kind::JSD) return beta * K2 + (acc_t(1) - beta) * K1;
  if (K == Kind::SkewForward) return K2;
  if (K == Kind::SkewReverse) return K1;
  return acc_t(0.5) * K2;
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
    } else if (K == Kind::JSD) {
      const Vec lm = at::vec::fmadd(c.beta, pt, c.beta1 * ps).log();
      if (want_s) gsv = cs_s * ps * where_pos(ps, lps - lm - c.Ks);  // (1 - beta) p_s (log p_s - log m - Ks) / T
      if (want_t) gtv = cs_t * pt * where_pos(pt, lpt - lm - c.Kt);  // beta p_t (log p_t - log m - Kt) / T
    } else if (K == Kind::TVD) {  // Ks = K1 = sum p_s sign, Kt = K2 = sum |p_s - p_t|; cs_* carry the 1/2
      const Vec sg = vsign(ps - pt);
      if (want_s) gsv = cs_s * ps * (sg - c.Ks);         // p_s (sign - K1) / 2T
      if (want_t) gtv = cs_t * pt * (c.Ks - c.Kt - sg);  // p_t (K1 - K2 - sign) / 2T
    } else {  // skew KL: r = p_t / m (forward) or p_s / m (reverse); R the row sum of p_s p_t / m
      const Vec m = at::vec::fmadd(c.beta, pt, c.beta1 * ps);
      const Vec one(acc_t(1));
      if (K == Kind::SkewForward) {  // Ks = K1 = R, Kt = K2
        const Vec r = pt / m;
        // -(1 - beta) p_s (r - R) / T;  p_t (log p_t/m - beta r - Kt + 1 - (1 - beta) R) / T
        if (want_s) gsv = cs_s * where_pos(ps, ps * (c.Ks - r)) * c.beta1;
        if (want_t) {
          const Vec u = r.log() - c.beta * r - c.Kt + one - c.beta1 * c.Ks;
          gtv = cs_t * pt * where_pos(pt, u);
        }
      } else {  // SkewReverse: Ks = K1, Kt = K2 = R
        const Vec r = ps / m;
        // p_s (log p_s/m - (1 - beta) r - Ks + 1 - beta R) / T;  -beta p_t (r - R) / T
        if (want_s) {
          const Vec u = r.log() - c.beta1 * r - c.Ks + one - c.beta * c.Kt;
          gsv = cs_s * ps * where_pos(ps, u);
        }
        if (want_t) gtv = cs_t * where_pos(pt, pt * (c.Kt - r)) * c.beta;
      }
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

// ---- the logit transform u = cap tanh(scale z / cap) (u = scale z without a cap) --------------
template <typename acc_t>
struct Transform {
  acc_t scale = 1, cap = 0, inv_cap = 0;
  Transform(double k, double c) : scale(static_cast<acc_t>(k)), cap(static_cast<acc_t>(c)),
                                  inv_cap(c > 0 ? static_cast<acc_t>(1.0 / c) : acc_t(0)) {}
  bool identity() const { return scale == acc_t(1) && cap == acc_t(0); }
};

// u[i] = f(z[i]) for a row of V logits, in the accumulation type.
template <typename acc_t, typename T>
void transform_row(const T* z, acc_t* u, int64_t V, const Transform<acc_t>& f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec k(f.scale), c(f.cap), ic(f.inv_cap);
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    Vec x = VecIO<acc_t, T>::load(z + i) * k;
    if (f.cap > 0) x = (x * ic).tanh() * c;
    x.store(u + i);
  }
  for (; i < V; ++i) {
    acc_t x = static_cast<acc_t>(z[i]) * f.scale;
    u[i] = f.cap > 0 ? std::tanh(x * f.inv_cap) * f.cap : x;
  }
}

// out[i] = g[i] df/dz, df/dz = scale (1 - (u / cap)^2) (scale without a cap), written in T.
template <typename acc_t, typename T>
void chain_row(const acc_t* g, const acc_t* u, T* out, int64_t V, const Transform<acc_t>& f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec k(f.scale), ic(f.inv_cap), one(acc_t(1));
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    Vec d = k;
    if (f.cap > 0) {
      const Vec r = Vec::loadu(u + i) * ic;
      d = (one - r * r) * k;
    }
    VecIO<acc_t, T>::store(out + i, Vec::loadu(g + i) * d);
  }
  for (; i < V; ++i) {
    const acc_t r = u[i] * f.inv_cap;
    const acc_t d = f.cap > 0 ? (acc_t(1) - r * r) * f.scale : f.scale;
    out[i] = static_cast<T>(g[i] * d);
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
