// The DKM loop fused on the CPU: distances, softmax, reductions and centroid mix in one pass over the weight per
// iteration, the attention of a tile of V vectors kept in a small scratch array (L1) and never written out.
//
// Shapes (float32, contiguous): w (G, n, d), centroids (G, k, d), tau and epsilon (G), and optionally the vectors'
// importance f (G, n) of an importance-weighted loop (S_t = A_t^T (f w), m_t = A_t^T f; an empty tensor for none). The
// math and the early stop are those of dkm_hf/ops/dkm.py (`_iterate`, `_soft_output`, `_backward` of the chunked
// path), see there.
//
// Work is cut into items of at most kChunk vectors of one group, a partition that does not depend on the number of
// threads: each item reduces into its own slot, the slots of a group are summed in order afterwards, so results are
// the same at any thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

// Flush-to-zero and denormals-are-zero on the thread while a pass runs (`for_items`), the caller's mode restored
// after. Attention entries go down to 2^-115 (EXP_FLOOR), and their products with weights, gradients and other entries
// fall below float32's normal range (1.2e-38): on Intel cores each such operand or result takes a microcode assist,
// which made a per-row SmolLM2 layer's forward and backward 10x slower there (AMD's cores take none). Numbers that
// small change none of the sums they join beyond float32's rounding.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

constexpr float kTiny = 1e-30f;  // dkm.py _TINY
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Floor = -80.0f * kLog2e;  // attention.py EXP_FLOOR, in base 2
constexpr int64_t kChunk = 2048;               // vectors per work item

// One SIMD register of floats (GCC / Clang vector extensions, the width of the instruction set compiled for): a tile of
// V vectors is processed lane by lane, so every loop over centroids is a run of whole-register operations.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
typedef float vf __attribute__((vector_size(kVectorBytes)));
typedef int32_t vi __attribute__((vector_size(kVectorBytes)));
constexpr int V = kVectorBytes / 4;

// Keeps a value rounded where it is, in a register: the optimiser may not fuse the operation that made it into the
// next one (see gradient_tile).
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_ROUNDED(x) asm("" : "+v"(x))
#elif defined(__aarch64__)
#define KEEP_ROUNDED(x) asm("" : "+w"(x))
#else
#define KEEP_ROUNDED(x) asm("" : "+m"(x))
#endif

inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf splat(float x) { return vf{} + x; }

inline float lane_sum(vf x) {
  float s = 0.0f;
  for (int v = 0; v < V; ++v) s += x[v];
  return s;
}

// 2^r for |r| <= 1/2 by a degree-5 polynomial fitted for the least largest relative error with p(0) = 1 exactly
// (relative error < 2.1e-7 in float32, measured over 2e6 points), evaluated by Estrin's scheme: the exponentials of a
// tile's centroids are independent, and a shorter dependency chain lets more of them overlap (forward and backward
// ~15% faster than Horner). p(0) = 1 matters: the nearest centroid's entry is then exactly 1, as torch's exp gives
// it. At a small tau the other entries vanish against it, the softmax's mean gradient is then the nearest centroid's
// own to the bit, and its backward term (g - mean) a is zero; with 1 + 2^-23 there (the unconstrained fit's constant)
// an ulp of residue times 2 / tau swamped the gradient (4x its norm at a relative tau of 1e-8).
inline vf exp2_poly(vf r) {
  const vf r2 = r * r;  // three multiply-adds deep instead of Horner's five
  const vf p45 = r * 1.3264726623281667e-3f + 9.671512959129179e-3f;
  const vf p23 = r * 5.5507337477604834e-2f + 2.402224208012474e-1f;
  const vf p01 = r * 6.931469775948482e-1f + 1.0f;
  return (p45 * r2 + p23) * r2 + p01;
}

// 2^z for z in [kExp2Floor, 0]: z = n + r with n = round(z) and 2^n 2^r. With AVX-512 the rounding and the scaling by
// 2^n are one instruction each (vrndscaleps, vscalefps) and max is one instruction (the vector ternary compiles to a
// compare and a blend there); otherwise the magic-number rounding, whose low bits also hold n + 127, the exponent of
// 2^n. Both give the same bits; the time of a DKM pass follows its count of vector operations.
#if defined(__AVX512F__)
inline vf exp2_neg(vf z) {
  const vf n = (vf)_mm512_roundscale_ps((__m512)z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vf)_mm512_scalef_ps((__m512)exp2_poly(z - n), (__m512)n);
}
inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
inline vf exp2_neg(vf z) {
  const vf t = z + 12583039.0f;  // 1.5 * 2^23 + 127
  const vf r = z - (t - 12583039.0f);
  return exp2_poly(r) * (vf)((vi)t << 23);
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
#endif

struct Work {
  int64_t group, begin, end;
};

std::vector<Work> work_items(int64_t G, int64_t n) {
  std::vector<Work> items;
  items.reserve(G * ((n + kChunk - 1) / kChunk));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; i += kChunk) items.push_back({g, i, std::min(n, i + kChunk)});
  return items;
}

int64_t grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Vectors i0 .. i0 + V (those before `end`; zeros after) of a group's (n, d) values: x[dd] holds value dd of each.
template <int D>
inline int load_tile(const float* src, int64_t i0, int64_t end, int64_t d_rt, vf* x) {
  const int64_t d = D ? D : d_rt;
  const int count = static_cast<int>(std::min<int64_t>(V, end - i0));
  if (d == 1 && count == V) {
    std::memcpy(x, src + i0, sizeof(vf));
    return count;
  }
  for (int64_t dd = 0; dd < d; ++dd)
    for (int v = 0; v < V; ++v) x[dd][v] = v < count ? src[(i0 + v) * d + dd] : 0.0f;
  return count;
}

inline vf lane_mask(int count) {
  vf mask = splat(1.0f);
  for (int v = count; v < V; ++v) mask[v] = 0.0f;
  return mask;
}

