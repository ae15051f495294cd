// incremental_gather_cpu: windows of a clean activation overlaid with per-patch updated
// regions, the gather step of incremental inference. One task per (patch, channel); each
// output row is at most five contiguous runs (fill | clean | region | clean | fill).
#include <algorithm>
#include <cstring>

#include "common.h"

namespace cnnviz {

namespace {

inline void fill_run(float* dst, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

inline void copy_run(float* dst, const float* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace

// clean [C, H, W], region [P, C, rh, rw] at region_offsets [P, 2] -> out [P, C, th, tw]
// whose windows start at target_offsets [P, 2]; `fill` outside the map.
void incremental_gather_cpu(FloatArray clean, FloatArray region, LongArray region_offsets,
                            LongArray target_offsets, FloatArray out, float fill) {
  check_ndim(clean, 3, "clean");
  check_ndim(region, 4, "region");
  check_ndim(region_offsets, 2, "region_offsets");
  check_ndim(target_offsets, 2, "target_offsets");
  check_ndim(out, 4, "out");
  const int64_t C = clean.shape(0), H = clean.shape(1), W = clean.shape(2);
  const int64_t P = out.shape(0), th = out.shape(2), tw = out.shape(3);
  const int64_t rh = region.shape(2), rw = region.shape(3);
  if (out.shape(1) != C || region.shape(0) != P || region.shape(1) != C)
    throw std::invalid_argument("region/out: patch or channel counts differ from clean");
  if (region_offsets.shape(0) != P || region_offsets.shape(1) != 2 ||
      target_offsets.shape(0) != P || target_offsets.shape(1) != 2)
    throw std::invalid_argument("region_offsets/target_offsets: expected [P, 2]");
  const float* cl = clean.data();
  const float* rg = region.data();
  const int64_t* ro = region_offsets.data();
  const int64_t* to = target_offsets.data();
  float* dst = out.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t pc = 0; pc < P * C; ++pc) {
    const int64_t p = pc / C, c = pc % C;
    const int64_t ty = to[2 * p], tx = to[2 * p + 1], ry = ro[2 * p], rx = ro[2 * p + 1];
    // Columns of the window inside the map, and inside the region, as window indices.
    const int64_t m0 = std::clamp<int64_t>(-tx, 0, tw), m1 = std::clamp<int64_t>(W - tx, 0, tw);
    const int64_t r0 = std::clamp<int64_t>(std::max(rx, int64_t{0}) - tx, m0, m1);
    const int64_t r1 = std::clamp<int64_t>(std::min(rx + rw, W) - tx, r0, m1);
    const float* cmap = cl + c * H * W;
    const float* rmap = rg + (p * C + c) * rh * rw;
    float* o = dst + pc * th * tw;
    for (int64_t i = 0; i < th; ++i, o += tw) {
      const int64_t y = ty + i;
      if (y < 0 || y >= H) {
        fill_run(o, tw, fill);
        continue;
      }
      const float* crow = cmap + y * W;
      fill_run(o, m0, fill);
      if (y >= ry && y < ry + rh && r1 > r0) {
        copy_run(o + m0, crow + tx + m0, r0 - m0);
        copy_run(o + r0, rmap + (y - ry) * rw + (tx + r0 - rx), r1 - r0);
        copy_run(o + r1, crow + tx + r1, m1 - r1);
      } else {
        copy_run(o + m0, crow + tx + m0, m1 - m0);
      }
      fill_run(o + m1, tw - m1, fill);
    }
  }
}

void bind_incremental(py::module_& m) {
  m.def("incremental_gather_cpu", &incremental_gather_cpu, py::arg("clean").noconvert(),
        py::arg("region").noconvert(), py::arg("region_offsets").noconvert(),
        py::arg("target_offsets").noconvert(), py::arg("out").noconvert(), py::arg("fill"),
        "Windows [P,C,th,tw] of clean [C,H,W] overlaid with regions [P,C,rh,rw]; fill outside.");
}

}  // namespace cnnviz
