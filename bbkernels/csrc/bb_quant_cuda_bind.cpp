// Python binding of the CUDA kernels; kept apart from the .cu so nvcc never parses torch/extension.h.
#include <torch/extension.h>

#include "bb_quant_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &bbq_cuda::forward, "quantize-and-gate forward (CUDA)");
  m.def("backward", &bbq_cuda::backward, "quantize-and-gate backward (CUDA)");
}
