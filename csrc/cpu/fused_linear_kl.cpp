// Fused-linear KL on the CPU: the loss of softmax_kl.cpp on the logits h W^T + b of student and
// teacher, over tiles of the vocabulary, so that no [N, V] logits tensor exists.
//
// Same two passes as kdkernels/ops/fused_linear_kl.py (which derives them):
//   pass 1, per vocabulary tile and block of rows: the logits tiles by one fp32 (fp64) GEMM each,
//           then per row the online max / sum of exponentials (and the running linear term of
//           forward / reverse KL) with the vectorized sweeps of sweeps.h; z_s[label] is picked up
//           by the tile that holds it. JSD: one more pass for Ks, Kt.
//   pass 2, per tile and block: the logits tiles again, the gradient with respect to the logits
//           (sweep_grad) into a [rows, tile] buffer, then dh += dZ W_tile, dW_tile += dZ^T h and
//           db_tile += sum_rows dZ by GEMMs (ATen's, so MKL / oneDNN where torch has them).
// Rows labelled ignore_index are dropped before the first GEMM; with CE, a label outside [0, V) makes
// its row's loss and every gradient NaN. Hidden states and teacher logits are [N, D] or [B, L, D] rows
// (RowLayout: a causal-shift view is read in place). Memory beyond the gradients: O(N)
// row statistics, the rows kept (a copy of the hidden states in the accumulation dtype) and a few
// [rows, tile] buffers (given teacher logits are gathered tile by tile, never copied whole); the
// weight gradient accumulates in the accumulation dtype.
// Logit transforms (scale, soft-cap; sweeps.h Transform): each logits tile is transformed in place
// after its GEMM (u = f(z)), the passes run on u, and pass 2 chains dZ through f (df/dz from u)
// before the gradient GEMMs; the logits still never exist beyond a tile.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../kdkernels.h"
#include "sweeps.h"

namespace kdk {
namespace {

using namespace kdk::cpu;

template <typename acc_t>
struct RowStats {
  std::vector<acc_t> Ma, Mb, za, zb, w, zc, s_label, lse_a, lse_b, lse_c, D, Ks, Kt;
  explicit RowStats(int64_t n) {
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    Ma.assign(n, -inf);
    Mb.assign(n, -inf);
    for (auto* v : {&za, &zb, &w, &zc, &s_label, &lse_a, &lse_b, &lse_c, &D, &Ks, &Kt}) v->assign(n, acc_t(0));
  }
};

struct Call {
  double inv_t, temp, beta, ce_weight, kd_weight;
  int64_t kind;
  bool ce, ce_own_lse, same_t, want_s, want_t;
  double s_scale = 1, s_cap = 0, t_scale = 1, t_cap = 0;
};

// Pass 1 for one row's stretch of a tile: s, t are the row's logits in the tile (n of them).
template <typename acc_t, Kind K, typename TT>
void pass1_row(const acc_t* s, const TT* t, int64_t n, int64_t r, RowStats<acc_t>& st, const Call& c) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t nvec = n / W, rem = n - nvec * W;
  Tail<acc_t, acc_t, TT> tail(s + nvec * W, t + nvec * W, rem);
  const acc_t inv_t = acc_t(c.inv_t), temp = acc_t(c.temp);
  Vec vma(-kInf), vmb(-kInf);
  sweep_max<acc_t>(s, t, nvec, vma, vmb);
  if (rem) sweep_max<acc_t>(tail.s, tail.t, 1, vma, vmb);
  const acc_t cma = hmax(vma) * inv_t, cmb = hmax(vmb) * inv_t;
  acc_t &Ma = st.Ma[r], &Mb = st.Mb[r];
  if (cma > Ma) {  // the tile raised the running max: rescale what was summed so far
    if (c.ce_own_lse) st.zc[r] *= std::exp((Ma - cma) * temp);
    const acc_t f = std::exp(Ma - cma);
    st.za[r] *= f;
    if (K == Kind::Reverse) st.w[r] *= f;
    Ma = cma;
  }
  if (cmb > Mb) {
    const acc_t f = std::exp(Mb - cmb);
    st.zb[r] *= f;
    if (K == Kind::Forward) st.w[r] *= f;
    Mb = cmb;
  }
  RowConsts<acc_t> rc;
  rc.inv_t = Vec(inv_t);
  rc.ma = Vec(Ma == -kInf ? acc_t(0) : Ma);  // an all -inf prefix must not give -inf - -inf
  rc.mb = Vec(Mb == -kInf ? acc_t(0) : Mb);
  rc.mc = Vec(Ma == -kInf ? acc_t(0) : Ma * temp);
  rc.ce_own_lse = c.ce_own_lse;
  Sums<acc_t> sums{Vec(0), Vec(0), Vec(0), Vec(0)};
  sweep_sums<acc_t, K>(s, t, nvec, rc, sums);
  if (rem) sweep_sums<acc_t, K>(tail.s, tail.t, 1, rc, sums);
  st.za[r] += hsum(sums.a);
  st.zb[r] += hsum(sums.b);
  st.w[r] += hsum(sums.w);
  if (c.ce_own_lse) st.zc[r] += hsum(sums.c);
}

template <typename acc_t, Kind K, typename TT>
void pair_row(const acc_t* s, const TT* t, int64_t n, int64_t r, RowStats<acc_t>& st, const Call& c) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t nvec = n / W, rem = n - nvec * W;
  Tail<acc_t, acc_t, TT> tail(s + nvec * W, t + nvec * W, rem);
  RowConsts<acc_t> rc;
  rc.inv_t = Vec(acc_t(c.inv_t));
  rc.lse_a = Vec(st.lse_a[r]);
  rc.lse_b = Vec(st.lse_b[r]);
  rc.beta = Vec(acc_t(c.beta));
  rc.beta1 = Vec(acc_t(1 - c.beta));
  Sums<acc_t> k{Vec(0), Vec(0), Vec(0), Vec(0)};
  sweep_pair<acc_t, K>(s, t, nvec, rc, k);
  if (rem) sweep_pair<acc_t, K>(tail.s, tail.t, 1, rc, k);
  st.Ks[r] += hsum(k.a);
  st.Kt[r] += hsum(k.b);
}

