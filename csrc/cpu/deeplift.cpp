// deeplift_rescale_relu_cpu: the DeepLIFT rescale rule on ReLU over [inputs; references] in
// one pass: relu of both halves, the rescale multiplier of both, and the fallback mask
// (|x_in - x_ref| < eps, where the plain derivative is used), instead of ~10 tensor ops.
#include "common.h"

namespace cnnviz {

namespace {

void deeplift_rescale_relu_cpu(FloatArray x, float eps, FloatArray out, FloatArray factor,
                               py::array_t<bool, py::array::c_style> fallback) {
  const int64_t n = fallback.size();
  if (x.size() != 2 * n || out.size() != x.size() || factor.size() != x.size())
    throw std::invalid_argument("deeplift_rescale_relu_cpu: x, out, factor must hold 2x fallback's elements");
  const float* xi = x.data();
  const float* xr = xi + n;
  float* oi = out.mutable_data();
  float* orf = oi + n;
  float* fi = factor.mutable_data();
  float* fr = fi + n;
  bool* fb = fallback.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float a = xi[i], b = xr[i];
    const float ra = a > 0.f ? a : 0.f, rb = b > 0.f ? b : 0.f;
    const float d = a - b;
    const bool small = std::fabs(d) < eps;
    const float ratio = (ra - rb) / (small ? 1.f : d);
    oi[i] = ra;
    orf[i] = rb;
    fi[i] = small ? (a > 0.f ? 1.f : 0.f) : ratio;
    fr[i] = small ? (b > 0.f ? 1.f : 0.f) : ratio;
    fb[i] = small;
  }
}

}  // namespace

void bind_deeplift(py::module_& m) {
  m.def("deeplift_rescale_relu_cpu", &deeplift_rescale_relu_cpu, py::arg("x").noconvert(), py::arg("eps"),
        py::arg("out").noconvert(), py::arg("factor").noconvert(), py::arg("fallback").noconvert());
}

}  // namespace cnnviz
