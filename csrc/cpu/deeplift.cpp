// deeplift_rescale_relu_grad_cpu: the backward of the DeepLIFT rescale rule on ReLU over
// [inputs; references]: grad times the multiplier (relu(a) - relu(b)) / (a - b), or the plain
// derivative where |a - b| < eps, computed on the fly from the saved ReLU input in one pass
// (the forward then is a plain ReLU and stores nothing more than the input).
#include "common.h"

namespace cnnviz {

namespace {

void deeplift_rescale_relu_grad_cpu(FloatArray grad, FloatArray x, float eps, FloatArray out) {
  const int64_t n2 = x.size();
  if (n2 % 2 || grad.size() != n2 || out.size() != n2)
    throw std::invalid_argument("deeplift_rescale_relu_grad_cpu: grad, x, out must have the same even size");
  const int64_t n = n2 / 2;
  const float* xi = x.data();
  const float* xr = xi + n;
  const float* gi = grad.data();
  const float* gr = gi + n;
  float* oi = out.mutable_data();
  float* orf = oi + n;
  py::gil_scoped_release release;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float a = xi[i], b = xr[i];
    const float d = a - b;
    const bool small = std::fabs(d) < eps;
    const float ratio = ((a > 0.f ? a : 0.f) - (b > 0.f ? b : 0.f)) / (small ? 1.f : d);
    oi[i] = gi[i] * (small ? (a > 0.f ? 1.f : 0.f) : ratio);
    orf[i] = gr[i] * (small ? (b > 0.f ? 1.f : 0.f) : ratio);
  }
}

}  // namespace

void bind_deeplift(py::module_& m) {
  m.def("deeplift_rescale_relu_grad_cpu", &deeplift_rescale_relu_grad_cpu, py::arg("grad").noconvert(),
        py::arg("x").noconvert(), py::arg("eps"), py::arg("out").noconvert());
}

}  // namespace cnnviz
