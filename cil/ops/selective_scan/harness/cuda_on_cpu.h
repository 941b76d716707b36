// Executes CUDA kernels on the CPU, faithfully enough to check their index arithmetic, shared-memory
// synchronisation and warp shuffles (cil/ops/selective_scan/harness/__init__.py says what it proves and what not).
//
// - A launch runs its blocks one after the other; the threads of a block run as real concurrent std::threads.
// - __shared__ arrays are static storage: one instance shared by the block's threads (blocks never overlap);
//   dynamic shared memory (CIL_DYNAMIC_SHARED) is a heap buffer of the launch's size, filled with NaN bytes before
//   each block (its content is undefined on a GPU: a read before a write shows).
// - __syncthreads() is a barrier over the block; __shfl_down_sync() exchanges through a per-warp buffer between two
//   warp barriers, and refuses a mask other than all 32 lanes or a warp with fewer than 32 threads.
// - A barrier that not every thread reaches (a divergent __syncthreads or shuffle, a thread that returned early) is
//   reported instead of hanging: after a timeout the launch fails with a message naming the barrier and how many
//   threads arrived.
// - half and bfloat16 storage types convert to and from float as the GPU does (round to nearest even).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---- the CUDA keywords the kernels use -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define CIL_DYNAMIC_SHARED(name) float* name = cuda_on_cpu::dynamic_shared()

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace cuda_on_cpu {

class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A reusable barrier that reports, rather than hangs on, a participant that never arrives: after a timeout the
// waiters give up with a message naming the barrier and how many threads arrived. Waiters spin and yield rather
// than sleep on a condition variable: with a block's 32-256 threads on a few cores, a futex wake-up per thread per
// barrier costs ten times more. The release/acquire pair on the generation is the barrier's memory ordering (what
// ThreadSanitizer sees as the happens-before edge between a write before the barrier and a read after it).
class Barrier {
 public:
  Barrier(int count, const char* what) : count_(count), what_(what) {}
  void wait() {
    check();
    const uint64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms());
    for (unsigned spins = 1; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      check();
      std::this_thread::yield();
      if (spins % 1024 == 0 && std::chrono::steady_clock::now() > deadline) {
        fail(std::string(what_) + ": only " + std::to_string(arrived_.load()) + " of " + std::to_string(count_) +
             " threads arrived (a divergent barrier or shuffle, or a thread that left the kernel early)");
        check();
      }
    }
  }
  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failed_.load()) message_ = message;
    failed_.store(true, std::memory_order_release);
  }

 private:
  void check() {
    if (failed_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mutex_);
      throw Failure(message_);
    }
  }
  static long timeout_ms() {  // CIL_HARNESS_TIMEOUT_S: how long a barrier waits for its last thread (default 20 s)
    static const long ms = [] {
      const char* text = std::getenv("CIL_HARNESS_TIMEOUT_S");
      return text ? (long)(std::atof(text) * 1000) : 20000L;
    }();
    return ms;
  }
  std::mutex mutex_;
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> failed_{false};
  const char* what_;
  std::string message_;
};

struct Warp {
  explicit Warp(int lanes) : lanes(lanes), barrier(lanes, "__shfl_down_sync") {}
  int lanes;
  Barrier barrier;
  float value[32];
  unsigned offset[32], mask[32];
};

struct Block {
  explicit Block(int threads) : block_barrier(threads, "__syncthreads") {
    for (int first = 0; first < threads; first += 32) warps.emplace_back(new Warp(std::min(32, threads - first)));
  }
  ~Block() {
    for (Warp* w : warps) delete w;
  }
  void fail(const std::string& message) {
    block_barrier.fail(message);
    for (Warp* w : warps) w->barrier.fail(message);
  }
  Barrier block_barrier;
  std::vector<Warp*> warps;
};

inline thread_local dim3 thread_index, block_index;
inline thread_local Block* current = nullptr;
inline dim3 block_dim, grid_dim;
inline std::mutex launch_mutex;  // one launch at a time: __shared__ storage is static
inline std::vector<float> dynamic_storage;  // the launch's dynamic shared memory (bounds: ASan sees the heap block)
inline float* dynamic_shared() { return dynamic_storage.empty() ? nullptr : dynamic_storage.data(); }

