// Selective scan (Mamba-1, real A) on CUDA: the launcher (ATen tensors, streams, dtype dispatch) of the kernels in
// selective_scan_kernels.cuh, forward and backward, float32 state and accumulation, float32 /
// float16 / bfloat16 inputs. The math is the docstring of cil/ops/selective_scan/__init__.py; the backward
// quantities (the adjoint lambda, run backwards in time) are those of the PyTorch reference, reference.py.
//
// Mapping (Mamba-FSCIL's L is tiny and its dstate large): one thread per state n, one block per (batch, tile of
// channels of one group), time in stages of kStage steps whose B / C each thread reads once for the tile. Each step
// is an FMA per thread; y[t] = sum_n C h is a warp-shuffle reduction per step whose warp partials meet in shared
// memory once per stage. Long sequences are fine: the states are carried from stage to stage in registers.
//
// Backward recomputes the forward states chunk by chunk instead of storing them: a block owns a tile of channels
// of one group, runs each channel's forward recurrence writing only the state at each chunk start (none at all
// when L <= kChunk, the Mamba-FSCIL case), then walks the chunks backwards and, in each, the tile's channels,
// recomputing the chunk's states from its start state.
//
// Determinism: no floating-point atomics. Per-row partial sums of dA, dD, dbias (and dB/dC for fixed B/C) go to
// scratch rows summed afterwards in a fixed order by the caller; varying dB/dC are summed over the tile's channels
// in registers, in order, and each tile stores its partial once; the caller sums the tiles of a group in order.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "selective_scan_kernels.cuh"

using namespace cil_scan;

namespace {

Params make_params(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& C,
                   bool has_D, bool has_z, bool has_bias, bool softplus) {
  Params p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.length = u.size(2);
  p.dstate = A.size(1);
  p.varying_B = B.dim() == 4;
  p.varying_C = C.dim() == 4;
  p.groups = p.varying_B ? B.size(1) : (p.varying_C ? C.size(1) : 1);
  p.has_D = has_D;
  p.has_z = has_z;
  p.has_bias = has_bias;
  p.softplus = softplus;
  TORCH_CHECK(p.dstate <= kMaxState, "selective_scan (cuda): dstate ", p.dstate, " > ", kMaxState);
  TORCH_CHECK(!(p.varying_B && p.varying_C) || B.size(1) == C.size(1), "B and C must have the same groups");
  return p;
}

template <typename T>
Inputs<T> make_inputs(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                      const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D, const torch::Tensor& z,
                      const torch::Tensor& bias) {
  return Inputs<T>{u.data_ptr<T>(), delta.data_ptr<T>(), B.data_ptr<T>(), C.data_ptr<T>(),
                   z.numel() ? z.data_ptr<T>() : nullptr, A.data_ptr<float>(),
                   D.numel() ? D.data_ptr<float>() : nullptr, bias.numel() ? bias.data_ptr<float>() : nullptr};
}


}  // namespace

// u, delta, z: (batch, dim, L) of one dtype; A (dim, N), D, bias (dim,) float32; B, C varying time-major
// (batch, groups, L, N) in u's dtype, or fixed (dim, N). Returns out (u's dtype), pre-gate y and the last state
// (fp32; written only when want_last, else an empty tensor).
std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                               torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus, bool want_last) {
  const at::cuda::OptionalCUDAGuard guard(u.device());
  Params p = make_params(u, A, B, C, D.numel() > 0, z.numel() > 0, bias.numel() > 0, softplus);
  auto out = torch::empty_like(u);
  auto y = torch::empty(u.sizes(), u.options().dtype(torch::kFloat32));
  auto last = want_last ? torch::empty({p.batch, p.dim, p.dstate}, u.options().dtype(torch::kFloat32))
                        : torch::empty({0}, u.options().dtype(torch::kFloat32));
  if (u.numel() == 0) return {out, y, last.zero_()};
  const int tile = forward_tile_for(p.dim / p.groups, (int64_t)p.batch * p.dim);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_fwd", [&] {
    forward_kernel<scalar_t><<<p.batch * (p.dim / tile), threads_for(p.dstate), 0, stream>>>(
        p, make_inputs<scalar_t>(u, delta, A, B, C, D, z, bias), tile, out.data_ptr<scalar_t>(), y.data_ptr<float>(),
        want_last ? last.data_ptr<float>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, y, last};
}

