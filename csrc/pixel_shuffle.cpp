// CPU kernel and op registration for fastdec::pixel_shuffle (the CUDA kernel is in pixel_shuffle_cuda.cu).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "pixel_shuffle.h"

namespace fastdec {

#ifdef FASTDEC_WITH_CUDA
at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t factor, int64_t phase_offset);
#endif

namespace {

// A pure permutation: copy raw element bits, so every dtype of the same size shares one kernel and stays bitwise.
template <typename Bits>
void shuffle_cpu(const at::Tensor& x, at::Tensor& out, const ShuffleGeometry& g) {
  const Bits* src = static_cast<const Bits*>(x.const_data_ptr());
  Bits* dst = static_cast<Bits*>(out.mutable_data_ptr());
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t f = g.factor, off = g.phase_offset, C = g.channels_out;
  const int64_t OH = g.height_blocks * f, OW = g.width_blocks * f;
  const int64_t on = out.stride(0), oc = out.stride(1), oh_s = out.stride(2), ow_s = out.stride(3);
  if (g.channels_last) {
    // One task per output row (n, oh): for each output pixel, gather its C channels (stride f*f in the input).
    at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / OH, oh = row % OH, i = oh / f, a = oh % f;
        const Bits* src_row = src + n * sn + (i + a * off) * sh;
        Bits* dst_row = dst + n * on + oh * oh_s;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t j = ow / f, b = ow % f;
          const Bits* s = src_row + (a * f + b) * sc + (j + b * off) * sw;
          Bits* d = dst_row + ow * ow_s;
          for (int64_t c = 0; c < C; ++c) d[c * oc] = s[c * f * f * sc];
        }
      }
    });
    return;
  }
  // NCHW: one task per output row (n, c, oh), written as f interleaved passes (one per phase b) without divisions.
  const int64_t W = g.width_blocks;
  at::parallel_for(0, g.batch * C * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t oh = row % OH, c = (row / OH) % C, n = row / (OH * C);
      const int64_t i = oh / f, a = oh % f;
      const Bits* src_row = src + n * sn + (c * f * f + a * f) * sc + (i + a * off) * sh;
      Bits* dst_row = dst + n * on + c * oc + oh * oh_s;
      for (int64_t b = 0; b < f; ++b) {
        const Bits* s = src_row + b * sc + b * off * sw;
        Bits* d = dst_row + b * ow_s;
        const int64_t step = f * ow_s;
        for (int64_t j = 0; j < W; ++j) d[j * step] = s[j * sw];
      }
    }
  });
}

at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t factor, int64_t phase_offset) {
  const ShuffleGeometry g = shuffle_geometry(x, factor, phase_offset);
  at::Tensor out = shuffle_output(x, g);
  if (out.numel() == 0) return out;
  switch (x.element_size()) {
    case 1: shuffle_cpu<uint8_t>(x, out, g); break;
    case 2: shuffle_cpu<uint16_t>(x, out, g); break;
    case 4: shuffle_cpu<uint32_t>(x, out, g); break;
    default: shuffle_cpu<uint64_t>(x, out, g); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdec, m) {
  m.def("pixel_shuffle(Tensor x, int factor, int phase_offset=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdec, CPU, m) { m.impl("pixel_shuffle", &pixel_shuffle_cpu); }

#ifdef FASTDEC_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdec, CUDA, m) { m.impl("pixel_shuffle", &pixel_shuffle_cuda); }
#endif

}  // namespace fastdec

// A Python module so that `import fastdec._C` loads the library (and with it the registrations above).
#include <Python.h>
static PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FASTDEC_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
static PyMethodDef fastdec_c_methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fastdec_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastdec_c_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdec_c_module); }
