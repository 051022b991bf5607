// rnan_fast._C: the op schemas (TORCH_LIBRARY) and the CPU kernels of the fused gate
//   gated_residual_fwd: out = x + s * trunk,                      s = sigmoid(mask_logits)
//   gated_residual_bwd: (grad_mask_logits, grad_trunk) = (g * trunk * s * (1 - s), g * s)
// (grad_x is the incoming gradient itself and is not produced here). One pass over memory each.
// Math in float32 for float32/float16/bfloat16 and in float64 for float64. Layout handling and
// argument checks: gated_residual.h. The CUDA kernels live in cuda/gated_residual.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu_math.h"
#include "gated_residual.h"
#include "nonlocal_attention.h"

namespace rnan_fast {
namespace {

// exp(a) in float32 written in plain arithmetic (range reduction by ln 2 and a degree-5
// polynomial, about 2 ulp) so that the loops calling it vectorise; std::exp would be a scalar
// library call per element. a is clamped to [-87, 88] so the result stays a normal float: a
// sigmoid built on it gives ~6e-39 rather than 0 for logits below -87 (and a mask gradient of
// ~1e-38 * g * t rather than 0 at +-inf), and NaN is passed through.
RNAN_ALWAYS_INLINE float exp_f32(float a) {
  const bool nan = !(a == a);
  float c = nan ? 0.0f : a;
  c = c < -87.0f ? -87.0f : c;
  c = c > 88.0f ? 88.0f : c;
  // k = round(c / ln 2) by the 1.5 * 2^23 trick; r = c - k ln 2 in two parts (Cody-Waite).
  const float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = c - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const float scale = cpu::float_from_bits((static_cast<int32_t>(k) + 127) << 23);  // 2^k, k in [-126, 127]
  return nan ? a : er * scale;
}

RNAN_ALWAYS_INLINE float exp_acc(float a) { return exp_f32(a); }
RNAN_ALWAYS_INLINE double exp_acc(double a) { return std::exp(a); }

// s = sigmoid(v) = 1 / (1 + e) with e = exp(-v), and 1 - s. For s >= 1/2, 1 - s = e * s keeps
// its relative accuracy where the subtraction would cancel (1 - s is 0 in float32 from v > 17,
// while s (1 - s) is still ~1e-8); for s < 1/2 the subtraction is exact enough and avoids
// inf * 0 when e overflows.
template <typename A>
RNAN_ALWAYS_INLINE A sigmoid_acc(A v, A& one_minus_s) {
  const A e = exp_acc(-v);
  const A s = A(1) / (A(1) + e);
  one_minus_s = s < A(0.5) ? A(1) - s : e * s;
  return s;
}

template <typename A>
RNAN_ALWAYS_INLINE A sigmoid_acc(A v) {
  A unused;
  return sigmoid_acc(v, unused);
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
RNAN_ALWAYS_INLINE void fwd_loop(const T* __restrict x, const T* __restrict m, const T* __restrict t,
                                 T* __restrict out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A s = sigmoid_acc(static_cast<A>(m[i]));
    out[i] = static_cast<T>(static_cast<A>(x[i]) + s * static_cast<A>(t[i]));
  }
}

template <typename T>
RNAN_ALWAYS_INLINE void bwd_loop(const T* __restrict g, const T* __restrict m, const T* __restrict t,
                                 T* __restrict gm, T* __restrict gt, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    A one_minus_s;
    const A s = sigmoid_acc(static_cast<A>(m[i]), one_minus_s);
    const A gs = static_cast<A>(g[i]) * s;
    gt[i] = static_cast<T>(gs);
    gm[i] = static_cast<T>(gs * static_cast<A>(t[i]) * one_minus_s);
  }
}

// One non-template entry per dtype: target_clones wants plain functions.
#define RNAN_CPU_ENTRIES(T, NAME)                                                                    \
  RNAN_CPU_CLONES void fwd_##NAME(const T* x, const T* m, const T* t, T* out, int64_t n) {          \
    fwd_loop<T>(x, m, t, out, n);                                                                    \
  }                                                                                                  \
  RNAN_CPU_CLONES void bwd_##NAME(const T* g, const T* m, const T* t, T* gm, T* gt, int64_t n) {    \
    bwd_loop<T>(g, m, t, gm, gt, n);                                                                 \
  }
RNAN_CPU_ENTRIES(float, f32)
RNAN_CPU_ENTRIES(at::Half, f16)
RNAN_CPU_ENTRIES(at::BFloat16, bf16)
#undef RNAN_CPU_ENTRIES

// float64 is for gradcheck and tests: scalar exp, no clones.
void fwd_f64(const double* x, const double* m, const double* t, double* out, int64_t n) { fwd_loop(x, m, t, out, n); }
void bwd_f64(const double* g, const double* m, const double* t, double* gm, double* gt, int64_t n) {
  bwd_loop(g, m, t, gm, gt, n);
}

