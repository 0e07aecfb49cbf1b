// Shape rules shared by the CPU and CUDA pixel-shuffle kernels.
//
// out[n, c, i*f + a, j*f + b] = x[n, c*f*f + a*f + b, i + a*phase_offset, j + b*phase_offset]
//
// phase_offset = 0 is torch.nn.functional.pixel_shuffle. phase_offset = 1 interleaves the f*f phase outputs of a
// conv that ran over a padded input, where phase (a, b) sits at offset (a, b) of its own result: that is how
// "nearest-x2 upsample + 3x3 conv" is computed as one 2x2 conv at low resolution (see fastdec/models/autoencoder_kl.py).
#pragma once

#include <ATen/ATen.h>

namespace fastdec {

struct ShuffleGeometry {
  int64_t batch, channels_out, height_in, width_in, factor, phase_offset;
  int64_t height_blocks, width_blocks;  // output is (height_blocks * factor, width_blocks * factor)
  bool channels_last;
};

inline ShuffleGeometry shuffle_geometry(const at::Tensor& x, int64_t factor, int64_t phase_offset) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastdec.pixel_shuffle: expected a 4-D (N, C, H, W) tensor, got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_VALUE(factor >= 1, "fastdec.pixel_shuffle: factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(phase_offset == 0 || phase_offset == 1,
                    "fastdec.pixel_shuffle: phase_offset must be 0 or 1, got ", phase_offset);
  const int64_t c_in = x.size(1);
  TORCH_CHECK_VALUE(c_in % (factor * factor) == 0, "fastdec.pixel_shuffle: channels (", c_in,
                    ") must be divisible by factor^2 (", factor * factor, ")");
  const int64_t shrink = phase_offset * (factor - 1);
  TORCH_CHECK_VALUE(x.size(2) >= shrink && x.size(3) >= shrink, "fastdec.pixel_shuffle: with phase_offset=1 the input ",
                    "must be at least factor-1 = ", shrink, " in H and W, got ", x.sizes());
  TORCH_CHECK_VALUE(x.element_size() == 1 || x.element_size() == 2 || x.element_size() == 4 || x.element_size() == 8,
                    "fastdec.pixel_shuffle: unsupported dtype ", x.scalar_type());
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return {x.size(0), c_in / (factor * factor), x.size(2), x.size(3), factor, phase_offset,
          x.size(2) - shrink, x.size(3) - shrink, channels_last};
}

inline at::Tensor shuffle_output(const at::Tensor& x, const ShuffleGeometry& g) {
  auto format = g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty({g.batch, g.channels_out, g.height_blocks * g.factor, g.width_blocks * g.factor},
                   x.options().memory_format(format));
}

}  // namespace fastdec
