// The deployed quantizer of bbkernels/deployed.py on the CPU: y = s·rint(clamp(x, lo, hi)/s) in fp32 (a correctly
// rounded division, rint half to even), stored in x's dtype; NaN stays NaN, as torch.clamp keeps it.
#include <ATen/Parallel.h>

#include <cmath>

#include "bb_cpu.h"

namespace bbq_cpu {

at::Tensor qdq_forward(const at::Tensor& x_in, double scale, double lo, double hi) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const float s = static_cast<float>(scale), l = static_cast<float>(lo), h = static_cast<float>(hi);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bb_qdq_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float v = static_cast<float>(src[i]);
        v = v < l ? l : (v > h ? h : v);
        dst[i] = static_cast<scalar_t>(s * std::nearbyint(v / s));
      }
    });
  });
  return y;
}

}  // namespace bbq_cpu
