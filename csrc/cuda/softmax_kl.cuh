// Softmax-KL distillation losses as raw CUDA kernels: forward KL, reverse KL, generalized JSD, skew
// KL (forward and reverse), total variation, with an optional hard-label cross-entropy and logit
// transforms (scale, soft-cap); the loss and both input gradients from one launch.
// Same contract and math as kdkernels/triton/softmax_kl.py (its header derives every gradient):
//
//   a2 = s * log2(e)/T, b2 = t * log2(e)/T; ps = exp2(a2 - lse2(a2)), pt = exp2(b2 - lse2(b2))
//   KIND 0  D = KL(pt||ps):  dD/ds = (ps - pt)/T            dD/dt = pt (log pt - log ps - D)/T
//   KIND 1  D = KL(ps||pt):  dD/ds = ps (log ps - log pt - D)/T  dD/dt = (pt - ps)/T
//   KIND 2  D = beta KL(pt||m) + (1-beta) KL(ps||m), m = beta pt + (1-beta) ps:
//           dD/ds = (1-beta) ps (log ps - log m - Ks)/T   dD/dt = beta pt (log pt - log m - Kt)/T
//   KIND 3  D = KL(pt||m) (skew forward KL, beta = skew), KIND 4  D = KL(ps||m) (skew reverse KL,
//           beta = 1 - skew), m as for KIND 2; KIND 5  D = 1/2 sum |pt - ps| (TVD): each from two
//           row sums K1, K2 of a second pass, as in kdkernels/_core/divergences.py, with the
//           gradients there (the Triton helpers _divergence_terms / _divergence_grads)
//   Logit transforms (the XF kernels): z -> u = cap tanh(scale z / cap) (u = scale z without a
//   cap) on both sides before the temperature, CE included; every gradient above is taken with
//   respect to u and chained through du/dz = scale (1 - (u / cap)^2) (scale without a cap).
//   CE (T = 1): lse(s) - s[label];  dCE/ds = softmax(s) - onehot(label)
//   row loss = ce_weight CE + kd_weight D;  grad_s = g (ce_weight dCE/ds + kd_weight dD/ds),
//   grad_t = g kd_weight dD/dt, g = *grad_scale. Ignored rows: zero loss and gradients, no exp.
//
// Work split: one block per row (streaming) or one 1-D thread-block cluster of C blocks per row
// (staged, C = 1 on sm_80); block r of a cluster owns columns [r seg, (r+1) seg).
//
//   staged     cp.async copies the block's segment of s and t into shared memory (16-byte
//              vectors), so every logit leaves DRAM once. Pass 1 computes per-thread online
//              statistics (max and sum of exponentials of a2, b2, and s for CE at T != 1, plus
//              the running sum w that gives KL in closed form), reduced over the block with warp
//              shuffles and over the cluster through distributed shared memory (each block reads
//              every peer's partial, in rank order, so all blocks hold bit-identical totals).
//              KIND 2-5 add pass 2 for K1, K2. The gradient pass reads shared memory and writes
//              16-byte vectors.
//   streaming  the same passes, each reading the row from global memory (vector loads when
//              rows are 16-byte aligned, scalar otherwise).
//
// Bytes per row element (bs, bt = bytes of a student / teacher logit; the gradient writes count
// when that gradient is requested):
//   staged:                 bs + bt (read) + bs + bt (write)                 = 6 B for bf16
//   streaming KIND 0, 1:  2 (bs + bt)      + bs + bt                         = 10 B for bf16
//   streaming KIND 2-5:   3 (bs + bt)      + bs + bt                         = 14 B for bf16
//   loss only (no gradient): one read fewer when streaming.
// Per row on top: the label (8 B), the loss (4 B, 8 B for fp64); for CE, s[label] (one logit), parked
// in the loss slot until the end (the loss written twice and read once: 8 B, 16 B for fp64, more).
// Accumulation in fp32 (fp64 for fp64 inputs); exp2 / log2 with log2(e)/T folded into the scale.
// The transforms move no extra bytes: they are recomputed from the logits on every pass.
#pragma once

#include <type_traits>

#include "device.cuh"
#include "softmax_kl_plan.h"

namespace kdk::cuda {

using dev::bf16_t;
using dev::f16_t;

// ---------------------------------------------------------------- storage types and packs
template <class Acc> KDK_DEVICE Acc to_acc(float x) { return static_cast<Acc>(x); }
template <class Acc> KDK_DEVICE Acc to_acc(double x) { return static_cast<Acc>(x); }
template <class Acc> KDK_DEVICE Acc to_acc(bf16_t x) { return static_cast<Acc>(dev::bf16_to_float(x)); }
template <class Acc> KDK_DEVICE Acc to_acc(f16_t x) { return static_cast<Acc>(dev::f16_to_float(x)); }

template <class X> struct Store;
template <> struct Store<float> { template <class Acc> KDK_DEVICE static float from(Acc x) { return float(x); } };
template <> struct Store<double> { template <class Acc> KDK_DEVICE static double from(Acc x) { return double(x); } };
template <> struct Store<bf16_t> {
  template <class Acc> KDK_DEVICE static bf16_t from(Acc x) { return dev::float_to_bf16(float(x)); }
};
template <> struct Store<f16_t> {
  template <class Acc> KDK_DEVICE static f16_t from(Acc x) { return dev::float_to_f16(float(x)); }
};

// Q logits of type X as one aligned vector access (Q * sizeof(X) bytes: 16 for the wider input).
template <class X, int Q> struct alignas(sizeof(X) * Q) Pack { X v[Q]; };

template <class Acc, int Q> struct Vals {
  static constexpr int n = Q;
  Acc v[Q];
};

template <class S, class T> constexpr int kPack = 16 / (sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));

