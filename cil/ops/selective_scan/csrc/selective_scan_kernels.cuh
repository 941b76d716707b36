// The selective scan's device code: the kernels and their device helpers, with no ATen and no launcher. nvcc
// compiles it for GPUs (selective_scan_cuda.cu includes it); the host C++ compiler compiles the very same file for
// the CPU execution harness (../harness/), which defines the few CUDA names it uses (threadIdx, blockIdx, blockDim,
// __shared__, __syncthreads, __shfl_down_sync, half and bfloat16 storage types) and runs each block's threads as
// real concurrent threads. The launch shapes are here too, so both launchers use the same grid and block.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cil_scan {


constexpr int kChunk = 64;      // backward: time steps per chunk (the per-thread state history)
constexpr int kStage = 16;      // forward: time steps whose B / C a thread holds at once
constexpr int kMaxForwardTile = 8;  // forward: channels per block at most (their states are registers; 16 would take
                                    // 160 registers, one 256-thread block per SM instead of two)
constexpr int kStageRow = kChunk + 1;  // backward: a thread's staged B (or C) over a chunk, padded
constexpr int kMaxState = 256;  // dstate limit, as mamba-ssm's kernel

// Dynamic shared memory, sized at launch: nvcc's extern array; the CPU harness defines its own (a heap buffer).
#ifndef CIL_DYNAMIC_SHARED
#define CIL_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif
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

// one step of the recurrence h[t] = exp(dt A) h[t-1] + dt B u (every kernel and pass computes it this one way)
__device__ __forceinline__ float next_state(float h, float dt, float a, float bv, float uv) {
  return expf(dt * a) * h + dt * bv * uv;
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
// One block per (batch, tile of `tile` channels of one group), one thread per state n, time in stages of kStage
// steps. The channels of a group share B and C: each thread reads its state's B[t, n], C[t, n] once per stage for the
// whole tile (registers) instead of once per channel, and carries the tile's states h[k] in registers.
template <typename T>
__global__ void forward_kernel(Params p, Inputs<T> in, int tile, T* __restrict__ out, float* __restrict__ y_pre,
                               float* __restrict__ last) {
  const int tiles_per_row = p.dim / tile;
  const int b = blockIdx.x / tiles_per_row, d0 = (blockIdx.x % tiles_per_row) * tile;
  const int n = threadIdx.x, lane = n & 31, warp = n >> 5;
  const bool active = n < p.dstate;
  const int warps = (blockDim.x + 31) / 32;
  __shared__ float s_u[kMaxForwardTile][kStage], s_dt[kMaxForwardTile][kStage];
  __shared__ float s_part[kWarps][kMaxForwardTile][kStage];
  // registers: every index is a constant (loops unrolled over kMaxForwardTile and kStage, with the block-uniform
  // `tile` and `steps` as guards, so barriers and shuffles stay uniform)
  float h[kMaxForwardTile], a[kMaxForwardTile];
#pragma unroll
  for (int k = 0; k < kMaxForwardTile; ++k) {
    h[k] = 0.f;
    a[k] = (k < tile && active) ? in.A[(int64_t)(d0 + k) * p.dstate + n] : 0.f;
  }
  for (int t0 = 0; t0 < p.length; t0 += kStage) {
    const int steps = min(kStage, p.length - t0);
    float Bs[kStage], Cs[kStage];  // varying B / C of the group over this stage (fixed ones are read per channel)
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      const bool load = active && i < steps;
      Bs[i] = (load && p.varying_B) ? to_float(in.B[bc_index(true, p, b, d0, t0 + i, n)]) : 0.f;
      Cs[i] = (load && p.varying_C) ? to_float(in.C[bc_index(true, p, b, d0, t0 + i, n)]) : 0.f;
    }
    __syncthreads();  // the previous stage's shared values may still be read
    for (int j = n; j < tile * steps; j += blockDim.x) {  // the tile's dt and u over the stage
      const int k = j / steps, i = j % steps;
      const int64_t at = ((int64_t)b * p.dim + d0 + k) * p.length + t0 + i;
      const float raw = to_float(in.delta[at]) + (p.has_bias ? in.bias[d0 + k] : 0.f);
      s_dt[k][i] = p.softplus ? softplus(raw) : raw;
      s_u[k][i] = to_float(in.u[at]);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxForwardTile; ++k) {
      if (k >= tile) break;
      const float Bfix = (!p.varying_B && active) ? to_float(in.B[(int64_t)(d0 + k) * p.dstate + n]) : 0.f;
      const float Cfix = (!p.varying_C && active) ? to_float(in.C[(int64_t)(d0 + k) * p.dstate + n]) : 0.f;
#pragma unroll
      for (int i = 0; i < kStage; ++i) {
        if (i >= steps) break;
        float part = 0.f;
        if (active) {
          const float dt = s_dt[k][i];
          h[k] = next_state(h[k], dt, a[k], p.varying_B ? Bs[i] : Bfix, s_u[k][i]);
          part = (p.varying_C ? Cs[i] : Cfix) * h[k];
        }
        part = warp_sum(part);
        if (lane == 0) s_part[warp][k][i] = part;
      }
    }
    __syncthreads();
    for (int j = n; j < tile * steps; j += blockDim.x) {  // y = sum over the warps' partials + D u, then the gate
      const int k = j / steps, i = j % steps;
      const int64_t at = ((int64_t)b * p.dim + d0 + k) * p.length + t0 + i;
      float y = 0.f;
      for (int w = 0; w < warps; ++w) y += s_part[w][k][i];
      if (p.has_D) y += in.D[d0 + k] * s_u[k][i];
      y_pre[at] = y;
      if (p.has_z) {
        const float zv = to_float(in.z[at]);
        y *= zv * sigmoid(zv);
      }
      out[at] = static_cast<T>(y);
    }
  }
  if (active && last != nullptr) {  // only when asked: 1 GB at CUB's batch 256
#pragma unroll
    for (int k = 0; k < kMaxForwardTile; ++k)
      if (k < tile) last[((int64_t)b * p.dim + d0 + k) * p.dstate + n] = h[k];
  }
}