// a[j] = softmax_j(-||x - c_j||^2 / tau) for the V vectors of a tile, as attention.py computes it: exact differences,
// the smallest distance subtracted, logits clamped at EXP_FLOOR; `q` = log2(e) / tau turns them into base 2. a[j] gets
// the exponentials and the tile's 1 / (sum of them) is returned: the callers multiply their per-vector results by it
// once instead of normalising every entry.
template <int D, int K>
inline vf attention_tile(const vf* x, const float* c, int64_t k_rt, int64_t d_rt, float q, vf* a) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  vf lo = splat(INFINITY), sum = vf{};
  for (int64_t j = 0; j < k; ++j) {
    vf dist = vf{};
    for (int64_t dd = 0; dd < d; ++dd) {
      const vf diff = x[dd] - c[j * d + dd];
      dist += diff * diff;
    }
    a[j] = dist;
    lo = vmin(lo, dist);
  }
#pragma GCC unroll 4  // interleaves independent exponentials (with Estrin's scheme, forward and backward ~15% faster)
  for (int64_t j = 0; j < k; ++j) {
    const vf e = exp2_neg(vmax((lo - a[j]) * q, splat(kExp2Floor)));
    a[j] = e;
    sum += e;
  }
  return 1.0f / sum;
}

inline float base2(float tau) { return kLog2e / tau; }

// Scratch of one thread: attention, its gradient, accumulators, the tile's values and, where a work item is a whole
// group (whole_groups), the exponentials and 1 / sums of all its tiles.
struct Scratch {
  std::vector<vf> a, dz, acc, x, y, ex, inv;
  Scratch(int64_t k, int64_t d) : a(k), dz(k), acc(k * (d + 1)), x(d), y(d) {}
};

// body(scratch, lo, hi) over the work items [lo, hi) of each parallel task, every DKM pass's loop: a scratch per task,
// denormals flushed on its thread meanwhile.
template <typename Body>
void for_items(const std::vector<Work>& items, int64_t n, int64_t k, int64_t d, const Body& body) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain(n), [&](int64_t lo, int64_t hi) {
    FlushDenormals flush;
    Scratch s(k, d);
    body(s, lo, hi);
  });
}

// Where every group is one work item (n <= kChunk: per-row LUTs and small groups), a group's next centroids depend on
// its own vectors only. One pass over the group then serves both what needs the attention before those centroids are
// known (the sums S_t, m_t; in backward dL/dC_T) and what needs it after (W~; dL/dw): the exponentials of all its
// tiles stay in the thread's scratch in between (ceil(n / V) * k registers: 36 KB for a 576-vector row at 4 bits)
// instead of being computed a second time. Same operations in the same order as the two passes: the same bits.
bool whole_groups(int64_t n) { return n <= kChunk; }

// The tile's factor for its sums: 1 / (sum of exponentials), zero on lanes past the end, times the importance.
inline vf tile_scale(vf inv, int count, const float* f, int64_t i0, int64_t end) {
  vf scale = inv * lane_mask(count);
  if (f) {
    vf fv;
    load_tile<1>(f, i0, end, 1, &fv);
    scale *= fv;
  }
  return scale;
}

// acc[j * d + dd] += a_j * scale * y[dd] and acc[k * d + j] += a_j * scale over the tile's lanes.
template <int D, int K>
inline void accumulate_tile(const vf* a, vf scale, const vf* y, int64_t k_rt, int64_t d_rt, vf* acc) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  vf scaled[D ? D : 16];  // y * scale once per tile: every centroid's sums are then one multiply-add each
  const bool small = d <= 16;
  if (small)
    for (int64_t dd = 0; dd < d; ++dd) scaled[dd] = y[dd] * scale;
  for (int64_t j = 0; j < k; ++j) {
    acc[k * d + j] += a[j] * scale;
    for (int64_t dd = 0; dd < d; ++dd) acc[j * d + dd] += a[j] * (small ? scaled[dd] : y[dd] * scale);
  }
}

// W~ = A C_out for the tile's `count` vectors, from its exponentials a and 1 / their sum, into dst.
template <int D, int K>
inline void store_output(const vf* a, vf inv, const float* co, int64_t k_rt, int64_t d_rt, int count, float* dst) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  for (int64_t dd = 0; dd < d; ++dd) {
    vf o = vf{};
    for (int64_t j = 0; j < k; ++j) o += a[j] * co[j * d + dd];
    o *= inv;
    if (d == 1 && count == V)
      std::memcpy(dst, &o, sizeof o);
    else
      for (int v = 0; v < count; ++v) dst[v * d + dd] = o[v];
  }
}

// Per work item, into out[0 : k*d] and out[k*d : k*d + k]: sum_i f_i a_ji y_i and sum_i f_i a_ji, attention against
// c, f the importance (G, n) or, where null, 1.
template <int D, int K>
void reduce_item(const float* w, const float* y, const float* f, const float* c, float q, int64_t n, int64_t k_rt,
                 int64_t d_rt, const Work& item, Scratch& s, float* out) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  std::fill(s.acc.begin(), s.acc.end(), vf{});
  const float* wg = w + item.group * n * d;
  const float* yg = y + item.group * n * d;
  const float* fg = f ? f + item.group * n : nullptr;
  for (int64_t i0 = item.begin; i0 < item.end; i0 += V) {
    const int count = load_tile<D>(wg, i0, item.end, d, s.x.data());
    if (y != w) load_tile<D>(yg, i0, item.end, d, s.y.data());
    const vf inv = attention_tile<D, K>(s.x.data(), c, k, d, q, s.a.data());
    accumulate_tile<D, K>(s.a.data(), tile_scale(inv, count, fg, i0, item.end), y != w ? s.y.data() : s.x.data(), k,
                       d, s.acc.data());
  }
  for (int64_t r = 0; r < k * (d + 1); ++r) out[r] = lane_sum(s.acc[r]);
}

