// Arguments and launch plan of the CUDA softmax-KL kernels: plain C++ (no CUDA, no ATen), shared by
// the launcher (softmax_kl.cu), the torch bindings (python/) and the CPU emulation (tests/cuda_emu/).
#pragma once

#include <cstdint>
#include <string>

namespace kdk::cuda {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : dtype == kFloat64 ? 8 : 2; }

// One call: the same contract as the CPU and Triton kernels (see softmax_kl.cuh).
struct SoftmaxKLArgs {
  // Rows of V logits with a unit column stride. The grid is B x L row blocks (L = inner): row
  // r = y L + l (y = blockIdx.y, l = the row block along x). A two-level tensor's row r starts
  // y * outer_stride + l * stride elements in (the rows of a [B, L, V] strided view such as
  // logits[:, :-1], read without a copy); a one-level tensor's at r * stride.
  const void* student = nullptr;   // stride_s, and outer_stride_s when two_level_s
  const void* teacher = nullptr;   // stride_t, and outer_stride_t when two_level_t
  const int64_t* labels = nullptr; // [N] or null
  const float* grad_scale = nullptr;  // 1 element, read on the device
  void* loss = nullptr;            // [N] float32 (float64 when student_dtype is float64)
  void* grad_student = nullptr;    // [N, V] contiguous in student_dtype, or null
  void* grad_teacher = nullptr;    // [N, V] contiguous in teacher_dtype, or null
  int64_t N = 0, V = 0, stride_s = 0, stride_t = 0;
  int64_t inner = 1, outer_stride_s = 0, outer_stride_t = 0;  // inner = L (N for one-level rows)
  bool two_level_s = false, two_level_t = false;
  int student_dtype = kFloat32, teacher_dtype = kFloat32;
  // 0 forward KL, 1 reverse KL, 2 generalized JSD, 3 skew forward KL, 4 skew reverse KL, 5 TVD;
  // beta: the mixture weight of m = beta pt + (1 - beta) ps (kinds 2-4, 0 < beta < 1)
  int kind = 0;
  double inv_temperature = 1.0, beta = 0.5, ce_weight = 0.0, kd_weight = 1.0;
  // logit transforms u = cap tanh(scale z / cap) (u = scale z where cap == 0), before the
  // temperature (kdkernels/_core/logit_options.py)
  double s_scale = 1.0, s_cap = 0.0, t_scale = 1.0, t_cap = 0.0;
  int64_t ignore_index = -100;
  // Plan overrides (tests and benchmarks): force_mode -1 auto, 0 streaming, 1 staged;
  // force_cluster 0 auto, else 1/2/4/8/16; force_threads 0 auto, else a multiple of 32 up to 512.
  int force_mode = -1, force_cluster = 0, force_threads = 0;
};

// What the planner needs to know about the GPU.
struct DeviceLimits {
  int cc_major = 9;
  int64_t max_smem_per_block = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int max_cluster = 8;                      // 1 below sm_90; 16 where non-portable sizes are allowed
  int64_t target_smem_per_block = 72 * 1024;  // aim: three staged blocks per SM
};

enum Mode : int { kStreaming = 0, kStaged = 1 };

struct Plan {
  int mode = kStreaming;
  int cluster = 1;       // blocks per row (staged only): a 1-D thread-block cluster
  int threads = 256;
  int pack = 1;          // logits per vector access: 16 bytes of the wider input dtype
  bool aligned = false;  // every row start and V are multiples of pack (vector loads and stores)
  int64_t seg = 0;       // logits per block (staged: a multiple of pack; streaming: V)
  int64_t smem = 0;      // dynamic shared memory per block, bytes
  std::string error;     // non-empty when a forced plan is impossible
};

// Shared-memory layout of a block: reduction scratch, then the staged student and teacher logits.
constexpr int64_t kScratchBytes = 3072;
constexpr int kMaxThreads = 512;

inline int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

inline int64_t staged_smem_bytes(int64_t seg, int s_dtype, int t_dtype) {
  return kScratchBytes + round16(seg * dtype_size(s_dtype)) + round16(seg * dtype_size(t_dtype));
}

