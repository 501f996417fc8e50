// CPU kernels of the exact BatchNorm fold of training (SPEC B §4.3; oracle: bbkernels/fold_reference.py).
//
// Tensors are (N, C, inner...) contiguous; channel c's elements are N runs of `inner` values. Each channel is one
// task: its statistics or gradient sums accumulate in double in a fixed order, then one pass writes its outputs,
// so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "bb_cpu.h"

namespace {

struct Shape {
  int64_t n, c, inner;
};

Shape shape_of(const at::Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1);
  return {n, c, c ? t.numel() / (n * c) : 0};
}

// The activation fused in the fold: none, ReLU (inf) or ReLU6 (6).
struct Clamp {
  bool on;
  float hi;
  float apply(float v) const {
    if (!on) return v;
    v = v < 0.0f ? 0.0f : v;  // keeps NaN, like torch.clamp
    return v > hi ? hi : v;
  }
  bool passes(float out) const { return !on || (out > 0.0f && out < hi); }
};

Clamp clamp_of(c10::optional<double> clamp_max) {
  if (!clamp_max.has_value()) return {false, 0.0f};
  return {true, std::isinf(*clamp_max) ? std::numeric_limits<float>::infinity() : static_cast<float>(*clamp_max)};
}

// Visits channel c's elements in order: f(index).
template <typename F>
inline void for_channel(const Shape& s, int64_t c, F&& f) {
  for (int64_t i = 0; i < s.n; ++i) {
    const int64_t base = (i * s.c + c) * s.inner;
    for (int64_t j = 0; j < s.inner; ++j) f(base + j);
  }
}

}  // namespace

namespace bbq_cpu {

std::vector<at::Tensor> fold_forward(const at::Tensor& res, const at::Tensor& y, const at::Tensor& gamma,
                                     const at::Tensor& beta, const at::Tensor& std_run, double eps,
                                     c10::optional<double> clamp_max) {
  const Shape s = shape_of(y);
  const double m = static_cast<double>(s.n * s.inner);
  const Clamp clamp = clamp_of(clamp_max);
  const at::TensorOptions f32 = gamma.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(res, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({s.c}, f32), var = at::empty({s.c}, f32), std = at::empty({s.c}, f32);
  const float *gp = gamma.data_ptr<float>(), *bp = beta.data_ptr<float>(), *rp = std_run.data_ptr<float>();
  float *meanp = mean.data_ptr<float>(), *varp = var.data_ptr<float>(), *stdp = std.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "bb_fold_forward_cpu", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = res.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0.0;
        for_channel(s, c, [&](int64_t k) { sum += static_cast<double>(yp[k]); });
        const double mu = sum / m;
        double m2 = 0.0;  // two passes: no cancellation
        for_channel(s, c, [&](int64_t k) {
          const double d = static_cast<double>(yp[k]) - mu;
          m2 += d * d;
        });
        const double biased = m2 / m;
        const float sd = static_cast<float>(std::sqrt(biased + eps));
        const float mean_f = static_cast<float>(mu);
        const float a = rp[c] / sd, b = bp[c] - gp[c] * mean_f / sd;
        meanp[c] = mean_f;
        varp[c] = static_cast<float>(m > 1.0 ? m2 / (m - 1.0) : biased);
        stdp[c] = sd;
        for_channel(s, c, [&](int64_t k) { op[k] = static_cast<scalar_t>(clamp.apply(static_cast<float>(xp[k]) * a + b)); });
      }
    });
  });
  return {out, mean, var, std};
}

std::vector<at::Tensor> fold_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                                      const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& std_run,
                                      const at::Tensor& mean, const at::Tensor& std, c10::optional<double> clamp_max) {
  const Shape s = shape_of(y);
  const double m = static_cast<double>(s.n * s.inner);
  const Clamp clamp = clamp_of(clamp_max);
  const at::TensorOptions f32 = gamma.options().dtype(at::kFloat);
  at::Tensor d_res = at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor d_y = at::empty_like(y, at::MemoryFormat::Contiguous);
  at::Tensor d_gamma = at::empty({s.c}, f32), d_beta = at::empty({s.c}, f32);
  const float *gp = gamma.data_ptr<float>(), *bp = beta.data_ptr<float>(), *rp = std_run.data_ptr<float>();
  const float *meanp = mean.data_ptr<float>(), *stdp = std.data_ptr<float>();
  float *dgp = d_gamma.data_ptr<float>(), *dbp = d_beta.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bb_fold_backward_cpu", [&] {
    const scalar_t* gradp = grad.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* drp = d_res.data_ptr<scalar_t>();
    scalar_t* dyp = d_y.data_ptr<scalar_t>();
    at::parallel_for(0, s.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s1 = 0.0, s_out = 0.0;
        for_channel(s, c, [&](int64_t k) {
          const float o = static_cast<float>(op[k]);
          const double g = clamp.passes(o) ? static_cast<double>(gradp[k]) : 0.0;
          s1 += g;
          s_out += g * o;
        });
        const double sd = stdp[c], mu = meanp[c], gamma_c = gp[c];
        const double a = rp[c] / sd, b = bp[c] - gamma_c * mu / sd;
        const double s2 = (s_out - b * s1) / a;  // Σ g·res
        const double d_mean = -gamma_c * s1 / sd;
        const double d_std = (gamma_c * mu * s1 - rp[c] * s2) / (sd * sd);
        const double k1 = d_std / (sd * m), k0 = d_mean / m - k1 * mu;
        const float a_f = static_cast<float>(a), k1_f = static_cast<float>(k1), k0_f = static_cast<float>(k0);
        dgp[c] = static_cast<float>(-s1 * mu / sd);
        dbp[c] = static_cast<float>(s1);
        for_channel(s, c, [&](int64_t k) {
          const float g = clamp.passes(static_cast<float>(op[k])) ? static_cast<float>(gradp[k]) : 0.0f;
          drp[k] = static_cast<scalar_t>(g * a_f);
          dyp[k] = static_cast<scalar_t>(static_cast<float>(yp[k]) * k1_f + k0_f);
        });
      }
    });
  });
  return {d_res, d_y, d_gamma, d_beta};
}

}  // namespace bbq_cpu