// ---------------------------------------------------------------- math helpers
constexpr double kLn2 = 0.6931471805599453;
constexpr double kLog2e = 1.4426950408889634;

template <class Acc> KDK_DEVICE Acc neg_inf() { return -static_cast<Acc>(__builtin_huge_val()); }

// w / z for z in [1, 2^31) (a sum of exponentials that includes 2^0): fp32 divides; fp64 refines
// the fp32 reciprocal with two Newton steps (relative error ~1e-16) instead of calling the fp64
// division routine, whose call spills registers
KDK_DEVICE float div_sum(float w, float z) { return w / z; }
KDK_DEVICE double div_sum(double w, double z) {
  double r = double(1.0f / float(z));
  r = r * (2.0 - z * r);
  r = r * (2.0 - z * r);
  return w * r;
}

// a running max that is still -inf (nothing seen, or all padded) must not be subtracted: use 0
template <class Acc> KDK_DEVICE Acc safe_max(Acc m) { return m == neg_inf<Acc>() ? Acc(0) : m; }

// log2(2^x + 2^y); -inf when both are -inf
template <class Acc> KDK_DEVICE Acc logaddexp2(Acc x, Acc y) {
  const Acc mx = x > y ? x : y, mn = x > y ? y : x;
  return mx + dev::log2(Acc(1) + dev::exp2(mn - safe_max(mx)));
}

// the natural-log ratios each kind needs, from log2 probabilities (x, y as in the Triton kernel)
template <class Acc, int KIND>
KDK_DEVICE void log_ratios(Acc lps2, Acc lpt2, Acc l2b, Acc l2nb, Acc& x, Acc& y) {
  if constexpr (KIND == 0) {
    x = (lpt2 - lps2) * Acc(kLn2);  // log pt - log ps
    y = x;
  } else if constexpr (KIND == 1) {
    x = (lps2 - lpt2) * Acc(kLn2);  // log ps - log pt
    y = x;
  } else if constexpr (KIND == 5) {
    x = lps2 == lpt2 ? Acc(0) : (lps2 > lpt2 ? Acc(1) : Acc(-1));  // sign(ps - pt), 0 where equal
    y = x;
  } else {
    // log2 m, m = beta pt + (1-beta) ps; exactly log2 ps where ps == pt (D == 0 for equal rows)
    const Acc lm2 = lps2 == lpt2 ? lps2 : logaddexp2(lpt2 + l2b, lps2 + l2nb);
    x = (lps2 - lm2) * Acc(kLn2);  // log ps - log m
    y = (lpt2 - lm2) * Acc(kLn2);  // log pt - log m
  }
}

// Per-element terms of the second pass whose row sums are K1, K2 (KIND 2-5); 0 where p == 0.
template <class Acc, int KIND> KDK_DEVICE void pair_terms(Acc ps, Acc pt, Acc x, Acc y, Acc& d1, Acc& d2) {
  if constexpr (KIND == 2) {
    d1 = ps == Acc(0) ? Acc(0) : ps * x;  // ps (log ps - log m)  -> Ks
    d2 = pt == Acc(0) ? Acc(0) : pt * y;  // pt (log pt - log m)  -> Kt
  } else if constexpr (KIND == 3) {
    d1 = ps == Acc(0) ? Acc(0) : ps * dev::exp2(y * Acc(kLog2e));  // ps pt / m           -> R
    d2 = pt == Acc(0) ? Acc(0) : pt * y;                           // pt (log pt - log m) -> Kt
  } else if constexpr (KIND == 4) {
    d1 = ps == Acc(0) ? Acc(0) : ps * x;                           // ps (log ps - log m) -> Ks
    d2 = pt == Acc(0) ? Acc(0) : pt * dev::exp2(x * Acc(kLog2e));  // pt ps / m           -> R
  } else {
    d1 = ps * x;                          // ps sign(ps - pt)
    d2 = ps > pt ? ps - pt : pt - ps;     // |ps - pt|
  }
}

// D of KIND 2-5 from its row sums
template <class Acc, int KIND> KDK_DEVICE Acc pair_value(Acc K1, Acc K2, Acc beta) {
  if constexpr (KIND == 2) return beta * K2 + (Acc(1) - beta) * K1;
  if constexpr (KIND == 3) return K2;
  if constexpr (KIND == 4) return K1;
  return Acc(0.5) * K2;
}

