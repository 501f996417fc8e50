// CUDA kernels of the quantize-and-gate operator: one pass forward, one pass backward.
//
// The per-element math is bb_quant_math.h, shared with the CPU kernel; exactness rests on the build
// flags (-fmad=false, -prec-div=true, no fast math) and rintf (round half to even). The scalar
// prologue, including the depth D from the gates, runs on the device: nothing synchronises with the
// host. Work is cut into tiles that never straddle an output channel, one block per tile. The
// backward reduces each tile in a fixed order (warp shuffles, then warps in order) into one row of
// double partials, and a single-block kernel combines the rows in a fixed order: deterministic, no
// atomics.
//
// Only light ATen headers here (the Python binding is bb_quant_cuda_bind.cpp): nvcc parses every
// header once per target architecture.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "bb_quant_cuda.h"
#include "bb_quant_math.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFinishThreads = 1024;
constexpr int kPartials = 6;  // per tile: dx_max, dg4, dg8, dg16, dg32, dg2[c]

struct Layout {
  int64_t channels, inner, tile, tiles_per_channel, tiles;
  __device__ int64_t channel(int64_t t) const { return t / tiles_per_channel; }
  __device__ int64_t begin(int64_t t) const { return channel(t) * inner + (t % tiles_per_channel) * tile; }
  __device__ int64_t size(int64_t t) const {
    const int64_t start = (t % tiles_per_channel) * tile;
    return inner - start < tile ? inner - start : tile;
  }
};

// Tiles grow with the tensor (more work per block, fewer partial rows) and never exceed a channel.
Layout make_layout(const at::Tensor& x, const std::optional<at::Tensor>& g2) {
  Layout l;
  l.channels = g2.has_value() ? g2->numel() : 1;
  l.inner = x.numel() / l.channels;
  int64_t tile = 1024;
  while (tile < 16384 && tile * 2048 < x.numel()) tile *= 2;
  l.tile = std::min(tile, l.inner);
  l.tiles_per_channel = (l.inner + l.tile - 1) / l.tile;
  l.tiles = l.channels * l.tiles_per_channel;
  return l;
}

// The prologue, once per block, read from device memory (x_max, gates).
__device__ bbq::Params block_params(const float* x_max, const float* gates, bool is_signed, int bits) {
  __shared__ bbq::Params shared;
  if (threadIdx.x == 0) shared = bbq::make_params(*x_max, is_signed, gates, bits);
  __syncthreads();
  return shared;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                           const float* x_max, const float* gates, const float* g2,
                                                           Layout lay, bool is_signed, int bits) {
  const bbq::Params p = block_params(x_max, gates, is_signed, bits);
  const int64_t t = blockIdx.x;
  const int64_t b = lay.begin(t), n = lay.size(t);
  const float gc = g2 ? g2[lay.channel(t)] : 1.0f;
  bbq::with_levels(p.levels, [&](auto levels) {
    constexpr int L = decltype(levels)::value;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float z = bbq::quantize_levels<L>(bbq::clip(static_cast<float>(x[b + i]), p), p);
      y[b + i] = static_cast<scalar_t>(gc * z);
    }
  });
}

// Fixed-order sum of one double per thread over the block; the total is valid in thread 0.
__device__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    double* __restrict__ partial, const float* x_max, const float* gates, const float* g2,
                    Layout lay, bool is_signed, int bits) {
  __shared__ double scratch[kWarps];
  const bbq::Params p = block_params(x_max, gates, is_signed, bits);
  const int64_t t = blockIdx.x;
  const int64_t b = lay.begin(t), n = lay.size(t);
  const float gc = g2 ? g2[lay.channel(t)] : 1.0f;
  bbq::with_levels(p.levels, [&](auto levels) {
    constexpr int L = decltype(levels)::value;
    constexpr int A = 2 * L + 1;
    float acc[A][1] = {};
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float xi = static_cast<float>(x[b + i]), gi = static_cast<float>(grad[b + i]);
      float dxg;
      bbq::backward_block<L, 1>(&xi, &gi, p, &dxg, acc);
      dx[b + i] = static_cast<scalar_t>(dxg * gc);
    }
    double tile[A];
#pragma unroll
    for (int a = 0; a < A; ++a) tile[a] = block_sum(static_cast<double>(acc[a][0]), scratch);
    if (threadIdx.x == 0) {
      double out[kPartials] = {0, 0, 0, 0, 0, 0};
      bbq::reduce_tile(p, bbq::channel_coeffs(p, gc), tile, out);
      for (int k = 0; k < kPartials; ++k) partial[t * kPartials + k] = out[k];
    }
  });
}

