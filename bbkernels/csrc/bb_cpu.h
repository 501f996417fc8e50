// Entry points of the CPU extension (bbkernels_cpu), bound to Python in bb_cpu_bind.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace bbq_cpu {

// The quantize-and-gate operator (bb_quant_cpu.cpp).
at::Tensor quantize_forward(const at::Tensor& x, const at::Tensor& x_max, const c10::optional<at::Tensor>& gates,
                            const c10::optional<at::Tensor>& g2, bool is_signed, int64_t bits);
std::vector<at::Tensor> quantize_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& x_max,
                                          const c10::optional<at::Tensor>& gates,
                                          const c10::optional<at::Tensor>& g2, bool is_signed, int64_t bits);

// The exact BatchNorm fold of training (bn_fold_cpu.cpp).
std::vector<at::Tensor> fold_forward(const at::Tensor& res, const at::Tensor& y, const at::Tensor& gamma,
                                     const at::Tensor& beta, const at::Tensor& std_run, double eps,
                                     c10::optional<double> clamp_max);
std::vector<at::Tensor> fold_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                                      const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& std_run,
                                      const at::Tensor& mean, const at::Tensor& std, c10::optional<double> clamp_max);

// The deployed quantizer of evaluation and export (qdq_cpu.cpp).
at::Tensor qdq_forward(const at::Tensor& x, double scale, double lo, double hi);

}  // namespace bbq_cpu