// Sum each group's item slots (in order, in double): (G, width).
std::vector<double> group_sums(const std::vector<Work>& items, const std::vector<float>& slots, int64_t G,
                               int64_t width) {
  std::vector<double> sums(G * width, 0.0);
  for (size_t it = 0; it < items.size(); ++it) {
    double* dst = sums.data() + items[it].group * width;
    const float* src = slots.data() + it * width;
    for (int64_t r = 0; r < width; ++r) dst[r] += src[r];
  }
  return sums;
}

template <int D, int K>
std::vector<double> reduce_pass(const float* w, const float* y, const float* f, const float* c, const float* tau,
                                int64_t G, int64_t n, int64_t k_rt, int64_t d, const std::vector<Work>& items) {
  const int64_t k = K ? K : k_rt;
  const int64_t width = k * (d + 1);
  std::vector<float> slots(items.size() * width);
  for_items(items, n, k, d, [&](Scratch& s, int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const Work& item = items[it];
      reduce_item<D, K>(w, y, f, c + item.group * k * d, base2(tau[item.group]), n, k, d, item, s,
                     slots.data() + it * width);
    }
  });
  return group_sums(items, slots, G, width);
}

// C_t of one group from its sums S_t (k * d) and m_t (k): S / m where m > tiny, else the centroid stays.
void next_centroids(const float* sums_s, const float* sums_m, const float* c, int64_t k, int64_t d, float* c_new,
                    float* m) {
  for (int64_t j = 0; j < k; ++j) {
    const float mass = sums_m[j];
    m[j] = mass;
    for (int64_t dd = 0; dd < d; ++dd) c_new[j * d + dd] = mass > kTiny ? sums_s[j * d + dd] / mass : c[j * d + dd];
  }
}

// W~ = A C_out with A against c_in, into out (G, n, d).
template <int D, int K>
void soft_output(const float* w, const float* c_in, const float* c_out, const float* tau, int64_t n, int64_t k_rt,
                 int64_t d_rt, const std::vector<Work>& items, float* out) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  for_items(items, n, k, d, [&](Scratch& s, int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const Work& item = items[it];
      const int64_t g = item.group;
      for (int64_t i0 = item.begin; i0 < item.end; i0 += V) {
        const int count = load_tile<D>(w + g * n * d, i0, item.end, d, s.x.data());
        const vf inv = attention_tile<D, K>(s.x.data(), c_in + g * k * d, k, d, base2(tau[g]), s.a.data());
        store_output<D, K>(s.a.data(), inv, c_out + g * k * d, k, d, count, out + (g * n + i0) * d);
      }
    }
  });
}

// One iteration over whole groups (whole_groups): C_t and m_t of every group from the attention against c, and W~ = A
// C_t into out, as if this iteration were the last (a later one overwrites it).
template <int D, int K>
void whole_group_iteration(const float* w, const float* f, const float* c, const float* tau, int64_t n, int64_t k_rt,
                           int64_t d_rt, const std::vector<Work>& items, float* c_new, float* m, float* out) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  const int64_t tiles = (n + V - 1) / V;
  for_items(items, n, k, d, [&](Scratch& s, int64_t lo, int64_t hi) {
    s.ex.resize(tiles * k);
    s.inv.resize(tiles);
    std::vector<float> sums(k * (d + 1));
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t g = items[it].group;
      const float* wg = w + g * n * d;
      const float* cg = c + g * k * d;
      std::fill(s.acc.begin(), s.acc.end(), vf{});
      for (int64_t i0 = 0, tile = 0; i0 < n; i0 += V, ++tile) {
        const int count = load_tile<D>(wg, i0, n, d, s.x.data());
        s.inv[tile] = attention_tile<D, K>(s.x.data(), cg, k, d, base2(tau[g]), &s.ex[tile * k]);
        accumulate_tile<D, K>(&s.ex[tile * k], tile_scale(s.inv[tile], count, f ? f + g * n : nullptr, i0, n),
                           s.x.data(), k, d, s.acc.data());
      }
      for (int64_t r = 0; r < k * (d + 1); ++r) sums[r] = lane_sum(s.acc[r]);
      next_centroids(sums.data(), sums.data() + k * d, cg, k, d, c_new + g * k * d, m + g * k);
      for (int64_t i0 = 0, tile = 0; i0 < n; i0 += V, ++tile)
        store_output<D, K>(&s.ex[tile * k], s.inv[tile], c_new + g * k * d, k, d,
                        static_cast<int>(std::min<int64_t>(V, n - i0)), out + (g * n + i0) * d);
    }
  });
}

void check_inputs(const at::Tensor& w, const at::Tensor& c, const at::Tensor& tau) {
  TORCH_CHECK(w.dim() == 3 && c.dim() == 3, "dkm_fused: w must be (G, n, d) and centroids (G, k, d), got ", w.sizes(),
              " and ", c.sizes());
  TORCH_CHECK(w.size(0) == c.size(0) && w.size(2) == c.size(2), "dkm_fused: centroids ", c.sizes(),
              " do not match w ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat && tau.scalar_type() == at::kFloat,
              "dkm_fused: float32 tensors expected");
  TORCH_CHECK(w.is_contiguous() && c.is_contiguous() && tau.is_contiguous(), "dkm_fused: contiguous tensors expected");
  TORCH_CHECK(tau.numel() == w.size(0), "dkm_fused: one tau per group expected, got ", tau.numel());
  TORCH_CHECK(w.device().is_cpu() && c.device().is_cpu() && tau.device().is_cpu(), "dkm_fused: CPU tensors expected");
}

