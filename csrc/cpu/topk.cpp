// channel_topk_update_cpu: per (image, channel) spatial maximum and its first argmax, merged
// into the running top-k of that channel. OpenMP over channels: each channel's list is merged
// by one thread only (no races), reading each of its B maps once.
#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace cnnviz {

namespace {

// The shared order: value descending, then image id ascending, then position ascending.
inline bool better(float v, int64_t id, int64_t pos, float v2, int64_t id2, int64_t pos2) {
  return v > v2 || (v == v2 && (id < id2 || (id == id2 && pos < pos2)));
}

// Maximum of a map and its first position in row-major order; *nan set when a NaN is seen.
// Two passes: a max the compiler vectorizes, then a search that stops at the first hit.
inline float map_max(const float* a, int64_t n, int64_t* arg, bool* nan) {
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
  for (int64_t p = 0; p < n; ++p) {
    m = a[p] > m ? a[p] : m;
    bad |= a[p] != a[p];
  }
  int64_t p = 0;
  while (p < n && a[p] != m) ++p;
  *arg = p < n ? p : 0;  // an all -inf map: first position, as torch.argmax
  *nan = bad != 0;
  return m;
}

}  // namespace

// acts [B, C, HW]; ids [B]; running and out lists [C, k]. Returns the lowest channel holding
// a NaN (out is then incomplete and must be discarded), or -1.
int64_t channel_topk_update_cpu(FloatArray acts, LongArray ids, FloatArray values, LongArray rids,
                                LongArray rpos, FloatArray out_values, LongArray out_ids,
                                LongArray out_pos) {
  check_ndim(acts, 3, "activations");
  check_ndim(ids, 1, "ids");
  check_ndim(values, 2, "running_values");
  const int64_t B = acts.shape(0), C = acts.shape(1), HW = acts.shape(2), k = values.shape(1);
  if (ids.shape(0) != B) throw std::invalid_argument("ids: length differs from the batch size");
  for (const py::array* a : {static_cast<const py::array*>(&rids), static_cast<const py::array*>(&rpos),
                             static_cast<const py::array*>(&out_values), static_cast<const py::array*>(&out_ids),
                             static_cast<const py::array*>(&out_pos)})
    if (a->ndim() != 2 || a->shape(0) != values.shape(0) || a->shape(1) != k)
      throw std::invalid_argument("running lists and outputs must all be [C, k]");
  if (values.shape(0) != C) throw std::invalid_argument("running_values: channel count differs from activations");
  const float* src = acts.data();
  const int64_t* id = ids.data();
  const float* rv = values.data();
  const int64_t* ri = rids.data();
  const int64_t* rp = rpos.data();
  float* ov = out_values.mutable_data();
  int64_t* oi = out_ids.mutable_data();
  int64_t* op = out_pos.mutable_data();
  int64_t nan_channel = C;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) reduction(min : nan_channel)
  for (int64_t c = 0; c < C; ++c) {
    float* v = ov + c * k;
    int64_t* vi = oi + c * k;
    int64_t* vp = op + c * k;
    std::copy(rv + c * k, rv + (c + 1) * k, v);
    std::copy(ri + c * k, ri + (c + 1) * k, vi);
    std::copy(rp + c * k, rp + (c + 1) * k, vp);
    for (int64_t b = 0; b < B; ++b) {
      int64_t pos;
      bool nan;
      const float m = map_max(src + (b * C + c) * HW, HW, &pos, &nan);
      if (nan) {
        nan_channel = std::min(nan_channel, c);
        break;
      }
      // Insertion into the sorted list: slot s is the first the candidate beats.
      int64_t s = 0;
      while (s < k && !better(m, id[b], pos, v[s], vi[s], vp[s])) ++s;
      if (s == k) continue;
      for (int64_t t = k - 1; t > s; --t) {
        v[t] = v[t - 1];
        vi[t] = vi[t - 1];
        vp[t] = vp[t - 1];
      }
      v[s] = m;
      vi[s] = id[b];
      vp[s] = pos;
    }
  }
  return nan_channel < C ? nan_channel : -1;
}

void bind_topk(py::module_& m) {
  m.def("channel_topk_update_cpu", &channel_topk_update_cpu, py::arg("activations").noconvert(),
        py::arg("ids").noconvert(), py::arg("running_values").noconvert(),
        py::arg("running_ids").noconvert(), py::arg("running_pos").noconvert(),
        py::arg("out_values").noconvert(), py::arg("out_ids").noconvert(),
        py::arg("out_pos").noconvert(),
        "Merge the spatial maxima of activations [B,C,HW] into running per-channel top-k lists "
        "[C,k], written to out_*; returns the lowest channel holding a NaN, or -1.");
}

}  // namespace cnnviz
