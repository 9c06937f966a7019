// Torch side of the CUDA softmax-KL kernels: checks the tensors, allocates the outputs and fills
// the raw kdk::cuda::SoftmaxKLArgs. Shared by the CUDA binding (bindings.cpp, KDK_WITH_CUDA) and the
// CPU emulation of the same kernels (tests/cuda_emu/), which pass their own `alloc` and `launch`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "../csrc/cuda/softmax_kl_plan.h"
#include "../csrc/kdkernels.h"

namespace kdk {

inline int cuda_dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::kFloat32;
    case at::kBFloat16: return cuda::kBFloat16;
    case at::kHalf: return cuda::kFloat16;
    case at::kDouble: return cuda::kFloat64;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  }
}

// (loss_rows [N], grad_student [N, V] or undefined, grad_teacher [N, V] or undefined, plan).
// `plan` is (mode, cluster, threads, seg, smem): what the planner chose, for tests and benchmarks.
template <class Alloc, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>
softmax_kl_forward_device(const at::Tensor& student_rows, const at::Tensor& teacher_rows,
                          const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, double temperature,
                          int64_t kind, double beta, int64_t ignore_index, double ce_weight, double kd_weight,
                          bool need_grad_student, bool need_grad_teacher, double s_scale, double s_cap,
                          double t_scale, double t_cap, int64_t force_mode, int64_t force_cluster,
                          int64_t force_threads, Alloc&& alloc, Launch&& launch) {
  at::Tensor student = student_rows, teacher = teacher_rows;
  RowLayout ls = row_layout(student, "softmax_kl (cuda): student");
  RowLayout lt = row_layout(teacher, "softmax_kl (cuda): teacher");
  TORCH_CHECK(ls.rows == lt.rows && student.size(-1) == teacher.size(-1),
              "softmax_kl (cuda): student and teacher must hold the same [N, V] rows, got ", student.sizes(),
              " and ", teacher.sizes());
  // The grid is B x L row blocks of the two-level input(s) (SoftmaxKLArgs). Two two-level inputs of
  // different L, or a B beyond gridDim.y (65535), are not expressible: those rows are made one-level
  // (a copy; a causal-shift view of [B, L, V] logits never needs it).
  auto one_level = [](at::Tensor& x, RowLayout& l, const char* name) {
    x = x.reshape({l.rows, x.size(-1)}).contiguous();
    l = row_layout(x, name);
  };
  if (ls.two_level && lt.two_level && ls.inner != lt.inner) one_level(teacher, lt, "teacher");
  const int64_t grid_inner = ls.two_level ? ls.inner : lt.two_level ? lt.inner : std::max<int64_t>(1, ls.rows);
  if (ls.rows / grid_inner > 65535) {
    if (ls.two_level) one_level(student, ls, "student");
    if (lt.two_level) one_level(teacher, lt, "teacher");
  }
  TORCH_CHECK(student.device() == teacher.device() && grad_scale.device() == student.device(),
              "softmax_kl (cuda): student, teacher and grad_scale must be on one device");
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
              "softmax_kl (cuda): grad_scale must be one float32 element");
  TORCH_CHECK(kind >= 0 && kind <= 5, "softmax_kl (cuda): kind must be 0 (forward), 1 (reverse), 2 (jsd), "
              "3 (skew forward), 4 (skew reverse) or 5 (tvd), got ", kind);
  TORCH_CHECK(kind < 2 || kind > 4 || (beta > 0.0 && beta < 1.0),
              "softmax_kl (cuda): jsd and the skew KL need 0 < beta < 1, got ", beta);
  TORCH_CHECK(s_scale > 0.0 && t_scale > 0.0 && s_cap >= 0.0 && t_cap >= 0.0,
              "softmax_kl (cuda): logit scales must be > 0 and soft-caps >= 0, got ", s_scale, ", ", t_scale, ", ",
              s_cap, ", ", t_cap);
  TORCH_CHECK(temperature > 0.0, "softmax_kl (cuda): temperature must be > 0, got ", temperature);
  TORCH_CHECK(ce_weight <= 0.0 || labels.has_value(), "softmax_kl (cuda): ce_weight > 0 needs labels");
  const int s_code = cuda_dtype_code(student, "student"), t_code = cuda_dtype_code(teacher, "teacher");
  TORCH_CHECK((s_code == cuda::kFloat64) == (t_code == cuda::kFloat64),
              "softmax_kl (cuda): float64 logits pair with float64 only");
  const int64_t N = ls.rows, V = student.size(-1);
  TORCH_CHECK(V >= 1, "softmax_kl (cuda): V must be >= 1");
  TORCH_CHECK(N <= INT32_MAX, "softmax_kl (cuda): at most 2^31 - 1 rows per call, got ", N);
  at::Tensor lab;
  if (labels.has_value()) {
    lab = labels->to(at::kLong).contiguous();
    TORCH_CHECK(lab.dim() == 1 && lab.size(0) == N && lab.device() == student.device(),
                "softmax_kl (cuda): labels must be [N] int64 on the logits' device");
  }
  const at::Tensor gscale = grad_scale.reshape({1}).contiguous();

  const auto acc = s_code == cuda::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor loss = alloc(at::IntArrayRef{N}, student.options().dtype(acc));
  at::Tensor gs = need_grad_student ? alloc(at::IntArrayRef{N, V}, student.options()) : at::Tensor();
  at::Tensor gt = need_grad_teacher ? alloc(at::IntArrayRef{N, V}, teacher.options()) : at::Tensor();

  cuda::SoftmaxKLArgs a;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.labels = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
  a.grad_scale = gscale.data_ptr<float>();
  a.loss = loss.data_ptr();
  a.grad_student = gs.defined() ? gs.data_ptr() : nullptr;
  a.grad_teacher = gt.defined() ? gt.data_ptr() : nullptr;
  a.N = N;
  a.V = V;
  a.stride_s = ls.inner_stride;
  a.stride_t = lt.inner_stride;
  a.inner = ls.two_level ? ls.inner : lt.two_level ? lt.inner : std::max<int64_t>(1, N);
  a.two_level_s = ls.two_level;
  a.two_level_t = lt.two_level;
  a.outer_stride_s = ls.two_level ? ls.outer_stride : 0;
  a.outer_stride_t = lt.two_level ? lt.outer_stride : 0;
  a.student_dtype = s_code;
  a.teacher_dtype = t_code;
  a.kind = static_cast<int>(kind);
  a.inv_temperature = 1.0 / temperature;
  a.beta = kind >= 2 && kind <= 4 ? beta : 0.5;
  a.s_scale = s_scale;
  a.s_cap = s_cap;
  a.t_scale = t_scale;
  a.t_cap = t_cap;
  a.ce_weight = ce_weight;
  a.kd_weight = kd_weight;
  a.ignore_index = ignore_index;
  a.force_mode = static_cast<int>(force_mode);
  a.force_cluster = static_cast<int>(force_cluster);
  a.force_threads = static_cast<int>(force_threads);

  cuda::Plan plan;
  const std::string err = launch(a, &plan);
  TORCH_CHECK(err.empty(), "softmax_kl (cuda): ", err);
  return {loss, gs, gt, {plan.mode, plan.cluster, plan.threads, plan.seg, plan.smem}};
}

}  // namespace kdk
