/* Native CPU kernels of palettized inference: decode rows of a palettized weight, and the fused LUT matrix-vector
 * product y = x W^T for a few rows of x that never writes W out. Plain C, no Python or torch headers: lut_kernels.cpp
 * includes it and wraps it as torch operators (dkm_hf/ops/native.py); every pointer is the data of a contiguous CPU
 * tensor.
 *
 * A weight is (channels, features) rows of vectors_per_row vectors of cluster_dim values. Row r uses LUT group
 * r / rows_per_group: lut (groups, n_clusters, cluster_dim). Vector i of the weight (row-major) has the index at
 * bits [i*b, (i+1)*b) of `packed` read as a little-endian bit stream (dkm_hf/ops/packing.py). The value of a weight
 * is value_dtype(float(lut) * float(scale[r])) (no product without a scale): exactly what the torch decode makes.
 * Dtype codes: 0 float32, 1 float16, 2 bfloat16. Assumes a little-endian CPU (x86-64, AArch64).
 *
 * Compiled three ways (native.py picks one from torch's CPU capability): AVX-512 (16 lanes: a LUT of up to 16
 * entries is one register and a lookup one vpermps; larger LUTs use vgatherdps; indices of any width unpacked in
 * registers), AVX2 (8 lanes: two vpermps and a blend; 1, 2, 4 and 8 bits), and plain C for any other CPU. OpenMP splits rows when it is available.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DKM_LANES 16
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DKM_LANES 8
#else
#define DKM_LANES 0
#endif

#define MAX_LUT 4096   /* n_clusters * cluster_dim of the native path (the Python side checks) */
#define MAX_DIM 16     /* cluster_dim of the native path */
#define CHUNK 256      /* vectors of one row decoded at a time */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const uint8_t* packed;
    int64_t bits, cluster_dim, vectors_per_row, rows_per_group, n_clusters;
    const void* lut;
    int64_t lut_dtype;
    const void* scale; /* (channels,) or NULL */
    int64_t scale_dtype, value_dtype;
} Palette;

int dkm_abi_version(void) { return 1; }
int dkm_lanes(void) { return DKM_LANES; }

/* the little-endian integer of n <= 8 bytes, from loads of exactly 1, 2, 4 or 8 bytes into registers: a copy into
 * a zeroed word on the stack would stall store forwarding, a longer load could read past the buffer */
INLINE uint64_t load_le(const uint8_t* p, int64_t n) {
    uint16_t h;
    uint32_t w;
    uint64_t q;
    switch (n) {
        case 1: return p[0];
        case 2: memcpy(&h, p, 2); return h;
        case 3: memcpy(&h, p, 2); return h | (uint64_t)p[2] << 16;
        case 4: memcpy(&w, p, 4); return w;
        case 5: memcpy(&w, p, 4); return w | (uint64_t)p[4] << 32;
        case 6: memcpy(&w, p, 4); memcpy(&h, p + 4, 2); return w | (uint64_t)h << 32;
        case 7: memcpy(&w, p, 4); memcpy(&h, p + 4, 2); return w | (uint64_t)h << 32 | (uint64_t)p[6] << 48;
        default: memcpy(&q, p, 8); return q;
    }
}

/* -- scalar conversions (c10's, bit for bit) -------------------------------------------------------------------- */
INLINE uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

INLINE float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

INLINE uint16_t float_to_half(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base), nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

INLINE uint16_t float_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

INLINE float load_float(const void* p, int64_t dtype, int64_t i) {
    if (dtype == 0) return ((const float*)p)[i];
    if (dtype == 1) return half_to_float(((const uint16_t*)p)[i]);
    return float_of((uint32_t)((const uint16_t*)p)[i] << 16);
}

INLINE float round_to(float v, int64_t dtype) {
    if (dtype == 1) return half_to_float(float_to_half(v));
    if (dtype == 2) return float_of((uint32_t)float_to_bf16(v) << 16);
    return v;
}

