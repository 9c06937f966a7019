// pybind11 bindings of csrc/ into kdkernels._C.
#include <torch/extension.h>

#include "../csrc/kdkernels.h"

#ifdef KDK_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "softmax_kl_device.h"
#endif

namespace {

bool built_with_cuda() {
#ifdef KDK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef KDK_WITH_CUDA
// The CUDA softmax-KL kernels (csrc/cuda/softmax_kl.cu) on the current device and stream.
auto softmax_kl_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                             double temperature, int64_t kind, double beta, int64_t ignore_index, double ce_weight,
                             double kd_weight, bool need_grad_student, bool need_grad_teacher, double s_scale,
                             double s_cap, double t_scale, double t_cap, int64_t force_mode, int64_t force_cluster,
                             int64_t force_threads) {
  TORCH_CHECK(student.is_cuda(), "softmax_kl (cuda): the logits must be CUDA tensors, got ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  return kdk::softmax_kl_forward_device(
      student, teacher, labels, grad_scale, temperature, kind, beta, ignore_index, ce_weight, kd_weight,
      need_grad_student, need_grad_teacher, s_scale, s_cap, t_scale, t_cap, force_mode, force_cluster, force_threads,
      kdk::new_output,
      [stream](const kdk::cuda::SoftmaxKLArgs& a, kdk::cuda::Plan* plan) {
        return kdk::cuda::softmax_kl_launch(a, stream, plan);
      });
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels compiled kernels (CPU always; CUDA when built with KDK_CUDA)";
  m.def("softmax_kl_forward_cpu", &kdk::softmax_kl_forward_cpu, py::arg("student"), py::arg("teacher"),
        py::arg("labels"), py::arg("grad_scale"), py::arg("temperature"), py::arg("kind"), py::arg("beta"),
        py::arg("ignore_index"), py::arg("ce_weight"), py::arg("kd_weight"), py::arg("need_grad_student"),
        py::arg("need_grad_teacher"), py::arg("s_scale") = 1.0, py::arg("s_cap") = 0.0, py::arg("t_scale") = 1.0,
        py::arg("t_cap") = 0.0,
        "Fused softmax-KL on the CPU: returns (loss_rows, grad_student|None, grad_teacher|None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_linear_kl_forward_cpu", &kdk::fused_linear_kl_forward_cpu, py::arg("student_hidden"),
        py::arg("student_weight"), py::arg("student_bias"), py::arg("teacher_hidden"), py::arg("teacher_weight"),
        py::arg("teacher_bias"), py::arg("teacher_logits"), py::arg("labels"), py::arg("grad_scale"),
        py::arg("temperature"), py::arg("kind"), py::arg("beta"), py::arg("ignore_index"), py::arg("ce_weight"),
        py::arg("kd_weight"), py::arg("need"), py::arg("v_tile"), py::arg("tile_elements"), py::arg("s_scale") = 1.0,
        py::arg("s_cap") = 0.0, py::arg("t_scale") = 1.0, py::arg("t_cap") = 0.0,
        "Fused-linear KL on the CPU: [loss_rows, d student hidden/weight/bias, d teacher hidden/weight/bias, "
        "d teacher logits] (None where not needed).",
        py::call_guard<py::gil_scoped_release>());
  m.def("topk_kl_forward_cpu", &kdk::topk_kl_forward_cpu, py::arg("student"), py::arg("values"),
        py::arg("indices"), py::arg("labels"), py::arg("grad_scale"), py::arg("values_are_logits"),
        py::arg("uniform_tail"), py::arg("temperature"), py::arg("ignore_index"), py::arg("need_grad"),
        py::arg("s_scale") = 1.0, py::arg("s_cap") = 0.0, py::arg("bucket_tail") = false,
        "Forward KL to a top-k teacher on the CPU: (loss_rows, grad_student|None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("logprob_jsd_forward_cpu", &kdk::logprob_jsd_forward_cpu, py::arg("input"), py::arg("target"),
        py::arg("keep"), py::arg("beta"), py::arg("scale"), py::arg("need_grad"),
        "Pointwise generalized JSD of log-probabilities on the CPU: (loss_rows, grad_input|None).",
        py::call_guard<py::gil_scoped_release>());
  // the similarity losses' per-tile sweeps (in place; see csrc/cpu/similarity.cpp)
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("sim_rows_lse", &kdk::sim_rows_lse, py::arg("S"), py::arg("m"), py::arg("z"), nogil);
  m.def("sim_cols_lse", &kdk::sim_cols_lse, py::arg("S"), py::arg("m"), py::arg("z"), nogil);
  m.def("sim_softmax_grad", &kdk::sim_softmax_grad, py::arg("S"), py::arg("lse_r"), py::arg("w_r"),
        py::arg("lse_c"), py::arg("w_c"), nogil);
  m.def("sim_sigmoid", &kdk::sim_sigmoid, py::arg("S"), py::arg("loss"), py::arg("g"), py::arg("bias"), nogil);
  m.def("sim_rows_div", &kdk::sim_rows_div, py::arg("S"), py::arg("T"), py::arg("ma"), py::arg("za"),
        py::arg("mb"), py::arg("zb"), py::arg("w"), py::arg("kind"), nogil);
  m.def("sim_rows_jsd", &kdk::sim_rows_jsd, py::arg("S"), py::arg("T"), py::arg("lse_a"), py::arg("lse_b"),
        py::arg("K1"), py::arg("K2"), py::arg("beta"), nogil);
  m.def("sim_rows_grad", &kdk::sim_rows_grad, py::arg("S"), py::arg("T"), py::arg("out"), py::arg("lse_a"),
        py::arg("lse_b"), py::arg("D"), py::arg("Ks"), py::arg("w_r"), py::arg("kind"), py::arg("beta"), nogil);
  m.def("sim_xent_stats", &kdk::sim_xent_stats, py::arg("S"), py::arg("T"), py::arg("ms"), py::arg("zs"),
        py::arg("mt"), py::arg("zt"), py::arg("u"), py::arg("cols"), nogil);
  m.def("sim_xent_grad", &kdk::sim_xent_grad, py::arg("S"), py::arg("T"), py::arg("lse_sr"), py::arg("a_r"),
        py::arg("lse_tr"), py::arg("b_r"), py::arg("lse_sc"), py::arg("a_c"), py::arg("lse_tc"), py::arg("b_c"), nogil);
  // the feature-projection losses' per-tile epilogue (see csrc/cpu/projected_feature.cpp)
  m.def("feat_elementwise", &kdk::feat_elementwise, py::arg("P"), py::arg("T"), py::arg("kind"), py::arg("beta"),
        py::arg("inv_dt"), py::arg("rows"), py::arg("g"), nogil);
  m.def("feat_cos_stats", &kdk::feat_cos_stats, py::arg("P"), py::arg("T"), py::arg("stats"), nogil);
  m.def("feat_cos_grad", &kdk::feat_cos_grad, py::arg("P"), py::arg("T"), py::arg("coef"), py::arg("dT"), nogil);
  m.def("set_poison_outputs", &kdk::set_poison_outputs, py::arg("on"),
        "Debug: allocate kernel outputs filled with NaN so that unwritten elements show.");
  m.def("cpu_simd", &kdk::cpu_simd, "SIMD instruction set the CPU kernels were compiled for.");
#ifdef KDK_WITH_CUDA
  m.def("softmax_kl_forward_cuda", &softmax_kl_forward_cuda, py::arg("student"), py::arg("teacher"),
        py::arg("labels"), py::arg("grad_scale"), py::arg("temperature"), py::arg("kind"), py::arg("beta"),
        py::arg("ignore_index"), py::arg("ce_weight"), py::arg("kd_weight"), py::arg("need_grad_student"),
        py::arg("need_grad_teacher"), py::arg("s_scale") = 1.0, py::arg("s_cap") = 0.0, py::arg("t_scale") = 1.0,
        py::arg("t_cap") = 0.0, py::arg("force_mode") = -1, py::arg("force_cluster") = 0,
        py::arg("force_threads") = 0,
        "Fused softmax-KL with the CUDA C++ kernels: returns (loss_rows, grad_student|None, grad_teacher|None, "
        "plan) with plan = (mode 0 streaming / 1 staged, cluster, threads, logits per block, shared bytes).",
        py::call_guard<py::gil_scoped_release>());
#endif
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
}
