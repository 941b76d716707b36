// Fused selective scan for the CPU: one pass over time per (batch, channel) row, the state in a small local
// buffer, no (batch, dim, L, dstate) tensor ever written. Same recurrence as reference.py; inputs arrive
// contiguous in the compute dtype (float32 or float64), B/C either fixed (dim, n) or varying, time-major
// (batch, groups, L, n) so the inner loop over the state is contiguous and vectorises.
// The backward pass recomputes the row's states, then runs the adjoint recurrence backwards.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>
#include <vector>

namespace {

template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

struct Shape {
  int64_t batch, dim, length, n, groups;
  bool b_varying, c_varying;
};

template <typename T>
struct Inputs {
  const T *u, *delta, *A, *B, *C, *D, *z, *bias;
  bool softplus;
};

// B or C at (batch b, channel d, state k, step t)
template <typename T>
inline const T* row_of(const T* M, bool varying, const Shape& s, int64_t b, int64_t d) {
  const int64_t g = d / (s.dim / s.groups);
  return varying ? M + (b * s.groups + g) * s.length * s.n : M + d * s.n;
}

template <typename T>
inline T delta_at(const Inputs<T>& in, int64_t row, int64_t d, int64_t t, int64_t L) {
  T dt = in.delta[row * L + t] + (in.bias ? in.bias[d] : T(0));
  return in.softplus ? softplus(dt) : dt;
}

template <typename T>
void forward(const Inputs<T>& in, const Shape& s, T* y, T* out, T* last) {
  const int64_t L = s.length, N = s.n;
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.dim, d = row % s.dim;
      const T* A = in.A + d * N;
      const T* B = row_of(in.B, s.b_varying, s, b, d);
      const T* C = row_of(in.C, s.c_varying, s, b, d);
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        const T dt = delta_at(in, row, d, t, L), u = in.u[row * L + t], dtu = dt * u;
        const T* Bt = s.b_varying ? B + t * N : B;  // both contiguous over the state: the loop vectorises
        const T* Ct = s.c_varying ? C + t * N : C;
        T acc = 0;
        for (int64_t k = 0; k < N; ++k) {
          h[k] = std::exp(dt * A[k]) * h[k] + dtu * Bt[k];
          acc += Ct[k] * h[k];
        }
        const T yv = acc + (in.D ? in.D[d] * u : T(0));
        y[row * L + t] = yv;
        if (in.z) {
          const T zv = in.z[row * L + t];
          out[row * L + t] = yv * zv * sigmoid(zv);
        } else {
          out[row * L + t] = yv;
        }
      }
      std::copy(h.begin(), h.end(), last + row * N);
    }
  });
}