#if DKM_LANES
/* 8 LUT values as float32: the same values as load_float (F16C's conversion is exact, bfloat16 a shift) */
INLINE __m256 load8(const void* p, int64_t dtype, int64_t i) {
    if (dtype == 0) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* -- the effective LUT of a row ----------------------------------------------------------------------------------- */
typedef struct {
    int64_t group; /* the group `values` holds (-1: none, or a per-row scale) */
    float values[MAX_LUT];
} RowLut;

static const float* row_lut(const Palette* p, int64_t r, RowLut* c) {
    const int64_t n = p->n_clusters * p->cluster_dim, g = r / p->rows_per_group;
    if (p->scale || g != c->group) {
        const float s = p->scale ? load_float(p->scale, p->scale_dtype, r) : 1.0f;
        int64_t i = 0;
#if DKM_LANES
        if (p->value_dtype == 0) /* float32 values: no rounding; 8 conversions (and products) at a time */
            for (; i + 8 <= n; i += 8) {
                const __m256 v = load8(p->lut, p->lut_dtype, g * n + i);
                _mm256_storeu_ps(c->values + i, p->scale ? _mm256_mul_ps(v, _mm256_set1_ps(s)) : v);
            }
#endif
        for (; i < n; i++) {
            float v = load_float(p->lut, p->lut_dtype, g * n + i);
            c->values[i] = round_to(p->scale ? v * s : v, p->value_dtype);
        }
        c->group = p->scale ? -1 : g;
    }
    return c->values;
}

/* indices of vectors [v0, v0 + n) of the weight (its bit stream) as int32 */
static void unpack(const uint8_t* packed, int64_t bits, int64_t v0, int64_t n, int32_t* out) {
    const int64_t start = v0 * bits;
    const uint32_t mask = (1u << bits) - 1u;
    if (start % 8 == 0 && 8 % bits == 0) {
        const uint8_t* p = packed + start / 8;
        const int64_t per = 8 / bits, whole = n / per;
        if (bits == 8)
            for (int64_t j = 0; j < n; j++) out[j] = p[j];
        else if (bits == 4)
            for (int64_t j = 0; j < whole; j++) out[2 * j] = p[j] & 15, out[2 * j + 1] = p[j] >> 4;
        else
            for (int64_t j = 0; j < whole; j++)
                for (int64_t t = 0; t < per; t++) out[j * per + t] = (p[j] >> (t * bits)) & mask;
        for (int64_t i = whole * per; i < n; i++) out[i] = (p[i / per] >> ((i % per) * bits)) & mask;
        return;
    }
    int64_t i = 0;
    if (start % 8 == 0) { /* 3, 5, 6, 7 bits from a byte boundary: 8 indices from one little-endian word */
        const uint8_t* p = packed + start / 8;
        for (; i + 8 <= n; i += 8, p += bits) {
            const uint64_t w = load_le(p, bits);
            for (int t = 0; t < 8; t++) out[i + t] = (int32_t)((w >> (t * bits)) & mask);
        }
    }
    for (; i < n; i++) {
        const int64_t pos = start + i * bits, byte = pos >> 3, sh = pos & 7;
        uint32_t v = packed[byte];
        if (sh + bits > 8) v |= (uint32_t)packed[byte + 1] << 8;
        out[i] = (int32_t)((v >> sh) & mask);
    }
}

/* values of vectors [v0, v0 + n) of row r (n * cluster_dim floats), by scalar lookups */
static void row_values_scalar(const Palette* p, int64_t r, int64_t v0, int64_t n, const float* lut, float* out) {
    int32_t idx[CHUNK];
    const int64_t d = p->cluster_dim;
    unpack(p->packed, p->bits, r * p->vectors_per_row + v0, n, idx);
    if (d == 1)
        for (int64_t t = 0; t < n; t++) out[t] = lut[idx[t]];
    else
        for (int64_t t = 0; t < n; t++)
            for (int64_t e = 0; e < d; e++) out[t * d + e] = lut[idx[t] * d + e];
}

/* -- vector lookups: a row of 1-, 2-, 4- or 8-bit indices starting on a byte, cluster_dim 1 ------------------------ */
static int vector_path(const Palette* p) {
    return DKM_LANES && p->cluster_dim == 1 && (DKM_LANES == 16 || 8 % p->bits == 0) &&
           (p->vectors_per_row * p->bits) % 8 == 0;
}

#if DKM_LANES == 16
typedef __m512 vfloat;
typedef __m512i vint;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)

/* LANES indices starting at vector j of a row */
INLINE vint indices(const uint8_t* row, int64_t bits, int64_t j) {
    const uint8_t* p = row + j * bits / 8;
    if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    if (bits == 4) {
        const vint v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i*)p)));
        const vint sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        return _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(15));
    }
    if (8 % bits) { /* 3, 5, 6, 7 bits: two 8-index words of `bits` bytes, shifted in 64-bit lanes */
        const uint64_t w0 = load_le(p, bits), w1 = load_le(p + bits, bits);
        const int64_t b = bits;
        const vint sh = _mm512_setr_epi64(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
        const vint mask = _mm512_set1_epi64((1 << bits) - 1);
        const __m256i lo = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((int64_t)w0), sh), mask));
        const __m256i hi = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((int64_t)w1), sh), mask));
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    const uint32_t w = (uint32_t)load_le(p, 2 * bits);
    const vint lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const vint sh = _mm512_slli_epi32(lane, (unsigned)(bits >> 1)); /* lane * bits for 1 and 2 bits */
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w), sh), _mm512_set1_epi32((1 << bits) - 1));
}