// T dD/ds and T dD/dt of every kind (K1, K2: the row sums of KIND 2-5)
template <class Acc, int KIND>
KDK_DEVICE void divergence_grads(Acc ps, Acc pt, Acc x, Acc y, Acc D, Acc K1, Acc K2, Acc beta, Acc& ds, Acc& dt) {
  if constexpr (KIND == 0) {
    ds = ps - pt;                                                   // ps - pt
    dt = pt == Acc(0) ? Acc(0) : pt * (x - D);                      // pt (log pt - log ps - D)
  } else if constexpr (KIND == 1) {
    ds = ps == Acc(0) ? Acc(0) : ps * (x - D);                      // ps (log ps - log pt - D)
    dt = pt - ps;                                                   // pt - ps
  } else if constexpr (KIND == 2) {
    ds = (Acc(1) - beta) * (ps == Acc(0) ? Acc(0) : ps * (x - K1));  // (1-beta) ps (log ps - log m - Ks)
    dt = beta * (pt == Acc(0) ? Acc(0) : pt * (y - K2));             // beta pt (log pt - log m - Kt)
  } else if constexpr (KIND == 3) {
    const Acc r = dev::exp2(y * Acc(kLog2e));                       // pt / m; K1 = R
    ds = (Acc(1) - beta) * (ps == Acc(0) ? Acc(0) : ps * (K1 - r));  // -(1-beta) ps (r - R)
    dt = pt == Acc(0) ? Acc(0) : pt * (y - beta * r - K2 + Acc(1) - (Acc(1) - beta) * K1);
  } else if constexpr (KIND == 4) {
    const Acc r = dev::exp2(x * Acc(kLog2e));                       // ps / m; K2 = R
    ds = ps == Acc(0) ? Acc(0) : ps * (x - (Acc(1) - beta) * r - K1 + Acc(1) - beta * K2);
    dt = beta * (pt == Acc(0) ? Acc(0) : pt * (K2 - r));             // -beta pt (r - R)
  } else {
    ds = Acc(0.5) * ps * (x - K1);                                  // ps (sign - K1) / 2
    dt = Acc(0.5) * pt * (K1 - K2 - x);                             // pt (K1 - K2 - sign) / 2
  }
}

// ---------------------------------------------------------------- logit transforms
// u = c tanh(k z / c), or u = k z where c == 0 (ic = 1 / c). tanh(y) = sign(y) (1 - e) / (1 + e)
// with e = 2^(-2 |y| log2 e) in (0, 1]: the division is by [1, 2] (div_sum), -inf goes to -c, NaN
// stays NaN.
template <class Acc> struct Xf { Acc k, c, ic; };


template <class Acc> KDK_DEVICE Acc xform(Acc z, const Xf<Acc>& f) {
  Acc u = z * f.k;
  if (f.c != Acc(0)) {
    const Acc y = u * f.ic, ay = y < Acc(0) ? -y : y;
    const Acc e = dev::exp2(Acc(-2.0 * kLog2e) * ay);
    const Acc th = div_sum(Acc(1) - e, Acc(1) + e);
    u = f.c * (y < Acc(0) ? -th : th);
  }
  return u;
}

// g du/dz, from u
template <class Acc> KDK_DEVICE Acc xform_grad(Acc g, Acc u, const Xf<Acc>& f) {
  if (f.c == Acc(0)) return g * f.k;
  const Acc r = u * f.ic;
  return g * (f.k * (Acc(1) - r * r));
}

// ---------------------------------------------------------------- reductions
// Pass-1 statistics of one row (or part of it): max and sum of 2^(v - max) of a2, b2 (and c2 =
// s log2(e) for CE at T != 1), and w = sum 2^(b2-mb) (b2-a2) (KIND 0) / sum 2^(a2-ma) (a2-b2) (KIND 1).
template <class Acc> struct Stats {
  Acc ma, za, mb, zb, w, mc, zc;
};

template <class Acc> KDK_DEVICE Stats<Acc> empty_stats() {
  return {neg_inf<Acc>(), Acc(0), neg_inf<Acc>(), Acc(0), Acc(0), neg_inf<Acc>(), Acc(0)};
}

// (m, z) <- (m, z) + (m2, z2), both sums taken relative to their max; f1, f2 the rescale factors
template <class Acc> KDK_DEVICE void merge_mz(Acc& m, Acc& z, Acc m2, Acc z2, Acc& f1, Acc& f2) {
  const Acc mn = dev::fmax(m, m2), ms = safe_max(mn);
  f1 = dev::exp2(m - ms);
  f2 = dev::exp2(m2 - ms);
  z = z * f1 + z2 * f2;
  m = mn;
}