void fwd_flat(const float* x, const float* m, const float* t, float* o, int64_t n) { fwd_f32(x, m, t, o, n); }
void fwd_flat(const at::Half* x, const at::Half* m, const at::Half* t, at::Half* o, int64_t n) { fwd_f16(x, m, t, o, n); }
void fwd_flat(const at::BFloat16* x, const at::BFloat16* m, const at::BFloat16* t, at::BFloat16* o, int64_t n) {
  fwd_bf16(x, m, t, o, n);
}
void fwd_flat(const double* x, const double* m, const double* t, double* o, int64_t n) { fwd_f64(x, m, t, o, n); }
void bwd_flat(const float* g, const float* m, const float* t, float* gm, float* gt, int64_t n) { bwd_f32(g, m, t, gm, gt, n); }
void bwd_flat(const at::Half* g, const at::Half* m, const at::Half* t, at::Half* gm, at::Half* gt, int64_t n) {
  bwd_f16(g, m, t, gm, gt, n);
}
void bwd_flat(const at::BFloat16* g, const at::BFloat16* m, const at::BFloat16* t, at::BFloat16* gm, at::BFloat16* gt,
              int64_t n) {
  bwd_bf16(g, m, t, gm, gt, n);
}
void bwd_flat(const double* g, const double* m, const double* t, double* gm, double* gt, int64_t n) {
  bwd_f64(g, m, t, gm, gt, n);
}

// Elements per parallel task: enough to amortise the thread hand-off, small enough to split
// one feature map (64 x 48 x 48 = 147456 elements) over a few cores.
constexpr int64_t kGrain = 16384;

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& mask_logits, const at::Tensor& trunk) {
  return gated::forward("rnan_fast::gated_residual_fwd", x, mask_logits, trunk,
                        [](const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, at::Tensor& out, int64_t n) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gated_residual_fwd_cpu", [&] {
      // data_ptr of a strided tensor points at its first element in storage order here: every
      // tensor is dense with out's strides, so [0, n) covers exactly its elements.
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        fwd_flat(xp + begin, mp + begin, tp + begin, op + begin, end - begin);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& grad, const at::Tensor& mask_logits,
                                                          const at::Tensor& trunk) {
  return gated::backward("rnan_fast::gated_residual_bwd", grad, mask_logits, trunk,
                         [](const at::Tensor& g, const at::Tensor& m, const at::Tensor& t, at::Tensor& gm, at::Tensor& gt,
                            int64_t n) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gm.scalar_type(), "gated_residual_bwd_cpu", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      scalar_t* gmp = gm.mutable_data_ptr<scalar_t>();
      scalar_t* gtp = gt.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        bwd_flat(gp + begin, mp + begin, tp + begin, gmp + begin, gtp + begin, end - begin);
      });
    });
  });
}

}  // namespace

bool cuda_compiled() {
#ifdef RNAN_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The GPU architectures the CUDA kernels were compiled for, as 10 * major + minor: (SASS, PTX).
// setup.py passes them as comma lists; empty when built without CUDA.
#ifndef RNAN_FAST_CUDA_SASS
#define RNAN_FAST_CUDA_SASS
#endif
#ifndef RNAN_FAST_CUDA_PTX
#define RNAN_FAST_CUDA_PTX
#endif
std::pair<std::vector<int64_t>, std::vector<int64_t>> cuda_archs() {
  return {std::vector<int64_t>{RNAN_FAST_CUDA_SASS}, std::vector<int64_t>{RNAN_FAST_CUDA_PTX}};
}

TORCH_LIBRARY(rnan_fast, m) {
  // Fakes (for torch.compile) and the autograd formula of these ops are registered in Python,
  // in this module. Ops defined later with their fakes elsewhere belong in a
  // TORCH_LIBRARY_FRAGMENT(rnan_fast, ...) block with its own set_python_module.
  m.set_python_module("rnan_fast.ops.gated_residual");
  m.def("gated_residual_fwd(Tensor x, Tensor mask_logits, Tensor trunk) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad, Tensor mask_logits, Tensor trunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnan_fast, CPU, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace rnan_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("cuda_compiled", &rnan_fast::cuda_compiled, "whether the CUDA kernels were compiled in");
  module.def("cuda_archs", &rnan_fast::cuda_archs,
             "([SASS], [PTX]) GPU architectures (10 * major + minor) the CUDA kernels were compiled for");
  module.def("cpu_attention_isa", &rnan_fast::cpu_attention_isa,
             "the inner loops of the CPU attention kernel: 'avx512' or 'portable'");
  module.def("set_cpu_attention_isa", &rnan_fast::set_cpu_attention_isa,
             "choose the CPU attention kernel's inner loops for this process ('avx512' where the CPU has it, "
             "or 'portable'): for tests and comparisons");
}