typedef struct { __m512 t; } Table; /* a LUT of <= 16 entries */
INLINE Table make_table(const float* lut) { Table t = {_mm512_loadu_ps(lut)}; return t; }
INLINE vfloat lookup(vint idx, Table t, const float* lut, int64_t bits) {
    return bits <= 4 ? _mm512_permutexvar_ps(idx, t.t) : _mm512_i32gather_ps(idx, lut, 4);
}
#elif DKM_LANES == 8
typedef __m256 vfloat;
typedef __m256i vint;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
INLINE float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE vint indices(const uint8_t* row, int64_t bits, int64_t j) {
    const uint8_t* p = row + j * bits / 8;
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    const uint32_t w = (uint32_t)load_le(p, bits); /* 8 indices: `bits` bytes */
    const vint sh = _mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), (int)(bits >> 1)); /* * 1, 2, 4 */
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), _mm256_set1_epi32((1 << bits) - 1));
}

typedef struct { __m256 lo, hi; } Table;
INLINE Table make_table(const float* lut) { Table t = {_mm256_loadu_ps(lut), _mm256_loadu_ps(lut + 8)}; return t; }
INLINE vfloat lookup(vint idx, Table t, const float* lut, int64_t bits) {
    if (bits > 4) return _mm256_i32gather_ps(lut, idx, 4);
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx), hi = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 -> sign */
}
#endif

#if DKM_LANES
#define L DKM_LANES
/* a row's LUT padded to 16 entries for the register table */
INLINE Table row_table(const Palette* p, const float* lut) {
    float padded[16] = {0};
    if (p->n_clusters <= 16) memcpy(padded, lut, (size_t)p->n_clusters * sizeof(float));
    return make_table(padded);
}

/* sums[m] = sum_j W[r, j] x[m, j] over the first `len` (a multiple of 2 * L) features, nm <= 4 rows of x */
INLINE void dot_rows(const uint8_t* row, int64_t bits, Table t, const float* lut, const float* x, int64_t stride,
                     int64_t len, int nm, float* sums) {
    vfloat a[8]; /* two accumulators per row of x: consecutive FMAs do not wait on each other */
    for (int i = 0; i < 8; i++) a[i] = VZERO();
    for (int64_t j = 0; j < len; j += 2 * L) {
        const vfloat w0 = lookup(indices(row, bits, j), t, lut, bits);
        const vfloat w1 = lookup(indices(row, bits, j + L), t, lut, bits);
        for (int m = 0; m < nm; m++) {
            a[2 * m] = VFMA(w0, VLOAD(x + m * stride + j), a[2 * m]);
            a[2 * m + 1] = VFMA(w1, VLOAD(x + m * stride + j + L), a[2 * m + 1]);
        }
    }
    for (int m = 0; m < nm; m++) sums[m] = VSUM(a[2 * m]) + VSUM(a[2 * m + 1]);
}

#define DOT_CASE(B, M) \
    case B * 8 + M: dot_rows(row, B, t, lut, x, stride, len, M, sums); break;
static void dot_rows_any(const uint8_t* row, int64_t bits, Table t, const float* lut, const float* x, int64_t stride,
                         int64_t len, int nm, float* sums) {
    switch (bits * 8 + nm) { /* one specialised loop per bit width and number of rows */
        DOT_CASE(1, 1) DOT_CASE(1, 2) DOT_CASE(1, 3) DOT_CASE(1, 4)
        DOT_CASE(2, 1) DOT_CASE(2, 2) DOT_CASE(2, 3) DOT_CASE(2, 4)
        DOT_CASE(4, 1) DOT_CASE(4, 2) DOT_CASE(4, 3) DOT_CASE(4, 4)
        DOT_CASE(8, 1) DOT_CASE(8, 2) DOT_CASE(8, 3) DOT_CASE(8, 4)
#if DKM_LANES == 16 /* widths that straddle bytes: AVX-512 only (see vector_path) */
        DOT_CASE(3, 1) DOT_CASE(3, 2) DOT_CASE(3, 3) DOT_CASE(3, 4)
        DOT_CASE(5, 1) DOT_CASE(5, 2) DOT_CASE(5, 3) DOT_CASE(5, 4)
        DOT_CASE(6, 1) DOT_CASE(6, 2) DOT_CASE(6, 3) DOT_CASE(6, 4)
        DOT_CASE(7, 1) DOT_CASE(7, 2) DOT_CASE(7, 3) DOT_CASE(7, 4)
#endif
    }
}
#endif

