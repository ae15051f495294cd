// The per-map resize + min-max step of upsample_normalize_cpu, shared with the kernels that
// produce a small map first and resize it in the same pass (cam_combine_cpu).
#pragma once
#include <vector>

#include "common.h"

namespace cnnviz {

struct Scratch {
  std::vector<float> rows, lo, hi;  // [h, W] x-resized rows; per-column min and max
};

// Taps of every output index: bilinear (linear_tap) or nearest (weight 1 on nearest_index).
std::vector<LinearTap> make_taps(int64_t in, int64_t out, bool bilinear);

// Resize one [h, w] map to dst [ty.size(), tx.size()] and min-max normalize it when asked.
void resize_normalize_map(const float* src, int64_t h, int64_t w, const std::vector<LinearTap>& ty,
                          const std::vector<LinearTap>& tx, bool normalize, float* dst, Scratch& s);

}  // namespace cnnviz