template <int D, int K>
std::vector<at::Tensor> forward_impl(const at::Tensor& w, const at::Tensor& c0, const at::Tensor& tau,
                                     const at::Tensor& epsilon, int64_t max_iters, const float* pf) {
  const int64_t G = w.size(0), n = w.size(1), d = w.size(2), k = K ? K : c0.size(1);
  auto history = at::empty({max_iters + 1, G, k, d}, w.options());
  auto masses = at::zeros({max_iters, G, k}, w.options());
  auto out = at::empty_like(w);
  history[0].copy_(c0);
  const auto items = work_items(G, n);
  const bool whole = whole_groups(n);
  const float* pw = w.data_ptr<float>();
  const float* ptau = tau.data_ptr<float>();
  const float* peps = epsilon.data_ptr<float>();
  float* ph = history.data_ptr<float>();
  float* pm = masses.data_ptr<float>();
  int64_t T = max_iters;
  for (int64_t t = 1; t <= max_iters; ++t) {
    const float* c = ph + (t - 1) * G * k * d;
    float* c_new = ph + t * G * k * d;
    float* m = pm + (t - 1) * G * k;
    if (whole) {
      whole_group_iteration<D, K>(pw, pf, c, ptau, n, k, d, items, c_new, m, out.data_ptr<float>());
    } else {
      const auto sums = reduce_pass<D, K>(pw, pw, pf, c, ptau, G, n, k, d, items);
      std::vector<float> group(k * (d + 1));
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < k * (d + 1); ++r) group[r] = static_cast<float>(sums[g * k * (d + 1) + r]);
        next_centroids(group.data(), group.data() + k * d, c + g * k * d, k, d, c_new + g * k * d, m + g * k);
      }
    }
    float change = 0.0f;  // the largest move relative to its group's epsilon
    bool nan = false;
    for (int64_t g = 0; g < G; ++g) {
      float moved = 0.0f;
      for (int64_t r = g * k * d; r < (g + 1) * k * d; ++r) moved = std::max(moved, std::abs(c_new[r] - c[r]));
      const float ratio = moved / peps[g];
      nan = nan || std::isnan(ratio);
      change = std::max(change, ratio);
    }
    if (!nan && change <= 1.0f) {
      T = t;
      break;
    }
  }
  if (T < max_iters) history.narrow(0, T + 1, max_iters - T).copy_(history[T].unsqueeze(0));
  if (!whole)
    soft_output<D, K>(pw, ph + (T - 1) * G * k * d, ph + T * G * k * d, ptau, n, k, d, items, out.data_ptr<float>());
  auto c_final = history[T].clone();
  return {out, c_final, history, masses, at::full({}, T, w.options().dtype(at::kLong))};
}

// The backward's state for one group and iteration t, from dL/dC_t (dc, k * d), C_t and m_t: dL/dS_t (ds), dL/dm_t
// (dm) and the part of dL/dC_{t-1} that does not go through the attention (dc_prev: dc where the centroid kept its
// value, m_t <= tiny).
void iteration_terms(const float* dc, const float* c_t, const float* m_t, int64_t k, int64_t d, float* ds, float* dm,
                     float* dc_prev) {
  for (int64_t j = 0; j < k; ++j) {
    const bool alive = m_t[j] > kTiny;
    const float inv_m = 1.0f / std::max(m_t[j], kTiny);
    float dot = 0.0f;
    for (int64_t dd = 0; dd < d; ++dd) {
      const int64_t r = j * d + dd;
      ds[r] = alive ? dc[r] * inv_m : 0.0f;
      dot += dc[r] * c_t[r];
      dc_prev[r] = alive ? 0.0f : dc[r];
    }
    dm[j] = alive ? -dot * inv_m : 0.0f;
  }
}

// dL/dw of one tile for iteration t (see backward_iteration), from the tile's exponentials a against C_{t-1} and 1 /
// their sum: added into bg, or written there when `direct`; with `want_dc`, sum_j dz_j w and sum_j dz_j into acc.
// Weighted: f is the importance (the terms through S_t and m_t scale by it), else null.
template <int D, int K, bool Weighted>
inline void gradient_tile(const vf* x, const vf* gt, const float* f, int64_t i0, int64_t end, int count, const vf* a,
                          vf inv, const float* cp, const float* ct, const float* dsg, const float* dmg, float two_tau,
                          bool direct, bool want_dc, int64_t k_rt, int64_t d_rt, vf* dz, vf* acc, float* bg) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  vf fv = splat(1.0f);
  if (Weighted) load_tile<1>(f, i0, end, 1, &fv);
  vf bar = vf{}, dzsum = vf{};
  for (int64_t j = 0; j < k; ++j) {  // dL/dA_j: through S_t, m_t and (last iteration) W~ = A_T C_T
    vf gj = splat(dmg[j]);
    for (int64_t dd = 0; dd < d; ++dd) gj += dsg[j * d + dd] * x[dd];
    if (Weighted) {
      gj *= fv;
      // rounded here, as the unweighted code's gj is: an importance of ones gives the plain loop's bits (otherwise
      // `gj * fv + ct * gt` could become a different multiply-add than gj + ct * gt)
      KEEP_ROUNDED(gj);
    }
    if (direct)
      for (int64_t dd = 0; dd < d; ++dd) gj += ct[j * d + dd] * gt[dd];
    dz[j] = gj;
    bar += a[j] * gj;
  }
  bar *= inv;
  for (int64_t j = 0; j < k; ++j) {  // softmax backward (dz un-normalised, as a)
    dz[j] = (dz[j] - bar) * a[j];
    dzsum += dz[j];
  }
  for (int64_t dd = 0; dd < d; ++dd) {
    vf mix = vf{}, pull = vf{};
    for (int64_t j = 0; j < k; ++j) {
      mix += a[j] * dsg[j * d + dd];
      pull += dz[j] * cp[j * d + dd];
    }
    if (Weighted) {
      mix *= fv;
      KEEP_ROUNDED(mix);
    }
    const vf add = (mix + (pull - x[dd] * dzsum) * two_tau) * inv;
    if (d == 1 && count == V) {
      vf old = vf{};
      if (!direct) std::memcpy(&old, bg, sizeof old);
      old += add;
      std::memcpy(bg, &old, sizeof old);
    } else if (direct) {
      for (int v = 0; v < count; ++v) bg[v * d + dd] = add[v];
    } else {
      for (int v = 0; v < count; ++v) bg[v * d + dd] += add[v];
    }
  }
  if (want_dc) {
    const vf scale = inv * lane_mask(count);
    for (int64_t j = 0; j < k; ++j) {
      const vf zj = dz[j] * scale;
      for (int64_t dd = 0; dd < d; ++dd) acc[j * d + dd] += zj * x[dd];
      acc[k * d + j] += zj;
    }
  }
}

