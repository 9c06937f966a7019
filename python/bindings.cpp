// pybind11 bindings of csrc/ into kdkernels._C.
#include <torch/extension.h>

#include "../csrc/kdkernels.h"

namespace {

bool built_with_cuda() {
#ifdef KDK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels compiled kernels (CPU always; CUDA when built with KDK_CUDA)";
  m.def("softmax_kl_forward_cpu", &kdk::softmax_kl_forward_cpu, py::arg("student"), py::arg("teacher"),
        py::arg("labels"), py::arg("grad_scale"), py::arg("temperature"), py::arg("kind"), py::arg("beta"),
        py::arg("ignore_index"), py::arg("ce_weight"), py::arg("kd_weight"), py::arg("need_grad_student"),
        py::arg("need_grad_teacher"),
        "Fused softmax-KL on the CPU: returns (loss_rows, grad_student|None, grad_teacher|None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_poison_outputs", &kdk::set_poison_outputs, py::arg("on"),
        "Debug: allocate kernel outputs filled with NaN so that unwritten elements show.");
  m.def("cpu_simd", &kdk::cpu_simd, "SIMD instruction set the CPU kernels were compiled for.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
}
