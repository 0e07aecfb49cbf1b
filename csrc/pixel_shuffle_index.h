// Index math of the vectorised channels_last pixel-shuffle kernel (pixel_shuffle_cuda.cu), in a header of plain
// C++ so that a CPU test (tests/test_pixel_shuffle.py) compiles and checks it without a GPU.
//
// A channels_last output (N, OH, OW, C in memory) is written VEC channels at a time: vector t covers output
// channels [cv * VEC, cv * VEC + VEC) of output pixel (n, oh, ow), stored at out + t * VEC (the output is dense).
// Its VEC input elements sit at channel_source(t) + v * factor^2 * s.c, v = 0 .. VEC-1 (any input strides).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDEC_HOST_DEVICE __host__ __device__
#else
#define FASTDEC_HOST_DEVICE
#endif

namespace fastdec {

struct Strides4 {
  int64_t n, c, h, w;
};

// Input offset (in elements) of the first element of output vector t; vectors_per_pixel = C / VEC.
template <typename Index>
FASTDEC_HOST_DEVICE inline int64_t channel_source(Index t, Index vectors_per_pixel, Index vec, const Strides4& s,
                                                  Index out_height, Index out_width, Index factor, Index offset) {
  const Index cv = t % vectors_per_pixel;
  Index rest = t / vectors_per_pixel;
  const Index ow = rest % out_width;
  rest /= out_width;
  const Index oh = rest % out_height;
  const Index n = rest / out_height;
  const Index i = oh / factor, a = oh % factor, j = ow / factor, b = ow % factor;
  return n * s.n + (cv * vec * factor * factor + a * factor + b) * s.c + (i + a * offset) * s.h +
         (j + b * offset) * s.w;
}

}  // namespace fastdec