// gradient_tile with the importance's flag from f.
template <int D, int K, typename... Args>
inline void gradient_tile_any(const float* f, Args... args) {
  if (f)
    gradient_tile<D, K, true>(args...);
  else
    gradient_tile<D, K, false>(args...);
}

// One iteration t of `_backward` (chunked path), adding dL/dw into b (G, n, d), or writing it there for the first
// iteration processed (`direct`, t = T: b is uninitialised then, which spares a pass that zeroes it). With `want_dc`,
// each item's slot gets sum_i dz_ji w_i (k * d) and sum_i dz_ji (k), from which the caller forms dL/dC_{t-1}. With an
// importance f (non-null), the terms through S_t and m_t scale by f_i.
template <int D, int K>
void backward_iteration(const float* w, const float* grad, const float* f, const float* c_prev, const float* c_t,
                        const float* ds, const float* dm, const float* tau, bool direct, bool want_dc, int64_t n,
                        int64_t k_rt, int64_t d_rt, const std::vector<Work>& items, float* b, float* slots) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  const int64_t width = k * (d + 1);
  for_items(items, n, k, d, [&](Scratch& s, int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const Work& item = items[it];
      const int64_t g = item.group;
      std::fill(s.acc.begin(), s.acc.end(), vf{});
      for (int64_t i0 = item.begin; i0 < item.end; i0 += V) {
        const int count = load_tile<D>(w + g * n * d, i0, item.end, d, s.x.data());
        if (direct) load_tile<D>(grad + g * n * d, i0, item.end, d, s.y.data());
        const vf inv = attention_tile<D, K>(s.x.data(), c_prev + g * k * d, k, d, base2(tau[g]), s.a.data());
        const float* fg = f ? f + g * n : nullptr;
        gradient_tile_any<D, K>(fg, s.x.data(), s.y.data(), fg, i0, item.end, count, s.a.data(), inv,
                         c_prev + g * k * d, c_t + g * k * d, ds + g * k * d, dm + g * k, 2.0f / tau[g], direct,
                         want_dc, k, d, s.dz.data(), s.acc.data(), b + (g * n + i0) * d);
      }
      if (want_dc)
        for (int64_t r = 0; r < width; ++r) slots[it * width + r] = lane_sum(s.acc[r]);
    }
  });
}

// The last iteration (t = T) over whole groups (whole_groups), in one pass per group: dL/dC_T = sum_i A_T,i g_i into
// dc, the group's terms (ds, dm, dc_prev), then dL/dw written into b and, with `want_dc`, the slot sums as
// backward_iteration. The exponentials of the group's tiles serve both halves.
template <int D, int K>
void whole_group_last_iteration(const float* w, const float* grad, const float* f, const float* c_prev,
                                const float* c_t, const float* m_t, const float* tau, bool want_dc, int64_t n,
                                int64_t k_rt, int64_t d_rt, const std::vector<Work>& items, float* dc, float* ds,
                                float* dm, float* dc_prev, float* b, float* slots) {
  const int64_t k = K ? K : k_rt;
  const int64_t d = D ? D : d_rt;
  const int64_t width = k * (d + 1);
  const int64_t tiles = (n + V - 1) / V;
  for_items(items, n, k, d, [&](Scratch& s, int64_t lo, int64_t hi) {
    s.ex.resize(tiles * k);
    s.inv.resize(tiles);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t g = items[it].group;
      const float* wg = w + g * n * d;
      const float* gg = grad + g * n * d;
      const float* cp = c_prev + g * k * d;
      const float q = base2(tau[g]);
      std::fill(s.acc.begin(), s.acc.end(), vf{});
      for (int64_t i0 = 0, tile = 0; i0 < n; i0 += V, ++tile) {
        const int count = load_tile<D>(wg, i0, n, d, s.x.data());
        load_tile<D>(gg, i0, n, d, s.y.data());
        s.inv[tile] = attention_tile<D, K>(s.x.data(), cp, k, d, q, &s.ex[tile * k]);
        accumulate_tile<D, K>(&s.ex[tile * k], s.inv[tile] * lane_mask(count), s.y.data(), k, d, s.acc.data());
      }
      for (int64_t r = 0; r < k * d; ++r) dc[g * k * d + r] = lane_sum(s.acc[r]);
      iteration_terms(dc + g * k * d, c_t + g * k * d, m_t + g * k, k, d, ds + g * k * d, dm + g * k,
                      dc_prev + g * k * d);
      std::fill(s.acc.begin(), s.acc.end(), vf{});
      for (int64_t i0 = 0, tile = 0; i0 < n; i0 += V, ++tile) {
        const int count = load_tile<D>(wg, i0, n, d, s.x.data());
        load_tile<D>(gg, i0, n, d, s.y.data());
        const float* fg = f ? f + g * n : nullptr;
        gradient_tile_any<D, K>(fg, s.x.data(), s.y.data(), fg, i0, n, count, &s.ex[tile * k], s.inv[tile],
                         cp, c_t + g * k * d, ds + g * k * d, dm + g * k, 2.0f / tau[g], true, want_dc, k, d,
                         s.dz.data(), s.acc.data(), b + (g * n + i0) * d);
      }
      if (want_dc)
        for (int64_t r = 0; r < width; ++r) slots[it * width + r] = lane_sum(s.acc[r]);
    }
  });
}