// ---- backward --------------------------------------------------------------------------------------------------
// One block per (batch, tile of `tile` channels of one group). Chunks of time in reverse; inside a chunk the block
// walks the tile's channels in order. The gradients of varying B and C at (t, n) are sums over the group's channels,
// so each thread sums the tile's channels for its state n over the chunk in registers and stores the sum once per
// (tile, chunk): no zeroed scratch and no global read-modify-write per channel. dB needs the adjoint and dC only the
// states, so dB is summed in the adjoint pass and dC in a second, forward-only pass over the tile's channels: one
// 64-float array fewer per thread (a 64-step history and both sums would take every register and spill).
// Per-channel quantities that cross a chunk boundary live in global scratch, used only when L > kChunk (never at
// Mamba-FSCIL's L <= 49): `carry` (rows, n_chunks, N) holds the state at each chunk start and, in slot 0 (chunk 0
// starts at zero), the adjoint handed from one chunk to the one before; dA and fixed dB/dC run on in their rows.
template <typename T>
__global__ void backward_kernel(Params p, Inputs<T> in, const float* __restrict__ y_pre, const float* __restrict__ dout,
                                const float* __restrict__ dlast, int tile, float* __restrict__ carry,
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
  // varying B / C over the chunk, read once for the tile's channels, in dynamic shared memory
  // (backward_shared_bytes): thread n keeps its own state's row of kStageRow floats (no other thread reads it: no
  // barrier); a row of kChunk + 1 keeps a warp's accesses on 32 different banks, and a per-thread base pointer lets
  // the unrolled loops address with constant offsets
  CIL_DYNAMIC_SHARED(s_stage);
  float* const s_B = s_stage + (int64_t)n * kStageRow;
  float* const s_C = s_stage + (int64_t)((p.varying_B ? blockDim.x : 0) + n) * kStageRow;
  // registers, not local memory: every index below is a constant (the time loops are unrolled over the whole chunk
  // with the chunk's length as a guard, the same for every thread of the block, so the shuffles stay uniform)
  float hist[kChunk];  // one channel's states over the chunk
  float acc[kChunk];   // the tile's dB (adjoint pass), then its dC (second pass), over the chunk
  // varying dB / dC of this tile: its own slice (batch, tiles, L, dstate); fixed ones: per row (batch, dim, dstate)
  float* dB_tile = dB_tiles + ((int64_t)b * tiles_per_row + tile_index) * p.length * p.dstate;
  float* dC_tile = dC_tiles + ((int64_t)b * tiles_per_row + tile_index) * p.length * p.dstate;
  auto dt_of = [&](float raw) { return p.softplus ? softplus(raw) : raw; };
  auto store_acc = [&](float* dst, int t0, int steps) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < steps && active) dst[(int64_t)(t0 + i) * p.dstate + n] = acc[i];
  };
  // Stage channel d's chunk in shared memory: raw and softplus'd delta, u, and gy, the gradient reaching y (dout
  // through the z gate, writing dz when asked). Returns this thread's partial of sum(gy * u) for dD. Every thread
  // of the block calls it (it has barriers).
  auto stage = [&](int d, int t0, int steps, bool write_dz) {
    const int64_t base = ((int64_t)b * p.dim + d) * p.length;
    const float bias = p.has_bias ? in.bias[d] : 0.f;
    float dD_part = 0.f;
    __syncthreads();  // the previous channel's staged values may still be read
    for (int j = n; j < steps; j += blockDim.x) {
      const int64_t at = base + t0 + j;
      const float raw = to_float(in.delta[at]) + bias;
      s_raw[j] = raw;
      s_dt[j] = dt_of(raw);
      const float uv = to_float(in.u[at]);
      s_u[j] = uv;
      float g = dout[at];
      if (p.has_z) {  // out = y * silu(z): dz from the saved pre-gate y, and the gradient reaching y
        const float zv = to_float(in.z[at]), sg = sigmoid(zv);
        if (write_dz) dz[at] = g * y_pre[at] * sg * (1.f + zv * (1.f - sg));
        g *= zv * sg;
      }
      s_gy[j] = g;
      dD_part += g * uv;
    }
    __syncthreads();
    return dD_part;
  };

  // B (and C) of the tile's group over a chunk into this thread's staging rows
  auto stage_BC = [&](int t0, int steps, bool with_C) {
    if (!active) return;
    const int d0 = tile_index * tile;  // any channel of the tile: they share one group
    for (int i = 0; i < steps; ++i) {
      if (p.varying_B) s_B[i] = to_float(in.B[bc_index(true, p, b, d0, t0 + i, n)]);
      if (p.varying_C && with_C) s_C[i] = to_float(in.C[bc_index(true, p, b, d0, t0 + i, n)]);
    }
  };

  // 1. forward sweep, chunk by chunk and in each the tile's channels: the state at each chunk start (each thread
  // writes and later reads only its own n)
  for (int c = 0; c + 1 < n_chunks; ++c) {
    const int t0 = c * kChunk;
    stage_BC(t0, kChunk, false);
    if (!active) continue;
    for (int k = 0; k < tile; ++k) {
      const int d = tile_index * tile + k;
      const int64_t row = (int64_t)b * p.dim + d, base = row * p.length;
      const float a = in.A[(int64_t)d * p.dstate + n], bias = p.has_bias ? in.bias[d] : 0.f;
      const float Bfix = p.varying_B ? 0.f : to_float(in.B[(int64_t)d * p.dstate + n]);
      float h = c == 0 ? 0.f : carry[(row * n_chunks + c) * p.dstate + n];
      for (int i = 0; i < kChunk; ++i) {
        const float dt = dt_of(to_float(in.delta[base + t0 + i]) + bias);
        h = next_state(h, dt, a, p.varying_B ? s_B[i] : Bfix, to_float(in.u[base + t0 + i]));
      }
      carry[(row * n_chunks + c + 1) * p.dstate + n] = h;
    }
  }

  // 2. chunks in reverse
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * kChunk, steps = min(kChunk, p.length - t0);
    const bool last_chunk = c == n_chunks - 1;
    stage_BC(t0, steps, true);
    // 2a. the adjoint pass over the tile's channels: du, ddelta, dz, dA, dD, dbias, dB (and a fixed C's dC)
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i] = 0.f;
    for (int k = 0; k < tile; ++k) {
      const int d = tile_index * tile + k;
      const int row = b * p.dim + d;
      const int64_t base = (int64_t)row * p.length;
      const float a = active ? in.A[(int64_t)d * p.dstate + n] : 0.f;
      const float Dd = p.has_D ? in.D[d] : 0.f;
      const float Bfix = (!p.varying_B && active) ? to_float(in.B[(int64_t)d * p.dstate + n]) : 0.f;
      const float Cfix = (!p.varying_C && active) ? to_float(in.C[(int64_t)d * p.dstate + n]) : 0.f;
      const float dD_part = stage(d, t0, steps, true);
      float dbias_part = 0.f;
      // lambda enters the chunk from the one after it (from dlast, or zero, at the sequence's end); a_next is
      // exp(dt[t0 + steps] A), the decay of the step after the chunk (1 at the end: then lambda[L-1] gets dlast)
      float lam = 0.f, a_next = 1.f, dA_acc = 0.f, dBfix = 0.f, dCfix = 0.f;
      const int64_t lam_slot = (int64_t)row * n_chunks * p.dstate + n;  // slot 0: chunk 0's start is never stored
      if (active) {
        if (!last_chunk) {
          const float bias = p.has_bias ? in.bias[d] : 0.f;
          lam = carry[lam_slot];
          a_next = expf(dt_of(to_float(in.delta[base + t0 + steps]) + bias) * a);
          dA_acc = dA_rows[(int64_t)row * p.dstate + n];  // the later chunks' sums run on, in the same order
          if (!p.varying_B) dBfix = dB_tiles[(int64_t)row * p.dstate + n];
          if (!p.varying_C) dCfix = dC_tiles[(int64_t)row * p.dstate + n];
        } else if (dlast != nullptr) {
          lam = dlast[(int64_t)row * p.dstate + n];
        }
      }
      // recompute this chunk's states from its start state
      float h = (c == 0 || !active) ? 0.f : carry[((int64_t)row * n_chunks + c) * p.dstate + n];
      const float h_start = h;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i < steps && active) {
          const float dt = s_dt[i];
          const float bv = p.varying_B ? s_B[i] : Bfix;
          h = next_state(h, dt, a, bv, s_u[i]);
        }
        hist[i] = h;
      }
