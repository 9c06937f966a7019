// A CPU emulation of the CUDA execution model, enough to run csrc/cuda kernels unchanged on a
// machine without a GPU: include this header before csrc/cuda/device.cuh (or a kernel header).
//
// Every CUDA thread is a fiber (ucontext) with its own stack; the fibers of one thread-block
// cluster run cooperatively on one OS thread. A fiber runs until it reaches a barrier and then
// yields, so each thread races as far ahead of the others as the synchronization allows: a read of
// shared memory that is missing its __syncthreads sees the bytes from before the write (shared
// memory starts filled with 0xff, i.e. NaN), and a barrier some threads never reach is reported
// as a deadlock. The scheduling order of the fibers is shuffled (seeded) on every round.
//   __syncthreads       barrier of the block's threads
//   __shfl_xor_sync     per-warp exchange slots between two warp barriers (all 32 lanes take part)
//   cluster barrier     arrive / wait over all threads of all blocks of the cluster
//   cluster_map         the same offset in the peer block's shared-memory buffer
//   cp.async            an immediate copy
//   ld / st             plain accesses; those outside shared memory are counted as DRAM traffic.
//                       Between two barriers of a block, an address the block already read is
//                       not counted again (a broadcast of a row scalar to all threads); across
//                       barriers no cache is modelled, so a logit read in two passes counts twice.
// Floating point is the host's: exp2 / log2 are the C library's (correctly rounded or nearly so),
// not the GPU's approximate MUFU units, and there is no flush-to-zero. The emulation tests the
// kernels' math, indexing and barrier discipline; timing and memory ordering beyond the barriers
// belong to a real GPU.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "../../csrc/cuda/dtypes.h"

#define KDK_CUDA_EMULATE 1
#define KDK_DEVICE inline
#define KDK_KERNEL(max_threads, min_blocks) void

namespace kdk::emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<std::unordered_set<uintptr_t>*> forget;  // read sets cleared when the barrier completes
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  int tid = 0;           // threadIdx.x
  int block = 0;         // rank of its block in the cluster
  bool done = false;
  Barrier* waiting = nullptr;  // blocked until waiting->generation != wait_generation
  uint64_t wait_generation = 0;
  bool cluster_arrived = false;  // between cluster_arrive and cluster_wait
  uint64_t cluster_generation = 0;
};

struct Cluster {
  int threads = 0, blocks = 0, warps = 0;
  int64_t first_block = 0;  // blockIdx.x of rank 0
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned char>> smem;  // per block
  std::vector<Barrier> warp_barriers, block_barriers;
  Barrier cluster_barrier;
  std::vector<double> shuffle;  // 32 slots per warp
  std::vector<std::unordered_set<uintptr_t>> reads;  // per block: global addresses read since its last barrier
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
};

// Bytes the kernels read from and write to global memory (ld / st / cp.async outside shared memory).
struct Traffic {
  int64_t read = 0, written = 0;
};
inline Traffic& traffic() {
  static Traffic t;
  return t;
}

inline Cluster*& active() {
  static Cluster* c = nullptr;
  return c;
}
inline Fiber& me() { return *active()->current; }

inline void yield_until(Barrier& b, uint64_t generation) {
  Fiber& f = me();
  f.waiting = &b;
  f.wait_generation = generation;
  swapcontext(&f.ctx, &active()->scheduler);
}

inline void arrive(Barrier& b) {
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    for (auto* set : b.forget) set->clear();
  }
}

inline void arrive_and_wait(Barrier& b) {
  const uint64_t g = b.generation;
  arrive(b);
  if (b.generation == g) yield_until(b, g);
}

inline void fiber_main() {
  Cluster& c = *active();
  c.body(c.body_arg);
  c.current->done = true;
  swapcontext(&c.current->ctx, &c.scheduler);
}