template <class Acc, int KIND> KDK_DEVICE Stats<Acc> merge(Stats<Acc> x, const Stats<Acc>& y, bool ce_sep) {
  Acc fa1, fa2, fb1, fb2;
  merge_mz(x.ma, x.za, y.ma, y.za, fa1, fa2);
  merge_mz(x.mb, x.zb, y.mb, y.zb, fb1, fb2);
  if constexpr (KIND == 0) x.w = x.w * fb1 + y.w * fb2;
  if constexpr (KIND == 1) x.w = x.w * fa1 + y.w * fa2;
  if (ce_sep) {
    Acc f1, f2;
    merge_mz(x.mc, x.zc, y.mc, y.zc, f1, f2);
  }
  return x;
}

template <class Acc> struct Pair { Acc k1, k2; };  // the row sums K1, K2 of KIND 2-5 (JSD: Ks, Kt)

template <class Acc> KDK_DEVICE Stats<Acc> shfl_xor(const Stats<Acc>& s, int m) {
  return {dev::shfl_xor(s.ma, m), dev::shfl_xor(s.za, m), dev::shfl_xor(s.mb, m), dev::shfl_xor(s.zb, m),
          dev::shfl_xor(s.w, m), dev::shfl_xor(s.mc, m), dev::shfl_xor(s.zc, m)};
}
template <class Acc> KDK_DEVICE Pair<Acc> shfl_xor(const Pair<Acc>& s, int m) {
  return {dev::shfl_xor(s.k1, m), dev::shfl_xor(s.k2, m)};
}

// Reduce one value per thread over the block; the total lands in *slot (shared memory) and is
// returned to every thread. `scratch` holds one partial per warp.
template <class V, class Op>
KDK_DEVICE V block_reduce(V v, const V& identity, Op op, V* scratch, V* slot) {
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  const int lane = dev::thread_idx() & 31, warp = dev::thread_idx() >> 5, warps = dev::block_dim() >> 5;
  if (lane == 0) scratch[warp] = v;
  dev::sync_threads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : identity;
    for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
    if (lane == 0) *slot = v;
  }
  dev::sync_threads();
  return *slot;
}

// Combine the per-block totals of a cluster: every block reads every peer's slot in rank order,
// so all of them hold the same bits.
template <class V, class Op> KDK_DEVICE V cluster_combine(const V* slot, int cluster, Op op) {
  dev::cluster_sync();  // the peers' slots are written and visible
  V total = *dev::cluster_map(slot, 0u);
  for (int r = 1; r < cluster; ++r) total = op(total, *dev::cluster_map(slot, static_cast<unsigned>(r)));
  return total;
}

// ---------------------------------------------------------------- row traversal
// Visit the logits [0, n) of a row segment in chunks of Q (Q > 1: whole aligned vectors; the
// caller guarantees n % Q == 0), thread i taking chunks i, i + blockDim, ... (coalesced).
// f(s_vals, t_vals, k) gets the chunk starting at segment offset k, converted to Acc and, for XF,
// transformed by xs, xt.
template <class Acc, int Q, bool XF, class S, class T, class F>
KDK_DEVICE void visit(const S* __restrict__ s, const T* __restrict__ t, int64_t n, const Xf<Acc>& xs,
                      const Xf<Acc>& xt, F&& f) {
  const int64_t step = int64_t(dev::block_dim()) * Q;
#pragma unroll 2
  for (int64_t k = int64_t(dev::thread_idx()) * Q; k < n; k += step) {
    Vals<Acc, Q> a, b;
    if constexpr (Q > 1) {
      const Pack<S, Q> ps = dev::ld(reinterpret_cast<const Pack<S, Q>*>(s + k));
      const Pack<T, Q> pt = dev::ld(reinterpret_cast<const Pack<T, Q>*>(t + k));
#pragma unroll
      for (int i = 0; i < Q; ++i) {
        a.v[i] = to_acc<Acc>(ps.v[i]);
        b.v[i] = to_acc<Acc>(pt.v[i]);
      }
    } else {
      a.v[0] = to_acc<Acc>(dev::ld(s + k));
      b.v[0] = to_acc<Acc>(dev::ld(t + k));
    }
    if constexpr (XF) {
#pragma unroll
      for (int i = 0; i < Q; ++i) {
        a.v[i] = xform(a.v[i], xs);
        b.v[i] = xform(b.v[i], xt);
      }
    }
    f(a, b, k);
  }
}

template <class X, class Acc, int Q> KDK_DEVICE void store(X* __restrict__ dst, const Vals<Acc, Q>& g) {
  if constexpr (Q > 1) {
    Pack<X, Q> out;
#pragma unroll
    for (int i = 0; i < Q; ++i) out.v[i] = Store<X>::from(g.v[i]);
    dev::st(reinterpret_cast<Pack<X, Q>*>(dst), out);
  } else {
    dev::st(dst, Store<X>::from(g.v[0]));
  }
}

// Kernel parameters: the call plus the plan's split.
struct Params {
  SoftmaxKLArgs a;
  int64_t seg;   // logits per block
  int cluster;   // blocks per row
  double s_inv_cap, t_inv_cap;  // 1 / cap of each side's soft-cap (0 without one): no fp64 divide on the device
};

