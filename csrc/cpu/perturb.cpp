// perturb_by_rank_cpu: the cumulative perturbation steps of pixel flipping, region perturbation,
// deletion and insertion. Copy n = b * S + i is image b with every feature of rank below
// (step_begin + i) * features_in_step taken from the baseline. One pass writes each output
// element once: a select between two streams, no masks materialised.
#include <algorithm>

#include "common.h"

namespace cnnviz {

// x, baseline, out: one image per row, E = C*H*W elements in the layout the caller chose
// (NCHW or NHWC); ranks [B, F] with F = E (one rank per element) or H*W (one per pixel, its
// index e % HW in NCHW, e / C in NHWC).
void perturb_by_rank_cpu(FloatArray x, LongArray ranks, int64_t step_begin, int64_t step_end,
                         int64_t features_in_step, FloatArray baseline, int64_t channels,
                         bool channels_last, FloatArray out) {
  check_ndim(x, 2, "x");
  check_ndim(baseline, 2, "baseline");
  check_ndim(ranks, 2, "ranks");
  check_ndim(out, 2, "out");
  const int64_t B = x.shape(0), E = x.shape(1), F = ranks.shape(1);
  const int64_t S = step_end - step_begin;
  if (out.shape(0) != B * S || out.shape(1) != E)
    throw std::invalid_argument("out: expected [B * steps, C * H * W]");
  const bool per_element = F == E;
  const int64_t hw = E / channels;
  const float* src = x.data();
  const float* base = baseline.data();
  const int64_t* rk = ranks.data();
  float* dst = out.mutable_data();
  constexpr int64_t kBlock = 4096;  // elements per task: enough tasks for one large copy
  const int64_t blocks = (E + kBlock - 1) / kBlock;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < B * S * blocks; ++t) {
    const int64_t n = t / blocks, e0 = (t % blocks) * kBlock, e1 = std::min(e0 + kBlock, E);
    const int64_t b = n / S;
    const int64_t limit = (step_begin + n % S) * features_in_step;
    const float* xi = src + b * E;
    const float* bi = base + b * E;
    const int64_t* ri = rk + b * F;
    float* o = dst + n * E;
    if (per_element) {
      for (int64_t e = e0; e < e1; ++e) o[e] = ri[e] < limit ? bi[e] : xi[e];
    } else if (channels_last) {
      for (int64_t e = e0; e < e1; ++e) o[e] = ri[e / channels] < limit ? bi[e] : xi[e];
    } else {
      for (int64_t e = e0; e < e1; ++e) o[e] = ri[e % hw] < limit ? bi[e] : xi[e];
    }
  }
}

void bind_perturb(py::module_& m) {
  m.def("perturb_by_rank_cpu", &perturb_by_rank_cpu, py::arg("x").noconvert(), py::arg("ranks").noconvert(),
        py::arg("step_begin"), py::arg("step_end"), py::arg("features_in_step"),
        py::arg("baseline").noconvert(), py::arg("channels"), py::arg("channels_last"),
        py::arg("out").noconvert(),
        "Write the perturbed copies [B*S, E] of x [B, E]: features ranked below "
        "(step_begin + i) * features_in_step replaced by the baseline.");
}

}  // namespace cnnviz