// dc_prev += (sum_i dz_i w_i - C_{t-1} sum_i dz_i) * 2 / tau, from the items' slots of iteration t.
void add_attention_terms(const std::vector<Work>& items, const std::vector<float>& slots, const float* c_prev,
                         const float* tau, int64_t G, int64_t k, int64_t d, float* dc_prev) {
  const int64_t width = k * (d + 1);
  const auto sums = group_sums(items, slots, G, width);
  for (int64_t g = 0; g < G; ++g) {
    const float two_tau = 2.0f / tau[g];
    for (int64_t j = 0; j < k; ++j) {
      const double zsum = sums[g * width + k * d + j];
      for (int64_t dd = 0; dd < d; ++dd) {
        const int64_t r = (g * k + j) * d + dd;
        const double zw = sums[g * width + j * d + dd];
        dc_prev[r] += static_cast<float>((zw - c_prev[r] * zsum) * two_tau);
      }
    }
  }
}

template <int D, int K>
at::Tensor backward_impl(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& history,
                         const at::Tensor& masses, int64_t T, const at::Tensor& tau, const float* pf) {
  const int64_t G = w.size(0), n = w.size(1), d = w.size(2), k = K ? K : history.size(2);
  const int64_t width = k * (d + 1);
  const auto items = work_items(G, n);
  const float* pw = w.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  const float* ph = history.data_ptr<float>();
  const float* pm = masses.data_ptr<float>();
  const float* ptau = tau.data_ptr<float>();
  const int64_t ckd = G * k * d;
  std::vector<float> dc(ckd), ds(ckd), dm(G * k), dc_prev(ckd), slots(items.size() * width);
  auto b = at::empty_like(w);  // written by the first iteration below (t = T)
  int64_t t = T;
  if (whole_groups(n)) {  // t = T in one pass per group
    whole_group_last_iteration<D, K>(pw, pg, pf, ph + (T - 1) * ckd, ph + T * ckd, pm + (T - 1) * G * k, ptau, T > 1, n,
                                  k, d, items, dc.data(), ds.data(), dm.data(), dc_prev.data(), b.data_ptr<float>(),
                                  slots.data());
    if (T > 1) add_attention_terms(items, slots, ph + (T - 1) * ckd, ptau, G, k, d, dc_prev.data());
    dc.swap(dc_prev);
    --t;
  } else {  // dL/dC_T = sum_i A_T,i g_i
    const auto out_sums = reduce_pass<D, K>(pw, pg, nullptr, ph + (T - 1) * ckd, ptau, G, n, k, d, items);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < k * d; ++r) dc[g * k * d + r] = static_cast<float>(out_sums[g * width + r]);
  }
  for (; t >= 1; --t) {
    const float* c_t = ph + t * ckd;
    const float* c_prev = ph + (t - 1) * ckd;
    const float* m_t = pm + (t - 1) * G * k;
    for (int64_t g = 0; g < G; ++g)
      iteration_terms(dc.data() + g * k * d, c_t + g * k * d, m_t + g * k, k, d, ds.data() + g * k * d,
                      dm.data() + g * k, dc_prev.data() + g * k * d);
    backward_iteration<D, K>(pw, pg, pf, c_prev, c_t, ds.data(), dm.data(), ptau, t == T, t > 1, n, k, d, items,
                          b.data_ptr<float>(), slots.data());
    if (t > 1) add_attention_terms(items, slots, c_prev, ptau, G, k, d, dc_prev.data());
    dc.swap(dc_prev);
  }
  return b;
}

// The importance's data: null for an empty tensor (no importance), else checked to be (G, n) float32 contiguous.
const float* importance_data(const at::Tensor& w, const at::Tensor& importance) {
  if (importance.numel() == 0) return nullptr;
  TORCH_CHECK(importance.dim() == 2 && importance.size(0) == w.size(0) && importance.size(1) == w.size(1) &&
                  importance.scalar_type() == at::kFloat && importance.is_contiguous() && importance.device().is_cpu(),
              "dkm_fused: importance must be a contiguous float32 (G, n) tensor for w ", w.sizes(), ", got ",
              importance.sizes());
  return importance.data_ptr<float>();
}