#pragma unroll
      for (int i = kChunk - 1; i >= 0; --i) {
        if (i >= steps) continue;
        float du_part = 0.f, ddt_part = 0.f;
        if (active) {
          const float dt = s_dt[i], uv = s_u[i], gy = s_gy[i];
          const float bv = p.varying_B ? s_B[i] : Bfix;
          const float cv = p.varying_C ? s_C[i] : Cfix;
          lam = cv * gy + a_next * lam;
          const float a_t = expf(dt * a);
          const float h_prev = i > 0 ? hist[i - 1] : h_start;
          du_part = lam * dt * bv;
          ddt_part = lam * (bv * uv + a * a_t * h_prev);
          dA_acc += lam * dt * a_t * h_prev;
          const float gB = lam * dt * uv;
          if (p.varying_B) acc[i] += gB; else dBfix += gB;
          if (!p.varying_C) dCfix += gy * hist[i];
          a_next = a_t;
        }
        du_part = warp_sum(du_part);
        ddt_part = warp_sum(ddt_part);
        if (lane == 0) {
          s_du[warp][i] = du_part;
          s_ddt[warp][i] = ddt_part;
        }
      }
      if (active) {
        if (c > 0) carry[lam_slot] = lam;
        dA_rows[(int64_t)row * p.dstate + n] = dA_acc;
        if (!p.varying_B) dB_tiles[(int64_t)row * p.dstate + n] = dBfix;
        if (!p.varying_C) dC_tiles[(int64_t)row * p.dstate + n] = dCfix;
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
        dbias_part += ddt;
      }
      // dD and dbias of the row: a fixed-order block reduction per chunk, the chunks added in reverse order
      const float dD_chunk = block_sum(dD_part, s_red, warps);
      const float dbias_chunk = block_sum(dbias_part, s_red, warps);
      if (n == 0) {
        dD_rows[row] = last_chunk ? dD_chunk : dD_rows[row] + dD_chunk;
        dbias_rows[row] = last_chunk ? dbias_chunk : dbias_rows[row] + dbias_chunk;
      }
    }
    if (p.varying_B) store_acc(dB_tile, t0, steps);
    // 2b. varying C: dC[t, n] = sum over the tile's channels of gy[t] h[t, n], from the states alone
    if (p.varying_C) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[i] = 0.f;
      for (int k = 0; k < tile; ++k) {
        const int d = tile_index * tile + k;
        const int64_t row = (int64_t)b * p.dim + d;
        const float a = active ? in.A[(int64_t)d * p.dstate + n] : 0.f;
        const float Bfix = (!p.varying_B && active) ? to_float(in.B[(int64_t)d * p.dstate + n]) : 0.f;
        stage(d, t0, steps, false);
        float h = (c == 0 || !active) ? 0.f : carry[(row * n_chunks + c) * p.dstate + n];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          if (i < steps && active) {
            const float dt = s_dt[i];
            const float bv = p.varying_B ? s_B[i] : Bfix;
            h = next_state(h, dt, a, bv, s_u[i]);
            acc[i] += s_gy[i] * h;
          }
        }
      }
      store_acc(dC_tile, t0, steps);
    }
  }
}