// Everything one block does for its (part of a) row, for a traversal of Q-wide chunks of the
// segment [lo, lo + n) read from s_src / t_src (shared memory when staged, global otherwise).
template <class S, class T, class Acc, int KIND, bool XF, int Q>
KDK_DEVICE void row_body(const Params& p, int64_t row, int64_t label, int rank, int64_t lo, int64_t n,
                         const S* s_src, const T* t_src, unsigned char* smem) {
  const SoftmaxKLArgs& a = p.a;
  const int cluster = p.cluster;
  Stats<Acc>* scratch = reinterpret_cast<Stats<Acc>*>(smem);          // 32 per-warp partials
  Stats<Acc>* stats_slot = scratch + 32;                               // this block's total
  Pair<Acc>* pair_scratch = reinterpret_cast<Pair<Acc>*>(stats_slot + 1);
  Pair<Acc>* pair_slot = pair_scratch + 32;
  static_assert(sizeof(Stats<double>) * 33 + sizeof(Pair<double>) * 33 <= kScratchBytes, "scratch");

  const bool ce = a.ce_weight > 0;
  const bool same_t = a.inv_temperature == 1.0;
  const bool ce_sep = ce && !same_t;  // CE needs its own log-sum-exp (temperature 1)
  const Acc inv_t = Acc(a.inv_temperature), scale = inv_t * Acc(kLog2e);
  const Acc beta = Acc(a.beta), l2b = dev::log2(beta), l2nb = dev::log2(Acc(1) - beta);
  const Acc kd_w = Acc(a.kd_weight), ce_w = Acc(a.ce_weight);
  const Xf<Acc> xs{Acc(a.s_scale), Acc(a.s_cap), Acc(p.s_inv_cap)}, xt{Acc(a.t_scale), Acc(a.t_cap), Acc(p.t_inv_cap)};

  // ---- pass 1: per-thread online statistics, then block and cluster totals
  Stats<Acc> st = empty_stats<Acc>();
  visit<Acc, Q, XF>(s_src, t_src, n, xs, xt, [&](const auto& s, const auto& t, int64_t) {
    constexpr int QQ = std::decay_t<decltype(s)>::n;
    Acc a2[QQ], b2[QQ], pa = neg_inf<Acc>(), pb = neg_inf<Acc>();
#pragma unroll
    for (int i = 0; i < QQ; ++i) {
      a2[i] = s.v[i] * scale;
      b2[i] = t.v[i] * scale;
      pa = dev::fmax(pa, a2[i]);
      pb = dev::fmax(pb, b2[i]);
    }
    const Acc ma = dev::fmax(st.ma, pa), mb = dev::fmax(st.mb, pb);
    const Acc msa = safe_max(ma), msb = safe_max(mb);
    const Acc fa = dev::exp2(st.ma - msa), fb = dev::exp2(st.mb - msb);  // rescale what was summed so far
    st.za *= fa;
    st.zb *= fb;
    if constexpr (KIND == 0) st.w *= fb;
    if constexpr (KIND == 1) st.w *= fa;
#pragma unroll
    for (int i = 0; i < QQ; ++i) {
      const Acc ea = dev::exp2(a2[i] - msa), eb = dev::exp2(b2[i] - msb);
      st.za += ea;
      st.zb += eb;
      if constexpr (KIND == 0) st.w += eb == Acc(0) ? Acc(0) : eb * (b2[i] - a2[i]);
      if constexpr (KIND == 1) st.w += ea == Acc(0) ? Acc(0) : ea * (a2[i] - b2[i]);
    }
    st.ma = ma;
    st.mb = mb;
    if (ce_sep) {
      Acc c2[QQ], pc = neg_inf<Acc>();
#pragma unroll
      for (int i = 0; i < QQ; ++i) {
        c2[i] = s.v[i] * Acc(kLog2e);
        pc = dev::fmax(pc, c2[i]);
      }
      const Acc mc = dev::fmax(st.mc, pc), msc = safe_max(mc);
      st.zc *= dev::exp2(st.mc - msc);
#pragma unroll
      for (int i = 0; i < QQ; ++i) st.zc += dev::exp2(c2[i] - msc);
      st.mc = mc;
    }
  });
  auto merge_stats = [ce_sep](const Stats<Acc>& x, const Stats<Acc>& y) { return merge<Acc, KIND>(x, y, ce_sep); };
  Stats<Acc> tot = block_reduce(st, empty_stats<Acc>(), merge_stats, scratch, stats_slot);
  if (cluster > 1) tot = cluster_combine(stats_slot, cluster, merge_stats);

  const Acc lse2_a = safe_max(tot.ma) + dev::log2(tot.za);
  const Acc lse2_b = safe_max(tot.mb) + dev::log2(tot.zb);
  Acc D, K1 = 0, K2 = 0;
  if constexpr (KIND == 0) {
    D = (div_sum(tot.w, tot.zb) - lse2_b + lse2_a) * Acc(kLn2);  // sum pt (b - a) - lse(b) + lse(a)
  } else if constexpr (KIND == 1) {
    D = (div_sum(tot.w, tot.za) - lse2_a + lse2_b) * Acc(kLn2);  // sum ps (a - b) - lse(a) + lse(b)
  } else {
    // ---- pass 2 of KIND 2-5: the row sums K1, K2 (JSD: Ks = sum ps (log ps - log m), Kt = sum pt (log pt - log m))
    Pair<Acc> k = {Acc(0), Acc(0)};
    visit<Acc, Q, XF>(s_src, t_src, n, xs, xt, [&](const auto& s, const auto& t, int64_t) {
      constexpr int QQ = std::decay_t<decltype(s)>::n;
#pragma unroll
      for (int i = 0; i < QQ; ++i) {
        const Acc lps2 = s.v[i] * scale - lse2_a, lpt2 = t.v[i] * scale - lse2_b;
        const Acc ps = dev::exp2(lps2), pt = dev::exp2(lpt2);
        Acc x, y, d1, d2;
        log_ratios<Acc, KIND>(lps2, lpt2, l2b, l2nb, x, y);
        pair_terms<Acc, KIND>(ps, pt, x, y, d1, d2);
        k.k1 += d1;
        k.k2 += d2;
      }
    });
    auto add = [](const Pair<Acc>& x, const Pair<Acc>& y) { return Pair<Acc>{x.k1 + y.k1, x.k2 + y.k2}; };
    Pair<Acc> kt = block_reduce(k, Pair<Acc>{Acc(0), Acc(0)}, add, pair_scratch, pair_slot);
    if (cluster > 1) kt = cluster_combine(pair_slot, cluster, add);
    K1 = kt.k1;
    K2 = kt.k2;
    D = pair_value<Acc, KIND>(K1, K2, beta);
  }
  // every read of a peer's shared memory is done: let the peers go on to exit
  if (cluster > 1) dev::cluster_arrive();

  const Acc lse2_c = ce_sep ? safe_max(tot.mc) + dev::log2(tot.zc) : lse2_a;
  if (rank == 0 && dev::thread_idx() == 0) {
    Acc loss = kd_w * D;
    if (ce) {
      Acc s_label = dev::ld(static_cast<const Acc*>(a.loss) + row);  // parked there by park_label_logit
      if constexpr (XF) s_label = xform(s_label, xs);
      const Acc c2_label = s_label * (ce_sep ? Acc(kLog2e) : scale);
      loss += ce_w * ((lse2_c - c2_label) * Acc(kLn2));  // CE = lse(s) - s[label]
    }
    dev::st(static_cast<Acc*>(a.loss) + row, loss);
  }

  // ---- gradient pass
  if (a.grad_student || a.grad_teacher) {
    const Acc g = Acc(dev::ld(a.grad_scale));
    const Acc g_kd = g * kd_w * inv_t, g_ce = g * ce_w;
    S* gs_row = a.grad_student ? static_cast<S*>(a.grad_student) + row * a.V + lo : nullptr;
    T* gt_row = a.grad_teacher ? static_cast<T*>(a.grad_teacher) + row * a.V + lo : nullptr;
    visit<Acc, Q, XF>(s_src, t_src, n, xs, xt, [&](const auto& s, const auto& t, int64_t k) {
      constexpr int QQ = std::decay_t<decltype(s)>::n;
      Vals<Acc, QQ> gs, gt;
#pragma unroll
      for (int i = 0; i < QQ; ++i) {
        const Acc lps2 = s.v[i] * scale - lse2_a, lpt2 = t.v[i] * scale - lse2_b;
        const Acc ps = dev::exp2(lps2), pt = dev::exp2(lpt2);
        Acc x, y, ds, dt;
        log_ratios<Acc, KIND>(lps2, lpt2, l2b, l2nb, x, y);
        divergence_grads<Acc, KIND>(ps, pt, x, y, D, K1, K2, beta, ds, dt);
        gs.v[i] = g_kd * ds;
        if (ce) {
          const Acc pc = ce_sep ? dev::exp2(s.v[i] * Acc(kLog2e) - lse2_c) : ps;
          const Acc onehot = lo + k + i == label ? Acc(1) : Acc(0);
          gs.v[i] += g_ce * (pc - onehot);                    // softmax(s) - onehot(label)
        }
        gt.v[i] = g_kd * dt;
        if constexpr (XF) {
          gs.v[i] = xform_grad(gs.v[i], s.v[i], xs);
          gt.v[i] = xform_grad(gt.v[i], t.v[i], xt);
        }
      }
      if (gs_row) store(gs_row + k, gs);
      if (gt_row) store(gt_row + k, gt);
    });
  }
  if (cluster > 1) dev::cluster_wait();  // no block exits while a peer may still read its slots
}

