// CUDA kernels for fastdec::pixel_shuffle; shape rules in pixel_shuffle.h, CPU kernel and registration in
// pixel_shuffle.cpp.
//
// NCHW output: each thread owns VEC consecutive low-resolution columns j of one output row and writes the
// factor*VEC contiguous output elements they expand to (32 bytes, as two 16-byte stores), so writes are fully
// coalesced; reads are factor contiguous runs, vectorised when the input rows are contiguous and aligned. Where an
// output row does not split into such 32-byte runs (phase_offset=1: rows of 2(W-1) elements), each thread owns one
// column (VEC=1) and writes its factor elements as one store where aligned: neighbouring threads then write
// neighbouring bytes. (With VEC=8 there, fp16 ran at 405 GB/s on an H200, its 16 scalar stores per thread 32 bytes
// apart across a warp.)
// channels_last output (what UpsampleConv hands over on GPU, phase_offset=1 included): each thread writes 16 bytes,
// VEC consecutive channels of one output pixel, as one store (pixel_shuffle_index.h); its VEC reads are a gather
// with stride factor^2 channels, from the same 64-byte span of the input pixel. Every other case: one thread per
// output element in the output's memory order.
// Index math is 64-bit where the tensors need it (templated on the index type).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

#include "pixel_shuffle.h"
#include "pixel_shuffle_index.h"