// One block: warp w sums channels w, w + 32, … over their tiles (lanes strided, then shuffled); lane 0
// keeps its channels' scalar contributions in order; thread 0 adds the warps in order.
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const double* __restrict__ partial, float* dx_max, float* dgates, float* dg2, Layout lay) {
  constexpr int warps = kFinishThreads / 32;
  __shared__ double scalars[warps][kPartials - 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double mine[kPartials - 1] = {0, 0, 0, 0, 0};
  for (int64_t c = warp; c < lay.channels; c += warps) {
    double sums[kPartials] = {0, 0, 0, 0, 0, 0};
    for (int64_t t = lane; t < lay.tiles_per_channel; t += 32)
      for (int k = 0; k < kPartials; ++k) sums[k] += partial[(c * lay.tiles_per_channel + t) * kPartials + k];
    for (int k = 0; k < kPartials; ++k)
      for (int offset = 16; offset > 0; offset /= 2) sums[k] += __shfl_down_sync(0xffffffffu, sums[k], offset);
    if (lane == 0) {
      dg2[c] = static_cast<float>(sums[kPartials - 1]);
      for (int k = 0; k < kPartials - 1; ++k) mine[k] += sums[k];
    }
  }
  if (lane == 0)
    for (int k = 0; k < kPartials - 1; ++k) scalars[warp][k] = mine[k];
  __syncthreads();
  if (threadIdx.x == 0) {
    double total[kPartials - 1] = {0, 0, 0, 0, 0};
    for (int w = 0; w < warps; ++w)
      for (int k = 0; k < kPartials - 1; ++k) total[k] += scalars[w][k];
    dx_max[0] = static_cast<float>(total[0]);
    for (int k = 0; k < 4; ++k) dgates[k] = static_cast<float>(total[1 + k]);
  }
}

}  // namespace

namespace bbq_cuda {

namespace {

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& x_max, const std::optional<at::Tensor>& gates,
                   const std::optional<at::Tensor>& g2, bool is_signed, int64_t bits) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout lay = make_layout(x, g2);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bb_quantize_cuda", [&] {
    forward_kernel<scalar_t><<<lay.tiles, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x_max.data_ptr<float>(), optional_ptr(gates),
        optional_ptr(g2), lay, is_signed, static_cast<int>(bits));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& x_max,
                                 const std::optional<at::Tensor>& gates, const std::optional<at::Tensor>& g2,
                                 bool is_signed, int64_t bits) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout lay = make_layout(x, g2);
  const at::TensorOptions f32 = x_max.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor partial = at::empty({lay.tiles, kPartials}, x_max.options().dtype(at::kDouble));
  at::Tensor dxm = at::empty({1}, f32), dgates = at::empty({4}, f32), dg2 = at::empty({lay.channels}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bb_quantize_backward_cuda", [&] {
    backward_kernel<scalar_t><<<lay.tiles, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), partial.data_ptr<double>(),
        x_max.data_ptr<float>(), optional_ptr(gates), optional_ptr(g2), lay, is_signed, static_cast<int>(bits));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(partial.data_ptr<double>(), dxm.data_ptr<float>(),
                                                  dgates.data_ptr<float>(), dg2.data_ptr<float>(), lay);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dxm, dgates, dg2};
}

}  // namespace bbq_cuda
