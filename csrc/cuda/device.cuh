// The device primitives the CUDA kernels use, behind one small interface (namespace kdk::dev).
//
// Under nvcc they are the CUDA builtins. Compiled by a host C++ compiler after the emulation header
// tests/cuda_emu/emu.h (which defines KDK_CUDA_EMULATE), the same kernel source runs on the CPU:
// emu.h supplies every primitive
// (threads as cooperatively scheduled fibers, __syncthreads / warp shuffles / cluster barriers as
// fiber barriers, distributed shared memory as the peer block's buffer), so the kernels' math,
// indexing and synchronization are tested on a machine without a GPU.
//
// Kernels use only: ld / st (every access to global memory, and the vector reads of shared memory),
// thread_idx, block_dim, block_idx / block_idx_y, sync_threads, shfl_xor, dynamic_smem,
// cluster_rank / cluster_sync / cluster_arrive / cluster_wait / cluster_map (sm_90; no-ops below,
// where require_clusters traps),
// cp_async / cp_async_wait_all (sm_80+), exp2 / log2 / fmax / quiet_nan, and the bf16 / fp16 conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "dtypes.h"

#if defined(KDK_CUDA_EMULATE)

// tests/cuda_emu/emu.h, included first, defines KDK_DEVICE, KDK_KERNEL and every function below.

#elif defined(__CUDACC__)

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define KDK_DEVICE __device__ __forceinline__
#define KDK_KERNEL(max_threads, min_blocks) __global__ void __launch_bounds__(max_threads, min_blocks)

namespace kdk::dev {

KDK_DEVICE int thread_idx() { return static_cast<int>(threadIdx.x); }
KDK_DEVICE int block_dim() { return static_cast<int>(blockDim.x); }
KDK_DEVICE int64_t block_idx() { return static_cast<int64_t>(blockIdx.x); }
KDK_DEVICE int64_t block_idx_y() { return static_cast<int64_t>(blockIdx.y); }
KDK_DEVICE void sync_threads() { __syncthreads(); }
KDK_DEVICE float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
KDK_DEVICE double shfl_xor(double v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

template <class X> KDK_DEVICE X ld(const X* p) { return *p; }
template <class X> KDK_DEVICE void st(X* p, const X& v) { *p = v; }

KDK_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char kdk_dynamic_smem[];
  return kdk_dynamic_smem;
}

// ---- thread-block clusters (sm_90): rank in a 1-D cluster, barrier, distributed shared memory
KDK_DEVICE unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}
// A kernel compiled below sm_90 (e.g. PTX for sm_80 JIT-compiled on a Hopper GPU) has no clusters:
// a launch that relies on them must fail loudly, never compute per-block partial results.
KDK_DEVICE void require_clusters(int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if (cluster > 1) __trap();
#else
  (void)cluster;
#endif
}
KDK_DEVICE void cluster_arrive() {  // release: this block's shared-memory writes become visible
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
KDK_DEVICE void cluster_wait() {  // acquire: wait for every thread of every block of the cluster
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
KDK_DEVICE void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
template <class X>
KDK_DEVICE const X* cluster_map(const X* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<X*>(p), rank);
#else
  (void)rank;
  return p;
#endif
}

// ---- asynchronous global -> shared copies (sm_80+; a plain copy below)
template <int BYTES>
KDK_DEVICE void cp_async(void* smem_dst, const void* gmem_src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem_src), "n"(BYTES) : "memory");
  }
#else
  memcpy(smem_dst, gmem_src, BYTES);
#endif
}
KDK_DEVICE void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---- math (fp32: the MUFU ex2 / lg2 units; fp64: libdevice)
KDK_DEVICE float exp2(float x) { return exp2f(x); }
KDK_DEVICE double exp2(double x) { return ::exp2(x); }
KDK_DEVICE float log2(float x) { return log2f(x); }
KDK_DEVICE double log2(double x) { return ::log2(x); }
KDK_DEVICE float fmax(float a, float b) { return fmaxf(a, b); }
KDK_DEVICE double fmax(double a, double b) { return ::fmax(a, b); }
template <class X> KDK_DEVICE X quiet_nan();
template <> KDK_DEVICE float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <> KDK_DEVICE double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// ---- conversions between storage types and the accumulator
KDK_DEVICE float bf16_to_float(bf16_t x) { return __uint_as_float(static_cast<unsigned>(x.bits) << 16); }
KDK_DEVICE bf16_t float_to_bf16(float x) { return {__bfloat16_as_ushort(__float2bfloat16_rn(x))}; }
KDK_DEVICE float f16_to_float(f16_t x) { return __half2float(__ushort_as_half(x.bits)); }
KDK_DEVICE f16_t float_to_f16(float x) { return {__half_as_ushort(__float2half_rn(x))}; }

}  // namespace kdk::dev

#else
#error "csrc/cuda/device.cuh is compiled by nvcc, or by a host compiler after tests/cuda_emu/emu.h"
#endif
