// gram_cpu / gram_backward_cpu: the Gram matrix G = F F^T * scale of each [C, K] feature map
// and its backward dF = scale * (dG + dG^T) F.
// G is symmetric, so the forward computes only the block rows' upper part (blocks of kBlock
// rows, about half the multiply-adds of a full product) and mirrors it tile by tile. The
// products go to the BLAS sgemm_ already loaded in the process with torch (MKL in the x86
// wheels), found once by dlsym: a hand-written loop cannot match its register blocking. Where
// no sgemm_ is loaded, a plain OpenMP loop over the same upper blocks runs instead.
#include <dlfcn.h>

#include <vector>

#include "common.h"

namespace cnnviz {

namespace {

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);

// 48 rows measured fastest at (8, 512, 28, 28) among 16..128 (smaller blocks waste less on the
// diagonal blocks, larger ones run sgemm more efficiently).
constexpr int64_t kBlock = 48;
// Tile edge of the mirror and symmetrization passes: a tile's strided reads stay in L1.
constexpr int64_t kTile = 32;

SgemmFn find_sgemm() {
  static const SgemmFn fn = [] {
    void* sym = dlsym(RTLD_DEFAULT, "sgemm_");
    if (!sym) {
      void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
      if (lib) sym = dlsym(lib, "sgemm_");
    }
    return reinterpret_cast<SgemmFn>(sym);
  }();
  return fn;
}

// Column-major c[m x n] (ldc) = alpha * a^T b with a [k x m] (lda), b [k x n] (ldb), or
// a[m x k] b[k x n] when trans_a is false: sgemm_ when loaded, else a plain loop.
void gemm(bool trans_a, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
          int ldb, float* c, int ldc) {
  if (SgemmFn sgemm = find_sgemm()) {
    const float beta = 0.f;
    sgemm(trans_a ? "T" : "N", "N", &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.f;
      for (int p = 0; p < k; ++p)
        acc += (trans_a ? a[p + static_cast<int64_t>(i) * lda] : a[i + static_cast<int64_t>(p) * lda]) *
               b[p + static_cast<int64_t>(j) * ldb];
      c[i + static_cast<int64_t>(j) * ldc] = alpha * acc;
    }
  }
}

// Column-major g [C x C]: g[r, c] = g[c, r] for r > c, read and written tile by tile (an
// element-wise pass strides by C on one side and misses the cache on every read).
void mirror_upper(float* g, int64_t C) {
  for (int64_t c0 = 0; c0 < C; c0 += kTile)
    for (int64_t r0 = c0; r0 < C; r0 += kTile) {
      const int64_t c1 = std::min(c0 + kTile, C), r1 = std::min(r0 + kTile, C);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = std::max(r0, c + 1); r < r1; ++r) g[r + c * C] = g[c + r * C];
    }
}

// x [B, C, K] -> out [B, C, C] = x x^T * scale.
void gram_cpu(FloatArray x, FloatArray out, float scale) {
  check_ndim(x, 3, "x");
  check_ndim(out, 3, "out");
  const int64_t B = x.shape(0), C = x.shape(1), K = x.shape(2);
  if (out.shape(0) != B || out.shape(1) != C || out.shape(2) != C)
    throw std::invalid_argument("gram_cpu: out must be [B, C, C]");
  const float* xp = x.data();
  float* op = out.mutable_data();
  py::gil_scoped_release release;
  // One image per thread (measured faster than threading each block's product); a single
  // image leaves the threads to sgemm. The mirror is a copy of C*C/2 floats, cheap beside it.
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    const float* f = xp + b * C * K;
    float* g = op + b * C * C;
    // Read as column-major, f is F^T [K x C]; block row i0 gets columns i0..C-1.
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t rows = std::min(kBlock, C - i0);
      gemm(true, static_cast<int>(rows), static_cast<int>(C - i0), static_cast<int>(K), scale, f + i0 * K,
           static_cast<int>(K), f + i0 * K, static_cast<int>(K), g + i0 + i0 * C, static_cast<int>(C));
    }
    // Mirror every entry below the diagonal (also inside the diagonal blocks, where sgemm's
    // two roundings may differ), so the result is exactly symmetric.
    mirror_upper(g, C);
  }
}

// s = g + g^T of a [C, C] matrix, tile by tile as mirror_upper (each pair computed once).
void symmetrize(const float* g, float* s, int64_t C) {
  for (int64_t i0 = 0; i0 < C; i0 += kTile)
    for (int64_t j0 = i0; j0 < C; j0 += kTile) {
      const int64_t i1 = std::min(i0 + kTile, C), j1 = std::min(j0 + kTile, C);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = std::max(j0, i); j < j1; ++j)
          s[i * C + j] = s[j * C + i] = g[i * C + j] + g[j * C + i];
    }
}

// grad [B, C, C], x [B, C, K] -> out [B, C, K] = scale * (grad + grad^T) x.
void gram_backward_cpu(FloatArray grad, FloatArray x, FloatArray out, float scale) {
  check_ndim(grad, 3, "grad");
  check_ndim(x, 3, "x");
  check_ndim(out, 3, "out");
  const int64_t B = x.shape(0), C = x.shape(1), K = x.shape(2);
  if (grad.shape(0) != B || grad.shape(1) != C || grad.shape(2) != C || out.shape(0) != B ||
      out.shape(1) != C || out.shape(2) != K)
    throw std::invalid_argument("gram_backward_cpu: expected grad [B, C, C], x and out [B, C, K]");
  const float* gp = grad.data();
  const float* xp = x.data();
  float* op = out.mutable_data();
  py::gil_scoped_release release;
  // As the forward: one image per thread with a one-thread sgemm each; one image threads sgemm.
#pragma omp parallel if (B > 1)
  {
    std::vector<float> sym(static_cast<size_t>(C * C));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      symmetrize(gp + b * C * C, sym.data(), C);
      // Column-major: out^T [K x C] = x^T [K x C] * sym [C x C] (sym is symmetric).
      gemm(false, static_cast<int>(K), static_cast<int>(C), static_cast<int>(C), scale, xp + b * C * K,
           static_cast<int>(K), sym.data(), static_cast<int>(C), op + b * C * K, static_cast<int>(K));
    }
  }
}

}  // namespace

void bind_gram(py::module_& m) {
  m.def("gram_cpu", &gram_cpu, py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("scale"));
  m.def("gram_backward_cpu", &gram_backward_cpu, py::arg("grad").noconvert(), py::arg("x").noconvert(),
        py::arg("out").noconvert(), py::arg("scale"));
  m.def("gram_uses_blas", [] { return find_sgemm() != nullptr; });
}

}  // namespace cnnviz
