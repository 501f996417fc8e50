// CPU kernels of the quantize-and-gate operator: one pass forward, one pass backward.
//
// Work is split into fixed tiles that never straddle an output channel. Each tile is vectorised
// over kLanes lanes (short float runs per lane, flushed into double lanes), and tile
// partials are combined in tile order in double: results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "bb_cpu.h"
#include "bb_quant_math.h"

namespace {

constexpr int64_t kTile = 4096;
constexpr int kLanes = 16;
constexpr int64_t kFlushBlocks = 16;  // float accumulation runs of 16 adds per lane
constexpr int64_t kGrainTiles = 8;  // tensors under 8 tiles run on one thread

struct Layout {
  int64_t channels, inner, tiles_per_channel, tiles;
  int64_t begin(int64_t t) const { return (t / tiles_per_channel) * inner + (t % tiles_per_channel) * kTile; }
  int64_t size(int64_t t) const { return std::min(kTile, inner - (t % tiles_per_channel) * kTile); }
  int64_t channel(int64_t t) const { return t / tiles_per_channel; }
};

Layout make_layout(const at::Tensor& x, const c10::optional<at::Tensor>& g2) {
  Layout l;
  l.channels = g2.has_value() ? g2->numel() : 1;
  l.inner = x.numel() / l.channels;
  l.tiles_per_channel = (l.inner + kTile - 1) / kTile;
  l.tiles = l.channels * l.tiles_per_channel;
  return l;
}

bbq::Params params_of(const at::Tensor& x_max, const c10::optional<at::Tensor>& gates, bool is_signed,
                      int64_t bits) {
  const float* g = gates.has_value() ? gates->data_ptr<float>() : nullptr;
  return bbq::make_params(x_max.data_ptr<float>()[0], is_signed, g, static_cast<int>(bits));
}

float channel_gate(const c10::optional<at::Tensor>& g2, int64_t c) {
  return g2.has_value() ? g2->data_ptr<float>()[c] : 1.0f;
}

template <int L, typename scalar_t>
void forward_span(const scalar_t* x, scalar_t* y, int64_t n, const bbq::Params& p, float g2) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float z = bbq::quantize_levels<L>(bbq::clip(static_cast<float>(x[i]), p), p);
    y[i] = static_cast<scalar_t>(g2 * z);
  }
}

// One block of kLanes elements; a partial last block (m < kLanes) is padded with g = 0, which adds
// nothing to the accumulators. Full blocks have fixed trip counts, so their loads and stores vectorise.
template <int L, bool Full, typename scalar_t>
inline void backward_lanes(const scalar_t* x, const scalar_t* g, scalar_t* dx, int64_t m, const bbq::Params& p,
                           float g2, float (*lanes)[kLanes]) {
  float xb[kLanes], gb[kLanes], dxg[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    xb[l] = (Full || l < m) ? static_cast<float>(x[l]) : 0.0f;
    gb[l] = (Full || l < m) ? static_cast<float>(g[l]) : 0.0f;
  }
  bbq::backward_block<L, kLanes>(xb, gb, p, dxg, lanes);
  for (int l = 0; l < (Full ? kLanes : m); ++l) dx[l] = static_cast<scalar_t>(dxg[l] * g2);
}

template <int L, typename scalar_t>
void backward_span(const scalar_t* x, const scalar_t* g, scalar_t* dx, int64_t n, const bbq::Params& p,
                   float g2, double* acc) {
  constexpr int A = 2 * L + 1;
  double total[A][kLanes] = {};
  for (int64_t i0 = 0; i0 < n; i0 += kFlushBlocks * kLanes) {
    // Short float runs per lane, flushed into double lanes: vector speed, near-pairwise accuracy.
    float lanes[A][kLanes] = {};
    const int64_t end = std::min(n, i0 + kFlushBlocks * kLanes);
    int64_t i = i0;
    for (; i + kLanes <= end; i += kLanes) backward_lanes<L, true>(x + i, g + i, dx + i, kLanes, p, g2, lanes);
    if (i < end) backward_lanes<L, false>(x + i, g + i, dx + i, end - i, p, g2, lanes);
    for (int a = 0; a < A; ++a)
      for (int l = 0; l < kLanes; ++l) total[a][l] += lanes[a][l];
  }
  for (int a = 0; a < A; ++a) {
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += total[a][l];
    acc[a] = s;
  }
}

}  // namespace

namespace bbq_cpu {

at::Tensor quantize_forward(const at::Tensor& x, const at::Tensor& x_max, const c10::optional<at::Tensor>& gates,
                            const c10::optional<at::Tensor>& g2, bool is_signed, int64_t bits) {
  const bbq::Params p = params_of(x_max, gates, is_signed, bits);
  const Layout lay = make_layout(x, g2);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bb_quantize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    bbq::with_levels(p.levels, [&](auto levels) {
      at::parallel_for(0, lay.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = lay.begin(t);
          forward_span<decltype(levels)::value>(xp + b, yp + b, lay.size(t), p, channel_gate(g2, lay.channel(t)));
        }
      });
    });
  });
  return y;
}

std::vector<at::Tensor> quantize_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& x_max,
                                          const c10::optional<at::Tensor>& gates,
                                          const c10::optional<at::Tensor>& g2, bool is_signed, int64_t bits) {
  const bbq::Params p = params_of(x_max, gates, is_signed, bits);
  const Layout lay = make_layout(x, g2);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<double> partial(lay.tiles * bbq::kAccumulators);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bb_quantize_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    bbq::with_levels(p.levels, [&](auto levels) {
      at::parallel_for(0, lay.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = lay.begin(t);
          backward_span<decltype(levels)::value>(xp + b, gp + b, dxp + b, lay.size(t), p,
                                                 channel_gate(g2, lay.channel(t)),
                                                 partial.data() + t * bbq::kAccumulators);
        }
      });
    });
  });
  // Fixed-order combination of the tile partials.
  const at::TensorOptions f32 = x_max.options().dtype(at::kFloat);
  at::Tensor dxm = at::empty({1}, f32), dgates = at::empty({4}, f32), dg2 = at::empty({lay.channels}, f32);
  double scalars[5] = {0, 0, 0, 0, 0};
  for (int64_t c = 0; c < lay.channels; ++c) {
    const bbq::ChannelCoeffs cc = bbq::channel_coeffs(p, channel_gate(g2, c));
    double out[6] = {0, 0, 0, 0, 0, 0};
    for (int64_t t = c * lay.tiles_per_channel; t < (c + 1) * lay.tiles_per_channel; ++t)
      bbq::reduce_tile(p, cc, partial.data() + t * bbq::kAccumulators, out);
    for (int k = 0; k < 5; ++k) scalars[k] += out[k];
    dg2.data_ptr<float>()[c] = static_cast<float>(out[5]);
  }
  dxm.data_ptr<float>()[0] = static_cast<float>(scalars[0]);
  for (int k = 0; k < 4; ++k) dgates.data_ptr<float>()[k] = static_cast<float>(scalars[1 + k]);
  return {dx, dxm, dgates, dg2};
}

}  // namespace bbq_cpu
