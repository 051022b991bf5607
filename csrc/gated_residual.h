// Shared by the CPU (gated_residual.cpp) and CUDA (cuda/gated_residual.cu) kernels of
//   out = x + sigmoid(mask_logits) * trunk
// and of its backward: argument checks and the memory-layout plan.
//
// Layout plan. The op is elementwise, so when every tensor of a call maps each index to the
// same storage offset (equal strides on every dimension longer than 1) the kernels run over
// the flat storage, whatever the order (contiguous, channels_last, a permuted view, ...), and
// nothing is copied. Outputs are made with empty_like, so they keep the input's memory format
// (x's for the forward, mask_logits' / trunk's for the backward). An input whose layout differs
// (a transposed view beside contiguous tensors, a slice with gaps, an expanded gradient) is
// first copied into the output's layout: correct, at the price of that one copy.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rnan_fast {
namespace gated {

inline bool supported_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble;
}

// Every tensor of one call has the first one's shape, dtype and device; the messages name both.
inline void check_pair(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), op, ": devices differ: ", an, " is on ", a.device(), " but ", bn,
              " is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ: ", an, " is ", a.scalar_type(),
              " but ", bn, " is ", b.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": shapes differ: ", an, " has shape ", a.sizes(), " but ", bn,
              " has shape ", b.sizes());
}

inline void check_inputs(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                         const at::Tensor& c, const char* cn) {
  check_pair(op, a, an, b, bn);
  check_pair(op, a, an, c, cn);
  TORCH_CHECK(supported_dtype(a.scalar_type()), op, ": unsupported dtype ", a.scalar_type(),
              " (expected float32, float16, bfloat16 or float64)");
}

// True when a and b (same shape) send every index to the same storage offset.
inline bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// a's values in `like`'s layout: a itself when the layouts agree, else a copy. `like` must be
// non-overlapping and dense (an empty_like output always is), so equal strides make a dense too.
inline at::Tensor in_layout_of(const at::Tensor& a, const at::Tensor& like) {
  return same_strides(a, like) ? a : at::empty_like(like).copy_(a);
}

// run(x, m, t, out, n): the flat kernel over n elements of four tensors in one layout.
template <typename Run>
at::Tensor forward(const char* op, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t, Run&& run) {
  check_inputs(op, x, "x", m, "mask_logits", t, "trunk");
  at::Tensor out = at::empty_like(x);
  const int64_t n = out.numel();
  if (n == 0) return out;
  run(in_layout_of(x, out), in_layout_of(m, out), in_layout_of(t, out), out, n);
  return out;
}

// run(g, m, t, grad_m, grad_t, n): the flat kernel over n elements of five tensors in one layout.
template <typename Run>
std::tuple<at::Tensor, at::Tensor> backward(const char* op, const at::Tensor& g, const at::Tensor& m,
                                            const at::Tensor& t, Run&& run) {
  check_inputs(op, g, "grad", m, "mask_logits", t, "trunk");
  at::Tensor grad_m = at::empty_like(m);
  at::Tensor grad_t = at::empty_like(t);
  const int64_t n = grad_m.numel();
  if (n == 0) return {grad_m, grad_t};
  // grad_m sets the layout; grad_t is written in place when trunk shares it (the usual case).
  at::Tensor gt = same_strides(grad_t, grad_m) ? grad_t : at::empty_like(grad_m);
  run(in_layout_of(g, grad_m), in_layout_of(m, grad_m), in_layout_of(t, grad_m), grad_m, gt, n);
  if (!gt.is_same(grad_t)) grad_t.copy_(gt);
  return {grad_m, grad_t};
}

}  // namespace gated
}  // namespace rnan_fast
