// The CPU harness driver: the very kernels nvcc compiles (../csrc/selective_scan_kernels.cuh), launched with the
// CUDA launcher's grid and block shapes on cuda_on_cpu.h's emulated threads. Plain C entry points for ctypes; the
// tensors (allocation, dtype, the final fixed-order sums) are handled in Python (harness/__init__.py), mirroring
// selective_scan_cuda.cu's launcher.
#include "cuda_on_cpu.h"

#include "../csrc/selective_scan_kernels.cuh"

using namespace cil_scan;

namespace {

thread_local std::string last_error;

Params params(const int* shape, const int* flags) {
  Params p;
  p.batch = shape[0];
  p.dim = shape[1];
  p.length = shape[2];
  p.dstate = shape[3];
  p.groups = shape[4];
  p.varying_B = flags[0];
  p.varying_C = flags[1];
  p.has_D = flags[2];
  p.has_z = flags[3];
  p.has_bias = flags[4];
  p.softplus = flags[5];
  return p;
}

template <typename T>
Inputs<T> inputs(void* const* in) {
  return Inputs<T>{(const T*)in[0], (const T*)in[1], (const T*)in[2], (const T*)in[3], (const T*)in[4],
                   (const float*)in[5], (const float*)in[6], (const float*)in[7]};
}

template <typename T>
void forward(const Params& p, int tile, void* const* in, void* out, float* y, float* last) {
  const Inputs<T> args = inputs<T>(in);
  cuda_on_cpu::launch(p.batch * (p.dim / tile), threads_for(p.dstate),
                      [&] { forward_kernel<T>(p, args, tile, (T*)out, y, last); });
}

void check_tile(const Params& p, int tile, int max_tile) {
  if (tile < 1 || tile > max_tile || (p.dim / p.groups) % tile != 0)
    throw std::runtime_error("tile " + std::to_string(tile) + " does not divide a group of " +
                             std::to_string(p.dim / p.groups) + " channels or exceeds " + std::to_string(max_tile));
}

template <typename T>
void backward(const Params& p, int tile, void* const* in, float* const* f) {
  const Inputs<T> args = inputs<T>(in);
  const int threads = threads_for(p.dstate);
  cuda_on_cpu::launch(
      p.batch * (p.dim / tile), threads,
      [&] { backward_kernel<T>(p, args, f[0], f[1], f[2], tile, f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11]); },
      backward_shared_bytes(p.varying_B, p.varying_C, threads));
}

template <typename Fn>
int guarded(Fn fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

}  // namespace

extern "C" {

int cil_threads_for(int dstate) { return threads_for(dstate); }
int64_t cil_backward_shared_bytes(int varying_B, int varying_C, int threads) {
  return (int64_t)backward_shared_bytes(varying_B, varying_C, threads);
}
// the launcher's tiles for (group size, batch * dim); min_blocks <= 0: the launcher's own threshold
int cil_forward_tile_for(int group_size, int64_t rows, int min_blocks) {
  return min_blocks > 0 ? forward_tile_for(group_size, rows, min_blocks) : forward_tile_for(group_size, rows);
}
int cil_backward_tile_for(int group_size, int64_t rows, int min_blocks) {
  return min_blocks > 0 ? backward_tile_for(group_size, rows, min_blocks) : backward_tile_for(group_size, rows);
}
const char* cil_last_error() { return last_error.c_str(); }

// in: u, delta, B, C, z (the storage dtype), A, D, bias (float32; null when absent); tile: from cil_forward_tile_for
int cil_scan_fwd(int dtype, const int* shape, const int* flags, int tile, void* const* in, void* out, float* y,
                 float* last) {
  const Params p = params(shape, flags);
  return guarded([&] {
    check_tile(p, tile, kMaxForwardTile);
    if (dtype == 0) forward<float>(p, tile, in, out, y, last);
    else if (dtype == 1) forward<cuda_on_cpu::half>(p, tile, in, out, y, last);
    else forward<cuda_on_cpu::bfloat16>(p, tile, in, out, y, last);
  });
}

// f: y_pre, dout, dlast (null when absent), carry, du, ddelta, dz, dA_rows, dD_rows, dbias_rows, dB_tiles,
// dC_tiles, as the kernel's arguments; tile: channels per block, from cil_backward_tile_for
int cil_scan_bwd(int dtype, const int* shape, const int* flags, int tile, void* const* in, float* const* f) {
  const Params p = params(shape, flags);
  return guarded([&] {
    check_tile(p, tile, kMaxTile);
    if (dtype == 0) backward<float>(p, tile, in, f);
    else if (dtype == 1) backward<cuda_on_cpu::half>(p, tile, in, f);
    else backward<cuda_on_cpu::bfloat16>(p, tile, in, f);
  });
}

}  // extern "C"