// A constant loss and gradient rows (the block's segment): 0 for a row labelled ignore_index, NaN for
// a cross-entropy label outside [0, V) (unchecked under torch.compile; s[label] is never read).
template <class S, class T, class Acc>
KDK_DEVICE void constant_row(const Params& p, int64_t row, int rank, int64_t lo, int64_t n, Acc value) {
  const SoftmaxKLArgs& a = p.a;
  S* gs = a.grad_student ? static_cast<S*>(a.grad_student) + row * a.V + lo : nullptr;
  T* gt = a.grad_teacher ? static_cast<T*>(a.grad_teacher) + row * a.V + lo : nullptr;
  for (int64_t k = dev::thread_idx(); k < n; k += dev::block_dim()) {
    if (gs) dev::st(gs + k, Store<S>::from(value));
    if (gt) dev::st(gt + k, Store<T>::from(value));
  }
  if (rank == 0 && dev::thread_idx() == 0) dev::st(static_cast<Acc*>(a.loss) + row, value);
}

// The element offset of row r = y L + l (see SoftmaxKLArgs): from the grid's coordinates, no division.
KDK_DEVICE int64_t row_start(bool two_level, int64_t y, int64_t l, int64_t r, int64_t outer_stride, int64_t stride) {
  return two_level ? y * outer_stride + l * stride : r * stride;
}

