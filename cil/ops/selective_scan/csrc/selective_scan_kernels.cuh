// The selective scan's device code: the kernels and their device helpers, with no ATen and no launcher. nvcc
// compiles it for GPUs (selective_scan_cuda.cu includes it); the host C++ compiler compiles the very same file for
// the CPU execution harness (../harness/), which defines the few CUDA names it uses (threadIdx, blockIdx, blockDim,
// __shared__, __syncthreads, __shfl_down_sync, half and bfloat16 storage types) and runs each block's threads as
// real concurrent threads. The launch shapes are here too, so both launchers use the same grid and block.
#pragma once

#include <cstdint>

namespace cil_scan {


constexpr int kChunk = 64;      // time steps per chunk (the per-thread state history of the backward)
constexpr int kMaxState = 256;  // dstate limit, as mamba-ssm's kernel
constexpr int kWarps = kMaxState / 32;

template <typename T>  // c10::Half / c10::BFloat16 (CUDA) and the harness's types convert to float
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block in a fixed order (deterministic); the result is valid in thread 0. Every thread must call it.
__device__ __forceinline__ float block_sum(float v, float* s_red, int warps) {
  v = warp_sum(v);
  __syncthreads();  // s_red may still be read from the previous call
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < warps; ++w) total += s_red[w];
  return total;
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

struct Params {
  int batch, dim, length, dstate, groups;
  bool varying_B, varying_C, has_D, has_z, has_bias, softplus;
  // B / C: varying ones are time-major (batch, groups, L, dstate); fixed ones (dim, dstate)
};

template <typename T>
struct Inputs {
  const T *u, *delta, *B, *C, *z;
  const float *A, *D, *bias;
};

// index of B[b, g, t, n] (varying) or B[d, n] (fixed)
__device__ __forceinline__ int64_t bc_index(bool varying, const Params& p, int b, int d, int t, int n) {
  if (!varying) return (int64_t)d * p.dstate + n;
  const int g = d / (p.dim / p.groups);
  return (((int64_t)b * p.groups + g) * p.length + t) * p.dstate + n;
}

// ---- forward ---------------------------------------------------------------------------------------------------
template <typename T>
__global__ void forward_kernel(Params p, Inputs<T> in, T* __restrict__ out, float* __restrict__ y_pre,
                               float* __restrict__ last) {
  const int row = blockIdx.x;  // (b, d)
  const int b = row / p.dim, d = row % p.dim;
  const int n = threadIdx.x, lane = n & 31, warp = n >> 5;
  const bool active = n < p.dstate;
  const int64_t base = (int64_t)row * p.length;
  __shared__ float s_u[kChunk], s_dt[kChunk], s_part[kWarps][kChunk];
  const float a = active ? in.A[(int64_t)d * p.dstate + n] : 0.f;
  const float bias = p.has_bias ? in.bias[d] : 0.f;
  float h = 0.f;
  for (int t0 = 0; t0 < p.length; t0 += kChunk) {
    const int steps = min(kChunk, p.length - t0);
    for (int i = n; i < steps; i += blockDim.x) {  // blockDim may be smaller than the chunk (small dstate)
      const float raw = to_float(in.delta[base + t0 + i]) + bias;
      s_dt[i] = p.softplus ? softplus(raw) : raw;
      s_u[i] = to_float(in.u[base + t0 + i]);
    }
    __syncthreads();
    for (int i = 0; i < steps; ++i) {
      float part = 0.f;
      if (active) {
        const float dt = s_dt[i];
        const float bv = to_float(in.B[bc_index(p.varying_B, p, b, d, t0 + i, n)]);
        const float cv = to_float(in.C[bc_index(p.varying_C, p, b, d, t0 + i, n)]);
        h = expf(dt * a) * h + dt * bv * s_u[i];
        part = cv * h;
      }
      part = warp_sum(part);
      if (lane == 0) s_part[warp][i] = part;
    }
    __syncthreads();
    for (int j = n; j < steps; j += blockDim.x) {
      float y = 0.f;
      for (int w = 0; w < (int)((blockDim.x + 31) / 32); ++w) y += s_part[w][j];
      if (p.has_D) y += in.D[d] * s_u[j];
      y_pre[base + t0 + j] = y;
      if (p.has_z) {
        const float zv = to_float(in.z[base + t0 + j]);
        y *= zv * sigmoid(zv);
      }
      out[base + t0 + j] = static_cast<T>(y);
    }
    __syncthreads();
  }
  if (active && last != nullptr) last[(int64_t)row * p.dstate + n] = h;  // only when asked: 1 GB at CUB's batch 256
}

// ---- backward --------------------------------------------------------------------------------------------------
// One block per (batch, tile of `tile` channels of one group); the block walks its channels in order. For each
// channel: forward sweep storing chunk-start states (global scratch, only when L > kChunk), then chunks in reverse.
template <typename T>
__global__ void backward_kernel(Params p, Inputs<T> in, const float* __restrict__ y_pre, const float* __restrict__ dout,
                                const float* __restrict__ dlast, int tile, float* __restrict__ chunk_states,
                                float* __restrict__ du, float* __restrict__ ddelta, float* __restrict__ dz,
                                float* __restrict__ dA_rows, float* __restrict__ dD_rows, float* __restrict__ dbias_rows,
                                float* __restrict__ dB_tiles, float* __restrict__ dC_tiles) {
  const int tiles_per_row = p.dim / tile;
  const int b = blockIdx.x / tiles_per_row, tile_index = blockIdx.x % tiles_per_row;
  const int n = threadIdx.x, lane = n & 31, warp = n >> 5;
  const bool active = n < p.dstate;
  const int n_chunks = (p.length + kChunk - 1) / kChunk;
  const int warps = (blockDim.x + 31) / 32;
  __shared__ float s_u[kChunk], s_dt[kChunk], s_raw[kChunk], s_gy[kChunk];
  __shared__ float s_du[kWarps][kChunk], s_ddt[kWarps][kChunk];
  __shared__ float s_red[kWarps];
  float hist[kChunk];  // this thread's states over the current chunk (registers: indexed by constants only)
  // dB / dC of this tile: varying ones into the tile's own slice (batch, tiles, L, dstate); fixed ones per row
  float* dB_tile = dB_tiles + ((int64_t)b * tiles_per_row + tile_index) * p.length * p.dstate;
  float* dC_tile = dC_tiles + ((int64_t)b * tiles_per_row + tile_index) * p.length * p.dstate;
  for (int k = 0; k < tile; ++k) {
    const int d = tile_index * tile + k;
    const int row = b * p.dim + d;
    const int64_t base = (int64_t)row * p.length;
    const float a = active ? in.A[(int64_t)d * p.dstate + n] : 0.f;
    const float bias = p.has_bias ? in.bias[d] : 0.f;
    const float Dd = p.has_D ? in.D[d] : 0.f;
    float* starts = chunk_states + (int64_t)blockIdx.x * n_chunks * p.dstate;
    // 1. forward sweep: the state at each chunk start (chunk 0 starts at 0 and is never stored)
    if (n_chunks > 1) {
      float h = 0.f;
      for (int t = 0; t < p.length; ++t) {
        if (t % kChunk == 0 && active) starts[(t / kChunk) * p.dstate + n] = h;
        if (active) {
          const float raw = to_float(in.delta[base + t]) + bias;
          const float dt = p.softplus ? softplus(raw) : raw;
          const float bv = to_float(in.B[bc_index(p.varying_B, p, b, d, t, n)]);
          h = expf(dt * a) * h + dt * bv * to_float(in.u[base + t]);
        }
      }
    }
    // 2. chunks in reverse; lambda carries across chunk boundaries (it starts as the last state's gradient)
    float lam = (active && dlast != nullptr) ? dlast[(int64_t)row * p.dstate + n] : 0.f;
    float a_next = 1.f;  // exp(dt[t+1] A): with lam = dlast at t = L, a_next * lam adds dlast to lambda[L-1]
    float dA_acc = 0.f, dBfix = 0.f, dCfix = 0.f, dD_acc = 0.f, dbias_acc = 0.f;
    for (int c = n_chunks - 1; c >= 0; --c) {
      const int t0 = c * kChunk, steps = min(kChunk, p.length - t0);
      __syncthreads();
      for (int j = n; j < steps; j += blockDim.x) {
        const int64_t at = base + t0 + j;
        const float raw = to_float(in.delta[at]) + bias;
        s_raw[j] = raw;
        s_dt[j] = p.softplus ? softplus(raw) : raw;
        const float uv = to_float(in.u[at]);
        s_u[j] = uv;
        float g = dout[at];
        if (p.has_z) {  // out = y * silu(z): dz from the saved pre-gate y, and the gradient reaching y
          const float zv = to_float(in.z[at]), sg = sigmoid(zv);
          dz[at] = g * y_pre[at] * sg * (1.f + zv * (1.f - sg));
          g *= zv * sg;
        }
        s_gy[j] = g;
        dD_acc += g * uv;
      }
      __syncthreads();
      // recompute this chunk's states from its start state. Both loops are unrolled over the whole chunk with
      // `steps` as a guard (the same for every thread of the block, so the shuffles below stay uniform): every index
      // of hist is then a constant and hist lives in registers, not in local memory
      float h = (c == 0 || !active) ? 0.f : starts[c * p.dstate + n];
      const float h_start = h;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i < steps && active) {
          const float dt = s_dt[i];
          const float bv = to_float(in.B[bc_index(p.varying_B, p, b, d, t0 + i, n)]);
          h = expf(dt * a) * h + dt * bv * s_u[i];
        }
        hist[i] = h;
      }
#pragma unroll
      for (int i = kChunk - 1; i >= 0; --i) {
        if (i >= steps) continue;
        float du_part = 0.f, ddt_part = 0.f;
        if (active) {
          const int t = t0 + i;
          const float dt = s_dt[i], uv = s_u[i], gy = s_gy[i];
          const int64_t ib = bc_index(p.varying_B, p, b, d, t, n), ic = bc_index(p.varying_C, p, b, d, t, n);
          const float bv = to_float(in.B[ib]), cv = to_float(in.C[ic]);
          lam = cv * gy + a_next * lam;
          const float a_t = expf(dt * a);
          const float h_prev = i > 0 ? hist[i - 1] : h_start;
          du_part = lam * dt * bv;
          ddt_part = lam * (bv * uv + a * a_t * h_prev);
          dA_acc += lam * dt * a_t * h_prev;
          const float gB = lam * dt * uv, gC = gy * hist[i];
          if (p.varying_B) dB_tile[(int64_t)t * p.dstate + n] += gB; else dBfix += gB;
          if (p.varying_C) dC_tile[(int64_t)t * p.dstate + n] += gC; else dCfix += gC;
          a_next = a_t;
        }
        du_part = warp_sum(du_part);
        ddt_part = warp_sum(ddt_part);
        if (lane == 0) {
          s_du[warp][i] = du_part;
          s_ddt[warp][i] = ddt_part;
        }
      }
      __syncthreads();
      for (int j = n; j < steps; j += blockDim.x) {
        float dusum = Dd * s_gy[j], ddt = 0.f;
        for (int w = 0; w < warps; ++w) {
          dusum += s_du[w][j];
          ddt += s_ddt[w][j];
        }
        if (p.softplus && s_raw[j] <= 20.f) ddt *= sigmoid(s_raw[j]);
        du[base + t0 + j] = dusum;
        ddelta[base + t0 + j] = ddt;
        dbias_acc += ddt;
      }
    }
    // per-row partials, summed over the batch by the caller in a fixed order
    if (active) {
      dA_rows[(int64_t)row * p.dstate + n] = dA_acc;
      if (!p.varying_B) dB_tiles[(int64_t)row * p.dstate + n] = dBfix;
      if (!p.varying_C) dC_tiles[(int64_t)row * p.dstate + n] = dCfix;
    }
    // dD and dbias of the row: each thread holds the partial of its steps; a fixed-order block reduction
    const float dD_row = block_sum(dD_acc, s_red, warps);
    const float dbias_row = block_sum(dbias_acc, s_red, warps);
    if (n == 0) {
      dD_rows[row] = dD_row;
      dbias_rows[row] = dbias_row;
    }
  }
}

// ---- launch shapes (host code, shared by the CUDA launcher and the CPU harness) --------------------------------
// threads per block: one per state, rounded up to whole warps
inline int threads_for(int dstate) { return ((dstate + 31) / 32) * 32; }

// channels per backward block: a divisor of the group size, so a tile never spans two groups
inline int tile_for(int group_size) {
  for (int candidate : {16, 8, 4, 2})
    if (group_size % candidate == 0) return candidate;
  return 1;
}

}  // namespace cil_scan
