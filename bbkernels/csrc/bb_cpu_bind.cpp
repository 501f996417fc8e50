// Python binding of the CPU extension: the quantize-and-gate operator, the exact BatchNorm fold, the deployed quantizer.
#include "bb_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &bbq_cpu::quantize_forward, "quantize-and-gate forward (CPU)");
  m.def("backward", &bbq_cpu::quantize_backward, "quantize-and-gate backward (CPU)");
  m.def("fold_forward", &bbq_cpu::fold_forward, "exact BatchNorm fold of training, forward (CPU)");
  m.def("fold_backward", &bbq_cpu::fold_backward, "exact BatchNorm fold of training, backward (CPU)");
  m.def("qdq", &bbq_cpu::qdq_forward, "deployed quantizer s*rint(clamp(x, lo, hi)/s) (CPU)");
}