// CE: s[label], read by rank 0's thread 0 when the kernel starts and parked in the row's loss slot
// until row_body adds the loss there (no row pointer held through the body: registers stay free).
template <class S, class Acc>
KDK_DEVICE void park_label_logit(const Params& p, int64_t row, int64_t label, int rank, const S* s_row) {
  if (p.a.ce_weight != 0 && rank == 0 && dev::thread_idx() == 0) {
    dev::st(static_cast<Acc*>(p.a.loss) + row, to_acc<Acc>(dev::ld(s_row + label)));
  }
}

// Whether a row's loss is fixed by its label: ignored (0) or a CE label out of range (NaN).
template <class Acc>
KDK_DEVICE bool fixed_row(const SoftmaxKLArgs& a, int64_t label, Acc* value) {
  if (!a.labels) return false;
  if (label == a.ignore_index) {
    *value = Acc(0);
    return true;
  }
  if (a.ce_weight != 0 && (label < 0 || label >= a.V)) {
    *value = dev::quiet_nan<Acc>();
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- the kernels
// Register budget per thread at 512 threads: fp32 logits 40 (three blocks per SM), 16-bit logits
// 64 (two blocks; their 8-wide vectors need the registers), fp64 128 (one block; gradcheck only);
// the transformed (XF) variants one block fewer, at least one. tests/test_aot.py fails on any spill.
template <class S, class T, class Acc, bool XF>
constexpr int kMinBlocks = sizeof(Acc) == 8 ? 1 : (kPack<S, T> == 8 ? 2 : 3) - (XF ? 1 : 0);

// Staged: grid = N * cluster blocks, 1-D clusters of `cluster` blocks (one row per cluster).
template <class S, class T, class Acc, int KIND, bool XF>
KDK_KERNEL(kMaxThreads, (kMinBlocks<S, T, Acc, XF>)) softmax_kl_staged(const Params p) {
  constexpr int P = kPack<S, T>;
  dev::require_clusters(p.cluster);
  const int rank = p.cluster > 1 ? static_cast<int>(dev::cluster_rank()) : 0;
  const int64_t l = dev::block_idx() / p.cluster, y = dev::block_idx_y();
  const int64_t row = y * p.a.inner + l;
  const int64_t lo = rank * p.seg;
  const int64_t hi = lo + p.seg < p.a.V ? lo + p.seg : p.a.V;
  const int64_t n = hi > lo ? hi - lo : 0;
  const int64_t label = p.a.labels ? dev::ld(p.a.labels + row) : 0;
  Acc fixed;
  if (fixed_row(p.a, label, &fixed)) {
    constant_row<S, T, Acc>(p, row, rank, lo, n, fixed);
    return;
  }
  unsigned char* smem = dev::dynamic_smem();
  S* s_sm = reinterpret_cast<S*>(smem + kScratchBytes);
  T* t_sm = reinterpret_cast<T*>(smem + kScratchBytes + (p.seg * int64_t(sizeof(S)) + 15) / 16 * 16);
  const S* s_g = static_cast<const S*>(p.a.student) + row_start(p.a.two_level_s, y, l, row, p.a.outer_stride_s,
                                                                p.a.stride_s) + lo;
  const T* t_g = static_cast<const T*>(p.a.teacher) + row_start(p.a.two_level_t, y, l, row, p.a.outer_stride_t,
                                                                p.a.stride_t) + lo;
  park_label_logit<S, Acc>(p, row, label, rank, s_g);  // rank 0: lo = 0, s_g is the row
  for (int64_t k = int64_t(dev::thread_idx()) * P; k < n; k += int64_t(dev::block_dim()) * P) {
    dev::cp_async<P * sizeof(S)>(s_sm + k, s_g + k);
    dev::cp_async<P * sizeof(T)>(t_sm + k, t_g + k);
  }
  dev::cp_async_wait_all();
  dev::sync_threads();
  row_body<S, T, Acc, KIND, XF, P>(p, row, label, rank, lo, n, s_sm, t_sm, smem);
}

// Streaming: grid = N blocks, one row each, every pass reading global memory.
template <class S, class T, class Acc, int KIND, bool XF>
KDK_KERNEL(kMaxThreads, (kMinBlocks<S, T, Acc, XF>)) softmax_kl_streaming(const Params p) {
  constexpr int P = kPack<S, T>;
  const int64_t l = dev::block_idx(), y = dev::block_idx_y();
  const int64_t row = y * p.a.inner + l;
  const int64_t V = p.a.V;
  const int64_t label = p.a.labels ? dev::ld(p.a.labels + row) : 0;
  Acc fixed;
  if (fixed_row(p.a, label, &fixed)) {
    constant_row<S, T, Acc>(p, row, 0, 0, V, fixed);
    return;
  }
  const S* s_g = static_cast<const S*>(p.a.student) + row_start(p.a.two_level_s, y, l, row, p.a.outer_stride_s,
                                                                p.a.stride_s);
  const T* t_g = static_cast<const T*>(p.a.teacher) + row_start(p.a.two_level_t, y, l, row, p.a.outer_stride_t,
                                                                p.a.stride_t);
  park_label_logit<S, Acc>(p, row, label, 0, s_g);
  const bool aligned = V % P == 0 && reinterpret_cast<uintptr_t>(s_g) % (P * sizeof(S)) == 0 &&
                       reinterpret_cast<uintptr_t>(t_g) % (P * sizeof(T)) == 0 &&
                       reinterpret_cast<uintptr_t>(p.a.grad_student) % (P * sizeof(S)) == 0 &&
                       reinterpret_cast<uintptr_t>(p.a.grad_teacher) % (P * sizeof(T)) == 0;
  if (aligned) {
    row_body<S, T, Acc, KIND, XF, P>(p, row, label, 0, 0, V, s_g, t_g, dev::dynamic_smem());
  } else {
    row_body<S, T, Acc, KIND, XF, 1>(p, row, label, 0, 0, V, s_g, t_g, dev::dynamic_smem());
  }
}

// ---------------------------------------------------------------- dispatch
// Calls launch(kernel, params) with the kernel instantiation for the call's dtypes, kind,
// transforms and plan.
template <class Launch> std::string dispatch_softmax_kl(const SoftmaxKLArgs& a, const Plan& plan, Launch&& launch) {
  const Params params{a, plan.seg, plan.cluster, a.s_cap > 0 ? 1.0 / a.s_cap : 0.0,
                      a.t_cap > 0 ? 1.0 / a.t_cap : 0.0};
  auto by_kind = [&](auto s_tag, auto t_tag, auto acc_tag) -> std::string {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const bool staged = plan.mode == kStaged, xf = has_transform(a);
    auto pick = [&](auto kind_tag) -> std::string {
      constexpr int K = decltype(kind_tag)::value;
      if (xf) return launch(staged ? &softmax_kl_staged<S, T, Acc, K, true> : &softmax_kl_streaming<S, T, Acc, K, true>,
                            params);
      return launch(staged ? &softmax_kl_staged<S, T, Acc, K, false> : &softmax_kl_streaming<S, T, Acc, K, false>,
                    params);
    };
    switch (a.kind) {
      case 0: return pick(std::integral_constant<int, 0>{});
      case 1: return pick(std::integral_constant<int, 1>{});
      case 2: return pick(std::integral_constant<int, 2>{});
      case 3: return pick(std::integral_constant<int, 3>{});
      case 4: return pick(std::integral_constant<int, 4>{});
      case 5: return pick(std::integral_constant<int, 5>{});
      default: return "kind must be 0 (forward), 1 (reverse), 2 (jsd), 3 (skew forward), 4 (skew reverse) or 5 (tvd)";
    }
  };
  auto by_teacher = [&](auto s_tag) -> std::string {
    switch (a.teacher_dtype) {
      case kFloat32: return by_kind(s_tag, float{}, float{});
      case kBFloat16: return by_kind(s_tag, bf16_t{}, float{});
      case kFloat16: return by_kind(s_tag, f16_t{}, float{});
      default: return "float64 logits pair with float64 only";
    }
  };
  if (a.student_dtype == kFloat64 || a.teacher_dtype == kFloat64) {
    if (a.student_dtype != a.teacher_dtype) return "float64 logits pair with float64 only";
    return by_kind(double{}, double{}, double{});
  }
  switch (a.student_dtype) {
    case kFloat32: return by_teacher(float{});
    case kBFloat16: return by_teacher(bf16_t{});
    case kFloat16: return by_teacher(f16_t{});
    default: return "student dtype must be float32, bfloat16, float16 or float64";
  }
}

}  // namespace kdk::cuda
