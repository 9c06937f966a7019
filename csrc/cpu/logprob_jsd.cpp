// The generalized JSD of log-probabilities, pointwise (Liger-Kernel's LigerJSD), on the CPU: the loss
// of each row and its gradient with respect to the student's log-probabilities X, in one sweep.
//
// With X = log q (student) and Y = log p (teacher), per element (kdkernels/ops/kl_div.py derives it):
//   beta = 0:  l = e^Y (Y - X)                                    dl/dX = -e^Y
//   beta = 1:  l = e^X (X - Y)                                    dl/dX = e^X (X - Y) + e^X
//   else:      log m = log(beta e^Y + (1 - beta) e^X)            (from max(X, Y): never log 0 of an underflow)
//              l = beta e^Y (Y - log m) + (1 - beta) e^X (X - log m)   dl/dX = (1 - beta) e^X (X - log m)
// A zero probability contributes 0 (p == 0 test: a NaN keeps its NaN). Row loss = sum l; the gradient
// is written scaled by `scale` in X's dtype. Rows whose keep flag is false: 0 and a zero gradient.
// Memory: one read of X and Y, one write of the gradient; nothing else of size N x V.

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../kdkernels.h"
#include "sweeps.h"

namespace kdk {
namespace {

using namespace kdk::cpu;

template <typename acc_t>
struct Jsd {
  acc_t beta;
  int mode;  // 0: beta = 0, 1: beta = 1, 2: 0 < beta < 1

  // one element: (loss term, d/dX)
  void scalar(acc_t x, acc_t y, acc_t& l, acc_t& d) const {
    const acc_t p = std::exp(y), q = std::exp(x);
    if (mode == 0) {
      l = p == 0 ? acc_t(0) : p * (y - x);
      d = -p;
    } else if (mode == 1) {
      l = q == 0 ? acc_t(0) : q * (x - y);
      d = l + q;
    } else {
      acc_t mx = (std::isnan(x) || std::isnan(y)) ? std::numeric_limits<acc_t>::quiet_NaN() : std::max(x, y);
      if (std::isinf(mx)) mx = 0;
      const acc_t lm = mx + std::log(beta * std::exp(y - mx) + (acc_t(1) - beta) * std::exp(x - mx));
      const acc_t lq = q == 0 ? acc_t(0) : q * (x - lm);
      const acc_t lp = p == 0 ? acc_t(0) : p * (y - lm);
      l = beta * lp + (acc_t(1) - beta) * lq;
      d = (acc_t(1) - beta) * lq;
    }
  }

  // one vector of elements
  void vector(const Vectorized<acc_t>& x, const Vectorized<acc_t>& y, Vectorized<acc_t>& l,
              Vectorized<acc_t>& d) const {
    using Vec = Vectorized<acc_t>;
    const Vec zero(0), p = vexp(y), q = vexp(x);
    auto times = [&](const Vec& a, const Vec& b) { return Vec::blendv(a * b, zero, a == zero); };  // 0 where a == 0
    if (mode == 0) {
      l = times(p, y - x);
      d = zero - p;
    } else if (mode == 1) {
      l = times(q, x - y);
      d = l + q;
    } else {
      constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
      Vec mx = at::vec::maximum(x, y);  // NaN-propagating
      mx = Vec::blendv(mx, zero, (mx == Vec(kInf)) | (mx == Vec(-kInf)));
      const Vec lm = mx + (Vec(beta) * vexp(y - mx) + Vec(acc_t(1) - beta) * vexp(x - mx)).log();
      const Vec lq = times(q, x - lm);
      l = Vec(beta) * times(p, y - lm) + Vec(acc_t(1) - beta) * lq;
      d = Vec(acc_t(1) - beta) * lq;
    }
  }
};

template <typename acc_t, typename TX, typename TY>
void run(const at::Tensor& X, const at::Tensor& Y, const bool* keep, const Jsd<acc_t>& f, acc_t scale,
         at::Tensor& loss, at::Tensor& grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const RowLayout lx = row_layout(X, "input"), ly = row_layout(Y, "target");
  const int64_t N = lx.rows, V = X.size(-1), V_full = V / W * W;
  const TX* x_base = X.data_ptr<TX>();
  const TY* y_base = Y.data_ptr<TY>();
  TX* g_base = grad.defined() ? grad.data_ptr<TX>() : nullptr;
  acc_t* loss_ptr = loss.data_ptr<acc_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      TX* g = g_base ? g_base + r * V : nullptr;
      if (keep && !keep[r]) {
        loss_ptr[r] = 0;
        if (g) std::fill(g, g + V, static_cast<TX>(0));
        continue;
      }
      const TX* x = x_base + lx.offset(r);
      const TY* y = y_base + ly.offset(r);
      Vec acc(0), l, d;
      const Vec vs(scale);
      for (int64_t k = 0; k < V_full; k += W) {
        f.vector(VecIO<acc_t, TX>::load(x + k), VecIO<acc_t, TY>::load(y + k), l, d);
        acc = acc + l;
        if (g) VecIO<acc_t, TX>::store(g + k, d * vs);
      }
      acc_t total = hsum(acc);
      for (int64_t k = V_full; k < V; ++k) {
        acc_t ls, ds;
        f.scalar(static_cast<acc_t>(x[k]), static_cast<acc_t>(y[k]), ls, ds);
        total += ls;
        if (g) g[k] = static_cast<TX>(ds * scale);
      }
      loss_ptr[r] = total;
    }
  });
}


}  // namespace

std::tuple<at::Tensor, at::Tensor> logprob_jsd_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& keep, double beta,
                                                           double scale, bool need_grad) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(), "logprob_jsd_forward_cpu: CPU tensors expected");
  const RowLayout lx = row_layout(input, "input"), ly = row_layout(target, "target");
  TORCH_CHECK(lx.rows == ly.rows && input.size(-1) == target.size(-1),
              "input and target must hold the same [N, V] rows, got ", input.sizes(), " and ", target.sizes());
  TORCH_CHECK(beta >= 0 && beta <= 1, "beta must be in [0, 1]");
  const int64_t N = lx.rows, V = input.size(-1);
  const bool fp64 = input.scalar_type() == at::kDouble;
  TORCH_CHECK(fp64 == (target.scalar_type() == at::kDouble), "float64 input and target go together; cast both");
  at::Tensor keep_c;
  if (keep.has_value() && keep->defined()) {
    TORCH_CHECK(keep->numel() == N, "keep must have one flag per row");
    keep_c = keep->to(at::kBool).contiguous();
  }
  at::Tensor loss = new_output({N}, input.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor grad = need_grad ? new_output({N, V}, input.options()) : at::Tensor();
  if (N == 0 || V == 0) return {loss.zero_(), grad};
  const bool* kp = keep_c.defined() ? keep_c.data_ptr<bool>() : nullptr;
  const int mode = beta == 0 ? 0 : beta == 1 ? 1 : 2;
  dispatch_float(input.scalar_type(), "input", [&](auto x_tag) {
    dispatch_float(target.scalar_type(), "target", [&](auto y_tag) {
      using TX = decltype(x_tag);
      using TY = decltype(y_tag);
      if constexpr (std::is_same_v<TX, double> == std::is_same_v<TY, double>) {
        using acc_t = std::conditional_t<std::is_same_v<TX, double>, double, float>;
        const Jsd<acc_t> f{static_cast<acc_t>(beta), mode};
        run<acc_t, TX, TY>(input, target, kp, f, static_cast<acc_t>(scale), loss, grad);
      }
    });
  });
  return {loss, grad};
}

}  // namespace kdk
