// upsample_normalize_cpu: bilinear (or nearest) resize of each map fused with its
// min-max normalization. Separable: the h source rows are resized along x once, then each
// output row is a two-row blend, a loop the compiler vectorizes; min/max are tracked per
// column in the same loop, and the map (L2-resident) is rescaled in place at the end.
#include <algorithm>
#include <cfloat>
#include <limits>
#include <vector>

#include "upsample.h"

namespace cnnviz {

std::vector<LinearTap> make_taps(int64_t in, int64_t out, bool bilinear) {
  std::vector<LinearTap> t(out);
  for (int64_t i = 0; i < out; ++i)
    t[i] = bilinear ? linear_tap(i, in, out) : LinearTap{nearest_index(i, in, out), 0, 1.f, 0.f};
  return t;
}

void resize_normalize_map(const float* src, int64_t h, int64_t w, const std::vector<LinearTap>& ty,
                          const std::vector<LinearTap>& tx, bool normalize, float* dst,
                          Scratch& s) {
  const int64_t H = static_cast<int64_t>(ty.size()), W = static_cast<int64_t>(tx.size());
  s.rows.resize(h * W);
  for (int64_t r = 0; r < h; ++r) {
    const float* in = src + r * w;
    float* row = s.rows.data() + r * W;
    for (int64_t j = 0; j < W; ++j) row[j] = tx[j].w0 * in[tx[j].i0] + tx[j].w1 * in[tx[j].i1];
  }
  s.lo.assign(W, std::numeric_limits<float>::infinity());
  s.hi.assign(W, -std::numeric_limits<float>::infinity());
  float* lo = s.lo.data();
  float* hi = s.hi.data();
  for (int64_t i = 0; i < H; ++i) {
    const float* a = s.rows.data() + ty[i].i0 * W;
    const float* b = s.rows.data() + ty[i].i1 * W;
    const float wa = ty[i].w0, wb = ty[i].w1;
    float* out = dst + i * W;
    for (int64_t j = 0; j < W; ++j) {
      const float v = wa * a[j] + wb * b[j];
      out[j] = v;
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
    }
  }
  if (!normalize) return;
  const float mn = *std::min_element(lo, lo + W);
  const float mx = *std::max_element(hi, hi + W);
  const float range = mx - mn;
  // A constant map (range within rounding of its magnitude) carries no ranking: zeros.
  const bool varies = range > kConstantUlps * FLT_EPSILON * std::max(std::fabs(mn), std::fabs(mx));
  const float scale = varies ? 1.f / range : 0.f;
  for (int64_t p = 0; p < H * W; ++p) dst[p] = (dst[p] - mn) * scale;
}

// maps [N, h, w] -> out [N, H, W]
void upsample_normalize_cpu(FloatArray maps, FloatArray out, bool bilinear, bool normalize) {
  check_ndim(maps, 3, "maps");
  check_ndim(out, 3, "out");
  const int64_t n = maps.shape(0), h = maps.shape(1), w = maps.shape(2);
  const int64_t H = out.shape(1), W = out.shape(2);
  if (out.shape(0) != n) throw std::invalid_argument("out: batch size differs from maps");
  const float* src = maps.data();
  float* dst = out.mutable_data();
  const auto ty = make_taps(h, H, bilinear), tx = make_taps(w, W, bilinear);
  py::gil_scoped_release release;
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < n; ++m)
      resize_normalize_map(src + m * h * w, h, w, ty, tx, normalize, dst + m * H * W, scratch);
  }
}

void bind_upsample(py::module_& m) {
  m.def("upsample_normalize_cpu", &upsample_normalize_cpu, py::arg("maps").noconvert(),
        py::arg("out").noconvert(), py::arg("bilinear"), py::arg("normalize"),
        "Resize [N,h,w] float32 maps to out [N,H,W] and min-max normalize each map.");
}

}  // namespace cnnviz
