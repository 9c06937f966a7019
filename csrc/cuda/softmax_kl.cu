// Launcher of the CUDA softmax-KL kernels (softmax_kl.cuh): reads the device's limits once, plans
// (softmax_kl_plan.h) and launches on the caller's stream. Raw CUDA runtime, no ATen: the torch
// bindings in python/ allocate the outputs and pass pointers and the current stream.
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "softmax_kl.cuh"

namespace kdk::cuda {
namespace {

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

constexpr int kMaxDevices = 64;

const DeviceLimits& limits_of(int device) {
  static DeviceLimits limits[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  std::call_once(once[device], [device] {
    DeviceLimits& d = limits[device];
    int v = 0;
    cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess) {
      d.max_smem_per_block = v;
    }
    // 8 blocks is the portable cluster size; 16 is tried at launch (it needs an opt-in and an SM
    // layout that can hold it) and falls back to 8 when the occupancy query says no.
    d.max_cluster = d.cc_major >= 9 ? 16 : 1;
    // the binary this GPU runs must itself be sm_90+ code (not sm_80 PTX JIT-compiled for it)
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, softmax_kl_staged<float, float, float, 0, false>) != cudaSuccess ||
        attr.binaryVersion < 90) {
      cudaGetLastError();
      d.max_cluster = 1;
    }
    d.target_smem_per_block = d.max_smem_per_block / 3;
  });
  return limits[device];
}

using Kernel = void (*)(Params);

// Launches one kernel; for clusters, checks with the occupancy API that the cluster can be
// resident and reports back through `fits` instead of failing.
std::string launch_one(Kernel kernel, const Params& params, const Plan& plan, cudaStream_t stream, bool* fits) {
  *fits = true;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(plan.smem));
  if (e != cudaSuccess) return cuda_error("cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", e);
  cudaLaunchConfig_t cfg = {};
  // B x L row blocks (one-level rows: L = N, B = 1); the binding keeps B within gridDim.y's 65535
  cfg.gridDim = dim3(static_cast<unsigned>(params.a.inner * plan.cluster), static_cast<unsigned>(params.a.N / params.a.inner));
  cfg.blockDim = dim3(static_cast<unsigned>(plan.threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (plan.cluster > 1) {
    if (plan.cluster > 8) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (e != cudaSuccess) {
        cudaGetLastError();
        *fits = false;
        return "";
      }
    }
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (e != cudaSuccess || clusters == 0) {
      cudaGetLastError();
      *fits = false;
      return "";
    }
  }
  e = cudaLaunchKernelEx(&cfg, kernel, params);
  if (e != cudaSuccess) return cuda_error("softmax_kl kernel launch", e);
  return "";
}

}  // namespace

std::string softmax_kl_launch(const SoftmaxKLArgs& args, void* stream, Plan* plan_out) {
  if (args.N == 0) return "";
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  if (device < 0 || device >= kMaxDevices) return "device ordinal out of range";
  DeviceLimits limits = limits_of(device);
  if (args.force_cluster > limits.max_cluster) {
    return "cluster size " + std::to_string(args.force_cluster) + " exceeds this GPU's limit of " +
           std::to_string(limits.max_cluster);
  }
  Plan plan = plan_softmax_kl(args, limits);
  if (!plan.error.empty()) return plan.error;
  // a cluster the GPU cannot hold (16 blocks not allowed here, or too much shared memory per
  // cluster): halve the cluster until it fits, then stream
  for (;;) {
    if (args.N * plan.cluster > 0x7fffffffLL) return "too many rows for one launch (N * cluster >= 2^31)";
    bool fits = true;
    std::string err = dispatch_softmax_kl(args, plan, [&](Kernel kernel, const Params& params) {
      return launch_one(kernel, params, plan, static_cast<cudaStream_t>(stream), &fits);
    });
    if (!err.empty() || fits) {
      if (plan_out) *plan_out = plan;
      return err;
    }
    if (args.force_cluster > 0) {
      return "cluster size " + std::to_string(args.force_cluster) + " cannot be resident on this GPU";
    }
    limits.max_cluster = plan.cluster / 2;
    limits.target_smem_per_block = limits.max_smem_per_block;
    plan = plan_softmax_kl(args, limits);
    if (!plan.error.empty()) return plan.error;
  }
}

}  // namespace kdk::cuda