// Gradients in float32: du, ddelta, dz (batch, dim, L); dA (dim, N); dB, dC in B's / C's layout; dD, dbias (dim,).
std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                               torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus, torch::Tensor y_pre,
                               torch::Tensor dout, torch::Tensor dlast) {
  const at::cuda::OptionalCUDAGuard guard(u.device());
  Params p = make_params(u, A, B, C, D.numel() > 0, z.numel() > 0, bias.numel() > 0, softplus);
  auto f32 = u.options().dtype(torch::kFloat32);
  const int tile = backward_tile_for(p.dim / p.groups, (int64_t)p.batch * p.dim);
  const int tiles = p.dim / tile;
  const int n_chunks = (p.length + kChunk - 1) / kChunk;
  auto du = torch::empty(u.sizes(), f32), ddelta = torch::empty(u.sizes(), f32);
  auto dz = p.has_z ? torch::empty(u.sizes(), f32) : torch::empty({0}, f32);
  auto dA_rows = torch::empty({p.batch, p.dim, p.dstate}, f32);
  auto dD_rows = torch::empty({p.batch, p.dim}, f32), dbias_rows = torch::empty({p.batch, p.dim}, f32);
  // every element of these is written by the kernel (no zeroing pass): varying dB / dC once per (tile, t, n)
  auto dB_tiles = p.varying_B ? torch::empty({p.batch, tiles, p.length, p.dstate}, f32)
                              : torch::empty({p.batch, p.dim, p.dstate}, f32);
  auto dC_tiles = p.varying_C ? torch::empty({p.batch, tiles, p.length, p.dstate}, f32)
                              : torch::empty({p.batch, p.dim, p.dstate}, f32);
  // chunk-start states and the adjoint carried between chunks, per row: only for L > kChunk
  auto carry = torch::empty({n_chunks > 1 ? (int64_t)p.batch * p.dim * n_chunks * p.dstate : 1}, f32);
  auto dout32 = dout.to(torch::kFloat32).contiguous();
  auto dlast32 = dlast.numel() ? dlast.to(torch::kFloat32).contiguous() : dlast;
  if (u.numel() > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const int threads = threads_for(p.dstate);
    const size_t shared = backward_shared_bytes(p.varying_B, p.varying_C, threads);
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(shared <= (size_t)optin, "selective_scan (cuda): the backward stages B/C in ", shared,
                " bytes of shared memory per block at dstate ", p.dstate, "; this GPU allows ", optin);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_bwd", [&] {
      if (shared > 48 * 1024)  // beyond the default: opt in (once per kernel and size; cheap to repeat)
        C10_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)shared));
      backward_kernel<scalar_t><<<p.batch * tiles, threads, shared, stream>>>(
          p, make_inputs<scalar_t>(u, delta, A, B, C, D, z, bias), y_pre.data_ptr<float>(), dout32.data_ptr<float>(),
          dlast32.numel() ? dlast32.data_ptr<float>() : nullptr, tile, carry.data_ptr<float>(),
          du.data_ptr<float>(), ddelta.data_ptr<float>(), p.has_z ? dz.data_ptr<float>() : nullptr,
          dA_rows.data_ptr<float>(), dD_rows.data_ptr<float>(), dbias_rows.data_ptr<float>(),
          dB_tiles.data_ptr<float>(), dC_tiles.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {  // nothing scanned (L = 0 or an empty batch): the last state is zero whatever the parameters
    for (auto* t : {&dA_rows, &dD_rows, &dbias_rows, &dB_tiles, &dC_tiles}) t->zero_();
  }
  // fixed-order sums of the partials (deterministic): over the batch, and over the tiles of each group
  auto dA = dA_rows.sum(0);
  auto dD = dD_rows.sum(0), dbias = dbias_rows.sum(0);
  auto per_group = [&](torch::Tensor partial, bool varying) {
    if (!varying) return partial.sum(0);  // fixed: (dim, N)
    return partial.view({p.batch, p.groups, tiles / p.groups, p.length, p.dstate}).sum(2);  // (batch, G, L, N)
  };
  return {du, ddelta, dA, per_group(dB_tiles, p.varying_B), per_group(dC_tiles, p.varying_C), dD, dbias, dz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "selective scan, forward (CUDA)");
  m.def("bwd", &bwd, "selective scan, backward (CUDA)");
}