// dZ for one row's stretch of a tile into gs / gt (acc_t rows of the dZ buffers); g = grad scale.
template <typename acc_t, Kind K, typename TT>
void grad_row(const acc_t* s, const TT* t, acc_t* gs, acc_t* gt, int64_t n, int64_t label_rel, int64_t r,
              acc_t g, const RowStats<acc_t>& st, const Call& c) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t nvec = n / W, rem = n - nvec * W;
  RowConsts<acc_t> rc;
  rc.inv_t = Vec(acc_t(c.inv_t));
  rc.lse_a = Vec(st.lse_a[r]);
  rc.lse_b = Vec(st.lse_b[r]);
  rc.lse_c = Vec(st.lse_c[r]);
  rc.beta = Vec(acc_t(c.beta));
  rc.beta1 = Vec(acc_t(1 - c.beta));
  rc.D = Vec(st.D[r]);
  rc.Ks = Vec(st.Ks[r]);
  rc.Kt = Vec(st.Kt[r]);
  const acc_t cs = g * acc_t(c.kd_weight * c.inv_t);
  rc.cs_s = Vec(K == Kind::JSD ? cs * acc_t(1 - c.beta) : (K == Kind::TVD ? cs * acc_t(0.5) : cs));
  rc.cs_t = Vec(K == Kind::JSD ? cs * acc_t(c.beta) : (K == Kind::TVD ? cs * acc_t(0.5) : cs));
  rc.ce_scale = g * acc_t(c.ce_weight);
  rc.ce = Vec(rc.ce_scale);
  rc.ce_on = c.ce;
  rc.ce_own_lse = c.ce_own_lse;
  rc.same_t = c.same_t;
  rc.want_s = c.want_s;
  rc.want_t = c.want_t;
  const int64_t lab = c.ce ? label_rel : -1;
  // sweep_grad writes only the gradients asked for; give it scratch for the other
  alignas(64) acc_t dummy_s[W], dummy_t[W];
  sweep_grad<acc_t, K>(s, t, gs ? gs : dummy_s, gt ? gt : dummy_t, gs || gt ? nvec : 0, lab, rc);
  if (rem) {
    Tail<acc_t, acc_t, TT> tail(s + nvec * W, t + nvec * W, rem);
    sweep_grad<acc_t, K>(tail.s, tail.t, tail.gs, tail.gt, 1, c.ce ? label_rel - nvec * W : -1, rc);
    if (gs) std::copy(tail.gs, tail.gs + rem, gs + nvec * W);
    if (gt)
      for (int64_t k = 0; k < rem; ++k) gt[nvec * W + k] = static_cast<acc_t>(tail.gt[k]);
  }
}