namespace fastdec {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 32;

template <typename Bits, int N>
struct alignas(sizeof(Bits) * N) Pack {
  Bits v[N];
};

// Columns per thread for 32-byte runs of output (at least 1).
template <typename Bits, int F>
constexpr int kRowVec = kBytesPerThread / (F * sizeof(Bits)) > 0 ? kBytesPerThread / (F * sizeof(Bits)) : 1;

// Bytes per store of a thread's run of F * VEC output elements: 16, or the whole run when shorter.
template <typename Bits, int F, int VEC>
constexpr int kStoreBytes = F * VEC * sizeof(Bits) < 16 ? F * VEC * sizeof(Bits) : 16;

template <typename Bits, int F, int VEC, typename Index>
__global__ void shuffle_rows_nchw(const Bits* __restrict__ x, Bits* __restrict__ out, Strides4 s, Index channels_out,
                                  Index out_height, Index width_blocks, Index offset, Index total_threads,
                                  bool vector_loads, bool vector_stores) {
  const Index chunks = (width_blocks + VEC - 1) / VEC;
  for (Index t = blockIdx.x * (Index)blockDim.x + threadIdx.x; t < total_threads;
       t += (Index)gridDim.x * blockDim.x) {
    const Index chunk = t % chunks;
    Index rest = t / chunks;
    const Index oh = rest % out_height;
    rest /= out_height;
    const Index c = rest % channels_out;
    const Index n = rest / channels_out;
    const Index i = oh / F, a = oh % F;
    const Index j0 = chunk * VEC;
    const Index valid = width_blocks - j0 < VEC ? width_blocks - j0 : VEC;
    Bits buf[F * VEC];
#pragma unroll
    for (int b = 0; b < F; ++b) {
      const Bits* src = x + n * s.n + (c * F * F + a * F + b) * s.c + (i + a * offset) * s.h + (j0 + b * offset) * s.w;
      if (vector_loads && valid == VEC) {
        const Pack<Bits, VEC> p = *reinterpret_cast<const Pack<Bits, VEC>*>(src);
#pragma unroll
        for (int v = 0; v < VEC; ++v) buf[v * F + b] = p.v[v];
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          if (v < valid) buf[v * F + b] = src[v * s.w];
      }
    }
    Bits* dst = out + ((n * channels_out + c) * out_height + oh) * (width_blocks * F) + j0 * F;
    constexpr int kStore = kStoreBytes<Bits, F, VEC>;
    if constexpr ((F * VEC * sizeof(Bits)) % kStore == 0 && (kStore & (kStore - 1)) == 0) {
      if (vector_stores && valid == VEC) {
        constexpr int kPer = kStore / sizeof(Bits);
#pragma unroll
        for (int p = 0; p < F * VEC / kPer; ++p) {
          Pack<Bits, kPer> pk;
#pragma unroll
          for (int e = 0; e < kPer; ++e) pk.v[e] = buf[p * kPer + e];
          reinterpret_cast<Pack<Bits, kPer>*>(dst)[p] = pk;
        }
        continue;
      }
    }
#pragma unroll
    for (int e = 0; e < F * VEC; ++e)
      if (e < valid * F) dst[e] = buf[e];
  }
}

// Generic path: any factor, any input strides, NCHW or channels_last output; output written in memory order.
template <typename Bits, typename Index>
__global__ void shuffle_elements(const Bits* __restrict__ x, Bits* __restrict__ out, Strides4 s, Index channels_out,
                                 Index out_height, Index out_width, Index factor, Index offset, bool channels_last,
                                 Index total) {
  for (Index t = blockIdx.x * (Index)blockDim.x + threadIdx.x; t < total; t += (Index)gridDim.x * blockDim.x) {
    Index n, c, oh, ow, rest = t;
    if (channels_last) {
      c = rest % channels_out; rest /= channels_out;
      ow = rest % out_width; rest /= out_width;
      oh = rest % out_height; n = rest / out_height;
    } else {
      ow = rest % out_width; rest /= out_width;
      oh = rest % out_height; rest /= out_height;
      c = rest % channels_out; n = rest / channels_out;
    }
    const Index i = oh / factor, a = oh % factor, j = ow / factor, b = ow % factor;
    out[t] = x[n * s.n + (c * factor * factor + a * factor + b) * s.c + (i + a * offset) * s.h + (j + b * offset) * s.w];
  }
}

// channels_last output, C % VEC == 0, 16-byte aligned output: one 16-byte store per thread.
template <typename Bits, typename Index>
__global__ void shuffle_channels_last(const Bits* __restrict__ x, Bits* __restrict__ out, Strides4 s,
                                      Index vectors_per_pixel, Index out_height, Index out_width, Index factor,
                                      Index offset, Index total_vectors) {
  constexpr int VEC = 16 / sizeof(Bits);
  const int64_t step = factor * factor * s.c;
  for (Index t = blockIdx.x * (Index)blockDim.x + threadIdx.x; t < total_vectors;
       t += (Index)gridDim.x * blockDim.x) {
    const Bits* src = x + channel_source<Index>(t, vectors_per_pixel, (Index)VEC, s, out_height, out_width, factor,
                                                offset);
    Pack<Bits, VEC> p;
#pragma unroll
    for (int v = 0; v < VEC; ++v) p.v[v] = src[v * step];
    reinterpret_cast<Pack<Bits, VEC>*>(out)[t] = p;
  }
}

inline int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 65535 * 32 blocks keeps every SM busy on any current GPU.
  return static_cast<int>(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

template <typename Bits, int F, int VEC, typename Index>
void launch_rows_of(const at::Tensor& x, at::Tensor& out, const ShuffleGeometry& g, cudaStream_t stream) {
  const int64_t chunks = (g.width_blocks + VEC - 1) / VEC;
  const int64_t total = g.batch * g.channels_out * g.height_blocks * F * chunks;
  const Strides4 s{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const auto x_addr = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  const auto o_addr = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const bool vector_loads = VEC > 1 && s.w == 1 && g.phase_offset == 0 && g.width_blocks % VEC == 0 &&
                            s.h % VEC == 0 && s.c % VEC == 0 && s.n % VEC == 0 && x_addr % (VEC * sizeof(Bits)) == 0;
  const bool vector_stores = g.width_blocks % VEC == 0 && o_addr % kStoreBytes<Bits, F, VEC> == 0;
  shuffle_rows_nchw<Bits, F, VEC, Index><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(out.mutable_data_ptr()), s,
      (Index)g.channels_out, (Index)(g.height_blocks * F), (Index)g.width_blocks, (Index)g.phase_offset,
      (Index)total, vector_loads, vector_stores);
}

template <typename Bits, int F, typename Index>
void launch_rows(const at::Tensor& x, at::Tensor& out, const ShuffleGeometry& g, cudaStream_t stream) {
  constexpr int VEC = kRowVec<Bits, F>;
  // 32-byte runs need rows of whole runs and a 16-byte aligned output; otherwise one column per thread.
  if (VEC == 1 || (g.width_blocks % VEC == 0 && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0))
    return launch_rows_of<Bits, F, VEC, Index>(x, out, g, stream);
  launch_rows_of<Bits, F, 1, Index>(x, out, g, stream);
}

template <typename Bits, typename Index>
void launch(const at::Tensor& x, at::Tensor& out, const ShuffleGeometry& g, cudaStream_t stream) {
  if (!g.channels_last && g.factor == 2) return launch_rows<Bits, 2, Index>(x, out, g, stream);
  if (!g.channels_last && g.factor == 4) return launch_rows<Bits, 4, Index>(x, out, g, stream);
  const Strides4 s{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  constexpr int VEC = 16 / sizeof(Bits);
  if (g.channels_last && g.channels_out % VEC == 0 && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0) {
    const int64_t vectors = out.numel() / VEC;
    shuffle_channels_last<Bits, Index><<<grid_for(vectors), kThreads, 0, stream>>>(
        static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(out.mutable_data_ptr()), s,
        (Index)(g.channels_out / VEC), (Index)(g.height_blocks * g.factor), (Index)(g.width_blocks * g.factor),
        (Index)g.factor, (Index)g.phase_offset, (Index)vectors);
    return;
  }
  const int64_t total = out.numel();
  shuffle_elements<Bits, Index><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const Bits*>(x.const_data_ptr()), static_cast<Bits*>(out.mutable_data_ptr()), s,
      (Index)g.channels_out, (Index)(g.height_blocks * g.factor), (Index)(g.width_blocks * g.factor),
      (Index)g.factor, (Index)g.phase_offset, g.channels_last, (Index)total);
}

template <typename Bits>
void launch_for_size(const at::Tensor& x, at::Tensor& out, const ShuffleGeometry& g, cudaStream_t stream) {
  // 32-bit index math when every offset fits (faster divisions), 64-bit otherwise.
  const int64_t in_extent = (x.size(0) - 1) * std::abs(x.stride(0)) + (x.size(1) - 1) * std::abs(x.stride(1)) +
                            (x.size(2) - 1) * std::abs(x.stride(2)) + (x.size(3) - 1) * std::abs(x.stride(3)) + 1;
  const int64_t limit = std::numeric_limits<int32_t>::max() / 2;
  if (out.numel() < limit && in_extent < limit) return launch<Bits, int32_t>(x, out, g, stream);
  launch<Bits, int64_t>(x, out, g, stream);
}

}  // namespace

at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t factor, int64_t phase_offset) {
  const ShuffleGeometry g = shuffle_geometry(x, factor, phase_offset);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = shuffle_output(x, g);
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.element_size()) {
    case 1: launch_for_size<uint8_t>(x, out, g, stream); break;
    case 2: launch_for_size<uint16_t>(x, out, g, stream); break;
    case 4: launch_for_size<uint32_t>(x, out, g, stream); break;
    default: launch_for_size<uint64_t>(x, out, g, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fastdec
