// Host entry points of the CUDA kernels (csrc/bb_quant_cuda.cu), bound to Python by bb_quant_cuda_bind.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace bbq_cuda {

at::Tensor forward(const at::Tensor& x, const at::Tensor& x_max, const std::optional<at::Tensor>& gates,
                   const std::optional<at::Tensor>& g2, bool is_signed, int64_t bits);

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& x_max,
                                 const std::optional<at::Tensor>& gates, const std::optional<at::Tensor>& g2,
                                 bool is_signed, int64_t bits);

}  // namespace bbq_cuda
