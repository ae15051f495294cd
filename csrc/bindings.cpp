// The extension module cnnviz_fast._C: one bind_<op> per file in csrc/cpu.
#include "common.h"

namespace cnnviz {
void bind_upsample(py::module_& m);
void bind_cam(py::module_& m);
void bind_topk(py::module_& m);
void bind_occlusion(py::module_& m);
void bind_incremental(py::module_& m);
void bind_deeplift(py::module_& m);
void bind_perturb(py::module_& m);
void bind_gram(py::module_& m);
}  // namespace cnnviz

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnnviz-fast CPU kernels on raw float32 buffers";
  m.attr("openmp_threads") = cnnviz::num_threads();
  cnnviz::bind_upsample(m);
  cnnviz::bind_cam(m);
  cnnviz::bind_topk(m);
  cnnviz::bind_occlusion(m);
  cnnviz::bind_incremental(m);
  cnnviz::bind_deeplift(m);
  cnnviz::bind_perturb(m);
  cnnviz::bind_gram(m);
}