// Runs body(arg) as `threads` threads in each of `blocks` blocks of one cluster.
inline void run_cluster(int64_t first_block, int blocks, int threads, int64_t smem_bytes, void (*body)(void*),
                        void* arg, uint64_t seed) {
  if (threads <= 0 || threads % 32 != 0) throw std::runtime_error("emu: blockDim must be a multiple of 32");
  Cluster c;
  c.threads = threads;
  c.blocks = blocks;
  c.warps = threads / 32;
  c.first_block = first_block;
  c.body = body;
  c.body_arg = arg;
  c.smem.assign(blocks, std::vector<unsigned char>(static_cast<size_t>(smem_bytes), 0xff));
  c.warp_barriers.resize(static_cast<size_t>(blocks) * c.warps);
  for (auto& b : c.warp_barriers) b.expected = 32;
  c.reads.resize(blocks);
  c.block_barriers.resize(blocks);
  for (int b = 0; b < blocks; ++b) {
    c.block_barriers[b].expected = threads;
    c.block_barriers[b].forget = {&c.reads[b]};
    c.cluster_barrier.forget.push_back(&c.reads[b]);
  }
  c.cluster_barrier.expected = blocks * threads;
  c.shuffle.assign(static_cast<size_t>(blocks) * c.warps * 32, 0.0);
  constexpr size_t kStack = 64 * 1024;
  c.fibers.resize(static_cast<size_t>(blocks) * threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      Fiber& f = c.fibers[static_cast<size_t>(b) * threads + t];
      f.tid = t;
      f.block = b;
      f.stack.reset(new char[kStack]);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
  }
  Cluster* outer = active();
  active() = &c;
  std::vector<size_t> order(c.fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937_64 rng(seed);
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool progress = false, all_done = true;
    for (size_t i : order) {
      Fiber& f = c.fibers[i];
      if (f.done) continue;
      all_done = false;
      if (f.waiting && f.waiting->generation == f.wait_generation) continue;
      f.waiting = nullptr;
      c.current = &f;
      swapcontext(&c.scheduler, &f.ctx);
      progress = true;
    }
    if (all_done) break;
    if (!progress) {
      active() = outer;
      throw std::runtime_error("emu: deadlock, a barrier is not reached by every thread that must reach it");
    }
  }
  active() = outer;
  if (!c.error.empty()) throw std::runtime_error("emu: " + c.error);
}

// blockIdx.y of the blocks being run (the grid's rows of x blocks run one after the other).
inline int64_t& current_y() {
  static int64_t y = 0;
  return y;
}

// Launch of kernel(params) over a grid of `grid` x `grid_y` blocks of `threads`, in clusters of
// `cluster` blocks along x.
template <class Params>
void launch(void (*kernel)(Params), const Params& params, int64_t grid, int threads, int cluster, int64_t smem,
            uint64_t seed = 1, int64_t grid_y = 1) {
  if (cluster < 1 || grid % cluster != 0) throw std::runtime_error("emu: grid must be a multiple of the cluster");
  struct Call {
    void (*kernel)(Params);
    const Params* params;
  } call{kernel, &params};
  auto body = [](void* p) {
    auto* c = static_cast<Call*>(p);
    c->kernel(*c->params);
  };
  for (int64_t y = 0; y < grid_y; ++y) {
    current_y() = y;
    for (int64_t first = 0; first < grid; first += cluster) {
      run_cluster(first, cluster, threads, smem, body, &call, seed + y * grid + first);
    }
  }
  current_y() = 0;
}

inline void fail(const std::string& what) {
  if (active()->error.empty()) active()->error = what;
}

}  // namespace kdk::emu

