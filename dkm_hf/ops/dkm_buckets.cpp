// Weights keyed by their 16-bit pattern (buckets.py): the per-weight passes of the uniquified DKM path of a
// per-tensor LUT, one loop each, the key used as it is as an index into a 65,536-entry table (2 bytes per weight read
// instead of the 4-byte inverse index and the conversions torch needs to build one).
//
// Sums over weights are accumulated in double per block of a partition that depends only on the number of weights,
// and the blocks are added in order: results are the same at any thread count.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBuckets = 65536;
constexpr int64_t kMinBlock = 1 << 20;  // weights per block of a reduction
constexpr int64_t kMaxBlocks = 64;      // at most this many per-block tables (512 KiB each)
constexpr int64_t kGrain = 1 << 15;     // weights per task of an element-wise loop

const uint16_t* key_data(const at::Tensor& keys) {
  TORCH_CHECK(keys.scalar_type() == at::kShort && keys.dim() == 1 && keys.is_contiguous() && keys.device().is_cpu(),
              "dkm_buckets: keys must be a contiguous 1-D int16 CPU tensor (the bit patterns of a 16-bit weight)");
  return reinterpret_cast<const uint16_t*>(keys.data_ptr<int16_t>());
}

void check_table(const at::Tensor& table, const char* name) {
  TORCH_CHECK(table.dim() == 1 && table.numel() == kBuckets && table.is_contiguous() && table.device().is_cpu(),
              "dkm_buckets: ", name, " must be a contiguous CPU table of 65536 entries, got ", table.sizes());
}

int64_t blocks_for(int64_t n) { return std::clamp<int64_t>((n + kMinBlock - 1) / kMinBlock, 1, kMaxBlocks); }

// sum over blocks of per-block tables computed by `fill(block, begin, end, table)`, in block order.
template <typename Acc, typename Fill>
std::vector<Acc> blocked_sum(int64_t n, Fill fill) {
  const int64_t blocks = blocks_for(n);
  std::vector<Acc> partial(blocks * kBuckets, Acc(0));
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) fill(n * b / blocks, n * (b + 1) / blocks, partial.data() + b * kBuckets);
  });
  for (int64_t b = 1; b < blocks; ++b) {
    const Acc* src = partial.data() + b * kBuckets;
    for (int64_t j = 0; j < kBuckets; ++j) partial[j] += src[j];
  }
  partial.resize(kBuckets);
  return partial;
}

}  // namespace

// Number of weights per key: (65536,) int64.
at::Tensor bucket_counts(const at::Tensor& keys) {
  const uint16_t* k = key_data(keys);
  const auto sums = blocked_sum<int64_t>(keys.numel(), [&](int64_t begin, int64_t end, int64_t* h) {
    for (int64_t i = begin; i < end; ++i) ++h[k[i]];
  });
  auto out = at::empty({kBuckets}, keys.options().dtype(at::kLong));
  std::copy(sums.begin(), sums.end(), out.data_ptr<int64_t>());
  return out;
}

// out[i] = table[keys[i]], in the table's dtype (any 2- or 4-byte one: the bits are copied).
at::Tensor bucket_gather(const at::Tensor& table, const at::Tensor& keys) {
  check_table(table, "table");
  const uint16_t* k = key_data(keys);
  auto out = at::empty({keys.numel()}, table.options());
  auto copy = [&](auto* dst, const auto* src) {
    at::parallel_for(0, keys.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) dst[i] = src[k[i]];
    });
  };
  if (table.element_size() == 4)
    copy(static_cast<int32_t*>(out.data_ptr()), static_cast<const int32_t*>(table.data_ptr()));
  else if (table.element_size() == 2)
    copy(static_cast<int16_t*>(out.data_ptr()), static_cast<const int16_t*>(table.data_ptr()));
  else
    TORCH_CHECK(false, "dkm_buckets: a 2- or 4-byte table expected, got ", table.scalar_type());
  return out;
}

// sums[key] = sum of g over the weights with that key: (65536,) float32, accumulated in double.
at::Tensor bucket_sums(const at::Tensor& keys, const at::Tensor& g) {
  const uint16_t* k = key_data(keys);
  TORCH_CHECK(g.dim() == 1 && g.numel() == keys.numel() && g.is_contiguous() && g.device().is_cpu(),
              "dkm_buckets: g must be contiguous with one value per key");
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "bucket_sums", [&] {
    const scalar_t* pg = g.data_ptr<scalar_t>();
    sums = blocked_sum<double>(keys.numel(), [&](int64_t begin, int64_t end, double* s) {
      for (int64_t i = begin; i < end; ++i) s[k[i]] += static_cast<double>(pg[i]);
    });
  });
  auto out = at::empty({kBuckets}, g.options().dtype(at::kFloat));
  std::transform(sums.begin(), sums.end(), out.data_ptr<float>(), [](double x) { return static_cast<float>(x); });
  return out;
}