template <typename T>
void backward(const Inputs<T>& in, const Shape& s, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dB,
              T* dC, T* dz) {
  const int64_t L = s.length, N = s.n, per_group = s.dim / s.groups;
  std::mutex lock;
  // one work item = the channels of one group of one batch element: varying dB/dC of (b, g) belong to it alone
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> hs((L + 1) * N), decays(L * N), lam(N), dts(L), gys(L);
    std::vector<T> dA_own(s.dim * N, T(0));
    std::vector<T> dB_own(s.b_varying ? 0 : s.dim * N, T(0)), dC_own(s.c_varying ? 0 : s.dim * N, T(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.groups, g = item % s.groups;
      for (int64_t d = g * per_group; d < (g + 1) * per_group; ++d) {
        const int64_t row = b * s.dim + d;
        const T* A = in.A + d * N;
        const T* B = row_of(in.B, s.b_varying, s, b, d);
        const T* C = row_of(in.C, s.c_varying, s, b, d);
        T* dBr = s.b_varying ? dB + (b * s.groups + g) * L * N : dB_own.data() + d * N;
        T* dCr = s.c_varying ? dC + (b * s.groups + g) * L * N : dC_own.data() + d * N;
        // recompute the states h_{-1} .. h_{L-1} (hs[t + 1] = h_t) and the gated output's gradient
        std::fill(hs.begin(), hs.begin() + N, T(0));
        for (int64_t t = 0; t < L; ++t) {
          const T dt = delta_at(in, row, d, t, L), u = in.u[row * L + t], dtu = dt * u;
          dts[t] = dt;
          const T* Bt = s.b_varying ? B + t * N : B;
          const T* Ct = s.c_varying ? C + t * N : C;
          const T* __restrict__ prev = hs.data() + t * N;
          T* __restrict__ next = hs.data() + (t + 1) * N;
          T* __restrict__ at = decays.data() + t * N;  // kept for the backward loop: no exp there
          T acc = 0;
          for (int64_t k = 0; k < N; ++k) {
            at[k] = std::exp(dt * A[k]);
            next[k] = at[k] * prev[k] + dtu * Bt[k];
            acc += Ct[k] * next[k];
          }
          const T go = dout[row * L + t];
          if (in.z) {
            const T zv = in.z[row * L + t], sg = sigmoid(zv);
            const T yv = acc + (in.D ? in.D[d] * u : T(0));
            dz[row * L + t] = go * yv * sg * (T(1) + zv * (T(1) - sg));
            gys[t] = go * zv * sg;
          } else {
            gys[t] = go;
          }
        }
        for (int64_t k = 0; k < N; ++k) lam[k] = dlast ? dlast[row * N + k] : T(0);
        for (int64_t t = L - 1; t >= 0; --t) {
          const T dt = dts[t], u = in.u[row * L + t], gy = gys[t];
          const T dtu = dt * u;
          const T* __restrict__ Bt = s.b_varying ? B + t * N : B;
          const T* __restrict__ Ct = s.c_varying ? C + t * N : C;
          T* __restrict__ dBt = s.b_varying ? dBr + t * N : dBr;
          T* __restrict__ dCt = s.c_varying ? dCr + t * N : dCr;
          const T* __restrict__ prev = hs.data() + t * N;
          const T* __restrict__ cur = hs.data() + (t + 1) * N;
          T* __restrict__ dAr = dA_own.data() + d * N;
          T* __restrict__ lm = lam.data();
          const T* __restrict__ Ak = A;
          const T* __restrict__ at = decays.data() + t * N;
          // simple loops, each vectorised: λ_t, then its uses, then the carry λ_t Ā_t to step t - 1
          T lam_b = 0, lam_ah = 0;
          for (int64_t k = 0; k < N; ++k) lm[k] += Ct[k] * gy;
          for (int64_t k = 0; k < N; ++k) lam_b += lm[k] * Bt[k];
          for (int64_t k = 0; k < N; ++k) dBt[k] += lm[k] * dtu;
          for (int64_t k = 0; k < N; ++k) dCt[k] += gy * cur[k];
          for (int64_t k = 0; k < N; ++k) {
            const T w = lm[k] * at[k] * prev[k];  // λ_t Ā_t h_{t-1}
            lam_ah += w * Ak[k];
            dAr[k] += w * dt;
          }
          for (int64_t k = 0; k < N; ++k) lm[k] *= at[k];
          du[row * L + t] = dt * lam_b + (in.D ? in.D[d] * gy : T(0));
          T ddt = u * lam_b + lam_ah;
          if (in.softplus) {
            const T raw = in.delta[row * L + t] + (in.bias ? in.bias[d] : T(0));
            ddt *= raw > T(20) ? T(1) : sigmoid(raw);
          }
          ddelta[row * L + t] = ddt;
        }
      }
    }
    std::lock_guard<std::mutex> guard(lock);  // fold this thread's sums over the batch into the shared ones
    for (int64_t i = 0; i < s.dim * N; ++i) dA[i] += dA_own[i];
    for (size_t i = 0; i < dB_own.size(); ++i) dB[i] += dB_own[i];
    for (size_t i = 0; i < dC_own.size(); ++i) dC[i] += dC_own[i];
  });
}

Shape shape_of(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& C) {
  Shape s{u.size(0), u.size(1), u.size(2), A.size(1), 1, B.dim() == 4, C.dim() == 4};
  if (s.b_varying) s.groups = B.size(1);
  else if (s.c_varying) s.groups = C.size(1);
  return s;
}

template <typename T>
Inputs<T> inputs_of(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& B,
                    const torch::Tensor& C, const torch::Tensor& D, const torch::Tensor& z,
                    const torch::Tensor& bias, bool softplus) {
  auto ptr = [](const torch::Tensor& x) -> const T* { return x.numel() ? x.data_ptr<T>() : nullptr; };
  return {ptr(u), ptr(delta), ptr(A), ptr(B), ptr(C), ptr(D), ptr(z), ptr(bias), softplus};
}

std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                               torch::Tensor C, torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus) {
  const Shape s = shape_of(u, A, B, C);
  auto y = torch::empty_like(u), out = torch::empty_like(u);
  auto last = torch::empty({s.batch, s.dim, s.n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    forward<scalar_t>(inputs_of<scalar_t>(u, delta, A, B, C, D, z, bias, softplus), s, y.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>());
  });
  return {out, y, last};
}

std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                               torch::Tensor C, torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus,
                               torch::Tensor dout, torch::Tensor dlast) {
  const Shape s = shape_of(u, A, B, C);
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u), dz = torch::zeros_like(u);
  auto dA = torch::zeros_like(A), dB = torch::zeros_like(B), dC = torch::zeros_like(C);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    backward<scalar_t>(inputs_of<scalar_t>(u, delta, A, B, C, D, z, bias, softplus), s, dout.data_ptr<scalar_t>(),
                       dlast.numel() ? dlast.data_ptr<scalar_t>() : nullptr, du.data_ptr<scalar_t>(),
                       ddelta.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(),
                       dC.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>());
  });
  return {du, ddelta, dA, dB, dC, dz};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "fused selective scan, forward (CPU)");
  m.def("bwd", &bwd, "fused selective scan, backward (CPU)");
}
