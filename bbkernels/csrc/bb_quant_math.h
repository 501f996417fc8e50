// Per-element math of the quantize-and-gate operator, shared by the CPU and CUDA kernels.
//
// SPEC B §10.1–10.3. Exactness rests on the build flags: no FMA contraction (-ffp-contract=off,
// nvcc -fmad=false), correctly rounded division (no fast-math), and rint = round half to even.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define BBQ_HD __host__ __device__ __forceinline__
#define BBQ_UNROLL _Pragma("unroll")
// The callable may be device-only (a lambda inside a kernel); the template is instantiated in device code only.
#define BBQ_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define BBQ_HD inline
#define BBQ_UNROLL _Pragma("GCC unroll 8")
#define BBQ_HD_TEMPLATE
#endif

namespace bbq {

constexpr int kLevels = 5;          // 2, 4, 8, 16, 32 bit
constexpr int kAccumulators = 11;   // per tile: Σg·clipsign, Σg·e_k (5), Σg·u_{k+1} (4), Σg·z

// The tensor-wide constants: clip bounds, the active levels' grid steps and gates, and the
// per-level x_max coefficients κ/c_k. `levels` is the effective depth: the gated chain stops at
// the first zero gate; a fixed-bit quantizer has one level, the chain's level for its bit width.
struct Params {
  float xm, xmin, span;
  float s[kLevels];
  float gate[kLevels - 1];
  float kappa_over_c[kLevels];
  float clip_scale;  // ∂xm'/∂x_max = fl32(1 − 1e−7)
  int levels;
  bool is_signed;
};

// fixed_bits: 0 for the gated chain (gates = g4…g32), else 2…32 (gates ignored, may be null). The callers
// validate the arguments (bbkernels/validation.py); a bit width outside the chain or null gates for the chain
// still give one level instead of reading past the gates or looping forever.
BBQ_HD Params make_params(float x_max, bool is_signed, const float* gates, int fixed_bits) {
  Params p;
  const float shrink = 1.0f - 1e-7f;  // rounds to 1 − 2^−23, as the reference's fp32 constant
  // An x_max outside [2^−89, 2^123] (reference.X_MAX_RANGE) or a non-finite gate poisons every output with NaN
  // rather than garbage: the op's value check on a GPU, with no launch or synchronisation of its own.
  bool valid = x_max >= 0x1p-89f && x_max <= 0x1p123f;
  if (!fixed_bits && gates)
    for (int k = 0; k < kLevels - 1; ++k) valid = valid && std::fabs(gates[k]) <= 3.402823466e38f;
  const float xmax = valid ? x_max : NAN;
  p.xm = xmax * shrink;
  p.xmin = is_signed ? -p.xm : 0.0f;
  p.span = p.xm - p.xmin;
  p.clip_scale = shrink;
  p.is_signed = is_signed;
  float chain[kLevels];
  chain[0] = is_signed ? (2.0f * xmax) / 3.0f : xmax / 3.0f;
  const float div[kLevels - 1] = {5.0f, 17.0f, 257.0f, 65537.0f};
  for (int k = 1; k < kLevels; ++k) chain[k] = chain[k - 1] / div[k - 1];
  const float c[kLevels] = {1.0f, 5.0f, 85.0f, 21845.0f, 1431655765.0f};
  const float kappa = is_signed ? 2.0f / 3.0f : 1.0f / 3.0f;
  int first = 0;
  if (fixed_bits || !gates) {
    while (fixed_bits && first + 1 < kLevels && (2 << first) != fixed_bits) ++first;
    p.levels = 1;
  } else {
    int n = 0;
    while (n < kLevels - 1 && gates[n] > 0.0f) ++n;
    p.levels = n + 1;
  }
  for (int k = 0; k < kLevels; ++k) {
    const int j = first + k < kLevels ? first + k : kLevels - 1;
    p.s[k] = chain[j];
    p.kappa_over_c[k] = kappa / c[j];
  }
  for (int k = 0; k < kLevels - 1; ++k) p.gate[k] = k + 1 < p.levels ? gates[k] : 0.0f;
  return p;
}

// max(v, 0) that keeps NaN, like torch.relu.
BBQ_HD float relu(float v) { return v < 0.0f ? 0.0f : v; }

// pact_clip in the reference's operation order (SPEC B §1.4).
BBQ_HD float clip(float x, const Params& p) {
  const float r1 = relu(x - p.xmin);
  const float r2 = relu(p.span - r1);
  return (-r2) + p.xm;
}

// z = x2 + g4·(x4 + g8·(…)) over the first L levels (SPEC B §10.2).
template <int L>
BBQ_HD float quantize_levels(float xc, const Params& p) {
  float xk[L];
  float rho = xc;
BBQ_UNROLL
  for (int k = 0; k < L; ++k) {
    if (k) rho = rho - xk[k - 1];
    xk[k] = p.s[k] * rintf(rho / p.s[k]);
  }
  float u = xk[L - 1];
BBQ_UNROLL
  for (int k = L - 2; k >= 0; --k) u = xk[k] + p.gate[k] * u;
  return u;
}

// Backward terms (SPEC B §10.3) for a block of W elements with g = ∂L/∂y, written level by level
// so that every inner loop runs over the W lanes (SIMD on CPUs, W = 1 per CUDA thread).
// `acc[a][l]` accumulates, in order of a: g·clipsign, g·e_k for k < L, g·u_{k+1} for k < L−1, and
// g·z; `reduce_tile` later scales them by per-channel factors. `dxg` receives g·inside (= ∂L/∂x / G2).
template <int L, int W>
BBQ_HD void backward_block(const float* x, const float* g, const Params& p, float* dxg, float (*acc)[W]) {
  float rho[W], u[W], xk[L][W];
  BBQ_UNROLL
  for (int l = 0; l < W; ++l) {
    const float hi = x[l] >= p.xm ? 1.0f : 0.0f;
    const float lo = (p.is_signed && x[l] <= p.xmin) ? 1.0f : 0.0f;
    acc[0][l] += g[l] * (hi - lo);
    dxg[l] = (x[l] > p.xmin && x[l] < p.xm) ? g[l] : 0.0f;
    rho[l] = clip(x[l], p);
  }
  BBQ_UNROLL
  for (int k = 0; k < L; ++k) {
    BBQ_UNROLL
    for (int l = 0; l < W; ++l) {
      if (k) rho[l] = rho[l] - xk[k - 1][l];
      const float r = rho[l] / p.s[k];
      const float q = rintf(r);
      xk[k][l] = p.s[k] * q;
      acc[1 + k][l] += g[l] * (q - r);
    }
  }
  BBQ_UNROLL
  for (int l = 0; l < W; ++l) u[l] = xk[L - 1][l];
  BBQ_UNROLL
  for (int k = L - 2; k >= 0; --k) {
    BBQ_UNROLL
    for (int l = 0; l < W; ++l) {
      acc[1 + L + k][l] += g[l] * u[l];
      u[l] = xk[k][l] + p.gate[k] * u[l];
    }
  }
  BBQ_UNROLL
  for (int l = 0; l < W; ++l) acc[2 * L][l] += g[l] * u[l];
}

// Per-channel coefficients that turn a tile's accumulators into gradient contributions:
// G_k = G2·g4·…, and the x_max factor κ/c_k·(G_k − G_{k+1}) of level k.
struct ChannelCoeffs {
  double G[kLevels];
  double xmax_level[kLevels];
  double xmax_clip;
};

BBQ_HD ChannelCoeffs channel_coeffs(const Params& p, float g2) {
  ChannelCoeffs cc;
  float G = g2;
  for (int k = 0; k < kLevels; ++k) {
    cc.G[k] = k < p.levels ? G : 0.0;
    if (k < kLevels - 1) G = G * p.gate[k];
  }
  for (int k = 0; k < kLevels; ++k) {
    const double next = k + 1 < kLevels ? cc.G[k + 1] : 0.0;
    cc.xmax_level[k] = k < p.levels ? (double)p.kappa_over_c[k] * (cc.G[k] - next) : 0.0;
  }
  cc.xmax_clip = (double)g2 * (double)p.clip_scale;
  return cc;
}

// Adds one tile's accumulators (layout of backward_terms, for p.levels levels) to
// out = [dx_max, dg4, dg8, dg16, dg32, dg2_c].
BBQ_HD void reduce_tile(const Params& p, const ChannelCoeffs& cc, const double* acc, double* out) {
  const int L = p.levels;
  out[0] += cc.xmax_clip * acc[0];
  for (int k = 0; k < L; ++k) out[0] += cc.xmax_level[k] * acc[1 + k];
  for (int k = 0; k + 1 < L; ++k) out[1 + k] += cc.G[k] * acc[1 + L + k];
  out[5] += acc[2 * L];
}

// Runs f(std::integral_constant<int, L>{}) for the effective depth L = levels (1…5), so kernels are compiled
// once per depth with the level loop unrolled.
BBQ_HD_TEMPLATE
template <typename F>
BBQ_HD void with_levels(int levels, F&& f) {
  switch (levels) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 5>{}); break;
  }
}

}  // namespace bbq
