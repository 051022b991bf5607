// Placeholder until the fused kernels land: schema and a plain CPU kernel.
#include <torch/extension.h>

namespace rnan_fast {

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t) {
  return x + at::sigmoid(m) * t;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& g, const at::Tensor& m, const at::Tensor& t) {
  auto s = at::sigmoid(m);
  auto gt = g * s;
  return {gt * t * (1 - s), gt};
}

bool cuda_compiled() {
#ifdef RNAN_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(rnan_fast, m) {
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
}
