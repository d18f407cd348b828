// Lloyd iterations of 1-D k-means on sorted values (kmeans.py `_lloyd_1d`, the same steps in one loop per run): the
// cluster of each centroid is the interval of values between the midpoints of its neighbours (an upper bound search
// per midpoint, as `searchsorted(..., right=True)`), and its new centroid the interval's mean from the prefix sums.
// Every (group, restart) run stops on its own when its intervals no longer change; results are those of the torch
// steps to the bit (the same double operations in the same order) at any thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
constexpr double kTiny = 1e-30;  // kmeans.py _TINY
}  // namespace

// x (G, R) ascending and finite, s1 (G, R + 1) its prefix sums (leading zero), c (G, r, k) sorted centroids and
// bounds (G, r, k + 1) their intervals, all double but the int64 bounds: the centroids after at most `iters` updates.
at::Tensor lloyd_sorted(const at::Tensor& x, const at::Tensor& s1, const at::Tensor& c, const at::Tensor& bounds,
                        int64_t iters) {
  TORCH_CHECK(x.dim() == 2 && s1.dim() == 2 && c.dim() == 3 && bounds.dim() == 3, "lloyd_sorted: x (G, R), s1 "
              "(G, R + 1), centroids (G, r, k) and bounds (G, r, k + 1) expected");
  const int64_t G = x.size(0), R = x.size(1), r = c.size(1), k = c.size(2);
  TORCH_CHECK(s1.size(0) == G && s1.size(1) == R + 1 && c.size(0) == G && bounds.size(0) == G &&
                  bounds.size(1) == r && bounds.size(2) == k + 1,
              "lloyd_sorted: shapes do not match: x ", x.sizes(), ", s1 ", s1.sizes(), ", centroids ", c.sizes(),
              ", bounds ", bounds.sizes());
  TORCH_CHECK(x.scalar_type() == at::kDouble && s1.scalar_type() == at::kDouble && c.scalar_type() == at::kDouble &&
                  bounds.scalar_type() == at::kLong,
              "lloyd_sorted: double values, prefix sums and centroids and int64 bounds expected");
  TORCH_CHECK(x.is_contiguous() && s1.is_contiguous() && c.is_contiguous() && bounds.is_contiguous(),
              "lloyd_sorted: contiguous tensors expected");
  TORCH_CHECK(x.device().is_cpu() && s1.device().is_cpu() && c.device().is_cpu() && bounds.device().is_cpu(),
              "lloyd_sorted: CPU tensors expected");
  // the bounds index the prefix sums
  TORCH_CHECK(bounds.numel() == 0 || (bounds.min().item<int64_t>() >= 0 && bounds.max().item<int64_t>() <= R),
              "lloyd_sorted: bounds must lie in [0, ", R, "]");
  auto out = c.clone();
  const double* px = x.data_ptr<double>();
  const double* ps = s1.data_ptr<double>();
  const int64_t* pb = bounds.data_ptr<int64_t>();
  double* pc = out.data_ptr<double>();
  at::parallel_for(0, G * r, std::max<int64_t>(1, 4096 / std::max<int64_t>(R, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> b(k + 1), next(k + 1);
    for (int64_t run = lo; run < hi; ++run) {
      const int64_t g = run / r;
      const double* xg = px + g * R;
      const double* sg = ps + g * (R + 1);
      double* cr = pc + run * k;
      std::copy(pb + run * (k + 1), pb + (run + 1) * (k + 1), b.begin());
      for (int64_t i = 0; i < iters; ++i) {
        if (i > 0) {
          next[0] = 0;
          next[k] = R;
          for (int64_t j = 0; j + 1 < k; ++j) {
            const double mid = (cr[j + 1] + cr[j]) / 2;
            next[j + 1] = std::upper_bound(xg, xg + R, mid) - xg;
          }
          if (next == b) break;
          b.swap(next);
        }
        for (int64_t j = 0; j < k; ++j) {
          const double s0 = static_cast<double>(b[j + 1] - b[j]);
          if (s0 > 0) cr[j] = (sg[b[j + 1]] - sg[b[j]]) / std::max(s0, kTiny);
        }
        std::sort(cr, cr + k);
      }
    }
  });
  return out;
}
