// CUDA kernels of the fused gate (schemas: ../gated_residual.cpp; checks and layout plan:
// ../gated_residual.h):
//   gated_residual_fwd: out = x + s * trunk,                      s = sigmoid(mask_logits)
//   gated_residual_bwd: (grad_mask_logits, grad_trunk) = (g * trunk * s * (1 - s), g * s)
// Memory-bound: one read of each input and one write of each output. Each thread moves 16 bytes
// per tensor per step (4 floats, 8 halves / bfloat16s, 2 doubles) when every pointer is 16-byte
// aligned; the remaining n % V elements are done one by one in the same launch. Unaligned
// pointers (a view starting mid-vector) take the same kernel with V = 1. Math in float32
// (float64 for float64). 64-bit indices throughout; grid-stride loops over a capped grid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../gated_residual.h"

namespace rnan_fast {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// expf, not __expf: the intrinsic (ex2.approx of a * log2 e) errs by up to ~2 + 1.2 |a| ulp, ~100 ulp
// near |a| = 87, and a memory-bound kernel gets the accurate one for free.
__device__ __forceinline__ float exp_acc(float a) { return expf(a); }
__device__ __forceinline__ double exp_acc(double a) { return exp(a); }

// s = sigmoid(v) = 1 / (1 + e), e = exp(-v), and 1 - s, computed as e * s for s >= 1/2 where
// the subtraction would cancel (as in the CPU kernel); 1 - s for s < 1/2 (no inf * 0).
template <typename A>
__device__ __forceinline__ A sigmoid_acc(A v, A& one_minus_s) {
  const A e = exp_acc(-v);
  const A s = A(1) / (A(1) + e);
  one_minus_s = s < A(0.5) ? A(1) - s : e * s;
  return s;
}

template <typename A>
__device__ __forceinline__ A sigmoid_acc(A v) {
  A unused;
  return sigmoid_acc(v, unused);
}

// V elements of T moved as one aligned access (V * sizeof(T) = 16 bytes on the vector path).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ t, T* __restrict__ out,
               int64_t n) {
  using A = typename Acc<T>::type;
  using P = Pack<T, V>;
  const int64_t packs = n / V;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = tid; p < packs; p += stride) {
    const P xv = reinterpret_cast<const P*>(x)[p];
    const P mv = reinterpret_cast<const P*>(m)[p];
    const P tv = reinterpret_cast<const P*>(t)[p];
    P ov;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A s = sigmoid_acc(static_cast<A>(mv.v[k]));
      ov.v[k] = static_cast<T>(static_cast<A>(xv.v[k]) + s * static_cast<A>(tv.v[k]));
    }
    reinterpret_cast<P*>(out)[p] = ov;
  }
  if (V > 1) {  // the last n % V elements
    const int64_t i = packs * V + tid;
    if (i < n) {
      const A s = sigmoid_acc(static_cast<A>(m[i]));
      out[i] = static_cast<T>(static_cast<A>(x[i]) + s * static_cast<A>(t[i]));
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const T* __restrict__ g, const T* __restrict__ m, const T* __restrict__ t, T* __restrict__ gm,
               T* __restrict__ gt, int64_t n) {
  using A = typename Acc<T>::type;
  using P = Pack<T, V>;
  const int64_t packs = n / V;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = tid; p < packs; p += stride) {
    const P gv = reinterpret_cast<const P*>(g)[p];
    const P mv = reinterpret_cast<const P*>(m)[p];
    const P tv = reinterpret_cast<const P*>(t)[p];
    P gmv, gtv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A oms;
      const A s = sigmoid_acc(static_cast<A>(mv.v[k]), oms);
      const A gs = static_cast<A>(gv.v[k]) * s;
      gtv.v[k] = static_cast<T>(gs);
      gmv.v[k] = static_cast<T>(gs * static_cast<A>(tv.v[k]) * oms);
    }
    reinterpret_cast<P*>(gm)[p] = gmv;
    reinterpret_cast<P*>(gt)[p] = gtv;
  }
  if (V > 1) {
    const int64_t i = packs * V + tid;
    if (i < n) {
      A oms;
      const A s = sigmoid_acc(static_cast<A>(m[i]), oms);
      const A gs = static_cast<A>(g[i]) * s;
      gt[i] = static_cast<T>(gs);
      gm[i] = static_cast<T>(gs * static_cast<A>(t[i]) * oms);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Enough blocks to cover the work once, capped at 32 per SM (4 resident-block waves of 8 x 256
// threads); the grid-stride loop does the rest. Always >= 1 block (n > 0 here).
// (ATen/cuda/CUDAContext.h would give the device properties, but it pulls in cuBLAS and cuSPARSE
// headers that a minimal toolkit lacks; the runtime call, cached per device, needs only cudart.)
int64_t sm_count(c10::DeviceIndex device) {
  static std::atomic<int> cache[64] = {};
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

unsigned int grid_for(int64_t items) {
  const int64_t sms = sm_count(c10::cuda::current_device());
  const int64_t want = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 32)));
}

template <typename T>
void launch_fwd(const T* x, const T* m, const T* t, T* out, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (aligned16(x) && aligned16(m) && aligned16(t) && aligned16(out)) {
    // The tail (< V elements) rides on the first threads, so cover max(packs, tail) items.
    fwd_kernel<T, V><<<grid_for(std::max<int64_t>(n / V, n % V)), kThreads, 0, stream>>>(x, m, t, out, n);
  } else {
    fwd_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(x, m, t, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bwd(const T* g, const T* m, const T* t, T* gm, T* gt, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (aligned16(g) && aligned16(m) && aligned16(t) && aligned16(gm) && aligned16(gt)) {
    bwd_kernel<T, V><<<grid_for(std::max<int64_t>(n / V, n % V)), kThreads, 0, stream>>>(g, m, t, gm, gt, n);
  } else {
    bwd_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(g, m, t, gm, gt, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gated_residual_fwd_cuda(const at::Tensor& x, const at::Tensor& mask_logits, const at::Tensor& trunk) {
  // Checks first (they compare devices), then switch to x's device for allocation and launch.
  gated::check_inputs("rnan_fast::gated_residual_fwd", x, "x", mask_logits, "mask_logits", trunk, "trunk");
  const c10::cuda::CUDAGuard guard(x.device());
  return gated::forward("rnan_fast::gated_residual_fwd", x, mask_logits, trunk,
                        [](const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, at::Tensor& out, int64_t n) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gated_residual_fwd_cuda", [&] {
      launch_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), n);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cuda(const at::Tensor& grad, const at::Tensor& mask_logits,
                                                           const at::Tensor& trunk) {
  gated::check_inputs("rnan_fast::gated_residual_bwd", grad, "grad", mask_logits, "mask_logits", trunk, "trunk");
  const c10::cuda::CUDAGuard guard(mask_logits.device());
  return gated::backward("rnan_fast::gated_residual_bwd", grad, mask_logits, trunk,
                         [](const at::Tensor& g, const at::Tensor& m, const at::Tensor& t, at::Tensor& gm, at::Tensor& gt,
                            int64_t n) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gm.scalar_type(), "gated_residual_bwd_cuda", [&] {
      launch_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                           gm.mutable_data_ptr<scalar_t>(), gt.mutable_data_ptr<scalar_t>(), n);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rnan_fast, CUDA, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cuda);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cuda);
}

}  // namespace rnan_fast