at::Tensor opt(const std::optional<at::Tensor>& x) { return x.has_value() ? *x : at::Tensor(); }

// Rows `rows` of [N, D] or [B, L, D] rows (RowLayout), gathered from the strided tensor: [len(rows), D].
at::Tensor take_rows(const at::Tensor& x, const at::Tensor& rows) {
  if (x.dim() == 2) return x.index_select(0, rows);
  const int64_t L = std::max<int64_t>(1, x.size(1));
  return x.index({rows.div(L, "floor"), rows.remainder(L)});
}

template <typename acc_t, Kind K>
std::vector<at::Tensor> run(const at::Tensor& hs, const at::Tensor& Ws, const at::Tensor& bs, const at::Tensor& ht,
                            const at::Tensor& Wt, const at::Tensor& bt, const at::Tensor& tl,
                            const at::Tensor& labels, const at::Tensor& grad_scale, const Call& c0,
                            const std::vector<bool>& need, int64_t v_tile, int64_t tile_elements,
                            int64_t ignore_index) {
  const auto acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const int64_t N = row_layout(hs, "student_hidden").rows, V = Ws.size(0);
  Call c = c0;
  c.want_s = need[0] || need[1] || need[2];
  c.want_t = need[3] || need[4] || need[5] || need[6];
  const bool any_grad = c.want_s || c.want_t;
  at::Tensor loss = at::zeros({N}, hs.options().dtype(acc));
  const at::Tensor srcs[7] = {hs, Ws, bs, ht, Wt, bt, tl};
  std::vector<at::Tensor> grads(7);
  for (int i = 0; i < 7; ++i) {
    if (!need[i] || !srcs[i].defined()) continue;
    const bool row_tensor = i == 0 || i == 3 || i == 6;  // [N, D], whatever the layout of the rows
    grads[i] = row_tensor ? at::zeros({N, srcs[i].size(-1)}, srcs[i].options().dtype(acc))
                          : at::zeros(srcs[i].sizes(), srcs[i].options().dtype(acc));
  }

  at::Tensor keep = labels.defined() ? at::nonzero(labels != ignore_index).squeeze(1)
                                     : at::arange(N, hs.options().dtype(at::kLong));
  const int64_t n = keep.numel();
  auto finish = [&]() {
    std::vector<at::Tensor> out{loss};
    for (int i = 0; i < 7; ++i) out.push_back(grads[i].defined() ? grads[i].to(srcs[i].scalar_type()) : at::Tensor());
    return out;
  };
  if (n == 0) return finish();
  const at::Tensor hs_k = take_rows(hs, keep).to(acc).contiguous();
  const at::Tensor ht_k = ht.defined() ? take_rows(ht, keep).to(acc).contiguous() : at::Tensor();
  const at::Tensor lab_k = labels.defined() ? labels.index_select(0, keep).contiguous() : at::Tensor();
  const int64_t* lab = lab_k.defined() ? lab_k.data_ptr<int64_t>() : nullptr;
  at::Tensor g_all = grad_scale.to(at::kDouble).reshape({-1});
  std::vector<acc_t> g(n);
  {
    const at::Tensor gk = g_all.numel() == 1 ? g_all.expand({n}).contiguous() : g_all.index_select(0, keep);
    const double* gp = gk.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) g[i] = static_cast<acc_t>(gp[i]);
  }
  // a cross-entropy label outside [0, V) (unchecked under torch.compile): a NaN loss, and a NaN
  // gradient scale so that every gradient it reaches is NaN too (never a silently wrong CE)
  std::vector<bool> bad(n, false);
  if (c.ce) {
    for (int64_t i = 0; i < n; ++i) {
      if (lab[i] < 0 || lab[i] >= V) {
        bad[i] = true;
        g[i] = std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  }
  at::Tensor dhs_k = grads[0].defined() ? at::zeros({n, hs.size(-1)}, hs.options().dtype(acc)) : at::Tensor();
  at::Tensor dht_k = grads[3].defined() ? at::zeros({n, ht.size(-1)}, ht.options().dtype(acc)) : at::Tensor();

  RowStats<acc_t> st(n);
  const Transform<acc_t> fs(c.s_scale, c.s_cap), ft(c.t_scale, c.t_cap);
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(n, tile_elements / v_tile));

  // the logits tiles of rows [r0, r0 + rn) and columns [v0, v0 + vt)
  struct Weights {
    at::Tensor ws, bs, wt, bt;
  };
  auto weights = [&](int64_t v0, int64_t vt) {
    Weights w;
    w.ws = Ws.narrow(0, v0, vt).to(acc);
    if (bs.defined()) w.bs = bs.narrow(0, v0, vt).to(acc);
    if (Wt.defined()) w.wt = Wt.narrow(0, v0, vt).to(acc);
    if (bt.defined()) w.bt = bt.narrow(0, v0, vt).to(acc);
    return w;
  };
  auto tiles = [&](const Weights& w, int64_t r0, int64_t rn, int64_t v0, int64_t vt) {
    const at::Tensor h = hs_k.narrow(0, r0, rn);
    at::Tensor zs = w.bs.defined() ? at::addmm(w.bs, h, w.ws.t()) : at::mm(h, w.ws.t());
    at::Tensor zt;
    if (tl.defined()) {  // given logits, any dtype: this tile's block, gathered from the strided rows
      zt = take_rows(tl.narrow(-1, v0, vt), keep.narrow(0, r0, rn)).to(acc).contiguous();
    } else {
      const at::Tensor h2 = ht_k.narrow(0, r0, rn);
      zt = w.bt.defined() ? at::addmm(w.bt, h2, w.wt.t()) : at::mm(h2, w.wt.t());
    }
    zs = zs.contiguous();
    zt = zt.contiguous();
    if (!fs.identity()) transform_row<acc_t>(zs.data_ptr<acc_t>(), zs.data_ptr<acc_t>(), rn * vt, fs);  // in place
    if (!ft.identity()) transform_row<acc_t>(zt.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), rn * vt, ft);
    return std::make_pair(zs, zt);
  };
  // every pass: over vocabulary tiles, then blocks of rows; fn(w, r0, rn, v0, vt, zs, zs_p, zt_p)
  auto for_each_tile = [&](auto&& fn) {
    for (int64_t v0 = 0; v0 < V; v0 += v_tile) {
      const int64_t vt = std::min(v_tile, V - v0);
      const Weights w = weights(v0, vt);
      for (int64_t r0 = 0; r0 < n; r0 += rows_per_block) {
        const int64_t rn = std::min(rows_per_block, n - r0);
        const auto zz = tiles(w, r0, rn, v0, vt);
        fn(w, r0, rn, v0, vt, zz.first, zz.first.template data_ptr<acc_t>(), zz.second.template data_ptr<acc_t>());
      }
    }
  };

  // ---- pass 1
  for_each_tile([&](const Weights&, int64_t r0, int64_t rn, int64_t v0, int64_t vt, const at::Tensor&,
                    const acc_t* zs_p, const acc_t* zt_p) {
    at::parallel_for(0, rn, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = r0 + i;
        pass1_row<acc_t, K>(zs_p + i * vt, zt_p + i * vt, vt, r, st, c);
        if (c.ce && lab[r] >= v0 && lab[r] < v0 + vt) st.s_label[r] = zs_p[i * vt + (lab[r] - v0)];
      }
    });
  });
  for (int64_t r = 0; r < n; ++r) {
    const acc_t la = std::log(st.za[r]), lb = std::log(st.zb[r]);
    st.lse_a[r] = st.Ma[r] + la;
    st.lse_b[r] = st.Mb[r] + lb;
    st.lse_c[r] = c.ce_own_lse ? st.Ma[r] * acc_t(c.temp) + std::log(st.zc[r]) : st.lse_a[r];
    // (lse_b - lse_a) grouped as (Mb - Ma) + log(zb / za): no cancellation of the maxima
    if (K == Kind::Forward) st.D[r] = st.w[r] / st.zb[r] - ((st.Mb[r] - st.Ma[r]) + (lb - la));
    if (K == Kind::Reverse) st.D[r] = st.w[r] / st.za[r] - ((st.Ma[r] - st.Mb[r]) + (la - lb));
  }
  if (second_sweep(K)) {  // K1, K2 (Ks, Kt for JSD)
    for_each_tile([&](const Weights&, int64_t r0, int64_t rn, int64_t, int64_t vt, const at::Tensor&,
                      const acc_t* zs_p, const acc_t* zt_p) {
      at::parallel_for(0, rn, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) pair_row<acc_t, K>(zs_p + i * vt, zt_p + i * vt, vt, r0 + i, st, c);
      });
    });
    for (int64_t r = 0; r < n; ++r) st.D[r] = pair_value<acc_t, K>(st.Ks[r], st.Kt[r], acc_t(c.beta));
  }
  {
    std::vector<acc_t> rows(n);
    for (int64_t r = 0; r < n; ++r) {
      rows[r] = acc_t(c.kd_weight) * st.D[r];
      if (c.ce) rows[r] += acc_t(c.ce_weight) * (st.lse_c[r] - st.s_label[r]);  // CE = lse(z_s) - z_s[label]
      if (bad[r]) rows[r] = std::numeric_limits<acc_t>::quiet_NaN();
    }
    at::Tensor rows_t = at::from_blob(rows.data(), {n}, at::TensorOptions().dtype(acc)).clone();
    loss.index_copy_(0, keep, rows_t);
  }
  if (!any_grad) return finish();

  // ---- pass 2
  for_each_tile([&](const Weights& w, int64_t r0, int64_t rn, int64_t v0, int64_t vt, const at::Tensor& zs,
                    const acc_t* zs_p, const acc_t* zt_p) {
    at::Tensor dzs = c.want_s ? at::empty({rn, vt}, zs.options()) : at::Tensor();
    at::Tensor dzt = c.want_t ? at::empty({rn, vt}, zs.options()) : at::Tensor();
    acc_t* dzs_p = dzs.defined() ? dzs.template data_ptr<acc_t>() : nullptr;
    acc_t* dzt_p = dzt.defined() ? dzt.template data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, rn, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = r0 + i;
        grad_row<acc_t, K>(zs_p + i * vt, zt_p + i * vt, dzs_p ? dzs_p + i * vt : nullptr,
                           dzt_p ? dzt_p + i * vt : nullptr, vt, c.ce ? lab[r] - v0 : -1, r, g[r], st, c);
        // through the transforms: dZ *= df/dz, from the transformed tile (in place)
        if (dzs_p && !fs.identity()) chain_row<acc_t>(dzs_p + i * vt, zs_p + i * vt, dzs_p + i * vt, vt, fs);
        if (dzt_p && !ft.identity()) chain_row<acc_t>(dzt_p + i * vt, zt_p + i * vt, dzt_p + i * vt, vt, ft);
      }
    });
    if (dzs.defined()) {
      if (dhs_k.defined()) dhs_k.narrow(0, r0, rn).addmm_(dzs, w.ws);
      if (grads[1].defined()) grads[1].narrow(0, v0, vt).addmm_(dzs.t(), hs_k.narrow(0, r0, rn));
      if (grads[2].defined()) grads[2].narrow(0, v0, vt).add_(dzs.sum(0));
    }
    if (dzt.defined()) {
      if (dht_k.defined()) dht_k.narrow(0, r0, rn).addmm_(dzt, w.wt);
      if (grads[4].defined()) grads[4].narrow(0, v0, vt).addmm_(dzt.t(), ht_k.narrow(0, r0, rn));
      if (grads[5].defined()) grads[5].narrow(0, v0, vt).add_(dzt.sum(0));
      if (grads[6].defined()) {
        grads[6].index_put_({keep.narrow(0, r0, rn).unsqueeze(1), at::arange(v0, v0 + vt, keep.options())}, dzt);
      }
    }
  });
  if (dhs_k.defined()) grads[0].index_copy_(0, keep, dhs_k);
  if (dht_k.defined()) grads[3].index_copy_(0, keep, dht_k);
  return finish();
}

}  // namespace