// The backward's inputs checked: w and grad (G, n, d), the forward's history and masses, and T, returned as a number.
int64_t checked_backward_inputs(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& history,
                                const at::Tensor& masses, const at::Tensor& T, const at::Tensor& tau) {
  check_inputs(w, history[0], tau);
  TORCH_CHECK(grad.sizes() == w.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "dkm_fused: grad must be a contiguous float32 tensor of w's shape ", w.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(history.is_contiguous() && masses.is_contiguous() && masses.scalar_type() == at::kFloat,
              "dkm_fused: contiguous float32 history and masses expected");
  // the forward's shapes: history (T_max + 1, G, k, d), masses (T_max, G, k); the kernels read masses as (T, G, k)
  TORCH_CHECK(history.dim() == 4 && masses.dim() == 3 && masses.size(1) == history.size(1) &&
                  masses.size(2) == history.size(2) && masses.device().is_cpu() && grad.device().is_cpu(),
              "dkm_fused: masses ", masses.sizes(), " do not match the history ", history.sizes());
  TORCH_CHECK(T.numel() == 1 && !at::isFloatingType(T.scalar_type()) && T.scalar_type() != at::kBool,
              "dkm_fused: T must be one integer");
  const int64_t t = T.item<int64_t>();
  TORCH_CHECK(t >= 1 && t < history.size(0) && t <= masses.size(0), "dkm_fused: T = ", t, " out of range");
  return t;
}

// The uniquified path's backward (dkm.py `_UniquifiedDKM`, d = 1): the vectors are a weight's distinct values u (G,
// U, 1), `counts` (G, U) how many weights each stands for (the forward's loop ran with them as importance) and `grad`
// the sums of the upstream gradient g over each bucket's weights. A single weight w_i of bucket u gets dL/dw_i = a(u)
// g_i + b(u): b (G, U, 1) the part through the centroids (one weight's share of S_t and m_t, every iteration), a (G,
// U, 1) the derivative of the soft weight at u (the direct term of t = T with C_T held fixed). Each is gradient_tile
// of one term (the softmax backward is linear in its upstream gradient): b without importance or direct term, a with
// only the direct term for an upstream gradient of one; and dL/dC_{t-1} takes the weighted backward's own (the counts
// as importance, the bucket sums as gradient), whose dL/du is not needed.
std::vector<at::Tensor> dkm_backward_buckets(const at::Tensor& u, const at::Tensor& grad, const at::Tensor& counts,
                                             const at::Tensor& history, const at::Tensor& masses, const at::Tensor& T,
                                             const at::Tensor& tau) {
  const int64_t last = checked_backward_inputs(u, grad, history, masses, T, tau);
  TORCH_CHECK(u.size(2) == 1, "dkm_fused: the bucket backward needs d = 1, got ", u.sizes());
  const float* pf = importance_data(u, counts);
  TORCH_CHECK(pf != nullptr, "dkm_fused: the bucket backward needs the buckets' counts");
  const int64_t G = u.size(0), n = u.size(1), k = history.size(2), ck = G * k;
  const auto items = work_items(G, n);
  const float* pu = u.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  const float* ph = history.data_ptr<float>();
  const float* pm = masses.data_ptr<float>();
  const float* ptau = tau.data_ptr<float>();
  auto b = at::zeros_like(u);
  auto a = at::empty_like(u);
  float* pb = b.data_ptr<float>();
  float* pa = a.data_ptr<float>();
  std::vector<float> dc(ck), ds(ck), dm(ck), dc_prev(ck), none(k), slots(items.size() * 2 * k);
  const auto out_sums = reduce_pass<1, 0>(pu, pg, nullptr, ph + (last - 1) * ck, ptau, G, n, k, 1, items);
  for (int64_t g = 0; g < G; ++g)  // dL/dC_T = sum_u A_T,u (sum of g over u's weights)
    for (int64_t j = 0; j < k; ++j) dc[g * k + j] = static_cast<float>(out_sums[g * 2 * k + j]);
  for (int64_t t = last; t >= 1; --t) {
    const float* c_t = ph + t * ck;
    const float* c_prev = ph + (t - 1) * ck;
    for (int64_t g = 0; g < G; ++g)
      iteration_terms(dc.data() + g * k, c_t + g * k, pm + (t - 1) * ck + g * k, k, 1, ds.data() + g * k,
                      dm.data() + g * k, dc_prev.data() + g * k);
    const bool direct = t == last, want_dc = t > 1;
    for_items(items, n, k, 1, [&](Scratch& s, int64_t lo, int64_t hi) {
      const vf one = splat(1.0f);
      float unused[V] = {};  // the weighted call's dL/du, not needed
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t g = items[it].group, end = items[it].end;
        const float *cp = c_prev + g * k, *ct = c_t + g * k, *dsg = ds.data() + g * k, *dmg = dm.data() + g * k;
        const float two_tau = 2.0f / ptau[g];
        std::fill(s.acc.begin(), s.acc.end(), vf{});
        for (int64_t i0 = items[it].begin; i0 < end; i0 += V) {
          const int count = load_tile<1>(pu + g * n, i0, end, 1, s.x.data());
          load_tile<1>(pg + g * n, i0, end, 1, s.y.data());
          const vf inv = attention_tile<1, 0>(s.x.data(), cp, k, 1, base2(ptau[g]), s.a.data());
          const vf* ex = s.a.data();
          gradient_tile<1, 0, false>(s.x.data(), s.y.data(), nullptr, i0, end, count, ex, inv, cp, ct, dsg, dmg,
                                     two_tau, false, false, k, 1, s.dz.data(), s.acc.data(), pb + g * n + i0);
          if (direct)
            gradient_tile<1, 0, false>(s.x.data(), &one, nullptr, i0, end, count, ex, inv, cp, ct, none.data(),
                                       none.data(), two_tau, true, false, k, 1, s.dz.data(), s.acc.data(),
                                       pa + g * n + i0);
          if (want_dc)
            gradient_tile<1, 0, true>(s.x.data(), s.y.data(), pf + g * n, i0, end, count, ex, inv, cp, ct, dsg, dmg,
                                      two_tau, direct, true, k, 1, s.dz.data(), s.acc.data(), unused);
        }
        if (want_dc)
          for (int64_t r = 0; r < 2 * k; ++r) slots[it * 2 * k + r] = lane_sum(s.acc[r]);
      }
    });
    if (want_dc) add_attention_terms(items, slots, c_prev, ptau, G, k, 1, dc_prev.data());
    dc.swap(dc_prev);
  }
  return {b, a};
}

std::vector<at::Tensor> dkm_forward(const at::Tensor& w, const at::Tensor& c0, const at::Tensor& tau,
                                    const at::Tensor& epsilon, int64_t max_iters, const at::Tensor& importance) {
  check_inputs(w, c0, tau);
  const float* pf = importance_data(w, importance);
  TORCH_CHECK(epsilon.numel() == w.size(0) && epsilon.scalar_type() == at::kFloat && epsilon.is_contiguous() &&
                  epsilon.device().is_cpu(),
              "dkm_fused: one float32 epsilon per group expected");
  TORCH_CHECK(max_iters >= 1 && max_iters <= (int64_t{1} << 24), "dkm_fused: max_iters must be in [1, 2**24], got ",
              max_iters);
  // a group of no vectors would leave its centroids unwritten (uninitialised history)
  TORCH_CHECK(w.size(1) >= 1 || w.size(0) == 0, "dkm_fused: groups of no vectors, w ", w.sizes());
  const int64_t d = w.size(2), k = c0.size(1);
  if (d == 1 && k == 16) return forward_impl<1, 16>(w, c0, tau, epsilon, max_iters, pf);
  if (d == 1 && k == 8) return forward_impl<1, 8>(w, c0, tau, epsilon, max_iters, pf);
  return d == 1 ? forward_impl<1, 0>(w, c0, tau, epsilon, max_iters, pf)
                : forward_impl<0, 0>(w, c0, tau, epsilon, max_iters, pf);
}