namespace kdk::dev {

inline int thread_idx() { return emu::me().tid; }
inline int block_dim() { return emu::active()->threads; }
inline int64_t block_idx() { return emu::active()->first_block + emu::me().block; }
inline int64_t block_idx_y() { return emu::current_y(); }
inline void sync_threads() { emu::arrive_and_wait(emu::active()->block_barriers[emu::me().block]); }

template <class X> inline X shfl_xor_impl(X v, int lane_mask) {
  emu::Cluster& c = *emu::active();
  emu::Fiber& f = emu::me();
  const int lane = f.tid & 31, warp = f.block * c.warps + (f.tid >> 5);
  double* slots = &c.shuffle[static_cast<size_t>(warp) * 32];
  emu::Barrier& bar = c.warp_barriers[warp];
  slots[lane] = static_cast<double>(v);
  emu::arrive_and_wait(bar);
  const X r = static_cast<X>(slots[lane ^ lane_mask]);
  emu::arrive_and_wait(bar);
  return r;
}
inline float shfl_xor(float v, int lane_mask) { return shfl_xor_impl(v, lane_mask); }
inline double shfl_xor(double v, int lane_mask) { return shfl_xor_impl(v, lane_mask); }

inline unsigned char* dynamic_smem() { return emu::active()->smem[emu::me().block].data(); }

inline bool in_shared(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (const auto& buf : emu::active()->smem)
    if (q >= buf.data() && q < buf.data() + buf.size()) return true;
  return false;
}
template <class X> inline X ld(const X* p) {
  if (!in_shared(p) && emu::active()->reads[emu::me().block].insert(reinterpret_cast<uintptr_t>(p)).second)
    emu::traffic().read += sizeof(X);
  return *p;
}
template <class X> inline void st(X* p, const X& v) {
  if (!in_shared(p)) emu::traffic().written += sizeof(X);
  *p = v;
}

inline void require_clusters(int) {}
inline unsigned cluster_rank() { return static_cast<unsigned>(emu::me().block); }
inline void cluster_arrive() {
  emu::Fiber& f = emu::me();
  if (f.cluster_arrived) emu::fail("cluster_arrive twice without cluster_wait");
  f.cluster_arrived = true;
  f.cluster_generation = emu::active()->cluster_barrier.generation;
  emu::arrive(emu::active()->cluster_barrier);
}
inline void cluster_wait() {
  emu::Fiber& f = emu::me();
  if (!f.cluster_arrived) emu::fail("cluster_wait without cluster_arrive");
  f.cluster_arrived = false;
  emu::Barrier& b = emu::active()->cluster_barrier;
  if (b.generation == f.cluster_generation) emu::yield_until(b, f.cluster_generation);
}
inline void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
template <class X> inline const X* cluster_map(const X* p, unsigned rank) {
  emu::Cluster& c = *emu::active();
  const auto& mine = c.smem[emu::me().block];
  const auto* q = reinterpret_cast<const unsigned char*>(p);
  if (q < mine.data() || q + sizeof(X) > mine.data() + mine.size() || rank >= static_cast<unsigned>(c.blocks)) {
    emu::fail("cluster_map of a pointer outside shared memory, or a rank outside the cluster");
    return p;
  }
  return reinterpret_cast<const X*>(c.smem[rank].data() + (q - mine.data()));
}

template <int BYTES> inline void cp_async(void* smem_dst, const void* gmem_src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(smem_dst) % BYTES || reinterpret_cast<uintptr_t>(gmem_src) % BYTES)
    emu::fail("cp.async of a misaligned address");
  emu::traffic().read += BYTES;
  std::memcpy(smem_dst, gmem_src, BYTES);
}
inline void cp_async_wait_all() {}

inline float exp2(float x) { return std::exp2(x); }
inline double exp2(double x) { return std::exp2(x); }
inline float log2(float x) { return std::log2(x); }
inline double log2(double x) { return std::log2(x); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline double fmax(double a, double b) { return std::fmax(a, b); }
template <class X> inline X quiet_nan() { return std::numeric_limits<X>::quiet_NaN(); }

inline float bf16_to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float f16_to_float(f16_t x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline f16_t float_to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  f16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

}  // namespace kdk::dev