std::vector<at::Tensor> fused_linear_kl_forward_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, double temperature, int64_t kind,
    double beta, int64_t ignore_index, double ce_weight, double kd_weight, const std::vector<bool>& need,
    int64_t v_tile, int64_t tile_elements, double s_scale, double s_cap, double t_scale, double t_cap) {
  TORCH_CHECK(s_scale > 0 && t_scale > 0 && s_cap >= 0 && t_cap >= 0, "logit scales must be > 0 and soft-caps >= 0");
  TORCH_CHECK(student_weight.dim() == 2 && student_hidden.size(-1) == student_weight.size(1),
              "fused_linear_kl_forward_cpu: hidden [N, H] (or [B, L, H] rows) and weight [V, H] expected");
  const int64_t rows = row_layout(student_hidden, "student_hidden").rows;
  if (teacher_hidden.has_value()) {
    TORCH_CHECK(row_layout(*teacher_hidden, "teacher_hidden").rows == rows, "teacher_hidden: ", rows, " rows expected");
  }
  if (teacher_logits.has_value()) {
    TORCH_CHECK(row_layout(*teacher_logits, "teacher_logits").rows == rows, "teacher_logits: ", rows, " rows expected");
  }
  TORCH_CHECK(teacher_logits.has_value() != (teacher_hidden.has_value() && teacher_weight.has_value()),
              "fused_linear_kl_forward_cpu: teacher logits, or teacher hidden and weight");
  TORCH_CHECK(need.size() == 7, "need: 7 flags");
  TORCH_CHECK(kind >= 0 && kind <= 5 && temperature > 0 && v_tile > 0 && tile_elements > 0,
              "fused_linear_kl_forward_cpu: bad arguments");
  TORCH_CHECK(kind < 2 || kind > 4 || (beta > 0 && beta < 1), "jsd and the skew KL need 0 < beta < 1");
  TORCH_CHECK(ce_weight == 0 || (labels.has_value() && labels->defined()), "ce_weight > 0 needs labels");
  const at::Tensor hs = student_hidden, Ws = student_weight.contiguous(), bs = opt(student_bias);
  const at::Tensor ht = opt(teacher_hidden), Wt = teacher_weight.has_value() ? teacher_weight->contiguous()
                                                                            : at::Tensor();
  const at::Tensor bt = opt(teacher_bias), tl = opt(teacher_logits);
  const at::Tensor lab = labels.has_value() && labels->defined() ? labels->to(at::kLong) : at::Tensor();
  const bool fp64 = hs.scalar_type() == at::kDouble || Ws.scalar_type() == at::kDouble ||
                    (ht.defined() && ht.scalar_type() == at::kDouble) ||
                    (Wt.defined() && Wt.scalar_type() == at::kDouble) ||
                    (tl.defined() && tl.scalar_type() == at::kDouble);
  Call c;
  c.inv_t = 1.0 / temperature;
  c.temp = temperature;
  c.beta = beta;
  c.ce_weight = ce_weight;
  c.kd_weight = kd_weight;
  c.kind = kind;
  c.ce = ce_weight != 0;
  c.same_t = temperature == 1.0;
  c.ce_own_lse = c.ce && !c.same_t;
  c.want_s = c.want_t = false;
  c.s_scale = s_scale;
  c.s_cap = s_cap;
  c.t_scale = t_scale;
  c.t_cap = t_cap;
  auto go = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    switch (static_cast<Kind>(kind)) {
      case Kind::Forward:
        return run<acc_t, Kind::Forward>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile,
                                         tile_elements, ignore_index);
      case Kind::Reverse:
        return run<acc_t, Kind::Reverse>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile,
                                         tile_elements, ignore_index);
      case Kind::JSD:
        return run<acc_t, Kind::JSD>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile, tile_elements,
                                     ignore_index);
      case Kind::SkewForward:
        return run<acc_t, Kind::SkewForward>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile,
                                             tile_elements, ignore_index);
      case Kind::SkewReverse:
        return run<acc_t, Kind::SkewReverse>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile,
                                             tile_elements, ignore_index);
      default:
        return run<acc_t, Kind::TVD>(hs, Ws, bs, ht, Wt, bt, tl, lab, grad_scale, c, need, v_tile, tile_elements,
                                     ignore_index);
    }
  };
  return fp64 ? go(double{}) : go(float{});
}

}  // namespace kdk