inline int pack_of(int s_dtype, int t_dtype) {
  const int wide = dtype_size(s_dtype) > dtype_size(t_dtype) ? dtype_size(s_dtype) : dtype_size(t_dtype);
  return 16 / wide;
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Threads for `items` vector accesses per block: about four per thread, 64 to 512.
inline int threads_for(int64_t items) {
  int t = 64;
  while (t < kMaxThreads && int64_t(t) * 4 < items) t *= 2;
  return t;
}

// Staged (each logit read from DRAM once, the row segment held in shared memory, split over a
// cluster when it does not fit one block) when the rows are vector-aligned and fit; streaming
// (pass 1 reads the row, the gradient pass reads it again; JSD, skew KL, TVD: 3 reads) otherwise.
inline Plan plan_softmax_kl(const SoftmaxKLArgs& a, const DeviceLimits& d) {
  Plan p;
  p.pack = pack_of(a.student_dtype, a.teacher_dtype);
  const int64_t P = p.pack, ss = dtype_size(a.student_dtype), st = dtype_size(a.teacher_dtype);
  p.aligned = a.V % P == 0 && a.stride_s % P == 0 && a.stride_t % P == 0 && a.outer_stride_s % P == 0 &&
              a.outer_stride_t % P == 0 && aligned_to(a.student, P * ss) &&
              aligned_to(a.teacher, P * st) && aligned_to(a.grad_student, P * ss) &&
              aligned_to(a.grad_teacher, P * st);
  const int64_t packs = (a.V + P - 1) / P;
  int max_cluster = d.cc_major >= 9 ? d.max_cluster : 1;

  bool staged = false;
  if (a.force_mode != kStreaming && p.aligned) {
    auto fits = [&](int c, int64_t limit) {
      const int64_t seg = (packs + c - 1) / c * P;
      return staged_smem_bytes(seg, a.student_dtype, a.teacher_dtype) <= limit;
    };
    int c = 0;
    if (a.force_cluster > 0) {
      if (a.force_cluster <= max_cluster && fits(a.force_cluster, d.max_smem_per_block)) c = a.force_cluster;
    } else {
      for (int k = 1; k <= max_cluster && !c; k *= 2)
        if (fits(k, d.target_smem_per_block)) c = k;
      for (int k = 1; k <= max_cluster && !c; k *= 2)
        if (fits(k, d.max_smem_per_block)) c = k;
    }
    if (c) {
      staged = true;
      p.cluster = c;
      p.seg = (packs + c - 1) / c * P;
      p.smem = staged_smem_bytes(p.seg, a.student_dtype, a.teacher_dtype);
    }
  }
  if (a.force_mode == kStaged && !staged) {
    p.error = std::string("a staged plan is impossible here (") +
              (p.aligned ? "the row segment does not fit shared memory at that cluster size"
                         : "rows are not aligned to 16-byte vectors") + ")";
    return p;
  }
  if (a.force_mode != kStaged && a.force_cluster > 1 && !staged) {
    p.error = "cluster > 1 needs a staged plan (sm_90, aligned rows, a segment that fits)";
    return p;
  }
  if (staged) {
    p.mode = kStaged;
  } else {
    p.mode = kStreaming;
    p.cluster = 1;
    p.seg = a.V;
    p.smem = kScratchBytes;
  }
  const int64_t items = p.mode == kStaged ? p.seg / P : (p.aligned ? packs : a.V);
  p.threads = a.force_threads > 0 ? a.force_threads : threads_for(items);
  if (p.threads % 32 != 0 || p.threads > kMaxThreads) {
    p.error = "threads must be a multiple of 32 up to 512";
  }
  return p;
}

// Bytes each plan moves per row element (both gradients requested): staged reads the row once;
// streaming reads it twice for forward / reverse KL and three times for the kinds with a second
// sweep (JSD, skew KL, TVD; see softmax_kl.cuh).
inline int64_t plan_reads(const Plan& p, int kind) { return p.mode == kStaged ? 1 : (kind >= 2 ? 3 : 2); }

// Whether a call transforms either side's logits (the kernels' XF variant).
inline bool has_transform(const SoftmaxKLArgs& a) {
  return a.s_scale != 1.0 || a.s_cap != 0.0 || a.t_scale != 1.0 || a.t_cap != 0.0;
}

// Implemented in softmax_kl.cu: plan and launch on the current device and the given cudaStream_t.
// Returns an empty string on success, else the error.
std::string softmax_kl_launch(const SoftmaxKLArgs& args, void* stream, Plan* plan_out);

}  // namespace kdk::cuda