at::Tensor dkm_backward(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& history,
                        const at::Tensor& masses, const at::Tensor& T, const at::Tensor& tau,
                        const at::Tensor& importance) {
  const int64_t t = checked_backward_inputs(w, grad, history, masses, T, tau);
  const float* pf = importance_data(w, importance);
  const int64_t d = w.size(2), k = history.size(2);
  if (d == 1 && k == 16) return backward_impl<1, 16>(w, grad, history, masses, t, tau, pf);
  if (d == 1 && k == 8) return backward_impl<1, 8>(w, grad, history, masses, t, tau, pf);
  return d == 1 ? backward_impl<1, 0>(w, grad, history, masses, t, tau, pf)
                : backward_impl<0, 0>(w, grad, history, masses, t, tau, pf);
}

// var(w_g) of every group of v (G, n, d): the mean squared distance to the group's mean vector (layout.py
// `group_variance`, the relative tau's scale), (G,). Two passes over each group while it is in cache (the torch
// expression takes three over the whole tensor), per-lane float sums of at most 4096 terms combined in double.
at::Tensor group_variance(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 3 && v.scalar_type() == at::kFloat && v.is_contiguous() && v.device().is_cpu(),
              "group_variance: a contiguous float32 (G, n, d) CPU tensor expected, got ", v.sizes(), " ", v.scalar_type());
  const int64_t G = v.size(0), n = v.size(1), d = v.size(2);
  auto out = at::empty({G}, v.options());
  const float* pv = v.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, G, grain(n * d), [&](int64_t lo, int64_t hi) {
    std::vector<double> mean(d);
    for (int64_t g = lo; g < hi; ++g) {
      const float* p = pv + g * n * d;
      double ss = 0.0;
      if (d == 1) {
        // float lane sums flushed into double every kFlush values: a float sum of millions of terms stops growing
        // (an 8B model's embedding: variance 8% low with one float sum per lane)
        constexpr int64_t kFlush = 4096 * V;
        const int64_t whole = n / V * V;
        auto lane_sums = [&](auto term) {  // the sum of term(x) over the whole vectors x of the group
          double total = 0.0;
          for (int64_t b = 0; b < whole; b += kFlush) {
            vf acc = vf{};
            for (int64_t i = b, e = std::min(whole, b + kFlush); i < e; i += V) {
              vf x;
              std::memcpy(&x, p + i, sizeof x);
              acc += term(x);
            }
            for (int v = 0; v < V; ++v) total += acc[v];
          }
          return total;
        };
        double sum = lane_sums([](vf x) { return x; });
        for (int64_t i = whole; i < n; ++i) sum += p[i];
        const float m = static_cast<float>(sum / n);
        ss = lane_sums([m](vf x) {
          x -= m;
          return x * x;
        });
        for (int64_t i = whole; i < n; ++i) ss += static_cast<double>(p[i] - m) * (p[i] - m);
      } else {
        std::fill(mean.begin(), mean.end(), 0.0);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t dd = 0; dd < d; ++dd) mean[dd] += p[i * d + dd];
        for (int64_t dd = 0; dd < d; ++dd) mean[dd] /= n;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t dd = 0; dd < d; ++dd) ss += (p[i * d + dd] - mean[dd]) * (p[i * d + dd] - mean[dd]);
      }
      po[g] = static_cast<float>(ss / n);
    }
  });
  return out;
}

}  // namespace

int64_t abi_version() { return 8; }

// dkm_buckets.cpp
at::Tensor bucket_counts(const at::Tensor& keys);
at::Tensor bucket_gather(const at::Tensor& table, const at::Tensor& keys);
at::Tensor bucket_sums(const at::Tensor& keys, const at::Tensor& g);
at::Tensor bucket_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& keys, const at::Tensor& g);
at::Tensor nearest_sorted(const at::Tensor& x, const at::Tensor& sorted_c, const at::Tensor& order);
// dkm_kmeans.cpp
at::Tensor lloyd_sorted(const at::Tensor& x, const at::Tensor& s1, const at::Tensor& c, const at::Tensor& bounds,
                        int64_t iters);
// dkm_gptq.cpp
std::tuple<at::Tensor, at::Tensor> gptq_block(at::Tensor& block, const at::Tensor& lut, const at::Tensor& u);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dkm_forward, "DKM loop and soft weight: (W~, C_T, history, masses, T)");
  m.def("backward", &dkm_backward, "dL/dw through the DKM loop, recomputing attention");
  m.def("backward_buckets", &dkm_backward_buckets, "the uniquified path's backward: (b, a) per bucket");
  m.def("bucket_counts", &bucket_counts, "weights per 16-bit key: (65536,) int64");
  m.def("bucket_gather", &bucket_gather, "table[keys]");
  m.def("bucket_sums", &bucket_sums, "per-key sums of g: (65536,) float32");
  m.def("bucket_grad", &bucket_grad, "a[keys] * g + b[keys]");
  m.def("nearest_sorted", &nearest_sorted, "nearest of sorted centroids (d = 1): (G, n) int64");
  m.def("lloyd_sorted", &lloyd_sorted, "Lloyd iterations of 1-D k-means on sorted values: (G, r, k) double");
  m.def("gptq_block", &gptq_block, "GPTQ's loop in one block of features: (indices, errors), the block updated");
  m.def("group_variance", &group_variance, "mean squared distance to each group's mean vector: (G,) float32");
  m.def("abi_version", &abi_version);
}