// ---- launch shapes (host code, shared by the CUDA launcher and the CPU harness) --------------------------------
// threads per block: one per state, rounded up to whole warps
inline int threads_for(int dstate) { return ((dstate + 31) / 32) * 32; }

// the backward's dynamic shared memory: a chunk of each varying matrix, a row of kStageRow floats per thread: 130 KB
// at dstate 256 with both varying (beyond the default 48 KB: the launcher opts in; sm_80 allows 163 KB, sm_90 227 KB)
inline size_t backward_shared_bytes(bool varying_B, bool varying_C, int threads) {
  return (size_t)((varying_B ? 1 : 0) + (varying_C ? 1 : 0)) * threads * kStageRow * sizeof(float);
}

// Channels per block: a power of two dividing the group size (a tile never spans two groups), at most `max_tile`:
// the largest that keeps at least `min_blocks` blocks in the grid, and never below kMinTile where the group allows
// it. Backward: the varying dB / dC scratch is (batch, dim / tile, L, dstate), so a larger tile shrinks it (at CUB's
// base shapes tile 64 makes it 205 MB instead of 822 MB at 16) but serialises more channels per block; kMinBlocks
// (about sixteen waves of one 256-thread block on each of a 132-SM GPU's SMs) keeps the GPU busy while doing so, and
// small grids (8 images) keep the tile of 16 rather than growing their scratch. Forward: B / C are read once per
// tile (kMaxForwardTile <= kMinTile: the largest divisor).
constexpr int kMaxTile = 64;
constexpr int kMinTile = 16;
constexpr int kMinBlocks = 2048;
inline int tile_for(int group_size, int64_t rows, int max_tile, int min_blocks = kMinBlocks) {
  int best = 1;
  for (int candidate = 2; candidate <= max_tile; candidate *= 2)
    if (group_size % candidate == 0 && (candidate <= kMinTile || rows / candidate >= min_blocks)) best = candidate;
  return best;
}
inline int forward_tile_for(int group_size, int64_t rows, int min_blocks = kMinBlocks) {
  return tile_for(group_size, rows, kMaxForwardTile, min_blocks);
}
inline int backward_tile_for(int group_size, int64_t rows, int min_blocks = kMinBlocks) {
  return tile_for(group_size, rows, kMaxTile, min_blocks);
}

}  // namespace cil_scan
