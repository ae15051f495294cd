// incremental_gather_cpu: windows of a clean activation overlaid with per-patch updated
// regions, the gather step of incremental inference. Arrays are [planes, H, W, unit]: a
// channels-first map is C planes of unit 1, a channels-last one 1 plane of unit C, so every
// output row is at most five contiguous runs (fill | clean | region | clean | fill) of whole
// pixels either way. The gather only moves elements: one template serves float32 and the
// 16-bit floats (bfloat16, float16: passed as int16 views, the fill as its bit pattern).
#include <algorithm>
#include <cstring>

#include "common.h"

namespace cnnviz {

namespace {

template <typename T>
inline void fill_run(T* dst, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

template <typename T>
inline void copy_run(T* dst, const T* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

}  // namespace

// clean [planes, H, W, unit], region [P, planes, rh, rw, unit] at region_offsets [P, 2] ->
// out [P, planes, th, tw, unit] whose windows start at target_offsets [P, 2]; `fill` outside
// the map.
template <typename T>
void incremental_gather(Array<T> clean, Array<T> region, LongArray region_offsets,
                        LongArray target_offsets, Array<T> out, T fill) {
  check_ndim(clean, 4, "clean");
  check_ndim(region, 5, "region");
  check_ndim(region_offsets, 2, "region_offsets");
  check_ndim(target_offsets, 2, "target_offsets");
  check_ndim(out, 5, "out");
  const int64_t C = clean.shape(0), H = clean.shape(1), W = clean.shape(2), U = clean.shape(3);
  const int64_t P = out.shape(0), th = out.shape(2), tw = out.shape(3);
  const int64_t rh = region.shape(2), rw = region.shape(3);
  if (out.shape(1) != C || region.shape(0) != P || region.shape(1) != C)
    throw std::invalid_argument("region/out: patch or plane counts differ from clean");
  if (out.shape(4) != U || region.shape(4) != U)
    throw std::invalid_argument("region/out: channels per pixel differ from clean");
  if (region_offsets.shape(0) != P || region_offsets.shape(1) != 2 ||
      target_offsets.shape(0) != P || target_offsets.shape(1) != 2)
    throw std::invalid_argument("region_offsets/target_offsets: expected [P, 2]");
  const T* cl = clean.data();
  const T* rg = region.data();
  const int64_t* ro = region_offsets.data();
  const int64_t* to = target_offsets.data();
  T* dst = out.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t pc = 0; pc < P * C; ++pc) {
    const int64_t p = pc / C, c = pc % C;
    const int64_t ty = to[2 * p], tx = to[2 * p + 1], ry = ro[2 * p], rx = ro[2 * p + 1];
    // Columns of the window inside the map, and inside the region, as window indices.
    const int64_t m0 = std::clamp<int64_t>(-tx, 0, tw), m1 = std::clamp<int64_t>(W - tx, 0, tw);
    const int64_t r0 = std::clamp<int64_t>(std::max(rx, int64_t{0}) - tx, m0, m1);
    const int64_t r1 = std::clamp<int64_t>(std::min(rx + rw, W) - tx, r0, m1);
    const T* cmap = cl + c * H * W * U;
    const T* rmap = rg + (p * C + c) * rh * rw * U;
    T* o = dst + pc * th * tw * U;
    for (int64_t i = 0; i < th; ++i, o += tw * U) {
      const int64_t y = ty + i;
      if (y < 0 || y >= H) {
        fill_run(o, tw * U, fill);
        continue;
      }
      const T* crow = cmap + (y * W + tx) * U;
      fill_run(o, m0 * U, fill);
      if (y >= ry && y < ry + rh && r1 > r0) {
        copy_run(o + m0 * U, crow + m0 * U, (r0 - m0) * U);
        copy_run(o + r0 * U, rmap + ((y - ry) * rw + tx + r0 - rx) * U, (r1 - r0) * U);
        copy_run(o + r1 * U, crow + r1 * U, (m1 - r1) * U);
      } else {
        copy_run(o + m0 * U, crow + m0 * U, (m1 - m0) * U);
      }
      fill_run(o + m1 * U, (tw - m1) * U, fill);
    }
  }
}

void bind_incremental(py::module_& m) {
  m.def("incremental_gather_cpu", &incremental_gather<float>, py::arg("clean").noconvert(),
        py::arg("region").noconvert(), py::arg("region_offsets").noconvert(),
        py::arg("target_offsets").noconvert(), py::arg("out").noconvert(), py::arg("fill"),
        "Windows [P,planes,th,tw,unit] of clean [planes,H,W,unit] overlaid with regions "
        "[P,planes,rh,rw,unit]; fill outside.");
  m.def("incremental_gather_cpu16", &incremental_gather<int16_t>, py::arg("clean").noconvert(),
        py::arg("region").noconvert(), py::arg("region_offsets").noconvert(),
        py::arg("target_offsets").noconvert(), py::arg("out").noconvert(), py::arg("fill_bits"),
        "incremental_gather_cpu on 16-bit floats as int16 views; fill_bits: the fill's bit pattern.");
}

}  // namespace cnnviz
