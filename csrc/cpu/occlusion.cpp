// Occlusion sweep kernels on raw float32 buffers.
// occlusion_copies_cpu: each occluded copy is a plane memcpy of its image plus row memcpys of
// the baseline inside the window (clipped at the border); no masks.
// occlusion_scatter_cpu: adds each window's score drop (and a count of 1) over its pixels.
// One task per output plane walks the windows in order, so sums are race-free and
// deterministic, in the order Captum accumulates them.
#include <algorithm>
#include <cstring>

#include "common.h"

namespace cnnviz {

namespace {

struct Window {
  int64_t r0, r1, c0, c1;  // rows [r0, r1), cols [c0, c1), clipped to the map
};

inline Window clipped_window(const int64_t* pos, int64_t wh, int64_t ww, int64_t H, int64_t W) {
  return {pos[0], std::min(pos[0] + wh, H), pos[1], std::min(pos[1] + ww, W)};
}

}  // namespace

// images, baselines [N, C, H, W]; image_index [P]; positions [P, 2]; out [P, C, H, W]
void occlusion_copies_cpu(FloatArray images, FloatArray baselines, LongArray image_index,
                          LongArray positions, int64_t wh, int64_t ww, FloatArray out) {
  check_ndim(images, 4, "images");
  check_ndim(baselines, 4, "baselines");
  check_ndim(out, 4, "out");
  const int64_t C = images.shape(1), H = images.shape(2), W = images.shape(3);
  const int64_t P = image_index.shape(0);
  if (out.shape(0) != P) throw std::invalid_argument("out: first dimension differs from positions");
  const float* img = images.data();
  const float* base = baselines.data();
  const int64_t* idx = image_index.data();
  const int64_t* pos = positions.data();
  float* dst = out.mutable_data();
  const int64_t plane = H * W;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < P * C; ++t) {
    const int64_t p = t / C, c = t % C;
    const int64_t src_off = (idx[p] * C + c) * plane;
    float* o = dst + t * plane;
    std::memcpy(o, img + src_off, sizeof(float) * plane);
    const Window w = clipped_window(pos + 2 * p, wh, ww, H, W);
    const size_t bytes = sizeof(float) * (w.c1 - w.c0);
    for (int64_t r = w.r0; r < w.r1; ++r)
      std::memcpy(o + r * W + w.c0, base + src_off + r * W + w.c0, bytes);
  }
}

// drops [P, k]; sums [N, k, H, W] and counts [N, H, W] are accumulated in place.
void occlusion_scatter_cpu(FloatArray drops, LongArray image_index, LongArray positions,
                           int64_t wh, int64_t ww, FloatArray sums, FloatArray counts) {
  check_ndim(drops, 2, "drops");
  check_ndim(sums, 4, "sums");
  check_ndim(counts, 3, "counts");
  const int64_t P = drops.shape(0), k = drops.shape(1);
  const int64_t N = sums.shape(0), H = sums.shape(2), W = sums.shape(3);
  const float* d = drops.data();
  const int64_t* idx = image_index.data();
  const int64_t* pos = positions.data();
  float* s = sums.mutable_data();
  float* cnt = counts.mutable_data();
  py::gil_scoped_release release;
  // Task (n, j): j < k accumulates drop j of image n, j == k its counts.
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < N * (k + 1); ++t) {
    const int64_t n = t / (k + 1), j = t % (k + 1);
    float* map = j < k ? s + (n * k + j) * H * W : cnt + n * H * W;
    for (int64_t p = 0; p < P; ++p) {
      if (idx[p] != n) continue;
      const float v = j < k ? d[p * k + j] : 1.f;
      const Window w = clipped_window(pos + 2 * p, wh, ww, H, W);
      for (int64_t r = w.r0; r < w.r1; ++r) {
        float* row = map + r * W;
        for (int64_t c = w.c0; c < w.c1; ++c) row[c] += v;
      }
    }
  }
}

void bind_occlusion(py::module_& m) {
  m.def("occlusion_copies_cpu", &occlusion_copies_cpu, py::arg("images").noconvert(),
        py::arg("baselines").noconvert(), py::arg("image_index").noconvert(),
        py::arg("positions").noconvert(), py::arg("wh"), py::arg("ww"), py::arg("out").noconvert(),
        "Write occluded copies [P,C,H,W] of images[image_index] with the windows at positions "
        "replaced by baselines.");
  m.def("occlusion_scatter_cpu", &occlusion_scatter_cpu, py::arg("drops").noconvert(),
        py::arg("image_index").noconvert(), py::arg("positions").noconvert(), py::arg("wh"),
        py::arg("ww"), py::arg("sums").noconvert(), py::arg("counts").noconvert(),
        "Accumulate drops [P,k] over their windows into sums [N,k,H,W] and counts [N,H,W].");
}

}  // namespace cnnviz
