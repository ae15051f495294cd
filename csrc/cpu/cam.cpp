// cam_combine_cpu: the weighted channel sum of a CAM, its ReLU, bilinear resize and min-max
// normalization in one pass over the activations. One OpenMP task per output map (b, j); the
// channel sum accumulates into an [h*w] row that stays in L1, four channels per sweep so the
// contiguous inner loop vectorizes and the accumulator is loaded and stored K/4 times, not K.
#include <algorithm>
#include <vector>

#include "upsample.h"

namespace cnnviz {

namespace {

// acc[p] = sum_c w[c] * a[c * hw + p]
void channel_sum(const float* a, const float* w, int64_t K, int64_t hw, float* acc) {
  std::fill(acc, acc + hw, 0.f);
  int64_t c = 0;
  for (; c + 4 <= K; c += 4) {
    const float *a0 = a + c * hw, *a1 = a0 + hw, *a2 = a1 + hw, *a3 = a2 + hw;
    const float w0 = w[c], w1 = w[c + 1], w2 = w[c + 2], w3 = w[c + 3];
    for (int64_t p = 0; p < hw; ++p) acc[p] += w0 * a0[p] + w1 * a1[p] + w2 * a2[p] + w3 * a3[p];
  }
  for (; c < K; ++c) {
    const float* a0 = a + c * hw;
    const float w0 = w[c];
    for (int64_t p = 0; p < hw; ++p) acc[p] += w0 * a0[p];
  }
}

// acc[p] = sum_c w[c * hw + p] * a[c * hw + p]  (LayerCAM's per-position weights)
void elementwise_sum(const float* a, const float* w, int64_t K, int64_t hw, float* acc) {
  std::fill(acc, acc + hw, 0.f);
  int64_t c = 0;
  for (; c + 2 <= K; c += 2) {
    const float *a0 = a + c * hw, *a1 = a0 + hw, *w0 = w + c * hw, *w1 = w0 + hw;
    for (int64_t p = 0; p < hw; ++p) acc[p] += w0[p] * a0[p] + w1[p] * a1[p];
  }
  for (; c < K; ++c) {
    const float *a0 = a + c * hw, *w0 = w + c * hw;
    for (int64_t p = 0; p < hw; ++p) acc[p] += w0[p] * a0[p];
  }
}

}  // namespace

// activations [B, K, h, w]; weights [B, k, K] (channel) or [B, k, K, h, w] (elementwise);
// out [B, k, H, W]
void cam_combine_cpu(FloatArray activations, FloatArray weights, FloatArray out, bool relu,
                     bool normalize) {
  check_ndim(activations, 4, "activations");
  check_ndim(out, 4, "out");
  const bool elementwise = weights.ndim() == 5;
  if (!elementwise) check_ndim(weights, 3, "weights");
  const int64_t B = activations.shape(0), K = activations.shape(1);
  const int64_t h = activations.shape(2), w = activations.shape(3), hw = h * w;
  const int64_t k = weights.shape(1), H = out.shape(2), W = out.shape(3);
  if (weights.shape(0) != B || weights.shape(2) != K ||
      (elementwise && (weights.shape(3) != h || weights.shape(4) != w)))
    throw std::invalid_argument("weights: shape does not match activations");
  if (out.shape(0) != B || out.shape(1) != k) throw std::invalid_argument("out: expected [B, k, H, W]");
  const float* act = activations.data();
  const float* wts = weights.data();
  float* dst = out.mutable_data();
  const auto ty = make_taps(h, H, true), tx = make_taps(w, W, true);
  const int64_t w_stride = elementwise ? K * hw : K;
  py::gil_scoped_release release;
#pragma omp parallel
  {
    Scratch scratch;
    std::vector<float> map(hw);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < B * k; ++m) {
      const float* a = act + (m / k) * K * hw;
      if (elementwise)
        elementwise_sum(a, wts + m * w_stride, K, hw, map.data());
      else
        channel_sum(a, wts + m * w_stride, K, hw, map.data());
      if (relu)
        for (int64_t p = 0; p < hw; ++p) map[p] = map[p] > 0.f ? map[p] : 0.f;
      resize_normalize_map(map.data(), h, w, ty, tx, normalize, dst + m * H * W, scratch);
    }
  }
}

void bind_cam(py::module_& m) {
  m.def("cam_combine_cpu", &cam_combine_cpu, py::arg("activations").noconvert(),
        py::arg("weights").noconvert(), py::arg("out").noconvert(), py::arg("relu"),
        py::arg("normalize"),
        "Weighted channel sum of [B,K,h,w] float32 activations by [B,k,K] or [B,k,K,h,w] "
        "weights, ReLU, bilinear resize to out [B,k,H,W] and per-map min-max normalization.");
}

}  // namespace cnnviz