// out[i] = a[keys[i]] * g[i] + b[keys[i]] in g's dtype; a and b float32 tables.
at::Tensor bucket_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& keys, const at::Tensor& g) {
  check_table(a, "a");
  check_table(b, "b");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "dkm_buckets: float32 a and b expected");
  const uint16_t* k = key_data(keys);
  TORCH_CHECK(g.dim() == 1 && g.numel() == keys.numel() && g.is_contiguous() && g.device().is_cpu(),
              "dkm_buckets: g must be contiguous with one value per key");
  auto out = at::empty_like(g);
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "bucket_grad", [&] {
    const scalar_t* pg = g.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, keys.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        po[i] = static_cast<scalar_t>(pa[k[i]] * static_cast<float>(pg[i]) + pb[k[i]]);
    });
  });
  return out;
}

namespace {
// std::lower_bound without branches on the data (a conditional move per halving): on random values the branchy one
// mispredicts half of its comparisons.
inline int64_t lower_bound(const float* m, int64_t count, float v) {
  if (count == 0) return 0;
  const float* base = m;
  for (int64_t n = count; n > 1;) {
    const int64_t half = n / 2;
    base = base[half] < v ? base + half : base;
    n -= half;
  }
  return (base - m) + (*base < v);
}
}  // namespace

// Nearest-centroid assignment for d = 1 (attention.py `_hard_assign_1d`, the same steps in one loop): x (G, n) and
// sorted centroids sorted_c (G, k) float32, order (G, k) int64 the original index standing for each sorted position.
// The position is found by binary search among the centroid midpoints (a NaN goes last, as torch.searchsorted puts
// it), then the exact squared distances to it and its two neighbours decide, ties to the lowest original index.
at::Tensor nearest_sorted(const at::Tensor& x, const at::Tensor& sorted_c, const at::Tensor& order) {
  TORCH_CHECK(x.dim() == 2 && sorted_c.dim() == 2 && order.sizes() == sorted_c.sizes() && x.size(0) == sorted_c.size(0),
              "nearest_sorted: x (G, n), sorted centroids (G, k) and order (G, k) expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && sorted_c.scalar_type() == at::kFloat && order.scalar_type() == at::kLong,
              "nearest_sorted: float32 x and centroids, int64 order expected");
  TORCH_CHECK(x.is_contiguous() && sorted_c.is_contiguous() && order.is_contiguous(),
              "nearest_sorted: contiguous tensors expected");
  TORCH_CHECK(x.device().is_cpu() && sorted_c.device().is_cpu() && order.device().is_cpu(),
              "nearest_sorted: CPU tensors expected");
  const int64_t G = x.size(0), n = x.size(1), k = sorted_c.size(1);
  TORCH_CHECK(k >= 1 || x.numel() == 0, "nearest_sorted: no centroids to choose from");
  auto out = at::empty({G, n}, x.options().dtype(at::kLong));
  std::vector<float> mids(G * std::max<int64_t>(k - 1, 0));
  const float* pc = sorted_c.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j + 1 < k; ++j) mids[g * (k - 1) + j] = (pc[g * k + j + 1] + pc[g * k + j]) / 2.0f;
  const float* px = x.data_ptr<float>();
  const int64_t* po = order.data_ptr<int64_t>();
  int64_t* pi = out.data_ptr<int64_t>();
  at::parallel_for(0, G * n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi;) {
      const int64_t g = e / n, end = std::min(hi, (g + 1) * n);
      const float* m = mids.data() + g * (k - 1);
      const float* c = pc + g * k;
      const int64_t* o = po + g * k;
      for (; e < end; ++e) {
        const float v = px[e];
        const int64_t pos = std::isnan(v) ? k - 1 : lower_bound(m, k - 1, v);
        float best_d = 0.0f;
        int64_t best_i = -1;
        for (int64_t offset = -1; offset <= 1; ++offset) {
          const int64_t j = std::clamp<int64_t>(pos + offset, 0, k - 1);
          const float diff = v - c[j];
          const float dist = diff * diff;
          const int64_t i = o[j];
          if (best_i < 0 || dist < best_d || (dist == best_d && i < best_i)) {
            best_d = dist;
            best_i = i;
          }
        }
        pi[e] = best_i;
      }
    }
  });
  return out;
}