inline void sync_block() { current->block_barrier.wait(); }

inline float shfl_down(unsigned mask, float v, unsigned offset) {
  const int lane = thread_index.x & 31;
  Warp& w = *current->warps[thread_index.x >> 5];
  if (w.lanes != 32) {
    current->fail("__shfl_down_sync with mask 0x" + std::to_string(mask) + " in a warp of only " +
                  std::to_string(w.lanes) + " threads (the block size is not a multiple of 32)");
    throw Failure("shuffle in a partial warp");
  }
  if (mask != 0xffffffffu) {
    current->fail("__shfl_down_sync: the harness only runs full-warp masks, got a partial one");
    throw Failure("partial mask");
  }
  w.value[lane] = v;
  w.offset[lane] = offset;
  w.mask[lane] = mask;
  w.barrier.wait();  // every lane has written its value
  for (int other = 0; other < 32; ++other)
    if (w.offset[other] != offset) {
      current->fail("__shfl_down_sync: lanes of one warp passed different offsets (a divergent shuffle)");
      throw Failure("divergent shuffle");
    }
  const float out = lane + offset < 32 ? w.value[lane + offset] : v;  // out of range: the lane's own value
  w.barrier.wait();  // every lane has read before the buffer is reused
  return out;
}

// Run kernel(args...) on grid x block threads with `dynamic_bytes` of dynamic shared memory: blocks in order, each
// block's threads concurrently.
template <typename Kernel>
void launch(int grid, int threads, Kernel kernel, size_t dynamic_bytes = 0) {
  std::lock_guard<std::mutex> guard(launch_mutex);
  if (threads < 1 || threads > 1024) throw Failure("block of " + std::to_string(threads) + " threads (CUDA: 1..1024)");
  if (grid < 0 || grid > 2147483647) throw Failure("grid of " + std::to_string(grid) + " blocks");
  if (dynamic_bytes % sizeof(float) != 0) throw Failure("dynamic shared memory of " + std::to_string(dynamic_bytes) + " bytes");
  block_dim = dim3{(unsigned)threads, 1, 1};
  grid_dim = dim3{(unsigned)grid, 1, 1};
  dynamic_storage.assign(dynamic_bytes / sizeof(float), 0.f);
  dynamic_storage.shrink_to_fit();  // exactly the launch's size: an access past it is a heap overflow
  for (int b = 0; b < grid; ++b) {
    std::fill(dynamic_storage.begin(), dynamic_storage.end(), std::nanf(""));
    Block block(threads);
    std::string error;
    std::mutex error_mutex;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        thread_index = dim3{(unsigned)t, 0, 0};
        block_index = dim3{(unsigned)b, 0, 0};
        current = &block;
        try {
          kernel();
        } catch (const std::exception& e) {
          {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (error.empty()) error = e.what();
          }
          block.fail(e.what());
        }
      });
    for (auto& thread : pool) thread.join();
    if (!error.empty()) throw Failure("block " + std::to_string(b) + ": " + error);
  }
}

// half and bfloat16 as stored bits; arithmetic happens in float, as the kernels do
struct half {
  uint16_t bits;
  half() = default;
  half(float f) {
    _Float16 h = (_Float16)f;
    std::memcpy(&bits, &h, 2);
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
  }
};

struct bfloat16 {
  uint16_t bits;
  bfloat16() = default;
  bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      bits = (uint16_t)(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace cuda_on_cpu

#define threadIdx (cuda_on_cpu::thread_index)
#define blockIdx (cuda_on_cpu::block_index)
#define blockDim (cuda_on_cpu::block_dim)
#define gridDim (cuda_on_cpu::grid_dim)
inline void __syncthreads() { cuda_on_cpu::sync_block(); }
inline float __shfl_down_sync(unsigned mask, float v, unsigned offset) {
  return cuda_on_cpu::shfl_down(mask, v, offset);
}
