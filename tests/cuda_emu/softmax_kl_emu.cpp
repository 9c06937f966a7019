// The CUDA softmax-KL kernels of csrc/cuda, compiled for the host and run under the emulation of
// emu.h, behind the same argument handling as the real binding (python/softmax_kl_device.h).
// Built on the fly by tests/test_cuda_emu.py (torch.utils.cpp_extension.load).
#include <torch/extension.h>

#include "emu.h"  // first: the device primitives for the host

#include "cuda/softmax_kl.cuh"
#include "softmax_kl_device.h"

namespace {

using namespace kdk::cuda;

// Outputs start as NaN, so an element the kernel does not write fails the comparison.
at::Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>
forward_emu(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
            const at::Tensor& grad_scale, double temperature, int64_t kind, double beta, int64_t ignore_index,
            double ce_weight, double kd_weight, bool need_grad_student, bool need_grad_teacher, double s_scale,
            double s_cap, double t_scale, double t_cap, int64_t cc_major,
            int64_t max_smem_per_block, int64_t max_cluster, int64_t target_smem_per_block, int64_t force_mode,
            int64_t force_cluster, int64_t force_threads, int64_t seed) {
  DeviceLimits limits;
  limits.cc_major = static_cast<int>(cc_major);
  limits.max_smem_per_block = max_smem_per_block;
  limits.max_cluster = static_cast<int>(max_cluster);
  limits.target_smem_per_block = target_smem_per_block;
  auto launch = [&](const SoftmaxKLArgs& a, Plan* plan_out) -> std::string {
    if (a.N == 0) return "";
    Plan plan = plan_softmax_kl(a, limits);
    if (!plan.error.empty()) return plan.error;
    *plan_out = plan;
    return dispatch_softmax_kl(a, plan, [&](void (*kernel)(Params), const Params& params) -> std::string {
      try {
        kdk::emu::launch(kernel, params, a.inner * plan.cluster, plan.threads, plan.cluster, plan.smem,
                         static_cast<uint64_t>(seed), a.N / a.inner);
      } catch (const std::exception& e) {
        return e.what();
      }
      return "";
    });
  };
  return kdk::softmax_kl_forward_device(student, teacher, labels, grad_scale, temperature, kind, beta, ignore_index,
                                        ce_weight, kd_weight, need_grad_student, need_grad_teacher, s_scale, s_cap,
                                        t_scale, t_cap, force_mode, force_cluster, force_threads, poisoned, launch);
}

// The plan the launcher would pick for rows of V logits at 256-byte aligned addresses.
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> plan(int64_t V, int64_t s_dtype, int64_t t_dtype,
                                                             int64_t kind, int64_t cc_major,
                                                             int64_t max_smem_per_block, int64_t max_cluster,
                                                             int64_t target_smem_per_block) {
  alignas(256) static const unsigned char base[256] = {};
  SoftmaxKLArgs a;
  a.student = a.teacher = a.grad_student = const_cast<unsigned char*>(base);
  a.N = 1;
  a.V = a.stride_s = a.stride_t = V;
  a.inner = 1;
  a.student_dtype = static_cast<int>(s_dtype);
  a.teacher_dtype = static_cast<int>(t_dtype);
  a.kind = static_cast<int>(kind);
  DeviceLimits d;
  d.cc_major = static_cast<int>(cc_major);
  d.max_smem_per_block = max_smem_per_block;
  d.max_cluster = static_cast<int>(max_cluster);
  d.target_smem_per_block = target_smem_per_block;
  const Plan p = plan_softmax_kl(a, d);
  return {p.mode, p.cluster, p.threads, p.seg, p.smem};
}

// Self-test of the emulation: each thread writes its slot of shared memory, optionally waits at
// the barrier, and reads its neighbour's slot. Returns how many threads read the right value.
void neighbour_kernel(const int* args) {
  int* smem = reinterpret_cast<int*>(kdk::dev::dynamic_smem());
  const int t = kdk::dev::thread_idx(), n = kdk::dev::block_dim();
  smem[t] = t + 1;
  if (args[0]) kdk::dev::sync_threads();
  const int got = smem[(t + 1) % n];
  if (got == (t + 1) % n + 1) smem[n + t] = 1;
  kdk::dev::sync_threads();
  if (t == 0) {
    int ok = 0;
    for (int i = 0; i < n; ++i) ok += smem[n + i] == 1;
    const_cast<int*>(args)[1] = ok;
  }
}
// Only the even threads reach the barrier: a deadlock.
void half_barrier_kernel(const int*) {
  if (kdk::dev::thread_idx() % 2 == 0) kdk::dev::sync_threads();
}

int64_t selftest(const std::string& which, int64_t threads) {
  int args[2] = {which == "synced", -1};
  void (*kernel)(const int*) = which == "half_barrier" ? half_barrier_kernel : neighbour_kernel;
  kdk::emu::launch(kernel, static_cast<const int*>(args), 1, static_cast<int>(threads), 1, 8 * threads, 7);
  return args[1];
}

std::tuple<int64_t, int64_t> take_traffic() {
  auto& t = kdk::emu::traffic();
  std::tuple<int64_t, int64_t> out{t.read, t.written};
  t = {};
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_kl_forward_emu", &forward_emu, "CUDA softmax-KL kernels run on the CPU under emulation");
  m.def("plan", &plan, "The launch plan for rows of V logits on a GPU with the given limits");
  m.def("selftest", &selftest, "Emulation self-test: 'synced' / 'unsynced' neighbour exchange, 'half_barrier'");
  m.def("take_traffic", &take_traffic, "(bytes read, bytes written) in global memory since the last call; resets");
}
