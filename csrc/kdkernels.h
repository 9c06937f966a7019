// Declarations shared by the C++ kernels (csrc/) and their bindings (python/).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace kdk {

// Divergence selector, shared with kdkernels/softmax_divergence.py (DIVERGENCES). The kinds from JSD on
// take two row sums K1, K2 before their gradient (kdkernels/_core/divergences.py derives them).
enum class Kind : int64_t { Forward = 0, Reverse = 1, JSD = 2, SkewForward = 3, SkewReverse = 4, TVD = 5 };
constexpr bool second_sweep(Kind k) { return static_cast<int64_t>(k) >= 2; }

// Per-row inputs are [N, D] (row stride stride(0)) or [B, L, D] (row r at (r / L) stride(0) + (r % L) stride(1):
// the rows of a strided view such as logits[:, :-1], read without a copy); the last dimension contiguous.
struct RowLayout {
  int64_t rows = 0, inner = 1, outer_stride = 0, inner_stride = 0;
  bool two_level = false;  // [B, L, D] with B, L > 1; else row r is at r * inner_stride
  int64_t offset(int64_t r) const {
    return two_level ? (r / inner) * outer_stride + (r % inner) * inner_stride : r * inner_stride;
  }
};

inline RowLayout row_layout(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, name, " must be [N, D] or [B, L, D] rows, got ", x.sizes());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, name, ": the last dimension must be contiguous");
  RowLayout r;
  r.rows = x.dim() == 2 ? x.size(0) : x.size(0) * x.size(1);
  r.inner = std::max<int64_t>(1, r.rows);
  if (x.dim() == 2) {
    r.inner_stride = x.stride(0);
  } else if (x.size(0) > 1 && x.size(1) > 1) {
    r.two_level = true;
    r.inner = x.size(1);
    r.outer_stride = x.stride(0);
    r.inner_stride = x.stride(1);
  } else {  // one of B, L is 1: a single strided run of rows
    r.inner_stride = x.size(1) > 1 ? x.stride(1) : x.stride(0);
  }
  return r;
}

// Fused softmax-KL (+ optional hard-label CE) on the CPU; see csrc/cpu/softmax_kl.cpp. student and teacher:
// rows (RowLayout) with the same number of rows N and the same V.
// Returns (loss_rows [N] fp32|fp64, grad_student [N,V] or undefined, grad_teacher [N,V] or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, double temperature, int64_t kind, double beta, int64_t ignore_index,
    double ce_weight, double kd_weight, bool need_grad_student, bool need_grad_teacher, double s_scale = 1.0,
    double s_cap = 0.0, double t_scale = 1.0, double t_cap = 0.0);

// Fused-linear KL on the CPU; see csrc/cpu/fused_linear_kl.cpp. need: which of (student hidden, weight, bias,
// teacher hidden, weight, bias, teacher logits) get a gradient. Returns [loss_rows, then the 7 gradients
// (undefined where not needed)], gradients pre-multiplied by grad_scale (one value, or one per row).
std::vector<at::Tensor> fused_linear_kl_forward_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, double temperature, int64_t kind,
    double beta, int64_t ignore_index, double ce_weight, double kd_weight, const std::vector<bool>& need,
    int64_t v_tile, int64_t tile_elements, double s_scale = 1.0, double s_cap = 0.0, double t_scale = 1.0,
    double t_cap = 0.0);

// The pointwise generalized JSD of log-probabilities (Liger's LigerJSD) on the CPU; see csrc/cpu/logprob_jsd.cpp.
// input, target: rows (RowLayout) of the student's and teacher's log-probabilities; keep: [N] flags or none.
// Returns (loss_rows [N] fp32|fp64, d loss / d input [N, V] times scale, or undefined).
std::tuple<at::Tensor, at::Tensor> logprob_jsd_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& keep, double beta,
                                                           double scale, bool need_grad);

// Forward KL to a top-k teacher on the CPU; see csrc/cpu/topk_kl.cpp. Returns (loss_rows, grad_student or
// undefined), the gradient pre-multiplied by grad_scale.
std::tuple<at::Tensor, at::Tensor> topk_kl_forward_cpu(const at::Tensor& student, const at::Tensor& values,
                                                       const at::Tensor& indices,
                                                       const std::optional<at::Tensor>& labels,
                                                       const at::Tensor& grad_scale, bool values_are_logits,
                                                       bool uniform_tail, double temperature, int64_t ignore_index,
                                                       bool need_grad, double s_scale = 1.0, double s_cap = 0.0,
                                                       bool bucket_tail = false);

// The per-tile sweeps of the similarity losses (csrc/cpu/similarity.cpp; the tile loop is in
// kdkernels/ops/similarity.py). Tiles are contiguous [R, C] float or double; statistics 1-D, updated in place.
void sim_rows_lse(const at::Tensor& S, at::Tensor& m, at::Tensor& z);
void sim_cols_lse(const at::Tensor& S, at::Tensor& m, at::Tensor& z);
double sim_softmax_grad(at::Tensor& S, const at::Tensor& lse_r, const at::Tensor& w_r,
                        const std::optional<at::Tensor>& lse_c, const std::optional<at::Tensor>& w_c);
std::tuple<double, double> sim_sigmoid(at::Tensor& S, at::Tensor& loss, const std::optional<at::Tensor>& g,
                                       double bias);
void sim_rows_div(const at::Tensor& S, const at::Tensor& T, at::Tensor& ma, at::Tensor& za, at::Tensor& mb,
                  at::Tensor& zb, at::Tensor& w, int64_t kind);
void sim_rows_jsd(const at::Tensor& S, const at::Tensor& T, const at::Tensor& lse_a, const at::Tensor& lse_b,
                  at::Tensor& K1, at::Tensor& K2, double beta);
void sim_rows_grad(const at::Tensor& S, const at::Tensor& T, at::Tensor& out, const at::Tensor& lse_a,
                   const at::Tensor& lse_b, const at::Tensor& D, const at::Tensor& Ks, const at::Tensor& w_r,
                   int64_t kind, double beta);
void sim_xent_stats(const at::Tensor& S, const at::Tensor& T, at::Tensor& ms, at::Tensor& zs, at::Tensor& mt,
                    at::Tensor& zt, at::Tensor& u, bool cols);
double sim_xent_grad(at::Tensor& S, const at::Tensor& T, const at::Tensor& lse_sr, const at::Tensor& a_r,
                     const at::Tensor& lse_tr, const at::Tensor& b_r, const at::Tensor& lse_sc, const at::Tensor& a_c,
                     const at::Tensor& lse_tc, const at::Tensor& b_c);

// The per-tile epilogue of the feature-projection losses (csrc/cpu/projected_feature.cpp; the tile
// loop is in kdkernels/ops/projected_feature.py).
void feat_elementwise(at::Tensor& P, const at::Tensor& T, int64_t kind, double beta, double inv_dt, at::Tensor& rows,
                      const std::optional<at::Tensor>& g);
void feat_cos_stats(const at::Tensor& P, const at::Tensor& T, at::Tensor& stats);
void feat_cos_grad(at::Tensor& P, const at::Tensor& T, const at::Tensor& coef, const std::optional<at::Tensor>& dT);

// Debug switch: when on, kernels allocate their outputs filled with NaN instead of uninitialized,
// so that an element a kernel forgets to write fails the tests (kdkernels._debug.poison_outputs).
void set_poison_outputs(bool on);
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Name of the SIMD instruction set the CPU kernels were compiled for ("avx2", "avx512", "neon", "generic").
const char* cpu_simd();

}  // namespace kdk