/* values of vectors [v0, v0 + n) of row r into out (n * cluster_dim floats) */
static void row_values(const Palette* p, int64_t r, int64_t v0, int64_t n, const float* lut, float* out) {
    int64_t i = 0;
#if DKM_LANES
    if (vector_path(p) && v0 % L == 0) {
        const uint8_t* row = p->packed + r * p->vectors_per_row * p->bits / 8;
        const Table t = row_table(p, lut);
        for (; i + L <= n; i += L) VSTORE(out + i, lookup(indices(row, p->bits, v0 + i), t, lut, p->bits));
    }
#endif
    if (i < n) row_values_scalar(p, r, v0 + i, n - i, lut, out + i);
}

/* -- entry points --------------------------------------------------------------------------------------------------- */

/* rows (rows[i], or r0 + i without `rows`) of the (channels, features) weight into out (n_rows, features), in
 * value_dtype */
int dkm_decode_rows(const Palette* p, const int64_t* rows, int64_t r0, int64_t n_rows, void* out, int64_t threads) {
    const int64_t features = p->vectors_per_row * p->cluster_dim;
#pragma omp parallel num_threads(threads) if (threads > 1 && n_rows * features >= (1 << 18))
    {
        RowLut cache;
        float buf[CHUNK * MAX_DIM];
        cache.group = -1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_rows; i++) {
            const int64_t r = rows ? rows[i] : r0 + i;
            const float* lut = row_lut(p, r, &cache);
            for (int64_t v0 = 0; v0 < p->vectors_per_row; v0 += CHUNK) {
                const int64_t n = p->vectors_per_row - v0 < CHUNK ? p->vectors_per_row - v0 : CHUNK;
                const int64_t m = n * p->cluster_dim, at = i * features + v0 * p->cluster_dim;
                if (p->value_dtype == 0) {
                    row_values(p, r, v0, n, lut, (float*)out + at);
                    continue;
                }
                row_values(p, r, v0, n, lut, buf);
                uint16_t* o = (uint16_t*)out + at;
                if (p->value_dtype == 1)
                    for (int64_t j = 0; j < m; j++) o[j] = float_to_half(buf[j]);
                else
                    for (int64_t j = 0; j < m; j++) o[j] = (uint16_t)(bits_of(buf[j]) >> 16); /* exact */
            }
        }
    }
    return 0;
}

/* y[m, r] = bias[r] + sum_f W[r, f] x[m, f] (W's values in value_dtype, accumulated in float32) for m < n_x;
 * x (n_x, features) and y (n_x, channels) float32, bias (channels,) float32 or NULL */
int dkm_lut_gemv(const Palette* p, const float* x, int64_t n_x, const float* bias, float* y, int64_t channels,
                 int64_t threads) {
    const int64_t features = p->vectors_per_row * p->cluster_dim, d = p->cluster_dim;
#pragma omp parallel num_threads(threads) if (threads > 1 && channels * features >= (1 << 18))
    {
        RowLut cache;
        float buf[CHUNK * MAX_DIM];
        cache.group = -1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < channels; r++) {
            const float* lut = row_lut(p, r, &cache);
            int64_t fast = 0;
#if DKM_LANES
            Table t;
            if (vector_path(p)) {
                fast = features / (2 * L) * (2 * L);
                t = row_table(p, lut);
            }
#endif
            for (int64_t mb = 0; mb < n_x; mb += 4) {
                const int nm = n_x - mb < 4 ? (int)(n_x - mb) : 4;
                float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if DKM_LANES
                if (fast)
                    dot_rows_any(p->packed + r * features * p->bits / 8, p->bits, t, lut, x + mb * features, features,
                                 fast, nm, sums);
#endif
                if (fast < features) {
                    float acc[4][16] = {{0.0f}};
                    for (int64_t v0 = fast / d; v0 < p->vectors_per_row; v0 += CHUNK) {
                        const int64_t n = p->vectors_per_row - v0 < CHUNK ? p->vectors_per_row - v0 : CHUNK;
                        const int64_t len = n * d, off = v0 * d, whole = len / 16 * 16;
                        row_values(p, r, v0, n, lut, buf);
                        for (int m = 0; m < nm; m++) {
                            const float* xm = x + (mb + m) * features + off;
                            for (int64_t j = 0; j < whole; j += 16)
                                for (int k = 0; k < 16; k++) acc[m][k] += buf[j + k] * xm[j + k];
                            for (int64_t j = whole; j < len; j++) acc[m][j - whole] += buf[j] * xm[j];
                        }
                    }
                    for (int m = 0; m < nm; m++)
                        for (int k = 0; k < 16; k++) sums[m] += acc[m][k];
                }
                for (int m = 0; m < nm; m++) y[(mb + m) * channels + r] = bias ? sums[m] + bias[r] : sums[m];
            }
        }
    }
    return 0;
}
